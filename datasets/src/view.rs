//! Which part of a packed image the model sees, and at what size: the whole image (the CIFAR
//! convention), its centre square (torchvision's `CenterCrop`, ImageNet's evaluation view), or
//! a random resized crop (torchvision's `RandomResizedCrop`, ImageNet's training view).
//!
//! A resized crop is resampled exactly as Pillow's bilinear `Image.resize` does it (what
//! torchvision's transforms run on the PIL images of an `ImageFolder`): its triangle filter
//! widened by the reduction factor when shrinking (antialiasing), weights in 22-bit fixed point,
//! a horizontal pass into an 8-bit image, then a vertical one. The output is bitwise Pillow's
//! (tested against Pillow's own output in `tests/view_pillow.rs`), so a crop box gives the
//! pixels a PyTorch pipeline would train on. Only the box is drawn differently: from our
//! seeded generator, not torch's. The same resampler packs ImageFolder images
//! ([`ViewScratch::resize_centre_square`], torchvision's `Resize` + `CenterCrop`; kept whole,
//! [`ViewScratch::resize_shorter_side`], `Resize` alone).

use rand::Rng;
use serde::{Deserialize, Serialize};

/// The part of each packed image the loader hands to the model.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub enum View {
    /// The whole packed image (refused over images of varying sizes).
    #[default]
    Whole,
    /// The centre `side`×`side` square, at offsets `int(round((size - side) / 2))` (torchvision's
    /// `CenterCrop`, Python's rounding).
    Center {
        /// Side of the square, in pixels.
        side: usize,
    },
    /// torchvision's `RandomResizedCrop(side, scale, ratio)`: a box of `scale` of the image's
    /// area (uniform) and aspect ratio `ratio` (log-uniform), ten tries, else the centre crop
    /// of the ratio nearest the image's; resampled to `side`×`side` by Pillow's bilinear filter.
    RandomResized {
        /// Side of the output square, in pixels.
        side: usize,
        /// Range of the box's area as a fraction of the image's.
        scale: [f64; 2],
        /// Range of the box's width / height.
        ratio: [f64; 2],
    },
}

impl View {
    /// torchvision's `RandomResizedCrop(side)` defaults: scale (0.08, 1), ratio (3/4, 4/3).
    pub fn random_resized(side: usize) -> View {
        View::RandomResized {
            side,
            scale: [0.08, 1.0],
            ratio: [3.0 / 4.0, 4.0 / 3.0],
        }
    }

    /// The centre square of side `crop_size`, or the whole image without one: what a model
    /// trained on crops of that side sees in evaluation.
    pub fn centre_or_whole(crop_size: Option<usize>) -> View {
        crop_size.map_or(View::Whole, |side| View::Center { side })
    }

    /// Whether this is the whole image (the default, left out of serialised streams).
    pub fn is_whole(&self) -> bool {
        *self == View::Whole
    }

    /// Height and width of the view of an `h`×`w` image.
    pub fn dims(&self, (h, w): (usize, usize)) -> (usize, usize) {
        match *self {
            View::Whole => (h, w),
            View::Center { side } | View::RandomResized { side, .. } => (side, side),
        }
    }

    /// Why this view cannot be taken of `h`×`w` images, if it cannot.
    pub fn check(&self, (h, w): (usize, usize)) -> Result<(), String> {
        match *self {
            View::Whole => Ok(()),
            View::Center { side } if side == 0 || side > h || side > w => Err(format!(
                "a centre crop of {side}×{side} does not fit images of {h}×{w}"
            )),
            View::RandomResized { side, scale, ratio } => {
                if side == 0 || side > h || side > w {
                    Err(format!(
                        "a random resized crop of {side}×{side} does not fit images of {h}×{w}"
                    ))
                } else if !(scale[0] > 0.0 && scale[0] <= scale[1] && scale[1] <= 1.0) {
                    Err(format!("scale {scale:?} is not a range within (0, 1]"))
                } else if !(ratio[0] > 0.0 && ratio[0] <= ratio[1] && ratio[1].is_finite()) {
                    Err(format!(
                        "ratio {ratio:?} is not a range of positive numbers"
                    ))
                } else {
                    Ok(())
                }
            }
            View::Center { .. } => Ok(()),
        }
    }

