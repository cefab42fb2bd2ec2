//! The `train` stage: trains a model on a prepared dataset with SGD, by one of the training
//! methods, checkpointing at the end of every epoch (and every `checkpoint_every` steps) so that a
//! killed run resumes where it stopped, with the same result as an uninterrupted one.
//!
//! Outputs: `model.safetensors` (weights and BatchNorm statistics, PyTorch names), `model.json`
//! (architecture, method, seed), `train_log.csv` (one row per epoch) and `class_loss.csv` (mean
//! training loss per class per epoch). While training, the stage folder holds `checkpoints/` (see
//! [`crate::checkpoint`]); the runner keeps it across a kill when the fingerprint is unchanged.

use crate::checkpoint::Checkpoints;
use crate::context::Context;
use crate::error::{read_json, write_json, Result, StageError};
use crate::inference::Inference;
use crate::label_store;
use crate::method::{ogr, ogr_weights, OgrPoint, Supervision, Teacher};
use crate::models::{Arch, Mode, Model, ModelSpec, Shortcut, Stem};
use crate::optim::{Sgd, SgdConfig};
use crate::prepare::Dataset;
use crate::schedule::{lr_at, Schedule};
use crate::stage::Kind;
use candle_core::{DType, Device, Tensor};
use datasets::augment::Augment;
use datasets::mix::Mix;
use datasets::rng::{derive_seed, stream};
use datasets::{Loader, LoaderConfig};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

pub use crate::method::Method;

/// Per-image training augmentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AugmentName {
    /// None.
    None,
    /// Random crop with 4 pixels of zero padding and horizontal flip.
    CropFlip,
}

fn d_model() -> String {
    "resnet20".into()
}
fn d_epochs() -> usize {
    240
}
fn d_batch() -> usize {
    64
}
fn d_lr() -> f64 {
    0.05
}
fn d_momentum() -> f64 {
    0.9
}
fn d_wd() -> f64 {
    5e-4
}
fn d_schedule() -> Schedule {
    Schedule::MultiStep {
        milestones: vec![150, 180, 210],
        gamma: 0.1,
    }
}
fn d_augment() -> AugmentName {
    AugmentName::CropFlip
}

// Keys left out of the fingerprinted parameters at their defaults, so adding them changed no
// existing stage's fingerprint.
fn is_cifar_stem(s: &Stem) -> bool {
    *s == Stem::Cifar
}
fn is_zero(v: &f64) -> bool {
    *v == 0.0
}
fn is_zero_usize(v: &usize) -> bool {
    *v == 0
}
fn d_keep() -> usize {
    1
}
fn d_prefetch() -> usize {
    2
}
fn is_two(v: &usize) -> bool {
    *v == 2
}
fn is_one(v: &usize) -> bool {
    *v == 1
}
fn is_no_mix(m: &Mix) -> bool {
    *m == Mix::None
}
fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}
fn d_ls_alpha() -> f64 {
    0.1
}
fn is_ls_alpha(v: &f64) -> bool {
    *v == d_ls_alpha()
}
fn d_kd_lambda() -> f64 {
    0.1
}
fn is_kd_lambda(v: &f64) -> bool {
    *v == d_kd_lambda()
}
fn d_kd_tau() -> f64 {
    3.0
}
fn is_kd_tau(v: &f64) -> bool {
    *v == d_kd_tau()
}
fn d_wsl_alpha() -> f64 {
    2.5
}
fn is_wsl_alpha(v: &f64) -> bool {
    *v == d_wsl_alpha()
}
fn d_wsl_tau() -> f64 {
    2.0
}
fn is_wsl_tau(v: &f64) -> bool {
    *v == d_wsl_tau()
}
fn d_ogr_every() -> usize {
    10
}
fn is_ogr_every(v: &usize) -> bool {
    *v == d_ogr_every()
}

