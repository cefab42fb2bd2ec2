//! Accuracy and calibration metrics over predicted distributions. Every convention is written
//! out in docs/metrics.md; in short:
//!
//! - confidence = max_k p_k; the prediction is the first arg-max (ties: lowest class);
//! - equal-width bins: M bins on [0, 1], membership (lo, hi] as in Guo et al.'s reference code,
//!   edges and comparisons in `f32` like the confidences; a value of exactly 0 goes to the first
//!   bin and exactly 1 to the last; empty bins contribute nothing;
//! - ECE = Σ_m |B_m|/N · |acc(B_m) − conf(B_m)|; MCE = the largest gap over non-empty bins;
//! - adaptive ECE: the samples sorted by confidence (ties by index) and cut into M bins of
//!   ⌊(m+1)N/M⌋ − ⌊mN/M⌋ samples;
//! - classwise ECE (Kull et al. 2019): for each of the K classes (K given, never inferred from the
//!   labels), the ECE of p_k against 1[y = k] over all samples, averaged over classes;
//! - UCE (Laves et al. 2019): uncertainty u = −Σ p log p / log K ∈ [0, 1] against the error rate,
//!   in the same equal-width bins (K = 1 has u = 0);
//! - NLL = mean −ln p_y with p_y floored at 1e-12; Brier = mean Σ_k (p_k − 1[k = y])² ∈ [0, 2];
//! - per class: precision, recall, F1 and mean true-class confidence; a class that is never
//!   predicted has precision 0, a class with no sample has NaN recall, F1 and confidence.

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

/// Per-class statistics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassStats {
    /// Samples of the class.
    pub support: usize,
    /// TP / (TP + FP); 0 when the class is never predicted.
    pub precision: f64,
    /// TP / (TP + FN); NaN (null in JSON) when the class has no sample.
    #[serde(with = "nan_as_null")]
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when both are 0; NaN without samples).
    #[serde(with = "nan_as_null")]
    pub f1: f64,
    /// Mean probability given to the class by its own samples (NaN without samples).
    #[serde(with = "nan_as_null")]
    pub confidence: f64,
}

/// The metrics of one evaluated model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Number of samples.
    pub n: usize,
    /// Top-1 accuracy in [0, 1].
    pub accuracy: f64,
    /// Top-5 accuracy (top-K when K < 5).
    #[serde(default)]
    pub top5: f64,
    /// Expected calibration error in [0, 1].
    pub ece: f64,
    /// Maximum calibration error over non-empty bins.
    #[serde(default)]
    pub mce: f64,
    /// ECE over equal-mass bins.
    #[serde(default)]
    pub adaptive_ece: f64,
    /// Classwise ECE, averaged over the K classes.
    #[serde(default)]
    pub classwise_ece: f64,
    /// Uncertainty calibration error (normalised entropy against error).
    #[serde(default)]
    pub uce: f64,
    /// Mean negative log-likelihood (nats).
    pub nll: f64,
    /// Brier score summed over the K classes, mean over samples: mean Σ_k (p_k − 1[k = y])²,
    /// in [0, 2].
    pub brier: f64,
    /// Top-label Brier score, the one the paper's Table 7 reports: mean (confidence −
    /// 1[correct])², in [0, 1]. Absent from metrics.json files written before it existed.
    #[serde(default = "nan", with = "nan_as_null")]
    pub brier_top_label: f64,
    /// Reliability-diagram bins (equal width).
    pub bins: Vec<Bin>,
    /// UCE bins: `confidence` holds the mean uncertainty, `accuracy` the error rate.
    #[serde(default)]
    pub uncertainty_bins: Vec<Bin>,
    /// Per-class statistics, K entries.
    #[serde(default)]
    pub classes: Vec<ClassStats>,
}

fn nan() -> f64 {
    f64::NAN
}

mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() {
            s.serialize_f64(*v)
        } else {
            s.serialize_none()
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
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
/// `0.8f32` lands in (0.7, 0.8] although `0.8f32` is slightly above 0.8 in `f64`. 0 (and below)
/// goes to the first bin, 1 (and above) to the last.
pub fn bin_index(conf: f32, m: usize) -> usize {
    if conf.is_nan() {
        return 0;
    }
    let mut b = ((conf.max(0.0) * m as f32) as usize).min(m - 1);
    while b > 0 && conf <= edge(b, m) {
        b -= 1;
    }
    while b + 1 < m && conf > edge(b + 1, m) {
        b += 1;
    }
    b
}

/// Accumulates (value, hit) pairs into equal-width bins.
struct Binner {
    m: usize,
    sums: Vec<(usize, f64, f64)>,
}

impl Binner {
    fn new(m: usize) -> Binner {
        Binner {
            m,
            sums: vec![(0, 0.0, 0.0); m],
        }
    }
    fn add(&mut self, value: f32, hit: f64) {
        let b = &mut self.sums[bin_index(value, self.m)];
        b.0 += 1;
        b.1 += hit;
        b.2 += value as f64;
    }
    fn bins(&self) -> Vec<Bin> {
        let m = self.m;
        self.sums
            .iter()
            .enumerate()
            .map(|(i, &(count, hits, sum))| Bin {
                lo: i as f64 / m as f64,
                hi: (i + 1) as f64 / m as f64,
                count,
                accuracy: if count > 0 { hits / count as f64 } else { 0.0 },
                confidence: if count > 0 { sum / count as f64 } else { 0.0 },
            })
            .collect()
    }
}

/// Σ_b |B_b|/n · |accuracy − confidence| over `bins`.
pub fn gap(bins: &[Bin], n: usize) -> f64 {
    let n = n.max(1) as f64;
    bins.iter()
        .map(|b| b.count as f64 / n * (b.accuracy - b.confidence).abs())
        .sum()
}

/// The largest |accuracy − confidence| of a non-empty bin (0 when all are empty).
pub fn max_gap(bins: &[Bin]) -> f64 {
    bins.iter()
        .filter(|b| b.count > 0)
        .map(|b| (b.accuracy - b.confidence).abs())
        .fold(0.0, f64::max)
}

/// Adaptive (equal-mass) ECE of (confidence, hit) pairs with `m` bins: sorted by confidence (ties
/// by position), bin b holds positions ⌊bN/M⌋ .. ⌊(b+1)N/M⌋; bins left empty when N < M.
pub fn adaptive_ece(conf: &[f32], hit: &[bool], m: usize) -> f64 {
    let n = conf.len();
    if n == 0 {
        return 0.0;
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| conf[a].total_cmp(&conf[b]).then(a.cmp(&b)));
    let mut total = 0.0;
    for b in 0..m {
        let (lo, hi) = (b * n / m, (b + 1) * n / m);
        if hi == lo {
            continue;
        }
        let (mut c, mut h) = (0.0f64, 0.0f64);
        for &i in &order[lo..hi] {
            c += conf[i] as f64;
            h += hit[i] as u8 as f64;
        }
        let count = (hi - lo) as f64;
        total += count / n as f64 * (h / count - c / count).abs();
    }
    total
}

/// Computes all metrics of `probs` (`N × K`, row-major) against `labels`, with `m` bins.
pub fn compute(probs: &[f32], labels: &[u32], k: usize, m: usize) -> Metrics {
    let n = labels.len();
    assert_eq!(probs.len(), n * k, "probabilities must be N × K");
    assert!(m >= 1, "at least one bin");
    let mut conf_bins = Binner::new(m);
    let mut unc_bins = Binner::new(m);
    let mut class_bins: Vec<Binner> = (0..k).map(|_| Binner::new(m)).collect();
    let (mut correct, mut top5, mut nll, mut brier) = (0usize, 0usize, 0.0f64, 0.0f64);
    let mut brier_top = 0.0f64;
    let mut confs = Vec::with_capacity(n);
    let mut hits = Vec::with_capacity(n);
    let mut counts = ClassCounts::new(k);
    for (row, &y) in probs.chunks_exact(k).zip(labels) {
        let y = y as usize;
        let (pred, conf) = argmax(row);
        let hit = pred == y;
        correct += hit as usize;
        top5 += in_top5(row, y) as usize;
        nll -= (row[y] as f64).max(1e-12).ln();
        brier += squared_error(row, y);
        brier_top += (conf as f64 - hit as u8 as f64).powi(2);
        conf_bins.add(conf, hit as u8 as f64);
        unc_bins.add(normalized_entropy(row) as f32, (!hit) as u8 as f64);
        for (c, &p) in row.iter().enumerate() {
            class_bins[c].add(p, (c == y) as u8 as f64);
        }
        confs.push(conf);
        hits.push(hit);
        counts.add(y, pred, row[y]);
    }
    let nf = n.max(1) as f64;
    let bins = conf_bins.bins();
    let uncertainty_bins = unc_bins.bins();
    let classwise_ece = if k == 0 {
        0.0
    } else {
        class_bins.iter().map(|b| gap(&b.bins(), n)).sum::<f64>() / k as f64
    };
    Metrics {
        n,
        accuracy: correct as f64 / nf,
        top5: top5 as f64 / nf,
        ece: gap(&bins, n),
        mce: max_gap(&bins),
        adaptive_ece: adaptive_ece(&confs, &hits, m),
        classwise_ece,
        uce: gap(&uncertainty_bins, n),
        nll: nll / nf,
        brier: brier / nf,
        brier_top_label: brier_top / nf,
        bins,
        uncertainty_bins,
        classes: counts.stats(),
    }
}

/// Whether label `y` is among the top 5 of `row`: fewer than 5 classes rank above it, a class
/// ranking above when it scores higher or ties with a lower index (the order a stable sort by
/// descending score gives, as the top-1 argmax does).
fn in_top5(row: &[f32], y: usize) -> bool {
    let py = row[y];
    let above = row
        .iter()
        .enumerate()
        .filter(|&(c, &p)| c != y && (p > py || (p == py && c < y)))
        .count();
    above < 5
}

/// `Σ_c (p_c − 1[c = y])²`, the row's term of the (summed) Brier score.
fn squared_error(row: &[f32], y: usize) -> f64 {
    row.iter()
        .enumerate()
        .map(|(c, &p)| {
            let t = if c == y { 1.0 } else { 0.0 };
            (p as f64 - t).powi(2)
        })
        .sum::<f64>()
}

/// The row's entropy over `ln K`, in [0, 1] (0 for a single class): the uncertainty UCE bins.
fn normalized_entropy(row: &[f32]) -> f64 {
    let k = row.len();
    if k <= 1 {
        return 0.0;
    }
    let entropy: f64 = -row
        .iter()
        .filter(|&&p| p > 0.0)
        .map(|&p| p as f64 * (p as f64).ln())
        .sum::<f64>();
    entropy / (k as f64).ln()
}

/// Per-class counts gathered row by row, for the per-class table.
struct ClassCounts {
    /// Rows of the class predicted correctly.
    tp: Vec<usize>,
    /// Rows predicted as the class.
    predicted: Vec<usize>,
    /// Rows whose label is the class.
    support: Vec<usize>,
    /// Sum of the probability given to the label, over the class's rows.
    true_conf: Vec<f64>,
}

impl ClassCounts {
    fn new(k: usize) -> Self {
        ClassCounts {
            tp: vec![0; k],
            predicted: vec![0; k],
            support: vec![0; k],
            true_conf: vec![0.0; k],
        }
    }

    /// One row with label `y`, predicted class `pred` and probability `py` on the label.
    fn add(&mut self, y: usize, pred: usize, py: f32) {
        self.support[y] += 1;
        self.predicted[pred] += 1;
        self.tp[y] += (pred == y) as usize;
        self.true_conf[y] += py as f64;
    }

    /// Precision (0 when never predicted), recall, F1 and mean label confidence (NaN without
    /// support) of each class.
    fn stats(&self) -> Vec<ClassStats> {
        (0..self.tp.len())
            .map(|c| {
                let (tp, predicted, support) = (self.tp[c], self.predicted[c], self.support[c]);
                let precision = if predicted == 0 {
                    0.0
                } else {
                    tp as f64 / predicted as f64
                };
                let (recall, confidence) = if support == 0 {
                    (f64::NAN, f64::NAN)
                } else {
                    (
                        tp as f64 / support as f64,
                        self.true_conf[c] / support as f64,
                    )
                };
                // 2PR/(P + R) as one quotient of counts, 2TP/(TP + FP + TP + FN): equal F1s are
                // equal floats, so ties (the best class) do not hang on rounding.
                let f1 = if recall.is_nan() {
                    f64::NAN
                } else {
                    2.0 * tp as f64 / (predicted + support) as f64
                };
                ClassStats {
                    support,
                    precision,
                    recall,
                    f1,
                    confidence,
                }
            })
            .collect()
    }
}

/// The class a model classifies best and what it outputs for it (the paper's Fig. 5).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestClass {
    /// The class with the highest F1 (ties: the lowest index).
    pub class: usize,
    /// Its F1.
    pub f1: f64,
    /// The most probable classes of the mean predicted distribution over its samples, with
    /// their mean probability, most probable first (ties: the lowest index).
    pub top: Vec<(usize, f64)>,
}