    /// Renders the view of `src` (CHW `u8`, `c`×`h`×`w`): `src` itself for the whole image,
    /// else `scratch`'s pixels (CHW, `c`×side×side). A random crop draws its box from `rng`.
    pub fn render<'a, R: Rng>(
        &self,
        src: &'a [u8],
        (c, h, w): (usize, usize, usize),
        rng: &mut R,
        scratch: &'a mut ViewScratch,
    ) -> &'a [u8] {
        match *self {
            View::Whole => src,
            View::Center { side } => {
                let b = CropBox {
                    top: center_offset(h, side),
                    left: center_offset(w, side),
                    height: side,
                    width: side,
                };
                crop_into(src, (c, h, w), b, &mut scratch.out);
                &scratch.out
            }
            View::RandomResized { side, scale, ratio } => {
                let b = random_resized_box((h, w), scale, ratio, rng);
                scratch.resize(src, (c, h, w), b, side);
                &scratch.out
            }
        }
    }
}

/// A crop's place in its image, in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

impl CropBox {
    /// The whole of an `h`×`w` image.
    pub fn whole((h, w): (usize, usize)) -> CropBox {
        CropBox {
            top: 0,
            left: 0,
            height: h,
            width: w,
        }
    }
}

/// torchvision's `CenterCrop` offset, `int(round((size - side) / 2.0))` with Python's rounding
/// (half to even).
pub fn center_offset(size: usize, side: usize) -> usize {
    ((size - side) as f64 / 2.0).round_ties_even() as usize
}

/// torchvision's `RandomResizedCrop.get_params` on an `h`×`w` image, with our generator. The
/// draws, per try: the area fraction (uniform in `scale`), the log aspect ratio (uniform in
/// log `ratio`), then, for a box that fits, its top and left (uniform integers).
pub fn random_resized_box<R: Rng>(
    (h, w): (usize, usize),
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut R,
) -> CropBox {
    let area = (h * w) as f64;
    let log_ratio = [ratio[0].ln(), ratio[1].ln()];
    for _ in 0..10 {
        let target = area * uniform(rng, scale);
        let aspect = uniform(rng, log_ratio).exp();
        let bw = (target * aspect).sqrt().round_ties_even() as usize;
        let bh = (target / aspect).sqrt().round_ties_even() as usize;
        if 0 < bw && bw <= w && 0 < bh && bh <= h {
            let top = rng.random_range(0..=h - bh);
            let left = rng.random_range(0..=w - bw);
            return CropBox {
                top,
                left,
                height: bh,
                width: bw,
            };
        }
    }
    // torchvision's fallback: the centre crop of the allowed ratio nearest the image's.
    let in_ratio = w as f64 / h as f64;
    // Clamped to a pixel at least: torchvision's empty box would fail in Pillow.
    let (bh, bw) = if in_ratio < ratio[0] {
        (
            (w as f64 / ratio[0]).round_ties_even().clamp(1.0, h as f64) as usize,
            w,
        )
    } else if in_ratio > ratio[1] {
        (
            h,
            (h as f64 * ratio[1]).round_ties_even().clamp(1.0, w as f64) as usize,
        )
    } else {
        (h, w)
    };
    CropBox {
        top: (h - bh) / 2,
        left: (w - bw) / 2,
        height: bh,
        width: bw,
    }
}

/// Uniform in `[lo, hi)` (`lo` when the range is empty, as torch's `uniform_`).
fn uniform<R: Rng>(rng: &mut R, [lo, hi]: [f64; 2]) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// Copies box `b` of `src` (CHW, `c`×`h`×`w`) into `out` (CHW, `c`×`b.height`×`b.width`).
fn crop_into(src: &[u8], (c, h, w): (usize, usize, usize), b: CropBox, out: &mut Vec<u8>) {
    out.clear();
    for plane in src.chunks_exact(h * w).take(c) {
        for row in plane.chunks_exact(w).skip(b.top).take(b.height) {
            out.extend_from_slice(&row[b.left..b.left + b.width]);
        }
    }
}

/// Fractional bits of Pillow's 8-bit resampling weights (`PRECISION_BITS` in `Resample.c`).
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// One axis of a resampling: for each output sample, the first input sample it reads, how
/// many, and their weights in fixed point. Each sample's weights also sit in a window of
/// `span` samples (zeros around them) that starts at `start` and stays inside the input, so
/// the horizontal pass can read a fixed number of samples per output (the zeros add nothing:
/// the sums are integers, exact in any order).
#[derive(Debug, Default)]
struct Axis {
    first: Vec<usize>,
    count: Vec<usize>,
    start: Vec<usize>,
    /// `span` weights an output sample, its own at `first - start`.
    weights: Vec<i32>,
    span: usize,
    /// One output sample's weights before normalisation.
    k: Vec<f64>,
}

