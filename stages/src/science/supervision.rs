//! How each training method supervises a student: which targets each sample of a batch gets
//! and which per-sample loss the student minimises. The train stage owns the loop; this module
//! owns the supervision. Every formula is written out in docs/methods.md.
//!
//! Targets follow the batch's mixing record: a mixed image's hard, smoothed or stored target is
//! the mix of its sources' targets with the images' weights (ŷ = Σ λ_p y_p), while online
//! teachers label the mixed images themselves and ŷ is not used.

use super::methods::{Method, TeacherReduction};
use super::ogr::{ogr_distribution_base, ogr_target};
use crate::error::Result;
use crate::label_store::SoftLabels;
use candle_core::{Device, Tensor, D};
use datasets::loader::Batch;
use datasets::mix::MixRecord;
use datasets::rng::{derive_seed, stream};
use engine::feed::Feeder;
use engine::losses::{
    cross_entropy_per_sample, kd_per_sample, smoothed_target, soft_cross_entropy_per_sample,
    weighted_soft_cross_entropy_per_sample, wsl_per_sample, KdReduction, SmoothingConvention,
};
use engine::models::Model;

/// A method and its settings (the method keys of a train stage); the defaults are the paper's.
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
    /// Seed of the teachers' Monte-Carlo dropout masks (the student's seed).
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
            wsl_alpha: 2.5,
            wsl_tau: 2.0,
            mt_reduction: TeacherReduction::default(),
            teacher_mc: 0,
            ogr_alpha: 0.1,
            seed: 0,
        }
    }
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
pub struct Supervision {
    p: SupervisionConfig,
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
            class_weights: vec![1.0; k],
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
            mix,
            unmixed,
        }
    }

    fn teacher(k: usize) -> Teacher {
        let spec = engine::models::ModelSpec::new("resnet8", k, 3).unwrap();
        Teacher {
            name: "t".into(),
            model: Model::new(&spec, &Device::Cpu, 11).unwrap(),
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
        let got = sup.per_sample_loss(&student, &x, &batch, 0).unwrap();
        assert!(close(&got, &on_mixed), "{got} vs {on_mixed}");
        // ... and the mixed hard label ŷ is not what it learns from.
        let mut hard = Supervision::new(p, k, d, Vec::new(), Vec::new());
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
        let mut sup = Supervision::new(p, k, d, Vec::new(), Vec::new());
        let (alpha, conv) = (0.1f32, engine::losses::SmoothingConvention::Paper);
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
        let s = engine::models::testing::random(&[4, k], -2.0..2.0, 9);
        // kd: (1 − 0.1)·CE(ŷ) + 0.1·τ²·KL at τ = 3.
        let p = params("kd");
        let mut sup = Supervision::new(p, k, d, Vec::new(), vec![teacher(k)]);
        let y = sup.hard(&batch).unwrap();
        let t = sup.teacher_logits(0, &x).unwrap();
        let want = ((soft_cross_entropy_per_sample(&s, &y).unwrap() * 0.9).unwrap()
            + (kd_per_sample(&s, &t, 3.0, engine::losses::KdReduction::Batchmean).unwrap() * 0.1)
                .unwrap())
        .unwrap();
        assert!(close(
            &sup.per_sample_loss(&s, &x, &batch, 0).unwrap(),
            &want
        ));
        // on-mt-ldl with two copies of one teacher: twice on-ldl's loss (sum over teachers).
        let mt = params("on-mt-ldl");
        let one = params("on-ldl");
        let a = Supervision::new(mt, k, d, Vec::new(), vec![teacher(k), teacher(k)])
            .per_sample_loss(&s, &x, &batch, 0)
            .unwrap();
        let b = Supervision::new(one, k, d, Vec::new(), vec![teacher(k)])
            .per_sample_loss(&s, &x, &batch, 0)
            .unwrap();
        assert!(close(&a, &(b * 2.0).unwrap()));
    }
}
