//! On-the-fly augmentation of one image from the packed store into a normalised `f32` CHW slot
//! of a batch: random crop with zero padding, horizontal flip and per-channel normalisation, done
//! in one pass with no allocation, then an optional Cutout hole (see [`crate::mix`] for the
//! batch-level mixing augmentations).

use rand::Rng;
use serde::{Deserialize, Serialize};

/// Per-image augmentations applied by the loader.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Zero padding of the random crop, in pixels (0 disables the crop).
    pub crop_padding: usize,
    /// Random horizontal flip with probability 1/2.
    pub flip: bool,
    /// Side of the Cutout square, applied after normalisation (0 disables; 16 on CIFAR-10 and 8
    /// on CIFAR-100 in the reference).
    #[serde(default)]
    pub cutout: usize,
}

impl Augment {
    /// No augmentation: evaluation and labelling.
    pub const NONE: Augment = Augment {
        crop_padding: 0,
        flip: false,
        cutout: 0,
    };
    /// A random horizontal flip only (after a random resized crop, ImageNet's training view).
    pub const FLIP: Augment = Augment {
        crop_padding: 0,
        flip: true,
        cutout: 0,
    };
    /// The standard CIFAR training augmentation: pad 4, random crop, random flip.
    pub const CROP_FLIP: Augment = Augment {
        crop_padding: 4,
        flip: true,
        cutout: 0,
    };
}

/// Per-channel normalisation `(x / 255 - mean) / std`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalize {
    /// Channel means, in [0, 1] units.
    pub mean: Vec<f32>,
    /// Channel standard deviations, in [0, 1] units.
    pub std: Vec<f32>,
}

impl Normalize {
    /// Mean and standard deviation of each channel of a set of CHW images (in [0, 1] units).
    pub fn fit<'a>(channels: usize, images: impl Iterator<Item = &'a [u8]>) -> Normalize {
        let mut sums = NormalizeSums::new(channels);
        for img in images {
            sums.add(img);
        }
        sums.finish()
    }
}

/// The running sums of [`Normalize::fit`], for images that come a chunk at a time: the same
/// images in the same order give the same statistics, bit for bit.
#[derive(Debug, Clone)]
pub struct NormalizeSums {
    sum: Vec<f64>,
    sq: Vec<f64>,
    count: usize,
}

impl NormalizeSums {
    /// Empty sums over `channels` channels.
    pub fn new(channels: usize) -> Self {
        NormalizeSums {
            sum: vec![0.0; channels],
            sq: vec![0.0; channels],
            count: 0,
        }
    }

    /// Adds one CHW image.
    pub fn add(&mut self, img: &[u8]) {
        let channels = self.sum.len();
        let plane = img.len() / channels;
        for c in 0..channels {
            for &p in &img[c * plane..(c + 1) * plane] {
                let v = p as f64 / 255.0;
                self.sum[c] += v;
                self.sq[c] += v * v;
            }
        }
        self.count += plane;
    }

    /// Mean and standard deviation of each channel of the images added.
    pub fn finish(&self) -> Normalize {
        let n = self.count.max(1) as f64;
        let mean: Vec<f32> = self.sum.iter().map(|s| (s / n) as f32).collect();
        let std = self
            .sum
            .iter()
            .zip(&self.sq)
            .map(|(s, q)| ((q / n - (s / n).powi(2)).max(1e-12).sqrt()) as f32)
            .collect();
        Normalize { mean, std }
    }
}

