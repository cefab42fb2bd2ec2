//! Post-hoc temperature scaling (Guo et al. 2017): one temperature T, fitted on the validation
//! split by minimising the NLL of softmax(logits / T), stored with the model and applied by the
//! evaluate stage.
//!
//! The NLL is convex in 1/T, hence unimodal in log T; it is minimised over log T ∈ [ln 0.01,
//! ln 100] by a grid scan (81 points) that brackets the minimum, then golden-section search to a
//! width of 1e-6 — robust where a fixed-iteration LBFGS on T can stop early or step to T ≤ 0.

use serde::{Deserialize, Serialize};

/// `temperature.json` of a train stage run with `temperature_scaling = true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Temperature {
    /// The fitted temperature T.
    pub temperature: f64,
    /// Validation NLL at T = 1.
    pub val_nll_before: f64,
    /// Validation NLL at T.
    pub val_nll_after: f64,
    /// Validation images it was fitted on.
    pub val_images: usize,
}

/// Mean negative log-likelihood of `labels` under softmax(`logits` / t), `logits` `N × K`.
pub fn nll(logits: &[f32], labels: &[u32], k: usize, t: f64) -> f64 {
    let mut total = 0f64;
    for (row, &y) in logits.chunks_exact(k).zip(labels) {
        let max = row.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64)) / t;
        let lse = max
            + row
                .iter()
                .map(|&v| (v as f64 / t - max).exp())
                .sum::<f64>()
                .ln();
        total += lse - row[y as usize] as f64 / t;
    }
    total / labels.len().max(1) as f64
}

/// Fits T on validation logits and labels.
pub fn fit(logits: &[f32], labels: &[u32], k: usize) -> Temperature {
    let f = |log_t: f64| nll(logits, labels, k, log_t.exp());
    let (lo, hi) = (0.01f64.ln(), 100f64.ln());
    let steps = 80;
    let at = |i: usize| lo + (hi - lo) * i as f64 / steps as f64;
    let best = (0..=steps)
        .map(|i| (i, f(at(i))))
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .expect("points")
        .0;
    let (mut a, mut b) = (at(best.saturating_sub(1)), at((best + 1).min(steps)));
    let g = (5f64.sqrt() - 1.0) / 2.0;
    let mut c = b - g * (b - a);
    let mut d = a + g * (b - a);
    let (mut fc, mut fd) = (f(c), f(d));
    while b - a > 1e-6 {
        if fc < fd {
            b = d;
            d = c;
            fd = fc;
            c = b - g * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + g * (b - a);
            fd = f(d);
        }
    }
    let t = ((a + b) / 2.0).exp();
    Temperature {
        temperature: t,
        val_nll_before: nll(logits, labels, k, 1.0),
        val_nll_after: nll(logits, labels, k, t),
        val_images: labels.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nll_by_hand() {
        // logits (0, ln 3), label 1: softmax (¼, ¾), NLL = ln(4/3); at T = ∞ → ln 2.
        let l = [0.0f32, 3f32.ln()];
        assert!((nll(&l, &[1], 2, 1.0) - (4.0f64 / 3.0).ln()).abs() < 1e-7);
        assert!((nll(&l, &[1], 2, 1e9) - 2f64.ln()).abs() < 1e-7);
    }

    #[test]
    fn recovers_the_temperature_that_made_the_labels() {
        // Two classes, logits (0, s) for s on a grid; labels drawn so that the fraction of class
        // 1 at each s equals sigmoid(s / 2): the NLL-optimal temperature is 2.
        let mut logits = Vec::new();
        let mut labels = Vec::new();
        for i in 0..=40 {
            let s = -8.0 + 0.4 * i as f64;
            let p1 = 1.0 / (1.0 + (-s / 2.0).exp());
            let ones = (p1 * 1000.0).round() as usize;
            for j in 0..1000 {
                logits.extend([0.0f32, s as f32]);
                labels.push((j < ones) as u32);
            }
        }
        let fit = fit(&logits, &labels, 2);
        assert!((fit.temperature - 2.0).abs() < 0.01, "{fit:?}");
        assert!(fit.val_nll_after < fit.val_nll_before);
        // An overconfident model (logits × 5 of calibrated ones) gets T ≈ 5.
        let hot: Vec<f32> = logits.iter().map(|v| v * 2.5).collect();
        let t = super::fit(&hot, &labels, 2).temperature;
        assert!((t - 5.0).abs() < 0.03, "{t}");
    }
}
