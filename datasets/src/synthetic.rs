//! The built-in synthetic dataset: procedurally drawn coloured shapes on textured, noisy
//! backgrounds, generated deterministically from a seed, so the pipeline runs end to end with no
//! download.
//!
//! Class `k` is a (shape, hue) pair: shape `k mod S` (S = min(K, 5): disc, square, triangle,
//! cross, ring) and hue group `k div S`. Classes that share a shape differ only by a hue offset
//! smaller than the per-image hue jitter, and the disc/ring pair look alike when drawn small, so
//! some class pairs are genuinely confusable: a teacher's soft labels carry information a one-hot
//! label does not. Position, size, rotation, background texture, brightness and pixel noise are
//! nuisance variables drawn per image.

use crate::error::{DatasetError, Result};
use crate::packed::StoreInfo;
use crate::rng::{rng_for, stream};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

const SHAPES: [&str; 5] = ["disc", "square", "triangle", "cross", "ring"];

/// Parameters of the synthetic dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticSpec {
    /// Number of classes K (2..=1000).
    pub classes: usize,
    /// Side of the square images, in pixels (8..=512).
    pub image_size: usize,
    /// Standard deviation of the per-pixel Gaussian noise, in units of full scale (0..1).
    pub noise: f32,
    /// Standard deviation of the per-image hue jitter, in turns of the colour wheel.
    pub hue_jitter: f32,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            classes: 10,
            image_size: 32,
            noise: 0.08,
            hue_jitter: 0.035,
        }
    }
}

impl SyntheticSpec {
    /// Checks ranges; returns an error naming the parameter.
    pub fn validate(&self) -> Result<()> {
        if !(2..=1000).contains(&self.classes) {
            return Err(DatasetError::Param {
                name: "classes",
                message: format!("{} is outside 2..=1000", self.classes),
            });
        }
        if !(8..=512).contains(&self.image_size) {
            return Err(DatasetError::Param {
                name: "image_size",
                message: format!("{} is outside 8..=512", self.image_size),
            });
        }
        if !(0.0..1.0).contains(&self.noise) {
            return Err(DatasetError::Param {
                name: "noise",
                message: format!("{} is outside [0, 1)", self.noise),
            });
        }
        if !(0.0..0.5).contains(&self.hue_jitter) {
            return Err(DatasetError::Param {
                name: "hue_jitter",
                message: format!("{} is outside [0, 0.5)", self.hue_jitter),
            });
        }
        Ok(())
    }

    fn shapes(&self) -> usize {
        self.classes.min(SHAPES.len())
    }

    fn groups(&self) -> usize {
        self.classes.div_ceil(self.shapes())
    }

    /// Hue of class `k`'s hue group: groups are spaced by at most 0.09 turns, close enough
    /// to the jitter that neighbouring groups overlap a little.
    fn hue(&self, k: usize) -> f32 {
        let g = k / self.shapes();
        let spacing = (1.0 / self.groups() as f32).min(0.09);
        0.02 + g as f32 * spacing
    }

    /// The class names, `"<shape>-h<hue in degrees>"`.
    pub fn class_names(&self) -> Vec<String> {
        (0..self.classes)
            .map(|k| {
                format!(
                    "{}-h{:03}",
                    SHAPES[k % self.shapes()],
                    (self.hue(k) * 360.0).round() as u32
                )
            })
            .collect()
    }

    /// Generates `n` images of split `split` (0 = train, 1 = test, ...): labels cycle through
    /// the classes so every class has ⌊n/K⌋ or ⌈n/K⌉ images. Pixels are CHW.
    pub fn generate(
        &self,
        seed: u64,
        split: u64,
        n: usize,
    ) -> Result<(StoreInfo, Vec<u32>, Vec<u8>)> {
        self.validate()?;
        let s = self.image_size;
        let len = 3 * s * s;
        let labels: Vec<u32> = (0..n).map(|i| (i % self.classes) as u32).collect();
        let mut pixels = vec![0u8; n * len];
        pixels
            .par_chunks_mut(len)
            .enumerate()
            .for_each(|(i, img)| self.draw(seed, split, i as u64, labels[i] as usize, img));
        let info = StoreInfo {
            n,
            h: s,
            w: s,
            c: 3,
            classes: self.class_names(),
            varying: false,
        };
        Ok((info, labels, pixels))
    }

