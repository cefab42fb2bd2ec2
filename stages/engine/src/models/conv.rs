//! 2-D convolution on CPU as per-image GEMMs (over the im2col unfolding, or over the image itself
//! where the unfolding is only shifted copies), forward and backward, as one candle op.
//!
//! candle's CPU convolution computes its input gradient with a direct, naive transposed
//! convolution and its weight gradient as a convolution over transposed tensors, which made
//! training ~10× slower than the forward pass alone. Here a convolution is `Y_i = W · cols_i`
//! for each image i, where `cols_i = im2col(x_i)` is the `K × (H'·W')` unfolding (K = C·kh·kw,
//! the Caffe layout, so the product is already NCHW). The backward is written by hand:
//! `dW = Σ_i dY_i · cols_iᵀ` and `dx_i = col2im(Wᵀ · dY_i)`.
//!
//! Why per image: the unfolded matrix of a whole batch is kh·kw times the activation (37 MB for
//! a ResNet-20 layer at batch 64) and would stream through memory twice; one image's is a few
//! hundred KB and stays in the core's cache between the unfolding and the GEMM. The images of a
//! batch are split across rayon's threads, each running single-threaded GEMMs ([`super::sgemm`]:
//! AVX-512 kernels, or the `gemm` crate candle uses) over scratch buffers kept per thread and
//! reused across calls. The weight gradient, a sum over the batch, is split by the batch size
//! only and its parts added in a fixed order, so it is bitwise the same on any number of threads.
//! Pointwise (1×1, stride 1, unpadded) convolutions skip the unfolding altogether, and so do
//! stride-1 "same" convolutions (the 3×3 layers that make up most of a ResNet): each row of
//! their unfolding is an image plane shifted by a fixed offset, so the forward and the input
//! gradient are implicit GEMMs ([`super::sgemm::gemm_rows`]) whose B rows point into
//! zero-padded copies of the image (or of dY), one per kernel column, with the pixels whose
//! shift wraps around a row edge zeroed (`*_implicit`), and the weight gradient is one product
//! per tap reading the image where it lies (`weight_grad_taps`).
//!
//! The exception is a large weight over small planes (a ResNet-18's 512-channel 3×3 layers on
//! 4×4 maps: a 9.4 MB weight, 16 columns per image), where one image's product reads the whole
//! weight for 32 FLOPs per value and the batch's partial weight gradients are each as large as
//! the weight. There ([`Geometry::images_per_product`]) a few images are unfolded side by side
//! into one product, and the weight gradient is split by input channels instead of images, so
//! each of its values is one sum over the whole batch (again the same on any number of
//! threads). On a CUDA
//! device the same op runs cuDNN's forward, backward-data and backward-filter (`gpu::conv`),
//! in f32 or bf16 (the weights, kept in f32, are cast to the input's type); elsewhere the layer
//! uses candle's own convolution.

use super::cpu::{f32_slice, with_f32, written_vec};
use super::sgemm::{gemm_nn, gemm_rows};
use crate::profile::{timer, Section};
use candle_core::{CpuStorage, CustomOp2, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use std::cell::RefCell;

/// Geometry of one convolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    /// Channel groups (ResNeXt): input and output channels split into `groups` equal parts,
    /// output part g seeing only input part g; 1 for an ordinary convolution.
    groups: usize,
}

