//! How each training method supervises a student: which targets each sample of a batch gets
//! and which per-sample loss the student minimises. The train stage owns the loop; this module
//! owns the supervision. Every formula is written out in docs/methods.md.
//!
//! Targets follow the batch's mixing record: a mixed image's hard, smoothed or stored target is
//! the mix of its sources' targets with the images' weights (ŷ = Σ λ_p y_p), while online
//! teachers label the mixed images themselves and ŷ is not used.

use super::crd::{Crd, CrdConfig};
use super::methods::{Method, TeacherReduction};
use super::ogr::{ogr_distribution_base, ogr_target};
use super::sskd::{Sskd, SskdConfig};
use crate::error::{Result, StageError};
use crate::label_store::SoftLabels;
use crate::replay_store::Output;
use candle_core::{Device, Tensor, D};
use datasets::augment::Normalize;
use datasets::loader::Batch;
use datasets::mix::MixRecord;
use datasets::rng::{derive_seed, stream};
use engine::feed::Feeder;
use engine::losses::{
    cross_entropy_per_sample, kd_per_sample, smoothed_target, soft_cross_entropy_per_sample,
    weighted_soft_cross_entropy_per_sample, wsl_per_sample, KdReduction, SmoothingConvention,
};
use engine::models::Model;

/// A method and its settings (the method keys of a train stage). The defaults are the paper's
/// where it gives them (LS α, KD λ and τ) and otherwise the methods' own papers' CIFAR-100
/// settings (WSL, CRD, SSKD).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SupervisionConfig {
    /// The method.
    pub method: Method,
    /// `ls`: the smoothing mass α.
    pub ls_alpha: f64,
    /// `ls`: how α is spread.
    pub ls_convention: SmoothingConvention,
    /// `kd`: weight λ of the distillation term.
    pub kd_lambda: f64,
    /// `kd`: temperature τ.
    pub kd_tau: f64,
    /// `kd`: how the KL divergence is reduced over classes.
    pub kd_reduction: KdReduction,
    /// `kd`: whether the KL term is multiplied by τ² (Hinton et al.) or not (the paper's §3.1
    /// formula as printed).
    pub kd_tau_squared: bool,
    /// `wsl`: weight α of the soft term.
    pub wsl_alpha: f64,
    /// `wsl`: temperature τ.
    pub wsl_tau: f64,
    /// Multi-teacher methods: how the per-teacher terms combine.
    pub mt_reduction: TeacherReduction,
    /// Online methods: Monte-Carlo dropout passes of each teacher per batch (0: its softmax).
    pub teacher_mc: usize,
    /// `ogr-ldl`: the mass α spread by the OGR weights.
    pub ogr_alpha: f64,
    /// `crd`, `crd-kd`: the contrastive objective's settings.
    pub crd: CrdConfig,
    /// `crd`, `crd-kd`: weight β of the contrastive term.
    pub crd_beta: f64,
    /// `crd-kd`: weight α of the KD term.
    pub crd_kd_alpha: f64,
    /// `crd-kd`: temperature τ of the KD term.
    pub crd_kd_tau: f64,
    /// `sskd`: its weights, temperatures and keep ratios.
    pub sskd: SskdConfig,
    /// Seed of the teachers' Monte-Carlo dropout masks (the student's data seed).
    pub seed: u64,
}

impl Default for SupervisionConfig {
    fn default() -> Self {
        SupervisionConfig {
            method: Method::Vanilla,
            ls_alpha: 0.1,
            ls_convention: SmoothingConvention::default(),
            kd_lambda: 0.1,
            kd_tau: 3.0,
            kd_reduction: KdReduction::default(),
            kd_tau_squared: true,
            // WSL's CIFAR-100 settings (its §5; the paper's WSL rows are CIFAR-100).
            wsl_alpha: 2.25,
            wsl_tau: 4.0,
            mt_reduction: TeacherReduction::default(),
            teacher_mc: 0,
            ogr_alpha: 0.1,
            crd: CrdConfig::default(),
            crd_beta: 0.8,
            crd_kd_alpha: 1.0,
            crd_kd_tau: 4.0,
            sskd: SskdConfig::default(),
            seed: 0,
        }
    }
}

