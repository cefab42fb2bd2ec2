//! The training methods of the paper (its Fig. 2 configurations #1–#9) and its baselines: which
//! targets each sample of a batch gets and which per-sample loss the student minimises. The
//! train stage ([`crate::train`]) owns the loop; this module owns the supervision. Every formula
//! is written out in docs/methods.md.
//!
//! Targets follow the batch's mixing record: a mixed image's hard, smoothed or stored target is
//! the mix of its sources' targets with the images' weights (ŷ = Σ λ_p y_p), while online
//! teachers label the mixed images themselves and ŷ is not used.

use crate::error::Result;
use crate::label_store::SoftLabels;
use crate::losses::{
    cross_entropy_per_sample, kd_per_sample, smoothed_target, soft_cross_entropy_per_sample,
    weighted_soft_cross_entropy_per_sample, wsl_per_sample,
};
use crate::models::Model;
use crate::stage::Multiplicity;
use crate::train::Params;
use candle_core::{Device, Tensor, D};
use datasets::loader::Batch;
use datasets::mix::MixRecord;
use datasets::rng::{derive_seed, stream};
use serde::{Deserialize, Serialize};

/// How the student is supervised (`method = "..."` of a train stage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Cross-entropy on the hard (or mixed hard) labels: configuration #1, "Vanilla".
    Vanilla,
    /// Label smoothing, eq. (2) (#2).
    Ls,
    /// Knowledge distillation (Hinton et al.): (1 − λ)·CE + λ·τ²·KL.
    Kd,
    /// Weighted soft labels (Zhou et al., ICLR 2021).
    Wsl,
    /// Offline LDL: soft cross-entropy on one stored teacher distribution (#3).
    OffLdl,
    /// Offline ensemble LDL: on the stored mean of the teachers (#4).
    OffEnLdl,
    /// Offline multi-teacher LDL: the sum of the soft cross-entropies with each stored teacher
    /// distribution (#6).
    OffMtLdl,
    /// Online LDL: the teacher labels each augmented batch (#7).
    OnLdl,
    /// Online ensemble LDL: the mean of the teachers' distributions on each batch (#8).
    OnEnLdl,
    /// Online multi-teacher LDL: the sum of the soft cross-entropies with each teacher (#9).
    OnMtLdl,
    /// OGR as a class-wise loss weight (supplement §6).
    OgrLoss,
    /// OGR as a label distribution built from the one-hot label (supplement §6).
    OgrLdl,
}

impl Method {
    /// Every method, in the order of docs/methods.md.
    pub const ALL: [Method; 12] = [
        Method::Vanilla,
        Method::Ls,
        Method::Kd,
        Method::Wsl,
        Method::OffLdl,
        Method::OffEnLdl,
        Method::OffMtLdl,
        Method::OnLdl,
        Method::OnEnLdl,
        Method::OnMtLdl,
        Method::OgrLoss,
        Method::OgrLdl,
    ];

    /// The method's name in stages.toml.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Vanilla => "vanilla",
            Method::Ls => "ls",
            Method::Kd => "kd",
            Method::Wsl => "wsl",
            Method::OffLdl => "off-ldl",
            Method::OffEnLdl => "off-en-ldl",
            Method::OffMtLdl => "off-mt-ldl",
            Method::OnLdl => "on-ldl",
            Method::OnEnLdl => "on-en-ldl",
            Method::OnMtLdl => "on-mt-ldl",
            Method::OgrLoss => "ogr-loss",
            Method::OgrLdl => "ogr-ldl",
        }
    }

    /// Whether the method reads a label store (the offline methods).
    pub fn reads_labels(&self) -> bool {
        matches!(self, Method::OffLdl | Method::OffEnLdl | Method::OffMtLdl)
    }

    /// How many teacher models (train stages in `needs`) the method takes. `kd`, `wsl` and
    /// `on-ldl` run one teacher, the first train stage in `needs` (so that one grid over methods
    /// can list the teachers of its ensemble cells); the ensemble methods run all of them.
    pub fn teachers(&self) -> Multiplicity {
        match self {
            Method::Kd | Method::Wsl | Method::OnLdl | Method::OnEnLdl | Method::OnMtLdl => {
                Multiplicity::OneOrMore
            }
            _ => Multiplicity::None,
        }
    }

    /// Whether the method needs per-class OGR weights (and so a validation split).
    pub fn uses_ogr(&self) -> bool {
        matches!(self, Method::OgrLoss | Method::OgrLdl)
    }
}

