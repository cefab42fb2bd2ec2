//! 2-D convolution as im2col + GEMM, forward and backward.
//!
//! candle's CPU convolution computes its input gradient with a direct, naive transposed
//! convolution and its weight gradient as a convolution over transposed tensors, which made
//! training ~10× slower than the forward pass alone. Here a convolution is `W · im2col(x)`: the
//! `Im2Col` op unfolds each image into a `K × (H'·W')` matrix (K = C·kh·kw, the Caffe layout, so
//! the product is already NCHW), candle's batched matmul (gemm) does the arithmetic, and autograd
//! differentiates the matmul; the only hand-written backward is `col2im`, the adjoint of the
//! unfolding. Both ops are parallel over the images of the batch.

use candle_core::{CpuStorage, CustomOp1, Layout, Module, Result, Shape, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Geometry shared by the unfold/fold ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
}

impl Geometry {
    fn out_hw(&self) -> (usize, usize) {
        (
            (self.h + 2 * self.pad - self.kh) / self.stride + 1,
            (self.w + 2 * self.pad - self.kw) / self.stride + 1,
        )
    }
    fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }

    /// Visits, for row `row` = (c, ki, kj) of the unfolded matrix and one image, every
    /// (output column within the image, input offset within the image), with `None` for
    /// positions in the zero padding.
    #[inline]
    fn for_row(&self, row: usize, mut f: impl FnMut(usize, Option<usize>)) {
        let (ho, wo) = self.out_hw();
        let (c, kk) = (row / (self.kh * self.kw), row % (self.kh * self.kw));
        let (ki, kj) = (kk / self.kw, kk % self.kw);
        for oy in 0..ho {
            let iy = (oy * self.stride + ki) as isize - self.pad as isize;
            let inside_y = iy >= 0 && iy < self.h as isize;
            for ox in 0..wo {
                let ix = (ox * self.stride + kj) as isize - self.pad as isize;
                let src = (inside_y && ix >= 0 && ix < self.w as isize)
                    .then(|| (c * self.h + iy as usize) * self.w + ix as usize);
                f(oy * wo + ox, src);
            }
        }
    }
}

fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        candle_core::bail!("{op}: only f32 is supported on CPU")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("{op}: input must be contiguous")
    };
    Ok(&data[start..end])
}

/// `N × C × H × W` → `K × (N·H'·W')`: one column per output pixel of every image, so the
/// whole batch is one GEMM.
struct Im2Col(Geometry);

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let x = f32_slice(storage, layout, "im2col")?;
        let (ho, wo) = g.out_hw();
        let (k, l) = (g.k(), ho * wo);
        let img = g.c * g.h * g.w;
        let mut out = vec![0f32; k * g.n * l];
        out.par_chunks_mut(g.n * l)
            .enumerate()
            .for_each(|(row, dst)| {
                for i in 0..g.n {
                    let (src, d) = (&x[i * img..(i + 1) * img], &mut dst[i * l..(i + 1) * l]);
                    g.for_row(row, |col, at| d[col] = at.map_or(0.0, |a| src[a]));
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((k, g.n * l))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            grad_res.contiguous()?.apply_op1_no_bwd(&Col2Im(self.0))?,
        ))
    }
}

/// The adjoint of [`Im2Col`]: `K × (N·H'·W')` → `N × C × H × W`, summing overlaps.
struct Col2Im(Geometry);

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.0;
        let cols = f32_slice(storage, layout, "col2im")?;
        let (ho, wo) = g.out_hw();
        let (k, l) = (g.k(), ho * wo);
        let img_len = g.c * g.h * g.w;
        let mut out = vec![0f32; g.n * img_len];
        out.par_chunks_mut(img_len)
            .enumerate()
            .for_each(|(i, dst)| {
                for row in 0..k {
                    let src = &cols[row * g.n * l + i * l..row * g.n * l + (i + 1) * l];
                    g.for_row(row, |col, at| {
                        if let Some(a) = at {
                            dst[a] += src[col];
                        }
                    });
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((g.n, g.c, g.h, g.w))))
    }
}

/// A bias-free 2-D convolution with square kernel, stride and zero padding.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    stride: usize,
    pad: usize,
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
        let weight = vb.get_with_hints(
            (cout, cin, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        Ok(Conv2d {
            weight,
            stride,
            pad,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            // Off the CPU, candle's own convolution (cuDNN where enabled).
            let cfg = candle_nn::Conv2dConfig {
                padding: self.pad,
                stride: self.stride,
                ..Default::default()
            };
            return candle_nn::Conv2d::new(self.weight.clone(), None, cfg).forward(x);
        }
        let (n, c, h, w) = x.dims4()?;
        let (cout, _, kh, kw) = self.weight.dims4()?;
        let g = Geometry {
            n,
            c,
            h,
            w,
            kh,
            kw,
            stride: self.stride,
            pad: self.pad,
        };
        let (ho, wo) = g.out_hw();
        let cols = x.contiguous()?.apply_op1(Im2Col(g))?;
        let y = self.weight.reshape((cout, g.k()))?.matmul(&cols)?; // Cout × (N·H'·W')
        y.reshape((cout, n, ho * wo))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, cout, ho, wo))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::{max_rel, random};
    use candle_core::Var;

    /// Forward and both gradients equal candle's reference convolution.
    #[test]
    fn matches_candle_reference() {
        for (i, &(n, c, h, w, cout, k, stride, pad)) in [
            (2, 3, 8, 8, 4, 3, 1, 1),
            (3, 4, 9, 7, 5, 3, 2, 1),
            (2, 5, 8, 8, 6, 1, 2, 0),
            (1, 2, 5, 6, 3, 1, 1, 0),
            (2, 3, 7, 7, 2, 3, 1, 0),
        ]
        .iter()
        .enumerate()
        {
            let x = Var::from_tensor(&random(&[n, c, h, w], -1.0..1.0, i as u64)).unwrap();
            let wt =
                Var::from_tensor(&random(&[cout, c, k, k], -1.0..1.0, 100 + i as u64)).unwrap();
            let ours = Conv2d {
                weight: wt.as_tensor().clone(),
                stride,
                pad,
            };
            let y = ours.forward(x.as_tensor()).unwrap();
            let reference = x
                .as_tensor()
                .conv2d(wt.as_tensor(), pad, stride, 1, 1)
                .unwrap();
            assert_eq!(y.dims(), reference.dims());
            assert!(max_rel(&y, &reference) < 1e-5, "forward case {i}");
            // A loss that weights every output differently.
            let m = random(y.dims(), -1.0..1.0, 200 + i as u64);
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
                assert!(max_rel(a, b) < 1e-5, "gradient case {i}: {}", max_rel(a, b));
            }
        }
    }
}