/// A teacher run on every batch, in eval mode and without gradient.
pub struct Teacher {
    /// Its train or import stage.
    pub name: String,
    /// The model.
    pub model: Model,
    /// For a teacher that expects another input normalisation than the student's (an imported
    /// model): the per-channel `(scale, shift)`, each `1 × C × 1 × 1`, that turn the student's
    /// normalised images into the teacher's, `x·scale + shift`.
    pub renormalize: Option<(Tensor, Tensor)>,
}

impl Teacher {
    /// The teacher `name` with `model`, expecting images normalised by `own` (an imported
    /// model's statistics) when they differ from the student's `dataset` normalisation. A
    /// teacher runs in evaluation mode on every batch: `model` as `TrainedModel::load` gives
    /// it, its evaluation-mode passes through the planned program (`Net::plan_inference`).
    pub fn new(
        name: &str,
        model: Model,
        own: Option<&Normalize>,
        dataset: &Normalize,
        device: &Device,
    ) -> Result<Teacher> {
        let renormalize = match own {
            Some(own) if own != dataset => Some(renormalization(dataset, own, device)?),
            _ => None,
        };
        Ok(Teacher {
            name: name.to_owned(),
            model,
            renormalize,
        })
    }

    /// The teacher's view of the student's batch `x`.
    fn input(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.renormalize {
            None => x.clone(),
            Some((scale, shift)) => x.broadcast_mul(scale)?.broadcast_add(shift)?,
        })
    }
}

/// The per-channel `(scale, shift)` turning images normalised by `from` into images
/// normalised by `to`: `(x·σ_from + μ_from − μ_to) / σ_to`.
pub fn renormalization(
    from: &Normalize,
    to: &Normalize,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let c = to.mean.len();
    if from.mean.len() != c {
        return Err(StageError::config(format!(
            "a teacher expects {c}-channel images, the dataset has {}",
            from.mean.len()
        )));
    }
    let scale: Vec<f32> = (0..c).map(|i| from.std[i] / to.std[i]).collect();
    let shift: Vec<f32> = (0..c)
        .map(|i| (from.mean[i] - to.mean[i]) / to.std[i])
        .collect();
    Ok((
        Tensor::from_vec(scale, (1, c, 1, 1), device)?,
        Tensor::from_vec(shift, (1, c, 1, 1), device)?,
    ))
}

/// What supervises a student: the method's stored labels or teachers, its per-class weights,
/// and reusable buffers for the targets (no allocation per batch once they have grown).
pub struct Supervision {
    p: SupervisionConfig,
    k: usize,
    device: Device,
    /// Stored distributions: one source (off-ldl, off-en-ldl) or one per teacher (off-mt-ldl).
    pub stored: Vec<SoftLabels>,
    /// Teachers run online (kd, wsl, on-*); none when their outputs are replayed.
    pub teachers: Vec<Teacher>,
    /// The teachers' outputs on the current batch, read from a replay store, and what they are.
    replayed: Option<(Vec<Tensor>, Output)>,
    /// Per-class weights of the OGR methods (`K` values, mean 1; all 1 until measured).
    pub class_weights: Vec<f32>,
    /// CRD's heads and memories (`crd`, `crd-kd`; set by the train stage).
    pub crd: Option<Crd>,
    /// SSKD's heads (`sskd`; set by the train stage).
    pub sskd: Option<Sskd>,
    rows: Vec<f32>,
    mixed: Vec<f32>,
    /// Uploads of the per-batch targets and labels (pinned and asynchronous on CUDA).
    targets_feed: Feeder,
    labels_feed: Feeder,
}