impl Geometry {
    /// The same convolution as the cuDNN path keys its plans, for activations of `dtype`.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self, dtype: candle_core::DType) -> crate::gpu::conv::Geometry {
        crate::gpu::conv::geometry(
            &[self.n, self.c, self.h, self.w],
            &[self.cout, self.c / self.groups, self.kh, self.kw],
            self.stride,
            self.pad,
            self.groups,
            dtype,
        )
    }

    pub(crate) fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.kh) / self.stride + 1,
            (self.w + 2 * self.pad - self.kw) / self.stride + 1,
        )
    }
    /// Rows of the unfolded matrix.
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    /// Rows of the unfolded matrix that one group's output channels see (and the weight's
    /// row length): the unfolding is ordered by channel, so group g's rows are the g-th block.
    fn k_group(&self) -> usize {
        self.k() / self.groups
    }
    fn cout_group(&self) -> usize {
        self.cout / self.groups
    }
    /// Output pixels per image (columns of the unfolded matrix).
    fn l(&self) -> usize {
        let (ho, wo) = self.out_hw();
        ho * wo
    }
    pub(crate) fn image_len(&self) -> usize {
        self.c * self.h * self.w
    }
    /// The unfolding is the identity: the image itself is the `C × (H·W)` matrix.
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// For kernel column `kj`: the output columns `ox0..ox1` whose input column
    /// `ox·stride + kj − pad` lies inside the image (the rest read the zero padding).
    #[inline]
    fn valid_cols(&self, kj: usize) -> (usize, usize) {
        let (_, wo) = self.out_hw();
        let (s, p) = (self.stride, self.pad);
        let ox0 = if p > kj { (p - kj).div_ceil(s) } else { 0 };
        let ox1 = if self.w + p > kj {
            ((self.w - 1 + p - kj) / s + 1).min(wo)
        } else {
            0
        };
        (ox0.min(ox1), ox1)
    }

    /// The input row of output row `oy` under kernel row `ki`, if inside the image.
    #[inline]
    fn input_row(&self, oy: usize, ki: usize) -> Option<usize> {
        let iy = oy * self.stride + ki;
        (iy >= self.pad && iy - self.pad < self.h).then(|| iy - self.pad)
    }

    /// Stride 1 with "same" padding (the output as large as the input): each row of the
    /// unfolded matrix is the image plane shifted by a fixed offset, so the unfolding is one
    /// contiguous copy per row plus zeroing of the border, and the fold one contiguous sum.
    fn same_stride1(&self) -> bool {
        let (ho, wo) = self.out_hw();
        self.stride == 1 && ho == self.h && wo == self.w
    }

    /// For row (ki, kj) under [`Geometry::same_stride1`]: the range of output pixels whose
    /// source lies inside the plane (borders excluded by row only) and the offset from an
    /// output pixel to its source pixel.
    #[inline]
    fn shifted(&self, ki: usize, kj: usize) -> (std::ops::Range<usize>, isize) {
        let (h, w) = (self.h as isize, self.w as isize);
        let (dy, dx) = (
            ki as isize - self.pad as isize,
            kj as isize - self.pad as isize,
        );
        let off = dy * w + dx;
        let (oy0, oy1) = ((-dy).max(0), (h - dy).min(h));
        let lo = (oy0 * w).max(-off).clamp(0, h * w);
        let hi = (oy1 * w).min(h * w - off).clamp(lo, h * w);
        (lo as usize..hi as usize, off)
    }

    /// Zeroes, in one row of the unfolded matrix, the columns whose source wrapped around a
    /// plane edge under a shift of `kj − pad` columns.
    #[inline]
    fn zero_wrapped(&self, kj: usize, row: &mut [f32]) {
        let cols = self.wrapped_outputs(kj);
        if cols.is_empty() {
            return;
        }
        for line in row.chunks_exact_mut(self.w) {
            line[cols.clone()].fill(0.0);
        }
    }

    /// Writes the unfolding (`K × L`) of one image `x` (`C × H × W`) into `cols`, row r at
    /// `cols[r·ld..][..L]`: `ld = L` for one image's matrix, `n·L` for image j of n side by
    /// side (`cols` then starting at column j·L).
    fn im2col(&self, x: &[f32], cols: &mut [f32], ld: usize) {
        self.im2col_channels(x, 0..self.c, cols, ld);
    }

    /// [`Geometry::im2col`] of the rows of input channels `channels` only (row r of `cols`
    /// is row `channels.start·kh·kw + r` of the unfolding).
    fn im2col_channels(
        &self,
        x: &[f32],
        channels: std::ops::Range<usize>,
        cols: &mut [f32],
        ld: usize,
    ) {
        let l = self.l();
        let mut rows = cols.chunks_mut(ld).map(|r| &mut r[..l]);
        if self.same_stride1() {
            let hw = self.h * self.w;
            for c in channels {
                let plane = &x[c * hw..(c + 1) * hw];
                for ki in 0..self.kh {
                    for kj in 0..self.kw {
                        let dst = rows.next().expect("K rows");
                        let (r, off) = self.shifted(ki, kj);
                        dst[..r.start].fill(0.0);
                        dst[r.end..].fill(0.0);
                        if !r.is_empty() {
                            let src = (r.start as isize + off) as usize;
                            dst[r.clone()].copy_from_slice(&plane[src..src + r.len()]);
                            self.zero_wrapped(kj, dst);
                        }
                    }
                }
            }
            return;
        }
        let (ho, wo) = self.out_hw();
        let s = self.stride;
        for c in channels {
            let plane = &x[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let dst = rows.next().expect("K rows");
                    let (ox0, ox1) = self.valid_cols(kj);
                    for oy in 0..ho {
                        let d = &mut dst[oy * wo..(oy + 1) * wo];
                        let Some(iy) = self.input_row(oy, ki) else {
                            d.fill(0.0);
                            continue;
                        };
                        d[..ox0].fill(0.0);
                        d[ox1..].fill(0.0);
                        if ox0 == ox1 {
                            continue;
                        }
                        let start = ox0 * s + kj - self.pad;
                        let src = &plane[iy * self.w..(iy + 1) * self.w];
                        if s == 1 {
                            d[ox0..ox1].copy_from_slice(&src[start..start + ox1 - ox0]);
                        } else {
                            for (o, v) in d[ox0..ox1].iter_mut().zip(src[start..].iter().step_by(s))
                            {
                                *o = *v;
                            }
                        }
                    }
                }
            }
        }
    }

    /// The adjoint of [`Geometry::im2col`]: writes one image's gradient `dx` (`C × H × W`)
    /// from `cols` (`K × L`, row r at `cols[r·ld..]`), summing overlaps. `cols` is scratch:
    /// entries that correspond to the zero padding may be overwritten with 0.
    fn col2im(&self, cols: &mut [f32], ld: usize, dx: &mut [f32]) {
        let l = self.l();
        if self.same_stride1() {
            let hw = self.h * self.w;
            let taps = self.kh * self.kw;
            // Same padding at stride 1 means an odd kernel with pad = k/2, so the centre tap
            // is the identity shift: it initialises the plane, and the other taps add to it.
            let centre = (self.kh / 2) * self.kw + self.kw / 2;
            for (c, plane) in dx.chunks_exact_mut(hw).enumerate() {
                plane.copy_from_slice(&cols[(c * taps + centre) * ld..][..hw]);
                for t in 0..taps {
                    let (ki, kj) = (t / self.kw, t % self.kw);
                    let (r, off) = self.shifted(ki, kj);
                    if t == centre || r.is_empty() {
                        continue;
                    }
                    let src = &mut cols[(c * taps + t) * ld..][..hw];
                    // Padding entries would land on wrapped-around pixels: drop them.
                    self.zero_wrapped(kj, src);
                    let at = (r.start as isize + off) as usize;
                    for (o, g) in plane[at..at + r.len()].iter_mut().zip(&src[r]) {
                        *o += *g;
                    }
                }
            }
            return;
        }
        dx.fill(0.0);
        let (ho, wo) = self.out_hw();
        let s = self.stride;
        let mut rows = cols.chunks(ld).map(|r| &r[..l]);
        for c in 0..self.c {
            let plane = &mut dx[c * self.h * self.w..(c + 1) * self.h * self.w];
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    let src = rows.next().expect("K rows");
                    let (ox0, ox1) = self.valid_cols(kj);
                    if ox0 == ox1 {
                        continue;
                    }
                    for oy in 0..ho {
                        let Some(iy) = self.input_row(oy, ki) else {
                            continue;
                        };
                        let start = ox0 * s + kj - self.pad;
                        let d = &mut plane[iy * self.w..(iy + 1) * self.w];
                        let v = &src[oy * wo + ox0..oy * wo + ox1];
                        if s == 1 {
                            for (o, g) in d[start..start + ox1 - ox0].iter_mut().zip(v) {
                                *o += *g;
                            }
                        } else {
                            for (o, g) in d[start..].iter_mut().step_by(s).zip(v) {
                                *o += *g;
                            }
                        }
                    }
                }
            }
        }
    }
}

impl Geometry {
    /// `y (Cout×n) = W (Cout×Kg) · cols (K×n)`, one product per group: group g's output rows
    /// g·Cout/G.. from its weight rows and its block of Kg unfolded rows. `n` is L for one
    /// image, a multiple of L for images side by side.
    fn forward_gemms(&self, w: &[f32], cols: &[f32], l: usize, y: &mut [f32]) {
        let (kg, cg) = (self.k_group(), self.cout_group());
        for gi in 0..self.groups {
            gemm_nn(
                (cg, l, kg),
                &w[gi * cg * kg..],
                (kg, 1),
                &cols[gi * kg * l..],
                l,
                &mut y[gi * cg * l..],
                l,
                false,
            );
        }
    }

    /// `dWᵀ (Kg×Cout) += cols (K×n) · dYᵀ (n×Cout)` per group: group g's block of unfolded
    /// rows against its columns g·Cout/G.. of `dyt`, into the same columns of `dwt`. `n` as
    /// in [`Geometry::forward_gemms`]; the sum runs over the n columns in order.
    fn weight_grad_gemms(&self, cols: &[f32], l: usize, dyt: &[f32], dwt: &mut [f32]) {
        let (kg, cg) = (self.k_group(), self.cout_group());
        for gi in 0..self.groups {
            gemm_nn(
                (kg, cg, l),
                &cols[gi * kg * l..],
                (l, 1),
                &dyt[gi * cg..],
                self.cout,
                &mut dwt[gi * cg..],
                self.cout,
                true,
            );
        }
    }