/// How the per-teacher terms of the multi-teacher methods are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TeacherReduction {
    /// Σ_n (the paper's formula for #6 and #9).
    #[default]
    Sum,
    /// (1/N) Σ_n.
    Mean,
}

/// A teacher run on every batch, in eval mode and without gradient.
pub struct Teacher {
    /// Its train stage.
    pub name: String,
    /// The model.
    pub model: Model,
}

/// What supervises a student: the method's stored labels or teachers, its per-class weights,
/// and reusable buffers for the targets (no allocation per batch once they have grown).
pub struct Supervision<'a> {
    p: &'a Params,
    k: usize,
    device: Device,
    /// Stored distributions: one source (off-ldl, off-en-ldl) or one per teacher (off-mt-ldl).
    pub stored: Vec<SoftLabels>,
    /// Teachers run online (kd, wsl, on-*).
    pub teachers: Vec<Teacher>,
    /// Per-class weights of the OGR methods (`K` values, mean 1; all 1 until measured).
    pub class_weights: Vec<f32>,
    rows: Vec<f32>,
    mixed: Vec<f32>,
    /// Uploads of the per-batch targets and labels (pinned and asynchronous on CUDA).
    targets_feed: crate::feed::Feeder,
    labels_feed: crate::feed::Feeder,
}

