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

/// Class weights from OGR values, as Gradient-Blending (Wang et al. 2020, where the OGR comes
/// from) weights its parts: w_k ∝ 1 / OGR_k, so a class that overfits more than it generalises
/// weighs less; OGR values are floored at 10⁻³ of their mean so that one class cannot take all
/// the weight, and the weights are scaled to mean 1 (the loss keeps its scale).
pub fn ogr_weights(ogr: &[f64]) -> Vec<f32> {
    let k = ogr.len();
    let mean = ogr.iter().sum::<f64>() / k as f64;
    let floor = (1e-3 * mean).max(1e-12);
    let inv: Vec<f64> = ogr.iter().map(|&o| 1.0 / o.max(floor)).collect();
    let total: f64 = inv.iter().sum();
    inv.iter().map(|&v| (v * k as f64 / total) as f32).collect()
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
        // w ∝ 1/OGR = (2.2222, 50), scaled to mean 1: (0.085106, 1.914894).
        let w = ogr_weights(&o);
        assert!(
            (w[0] - 0.085106).abs() < 1e-5 && (w[1] - 1.914894).abs() < 1e-5,
            "{w:?}"
        );
        assert!((w.iter().sum::<f32>() - 2.0).abs() < 1e-6);
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
