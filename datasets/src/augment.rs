//! On-the-fly augmentation of one image from the packed store into a normalised `f32` CHW slot
//! of a batch: random crop with zero padding, horizontal flip and per-channel normalisation, done
//! in one pass with no allocation.

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
}

impl Augment {
    /// No augmentation: evaluation and labelling.
    pub const NONE: Augment = Augment {
        crop_padding: 0,
        flip: false,
    };
    /// The standard CIFAR training augmentation: pad 4, random crop, random flip.
    pub const CROP_FLIP: Augment = Augment {
        crop_padding: 4,
        flip: true,
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
        let mut sum = vec![0f64; channels];
        let mut sq = vec![0f64; channels];
        let mut count = 0usize;
        for img in images {
            let plane = img.len() / channels;
            for c in 0..channels {
                for &p in &img[c * plane..(c + 1) * plane] {
                    let v = p as f64 / 255.0;
                    sum[c] += v;
                    sq[c] += v * v;
                }
            }
            count += plane;
        }
        let n = count.max(1) as f64;
        let mean: Vec<f32> = sum.iter().map(|s| (s / n) as f32).collect();
        let std = sum
            .iter()
            .zip(&sq)
            .map(|(s, q)| ((q / n - (s / n).powi(2)).max(1e-12).sqrt()) as f32)
            .collect();
        Normalize { mean, std }
    }
}

/// Writes image `src` (CHW `u8`, `c`×`h`×`w`) into `dst` (CHW `f32`, same shape), cropped,
/// flipped and normalised as `aug` and `rng` say.
pub fn augment_into<R: Rng>(
    src: &[u8],
    dst: &mut [f32],
    (c, h, w): (usize, usize, usize),
    aug: &Augment,
    norm: &Normalize,
    rng: &mut R,
) {
    let pad = aug.crop_padding as i64;
    // Offsets of the crop window in the padded image, minus the padding: the source pixel of
    // output (y, x) is (y + dy, x + dx).
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
    for ch in 0..c {
        let scale = 1.0 / (255.0 * norm.std[ch]);
        let shift = -norm.mean[ch] / norm.std[ch];
        let sp = &src[ch * h * w..(ch + 1) * h * w];
        let dp = &mut dst[ch * h * w..(ch + 1) * h * w];
        for y in 0..hi {
            let row = &mut dp[(y * wi) as usize..((y + 1) * wi) as usize];
            let sy = y + dy;
            if sy < 0 || sy >= hi {
                row.fill(shift); // zero padding is the value 0 before normalisation
                continue;
            }
            let srow = &sp[(sy * wi) as usize..((sy + 1) * wi) as usize];
            for (x, out) in row.iter_mut().enumerate() {
                let xo = if flip {
                    wi - 1 - x as isize
                } else {
                    x as isize
                };
                let sx = xo + dx;
                *out = if sx < 0 || sx >= wi {
                    shift
                } else {
                    srow[sx as usize] as f32 * scale + shift
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

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

    #[test]
    fn fit_recovers_mean_and_std() {
        let img = [0u8, 255, 0, 255];
        let n = Normalize::fit(1, std::iter::once(&img[..]));
        assert!((n.mean[0] - 0.5).abs() < 1e-6);
        assert!((n.std[0] - 0.5).abs() < 1e-6);
    }
}