/// Parameters of a `train` stage; defaults are the paper's CIFAR settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Architecture: a CIFAR ResNet `resnet<6n+2>`, `resnet18` … `resnet200`, or an `_imagenet`
    /// variant (see [`crate::models::Arch`]).
    #[serde(default = "d_model")]
    pub model: String,
    /// Channels of the first stage (default: the architecture's, 16 or 64; filled in by
    /// `resolve`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Shortcut option of the CIFAR ResNets.
    #[serde(default)]
    pub shortcut: Shortcut,
    /// Stem of resnet18 … resnet200: `"cifar"` (3×3 conv) or `"imagenet"` (7×7/2 conv + max-pool).
    #[serde(default, skip_serializing_if = "is_cifar_stem")]
    pub stem: Stem,
    /// Dropout rate before the classifier (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropout: f64,
    /// Training method (docs/methods.md).
    pub method: Method,
    /// For `off-ldl`: which source of the label store to learn from, e.g. a teacher's name or
    /// `<teacher>.mc` for its Monte-Carlo dropout labels (default: the store's only teacher).
    #[serde(default)]
    pub label_source: Option<String>,
    /// `ls`: the smoothing mass α.
    #[serde(default = "d_ls_alpha", skip_serializing_if = "is_ls_alpha")]
    pub ls_alpha: f64,
    /// `ls`: `"paper"` (eq. 2: α/(K − 1) on each other class) or `"uniform"` (α/K on every class).
    #[serde(default, skip_serializing_if = "is_default")]
    pub ls_convention: crate::losses::SmoothingConvention,
    /// `kd`: weight λ of the distillation term.
    #[serde(default = "d_kd_lambda", skip_serializing_if = "is_kd_lambda")]
    pub kd_lambda: f64,
    /// `kd`: temperature τ.
    #[serde(default = "d_kd_tau", skip_serializing_if = "is_kd_tau")]
    pub kd_tau: f64,
    /// `kd`: `"batchmean"` (KL summed over classes) or `"mean"` (averaged over classes, as the
    /// paper's code did).
    #[serde(default, skip_serializing_if = "is_default")]
    pub kd_reduction: crate::losses::KdReduction,
    /// `wsl`: weight α of the soft term.
    #[serde(default = "d_wsl_alpha", skip_serializing_if = "is_wsl_alpha")]
    pub wsl_alpha: f64,
    /// `wsl`: temperature τ.
    #[serde(default = "d_wsl_tau", skip_serializing_if = "is_wsl_tau")]
    pub wsl_tau: f64,
    /// `off-mt-ldl`, `on-mt-ldl`: `"sum"` (the paper) or `"mean"` of the per-teacher terms.
    #[serde(default, skip_serializing_if = "is_default")]
    pub mt_reduction: crate::method::TeacherReduction,
    /// Online methods: label each batch with the mean of this many Monte-Carlo dropout passes
    /// of the teacher (0: its deterministic softmax); "MCDO-T".
    #[serde(default, skip_serializing_if = "is_default")]
    pub teacher_mc: usize,
    /// `ogr-loss`, `ogr-ldl`: epochs between OGR measurements (n).
    #[serde(default = "d_ogr_every", skip_serializing_if = "is_ogr_every")]
    pub ogr_every: usize,
    /// `ogr-ldl`: the mass α spread by the OGR weights.
    #[serde(default = "d_ls_alpha", skip_serializing_if = "is_ls_alpha")]
    pub ogr_alpha: f64,
    /// After training, fit a temperature T on the validation split (minimising NLL) and store
    /// it with the model (`temperature.json`); evaluate then reports calibrated metrics too.
    #[serde(default, skip_serializing_if = "is_default")]
    pub temperature_scaling: bool,
    /// Epochs.
    #[serde(default = "d_epochs")]
    pub epochs: usize,
    /// Images per batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Base learning rate.
    #[serde(default = "d_lr")]
    pub lr: f64,
    /// SGD momentum.
    #[serde(default = "d_momentum")]
    pub momentum: f64,
    /// L2 weight decay.
    #[serde(default = "d_wd")]
    pub weight_decay: f64,
    /// Nesterov momentum.
    #[serde(default)]
    pub nesterov: bool,
    /// Learning-rate schedule.
    #[serde(default = "d_schedule")]
    pub schedule: Schedule,
    /// Epochs of linear warm-up.
    #[serde(default)]
    pub warmup_epochs: usize,
    /// Per-image augmentation.
    #[serde(default = "d_augment")]
    pub augment: AugmentName,
    /// Side of a Cutout square applied after normalisation (0: none).
    #[serde(default, skip_serializing_if = "is_zero_usize")]
    pub cutout: usize,
    /// Batch-level mixing, e.g. `{ type = "cutmix", p = 1.0 }`: the targets (one-hot or the
    /// stored distributions) are mixed with the images' weights.
    #[serde(default, skip_serializing_if = "is_no_mix")]
    pub mix: Mix,
    /// Also checkpoint every this many steps (batches), besides the end of every epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_every: Option<usize>,
    /// How many of the newest checkpoints to keep while training (they are removed once the
    /// stage finishes).
    #[serde(default = "d_keep", skip_serializing_if = "is_one")]
    pub keep_checkpoints: usize,
    /// Batches each loader worker may build ahead of the trainer (loader workers = `[run].threads`).
    #[serde(default = "d_prefetch", skip_serializing_if = "is_two")]
    pub prefetch: usize,
    /// Seed of initialisation, order and augmentation (default: the run's seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Arithmetic of the convolutions and activations: `"f32"`, or `"bf16"` (CUDA only) with f32
    /// master weights, optimizer state, BatchNorm statistics, classifier and loss.
    #[serde(default, skip_serializing_if = "is_default")]
    pub dtype: Precision,
}

