//! Batch-level augmentations that mix images: mixup, CutMix and RICAP, plus the per-image
//! Cutout hole. They follow the reference implementations (facebookresearch/mixup-cifar10,
//! clovaai/CutMix-PyTorch, jackryo/ricap, uoguelph-mlrg/Cutout), with height and width named
//! as such (the references call the row axis, `size()[2]`, W, but use it consistently, so they
//! too handle non-square images). RICAP's tiling is the reference's transposed, equal in
//! distribution (see [`draw`]).
//!
//! A mixing augmentation returns a [`MixRecord`]: the partners, weights and boxes it drew. The
//! trainer forms the mixed targets from it ([`MixRecord::mix_rows`]), and the same mixed batch can
//! be rebuilt later from the unmixed images ([`MixRecord::apply`]), e.g. to show it to a teacher.

use rand::seq::SliceRandom;
use rand::Rng;
use rand_distr::{Beta, Distribution};
use serde::{Deserialize, Serialize};

/// A batch-level mixing augmentation, configured in stages.toml as a table with a `type`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Mix {
    /// No mixing. (Braced, so that `deny_unknown_fields` refuses `p` or `alpha` on it: serde
    /// ignores unknown keys on an internally tagged unit variant. Serialised as `{ type = "none" }`
    /// either way.)
    None {},
    /// mixup (Zhang et al. 2018): `λ·x + (1−λ)·x[perm]`, λ ~ Beta(α, α).
    Mixup {
        /// Beta parameter (1 in the reference).
        #[serde(default = "one")]
        alpha: f64,
    },
    /// CutMix (Yun et al. 2019): a box of `x[perm]` pasted into `x`, with probability `p`.
    Cutmix {
        /// Beta parameter of λ (1 in the reference).
        #[serde(default = "one")]
        beta: f64,
        /// Probability of mixing a batch (0.5 in CutMix's CIFAR runs, the paper's stated default;
        /// its supplement's pseudocode mixes every batch, 1).
        #[serde(default = "half")]
        p: f64,
    },
    /// RICAP (Takahashi et al. 2018): four crops from four permutations tiled into one image.
    Ricap {
        /// Beta parameter of the boundary position (0.3 in the reference).
        #[serde(default = "ricap_beta")]
        beta: f64,
    },
}

impl Default for Mix {
    fn default() -> Self {
        Mix::None {}
    }
}

fn one() -> f64 {
    1.0
}
fn half() -> f64 {
    0.5
}
fn ricap_beta() -> f64 {
    0.3
}

impl Mix {
    /// Checks the parameters' ranges; on error returns the key and what was expected.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        let positive = |key: &'static str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err((key, format!("must be a positive number, found {v}")))
            }
        };
        match *self {
            Mix::None {} => Ok(()),
            Mix::Mixup { alpha } => positive("alpha", alpha),
            Mix::Cutmix { beta, p } => {
                positive("beta", beta)?;
                if (0.0..=1.0).contains(&p) {
                    Ok(())
                } else {
                    Err(("p", format!("must be a probability in [0, 1], found {p}")))
                }
            }
            Mix::Ricap { beta } => positive("beta", beta),
        }
    }

    /// The name used in stages.toml.
    pub fn as_str(&self) -> &'static str {
        match self {
            Mix::None {} => "none",
            Mix::Mixup { .. } => "mixup",
            Mix::Cutmix { .. } => "cutmix",
            Mix::Ricap { .. } => "ricap",
        }
    }
}

/// An axis-aligned box of pixels: rows `y..y + h`, columns `x..x + w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Rect {
    /// First row.
    pub y: usize,
    /// First column.
    pub x: usize,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
}

impl Rect {
    /// Pixels covered.
    pub fn area(&self) -> usize {
        self.h * self.w
    }
}