    /// The output columns (within a row) whose source column, shifted by `kj − pad`, wraps
    /// around a plane edge; equivalently the source columns that only such outputs read.
    fn wrapped_outputs(&self, kj: usize) -> std::ops::Range<usize> {
        let shift = kj as isize - self.pad as isize;
        if shift < 0 {
            0..(-shift as usize).min(self.w)
        } else {
            self.w - (shift as usize).min(self.w)..self.w
        }
    }

    /// Values of [`Geometry::pad_variants`] for `channels` planes.
    fn padded_len(&self, channels: usize) -> usize {
        let plane = (self.h + 2 * self.pad) * self.w;
        2 * self.pad + self.kw * channels * plane
    }

    /// Writes into `out` one copy of `src` (`channels` planes of H×W) per kernel column kj,
    /// each plane with `pad` zero rows above and below, the columns `masked(kj)` of every row
    /// zeroed, and `pad` zeros before the first copy and after the last: an implicit GEMM's B
    /// rows ([`Geometry::forward_rows`], [`Geometry::input_grad_rows`]) are then plain
    /// stretches of it, reading zeros wherever the unfolding has them.
    fn pad_variants(
        &self,
        src: &[f32],
        channels: usize,
        masked: impl Fn(usize) -> std::ops::Range<usize>,
        out: &mut [f32],
    ) {
        let (w, hw, pad) = (self.w, self.h * self.w, self.pad);
        let plane = (self.h + 2 * pad) * w;
        let out = &mut out[..self.padded_len(channels)];
        out[..pad].fill(0.0);
        let end = out.len();
        out[end - pad..].fill(0.0);
        for kj in 0..self.kw {
            let cols = masked(kj);
            let base = pad + kj * channels * plane;
            for c in 0..channels {
                let dst = &mut out[base + c * plane..base + (c + 1) * plane];
                dst[..pad * w].fill(0.0);
                dst[pad * w + hw..].fill(0.0);
                let body = &mut dst[pad * w..pad * w + hw];
                body.copy_from_slice(&src[c * hw..(c + 1) * hw]);
                if !cols.is_empty() {
                    for row in body.chunks_exact_mut(w) {
                        row[cols.clone()].fill(0.0);
                    }
                }
            }
        }
    }

    /// Where unfolded row (c, ki, kj) of a stride-1 "same" convolution starts in the image's
    /// [`Geometry::pad_variants`] (masked by the source columns only wrapped outputs read).
    fn forward_rows(&self) -> Vec<usize> {
        let plane = (self.h + 2 * self.pad) * self.w;
        let mut rows = Vec::with_capacity(self.k());
        for c in 0..self.c {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    rows.push(
                        self.pad + kj * self.c * plane + c * plane + ki * self.w + kj - self.pad,
                    );
                }
            }
        }
        rows
    }

    /// Where row (co, ki, kj) of the input gradient's implicit product starts in dY's
    /// [`Geometry::pad_variants`] (masked by the wrapped outputs): input pixel q receives
    /// dY at q − shift(ki, kj).
    fn input_grad_rows(&self) -> Vec<usize> {
        let plane = (self.h + 2 * self.pad) * self.w;
        let mut rows = Vec::with_capacity(self.cout * self.kh * self.kw);
        for co in 0..self.cout {
            for ki in 0..self.kh {
                for kj in 0..self.kw {
                    rows.push(
                        self.pad
                            + kj * self.cout * plane
                            + co * plane
                            + (2 * self.pad - ki) * self.w
                            + self.pad
                            - kj,
                    );
                }
            }
        }
        rows
    }

    /// The forward of a stride-1 "same" convolution as one implicit GEMM: `Y = W · cols`
    /// with the rows of cols read from zero-padded, masked copies of the image (`padded`, at
    /// least [`Geometry::padded_len`] of C) through `rows` ([`Geometry::forward_rows`]).
    fn forward_implicit(
        &self,
        x: &[f32],
        w: &[f32],
        rows: &[usize],
        padded: &mut [f32],
        y: &mut [f32],
    ) {
        let k = self.k();
        self.pad_variants(
            x,
            self.c,
            |kj| self.wrapped_outputs(2 * self.pad - kj),
            padded,
        );
        gemm_rows(
            (self.cout, self.l(), k),
            w,
            (k, 1),
            padded,
            rows,
            y,
            self.l(),
            false,
        );
    }

    /// The input gradient of a stride-1 "same" convolution as one implicit GEMM:
    /// `dX = Wt · dY shifted`, `wt` the weight as `C × (Cout·kh·kw)` ([`Geometry::weight_t`]),
    /// dY's rows read from its zero-padded, masked copies (`padded`, at least
    /// [`Geometry::padded_len`] of Cout) through `rows` ([`Geometry::input_grad_rows`]).
    fn input_grad_implicit(
        &self,
        wt: &[f32],
        dy: &[f32],
        rows: &[usize],
        padded: &mut [f32],
        dx: &mut [f32],
    ) {
        let k = self.cout * self.kh * self.kw;
        self.pad_variants(dy, self.cout, |kj| self.wrapped_outputs(kj), padded);
        gemm_rows(
            (self.c, self.h * self.w, k),
            wt,
            (k, 1),
            padded,
            rows,
            dx,
            self.h * self.w,
            false,
        );
    }

    /// The weight `Cout × C × kh × kw` rearranged as `C × (Cout·kh·kw)`.
    fn weight_t(&self, w: &[f32]) -> Vec<f32> {
        let taps = self.kh * self.kw;
        let mut wt = vec![0f32; w.len()];
        for co in 0..self.cout {
            for c in 0..self.c {
                let src = &w[(co * self.c + c) * taps..(co * self.c + c + 1) * taps];
                wt[c * self.cout * taps + co * taps..][..taps].copy_from_slice(src);
            }
        }
        wt
    }

    /// [`Geometry::weight_grad_gemms`] of a stride-1 "same" convolution without the
    /// unfolding: row (c, ki, kj) of the unfolded image is plane c shifted by the tap's offset,
    /// which is a contiguous stretch of the image itself over the output pixels whose source
    /// row lies inside the plane ([`Geometry::shifted`]). So each tap is one product over all
    /// channels, reading the image where it lies; the pixels whose source column wrapped
    /// around a plane edge (the unfolding's zeros) are zeroed in a copy of `dyt` instead
    /// (`masked`, at least L×Cout). The sums are the unfolded product's, less its terms that
    /// are exactly zero.
    fn weight_grad_taps(&self, x: &[f32], dyt: &[f32], masked: &mut [f32], dwt: &mut [f32]) {
        let (hw, cout, taps) = (self.h * self.w, self.cout, self.kh * self.kw);
        for kj in 0..self.kw {
            let wrapped = self.wrapped_outputs(kj);
            let b: &[f32] = if wrapped.is_empty() {
                dyt
            } else {
                let m = &mut masked[..hw * cout];
                m.copy_from_slice(dyt);
                for row in m.chunks_exact_mut(self.w * cout) {
                    row[wrapped.start * cout..wrapped.end * cout].fill(0.0);
                }
                m
            };
            for ki in 0..self.kh {
                let (r, off) = self.shifted(ki, kj);
                if r.is_empty() {
                    continue;
                }
                let src = (r.start as isize + off) as usize;
                gemm_nn(
                    (self.c, cout, r.len()),
                    &x[src..],
                    (hw, 1),
                    &b[r.start * cout..],
                    cout,
                    &mut dwt[(ki * self.kw + kj) * cout..],
                    taps * cout,
                    true,
                );
            }
        }
    }

    /// `dcols (K×n) = Wᵀ · dY (Cout×n)` per group: group g's Kg rows from its weight block
    /// (transposed through the strides) and its output rows; `n` as in
    /// [`Geometry::forward_gemms`].
    fn input_grad_gemms(&self, w: &[f32], dy: &[f32], l: usize, dcols: &mut [f32]) {
        let (kg, cg) = (self.k_group(), self.cout_group());
        for gi in 0..self.groups {
            gemm_nn(
                (kg, l, cg),
                &w[gi * cg * kg..],
                (1, kg),
                &dy[gi * cg * l..],
                l,
                &mut dcols[gi * kg * l..],
                l,
                false,
            );
        }
    }
}

