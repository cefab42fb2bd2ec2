//! OGR, the overfitting-to-generalisation ratio of the supplement (§6): per-class losses
//! measured during training, the ratio between two measurements, the class weights of
//! `ogr-loss` and the label distributions of `ogr-ldl`.

use serde::{Deserialize, Serialize};

/// The OGR weights normalised to a distribution over classes (w̃ = w / Σ w).
pub fn ogr_distribution_base(weights: &[f32]) -> Vec<f32> {
    let sum: f32 = weights.iter().sum();
    weights.iter().map(|w| w / sum).collect()
}

/// The OGR label distribution of class `label`: (1 − α)·e_y + α·w̃, i.e. label smoothing whose
/// mass α is spread over the classes in proportion to their OGR weights w̃ (which sum to 1), so
/// classes that generalise well take more of it. Sums to 1.
pub fn ogr_target(label: usize, alpha: f32, dist: &[f32], out: &mut [f32]) {
    for (o, &d) in out.iter_mut().zip(dist) {
        *o = alpha * d;
    }
    out[label] += 1.0 - alpha;
}

/// One OGR measurement: mean loss of each class over the (un-augmented) training split and over
/// the validation split, in eval mode, at the start of `epoch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OgrPoint {
    /// Epochs trained when measured.
    pub epoch: usize,
    /// Per-class mean training loss.
    pub train: Vec<f64>,
    /// Per-class mean validation loss.
    pub val: Vec<f64>,
}

/// Per-class OGR between two measurements N (`a`) and N + n (`b`), the supplement's formula
/// OGR_k = ((L_val,N+n − L_train,N+n) − (L_val,N − L_train,N))² / |L_val,N+n − L_val,N|:
/// the squared growth of the overfitting gap over the change of the validation loss. The
/// absolute value in the denominator is our reading: the validation loss usually falls, and a
/// negative ratio has no meaning as a weight.
pub fn ogr(a: &OgrPoint, b: &OgrPoint) -> Vec<f64> {
    (0..a.train.len())
        .map(|k| {
            let gap = (b.val[k] - b.train[k]) - (a.val[k] - a.train[k]);
            gap * gap / (b.val[k] - a.val[k]).abs().max(1e-12)
        })
        .collect()
}

/// How far apart the OGR weights may be: before scaling, each class's weight lies in
/// [1/B, B] around the median class's 1, so no class weighs more than B² times another.
pub const OGR_WEIGHT_BAND: f64 = 4.0;