/// What a mixing augmentation did to a batch; slots are positions in the batch.
// One record per batch: the few hundred bytes of the RICAP variant are not worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub enum MixRecord {
    /// The batch is unmixed (also CutMix when its coin said no).
    #[default]
    None,
    /// Image `i` is `lambda · x[i] + (1 − lambda) · x[partner[i]]`.
    Mixup {
        /// Weight of the image itself.
        lambda: f32,
        /// Partner slot of each image.
        partner: Vec<u32>,
    },
    /// Image `i` is `x[i]` with `rect` replaced by the same box of `x[partner[i]]`.
    Cutmix {
        /// `1 − rect area / image area`: the weight of the image itself.
        lambda: f32,
        /// Partner slot of each image.
        partner: Vec<u32>,
        /// The pasted box (after clipping at the borders).
        rect: Rect,
    },
    /// Image `i` tiles four crops: crop `k` is the box `src[k]` of `x[partners[k][i]]`, placed
    /// at `dst[k]` (top-left, top-right, bottom-left, bottom-right).
    Ricap {
        /// Source slot of each image, per patch.
        partners: [Vec<u32>; 4],
        /// Patch area / image area, per patch (they sum to 1).
        weights: [f32; 4],
        /// Where each patch is read in its source image.
        src: [Rect; 4],
        /// Where each patch is written.
        dst: [Rect; 4],
    },
}

/// The (slot, weight) pairs of one image's target ([`MixRecord::components`]).
#[derive(Debug, Clone, Copy)]
pub struct Components {
    pairs: [(usize, f32); 4],
    len: usize,
}

impl std::ops::Deref for Components {
    type Target = [(usize, f32)];
    fn deref(&self) -> &[(usize, f32)] {
        &self.pairs[..self.len]
    }
}

impl IntoIterator for Components {
    type Item = (usize, f32);
    type IntoIter = std::iter::Take<std::array::IntoIter<(usize, f32), 4>>;
    fn into_iter(self) -> Self::IntoIter {
        self.pairs.into_iter().take(self.len)
    }
}

impl MixRecord {
    /// The (slot, weight) pairs whose labels make up image `i`'s target (one, two or four;
    /// returned in place, with no allocation, since targets are mixed every step).
    pub fn components(&self, i: usize) -> Components {
        let mut c = Components {
            pairs: [(0, 0.0); 4],
            len: 0,
        };
        let mut push = |slot: usize, w: f32| {
            c.pairs[c.len] = (slot, w);
            c.len += 1;
        };
        match self {
            MixRecord::None => push(i, 1.0),
            MixRecord::Mixup { lambda, partner }
            | MixRecord::Cutmix {
                lambda, partner, ..
            } => {
                push(i, *lambda);
                push(partner[i] as usize, 1.0 - lambda);
            }
            MixRecord::Ricap {
                partners, weights, ..
            } => {
                for k in 0..4 {
                    push(partners[k][i] as usize, weights[k]);
                }
            }
        }
        c
    }

    /// Mixes per-image rows (one-hot targets, teacher distributions, ...) of `k` values each, as
    /// the images were mixed: `out[i] = Σ weight · rows[slot]` over [`MixRecord::components`].
    pub fn mix_rows(&self, rows: &[f32], k: usize, out: &mut Vec<f32>) {
        let n = rows.len() / k;
        out.clear();
        out.resize(rows.len(), 0.0);
        for i in 0..n {
            let dst = &mut out[i * k..(i + 1) * k];
            for (slot, w) in self.components(i) {
                for (o, r) in dst.iter_mut().zip(&rows[slot * k..(slot + 1) * k]) {
                    *o += w * r;
                }
            }
        }
    }

    /// Rebuilds the mixed batch into `out` from the unmixed images `src` (`n × c × h × w`).
    pub fn apply(&self, src: &[f32], out: &mut [f32], (c, h, w): (usize, usize, usize)) {
        let len = c * h * w;
        match self {
            MixRecord::None => out.copy_from_slice(src),
            MixRecord::Mixup { lambda, partner } => {
                let (a, b) = (*lambda, 1.0 - lambda);
                for (i, dst) in out.chunks_exact_mut(len).enumerate() {
                    let x = &src[i * len..(i + 1) * len];
                    let j = partner[i] as usize;
                    let y = &src[j * len..(j + 1) * len];
                    for ((o, &p), &q) in dst.iter_mut().zip(x).zip(y) {
                        *o = a * p + b * q;
                    }
                }
            }
            MixRecord::Cutmix { partner, rect, .. } => {
                out.copy_from_slice(src);
                for (i, dst) in out.chunks_exact_mut(len).enumerate() {
                    let j = partner[i] as usize;
                    copy_rect(&src[j * len..(j + 1) * len], dst, (c, h, w), *rect, *rect);
                }
            }
            MixRecord::Ricap {
                partners,
                src: from,
                dst: to,
                ..
            } => {
                for (i, dst) in out.chunks_exact_mut(len).enumerate() {
                    for k in 0..4 {
                        let j = partners[k][i] as usize;
                        copy_rect(&src[j * len..(j + 1) * len], dst, (c, h, w), from[k], to[k]);
                    }
                }
            }
        }
    }
}

