//! Training losses, all computed through log-softmax for numerical stability and averaged over
//! the batch.

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
}