/// The type training computes activations in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout.
    #[default]
    F32,
    /// bf16 convolutions and activations (mixed precision), on CUDA.
    Bf16,
}

impl Precision {
    /// The candle type of the activations.
    pub fn dtype(self) -> DType {
        match self {
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }

    /// Whether `device` can compute in this precision; the message says why not.
    pub fn check(self, device: crate::device::DeviceSpec) -> std::result::Result<(), String> {
        if self == Precision::Bf16 && device == crate::device::DeviceSpec::Cpu {
            return Err(
                "\"bf16\" trains on CUDA devices only (use dtype = \"f32\", or device = \"cuda\")"
                    .into(),
            );
        }
        Ok(())
    }
}

impl std::str::FromStr for Precision {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            _ => Err(format!(
                "`{s}` is not a dtype: expected \"f32\" or \"bf16\""
            )),
        }
    }
}

/// Steps between reads of the loss on the host: each read waits for the device to finish
/// the queued steps, so reading every step would stall the GPU between steps.
const READ_EVERY: usize = 25;

/// Per-sample losses and predictions of the steps not yet read back to the host.
#[derive(Default)]
struct Pending {
    losses: Vec<Tensor>,
    preds: Vec<Tensor>,
    labels: Vec<u32>,
    /// (batch index, batch size) of each pending step.
    batches: Vec<(usize, usize)>,
}

impl Pending {
    fn push(&mut self, losses: Tensor, preds: Tensor, labels: &[u32], batch: usize) {
        self.losses.push(losses);
        self.preds.push(preds);
        self.labels.extend_from_slice(labels);
        self.batches.push((batch, labels.len()));
    }

    fn len(&self) -> usize {
        self.batches.len()
    }

    /// Reads the pending steps (one wait for the device) into `sums`, batch by batch as if read
    /// after every step (so the sums do not depend on when reads happen); fails on a
    /// non-finite loss, naming the epoch and batch.
    fn read(&mut self, sums: &mut EpochSums, name: &str, epoch: usize) -> Result<()> {
        if self.batches.is_empty() {
            return Ok(());
        }
        let losses = Tensor::cat(&self.losses, 0)?.to_vec1::<f32>()?;
        let preds = Tensor::cat(&self.preds, 0)?.to_vec1::<u32>()?;
        self.losses.clear();
        self.preds.clear();
        let mut at = 0;
        for &(index, b) in &self.batches {
            let (ls, ps, ys) = (
                &losses[at..at + b],
                &preds[at..at + b],
                &self.labels[at..at + b],
            );
            at += b;
            let l: f64 = ls.iter().map(|&v| v as f64).sum::<f64>() / b as f64;
            if !l.is_finite() {
                return Err(StageError::Numeric(format!(
                    "{name}: the loss became {l} at epoch {}, batch {index}; lower the learning rate",
                    epoch + 1
                )));
            }
            for ((&y, &pr), &li) in ys.iter().zip(ps).zip(ls) {
                sums.correct += (y == pr) as usize;
                sums.class_loss[y as usize] += li as f64;
                sums.class_seen[y as usize] += 1;
            }
            sums.loss += l * b as f64;
            sums.seen += b;
        }
        self.labels.clear();
        self.batches.clear();
        Ok(())
    }
}