/// Copies box `from` of image `src` to box `to` (same size) of image `dst`, every channel.
fn copy_rect(src: &[f32], dst: &mut [f32], (c, h, w): (usize, usize, usize), from: Rect, to: Rect) {
    debug_assert_eq!((from.h, from.w), (to.h, to.w));
    for ch in 0..c {
        for r in 0..from.h {
            let s = ch * h * w + (from.y + r) * w + from.x;
            let d = ch * h * w + (to.y + r) * w + to.x;
            dst[d..d + from.w].copy_from_slice(&src[s..s + from.w]);
        }
    }
}

fn beta<R: Rng>(rng: &mut R, a: f64) -> f64 {
    Beta::new(a, a)
        .expect("validated beta parameter")
        .sample(rng)
}

fn permutation<R: Rng>(rng: &mut R, n: usize) -> Vec<u32> {
    let mut p: Vec<u32> = (0..n as u32).collect();
    p.shuffle(rng);
    p
}

/// Draws the mixing of a batch of `n` images of `h × w` pixels.
pub fn draw<R: Rng>(mix: &Mix, n: usize, (h, w): (usize, usize), rng: &mut R) -> MixRecord {
    match *mix {
        Mix::None {} => MixRecord::None,
        Mix::Mixup { alpha } => {
            let lambda = beta(rng, alpha) as f32;
            MixRecord::Mixup {
                lambda,
                partner: permutation(rng, n),
            }
        }
        Mix::Cutmix { beta: b, p } => {
            // The reference draws the coin first and nothing else when it says no.
            if rng.random::<f64>() >= p {
                return MixRecord::None;
            }
            let lam = beta(rng, b);
            let partner = permutation(rng, n);
            let cut = (1.0 - lam).sqrt();
            let (cut_h, cut_w) = ((h as f64 * cut) as usize, (w as f64 * cut) as usize);
            let (cy, cx) = (rng.random_range(0..h), rng.random_range(0..w));
            let y1 = cy.saturating_sub(cut_h / 2);
            let y2 = (cy + cut_h / 2).min(h);
            let x1 = cx.saturating_sub(cut_w / 2);
            let x2 = (cx + cut_w / 2).min(w);
            let rect = Rect {
                y: y1,
                x: x1,
                h: y2 - y1,
                w: x2 - x1,
            };
            MixRecord::Cutmix {
                lambda: 1.0 - rect.area() as f32 / (h * w) as f32,
                partner,
                rect,
            }
        }
        Mix::Ricap { beta: b } => {
            // Transposed from the reference, the one place the module's naming is not followed:
            // its first Beta draw splits the rows (its `I_x` is `size()[2]`) and its patch 1
            // lies below patch 0, its row offset drawn before the column offset; here the first
            // draw splits the columns, patch 1 lies to the right and the column offset comes
            // first. The draws are independent and identically distributed, so the mixed
            // batches and targets have the same distribution; only a draw-for-draw replay of
            // the reference's stream would give the transposed tiling. Kept so that existing
            // RICAP runs keep their streams.
            let pw = ((w as f64) * beta(rng, b)).round() as usize;
            let ph = ((h as f64) * beta(rng, b)).round() as usize;
            let ws = [pw, w - pw, pw, w - pw];
            let hs = [ph, ph, h - ph, h - ph];
            let origins = [(0, 0), (0, pw), (ph, 0), (ph, pw)];
            let mut partners: [Vec<u32>; 4] = Default::default();
            let mut src = [Rect::default(); 4];
            let mut dst = [Rect::default(); 4];
            let mut weights = [0f32; 4];
            for k in 0..4 {
                partners[k] = permutation(rng, n);
                // Inclusive upper bounds, as the reference's randint(0, I - w + 1).
                let x = rng.random_range(0..=w - ws[k]);
                let y = rng.random_range(0..=h - hs[k]);
                src[k] = Rect {
                    y,
                    x,
                    h: hs[k],
                    w: ws[k],
                };
                dst[k] = Rect {
                    y: origins[k].0,
                    x: origins[k].1,
                    h: hs[k],
                    w: ws[k],
                };
                weights[k] = (hs[k] * ws[k]) as f32 / (h * w) as f32;
            }
            MixRecord::Ricap {
                partners,
                weights,
                src,
                dst,
            }
        }
    }
}