/// Writes image `src` (CHW `u8`, `c`×`h`×`w`) into `dst` (CHW `f32`, same shape), cropped,
/// flipped, normalised and cut out as `aug` and `rng` say.
///
/// The draws, in order: crop offsets (y then x, each uniform in `0..=2·pad`), the flip coin, the
/// Cutout centre (y then x). The inner loops run over the valid span of each row only, so they
/// compile to straight vector code.
pub fn augment_into<R: Rng>(
    src: &[u8],
    dst: &mut [f32],
    (c, h, w): (usize, usize, usize),
    aug: &Augment,
    norm: &Normalize,
    rng: &mut R,
) {
    let pad = aug.crop_padding as i64;
    // The source pixel of output (y, x) is (y + dy, x + dx) before the flip.
    let (dy, dx) = if pad > 0 {
        (
            (rng.random_range(0..=2 * pad) - pad) as isize,
            (rng.random_range(0..=2 * pad) - pad) as isize,
        )
    } else {
        (0, 0)
    };
    let flip = aug.flip && rng.random_bool(0.5);
    let (hi, wi) = (h as isize, w as isize);
    // Output columns whose source column x + dx lies inside the image.
    let lo = (-dx).clamp(0, wi) as usize;
    let hi_x = (wi - dx).clamp(0, wi) as usize;
    for ch in 0..c {
        let scale = 1.0 / (255.0 * norm.std[ch]);
        let shift = -norm.mean[ch] / norm.std[ch];
        let sp = &src[ch * h * w..(ch + 1) * h * w];
        let dp = &mut dst[ch * h * w..(ch + 1) * h * w];
        for (y, row) in dp.chunks_exact_mut(w).enumerate() {
            let sy = y as isize + dy;
            if sy < 0 || sy >= hi || lo >= hi_x {
                row.fill(shift); // zero padding is the value 0 before normalisation
                continue;
            }
            let srow = &sp[sy as usize * w..(sy as usize + 1) * w];
            let span = &srow[(lo as isize + dx) as usize..(hi_x as isize + dx) as usize];
            if flip {
                // Flipping the cropped window: output x reads window column w-1-x.
                row[..w - hi_x].fill(shift);
                row[w - lo..].fill(shift);
                for (o, &s) in row[w - hi_x..w - lo].iter_mut().zip(span.iter().rev()) {
                    *o = s as f32 * scale + shift;
                }
            } else {
                row[..lo].fill(shift);
                row[hi_x..].fill(shift);
                for (o, &s) in row[lo..hi_x].iter_mut().zip(span) {
                    *o = s as f32 * scale + shift;
                }
            }
        }
    }
    if aug.cutout > 0 {
        crate::mix::cutout(dst, (c, h, w), aug.cutout, rng);
    }
}