impl Params {
    /// The training's distinguishing options, for table rows: mixing, Cutout, MC teachers.
    pub fn variant(&self) -> String {
        let mut tags = Vec::new();
        if self.mix != Mix::None {
            tags.push(self.mix.as_str().to_string());
        }
        if self.cutout > 0 {
            tags.push("cutout".into());
        }
        if self.teacher_mc > 0 {
            tags.push("MCDO-T".into());
        }
        tags.join(", ")
    }

    /// Puts the keys the method does not use back to their defaults, so that they are neither
    /// fingerprinted nor recorded: a grid over methods sharing one stage body (with, say,
    /// `kd_tau` for its `kd` cells) does not retrain its `vanilla` cells when `kd_tau` changes.
    pub fn clear_unused(&mut self) {
        let m = self.method;
        if m != Method::OffLdl {
            self.label_source = None;
        }
        if m != Method::Ls {
            self.ls_alpha = d_ls_alpha();
            self.ls_convention = Default::default();
        }
        if m != Method::Kd {
            self.kd_lambda = d_kd_lambda();
            self.kd_tau = d_kd_tau();
            self.kd_reduction = Default::default();
        }
        if m != Method::Wsl {
            self.wsl_alpha = d_wsl_alpha();
            self.wsl_tau = d_wsl_tau();
        }
        if !matches!(m, Method::OffMtLdl | Method::OnMtLdl) {
            self.mt_reduction = Default::default();
        }
        if !matches!(m, Method::OnLdl | Method::OnEnLdl | Method::OnMtLdl) {
            self.teacher_mc = 0;
        }
        if !m.uses_ogr() {
            self.ogr_every = d_ogr_every();
        }
        if m != Method::OgrLdl {
            self.ogr_alpha = d_ls_alpha();
        }
    }
}

/// `model.json`: what a train stage produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainedModel {
    /// The architecture.
    pub spec: ModelSpec,
    /// The method it was trained by.
    pub method: Method,
    /// Its seed.
    pub seed: u64,
    /// Epochs trained.
    pub epochs: usize,
    /// What else distinguishes the training in a table row: the mixing augmentation, Cutout,
    /// MC-dropout teachers (e.g. `cutmix, MCDO-T`); empty for none.
    #[serde(default)]
    pub variant: String,
}

impl TrainedModel {
    /// Loads the model a train stage wrote into `dir`, checking that it predicts `classes`
    /// classes.
    pub fn load(dir: &Path, device: &Device, classes: usize) -> Result<(TrainedModel, Model)> {
        let path = dir.join("model.json");
        let meta: TrainedModel = read_json(&path)?;
        if meta.spec.classes != classes {
            return Err(StageError::invalid(
                &path,
                "key `spec.classes`",
                format!(
                    "the model predicts {} classes, the dataset has {classes}",
                    meta.spec.classes
                ),
            ));
        }
        let model = Model::new(&meta.spec, device, 0)?;
        model.load(&dir.join("model.safetensors"))?;
        Ok((meta, model))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct EpochRow {
    epoch: usize,
    lr: f64,
    loss: f64,
    accuracy: f64,
    images_per_s: f64,
    seconds: f64,
    /// Mean training loss of the images of each class (by their own label), for the loss-curve
    /// figure; written to `class_loss.csv`.
    class_loss: Vec<f64>,
}

/// Sums over the part of an epoch done so far; kept in checkpoints so a resumed epoch logs the
/// same row as an uninterrupted one (timings aside). serde_json's `float_roundtrip` feature makes
/// the f64 values come back bit for bit from `state.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EpochSums {
    loss: f64,
    correct: usize,
    seen: usize,
    lr: f64,
    seconds: f64,
    class_loss: Vec<f64>,
    class_seen: Vec<usize>,
}

/// `state.json` of a checkpoint: where training stands.
#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    fingerprint: String,
    /// Global step (batches done since the start).
    step: u64,
    /// The epoch in progress and its next batch (batch 0 of the next epoch at an epoch's end).
    epoch: usize,
    batch: usize,
    sums: EpochSums,
    log: Vec<EpochRow>,
    /// OGR measurements so far (OGR methods only).
    #[serde(default)]
    ogr: Vec<OgrPoint>,
}