/// Cutout (DeVries & Taylor 2017): zeroes a `size × size` square of every channel, centred
/// uniformly over the image and clipped at the borders. Applied after normalisation, so the hole
/// is the value 0 of the normalised image, as in the reference. Returns the clipped hole.
pub fn cutout<R: Rng>(
    img: &mut [f32],
    (c, h, w): (usize, usize, usize),
    size: usize,
    rng: &mut R,
) -> Rect {
    let (cy, cx) = (rng.random_range(0..h), rng.random_range(0..w));
    let y1 = cy.saturating_sub(size / 2);
    let y2 = (cy + size / 2).min(h);
    let x1 = cx.saturating_sub(size / 2);
    let x2 = (cx + size / 2).min(w);
    for ch in 0..c {
        for y in y1..y2 {
            img[ch * h * w + y * w + x1..ch * h * w + y * w + x2].fill(0.0);
        }
    }
    Rect {
        y: y1,
        x: x1,
        h: y2 - y1,
        w: x2 - x1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A batch whose every pixel names its image: image i is filled with i + 1.
    fn batch(n: usize, (c, h, w): (usize, usize, usize)) -> Vec<f32> {
        (0..n)
            .flat_map(|i| std::iter::repeat_n((i + 1) as f32, c * h * w))
            .collect()
    }

    fn weight_sums(rec: &MixRecord, n: usize) {
        for i in 0..n {
            let s: f32 = rec.components(i).iter().map(|c| c.1).sum();
            assert!((s - 1.0).abs() < 1e-6, "weights of image {i} sum to {s}");
        }
    }

    #[test]
    fn mixup_blends_with_a_permutation() {
        let shape = (2, 4, 5);
        let src = batch(6, shape);
        for seed in 0..20 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let rec = draw(&Mix::Mixup { alpha: 1.0 }, 6, (4, 5), &mut rng);
            let MixRecord::Mixup { lambda, partner } = &rec else {
                panic!("mixup record")
            };
            assert!((0.0..=1.0).contains(lambda));
            let mut sorted = partner.clone();
            sorted.sort();
            assert_eq!(sorted, (0..6).collect::<Vec<_>>());
            weight_sums(&rec, 6);
            let mut out = vec![0.0; src.len()];
            rec.apply(&src, &mut out, shape);
            for i in 0..6 {
                let want = lambda * (i + 1) as f32 + (1.0 - lambda) * (partner[i] + 1) as f32;
                assert!(out[i * 40..(i + 1) * 40]
                    .iter()
                    .all(|v| (v - want).abs() < 1e-5));
            }
        }
    }

    #[test]
    fn cutmix_lambda_is_the_true_unpasted_area() {
        let shape = (3, 8, 6);
        let src = batch(5, shape);
        let mut mixed_batches = 0;
        for seed in 0..200 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let rec = draw(&Mix::Cutmix { beta: 1.0, p: 0.5 }, 5, (8, 6), &mut rng);
            let mut out = vec![0.0; src.len()];
            rec.apply(&src, &mut out, shape);
            let MixRecord::Cutmix {
                lambda,
                partner,
                rect,
            } = &rec
            else {
                assert_eq!(rec, MixRecord::None);
                assert_eq!(out, src);
                continue;
            };
            mixed_batches += 1;
            assert!(rect.y + rect.h <= 8 && rect.x + rect.w <= 6);
            weight_sums(&rec, 5);
            for i in 0..5 {
                let img = &out[i * 144..(i + 1) * 144];
                let j = partner[i] as usize;
                // Count the pixels that came from the partner (where the two differ).
                if j != i {
                    let pasted = img.iter().filter(|v| **v == (j + 1) as f32).count();
                    assert_eq!(pasted, 3 * rect.area());
                    let own = img.iter().filter(|v| **v == (i + 1) as f32).count() as f32;
                    assert!((own / 144.0 - lambda).abs() < 1e-6);
                }
            }
        }
        // p = 0.5 mixes about half of the batches.
        assert!((70..130).contains(&mixed_batches), "{mixed_batches}");
    }

    #[test]
    fn cutmix_with_p_one_always_mixes_and_p_zero_never() {
        for seed in 0..20 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let always = draw(&Mix::Cutmix { beta: 1.0, p: 1.0 }, 4, (8, 8), &mut rng);
            assert!(matches!(always, MixRecord::Cutmix { .. }));
            let never = draw(&Mix::Cutmix { beta: 1.0, p: 0.0 }, 4, (8, 8), &mut rng);
            assert_eq!(never, MixRecord::None);
        }
    }

    #[test]
    fn ricap_weights_are_patch_areas_and_tile_the_image() {
        let shape = (2, 7, 9);
        let src = batch(4, shape);
        let mut zero_size = false;
        for seed in 0..300 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let rec = draw(&Mix::Ricap { beta: 0.3 }, 4, (7, 9), &mut rng);
            let MixRecord::Ricap {
                partners,
                weights,
                src: from,
                dst,
            } = &rec
            else {
                panic!("ricap record")
            };
            weight_sums(&rec, 4);
            let mut covered = 0;
            for k in 0..4 {
                assert_eq!(weights[k], dst[k].area() as f32 / 63.0);
                assert!(from[k].y + from[k].h <= 7 && from[k].x + from[k].w <= 9);
                covered += dst[k].area();
                zero_size |= dst[k].area() == 0;
            }
            assert_eq!(covered, 63);
            let mut out = vec![0.0; src.len()];
            rec.apply(&src, &mut out, shape);
            for i in 0..4 {
                let img = &out[i * 126..(i + 1) * 126];
                for k in 0..4 {
                    let j = partners[k][i] as usize;
                    for ch in 0..2 {
                        for y in dst[k].y..dst[k].y + dst[k].h {
                            for x in dst[k].x..dst[k].x + dst[k].w {
                                assert_eq!(img[ch * 63 + y * 9 + x], (j + 1) as f32);
                            }
                        }
                    }
                }
            }
        }
        // β = 0.3 puts the boundary at the border often enough to see an empty patch.
        assert!(zero_size);
    }

    #[test]
    fn mixed_rows_follow_the_components() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let rec = draw(&Mix::Ricap { beta: 0.3 }, 3, (8, 8), &mut rng);
        let onehot = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0];
        let mut out = Vec::new();
        rec.mix_rows(&onehot, 3, &mut out);
        for i in 0..3 {
            let row = &out[i * 3..(i + 1) * 3];
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            let mut want = [0.0f32; 3];
            for (slot, w) in rec.components(i) {
                want[slot] += w;
            }
            assert_eq!(row, want);
        }
    }

    #[test]
    fn cutout_clips_at_the_borders() {
        let (c, h, w) = (2, 6, 6);
        let mut clipped = false;
        for seed in 0..100 {
            let mut img = vec![1.0f32; c * h * w];
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let hole = cutout(&mut img, (c, h, w), 4, &mut rng);
            assert!(hole.y + hole.h <= h && hole.x + hole.w <= w);
            assert!(hole.h <= 4 && hole.w <= 4 && hole.h >= 2 && hole.w >= 2);
            clipped |= hole.area() < 16;
            let zeros = img.iter().filter(|v| **v == 0.0).count();
            assert_eq!(zeros, c * hole.area());
            for y in 0..h {
                for x in 0..w {
                    let inside = (hole.y..hole.y + hole.h).contains(&y)
                        && (hole.x..hole.x + hole.w).contains(&x);
                    assert_eq!(img[y * w + x] == 0.0, inside);
                }
            }
        }
        assert!(clipped);
    }

    #[test]
    fn same_seed_same_draw() {
        for mix in [
            Mix::Mixup { alpha: 1.0 },
            Mix::Cutmix { beta: 1.0, p: 1.0 },
            Mix::Ricap { beta: 0.3 },
        ] {
            let a = draw(&mix, 16, (32, 32), &mut ChaCha8Rng::seed_from_u64(3));
            let b = draw(&mix, 16, (32, 32), &mut ChaCha8Rng::seed_from_u64(3));
            let c = draw(&mix, 16, (32, 32), &mut ChaCha8Rng::seed_from_u64(4));
            assert_eq!(a, b);
            assert_ne!(a, c);
        }
    }

    #[test]
    fn validation_names_the_key() {
        assert_eq!(Mix::Mixup { alpha: 0.0 }.validate().unwrap_err().0, "alpha");
        assert_eq!(
            Mix::Cutmix { beta: 1.0, p: 1.5 }.validate().unwrap_err().0,
            "p"
        );
        assert!(Mix::Ricap { beta: 0.3 }.validate().is_ok());
    }
}