impl Geometry {
    /// The geometry of input `x` (`N×C×H×W`) under weight `w` (`Cout×C/groups×kh×kw`).
    pub(crate) fn new(
        x: [usize; 4],
        w: [usize; 4],
        stride: usize,
        pad: usize,
        groups: usize,
    ) -> Self {
        let [n, c, h, wd] = x;
        Geometry {
            n,
            c,
            h,
            w: wd,
            cout: w[0],
            kh: w[2],
            kw: w[3],
            stride,
            pad,
            groups,
        }
    }

    /// Output values of the whole batch (`N × Cout × H' × W'`).
    pub(crate) fn output_len(&self) -> usize {
        self.n * self.cout * self.l()
    }

    /// Writes the convolution of `x` with `w` into `y` (every element).
    pub(crate) fn forward_into(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        let _t = timer(Section::ConvForward);
        let g = *self;
        let (k, l, img) = (g.k(), g.l(), g.image_len());
        if g.images_per_product() > 1 {
            return g.forward_side_by_side(x, w, y);
        }
        let implicit = g.same_stride1() && g.groups == 1 && !g.pointwise();
        let rows = if implicit {
            g.forward_rows()
        } else {
            Vec::new()
        };
        let scratch = if implicit {
            (k * l).max(g.padded_len(g.c))
        } else {
            k * l
        };
        y.par_chunks_mut(g.cout * l)
            .enumerate()
            .for_each(|(i, y_i)| {
                let x_i = &x[i * img..(i + 1) * img];
                // Y_i (Cout×L) = W (Cout×K) · cols_i (K×L), one product per group; a
                // pointwise x_i is its own cols.
                if g.pointwise() {
                    g.forward_gemms(w, x_i, l, y_i);
                    return;
                }
                with_scratch(scratch, |cols, _| {
                    if implicit {
                        g.forward_implicit(x_i, w, &rows, cols, y_i);
                    } else {
                        g.im2col(x_i, cols, l);
                        g.forward_gemms(w, cols, l, y_i);
                    }
                });
            });
    }

    /// How many images one product takes side by side: 1, or, for a large weight over small
    /// planes, enough for about [`PRODUCT_COLUMNS`] columns. One image of a 4×4 plane gives a
    /// product only L = 16 columns wide, which streams the whole weight (9.4 MB for a
    /// 512-channel 3×3 layer, beyond a core's L2 cache) from memory per image for 32 FLOPs per
    /// value read, and, in the weight gradient, loads and stores all of dWᵀ after every 16
    /// terms and adds the partial sums of the batch's runs in a tree; side by side the weight
    /// is read once per several images ([`Geometry::backward_small`] for the gradients). A
    /// weight that fits in L2, or planes of 8×8 and more, run faster one image at a time (on
    /// the 2-core development machine: ResNet-20's 8×8 layers 30% slower side by side,
    /// ResNet-18's 4×4 layers twice as fast).
    fn images_per_product(&self) -> usize {
        if self.cout * self.k_group() < SIDE_BY_SIDE_WEIGHT {
            return 1;
        }
        PRODUCT_COLUMNS.div_ceil(self.l().max(1)).min(self.n.max(1))
    }

    /// [`Geometry::forward_into`] for small planes: each task unfolds a run of images side by
    /// side (`K × n·L`), runs one product per channel group into scratch, and scatters its
    /// columns to the images' outputs. Each output value is the same sum, in the same order,
    /// as one image's product gives.
    fn forward_side_by_side(&self, x: &[f32], w: &[f32], y: &mut [f32]) {
        let g = *self;
        let (k, l, img, per) = (g.k(), g.l(), g.image_len(), g.images_per_product());
        y.par_chunks_mut(per * g.cout * l)
            .enumerate()
            .for_each(|(t, y_t)| {
                let n = y_t.len() / (g.cout * l);
                with_scratch(k.max(g.cout) * n * l, |cols, out| {
                    for j in 0..n {
                        let i = t * per + j;
                        g.im2col(&x[i * img..(i + 1) * img], &mut cols[j * l..], n * l);
                    }
                    g.forward_gemms(w, cols, n * l, out);
                    for (j, y_i) in y_t.chunks_exact_mut(g.cout * l).enumerate() {
                        for (co, row) in y_i.chunks_exact_mut(l).enumerate() {
                            row.copy_from_slice(&out[co * n * l + j * l..][..l]);
                        }
                    }
                });
            });
    }