impl Axis {
    /// Room for the plan of any `len` ≤ `most` input samples onto `out`, so that no later box
    /// of these images grows the buffers.
    fn reserve(&mut self, most: usize, out: usize) {
        let taps = (most as f64 / out as f64).max(1.0).ceil() as usize * 2 + 1;
        for v in [&mut self.first, &mut self.count, &mut self.start] {
            v.reserve(out.saturating_sub(v.len()));
        }
        self.weights
            .reserve((out * taps).saturating_sub(self.weights.len()));
        self.k.reserve(taps.saturating_sub(self.k.len()));
    }

    /// Pillow's `precompute_coeffs` for the bilinear filter (support 1), then
    /// `normalize_coeffs_8bpc`: `len` input samples onto `out` output samples, of which only
    /// those of `window` are planned (each output sample depends on its own weights alone).
    fn plan(&mut self, len: usize, out: usize, window: std::ops::Range<usize>) {
        let scale = len as f64 / out as f64;
        let filter_scale = scale.max(1.0);
        let support = filter_scale;
        // Pillow multiplies by the reciprocal: the same weights to the last bit.
        let inv_filter_scale = 1.0 / filter_scale;
        // Pillow's `ksize`: no sample reads more.
        let taps = support.ceil() as usize * 2 + 1;
        self.span = taps.min(len);
        self.first.clear();
        self.count.clear();
        self.start.clear();
        self.weights.clear();
        self.weights.resize(window.len() * self.span, 0);
        let k = &mut self.k;
        k.resize(taps, 0.0);
        for (o, slot) in window.zip(self.weights.chunks_exact_mut(self.span)) {
            let center = (o as f64 + 0.5) * scale;
            // C's (int) truncates toward zero; a negative start is clamped to 0 either way.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(len as i64) as usize;
            let n = hi - lo;
            let start = lo.min(len - self.span);
            let mut sum = 0.0;
            for (x, kx) in k[..n].iter_mut().enumerate() {
                let t = ((x + lo) as f64 - center + 0.5) * inv_filter_scale;
                *kx = (1.0 - t.abs()).max(0.0);
                sum += *kx;
            }
            for (kx, q) in k[..n].iter().zip(slot[lo - start..].iter_mut()) {
                let v = if sum != 0.0 { kx / sum } else { *kx };
                let f = v * (1u32 << PRECISION_BITS) as f64;
                *q = if v < 0.0 {
                    (f - 0.5) as i32
                } else {
                    (f + 0.5) as i32
                };
            }
            self.first.push(lo);
            self.count.push(n);
            self.start.push(start);
        }
    }

    /// The weights of output sample `o`, input sample `first[o]` first.
    #[inline]
    fn weights(&self, o: usize) -> &[i32] {
        let at = o * self.span + self.first[o] - self.start[o];
        &self.weights[at..at + self.count[o]]
    }

    /// Output sample `o` of the input samples `src`, rounded and clamped as Pillow's `clip8`.
    #[inline]
    fn sample(&self, o: usize, src: &[u8]) -> u8 {
        let mut acc: i32 = HALF;
        for (&s, &k) in src[self.first[o]..].iter().zip(self.weights(o)) {
            acc += s as i32 * k;
        }
        clip8(acc)
    }

    /// [`Self::sample`] over the window of `N` = `span` samples, unrolled.
    #[inline]
    fn sample_window<const N: usize>(&self, o: usize, src: &[u8]) -> u8 {
        let s = self.start[o];
        let px: &[u8; N] = src[s..s + N].try_into().expect("a window of N samples");
        let k: &[i32; N] = self.weights[o * N..o * N + N]
            .try_into()
            .expect("N weights");
        let mut acc: i32 = HALF;
        for t in 0..N {
            acc += px[t] as i32 * k[t];
        }
        clip8(acc)
    }
}

/// The rounding offset of a fixed-point sum.
const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Pillow's `clip8`: a fixed-point sum to a byte.
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// A loader worker's buffers for rendering views: reused from image to image, so a view
/// allocates nothing once they have grown.
#[derive(Debug, Default)]
pub struct ViewScratch {
    rows: Axis,
    cols: Axis,
    /// The first pass's output.
    tmp: Vec<u8>,
    /// The vertical pass's sums for one output row.
    acc: Vec<i32>,
    /// The rendered view.
    out: Vec<u8>,
}