impl Supervision {
    /// Supervision of a `K`-class student by `p.method`, from stored labels and teachers.
    pub fn new(
        p: SupervisionConfig,
        k: usize,
        device: &Device,
        stored: Vec<SoftLabels>,
        teachers: Vec<Teacher>,
    ) -> Supervision {
        Supervision {
            p,
            k,
            device: device.clone(),
            stored,
            teachers,
            replayed: None,
            class_weights: vec![1.0; k],
            crd: None,
            sskd: None,
            rows: Vec::new(),
            mixed: Vec::new(),
            targets_feed: Feeder::new(),
            labels_feed: Feeder::new(),
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

    /// Sets the teachers' outputs on the next batch, `b × K` each on the device, read from a
    /// replay store instead of running the teachers.
    pub fn set_replayed(&mut self, outputs: Vec<Tensor>, output: Output) {
        self.replayed = Some((outputs, output));
    }

    /// How many teachers supervise the student (run or replayed).
    fn teacher_count(&self) -> usize {
        match &self.replayed {
            Some((r, _)) => r.len(),
            None => self.teachers.len(),
        }
    }

    /// What a replay store keeps of teacher `n` on the batch: its logits, or its
    /// distribution (Monte-Carlo mean or softmax) — exactly what the student would compute.
    pub fn teacher_output(
        &self,
        n: usize,
        x: &Tensor,
        epoch: usize,
        batch: &Batch,
        output: Output,
    ) -> Result<Tensor> {
        match output {
            Output::Logits => self.teacher_logits(n, x),
            Output::Probs => self.teacher_probs(n, x, epoch, batch),
        }
    }

    /// Teacher `n`'s logits on the batch's (augmented, mixed) images, eval mode, detached.
    fn teacher_logits(&self, n: usize, x: &Tensor) -> Result<Tensor> {
        if let Some((r, output)) = &self.replayed {
            debug_assert_eq!(*output, Output::Logits, "the store was checked");
            return Ok(r[n].clone());
        }
        let t = &self.teachers[n];
        Ok(t.model.net.forward_t(&t.input(x)?, false)?.detach())
    }

    /// Teacher `n`'s distribution on the batch's images: its softmax, or with `teacher_mc = N`
    /// the mean of N Monte-Carlo dropout passes (features computed once; pass masks from
    /// (seed, MC stream, teacher, epoch, batch, pass)). Detached.
    fn teacher_probs(&self, n: usize, x: &Tensor, epoch: usize, batch: &Batch) -> Result<Tensor> {
        if let Some((r, Output::Probs)) = &self.replayed {
            return Ok(r[n].clone());
        }
        if self.p.teacher_mc == 0 {
            return Ok(candle_nn::ops::softmax(
                &self.teacher_logits(n, x)?,
                D::Minus1,
            )?);
        }
        let net = &self.teachers[n].model.net;
        let features = net.features_t(&self.teachers[n].input(x)?, false)?.detach();
        let mut sum: Option<Tensor> = None;
        for pass in 0..self.p.teacher_mc {
            let seed = derive_seed(&[
                self.p.seed,
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

    /// The mean of the first `n` (≥ 1) teachers' distributions on the batch's images
    /// (`on-en-ldl`'s target; see `teacher_probs`).
    pub fn mean_teacher_probs(
        &self,
        n: usize,
        x: &Tensor,
        epoch: usize,
        batch: &Batch,
    ) -> Result<Tensor> {
        let mut sum = self.teacher_probs(0, x, epoch, batch)?;
        for t in 1..n {
            sum = (sum + self.teacher_probs(t, x, epoch, batch)?)?;
        }
        Ok((sum / n as f64)?)
    }

    /// CE + β·CRD, plus α·τ²·KL(teacher ‖ student) for `crd-kd` (RepDistiller's
    /// `gamma·loss_cls + alpha·loss_div + beta·loss_kd`).
    fn crd_loss(
        &mut self,
        logits: &Tensor,
        f_s: &Tensor,
        x: &Tensor,
        batch: &Batch,
        epoch: usize,
    ) -> Result<Tensor> {
        let p = self.p;
        let teacher = self
            .teachers
            .first()
            .ok_or_else(|| StageError::config(format!("{} needs a teacher", p.method.as_str())))?;
        let t_in = teacher.input(x)?;
        let (f_t, t_logits) = teacher
            .model
            .net
            .features_and_logits(&t_in, engine::models::Mode::EVAL)?;
        let (f_t, t_logits) = (f_t.detach(), t_logits.detach());
        let crd = self.crd.as_mut().ok_or_else(|| {
            StageError::config(format!("{}: CRD was not set up", p.method.as_str()))
        })?;
        let at = (epoch, batch.index);
        let contrastive = crd.batch_loss(f_s, &f_t, &batch.indices, &batch.labels, at)?;
        let mut total = (self.hard_loss(logits, batch)? + (contrastive * p.crd_beta)?)?;
        if p.method == Method::CrdKd {
            let kd = kd_per_sample(logits, &t_logits, p.crd_kd_tau, KdReduction::Batchmean)?;
            total = (total + (kd * p.crd_kd_alpha)?)?;
        }
        Ok(total)
    }

    /// SSKD's loss of each original image from the student's logits and features on the `4B`
    /// views of `x` (view-major) and the teacher's.
    fn sskd_loss(
        &mut self,
        logits: &Tensor,
        f_s: &Tensor,
        x: &Tensor,
        batch: &Batch,
    ) -> Result<Tensor> {
        let teacher = self
            .teachers
            .first()
            .ok_or_else(|| StageError::config("sskd needs a teacher"))?;
        let (f_t, t_logits) = teacher
            .model
            .net
            .features_and_logits(&teacher.input(x)?, engine::models::Mode::EVAL)?;
        let (f_t, t_logits) = (f_t.detach(), t_logits.detach());
        let y = self
            .labels_feed
            .upload_u32(&batch.labels, batch.len(), &self.device)?;
        let sskd = self
            .sskd
            .as_ref()
            .ok_or_else(|| StageError::config("sskd: its heads were not set up"))?;
        sskd.per_sample_loss(logits, f_s, &t_logits, &f_t, &y)
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
    /// device are `x`; the stage minimises its mean. `features`, the student's penultimate
    /// features, are needed by the methods that [`Method::uses_features`].
    pub fn per_sample_loss(
        &mut self,
        logits: &Tensor,
        features: Option<&Tensor>,
        x: &Tensor,
        batch: &Batch,
        epoch: usize,
    ) -> Result<Tensor> {
        let p = self.p;
        Ok(match p.method {
            Method::Crd | Method::CrdKd => {
                let f_s = student_features(p.method, features)?;
                self.crd_loss(logits, f_s, x, batch, epoch)?
            }
            Method::Sskd => {
                let f_s = student_features(p.method, features)?;
                self.sskd_loss(logits, f_s, x, batch)?
            }
            Method::SskdHead => return Err(StageError::config(SSKD_HEAD_HAS_NO_STUDENT)),
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
                let mut kd = kd_per_sample(logits, &t, p.kd_tau, p.kd_reduction)?;
                if !p.kd_tau_squared {
                    kd = (kd / (p.kd_tau * p.kd_tau))?;
                }
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
                let z = self.mean_teacher_probs(self.teacher_count(), x, epoch, batch)?;
                soft_cross_entropy_per_sample(logits, &z)?
            }
            Method::OnMtLdl => {
                let mut terms = Vec::with_capacity(self.teacher_count());
                for t in 0..self.teacher_count() {
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
        })
    }
}

/// Why [`Supervision::per_sample_loss`] has nothing to compute for `sskd-head`.
const SSKD_HEAD_HAS_NO_STUDENT: &str =
    "sskd-head trains a teacher's head, not a student: its loss is the trainer's";

/// The student's penultimate features, which `method` (one that [`Method::uses_features`])
/// cannot do without.
fn student_features(method: Method, features: Option<&Tensor>) -> Result<&Tensor> {
    features.ok_or_else(|| {
        StageError::config(format!("{}: needs the student's features", method.as_str()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(method: &str) -> SupervisionConfig {
        let method = Method::ALL
            .into_iter()
            .find(|m| m.as_str() == method)
            .unwrap();
        SupervisionConfig {
            method,
            ..SupervisionConfig::default()
        }
    }

    /// A batch of 4 random 3 × 8 × 8 images mixed by mixup, with its unmixed images.
    fn mixed_batch() -> Batch {
        use rand::SeedableRng;
        let (n, c, h, w) = (4, 3, 8, 8);
        let unmixed: Vec<f32> = engine::models::testing::random(&[n, c, h, w], -1.0..1.0, 7)
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
            views: 1,
            mix,
            unmixed,
        }
    }

    fn teacher(k: usize) -> Teacher {
        teacher_seeded(k, 11)
    }

    fn teacher_seeded(k: usize, seed: u64) -> Teacher {
        let spec = engine::models::ModelSpec::new("resnet8", k, 3).unwrap();
        Teacher {
            name: "t".into(),
            model: Model::new(&spec, &Device::Cpu, seed).unwrap(),
            renormalize: None,
        }
    }

    fn close(a: &Tensor, b: &Tensor) -> bool {
        engine::models::testing::max_rel(a, b) < 1e-5
    }

    #[test]
    fn online_teachers_label_the_augmented_images() {
        let (k, d) = (3, &Device::Cpu);
        let batch = mixed_batch();
        let x = Tensor::from_slice(&batch.images, (4, 3, 8, 8), d).unwrap();
        let x_unmixed = Tensor::from_slice(&batch.unmixed, (4, 3, 8, 8), d).unwrap();
        let student = engine::models::testing::random(&[4, k], -2.0..2.0, 5);
        let p = params("on-ldl");
        let t = teacher(k);
        let probs = |x: &Tensor| {
            candle_nn::ops::softmax(&t.model.net.forward_t(x, false).unwrap(), D::Minus1).unwrap()
        };
        let on_mixed = soft_cross_entropy_per_sample(&student, &probs(&x)).unwrap();
        let on_unmixed = soft_cross_entropy_per_sample(&student, &probs(&x_unmixed)).unwrap();
        // The teacher's output depends on its input: the two differ.
        assert!(!close(&on_mixed, &on_unmixed));
        let mut sup = Supervision::new(p, k, d, Vec::new(), vec![teacher(k)]);
        let got = sup.per_sample_loss(&student, None, &x, &batch, 0).unwrap();
        assert!(close(&got, &on_mixed), "{got} vs {on_mixed}");
        // ... and the mixed hard label ŷ is not what it learns from.
        let mut hard = Supervision::new(p, k, d, Vec::new(), Vec::new());
        let y = hard.hard(&batch).unwrap();
        assert!(!close(
            &got,
            &soft_cross_entropy_per_sample(&student, &y).unwrap()
        ));
    }

    /// A mixup batch written by hand: labels (0, 1, 2, 0), λ = 0.7, partners (1, 0, 3, 2), so
    /// image i is 0.7·x_i + 0.3·x_partner(i) and its hard target 0.7 on y_i, 0.3 on y_partner(i).
    fn hand_mixup_batch() -> Batch {
        let images: Vec<f32> = engine::models::testing::random(&[4, 3, 8, 8], -1.0..1.0, 7)
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        Batch {
            index: 0,
            unmixed: images.clone(),
            images,
            labels: vec![0, 1, 2, 0],
            indices: vec![0, 1, 2, 3],
            views: 1,
            mix: MixRecord::Mixup {
                lambda: 0.7,
                partner: vec![1, 0, 3, 2],
            },
        }
    }

    /// Student logits whose softmax is known: (1, 2, 3)/6, (3, 1, 2)/6, uniform, and
    /// softmax(1, −1, 0.5).
    fn hand_logits(d: &Device) -> Tensor {
        let (l2, l3) = (2f32.ln(), 3f32.ln());
        Tensor::from_slice(
            &[0.0, l2, l3, l3, 0.0, l2, 0.0, 0.0, 0.0, 1.0, -1.0, 0.5],
            (4, 3),
            d,
        )
        .unwrap()
    }

    fn assert_rows(got: &Tensor, want: &[[f32; 3]]) {
        let rows = got.to_vec2::<f32>().unwrap();
        for (row, w) in rows.iter().zip(want) {
            for (a, b) in row.iter().zip(w) {
                assert!((a - b).abs() < 1e-6, "{rows:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn label_smoothing_of_a_mixed_batch_by_hand() {
        let (k, d) = (3, &Device::Cpu);
        let batch = hand_mixup_batch();
        let mut sup = Supervision::new(params("ls"), k, d, Vec::new(), Vec::new());
        // Hard: 0.7 on the own label, 0.3 on the partner's.
        let hard = sup.hard(&batch).unwrap();
        assert_rows(
            &hard,
            &[
                [0.7, 0.3, 0.0],
                [0.3, 0.7, 0.0],
                [0.3, 0.0, 0.7],
                [0.7, 0.0, 0.3],
            ],
        );
        // Smoothed (eq. 2, K = 3, α = 0.1): 0.9 on the label, 0.05 on each other class, then
        // mixed: image 0 = 0.7·(0.9, 0.05, 0.05) + 0.3·(0.05, 0.9, 0.05) = (0.645, 0.305, 0.05),
        // and likewise for the others.
        let conv = engine::losses::SmoothingConvention::Paper;
        let z = sup
            .targets(&batch, |_, label, _, row| {
                smoothed_target(label as usize, 0.1, conv, row)
            })
            .unwrap();
        let want_z = [
            [0.645, 0.305, 0.05],
            [0.305, 0.645, 0.05],
            [0.305, 0.05, 0.645],
            [0.645, 0.05, 0.305],
        ];
        assert_rows(&z, &want_z);
        // The loss is −Σ z_k log p_k with p the student's softmax: image 0,
        // −(0.645 ln 1/6 + 0.305 ln 1/3 + 0.05 ln 1/2) = 1.525419; image 2 (uniform p) ln 3.
        let x = Tensor::from_slice(&batch.images, (4, 3, 8, 8), d).unwrap();
        let loss = sup
            .per_sample_loss(&hand_logits(d), None, &x, &batch, 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let want = [1.525419f32, 1.422025, 1.098612, 0.807457];
        for (a, b) in loss.iter().zip(want) {
            assert!((a - b).abs() < 2e-5, "{loss:?} vs {want:?}");
        }
    }

    /// softmax(row / t) in f64.
    fn softmax64(row: &[f32], t: f64) -> Vec<f64> {
        let m = row
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
        let e: Vec<f64> = row.iter().map(|&v| (v as f64 / t - m).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }

    #[test]
    fn kd_and_multi_teacher_losses_against_a_reference_in_f64() {
        let (k, d) = (3, &Device::Cpu);
        let batch = hand_mixup_batch();
        let x = Tensor::from_slice(&batch.images, (4, 3, 8, 8), d).unwrap();
        let s = hand_logits(d);
        let srows = s.to_vec2::<f32>().unwrap();
        let hard = [
            [0.7, 0.3, 0.0],
            [0.3, 0.7, 0.0],
            [0.3, 0.0, 0.7],
            [0.7, 0.0, 0.3],
        ];
        // Teacher outputs, read from the teachers themselves (the reference below only needs
        // their logits).
        let (ta, tb) = (teacher(k), teacher_seeded(k, 12));
        let logits_of = |t: &Teacher| {
            t.model
                .net
                .forward_t(&x, false)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let (la, lb) = (logits_of(&ta), logits_of(&tb));
        // kd (λ = 0.1, τ = 3, batchmean): 0.9·CE(ŷ, p_s) + 0.1·τ²·Σ_k q_k (ln q_k − ln p_k) with
        // q = softmax(t/τ), p = softmax(s/τ).
        // With kd_tau_squared = false, the paper's §3.1 formula: the KL term without τ².
        let tau = 3.0;
        for (tau_squared, scale) in [(true, tau * tau), (false, 1.0)] {
            let want_kd: Vec<f64> = (0..4)
                .map(|i| {
                    let p1 = softmax64(&srows[i], 1.0);
                    let ce: f64 = (0..k).map(|c| -hard[i][c] * p1[c].ln()).sum();
                    let (q, p) = (softmax64(&la[i], tau), softmax64(&srows[i], tau));
                    let kl: f64 = (0..k).map(|c| q[c] * (q[c].ln() - p[c].ln())).sum();
                    0.9 * ce + 0.1 * scale * kl
                })
                .collect();
            let config = SupervisionConfig {
                kd_tau_squared: tau_squared,
                ..params("kd")
            };
            let mut sup = Supervision::new(config, k, d, Vec::new(), vec![teacher(k)]);
            let got = sup.per_sample_loss(&s, None, &x, &batch, 0).unwrap();
            let got = got.to_vec1::<f32>().unwrap();
            for (a, b) in got.iter().zip(&want_kd) {
                assert!(
                    (*a as f64 - b).abs() < 1e-5 * b.abs().max(1.0),
                    "τ² {tau_squared}: {got:?} vs {want_kd:?}"
                );
            }
        }
        // on-mt-ldl (sum): Σ_n −Σ_k softmax(t_n)_k ln softmax(s)_k over two different teachers.
        let want_mt: Vec<f64> = (0..4)
            .map(|i| {
                let p = softmax64(&srows[i], 1.0);
                [&la[i], &lb[i]]
                    .iter()
                    .map(|t| {
                        let q = softmax64(t, 1.0);
                        (0..k).map(|c| -q[c] * p[c].ln()).sum::<f64>()
                    })
                    .sum()
            })
            .collect();
        let got = Supervision::new(params("on-mt-ldl"), k, d, Vec::new(), vec![ta, tb])
            .per_sample_loss(&s, None, &x, &batch, 0)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (a, b) in got.iter().zip(&want_mt) {
            assert!(
                (*a as f64 - b).abs() < 1e-5 * b.abs().max(1.0),
                "{got:?} vs {want_mt:?}"
            );
        }
    }

    /// A pixel normalised by the dataset's statistics, renormalised, is the pixel normalised by
    /// the teacher's: (u − μ_t)/σ_t, computed here by hand for u = 0.25, 0.5, 0.75.
    #[test]
    fn renormalisation_turns_the_datasets_normalisation_into_the_teachers() {
        let from = Normalize {
            mean: vec![0.5, 0.4, 0.3],
            std: vec![0.25, 0.2, 0.1],
        };
        let to = Normalize {
            mean: vec![0.485, 0.456, 0.406],
            std: vec![0.229, 0.224, 0.225],
        };
        let (scale, shift) = renormalization(&from, &to, &Device::Cpu).unwrap();
        let u = [0.25f32, 0.5, 0.75];
        let x: Vec<f32> = (0..3)
            .flat_map(|c| {
                u.iter()
                    .map(move |v| (v - [0.5, 0.4, 0.3][c]) / [0.25, 0.2, 0.1][c])
            })
            .collect();
        let x = Tensor::from_vec(x, (1, 3, 1, 3), &Device::Cpu).unwrap();
        let got = x
            .broadcast_mul(&scale)
            .unwrap()
            .broadcast_add(&shift)
            .unwrap();
        let got = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let want = [
            // (0.25 − 0.485)/0.229, (0.5 − 0.485)/0.229, (0.75 − 0.485)/0.229, ...
            -1.026_200_9,
            0.065_502_18,
            1.157_205_2,
            -0.919_642_86,
            0.196_428_57,
            1.312_5,
            -0.693_333_3,
            0.417_777_8,
            1.528_889,
        ];
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
        let four = Normalize {
            mean: vec![0.5; 4],
            std: vec![0.25; 4],
        };
        assert!(renormalization(&four, &to, &Device::Cpu).is_err());
    }
}
