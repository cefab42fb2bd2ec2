//! Accuracy and calibration metrics over predicted distributions.
//!
//! Conventions (documented in README): confidence = max_k p_k; prediction = the first arg-max;
//! ECE uses M equal-width bins with membership (lo, hi] as Guo et al.'s reference code (edges
//! and comparisons in `f32`), a
//! confidence of exactly 0 falls in the first bin, and ECE = Σ_m |B_m|/N · |acc(B_m) − conf(B_m)|
//! (empty bins contribute 0); NLL = mean −ln p_y with p_y floored at 1e-12 (so a confident
//! mistake costs at most 27.6 nats, not infinity); Brier = mean over samples of
//! Σ_k (p_k − 1[k = y])², the sum over classes, range [0, 2].

use serde::{Deserialize, Serialize};

/// Per-bin statistics of a reliability diagram.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bin {
    /// Lower edge (exclusive, except for the first bin).
    pub lo: f64,
    /// Upper edge (inclusive).
    pub hi: f64,
    /// Samples in the bin.
    pub count: usize,
    /// Accuracy of the bin (0 if empty).
    pub accuracy: f64,
    /// Mean confidence of the bin (0 if empty).
    pub confidence: f64,
}

/// The metrics of one evaluated model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Number of samples.
    pub n: usize,
    /// Top-1 accuracy in [0, 1].
    pub accuracy: f64,
    /// Expected calibration error in [0, 1].
    pub ece: f64,
    /// Mean negative log-likelihood (nats).
    pub nll: f64,
    /// Brier score, summed over classes, mean over samples.
    pub brier: f64,
    /// Reliability-diagram bins.
    pub bins: Vec<Bin>,
}

fn argmax(row: &[f32]) -> (usize, f32) {
    let mut best = (0, row[0]);
    for (k, &p) in row.iter().enumerate().skip(1) {
        if p > best.1 {
            best = (k, p);
        }
    }
    best
}

/// Edge `i` of `m` equal-width bins, in `f32` like the `f32` confidences it is compared with.
fn edge(i: usize, m: usize) -> f32 {
    i as f32 / m as f32
}

/// Index of the (lo, hi] bin of `conf` among `m` equal-width bins on [0, 1]. Edges and the
/// comparison are in `f32`, as in Guo et al.'s PyTorch code, so a confidence stored as
/// `0.8f32` lands in (0.7, 0.8] although `0.8f32` is slightly above 0.8 in `f64`.
pub fn bin_index(conf: f32, m: usize) -> usize {
    let mut b = ((conf * m as f32) as usize).min(m - 1);
    while b > 0 && conf <= edge(b, m) {
        b -= 1;
    }
    while b + 1 < m && conf > edge(b + 1, m) {
        b += 1;
    }
    b
}

/// Computes all metrics of `probs` (`N × K`, row-major) against `labels`, with `m` ECE bins.
pub fn compute(probs: &[f32], labels: &[u32], k: usize, m: usize) -> Metrics {
    let n = labels.len();
    assert_eq!(probs.len(), n * k, "probabilities must be N × K");
    let mut bins: Vec<(usize, f64, f64)> = vec![(0, 0.0, 0.0); m];
    let (mut correct, mut nll, mut brier) = (0usize, 0.0f64, 0.0f64);
    for (row, &y) in probs.chunks_exact(k).zip(labels) {
        let (pred, conf) = argmax(row);
        let hit = pred == y as usize;
        correct += hit as usize;
        nll -= (row[y as usize] as f64).max(1e-12).ln();
        brier += row
            .iter()
            .enumerate()
            .map(|(c, &p)| {
                let t = if c == y as usize { 1.0 } else { 0.0 };
                (p as f64 - t).powi(2)
            })
            .sum::<f64>();
        let b = &mut bins[bin_index(conf, m)];
        b.0 += 1;
        b.1 += hit as u8 as f64;
        b.2 += conf as f64;
    }
    let nf = n.max(1) as f64;
    let bins: Vec<Bin> = bins
        .into_iter()
        .enumerate()
        .map(|(i, (count, hits, conf))| Bin {
            lo: i as f64 / m as f64,
            hi: (i + 1) as f64 / m as f64,
            count,
            accuracy: if count > 0 { hits / count as f64 } else { 0.0 },
            confidence: if count > 0 { conf / count as f64 } else { 0.0 },
        })
        .collect();
    let ece = bins
        .iter()
        .map(|b| b.count as f64 / nf * (b.accuracy - b.confidence).abs())
        .sum();
    Metrics {
        n,
        accuracy: correct as f64 / nf,
        ece,
        nll: nll / nf,
        brier: brier / nf,
        bins,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bin_edges_follow_lo_exclusive_hi_inclusive() {
        assert_eq!(bin_index(0.0, 10), 0);
        assert_eq!(bin_index(0.1, 10), 0); // 0.1 ∈ (0, 0.1]
        assert_eq!(bin_index(0.100001, 10), 1);
        assert_eq!(bin_index(0.8, 10), 7); // 0.8 ∈ (0.7, 0.8]
        assert_eq!(bin_index(0.3, 10), 2);
        assert_eq!(bin_index(1.0, 10), 9);
        assert_eq!(bin_index(0.5, 2), 0);
        assert_eq!(bin_index(0.5000001, 2), 1);
    }

    #[test]
    fn metrics_by_hand() {
        // Two samples, K = 2.
        // s0: p = (0.8, 0.2), y = 0: correct, conf 0.8 (bin 7, (0.7, 0.8]).
        // s1: p = (0.4, 0.6), y = 0: wrong,   conf 0.6 (bin 5, (0.5, 0.6]).
        // accuracy = 1/2.
        // ECE = ½·|1 − 0.8| + ½·|0 − 0.6| = 0.1 + 0.3 = 0.4.
        // NLL = −(ln 0.8 + ln 0.4)/2.
        // Brier = ((0.2² + 0.2²) + (0.6² + 0.6²))/2 = (0.08 + 0.72)/2 = 0.4.
        let m = compute(&[0.8, 0.2, 0.4, 0.6], &[0, 0], 2, 10);
        assert!((m.accuracy - 0.5).abs() < 1e-12);
        assert!((m.ece - 0.4).abs() < 1e-6, "{}", m.ece);
        assert!((m.nll + (0.8f64.ln() + 0.4f64.ln()) / 2.0).abs() < 1e-6);
        assert!((m.brier - 0.4).abs() < 1e-6);
        assert_eq!(m.bins[7].count, 1);
        assert_eq!(m.bins[5].count, 1);
        assert_eq!(m.bins.iter().map(|b| b.count).sum::<usize>(), 2);
    }

    #[test]
    fn perfect_and_zero_probability() {
        let m = compute(&[1.0, 0.0], &[0], 2, 10);
        assert_eq!((m.accuracy, m.ece, m.brier), (1.0, 0.0, 0.0));
        let m = compute(&[1.0, 0.0], &[1], 2, 10);
        assert!((m.nll - 1e-12f64.ln().abs()).abs() < 1e-9);
        assert!((m.brier - 2.0).abs() < 1e-12);
    }
}