impl ViewScratch {
    /// Box `b` of `src` (CHW, `c`×`h`×`w`) resampled to `side`×`side` into `self.out`, as
    /// Pillow's `img.crop(box).resize((side, side), BILINEAR)` of the HWC image.
    pub fn resize(
        &mut self,
        src: &[u8],
        dims: (usize, usize, usize),
        b: CropBox,
        side: usize,
    ) -> &[u8] {
        let (_, h, w) = dims;
        // Room for the largest box of these images at once, so no later box grows a buffer.
        self.cols.reserve(w, side);
        self.rows.reserve(h, side);
        self.acc.reserve(w.max(side).saturating_sub(self.acc.len()));
        let most = side * h.max(w);
        if self.tmp.len() < most {
            self.tmp.resize(most, 0);
        }
        self.resize_part(src, dims, b, (side, side), CropBox::whole((side, side)))
    }

    /// Part `part` of box `b` of `src` (CHW, `c`×`h`×`w`) resampled to `oh`×`ow`, into
    /// `self.out` (CHW, `c`×`part.height`×`part.width`): Pillow's `img.crop(box).resize((ow,
    /// oh), BILINEAR).crop(part)` of the HWC image, computing only the part.
    fn resize_part(
        &mut self,
        src: &[u8],
        (c, h, w): (usize, usize, usize),
        b: CropBox,
        (oh, ow): (usize, usize),
        part: CropBox,
    ) -> &[u8] {
        let (ph, pw) = (part.height, part.width);
        self.cols.plan(b.width, ow, part.left..part.left + pw);
        self.rows.plan(b.height, oh, part.top..part.top + ph);
        self.out.resize(c * ph * pw, 0);
        let (bh, bw) = (b.height as i64, b.width as i64);
        // Pillow 13's order, decided by the whole output's size: the vertical pass first when
        // the height shrinks by more than twice what the width does (earlier Pillows always
        // go horizontal first; the orders round differently, by one level in some pixels).
        let vertical_first = bh - oh as i64 > 0 && bh - oh as i64 > (bw - ow as i64) * 2;
        // Horizontal first, only the rows of the box the part's rows read go through that
        // pass: rows r0..r1.
        let (r0, r1) = (
            self.rows.first[0],
            self.rows.first[ph - 1] + self.rows.count[ph - 1],
        );
        // The first pass's output: the part's rows of the box, or rows r0..r1 of the box
        // resampled to the part's columns.
        let need = if vertical_first {
            ph * b.width
        } else {
            (r1 - r0) * pw
        };
        if self.tmp.len() < need {
            self.tmp.resize(need, 0);
        }
        for ch in 0..c {
            let plane = &src[ch * h * w + b.top * w + b.left..(ch + 1) * h * w];
            let out = &mut self.out[ch * ph * pw..(ch + 1) * ph * pw];
            if vertical_first {
                let tmp = &mut self.tmp[..ph * b.width];
                vertical(&self.rows, plane, w, b.width, 0, tmp, &mut self.acc);
                horizontal(&self.cols, tmp, b.width, ph, out);
            } else {
                let tmp = &mut self.tmp[..(r1 - r0) * pw];
                horizontal(&self.cols, &plane[r0 * w..], w, r1 - r0, tmp);
                vertical(&self.rows, tmp, pw, pw, r0, out, &mut self.acc);
            }
        }
        &self.out
    }

    /// The whole of `src` (CHW, `c`×`h`×`w`) resized so its shorter side is `size`, then its
    /// centre `size`×`size` square, into `self.out`: torchvision's `Resize(size)` +
    /// `CenterCrop(size)` of a PIL image (the longer side truncated, `int(size * long /
    /// short)`; Pillow's bilinear filter; the crop's offsets Python-rounded). Only the square
    /// is computed.
    pub fn resize_centre_square(
        &mut self,
        src: &[u8],
        (c, h, w): (usize, usize, usize),
        size: usize,
    ) -> &[u8] {
        let (nh, nw) = shorter_side_dims((h, w), size);
        let square = CropBox {
            top: center_offset(nh, size),
            left: center_offset(nw, size),
            height: size,
            width: size,
        };
        self.resize_part(src, (c, h, w), CropBox::whole((h, w)), (nh, nw), square)
    }