/// The class of `stats` with the highest F1 and the `top` largest entries of the mean of `probs`
/// (N × K) over the samples labelled with it; `None` when no class has a sample.
pub fn best_class(
    probs: &[f32],
    labels: &[u32],
    stats: &[ClassStats],
    top: usize,
) -> Option<BestClass> {
    let k = stats.len();
    let class = (0..k).filter(|&c| stats[c].f1.is_finite()).fold(
        None,
        |best: Option<usize>, c| match best {
            Some(b) if stats[b].f1 >= stats[c].f1 => Some(b),
            _ => Some(c),
        },
    )?;
    let mut mean = vec![0f64; k];
    let mut n = 0usize;
    for (row, _) in probs
        .chunks_exact(k)
        .zip(labels)
        .filter(|(_, &y)| y as usize == class)
    {
        for (m, &p) in mean.iter_mut().zip(row) {
            *m += p as f64;
        }
        n += 1;
    }
    let mut ranked: Vec<(usize, f64)> =
        mean.into_iter().map(|m| m / n as f64).enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked.truncate(top);
    Some(BestClass {
        class,
        f1: stats[class].f1,
        top: ranked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn best_class_and_its_mean_output_by_hand() {
        // 3 classes. Class 0: 2 samples, both right → with no false positive F1 = 1.
        // Class 1: 2 samples, one predicted as 2; class 2: 1 sample, right, plus that false
        // positive → F1(1) = 2/3 (P 1, R ½), F1(2) = 2/3 (P ½, R 1).
        let probs = [
            0.5, 0.25, 0.25, //
            0.75, 0.0, 0.25, //
            0.0, 1.0, 0.0, //
            0.25, 0.25, 0.5, //
            0.0, 0.25, 0.75, //
        ];
        let labels = [0, 0, 1, 1, 2];
        let m = compute(&probs, &labels, 3, 10);
        let best = best_class(&probs, &labels, &m.classes, 2).unwrap();
        assert_eq!((best.class, best.f1), (0, 1.0));
        // Mean over class 0's rows: (0.625, 0.125, 0.25); the top 2, most probable first.
        assert_eq!(best.top, [(0, 0.625), (2, 0.25)]);
        // Classes 1 and 2 tie at F1 2/3 once class 0 is out: the lower index wins. Mean over
        // class 1's rows: (0.125, 0.625, 0.25).
        let mut no_zero = m.classes.clone();
        no_zero[0].f1 = f64::NAN;
        let best = best_class(&probs, &labels, &no_zero, 3).unwrap();
        assert_eq!(best.class, 1);
        assert_eq!(best.top, [(1, 0.625), (2, 0.25), (0, 0.125)]);
        no_zero.iter_mut().for_each(|c| c.f1 = f64::NAN);
        assert!(best_class(&probs, &labels, &no_zero, 3).is_none());
    }

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
        assert_eq!(bin_index(1.0, 1), 0);
    }

    #[test]
    fn metrics_by_hand() {
        // Two samples, K = 2.
        // s0: p = (0.8, 0.2), y = 0: correct, conf 0.8 (bin 7, (0.7, 0.8]).
        // s1: p = (0.4, 0.6), y = 0: wrong,   conf 0.6 (bin 5, (0.5, 0.6]).
        // accuracy = 1/2; top-5 = 1 (K = 2 < 5).
        // ECE = ½·|1 − 0.8| + ½·|0 − 0.6| = 0.1 + 0.3 = 0.4; MCE = 0.6.
        // NLL = −(ln 0.8 + ln 0.4)/2.
        // Brier = ((0.2² + 0.2²) + (0.6² + 0.6²))/2 = (0.08 + 0.72)/2 = 0.4.
        let m = compute(&[0.8, 0.2, 0.4, 0.6], &[0, 0], 2, 10);
        assert!((m.accuracy - 0.5).abs() < 1e-12);
        assert!((m.top5 - 1.0).abs() < 1e-12);
        assert!((m.ece - 0.4).abs() < 1e-6, "{}", m.ece);
        assert!((m.mce - 0.6).abs() < 1e-6, "{}", m.mce);
        assert!((m.nll + (0.8f64.ln() + 0.4f64.ln()) / 2.0).abs() < 1e-6);
        assert!((m.brier - 0.4).abs() < 1e-6);
        // Top-label Brier = ((0.8 − 1)² + (0.6 − 0)²)/2 = (0.04 + 0.36)/2 = 0.2.
        assert!(
            (m.brier_top_label - 0.2).abs() < 1e-6,
            "{}",
            m.brier_top_label
        );
        assert_eq!(m.bins[7].count, 1);
        assert_eq!(m.bins[5].count, 1);
        assert_eq!(m.bins.iter().map(|b| b.count).sum::<usize>(), 2);
        // Adaptive, M = 10 > N = 2: bins of positions ⌊bN/M⌋..⌊(b+1)N/M⌋ hold one sample each
        // (b = 4: {0.6}, b = 9: {0.8}), so adaptive ECE = ½·0.6 + ½·0.2 = 0.4 as well.
        assert!((m.adaptive_ece - 0.4).abs() < 1e-6, "{}", m.adaptive_ece);
        // Classwise, class 0: p0 = 0.8 (y=0 → 1) in bin 7, p0 = 0.4 (1) in bin 3:
        //   ½·|1 − 0.8| + ½·|1 − 0.4| = 0.1 + 0.3 = 0.4.
        // Class 1: p1 = 0.2 (0) in bin 1, p1 = 0.6 (0) in bin 5: ½·0.2 + ½·0.6 = 0.4.
        // Mean over K = 2 classes: 0.4.
        assert!((m.classwise_ece - 0.4).abs() < 1e-6, "{}", m.classwise_ece);
        // UCE: u = H(p)/ln 2. H(0.8, 0.2) = 0.500402 nats → u0 = 0.721928 (bin 7), correct
        // (error 0); H(0.4, 0.6) = 0.673012 → u1 = 0.970951 (bin 9), wrong (error 1).
        // UCE = ½·|0 − 0.721928| + ½·|1 − 0.970951| = 0.360964 + 0.014525 = 0.375489.
        assert!((m.uce - 0.375489).abs() < 1e-5, "{}", m.uce);
        // Per class: class 0 predicted once (s0, right), support 2 → precision 1, recall ½,
        // F1 = 2·1·½/1.5 = ⅔, mean true-class confidence (0.8 + 0.4)/2 = 0.6.
        // Class 1: predicted once (s1, wrong) → precision 0; support 0 → recall, F1 and
        // confidence undefined (NaN).
        let c0 = &m.classes[0];
        assert_eq!(c0.support, 2);
        assert!((c0.precision - 1.0).abs() < 1e-12 && (c0.recall - 0.5).abs() < 1e-12);
        assert!((c0.f1 - 2.0 / 3.0).abs() < 1e-12 && (c0.confidence - 0.6).abs() < 1e-6);
        let c1 = &m.classes[1];
        assert_eq!((c1.support, c1.precision), (0, 0.0));
        assert!(c1.recall.is_nan() && c1.f1.is_nan() && c1.confidence.is_nan());
    }

    #[test]
    fn confidence_exactly_on_an_edge_or_one_and_empty_bins() {
        // K = 4, M = 5 (edges 0.2, 0.4, 0.6, 0.8 in f32).
        // s0: (0.4, 0.2, 0.2, 0.2), y = 0: conf exactly 0.4 → bin 1, (0.2, 0.4]; correct.
        // s1: (1, 0, 0, 0), y = 1: conf exactly 1 → bin 4, (0.8, 1]; wrong.
        // Bins 0, 2 and 3 are empty and contribute nothing.
        // ECE = ½·|1 − 0.4| + ½·|0 − 1| = 0.3 + 0.5 = 0.8; MCE = 1.
        let p = [0.4f32, 0.2, 0.2, 0.2, 1.0, 0.0, 0.0, 0.0];
        let m = compute(&p, &[0, 1], 4, 5);
        assert_eq!(
            m.bins.iter().map(|b| b.count).collect::<Vec<_>>(),
            [0, 1, 0, 0, 1]
        );
        assert!((m.ece - 0.8).abs() < 1e-6, "{}", m.ece);
        assert!((m.mce - 1.0).abs() < 1e-6);
        // s1's true class gets p = 0: NLL floors it at 1e-12, so NLL = (−ln 0.4 + 27.631021)/2.
        assert!((m.nll - (-(0.4f64.ln()) - 1e-12f64.ln()) / 2.0).abs() < 1e-6);
        // Classes 2 and 3 never occur: NaN recall; classwise ECE still averages over K = 4.
        // Class 2: p2 = 0.2 (bin 0, label 0) and 0 (bin 0): bin 0 holds both with mean 0.1
        // and accuracy 0 → 1·0.1. Class 3 the same: 0.1. Class 0: 0.4 (y=0, hit) in bin 1,
        // 1.0 (miss) in bin 4: ½·0.6 + ½·1 = 0.8. Class 1: 0.2 (miss) and 0 (hit) in bin 0:
        // mean 0.1, accuracy ½ → 0.4. Mean: (0.8 + 0.4 + 0.1 + 0.1)/4 = 0.35.
        assert!((m.classwise_ece - 0.35).abs() < 1e-6, "{}", m.classwise_ece);
        assert!(m.classes[2].recall.is_nan() && m.classes[3].f1.is_nan());
        // Brier summed over classes: s0 (0.6² + 3·0.2²) = 0.48, s1 (1² + 1²) = 2 → 1.24;
        // top-label: s0 (0.4 − 1)² = 0.36, s1 (1 − 0)² = 1 → 0.68.
        assert!((m.brier - 1.24).abs() < 1e-6, "{}", m.brier);
        assert!(
            (m.brier_top_label - 0.68).abs() < 1e-6,
            "{}",
            m.brier_top_label
        );
        // Top-5 with K = 4: always a hit.
        assert_eq!(m.top5, 1.0);
        // UCE: s1 is one-hot, u = 0 (bin 0), wrong: |1 − 0|; s0 has H = −(0.4 ln 0.4 +
        // 3·0.2 ln 0.2) = 1.332179, u = 1.332179/ln 4 = 0.960964 (bin 4), right: |0 − 0.960964|.
        // UCE = ½·1 + ½·0.960964 = 0.980482.
        assert!((m.uce - 0.980482).abs() < 1e-5, "{}", m.uce);
    }

    #[test]
    fn two_classes_and_perfect_predictions() {
        let m = compute(&[1.0, 0.0], &[0], 2, 10);
        assert_eq!((m.accuracy, m.ece, m.brier), (1.0, 0.0, 0.0));
        assert_eq!((m.uce, m.mce, m.adaptive_ece), (0.0, 0.0, 0.0));
        let m = compute(&[1.0, 0.0], &[1], 2, 10);
        assert!((m.nll - 1e-12f64.ln().abs()).abs() < 1e-9);
        assert!((m.brier - 2.0).abs() < 1e-12);
        // K = 2: the lowest possible confidence is 0.5, which sits on the edge of (0.4, 0.5].
        let m = compute(&[0.5, 0.5], &[1], 2, 10);
        assert_eq!(m.bins[4].count, 1);
        // A tie predicts the lower class (0), so label 1 is a miss at top-1.
        assert_eq!(m.accuracy, 0.0);
    }

    #[test]
    fn top5_counts_ties_against_the_label() {
        // K = 7, label 6 at 0.1; five classes above it (0.15 each... ) → rank 6: miss.
        let p = [0.15f32, 0.15, 0.15, 0.15, 0.15, 0.15, 0.1];
        let m = compute(&p, &[6], 7, 10);
        assert_eq!(m.top5, 0.0);
        // Label 4 ties with classes 0–3 and 5 (all 0.15): the four lower classes count above
        // it → rank 5: hit.
        let m = compute(&p, &[4], 7, 10);
        assert_eq!(m.top5, 1.0);
        // Label 5: five lower classes tie with it → rank 6: miss.
        let m = compute(&p, &[5], 7, 10);
        assert_eq!(m.top5, 0.0);
    }

    #[test]
    fn adaptive_bins_hold_equal_counts() {
        // N = 4, M = 2: sorted confidences (0.3, 0.6 | 0.7, 0.9) with hits (0, 1 | 1, 1).
        // Bin 0: mean conf 0.45, acc 0.5 → gap 0.05; bin 1: mean 0.8, acc 1 → 0.2.
        // Adaptive ECE = ½·0.05 + ½·0.2 = 0.125.
        let v = adaptive_ece(&[0.9, 0.3, 0.7, 0.6], &[true, false, true, true], 2);
        assert!((v - 0.125).abs() < 1e-6, "{v}");
    }
}