    fn draw(&self, seed: u64, split: u64, index: u64, k: usize, out: &mut [u8]) {
        let mut rng = rng_for(&[seed, stream::SYNTHETIC, split, index]);
        let s = self.image_size;
        let sf = s as f32;
        let normal = Normal::new(0.0f32, 1.0).expect("valid normal");

        // Background: a dim random colour with a random-orientation stripe texture.
        let bg: [f32; 3] = [
            rng.random_range(0.1..0.5),
            rng.random_range(0.1..0.5),
            rng.random_range(0.1..0.5),
        ];
        let theta: f32 = rng.random_range(0.0..std::f32::consts::PI);
        let freq: f32 = rng.random_range(0.2..1.2);
        let amp: f32 = rng.random_range(0.0..0.12);
        let (ct, st) = (theta.cos(), theta.sin());

        // Foreground: the class's shape and hue, with nuisance pose and colour.
        let shape = k % self.shapes();
        let hue = self.hue(k) + self.hue_jitter * normal.sample(&mut rng);
        let sat: f32 = rng.random_range(0.55..1.0);
        let val: f32 = rng.random_range(0.6..1.0);
        let fg = hsv_to_rgb(hue.rem_euclid(1.0), sat, val);
        let radius: f32 = rng.random_range(0.18..0.34) * sf;
        let cx: f32 = rng.random_range(0.3..0.7) * sf;
        let cy: f32 = rng.random_range(0.3..0.7) * sf;
        let rot: f32 = rng.random_range(-0.5..0.5);
        let (cr, sr) = (rot.cos(), rot.sin());
        let contrast: f32 = rng.random_range(0.8..1.2);

        let plane = s * s;
        for y in 0..s {
            for x in 0..s {
                let (px, py) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
                // Rotate into the shape's frame and normalise by its radius.
                let u = (cr * px + sr * py) / radius;
                let v = (-sr * px + cr * py) / radius;
                let inside = match shape {
                    0 => u * u + v * v <= 1.0,
                    1 => u.abs() <= 0.8 && v.abs() <= 0.8,
                    2 => v <= 0.7 && v >= -0.9 + 1.6 * u.abs() * 1.1,
                    3 => (u.abs() <= 0.3 && v.abs() <= 1.0) || (v.abs() <= 0.3 && u.abs() <= 1.0),
                    _ => {
                        let r2 = u * u + v * v;
                        (0.36..=1.0).contains(&r2)
                    }
                };
                let stripe = amp * (freq * (ct * x as f32 + st * y as f32)).sin();
                for ch in 0..3 {
                    let base = if inside { fg[ch] } else { bg[ch] + stripe };
                    let value =
                        0.5 + contrast * (base - 0.5) + self.noise * normal.sample(&mut rng);
                    out[ch * plane + y * s + x] = (value.clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
    }
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let (p, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
    match (i as i32).rem_euclid(6) {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_balanced_and_seed_dependent() {
        let spec = SyntheticSpec::default();
        let (info, labels, a) = spec.generate(7, 0, 40).unwrap();
        let (_, _, b) = spec.generate(7, 0, 40).unwrap();
        let (_, _, c) = spec.generate(8, 0, 40).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(info.classes.len(), 10);
        for k in 0..10 {
            assert_eq!(labels.iter().filter(|&&l| l == k).count(), 4);
        }
        // Images are not constant and use a good part of the range.
        let (lo, hi) = (a.iter().min().unwrap(), a.iter().max().unwrap());
        assert!(*lo < 40 && *hi > 200, "range {lo}..{hi}");
    }

    #[test]
    fn class_names_are_unique() {
        for classes in [2, 10, 37, 100] {
            let spec = SyntheticSpec {
                classes,
                ..Default::default()
            };
            let mut names = spec.class_names();
            names.sort();
            names.dedup();
            assert_eq!(names.len(), classes);
        }
    }

    #[test]
    fn rejects_bad_parameters() {
        let spec = SyntheticSpec {
            classes: 1,
            ..Default::default()
        };
        assert!(spec.validate().unwrap_err().to_string().contains("classes"));
    }
}