/// `dst` = square image `src` (CHW `u8`, `c` channels of `n`×`n`) flipped horizontally when
/// `flip`, then rotated by `r`·90° counter-clockwise: numpy's `rot90(img[:, ::-1], r)` of the HWC
/// image, as SSKD's reference builds its views.
pub fn rotate_into(src: &[u8], dst: &mut [u8], (c, n): (usize, usize), r: usize, flip: bool) {
    let plane = n * n;
    for (sp, dp) in src
        .chunks_exact(plane)
        .zip(dst.chunks_exact_mut(plane))
        .take(c)
    {
        for (y, row) in dp.chunks_exact_mut(n).enumerate() {
            for (x, o) in row.iter_mut().enumerate() {
                let (sy, sx) = match r % 4 {
                    0 => (y, x),
                    1 => (x, n - 1 - y),
                    2 => (n - 1 - y, n - 1 - x),
                    _ => (n - 1 - x, y),
                };
                let sx = if flip { n - 1 - sx } else { sx };
                *o = sp[sy * n + sx];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// numpy: `rot90([[1, 2], [3, 4]], r)` is [[2, 4], [1, 3]], [[4, 3], [2, 1]], [[3, 1], [4, 2]]
    /// for r = 1, 2, 3; `[:, ::-1]` first gives [[2, 1], [4, 3]] and its rotations.
    #[test]
    fn rotations_match_numpys_rot90() {
        let img = [1u8, 2, 3, 4, 10, 20, 30, 40];
        let want = [[1, 2, 3, 4], [2, 4, 1, 3], [4, 3, 2, 1], [3, 1, 4, 2]];
        let want_flipped = [[2, 1, 4, 3], [1, 3, 2, 4], [3, 4, 1, 2], [4, 2, 3, 1]];
        let mut out = [0u8; 8];
        for r in 0..4 {
            for (flip, w) in [(false, want[r]), (true, want_flipped[r])] {
                rotate_into(&img, &mut out, (2, 2), r, flip);
                let w10: Vec<u8> = w.iter().map(|v| v * 10).collect();
                assert_eq!(&out[..4], &w[..], "r = {r}, flip = {flip}");
                assert_eq!(
                    &out[4..],
                    &w10[..],
                    "second channel, r = {r}, flip = {flip}"
                );
            }
        }
    }

    #[test]
    fn identity_without_augmentation() {
        let src: Vec<u8> = (0..2 * 3 * 4).map(|x| x as u8 * 10).collect();
        let mut dst = vec![0f32; src.len()];
        let norm = Normalize {
            mean: vec![0.0, 0.0],
            std: vec![1.0, 1.0],
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        augment_into(&src, &mut dst, (2, 3, 4), &Augment::NONE, &norm, &mut rng);
        for (s, d) in src.iter().zip(&dst) {
            assert!((*s as f32 / 255.0 - d).abs() < 1e-6);
        }
    }

    #[test]
    fn crop_shifts_content_and_pads_with_zero() {
        // One channel 4x4 with distinct values; padding 1 ensures the output is a shifted copy.
        let src: Vec<u8> = (1..=16).collect();
        let norm = Normalize {
            mean: vec![0.0],
            std: vec![1.0 / 255.0],
        };
        let aug = Augment {
            crop_padding: 1,
            flip: false,
            cutout: 0,
        };
        for seed in 0..20 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut dst = vec![0f32; 16];
            augment_into(&src, &mut dst, (1, 4, 4), &aug, &norm, &mut rng);
            // Every non-zero output is a source value, and its neighbours keep source offsets.
            let nonzero: Vec<f32> = dst.iter().copied().filter(|v| *v != 0.0).collect();
            assert!(nonzero.len() >= 9);
            for y in 0..4 {
                for x in 0..3 {
                    let (a, b) = (dst[y * 4 + x], dst[y * 4 + x + 1]);
                    if a != 0.0 && b != 0.0 {
                        assert_eq!(b - a, 1.0);
                    }
                }
            }
        }
    }

    /// The plain per-pixel definition the fast path must reproduce exactly.
    fn reference(
        src: &[u8],
        (c, h, w): (usize, usize, usize),
        (dy, dx, flip): (isize, isize, bool),
        norm: &Normalize,
    ) -> Vec<f32> {
        let mut out = vec![0f32; c * h * w];
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    let xo = if flip { w - 1 - x } else { x };
                    let (sy, sx) = (y as isize + dy, xo as isize + dx);
                    let v = if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                        0.0
                    } else {
                        src[ch * h * w + sy as usize * w + sx as usize] as f32
                    };
                    out[ch * h * w + y * w + x] = (v / 255.0 - norm.mean[ch]) / norm.std[ch];
                }
            }
        }
        out
    }

    #[test]
    fn matches_the_per_pixel_definition() {
        let shape = (3, 5, 7);
        let src: Vec<u8> = (0..105u32).map(|x| (x * 37 % 251) as u8).collect();
        let norm = Normalize {
            mean: vec![0.4, 0.5, 0.6],
            std: vec![0.2, 0.25, 0.3],
        };
        let aug = Augment {
            crop_padding: 3,
            flip: true,
            cutout: 0,
        };
        let mut seen = std::collections::HashSet::new();
        for seed in 0..400 {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let mut dst = vec![0f32; 105];
            augment_into(&src, &mut dst, shape, &aug, &norm, &mut rng);
            // Replay the same draws to know which transform was applied.
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            let dy = (rng.random_range(0..=6i64) - 3) as isize;
            let dx = (rng.random_range(0..=6i64) - 3) as isize;
            let flip = rng.random_bool(0.5);
            seen.insert((dy, dx, flip));
            let want = reference(&src, shape, (dy, dx, flip), &norm);
            for (a, b) in dst.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "seed {seed}: {a} vs {b}");
            }
        }
        // Every offset and both flips were exercised (7 × 7 × 2).
        assert_eq!(seen.len(), 98);
    }

    #[test]
    fn cutout_follows_the_crop_and_flip_draws() {
        let src = vec![200u8; 3 * 8 * 8];
        let norm = Normalize {
            mean: vec![0.0; 3],
            std: vec![1.0; 3],
        };
        let aug = Augment {
            crop_padding: 0,
            flip: false,
            cutout: 4,
        };
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let mut dst = vec![1f32; 3 * 64];
        augment_into(&src, &mut dst, (3, 8, 8), &aug, &norm, &mut rng);
        let zeros = dst.iter().filter(|v| **v == 0.0).count();
        assert!(
            (3 * 4..=3 * 16).contains(&zeros) && zeros % 3 == 0,
            "{zeros}"
        );
    }

    #[test]
    fn fit_recovers_mean_and_std() {
        let img = [0u8, 255, 0, 255];
        let n = Normalize::fit(1, std::iter::once(&img[..]));
        assert!((n.mean[0] - 0.5).abs() < 1e-6);
        assert!((n.std[0] - 0.5).abs() < 1e-6);
    }
}
