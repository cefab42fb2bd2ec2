//! Training losses, all computed through log-softmax for numerical stability: the batch losses
//! (averaged over the batch) and the per-sample losses the training methods are built from
//! (docs/methods.md gives each method's formula).

use candle_core::{Result, Tensor, D};
use candle_nn::ops::log_softmax;

/// Cross-entropy with hard labels: −log softmax(s)[y], mean over the batch.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    candle_nn::loss::cross_entropy(logits, labels)
}

/// Soft-target cross-entropy −Σ_k z_k log softmax(s)_k, mean over the batch; `targets` is
/// `N × K` with rows summing to 1.
pub fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    soft_cross_entropy_per_sample(logits, targets)?.mean_all()
}

/// Knowledge-distillation loss (Hinton et al.): τ² · KL(softmax(t/τ) ‖ softmax(s/τ)), summed over
/// classes and averaged over the batch, computed from log-softmaxes so that it stays finite for
/// large logits; the τ² keeps gradient magnitudes comparable across temperatures.
pub fn kl_divergence(student: &Tensor, teacher: &Tensor, tau: f64) -> Result<Tensor> {
    let log_q = log_softmax(&(student / tau)?, D::Minus1)?;
    let log_p = log_softmax(&(teacher / tau)?, D::Minus1)?;
    let kl = (log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)?;
    kl.mean_all()? * (tau * tau)
}

/// Hard cross-entropy of each sample, `N` values (for per-class loss curves).
pub fn cross_entropy_per_sample(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logp = log_softmax(logits, D::Minus1)?;
    logp.gather(&labels.unsqueeze(1)?, 1)?.squeeze(1)?.neg()
}

/// Soft-target cross-entropy of each sample, `N` values.
pub fn soft_cross_entropy_per_sample(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logp = log_softmax(logits, D::Minus1)?;
    (targets * logp)?.sum(D::Minus1)?.neg()
}

/// How label smoothing spreads its mass α.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SmoothingConvention {
    /// The paper's eq. (2): 1 − α on the true class, α/(K − 1) on every other class.
    #[default]
    Paper,
    /// The common (Szegedy et al., PyTorch `label_smoothing`) convention: α/K added to every
    /// class, 1 − α + α/K on the true class.
    Uniform,
}

/// The label-smoothing target of class `label` among `out.len()` classes, into `out`.
pub fn smoothed_target(label: usize, alpha: f32, convention: SmoothingConvention, out: &mut [f32]) {
    let k = out.len();
    match convention {
        SmoothingConvention::Paper if k > 1 => {
            out.fill(alpha / (k - 1) as f32);
            out[label] = 1.0 - alpha;
        }
        SmoothingConvention::Paper => out[label] = 1.0,
        SmoothingConvention::Uniform => {
            out.fill(alpha / k as f32);
            out[label] = 1.0 - alpha + alpha / k as f32;
        }
    }
}

/// How the KD term is reduced over classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KdReduction {
    /// Summed over classes, averaged over the batch (Hinton; RepDistiller's `DistillKL`;
    /// PyTorch `KLDivLoss(reduction="batchmean")`).
    #[default]
    Batchmean,
    /// Averaged over classes and batch (PyTorch `KLDivLoss()`'s default `"mean"`, reportedly
    /// what the paper's code used): K times weaker.
    Mean,
}

/// τ² · KL(softmax(t/τ) ‖ softmax(s/τ)) of each sample (`N` values), summed over classes, or
/// divided by K with [`KdReduction::Mean`]. `teacher` should be detached.
pub fn kd_per_sample(
    student: &Tensor,
    teacher: &Tensor,
    tau: f64,
    reduction: KdReduction,
) -> Result<Tensor> {
    let log_q = log_softmax(&(student / tau)?, D::Minus1)?;
    let log_p = log_softmax(&(teacher / tau)?, D::Minus1)?;
    let kl = (log_p.exp()? * (log_p - log_q)?)?.sum(D::Minus1)?;
    let k = student.dim(D::Minus1)? as f64;
    match reduction {
        KdReduction::Batchmean => kl * (tau * tau),
        KdReduction::Mean => kl * (tau * tau / k),
    }
}

/// The WSL (weighted soft labels, Zhou et al. 2021) term of each sample, as its reference
/// implementation computes it: τ² · w · (−Σ_k softmax(t/τ)_k log softmax(s/τ)_k) with the
/// per-sample weight w = 1 − exp(−max(CE_s / (CE_t + 1e-7), 0)), where CE_s and CE_t are the
/// student's and the teacher's cross-entropies with `targets` (the one-hot, or mixed, hard label)
/// at temperature 1, computed on detached logits so that w is a constant.
pub fn wsl_per_sample(
    student: &Tensor,
    teacher: &Tensor,
    targets: &Tensor,
    tau: f64,
) -> Result<Tensor> {
    let soft_t = candle_nn::ops::softmax(&(teacher / tau)?, D::Minus1)?;
    let soft = soft_cross_entropy_per_sample(&(student / tau)?, &soft_t)?;
    let ce_s = soft_cross_entropy_per_sample(&student.detach(), targets)?;
    let ce_t = soft_cross_entropy_per_sample(&teacher.detach(), targets)?;
    let ratio = (ce_s / (ce_t + 1e-7)?)?.relu()?;
    let weight = (1.0 - ratio.neg()?.exp()?)?;
    (weight * soft)? * (tau * tau)
}