    /// The weight gradient (`Cout × C/groups × kh × kw`) from the output gradient `dy`, and
    /// the input gradient written into `dx` (every element) when given.
    pub(crate) fn backward_into(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        dx: Option<&mut [f32]>,
    ) -> Vec<f32> {
        let _t = timer(Section::ConvBackward);
        let g = *self;
        if g.images_per_product() > 1 {
            return g.backward_small(x, w, dy, dx);
        }
        let (k, kg, l, img) = (g.k(), g.k_group(), g.l(), g.image_len());
        // The batch is cut into at most GRAD_LEAVES runs of images by its size alone; each run
        // accumulates its own dW and the runs' sums are added in a fixed tree
        // (`weight_grad_tree`), so the result is the same on any number of threads.
        let per = g.n.div_ceil(GRAD_LEAVES).max(1);
        let images = |t: usize| t * per..((t + 1) * per).min(g.n);
        // Each run accumulates dWᵀ (K×Cout): as `cols_i · dY_iᵀ` the product has the
        // unfolded image as its broadcast side and the (transposed, small) output gradient as
        // its contiguous rows, which the fast kernel wants; `dY_i · cols_iᵀ` would need dot
        // products reduced across lanes, slow for the short rows of the deeper layers.
        let implicit = g.same_stride1() && g.groups == 1 && !g.pointwise() && dx.is_some();
        let (rows, wt) = if implicit {
            (g.input_grad_rows(), g.weight_t(w))
        } else {
            (Vec::new(), Vec::new())
        };
        let scratch = (k * l)
            .max(g.cout * l)
            .max(if implicit { g.padded_len(g.cout) } else { 0 });
        let task = |t: usize, mut dx: Option<&mut [f32]>| -> Vec<f32> {
            let mut dwt = vec![0f32; kg * g.cout];
            for (j, i) in images(t).enumerate() {
                let x_i = &x[i * img..(i + 1) * img];
                let dy_i = &dy[i * g.cout * l..(i + 1) * g.cout * l];
                let dx_i = dx.as_deref_mut().map(|d| &mut d[j * img..(j + 1) * img]);
                with_scratch(scratch, |cols, dcols| {
                    // dWᵀ (K×Cout) += cols_i (K×L) · dY_iᵀ (L×Cout); dcols holds dY_iᵀ until
                    // it is needed for the input gradient.
                    let dyt = &mut dcols[..l * g.cout];
                    transpose(dy_i, g.cout, l, dyt);
                    if g.pointwise() {
                        g.weight_grad_gemms(x_i, l, dyt, &mut dwt);
                    } else if g.same_stride1() && g.groups == 1 {
                        g.weight_grad_taps(x_i, dyt, cols, &mut dwt);
                    } else {
                        g.im2col(x_i, cols, l);
                        g.weight_grad_gemms(cols, l, dyt, &mut dwt);
                    }
                    let Some(dx_i) = dx_i else { return };
                    // dcols = Wᵀ (K×Cout) · dY_i (Cout×L), then folded back onto the image
                    // (the fold is the identity for a pointwise convolution).
                    if g.pointwise() {
                        g.input_grad_gemms(w, dy_i, l, dx_i);
                    } else if implicit {
                        g.input_grad_implicit(&wt, dy_i, &rows, cols, dx_i);
                    } else {
                        g.input_grad_gemms(w, dy_i, l, dcols);
                        g.col2im(dcols, l, dx_i);
                    }
                });
            }
            dwt
        };
        let leaves = g.n.div_ceil(per);
        let dwt = if leaves == 0 {
            vec![0f32; g.cout * kg]
        } else {
            weight_grad_tree(0..leaves, dx, per * img, &task)
        };
        // dWᵀ is Kg×Cout (group g in columns g·Cout/G..), so its transpose is the weight's
        // Cout × (C/G·kh·kw) layout.
        let mut dw = vec![0f32; g.cout * kg];
        transpose(&dwt, kg, g.cout, &mut dw);
        dw
    }

    /// [`Geometry::backward_into`] for small planes ([`Geometry::images_per_product`] > 1),
    /// returning dW. Splitting the batch, as the per-image path does, would give
    /// each run a partial dWᵀ of a few images (the whole 9.4 MB of a 512-channel 3×3 layer
    /// loaded and stored per 64 terms, then summed in a tree): here the weight gradient is
    /// split by input channels instead. Each task unfolds its channels' rows for the whole
    /// batch side by side and multiplies them by the batch's stacked transposed output
    /// gradients (N·L × Cout), so every value of dWᵀ is one sum over the batch, image by image
    /// and pixel by pixel, whatever the number of threads. The input gradient goes by runs of
    /// images: `dcols = Wᵀ · [dY_1 … dY_n]`, folded back onto each image.
    fn backward_small(&self, x: &[f32], w: &[f32], dy: &[f32], dx: Option<&mut [f32]>) -> Vec<f32> {
        let g = *self;
        let (l, out, cols_n) = (g.l(), g.cout * g.l(), g.n * g.l());
        let dyt = written_vec(cols_n * g.cout, |dyt| {
            dyt.par_chunks_mut(out)
                .zip(dy.par_chunks(out))
                .for_each(|(t, d)| transpose(d, g.cout, l, t));
        });
        let dw = g.weight_grad_by_channels(x, &dyt);
        if let Some(dx) = dx {
            g.input_grad_side_by_side(w, dy, dx);
        }
        dw
    }

    /// dW (Cout × Kg) from the batch's stacked `dyt` (N·L × Cout), in parallel over blocks of
    /// input channels within each channel group (see [`Geometry::backward_small`]): each
    /// block's part of dWᵀ, then all of them transposed into place, in parallel over rows.
    fn weight_grad_by_channels(&self, x: &[f32], dyt: &[f32]) -> Vec<f32> {
        let g = *self;
        let (taps, cols_n, img) = (g.kh * g.kw, g.n * g.l(), g.image_len());
        let (cpg, cg) = (g.c / g.groups, g.cout_group());
        // About a megabyte of unfolded rows per block (one channel at least), and at least 16
        // blocks per group for the threads to share. The blocks depend on the shape alone: the
        // `gemm` crate, which runs where AVX-512 is missing, sums in blocks of k it picks by the
        // product's shape, so blocks by thread count would make the bits depend on it.
        let per = (BLOCK_VALUES / (taps * cols_n))
            .min(cpg.div_ceil(GRAD_LEAVES))
            .clamp(1, cpg);
        let blocks: Vec<(usize, std::ops::Range<usize>)> = (0..g.groups)
            .flat_map(|gi| {
                (gi * cpg..(gi + 1) * cpg)
                    .step_by(per)
                    .map(move |c0| (gi, c0..(c0 + per).min((gi + 1) * cpg)))
            })
            .collect();
        let ld = unaliased(cols_n);
        let parts: Vec<Vec<f32>> = blocks
            .par_iter()
            .map(|(gi, chans)| {
                let rows = chans.len() * taps;
                // Every value written: the product does not accumulate.
                written_vec(rows * cg, |part| {
                    with_scratch(rows * ld, |cols, _| {
                        for i in 0..g.n {
                            let x_i = &x[i * img..(i + 1) * img];
                            g.im2col_channels(x_i, chans.clone(), &mut cols[i * g.l()..], ld);
                        }
                        let b = &dyt[gi * cg..];
                        let shape = (rows, cg, cols_n);
                        gemm_nn(shape, cols, (ld, 1), b, g.cout, part, cg, false);
                    })
                })
            })
            .collect();
        let kg = g.k_group();
        written_vec(g.cout * kg, |dw| {
            // Row co of dW is column co − gi·Cout/G of its group's parts, which cover 0..Kg.
            dw.par_chunks_mut(kg).enumerate().for_each(|(co, row)| {
                let gi = co / cg;
                for ((_, chans), part) in blocks.iter().zip(&parts).filter(|((b, _), _)| *b == gi) {
                    let row0 = (chans.start - gi * cpg) * taps;
                    let column = part.iter().skip(co - gi * cg).step_by(cg);
                    for (d, v) in row[row0..row0 + chans.len() * taps].iter_mut().zip(column) {
                        *d = *v;
                    }
                }
            });
        })
    }