impl<'a> Supervision<'a> {
    /// Supervision of a `K`-class student by `p.method`, from stored labels and teachers.
    pub fn new(
        p: &'a Params,
        k: usize,
        device: &Device,
        stored: Vec<SoftLabels>,
        teachers: Vec<Teacher>,
    ) -> Supervision<'a> {
        Supervision {
            p,
            k,
            device: device.clone(),
            stored,
            teachers,
            class_weights: vec![1.0; k],
            rows: Vec::new(),
            mixed: Vec::new(),
            targets_feed: crate::feed::Feeder::new(),
            labels_feed: crate::feed::Feeder::new(),
        }
    }

    /// Targets `b × K`: `fill(slot, label, index, row)` writes each image's own target, then the
    /// rows are mixed by the batch's record.
    fn targets(
        &mut self,
        batch: &Batch,
        mut fill: impl FnMut(usize, u32, u32, &mut [f32]),
    ) -> Result<Tensor> {
        let (b, k) = (batch.len(), self.k);
        self.rows.resize(b * k, 0.0);
        for (slot, row) in self.rows.chunks_exact_mut(k).enumerate() {
            fill(slot, batch.labels[slot], batch.indices[slot], row);
        }
        let z = if batch.mix == MixRecord::None {
            &self.rows[..]
        } else {
            batch.mix.mix_rows(&self.rows, k, &mut self.mixed);
            &self.mixed[..]
        };
        Ok(self.targets_feed.upload(z, (b, k), &self.device)?)
    }

    /// One-hot targets (mixed when the batch is).
    fn hard(&mut self, batch: &Batch) -> Result<Tensor> {
        self.targets(batch, |_, label, _, row| {
            row.fill(0.0);
            row[label as usize] = 1.0;
        })
    }

    /// Cross-entropy with the hard labels: by index when unmixed, else with the mixed one-hots.
    fn hard_loss(&mut self, logits: &Tensor, batch: &Batch) -> Result<Tensor> {
        if batch.mix == MixRecord::None {
            let y = self
                .labels_feed
                .upload_u32(&batch.labels, batch.len(), &self.device)?;
            Ok(cross_entropy_per_sample(logits, &y)?)
        } else {
            let z = self.hard(batch)?;
            Ok(soft_cross_entropy_per_sample(logits, &z)?)
        }
    }

    /// Stored distribution `s` for each image (mixed when the batch is).
    fn stored_targets(&mut self, s: usize, batch: &Batch) -> Result<Tensor> {
        let store = std::mem::take(&mut self.stored);
        let t = self.targets(batch, |_, _, index, row| {
            store[s].row_into(index as usize, row)
        });
        self.stored = store;
        t
    }

    /// Teacher `n`'s logits on the batch's (augmented, mixed) images, eval mode, detached.
    fn teacher_logits(&self, n: usize, x: &Tensor) -> Result<Tensor> {
        Ok(self.teachers[n].model.net.forward_t(x, false)?.detach())
    }

    /// Teacher `n`'s distribution on the batch's images: its softmax, or with `teacher_mc = N`
    /// the mean of N Monte-Carlo dropout passes (features computed once; pass masks from
    /// (seed, MC stream, teacher, epoch, batch, pass)). Detached.
    fn teacher_probs(&self, n: usize, x: &Tensor, epoch: usize, batch: &Batch) -> Result<Tensor> {
        let net = &self.teachers[n].model.net;
        if self.p.teacher_mc == 0 {
            return Ok(candle_nn::ops::softmax(
                &self.teacher_logits(n, x)?,
                D::Minus1,
            )?);
        }
        let features = net.features_t(x, false)?.detach();
        let mut sum: Option<Tensor> = None;
        for pass in 0..self.p.teacher_mc {
            let seed = derive_seed(&[
                self.p.seed.unwrap_or_default(),
                stream::MC_DROPOUT,
                n as u64,
                epoch as u64,
                batch.index as u64,
                pass as u64,
            ]);
            let logits = net.head_with_dropout(&features, Some(seed))?;
            let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
            sum = Some(match sum {
                None => probs,
                Some(s) => (s + probs)?,
            });
        }
        let sum = sum.expect("teacher_mc > 0");
        Ok((sum / self.p.teacher_mc as f64)?.detach())
    }

    fn reduce(&self, terms: Vec<Tensor>) -> Result<Tensor> {
        let n = terms.len();
        let mut it = terms.into_iter();
        let mut total = it.next().expect("at least one term");
        for t in it {
            total = (total + t)?;
        }
        Ok(match self.p.mt_reduction {
            TeacherReduction::Sum => total,
            TeacherReduction::Mean => (total / n as f64)?,
        })
    }

    /// The per-sample loss (`b` values) of the student's `logits` on `batch`, whose images on the
    /// device are `x`; the stage minimises its mean.
    pub fn per_sample_loss(
        &mut self,
        logits: &Tensor,
        x: &Tensor,
        batch: &Batch,
        epoch: usize,
    ) -> Result<Tensor> {
        let p = self.p;
        let out = match p.method {
            Method::Vanilla => self.hard_loss(logits, batch)?,
            Method::Ls => {
                let (alpha, conv) = (p.ls_alpha as f32, p.ls_convention);
                let z = self.targets(batch, |_, label, _, row| {
                    smoothed_target(label as usize, alpha, conv, row)
                })?;
                soft_cross_entropy_per_sample(logits, &z)?
            }
            Method::Kd => {
                let t = self.teacher_logits(0, x)?;
                let ce = self.hard_loss(logits, batch)?;
                let kd = kd_per_sample(logits, &t, p.kd_tau, p.kd_reduction)?;
                ((ce * (1.0 - p.kd_lambda))? + (kd * p.kd_lambda)?)?
            }
            Method::Wsl => {
                let t = self.teacher_logits(0, x)?;
                let y = self.hard(batch)?;
                let ce = soft_cross_entropy_per_sample(logits, &y)?;
                let soft = wsl_per_sample(logits, &t, &y, p.wsl_tau)?;
                (ce + (soft * p.wsl_alpha)?)?
            }
            Method::OffLdl | Method::OffEnLdl => {
                let z = self.stored_targets(0, batch)?;
                soft_cross_entropy_per_sample(logits, &z)?
            }
            Method::OffMtLdl => {
                let mut terms = Vec::with_capacity(self.stored.len());
                for s in 0..self.stored.len() {
                    let z = self.stored_targets(s, batch)?;
                    terms.push(soft_cross_entropy_per_sample(logits, &z)?);
                }
                self.reduce(terms)?
            }
            Method::OnLdl => {
                let z = self.teacher_probs(0, x, epoch, batch)?;
                soft_cross_entropy_per_sample(logits, &z)?
            }
            Method::OnEnLdl => {
                let n = self.teachers.len();
                let mut sum = self.teacher_probs(0, x, epoch, batch)?;
                for t in 1..n {
                    sum = (sum + self.teacher_probs(t, x, epoch, batch)?)?;
                }
                let z = (sum / n as f64)?;
                soft_cross_entropy_per_sample(logits, &z)?
            }
            Method::OnMtLdl => {
                let mut terms = Vec::with_capacity(self.teachers.len());
                for t in 0..self.teachers.len() {
                    let z = self.teacher_probs(t, x, epoch, batch)?;
                    terms.push(soft_cross_entropy_per_sample(logits, &z)?);
                }
                self.reduce(terms)?
            }
            Method::OgrLoss => {
                let y = self.hard(batch)?;
                let w = Tensor::from_slice(&self.class_weights, self.k, &self.device)?;
                weighted_soft_cross_entropy_per_sample(logits, &y, &w)?
            }
            Method::OgrLdl => {
                let dist = ogr_distribution_base(&self.class_weights);
                let alpha = p.ogr_alpha as f32;
                let z = self.targets(batch, |_, label, _, row| {
                    ogr_target(label as usize, alpha, &dist, row)
                })?;
                soft_cross_entropy_per_sample(logits, &z)?
            }
        };
        Ok(out)
    }
}

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

    fn params(method: &str) -> Params {
        serde_json::from_value(serde_json::json!({ "method": method, "seed": 0 })).unwrap()
    }

    /// A batch of 4 random 3 × 8 × 8 images mixed by mixup, with its unmixed images.
    fn mixed_batch() -> Batch {
        use rand::SeedableRng;
        let (n, c, h, w) = (4, 3, 8, 8);
        let unmixed: Vec<f32> = crate::models::testing::random(&[n, c, h, w], -1.0..1.0, 7)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let mix = datasets::mix::draw(
            &datasets::mix::Mix::Mixup { alpha: 1.0 },
            n,
            (h, w),
            &mut rng,
        );
        let mut images = vec![0f32; unmixed.len()];
        mix.apply(&unmixed, &mut images, (c, h, w));
        assert!(images != unmixed, "the draw mixed nothing");
        Batch {
            index: 0,
            images,
            labels: vec![0, 1, 2, 0],
            indices: vec![0, 1, 2, 3],
            mix,
            unmixed,
        }
    }

    fn teacher(k: usize) -> Teacher {
        let spec = crate::models::ModelSpec::new("resnet8", k, 3).unwrap();
        Teacher {
            name: "t".into(),
            model: Model::new(&spec, &Device::Cpu, 11).unwrap(),
        }
    }

    fn close(a: &Tensor, b: &Tensor) -> bool {
        crate::models::testing::max_rel(a, b) < 1e-5
    }

    #[test]
    fn online_teachers_label_the_augmented_images() {
        let (k, d) = (3, &Device::Cpu);
        let batch = mixed_batch();
        let x = Tensor::from_slice(&batch.images, (4, 3, 8, 8), d).unwrap();
        let x_unmixed = Tensor::from_slice(&batch.unmixed, (4, 3, 8, 8), d).unwrap();
        let student = crate::models::testing::random(&[4, k], -2.0..2.0, 5);
        let p = params("on-ldl");
        let t = teacher(k);
        let probs = |x: &Tensor| {
            candle_nn::ops::softmax(&t.model.net.forward_t(x, false).unwrap(), D::Minus1).unwrap()
        };
        let on_mixed = soft_cross_entropy_per_sample(&student, &probs(&x)).unwrap();
        let on_unmixed = soft_cross_entropy_per_sample(&student, &probs(&x_unmixed)).unwrap();
        // The teacher's output depends on its input: the two differ.
        assert!(!close(&on_mixed, &on_unmixed));
        let mut sup = Supervision::new(&p, k, d, Vec::new(), vec![teacher(k)]);
        let got = sup.per_sample_loss(&student, &x, &batch, 0).unwrap();
        assert!(close(&got, &on_mixed), "{got} vs {on_mixed}");
        // ... and the mixed hard label ŷ is not what it learns from.
        let mut hard = Supervision::new(&p, k, d, Vec::new(), Vec::new());
        let y = hard.hard(&batch).unwrap();
        assert!(!close(
            &got,
            &soft_cross_entropy_per_sample(&student, &y).unwrap()
        ));
    }

    #[test]
    fn mixed_targets_are_distributions_mixed_with_the_image_weights() {
        let (k, d) = (3, &Device::Cpu);
        let batch = mixed_batch();
        let p = params("ls");
        let mut sup = Supervision::new(&p, k, d, Vec::new(), Vec::new());
        let (alpha, conv) = (0.1f32, crate::losses::SmoothingConvention::Paper);
        for z in [
            sup.hard(&batch).unwrap(),
            sup.targets(&batch, |_, label, _, row| {
                smoothed_target(label as usize, alpha, conv, row)
            })
            .unwrap(),
        ] {
            let rows = z.to_vec2::<f32>().unwrap();
            for (i, row) in rows.iter().enumerate() {
                assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6, "{row:?}");
                // Image i's weight λ on its own label and 1 − λ on its partner's.
                if let MixRecord::Mixup { lambda, partner } = &batch.mix {
                    let j = partner[i] as usize;
                    let (yi, yj) = (batch.labels[i] as usize, batch.labels[j] as usize);
                    if yi != yj && rows[i].iter().all(|&v| v == 0.0 || v > 0.05) {
                        assert!((row[yi] - lambda).abs() < 1e-6, "{row:?} λ={lambda}");
                        assert!((row[yj] - (1.0 - lambda)).abs() < 1e-6);
                    }
                }
            }
        }
    }

    #[test]
    fn kd_and_multi_teacher_losses_combine_their_terms_as_documented() {
        let (k, d) = (3, &Device::Cpu);
        let batch = mixed_batch();
        let x = Tensor::from_slice(&batch.images, (4, 3, 8, 8), d).unwrap();
        let s = crate::models::testing::random(&[4, k], -2.0..2.0, 9);
        // kd: (1 − 0.1)·CE(ŷ) + 0.1·τ²·KL at τ = 3.
        let p = params("kd");
        let mut sup = Supervision::new(&p, k, d, Vec::new(), vec![teacher(k)]);
        let y = sup.hard(&batch).unwrap();
        let t = sup.teacher_logits(0, &x).unwrap();
        let want = ((soft_cross_entropy_per_sample(&s, &y).unwrap() * 0.9).unwrap()
            + (kd_per_sample(&s, &t, 3.0, crate::losses::KdReduction::Batchmean).unwrap() * 0.1)
                .unwrap())
        .unwrap();
        assert!(close(
            &sup.per_sample_loss(&s, &x, &batch, 0).unwrap(),
            &want
        ));
        // on-mt-ldl with two copies of one teacher: twice on-ldl's loss (sum over teachers).
        let mt = params("on-mt-ldl");
        let one = params("on-ldl");
        let a = Supervision::new(&mt, k, d, Vec::new(), vec![teacher(k), teacher(k)])
            .per_sample_loss(&s, &x, &batch, 0)
            .unwrap();
        let b = Supervision::new(&one, k, d, Vec::new(), vec![teacher(k)])
            .per_sample_loss(&s, &x, &batch, 0)
            .unwrap();
        assert!(close(&a, &(b * 2.0).unwrap()));
    }
}