/// Class weights from OGR values. Gradient-Blending (Wang et al. 2020, where the OGR comes from)
/// weights each part by the inverse of its OGR, so a class that overfits more than it generalises
/// weighs less: w_k ∝ 1 / OGR_k. Raw inverses are heavy-tailed (a class whose validation loss
/// barely moved has a tiny OGR and takes almost all the weight), so the inverse is taken
/// relative to the median class and clipped to the band [1/B, B] ([`OGR_WEIGHT_BAND`]), then the
/// weights are scaled to mean 1 (the loss keeps its scale). One class's share of the total is
/// then at most B² / (B² + K − 1). A non-finite OGR gets the median's weight.
pub fn ogr_weights(ogr: &[f64]) -> Vec<f32> {
    let k = ogr.len();
    if k == 0 {
        return Vec::new();
    }
    let tiny = 1e-12;
    let mut finite: Vec<f64> = ogr.iter().copied().filter(|o| o.is_finite()).collect();
    finite.sort_by(f64::total_cmp);
    let median = match finite.len() {
        0 => 1.0,
        n if n % 2 == 1 => finite[n / 2],
        n => 0.5 * (finite[n / 2 - 1] + finite[n / 2]),
    }
    .max(tiny);
    let band = OGR_WEIGHT_BAND;
    let ratios: Vec<f64> = ogr
        .iter()
        .map(|&o| {
            if o.is_finite() {
                (median / o.max(tiny)).clamp(1.0 / band, band)
            } else {
                1.0
            }
        })
        .collect();
    let total: f64 = ratios.iter().sum();
    ratios
        .iter()
        .map(|&r| (r * k as f64 / total) as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ogr_by_hand() {
        // Class 0: gap 0.1 → 0.4 (grew 0.3), val 1.0 → 0.8 (|Δ| 0.2): OGR = 0.09 / 0.2 = 0.45.
        // Class 1: gap 0.1 → 0.2 (grew 0.1), val 1.0 → 0.5 (|Δ| 0.5): OGR = 0.01 / 0.5 = 0.02.
        let a = OgrPoint {
            epoch: 0,
            train: vec![0.9, 0.9],
            val: vec![1.0, 1.0],
        };
        let b = OgrPoint {
            epoch: 10,
            train: vec![0.4, 0.3],
            val: vec![0.8, 0.5],
        };
        let o = ogr(&a, &b);
        assert!(
            (o[0] - 0.45).abs() < 1e-12 && (o[1] - 0.02).abs() < 1e-12,
            "{o:?}"
        );
        // Median (0.45 + 0.02)/2 = 0.235; median/OGR = (0.522222, 11.75), the second clipped
        // to B = 4; scaled to mean 1: 2·(0.522222, 4)/4.522222 = (0.230958, 1.769042).
        let w = ogr_weights(&o);
        assert!(
            (w[0] - 0.230958).abs() < 1e-5 && (w[1] - 1.769042).abs() < 1e-5,
            "{w:?}"
        );
        assert!((w.iter().sum::<f32>() - 2.0).abs() < 1e-6);
    }

    #[test]
    fn odd_counts_and_non_finite_values() {
        // K = 3, OGR (1, 2, NaN): median of the finite values 1.5 → ratios (1.5, 0.75, 1 for
        // NaN), sum 3.25, weights 3·(1.5, 0.75, 1)/3.25 = (1.384615, 0.692308, 0.923077).
        let w = ogr_weights(&[1.0, 2.0, f64::NAN]);
        let want = [1.384615f32, 0.692308, 0.923077];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{w:?}");
        }
        // K = 3, OGR (0.1, 0.2, 100): median 0.2 → (2, 1, 0.002 clipped to 0.25), sum 3.25.
        let w = ogr_weights(&[0.1, 0.2, 100.0]);
        let want = [1.846154f32, 0.923077, 0.230769];
        for (a, b) in w.iter().zip(want) {
            assert!((a - b).abs() < 1e-5, "{w:?}");
        }
    }

    /// Per-class losses as a CIFAR-100 run produces them between two measurements ten epochs
    /// apart: training losses fall by 30–60%, validation losses by 0.05–1.2 nats, so for a few
    /// classes the overfitting gap barely moves: their OGR is tiny, the case that made the raw
    /// inverse put nearly all the weight on them.
    fn simulated_points(seed: u64, k: usize) -> (OgrPoint, OgrPoint) {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let (mut a, mut b) = (
            OgrPoint {
                epoch: 10,
                train: vec![],
                val: vec![],
            },
            OgrPoint {
                epoch: 20,
                train: vec![],
                val: vec![],
            },
        );
        for _ in 0..k {
            let train0 = rng.random_range(1.5..3.0);
            let val0 = train0 + rng.random_range(0.05..0.4);
            let train1 = train0 * rng.random_range(0.4..0.7);
            let val_drop = rng.random_range(0.05..1.2);
            a.train.push(train0);
            a.val.push(val0);
            b.train.push(train1);
            b.val.push(val0 - val_drop);
        }
        (a, b)
    }

    #[test]
    fn no_class_takes_more_than_its_bounded_share_on_realistic_ogr() {
        let k = 100;
        let band = OGR_WEIGHT_BAND;
        let max_share = band * band / (band * band + (k as f64 - 1.0));
        for seed in 0..20 {
            let (a, b) = simulated_points(seed, k);
            let o = ogr(&a, &b);
            let w = ogr_weights(&o);
            let total: f64 = w.iter().map(|&x| x as f64).sum();
            assert!((total - k as f64).abs() < 1e-3, "mean 1: {total}");
            let mut shares: Vec<f64> = w.iter().map(|&x| x as f64 / total).collect();
            shares.sort_by(|x, y| y.total_cmp(x));
            // The bound B²/(B² + K − 1) = 16/115 ≈ 13.9% holds for any vector; on realistic
            // ones the largest share is near B/K (the clip over the median's 1/K).
            assert!(shares[0] <= max_share + 1e-6, "seed {seed}: {}", shares[0]);
            assert!(
                shares[0] <= 0.05,
                "seed {seed}: largest share {}",
                shares[0]
            );
            let top5: f64 = shares[..5].iter().sum();
            assert!(top5 <= 0.2, "seed {seed}: top-5 share {top5}");
            // The raw inverse with a floor at 10⁻³ of the mean (the earlier weighting) on the
            // same vector: the top 5 classes take a third of the weight or more.
            let mean = o.iter().sum::<f64>() / k as f64;
            let inv: Vec<f64> = o.iter().map(|&x| 1.0 / x.max(1e-3 * mean)).collect();
            let inv_total: f64 = inv.iter().sum();
            let mut raw: Vec<f64> = inv.iter().map(|x| x / inv_total).collect();
            raw.sort_by(|x, y| y.total_cmp(x));
            assert!(
                raw[..5].iter().sum::<f64>() > 0.3,
                "seed {seed}: raw top-5 {:?}",
                &raw[..5]
            );
        }
    }

    #[test]
    fn ogr_targets_sum_to_one() {
        let dist = ogr_distribution_base(&[0.5, 1.5, 1.0, 1.0]);
        assert_eq!(dist, [0.125, 0.375, 0.25, 0.25]);
        let mut z = [0f32; 4];
        ogr_target(2, 0.1, &dist, &mut z);
        // 0.1·w̃ everywhere, plus 0.9 on class 2.
        let want = [0.0125, 0.0375, 0.925, 0.025];
        for (a, b) in z.iter().zip(want) {
            assert!((a - b).abs() < 1e-7, "{z:?}");
        }
        assert!((z.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}