    /// The input gradient of [`Geometry::backward_small`], by runs of
    /// [`Geometry::images_per_product`] images in parallel.
    fn input_grad_side_by_side(&self, w: &[f32], dy: &[f32], dx: &mut [f32]) {
        let g = *self;
        let (k, l, img, out) = (g.k(), g.l(), g.image_len(), g.cout * g.l());
        let per = g.images_per_product();
        dx.par_chunks_mut(per * img)
            .enumerate()
            .for_each(|(t, dx_t)| {
                let n = dx_t.len() / img;
                let cols_n = n * l;
                with_scratch(k.max(g.cout) * cols_n, |dcols, dys| {
                    for j in 0..n {
                        let dy_i = &dy[(t * per + j) * out..][..out];
                        for (co, row) in dy_i.chunks_exact(l).enumerate() {
                            dys[co * cols_n + j * l..][..l].copy_from_slice(row);
                        }
                    }
                    g.input_grad_gemms(w, dys, cols_n, dcols);
                    for (j, dx_i) in dx_t.chunks_exact_mut(img).enumerate() {
                        g.col2im(&mut dcols[j * l..], cols_n, dx_i);
                    }
                });
            });
    }
}

/// A row length for a matrix of `n`-value rows that the matrix kernels read down its columns
/// (12 rows at a time): rows a multiple of 2 KB apart fall into one or two sets of an L1 cache
/// of 64 sets of 64 bytes, 12 lines into at most 16 ways with the other operands' lines
/// competing, so they get one line more (measured: the 4×4 layers' weight gradient at batch
/// 64, 1,024-value rows, 32 → 28 ms).
fn unaliased(n: usize) -> usize {
    if n.is_multiple_of(512) {
        n + 16
    } else {
        n
    }
}

/// Unfolded values per block of [`Geometry::weight_grad_by_channels`]: 1 MB, half a core's L2.
const BLOCK_VALUES: usize = 1 << 18;

/// About how many columns a product of [`Geometry::images_per_product`] has, and the widest
/// L that still runs side by side: 64 (four 4×4 planes) measured faster than 128 or 256.
const PRODUCT_COLUMNS: usize = 64;

/// The smallest weight (values: Cout × C/groups × kh × kw) run side by side: 2 MB, a core's L2
/// cache on the development machine.
const SIDE_BY_SIDE_WEIGHT: usize = 1 << 19;

/// Most runs of images a convolution's weight gradient is split into (fewer when the batch is
/// smaller): enough to keep 16 threads busy, few enough that the partial sums (one `Cout × K`
/// matrix each, at most about one per thread and tree level alive at once) stay small.
const GRAD_LEAVES: usize = 16;

/// The sum of `leaf(t, dx_t)` over the runs `t` in `leaves`, added pairwise in a binary tree
/// whose shape depends only on the number of runs: the two halves run as a `rayon::join`, so
/// the threads share the work while every addition happens in the same order whatever their
/// number. `dx`, when given, is the input gradient of the runs, `stride` values per run (the
/// last run may be shorter), and each leaf gets its own run's part.
fn weight_grad_tree<F>(
    leaves: std::ops::Range<usize>,
    dx: Option<&mut [f32]>,
    stride: usize,
    leaf: &F,
) -> Vec<f32>
where
    F: Fn(usize, Option<&mut [f32]>) -> Vec<f32> + Sync,
{
    if leaves.len() == 1 {
        return leaf(leaves.start, dx);
    }
    let mid = leaves.start + leaves.len() / 2;
    let (left, right) = match dx {
        Some(d) => {
            let (a, b) = d.split_at_mut((mid - leaves.start) * stride);
            (Some(a), Some(b))
        }
        None => (None, None),
    };
    let (mut sum, other) = rayon::join(
        || weight_grad_tree(leaves.start..mid, left, stride, leaf),
        || weight_grad_tree(mid..leaves.end, right, stride, leaf),
    );
    for (a, b) in sum.iter_mut().zip(&other) {
        *a += *b;
    }
    sum
}

thread_local! {
    /// Per-thread scratch (unfolded image, unfolded gradient), grown on demand and kept, so a
    /// training step allocates no unfolding buffers after the first.
    static SCRATCH: RefCell<(Vec<f32>, Vec<f32>)> = const { RefCell::new((Vec::new(), Vec::new())) };
}

/// Runs `f` with this thread's two scratch buffers, each at least `len` long.
fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32], &mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let (a, b) = &mut *s.borrow_mut();
        for v in [&mut *a, &mut *b] {
            if v.len() < len {
                v.resize(len, 0.0);
            }
        }
        f(&mut a[..len], &mut b[..len])
    })
}

/// `dst (cols × rows) = srcᵀ` for a row-major `src (rows × cols)`, in cache-sized blocks.
fn transpose(src: &[f32], rows: usize, cols: usize, dst: &mut [f32]) {
    const B: usize = 16;
    for r0 in (0..rows).step_by(B) {
        for c0 in (0..cols).step_by(B) {
            let (r1, c1) = ((r0 + B).min(rows), (c0 + B).min(cols));
            for c in c0..c1 {
                for (d, r) in dst[c * rows + r0..c * rows + r1].iter_mut().zip(r0..r1) {
                    *d = src[r * cols + c];
                }
            }
        }
    }
}

/// The convolution `x (N×C×H×W), w (Cout×C×kh×kw) → y (N×Cout×H'×W')`.
struct ConvOp(Geometry);

impl ConvOp {
    /// The geometry as the cuDNN path keys its plans.
    #[cfg(feature = "cuda")]
    fn gpu(&self, dtype: candle_core::DType) -> crate::gpu::conv::Geometry {
        self.0.cuda(dtype)
    }

    fn forward(&self, x: &[f32], w: &[f32]) -> Vec<f32> {
        let g = self.0;
        written_vec(g.n * g.cout * g.l(), |y| g.forward_into(x, w, y))
    }

    /// `(dx, dw)` from the output gradient `dy`; `dx` only when `want_dx`.
    fn backward(
        &self,
        x: &[f32],
        w: &[f32],
        dy: &[f32],
        want_dx: bool,
    ) -> (Option<Vec<f32>>, Vec<f32>) {
        let g = self.0;
        if !want_dx {
            return (None, g.backward_into(x, w, dy, None));
        }
        let mut dw = Vec::new();
        let dx = written_vec(g.n * g.image_len(), |dx| {
            dw = g.backward_into(x, w, dy, Some(dx));
        });
        (Some(dx), dw)
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (x, w) = (
            f32_slice(s1, l1, "conv2d input")?,
            f32_slice(s2, l2, "conv2d weight")?,
        );
        let (ho, wo) = g.out_hw();
        Ok((
            CpuStorage::F32(self.forward(x, w)),
            Shape::from((g.n, g.cout, ho, wo)),
        ))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let g = self.gpu(s1.dtype());
        let (ho, wo) = g.out_hw();
        Ok((
            crate::gpu::conv::forward(&g, s1, l1, s2, l2)?,
            Shape::from((g.n, g.cout, ho, wo)),
        ))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = self.0;
        // An input that is not itself differentiated (the images) gets no gradient.
        let want_dx = x.track_op();
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            let gg = self.gpu(x.dtype());
            let dx = if want_dx {
                Some(crate::gpu::conv::backward_data(&gg, w, grad)?)
            } else {
                None
            };
            return Ok((dx, Some(crate::gpu::conv::backward_filter(&gg, x, grad)?)));
        }
        let (dx, dw) = with_f32(x, "conv2d input", |xv| {
            with_f32(w, "conv2d weight", |wv| {
                with_f32(grad, "conv2d gradient", |dy| {
                    self.backward(xv, wv, dy, want_dx)
                })
            })
        })???;
        let dev = x.device();
        Ok((
            dx.map(|d| Tensor::from_vec(d, (g.n, g.c, g.h, g.w), dev))
                .transpose()?,
            Some(Tensor::from_vec(
                dw,
                (g.cout, g.c / g.groups, g.kh, g.kw),
                dev,
            )?),
        ))
    }
}