/// Runs a `train` stage.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    let seed = p.seed.unwrap_or_default();
    let data = Dataset::open(&ctx.input(Kind::Prepare).dir)?;
    let device = ctx.device.open()?;
    p.dtype
        .check(ctx.device)
        .map_err(|m| StageError::Config(format!("{}: key `dtype`: {m}", ctx.name)))?;
    let compute = p.dtype.dtype();
    let [c, h, w] = data.info.shape;
    let k = data.info.classes.len();
    let spec = ModelSpec {
        arch: p.model.clone(),
        width: match p.width {
            Some(w) => w,
            None => Arch::parse(&p.model)?.default_width(),
        },
        shortcut: p.shortcut,
        classes: k,
        in_channels: c,
        stem: p.stem,
        dropout: p.dropout,
    };
    let model = Model::new(&spec, &device, derive_seed(&[seed, stream::INIT]))?;
    let params = model.trainable();
    let mut opt = Sgd::new(
        params,
        SgdConfig {
            momentum: p.momentum,
            weight_decay: p.weight_decay,
            nesterov: p.nesterov,
        },
    );

    let stored = if p.method.reads_labels() {
        let input = ctx.input(Kind::Label);
        let path = input.dir.join("labels.parquet");
        let meta = label_store::read_meta(&path)?;
        let teachers: Vec<String> = meta.teachers.keys().cloned().collect();
        let sources: Vec<String> = match p.method {
            Method::OffLdl => vec![match (&p.label_source, teachers.as_slice()) {
                (Some(s), _) => s.clone(),
                (None, [only]) => only.clone(),
                (None, _) => {
                    return Err(StageError::Config(format!(
                        "{}: {} holds the labels of teachers {teachers:?}: name the one to learn from \
                         with `label_source`, or use `off-en-ldl` (their mean) or `off-mt-ldl` (all of them)",
                        ctx.name,
                        path.display()
                    )))
                }
            }],
            Method::OffEnLdl if teachers.len() < 2 => {
                return Err(StageError::Config(format!(
                    "{}: off-en-ldl learns from the `ensemble` source, which a label stage writes \
                     only with two or more teachers; {} has {teachers:?}",
                    ctx.name,
                    path.display()
                )))
            }
            Method::OffEnLdl => vec!["ensemble".into()],
            _ => teachers,
        };
        let mut out = Vec::with_capacity(sources.len());
        for source in &sources {
            out.push(label_store::read(
                &path,
                source,
                data.train.len(),
                &data.info.classes,
                &data.train.hash(),
            )?);
        }
        out
    } else {
        Vec::new()
    };
    let mut teachers = Vec::new();
    if p.method.teachers() != crate::stage::Multiplicity::None {
        for input in ctx.inputs_of(Kind::Train) {
            let (meta, model) = TrainedModel::load(&input.dir, &device, k)?;
            if p.teacher_mc > 0 && meta.spec.dropout == 0.0 {
                return Err(StageError::Config(format!(
                    "{}: teacher_mc = {} needs teachers trained with dropout; `{}` has none \
                     (train it with `dropout = 0.2`)",
                    ctx.name, p.teacher_mc, input.name
                )));
            }
            teachers.push(Teacher {
                name: input.name.clone(),
                model,
            });
        }
    }
    let ogr_sets = if p.method.uses_ogr() {
        match &data.val {
            Some(val) => Some((data.train.clone(), val.clone())),
            None => {
                return Err(StageError::Config(format!(
                    "{}: method `{}` measures per-class validation losses: the prepare stage \
                     must hold out a validation split (`val = N`)",
                    ctx.name,
                    p.method.as_str()
                )))
            }
        }
    } else {
        None
    };
    let mut supervision = Supervision::new(p, k, &device, stored, teachers);

    let loader = Loader::new(
        data.train.clone(),
        LoaderConfig {
            batch_size: p.batch_size,
            shuffle: true,
            drop_last: false,
            augment: Augment {
                cutout: p.cutout,
                ..match p.augment {
                    AugmentName::None => Augment::NONE,
                    AugmentName::CropFlip => Augment::CROP_FLIP,
                }
            },
            normalize: data.info.normalize.clone(),
            mix: p.mix,
            workers: ctx.threads.max(1),
            prefetch: p.prefetch,
            seed,
        },
    );
    let steps = loader.batches_per_epoch();
    let mut feeder = crate::feed::Feeder::new();

    let checkpoints = Checkpoints::new(&ctx.dir, p.keep_checkpoints);
    let restored: Option<CheckpointState> =
        checkpoints.restore(&device, &model, &mut opt, |s: &CheckpointState| {
            s.fingerprint == ctx.fingerprint
        })?;
    let (mut step, start_epoch, start_batch, mut sums, mut log, mut ogr_points) = match restored {
        Some(st) => {
            tracing::info!(
                "{}: resuming from the checkpoint of step {} (epoch {}, batch {})",
                ctx.name,
                st.step,
                st.epoch + 1,
                st.batch
            );
            (st.step, st.epoch, st.batch, st.sums, st.log, st.ogr)
        }
        None => (0, 0, 0, EpochSums::default(), Vec::new(), Vec::new()),
    };
    if ogr_points.len() >= 2 {
        let [a, b] = &ogr_points[ogr_points.len() - 2..] else {
            unreachable!("two points")
        };
        supervision.class_weights = ogr_weights(&ogr(a, b));
    }

    let bar = ctx.bar((p.epochs * steps) as u64, "training");
    bar.set_position(step);
    for epoch in start_epoch..p.epochs {
        let first = if epoch == start_epoch { start_batch } else { 0 };
        if first == 0 {
            sums = EpochSums::default();
        }
        // OGR: per-class losses every `ogr_every` epochs; weights from the last two measurements.
        if let Some((train_set, val_set)) = &ogr_sets {
            if epoch % p.ogr_every.max(1) == 0 && !ogr_points.iter().any(|q| q.epoch == epoch) {
                let inference = Inference {
                    model: &model,
                    device: &device,
                    normalize: &data.info.normalize,
                    batch_size: p.batch_size.max(256),
                    temperature: 1.0,
                };
                let per_class = |store: &std::sync::Arc<datasets::PackedStore>,
                                 what: &str|
                 -> Result<Vec<f64>> {
                    let probs = inference.predict(ctx, store, what)?;
                    let (mut sum, mut n) = (vec![0f64; k], vec![0usize; k]);
                    for (row, y) in probs.chunks_exact(k).zip(store.labels()) {
                        sum[y as usize] -= (row[y as usize] as f64).max(1e-30).ln();
                        n[y as usize] += 1;
                    }
                    Ok(sum
                        .iter()
                        .zip(&n)
                        .map(|(s, &c)| if c == 0 { 0.0 } else { s / c as f64 })
                        .collect())
                };
                ogr_points.push(OgrPoint {
                    epoch,
                    train: per_class(train_set, "OGR: training losses")?,
                    val: per_class(val_set, "OGR: validation losses")?,
                });
                if let [.., a, b] = &ogr_points[..] {
                    supervision.class_weights = ogr_weights(&ogr(a, b));
                }
            }
        }
        sums.class_loss.resize(k, 0.0);
        sums.class_seen.resize(k, 0);
        let t0 = Instant::now();
        let (mut timed_images, secs_before) = (0usize, sums.seconds);
        let mut it = loader.epoch(epoch as u64, first);
        let mut pending = Pending::default();
        let message = |sums: &EpochSums, timed_images: usize| {
            format!(
                "epoch {}/{} loss {:.3} acc {:.1}% {:.0} img/s",
                epoch + 1,
                p.epochs,
                sums.loss / sums.seen.max(1) as f64,
                100.0 * sums.correct as f64 / sums.seen.max(1) as f64,
                timed_images as f64 / t0.elapsed().as_secs_f64()
            )
        };
        // Where the host's time goes, for the epoch's log line: waiting for the loader, handing
        // the batch to the device, and waiting for the device at loss reads.
        let (mut wait_loader, mut wait_upload, mut wait_read) = (0f64, 0f64, 0f64);
        loop {
            let t_wait = Instant::now();
            let Some(batch) = it.next() else {
                break;
            };
            wait_loader += t_wait.elapsed().as_secs_f64();
            let b = batch.len();
            sums.lr = lr_at(
                p.lr,
                &p.schedule,
                p.epochs,
                p.warmup_epochs,
                epoch,
                batch.index as f64 / steps as f64,
            );
            let t_upload = Instant::now();
            let x = feeder.upload(&batch.images, (b, c, h, w), &device)?;
            wait_upload += t_upload.elapsed().as_secs_f64();
            // Dropout masks from (seed, epoch, batch): a resumed run draws the same ones.
            let mode = Mode::train(derive_seed(&[
                seed,
                stream::DROPOUT,
                epoch as u64,
                batch.index as u64,
            ]));
            let logits = if compute == DType::F32 {
                model.net.forward_mode(&x, mode)?
            } else {
                model.net.forward_mode(&x.to_dtype(compute)?, mode)?
            };
            let per_sample = supervision.per_sample_loss(&logits, &x, &batch, epoch)?;
            let loss = per_sample.mean_all()?;
            let grads = loss.backward()?;
            opt.step(&grads, sums.lr)?;
            // Read back every READ_EVERY steps, not every step: no host wait inside a step.
            pending.push(
                per_sample.detach().to_dtype(DType::F32)?,
                logits.detach().argmax(1)?,
                &batch.labels,
                batch.index,
            );
            timed_images += b;
            step += 1;
            bar.inc(1);
            let next_batch = batch.index + 1;
            it.recycle(batch);
            let checkpoint_now =
                next_batch < steps && p.checkpoint_every.is_some_and(|n| step % n as u64 == 0);
            if pending.len() >= READ_EVERY || checkpoint_now {
                let t_read = Instant::now();
                pending.read(&mut sums, &ctx.name, epoch)?;
                wait_read += t_read.elapsed().as_secs_f64();
                sums.seconds = secs_before + t0.elapsed().as_secs_f64();
                bar.set_message(message(&sums, timed_images));
            }
            if checkpoint_now {
                checkpoints.save(
                    step,
                    &model,
                    &opt,
                    &CheckpointState {
                        fingerprint: ctx.fingerprint.clone(),
                        step,
                        epoch,
                        batch: next_batch,
                        sums: sums.clone(),
                        log: log.clone(),
                        ogr: ogr_points.clone(),
                    },
                )?;
            }
        }
        let t_read = Instant::now();
        pending.read(&mut sums, &ctx.name, epoch)?;
        wait_read += t_read.elapsed().as_secs_f64();
        sums.seconds = secs_before + t0.elapsed().as_secs_f64();
        tracing::info!(
            "{}: epoch {}: {:.2} s waiting for the loader, {:.2} s handing batches to the device, \
             {:.2} s waiting for the device at loss reads (of {:.2} s)",
            ctx.name,
            epoch + 1,
            wait_loader,
            wait_upload,
            wait_read,
            t0.elapsed().as_secs_f64()
        );
        let row = EpochRow {
            epoch: epoch + 1,
            lr: sums.lr,
            loss: sums.loss / sums.seen.max(1) as f64,
            accuracy: sums.correct as f64 / sums.seen.max(1) as f64,
            images_per_s: sums.seen as f64 / sums.seconds.max(1e-9),
            seconds: sums.seconds,
            class_loss: sums
                .class_loss
                .iter()
                .zip(&sums.class_seen)
                .map(|(l, n)| if *n == 0 { f64::NAN } else { l / *n as f64 })
                .collect(),
        };
        tracing::info!(
            "{}: epoch {}/{} loss {:.4} train acc {:.2}% lr {:.4} {:.0} img/s",
            ctx.name,
            row.epoch,
            p.epochs,
            row.loss,
            100.0 * row.accuracy,
            row.lr,
            row.images_per_s
        );
        log.push(row);
        checkpoints.save(
            step,
            &model,
            &opt,
            &CheckpointState {
                fingerprint: ctx.fingerprint.clone(),
                step,
                epoch: epoch + 1,
                batch: 0,
                sums: EpochSums::default(),
                log: log.clone(),
                ogr: ogr_points.clone(),
            },
        )?;
    }
    bar.finish_and_clear();

    datasets::atomic::write_bytes(&ctx.dir.join("model.safetensors"), &model.to_safetensors()?)?;
    write_json(
        &ctx.dir.join("model.json"),
        &TrainedModel {
            spec,
            method: p.method,
            seed,
            epochs: p.epochs,
            variant: p.variant(),
        },
    )?;
    let mut csv = String::from("epoch,lr,loss,accuracy,images_per_s,seconds\n");
    let mut class_csv = String::from("epoch,class,loss\n");
    for r in &log {
        csv.push_str(&format!(
            "{},{},{},{},{:.1},{:.3}\n",
            r.epoch, r.lr, r.loss, r.accuracy, r.images_per_s, r.seconds
        ));
        for (class, l) in r.class_loss.iter().enumerate() {
            class_csv.push_str(&format!("{},{class},{l}\n", r.epoch));
        }
    }
    datasets::atomic::write_bytes(&ctx.dir.join("train_log.csv"), csv.as_bytes())?;
    datasets::atomic::write_bytes(&ctx.dir.join("class_loss.csv"), class_csv.as_bytes())?;
    let mut outputs = vec![
        "model.safetensors".to_string(),
        "model.json".into(),
        "train_log.csv".into(),
        "class_loss.csv".into(),
    ];
    if !ogr_points.is_empty() {
        let mut csv = String::from("epoch,class,train_loss,val_loss,ogr,weight\n");
        for (i, b) in ogr_points.iter().enumerate() {
            let (o, w) = match i.checked_sub(1).map(|j| &ogr_points[j]) {
                Some(a) => {
                    let o = ogr(a, b);
                    let w = ogr_weights(&o);
                    (o, w.iter().map(|&v| v as f64).collect())
                }
                None => (vec![f64::NAN; k], vec![1.0; k]),
            };
            for c in 0..k {
                csv.push_str(&format!(
                    "{},{c},{},{},{},{}\n",
                    b.epoch, b.train[c], b.val[c], o[c], w[c]
                ));
            }
        }
        datasets::atomic::write_bytes(&ctx.dir.join("ogr.csv"), csv.as_bytes())?;
        outputs.push("ogr.csv".into());
    }
    if p.temperature_scaling {
        let Some(val) = &data.val else {
            return Err(StageError::Config(format!(
                "{}: temperature_scaling fits T on the validation split: the prepare stage must \
                 hold out one (`val = N`)",
                ctx.name
            )));
        };
        let logits = Inference {
            model: &model,
            device: &device,
            normalize: &data.info.normalize,
            batch_size: p.batch_size.max(256),
            temperature: 1.0,
        }
        .logits(ctx, val, "temperature scaling")?;
        let fitted = crate::calibration::fit(&logits, &val.labels(), k);
        tracing::info!(
            "{}: temperature T = {:.4} (validation NLL {:.4} → {:.4})",
            ctx.name,
            fitted.temperature,
            fitted.val_nll_before,
            fitted.val_nll_after
        );
        write_json(&ctx.dir.join("temperature.json"), &fitted)?;
        outputs.push("temperature.json".into());
    }
    checkpoints.remove()?;
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};

    /// Checkpointed epoch sums must come back bit for bit, or a resumed run logs other losses.
    #[test]
    fn json_floats_round_trip_exactly() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        let values: Vec<f64> = (0..20_000)
            .map(|i| rng.random::<f64>() * 10f64.powi(i % 9 - 3))
            .collect();
        let text = serde_json::to_string(&values).unwrap();
        let back: Vec<f64> = serde_json::from_str(&text).unwrap();
        let differ = values
            .iter()
            .zip(&back)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(differ, 0);
    }
}