    /// The whole of `src` (CHW, `c`×`h`×`w`) resized so its shorter side is `size`, into
    /// `self.out`: torchvision's `Resize(size)` of a PIL image (the longer side truncated,
    /// `int(size * long / short)`; Pillow's bilinear filter). Returns the pixels and their
    /// height and width.
    pub fn resize_shorter_side(
        &mut self,
        src: &[u8],
        (c, h, w): (usize, usize, usize),
        size: usize,
    ) -> (&[u8], (usize, usize)) {
        let (nh, nw) = shorter_side_dims((h, w), size);
        let whole = CropBox::whole((h, w));
        let out = CropBox::whole((nh, nw));
        (
            self.resize_part(src, (c, h, w), whole, (nh, nw), out),
            (nh, nw),
        )
    }
}

/// The height and width torchvision's `Resize(size)` gives an `h`×`w` image: the shorter side
/// `size`, the longer `int(size * long / short)` (integer division truncates as Python's
/// `int` of the float quotient does: a quotient that is not whole is at least 1/short away
/// from the next integer, far more than the float's error).
pub fn shorter_side_dims((h, w): (usize, usize), size: usize) -> (usize, usize) {
    if w <= h {
        (size * h / w, size)
    } else {
        (size, size * w / h)
    }
}

/// Pillow's horizontal pass: `rows` rows of `src` (row `r` starts at `r * stride`) resampled
/// along `axis` into the rows of `out`. The usual windows (3 samples when enlarging, 5 when
/// shrinking by up to 2) get unrolled loops.
fn horizontal(axis: &Axis, src: &[u8], stride: usize, rows: usize, out: &mut [u8]) {
    match axis.span {
        3 => horizontal_window::<3>(axis, src, stride, rows, out),
        5 => horizontal_window::<5>(axis, src, stride, rows, out),
        _ => {
            let width = axis.first.len();
            for (r, row) in out.chunks_exact_mut(width).take(rows).enumerate() {
                let srow = &src[r * stride..];
                for (x, o) in row.iter_mut().enumerate() {
                    *o = axis.sample(x, srow);
                }
            }
        }
    }
}

/// [`horizontal`] for windows of `N` samples.
fn horizontal_window<const N: usize>(
    axis: &Axis,
    src: &[u8],
    stride: usize,
    rows: usize,
    out: &mut [u8],
) {
    let width = axis.first.len();
    for (r, row) in out.chunks_exact_mut(width).take(rows).enumerate() {
        let srow = &src[r * stride..];
        for (x, o) in row.iter_mut().enumerate() {
            *o = axis.sample_window::<N>(x, srow);
        }
    }
}