/// A bias-free 2-D convolution with square kernel, stride, zero padding and channel groups.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    pad: usize,
    groups: usize,
}

impl Conv2d {
    /// A convolution whose weight `cout × cin × k × k` is the variable `weight` under `vb`.
    pub fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        Self::grouped(cin, cout, k, stride, pad, 1, vb)
    }

    /// A grouped convolution (PyTorch's `groups`): weight `cout × cin/groups × k × k`; both
    /// channel counts must be multiples of `groups`.
    pub fn grouped(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if groups == 0 || !cin.is_multiple_of(groups) || !cout.is_multiple_of(groups) {
            candle_core::bail!(
                "conv2d: {cin} input and {cout} output channels do not split into {groups} groups"
            )
        }
        let weight = vb.get_with_hints(
            (cout, cin / groups, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        Ok(Conv2d {
            weight,
            stride,
            pad,
            groups,
        })
    }

    /// The weight variable, `cout × cin/groups × k × k`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The geometry of this convolution over an input of shape `x`; fails when it does not fit
    /// the weight.
    pub(crate) fn geometry(&self, x: [usize; 4]) -> Result<Geometry> {
        let [_, c, h, w] = x;
        let (_, cin, kh, kw) = self.weight.dims4()?;
        if cin * self.groups != c || h + 2 * self.pad < kh || w + 2 * self.pad < kw {
            candle_core::bail!(
                "conv2d: input {:?} does not fit weight {:?} (padding {}, {} groups)",
                x,
                self.weight.dims(),
                self.pad,
                self.groups
            )
        }
        Ok(Geometry::new(
            x,
            self.weight.dims4()?.into(),
            self.stride,
            self.pad,
            self.groups,
        ))
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let own_op = !super::cpu::reference_ops()
            && (x.device().is_cpu() || (cfg!(feature = "cuda") && x.device().is_cuda()));
        let weight = super::no_grad::param(&self.weight);
        if !own_op {
            // Devices without a path of ours (Metal, CUDA in a build without it): candle's own.
            let cfg = candle_nn::Conv2dConfig {
                padding: self.pad,
                stride: self.stride,
                groups: self.groups,
                ..Default::default()
            };
            return candle_nn::Conv2d::new(weight, None, cfg).forward(x);
        }
        let g = self.geometry(x.dims4()?.into())?;
        // Master weights stay f32; a bf16 input computes in bf16 (the cast is differentiable, so
        // the weight gradient arrives in f32).
        let w = if weight.dtype() != x.dtype() && x.device().is_cuda() {
            weight.to_dtype(x.dtype())?
        } else {
            weight
        };
        x.contiguous()?.apply_op2(&w.contiguous()?, ConvOp(g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::{max_rel, random};
    use candle_core::Var;

    /// Values uniform in [−1, 1) for a tensor of `dims`, drawn from `seed`, as a flat vector.
    fn vec(dims: &[usize], seed: u64) -> Vec<f32> {
        random(dims, -1.0..1.0, seed)
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// One case against candle's reference convolution: forward and both gradients within
    /// 1e-5 relative, inputs drawn from `seed`, `seed + 100` and `seed + 200`.
    fn assert_matches_reference(
        case: usize,
        (n, c, h, w, cout, k, stride, pad, groups): (
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
            usize,
        ),
        seed: u64,
    ) {
        let x = Var::from_tensor(&random(&[n, c, h, w], -1.0..1.0, seed)).unwrap();
        let wt =
            Var::from_tensor(&random(&[cout, c / groups, k, k], -1.0..1.0, seed + 100)).unwrap();
        let ours = Conv2d {
            weight: wt.as_tensor().clone(),
            stride,
            pad,
            groups,
        };
        let y = ours.forward(x.as_tensor()).unwrap();
        let reference = x
            .as_tensor()
            .conv2d(wt.as_tensor(), pad, stride, 1, groups)
            .unwrap();
        assert_eq!(y.dims(), reference.dims());
        assert!(max_rel(&y, &reference) < 1e-5, "forward case {case}");
        // A loss that weights every output differently.
        let m = random(y.dims(), -1.0..1.0, seed + 200);
        let g1 = (&y * &m).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&reference * &m)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&x, &wt] {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert_eq!(a.dims(), v.dims());
            assert!(
                max_rel(a, b) < 1e-5,
                "gradient case {case}: {}",
                max_rel(a, b)
            );
        }
    }

    /// Forward and both gradients equal candle's reference convolution: strides 1 and 2,
    /// 1×1 and 3×3 kernels, with and without padding, odd and non-square sizes, one image
    /// and several.
    #[test]
    fn matches_candle_reference() {
        for (i, &(n, c, h, w, cout, k, stride, pad)) in [
            (2, 3, 8, 8, 4, 3, 1, 1),
            (3, 4, 9, 7, 5, 3, 2, 1),
            (2, 5, 8, 8, 6, 1, 2, 0),
            (1, 2, 5, 6, 3, 1, 1, 0),
            (2, 3, 7, 7, 2, 3, 1, 0),
            (5, 16, 11, 13, 8, 3, 1, 1),
            (3, 7, 15, 9, 9, 3, 2, 1),
            (4, 6, 7, 7, 5, 1, 1, 1),
            (2, 3, 9, 6, 4, 5, 1, 2),
            (2, 2, 1, 1, 3, 3, 1, 1),
            (2, 2, 2, 5, 3, 3, 1, 1),
            (1, 3, 3, 3, 4, 3, 2, 1),
            (3, 8, 6, 10, 16, 5, 2, 2),
        ]
        .iter()
        .enumerate()
        {
            assert_matches_reference(i, (n, c, h, w, cout, k, stride, pad, 1), i as u64);
        }
    }

    /// An input that is not differentiated gets no gradient, and the weight's is unchanged.
    #[test]
    fn constant_input_gets_no_gradient() {
        let x = random(&[3, 3, 8, 8], -1.0..1.0, 1);
        let wt = Var::from_tensor(&random(&[4, 3, 3, 3], -1.0..1.0, 2)).unwrap();
        let ours = Conv2d {
            weight: wt.as_tensor().clone(),
            stride: 1,
            pad: 1,
            groups: 1,
        };
        let grads = ours
            .forward(&x)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(grads.get(&x).is_none());
        let reference = x
            .conv2d(wt.as_tensor(), 1, 1, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (
            grads.get(wt.as_tensor()).unwrap(),
            reference.get(wt.as_tensor()).unwrap(),
        );
        assert!(max_rel(a, b) < 1e-5);
    }

    /// Both gradients are bitwise the same on 1, 2, 3 and 5 threads, on each path of the
    /// backward (3×3 "same" taps, pointwise, strided im2col, grouped, several images per
    /// product), and the weight
    /// gradient is the same with and without the input gradient. 37 images split into
    /// different runs on each of those thread counts under a per-thread split.
    #[test]
    fn gradients_do_not_depend_on_the_thread_count() {
        for (case, &(c, h, cout, k, stride, pad, groups)) in [
            (4, 6, 8, 3, 1, 1, 1),
            (4, 6, 8, 1, 1, 0, 1),
            (4, 7, 8, 3, 2, 1, 1),
            (8, 6, 8, 3, 1, 1, 4),
            // Several images per product (`backward_small`), grouped too, and with products
            // under 64 × 64 (where the portable path's `gemm` crate picks other k blocks).
            (256, 4, 256, 3, 1, 1, 1),
            (512, 3, 256, 3, 1, 1, 2),
            (1024, 4, 1024, 3, 1, 1, 16),
        ]
        .iter()
        .enumerate()
        {
            let n = 37;
            let g = Geometry::new([n, c, h, h], [cout, c / groups, k, k], stride, pad, groups);
            let x = vec(&[n, c, h, h], 1 + case as u64);
            let w = vec(&[cout, c / groups, k, k], 11 + case as u64);
            let dy = vec(&[n, cout, g.l()], 21 + case as u64);
            // On the AVX-512 kernels where the CPU has them, and on the portable path.
            let run = |threads: usize, portable: bool| {
                rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .start_handler(move |_| {
                        super::super::sgemm::PORTABLE_ONLY.with(|p| p.set(portable))
                    })
                    .build()
                    .unwrap()
                    .install(|| {
                        let mut dx = vec![f32::NAN; n * g.image_len()];
                        let dw = g.backward_into(&x, &w, &dy, Some(&mut dx));
                        (dw, dx, g.backward_into(&x, &w, &dy, None))
                    })
            };
            for portable in [false, true] {
                let one = run(1, portable);
                assert_eq!(one.0, one.2, "case {case}: dW without dx");
                for threads in [2, 3, 5] {
                    assert!(
                        run(threads, portable) == one,
                        "case {case}: {threads} threads, portable {portable}"
                    );
                }
            }
        }
    }

    /// Large weights over small planes, which run several images per product
    /// (`images_per_product`, the gradients by `backward_small`): 3×3 at stride 1 and 2, a
    /// pointwise layer at the size threshold, a grouped one, a non-square plane, with a short
    /// last run of images; each case checked to take that path. Forward and both gradients
    /// equal candle's reference.
    #[test]
    fn large_weights_over_small_planes_match_candle_reference() {
        for (i, &shape) in [
            (6, 256, 4, 4, 256, 3, 1, 1, 1),
            (5, 128, 8, 8, 512, 3, 2, 1, 1),
            (3, 1024, 4, 4, 512, 1, 1, 0, 1),
            (5, 512, 7, 7, 256, 3, 1, 1, 2),
            (4, 256, 5, 3, 512, 3, 1, 1, 1),
        ]
        .iter()
        .enumerate()
        {
            let (n, c, h, w, cout, k, stride, pad, groups) = shape;
            let g = Geometry::new([n, c, h, w], [cout, c / groups, k, k], stride, pad, groups);
            assert!(g.images_per_product() > 1, "case {i} runs image by image");
            assert_matches_reference(i, shape, 50 + i as u64);
        }
        // Just under the weight threshold, or 8×8 planes: one image per product.
        for (x, wd) in [
            ([4, 1023, 4, 4], [512, 1023, 1, 1]),
            ([4, 256, 8, 8], [512, 256, 3, 3]),
        ] {
            let pad = wd[2] / 2;
            assert_eq!(Geometry::new(x, wd, 1, pad, 1).images_per_product(), 1);
        }
    }

    /// Side by side, each image's output is the sum the image alone gives (a batch of one runs
    /// image by image), bit for bit; so is its input gradient where the image alone takes the
    /// same unfolding (a strided layer; at stride 1 it takes the implicit GEMM, which sums in
    /// another order).
    #[test]
    fn side_by_side_images_equal_each_image_alone_bitwise() {
        for (n, c, h, cout, stride) in [(5, 256, 4, 256, 1), (6, 128, 8, 512, 2)] {
            let g = Geometry::new([n, c, h, h], [cout, c, 3, 3], stride, 1, 1);
            let one = Geometry::new([1, c, h, h], [cout, c, 3, 3], stride, 1, 1);
            assert!(g.images_per_product() > 1 && one.images_per_product() == 1);
            let x = vec(&[n, c, h, h], 61);
            let w = vec(&[cout, c, 3, 3], 62);
            let dy = vec(&[n, cout, g.l()], 63);
            let mut y = vec![f32::NAN; g.output_len()];
            g.forward_into(&x, &w, &mut y);
            let mut dx = vec![f32::NAN; x.len()];
            g.backward_into(&x, &w, &dy, Some(&mut dx));
            let (img, out) = (g.image_len(), cout * g.l());
            for i in 0..n {
                let x_i = &x[i * img..(i + 1) * img];
                let mut y_i = vec![f32::NAN; out];
                one.forward_into(x_i, &w, &mut y_i);
                assert!(y_i == y[i * out..(i + 1) * out], "output of image {i}");
                if stride == 1 {
                    continue;
                }
                let mut dx_i = vec![f32::NAN; img];
                one.backward_into(x_i, &w, &dy[i * out..(i + 1) * out], Some(&mut dx_i));
                assert!(
                    dx_i == dx[i * img..(i + 1) * img],
                    "input gradient of image {i}"
                );
            }
        }
    }

    /// Grouped convolutions (ResNeXt's 3×3 with cardinality 4 and 32, pointwise and strided
    /// ones, one channel per group) equal candle's reference, which runs one convolution per
    /// group and concatenates: forward and both gradients.
    #[test]
    fn grouped_matches_candle_reference() {
        for (i, &shape) in [
            (2, 8, 8, 8, 8, 3, 1, 1, 4),
            (3, 12, 9, 7, 6, 3, 2, 1, 3),
            (2, 8, 6, 6, 16, 1, 1, 0, 2),
            (2, 6, 7, 5, 12, 1, 2, 0, 3),
            (2, 4, 5, 5, 4, 3, 1, 1, 4),
            (4, 64, 8, 8, 64, 3, 1, 1, 32),
        ]
        .iter()
        .enumerate()
        {
            assert_matches_reference(i, shape, 30 + i as u64);
        }
        let vb = VarBuilder::zeros(candle_core::DType::F32, &candle_core::Device::Cpu);
        assert!(Conv2d::grouped(6, 8, 3, 1, 1, 4, vb).is_err());
    }
}