/// Class-weighted soft cross-entropy of each sample, −Σ_k w_k z_k log softmax(s)_k (`weights`:
/// `K` values): with a one-hot z, the true class's weight times the cross-entropy.
pub fn weighted_soft_cross_entropy_per_sample(
    logits: &Tensor,
    targets: &Tensor,
    weights: &Tensor,
) -> Result<Tensor> {
    let logp = log_softmax(logits, D::Minus1)?;
    (targets.broadcast_mul(&weights.unsqueeze(0)?)? * logp)?
        .sum(D::Minus1)?
        .neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn values_by_hand() {
        // logits (0, ln 3): softmax = (1/4, 3/4).
        let logits = Tensor::new(&[[0.0f32, 3f32.ln()]], &Device::Cpu).unwrap();
        let hard = cross_entropy(&logits, &Tensor::new(&[1u32], &Device::Cpu).unwrap()).unwrap();
        assert!((hard.to_scalar::<f32>().unwrap() - (4.0f32 / 3.0).ln()).abs() < 1e-6);
        // targets (1/2, 1/2): −(½ ln ¼ + ½ ln ¾) = ln 4 − ½ ln 3.
        let z = Tensor::new(&[[0.5f32, 0.5]], &Device::Cpu).unwrap();
        let soft = soft_cross_entropy(&logits, &z)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            (soft - (4f32.ln() - 0.5 * 3f32.ln())).abs() < 1e-6,
            "{soft}"
        );
        // A one-hot soft target equals hard cross-entropy; large logits stay finite.
        let big = Tensor::new(&[[1000.0f32, 0.0]], &Device::Cpu).unwrap();
        let onehot = Tensor::new(&[[0.0f32, 1.0]], &Device::Cpu).unwrap();
        let v = soft_cross_entropy(&big, &onehot)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((v - 1000.0).abs() < 1e-3, "{v}");
    }

    #[test]
    fn temperature_kl_by_hand() {
        let d = &Device::Cpu;
        // τ = 2: teacher logits (0, 2 ln 3) → p = (1/4, 3/4); student logits (0, 0) → q = (½, ½).
        // KL = ¼ ln(½) + ¾ ln(3/2); times τ² = 4.
        let t = Tensor::new(&[[0.0f32, 2.0 * 3f32.ln()]], d).unwrap();
        let s = Tensor::new(&[[0.0f32, 0.0]], d).unwrap();
        let v = kl_divergence(&s, &t, 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = 4.0 * (0.25 * 0.5f32.ln() + 0.75 * 1.5f32.ln());
        assert!((v - want).abs() < 1e-6, "{v} vs {want}");
        // Identical distributions: 0; averaged over the batch; finite for huge logits.
        let two = Tensor::new(&[[1.0f32, -1.0], [900.0, 0.0]], d).unwrap();
        let z = kl_divergence(&two, &two, 4.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(z.abs() < 1e-6, "{z}");
        let batch = Tensor::new(&[[0.0f32, 0.0], [0.0, 0.0]], d).unwrap();
        let tt = Tensor::new(&[[0.0f32, 2.0 * 3f32.ln()], [0.0, 2.0 * 3f32.ln()]], d).unwrap();
        let m = kl_divergence(&batch, &tt, 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((m - want).abs() < 1e-6);
    }

    #[test]
    fn per_sample_losses_average_to_the_batch_loss() {
        let d = &Device::Cpu;
        let logits = Tensor::new(&[[0.0f32, 3f32.ln()], [2.0, -1.0], [500.0, 0.0]], d).unwrap();
        let labels = Tensor::new(&[1u32, 0, 1], d).unwrap();
        let per = cross_entropy_per_sample(&logits, &labels)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((per[0] - (4.0f32 / 3.0).ln()).abs() < 1e-6);
        assert!((per[1] - (1.0 + (-3f32).exp()).ln()).abs() < 1e-6);
        assert!((per[2] - 500.0).abs() < 1e-3);
        let mean = cross_entropy(&logits, &labels)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((mean - per.iter().sum::<f32>() / 3.0).abs() < 1e-4);
        let onehot = Tensor::new(&[[0.0f32, 1.0], [1.0, 0.0], [0.0, 1.0]], d).unwrap();
        let soft = soft_cross_entropy_per_sample(&logits, &onehot)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in soft.iter().zip(&per) {
            assert!((a - b).abs() < 1e-4);
        }
    }

    #[test]
    fn label_smoothing_by_hand() {
        // K = 4, α = 0.1, true class 2. Paper, eq. (2): 0.9 on it, 0.1/3 elsewhere.
        let mut z = [0f32; 4];
        smoothed_target(2, 0.1, SmoothingConvention::Paper, &mut z);
        assert_eq!(z, [0.1 / 3.0, 0.1 / 3.0, 0.9, 0.1 / 3.0]);
        // Uniform: 0.1/4 = 0.025 everywhere, 1 − 0.1 + 0.025 = 0.925 on the true class.
        smoothed_target(2, 0.1, SmoothingConvention::Uniform, &mut z);
        for (a, b) in z.iter().zip([0.025f32, 0.025, 0.925, 0.025]) {
            assert!((a - b).abs() < 1e-7, "{z:?}");
        }
        for conv in [SmoothingConvention::Paper, SmoothingConvention::Uniform] {
            for k in [2usize, 3, 10, 100] {
                let mut z = vec![0f32; k];
                smoothed_target(k - 1, 0.1, conv, &mut z);
                assert!((z.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{conv:?} K={k}");
            }
        }
    }

    #[test]
    fn kd_by_hand() {
        let d = &Device::Cpu;
        // τ = 2: teacher (0, 2 ln 3)/2 → p = (1/4, 3/4); student (0, 0) → q = (½, ½).
        // KL = ¼ ln(½) + ¾ ln(3/2) = 0.130812; × τ² = 0.523248; "mean" divides by K = 2.
        let t = Tensor::new(&[[0.0f32, 2.0 * 3f32.ln()]], d).unwrap();
        let s = Tensor::new(&[[0.0f32, 0.0]], d).unwrap();
        let kl = 0.25 * 0.5f32.ln() + 0.75 * 1.5f32.ln();
        let v = kd_per_sample(&s, &t, 2.0, KdReduction::Batchmean)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((v[0] - 4.0 * kl).abs() < 1e-6, "{v:?}");
        assert!((v[0] - 0.523248).abs() < 1e-5, "{v:?}");
        let m = kd_per_sample(&s, &t, 2.0, KdReduction::Mean)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((m[0] - 2.0 * kl).abs() < 1e-6, "{m:?}");
    }

    #[test]
    fn wsl_by_hand() {
        let d = &Device::Cpu;
        // Label 1. Student logits (0, 0): q = (½, ½), CE_s = ln 2.
        // Teacher logits (0, ln 3): p = (¼, ¾), CE_t = ln(4/3).
        // w = 1 − exp(−ln 2 / ln(4/3)) = 1 − exp(−2.409421) = 0.910136.
        // τ = 1: soft term −(¼ ln ½ + ¾ ln ½) = ln 2; loss = w ln 2 = 0.630855.
        let s = Tensor::new(&[[0.0f32, 0.0]], d).unwrap();
        let t = Tensor::new(&[[0.0f32, 3f32.ln()]], d).unwrap();
        let y = Tensor::new(&[[0.0f32, 1.0]], d).unwrap();
        let v = wsl_per_sample(&s, &t, &y, 1.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let w = 1.0 - (-(2f32.ln() / (4f32 / 3.0).ln())).exp();
        assert!((w - 0.910136).abs() < 1e-5);
        assert!((v[0] - w * 2f32.ln()).abs() < 1e-5, "{v:?}");
        assert!((v[0] - 0.630855).abs() < 1e-5, "{v:?}");
        // A student already better than the teacher on the label (CE_s → 0) gets weight → 0.
        let good = Tensor::new(&[[-20.0f32, 20.0]], d).unwrap();
        let v = wsl_per_sample(&good, &t, &y, 1.0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!(v[0] < 1e-6, "{v:?}");
    }

    #[test]
    fn weighted_cross_entropy_by_hand() {
        let d = &Device::Cpu;
        // logits (0, ln 3): log q = (ln ¼, ln ¾). Target (½, ½), weights (2, 1):
        // −(2·½ ln ¼ + 1·½ ln ¾) = ln 4 − ½ ln(3/4) ... = 1.386294 + 0.143841 = 1.530135.
        let logits = Tensor::new(&[[0.0f32, 3f32.ln()]], d).unwrap();
        let z = Tensor::new(&[[0.5f32, 0.5]], d).unwrap();
        let w = Tensor::new(&[2.0f32, 1.0], d).unwrap();
        let v = weighted_soft_cross_entropy_per_sample(&logits, &z, &w)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert!((v[0] - 1.530135).abs() < 1e-5, "{v:?}");
    }
}