/// Pillow's vertical pass: the rows of `out` (each `width` wide) resampled along `axis` from
/// the rows of `src` (row `i` starts at `(i - shift) * stride`), a whole row at a time so the
/// inner loop is a vector one.
fn vertical(
    axis: &Axis,
    src: &[u8],
    stride: usize,
    width: usize,
    shift: usize,
    out: &mut [u8],
    acc: &mut Vec<i32>,
) {
    for (y, row) in out.chunks_exact_mut(width).enumerate() {
        acc.clear();
        acc.resize(width, HALF);
        let first = axis.first[y] - shift;
        for (t, &k) in axis.weights(y).iter().enumerate() {
            let at = (first + t) * stride;
            for (a, &s) in acc.iter_mut().zip(&src[at..at + width]) {
                *a += s as i32 * k;
            }
        }
        for (o, &a) in row.iter_mut().zip(acc.iter()) {
            *o = clip8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn centre_offsets_round_half_to_even() {
        // (256 - 224) / 2 = 16; (5 - 2) / 2 = 1.5 -> 2; (7 - 2) / 2 = 2.5 -> 2; (9 - 4) / 2 = 2.5 -> 2.
        assert_eq!(center_offset(256, 224), 16);
        assert_eq!(center_offset(5, 2), 2);
        assert_eq!(center_offset(7, 2), 2);
        assert_eq!(center_offset(9, 4), 2);
        assert_eq!(center_offset(4, 4), 0);
    }

    #[test]
    fn a_centre_view_is_the_middle_square() {
        // Two channels of 4 rows × 5 columns, values 0..40; the centre 2×2 starts at row 1
        // (round(1.0)) and column 2 (round(1.5) = 2).
        let src: Vec<u8> = (0..40).collect();
        let mut scratch = ViewScratch::default();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let out = View::Center { side: 2 }.render(&src, (2, 4, 5), &mut rng, &mut scratch);
        assert_eq!(out, &[7, 8, 12, 13, 27, 28, 32, 33]);
    }

    #[test]
    fn resizing_to_the_same_size_is_the_identity() {
        let src: Vec<u8> = (0..3 * 6 * 6).map(|x| (x * 37 % 256) as u8).collect();
        let mut s = ViewScratch::default();
        let b = CropBox {
            top: 0,
            left: 0,
            height: 6,
            width: 6,
        };
        assert_eq!(s.resize(&src, (3, 6, 6), b, 6), &src[..]);
    }

    /// Worked by hand from Pillow's formulas: halving 4 samples [0, 100, 200, 40] to 2, the
    /// triangle filter is widened to support 2 and centred at 1 and 3. Output 0 reads samples
    /// int(1 - 2 + 0.5) = 0 to int(1 + 2 + 0.5) = 3 (exclusive), at t = (x - 1 + 0.5) / 2 =
    /// -0.25, 0.25, 0.75: weights 0.75, 0.75, 0.25 over 1.75, (75 + 50) / 1.75 = 71.4 → 71.
    /// Output 1 reads samples 1 to 3 with 0.25, 0.75, 0.75: (25 + 150 + 30) / 1.75 = 117.1 → 117.
    #[test]
    fn shrinking_by_two_matches_the_hand_worked_filter() {
        let src = [0u8, 100, 200, 40];
        let mut s = ViewScratch::default();
        s.cols.plan(4, 2, 0..2);
        assert_eq!(
            (s.cols.first.clone(), s.cols.count.clone()),
            (vec![0, 1], vec![3, 3])
        );
        assert_eq!(s.cols.sample(0, &src), 71);
        assert_eq!(s.cols.sample(1, &src), 117);
    }

    #[test]
    fn random_boxes_fit_and_follow_scale_and_ratio() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let (h, w) = (60, 80);
        let (scale, ratio) = ([0.08, 1.0], [0.75, 4.0 / 3.0]);
        let mut small = false;
        for _ in 0..2000 {
            let b = random_resized_box((h, w), scale, ratio, &mut rng);
            assert!(b.top + b.height <= h && b.left + b.width <= w, "{b:?}");
            assert!(b.height > 0 && b.width > 0);
            // Rounding each side moves the area and ratio a little off the drawn values.
            let frac = (b.height * b.width) as f64 / (h * w) as f64;
            let r = b.width as f64 / b.height as f64;
            assert!(frac <= 1.0 && frac > 0.05, "{b:?}");
            assert!(r > 0.6 && r < 1.6, "{b:?}");
            small |= frac < 0.2;
        }
        assert!(small, "small boxes are drawn");
    }

    /// torchvision's fallback when no try fits: an image far wider than 4/3 gets the centre
    /// box of ratio 4/3 over its full height, one far taller the box of ratio 3/4 over its
    /// width (a scale range that cannot fit forces the fallback).
    #[test]
    fn the_fallback_is_torchvisions_centre_box() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let big = [2.0, 3.0];
        let ratio = [0.75, 4.0 / 3.0];
        // 10 × 40: width 10 · 4/3 = 13.33 → 13, left (40 - 13) / 2 = 13.
        let b = random_resized_box((10, 40), big, ratio, &mut rng);
        assert_eq!(
            b,
            CropBox {
                top: 0,
                left: 13,
                height: 10,
                width: 13
            }
        );
        // 40 × 9: height 9 / 0.75 = 12, top (40 - 12) / 2 = 14.
        let b = random_resized_box((40, 9), big, ratio, &mut rng);
        assert_eq!(
            b,
            CropBox {
                top: 14,
                left: 0,
                height: 12,
                width: 9
            }
        );
        // A square image is within the ratios: the whole image.
        let b = random_resized_box((16, 16), big, ratio, &mut rng);
        assert_eq!((b.top, b.left, b.height, b.width), (0, 0, 16, 16));
        // Ratios far from the image's would round a side to 0: it is kept at one pixel.
        let b = random_resized_box((10, 40), big, [100.0, 200.0], &mut rng);
        assert_eq!((b.top, b.left, b.height, b.width), (4, 0, 1, 40));
    }

    #[test]
    fn views_larger_than_the_images_are_refused() {
        assert!(View::random_resized(224).check((256, 256)).is_ok());
        let e = View::random_resized(300).check((256, 320)).unwrap_err();
        assert!(e.contains("300×300") && e.contains("256×320"), "{e}");
        assert!(View::Center { side: 257 }.check((256, 256)).is_err());
        assert!(View::Whole.check((1, 1)).is_ok());
    }
}
