//! The `train` stage: trains a model on a prepared dataset with SGD, by one of the training
//! methods, checkpointing at the end of every epoch so that a killed run resumes where it stopped.
//!
//! Outputs: `model.safetensors` (weights and BatchNorm statistics, PyTorch names), `model.json`
//! (architecture, method, seed) and `train_log.csv` (one row per epoch). While training, the
//! stage folder holds `checkpoint/` (weights, momentum buffers, next epoch); the runner keeps that
//! folder across a kill when the stage's fingerprint is unchanged.

use crate::context::Context;
use crate::error::{read_json, write_json, Result, StageError};
use crate::label_store;
use crate::losses::{cross_entropy, soft_cross_entropy};
use crate::models::{Arch, Mode, Model, ModelSpec, Shortcut, Stem};
use crate::optim::{Sgd, SgdConfig};
use crate::prepare::Dataset;
use crate::schedule::{lr_at, Schedule};
use crate::stage::Kind;
use candle_core::{DType, Device, Tensor};
use datasets::augment::Augment;
use datasets::mix::{Mix, MixRecord};
use datasets::rng::{derive_seed, stream};
use datasets::{Loader, LoaderConfig};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

/// How the student is supervised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Cross-entropy on the hard labels (configuration #1 of the paper).
    Vanilla,
    /// Soft cross-entropy on one teacher's stored distribution (Off-LDL, #3).
    OffLdl,
}

impl Method {
    /// Whether the method reads a label store.
    pub fn reads_labels(&self) -> bool {
        matches!(self, Method::OffLdl)
    }
    /// The method's name in stages.toml.
    pub fn as_str(&self) -> &'static str {
        match self {
            Method::Vanilla => "vanilla",
            Method::OffLdl => "off-ldl",
        }
    }
}

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
fn is_no_mix(m: &Mix) -> bool {
    *m == Mix::None
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
    /// Training method.
    pub method: Method,
    /// For `off-ldl`: which source of the label store to learn from (default: `ensemble` when
    /// the store has several teachers, else its only teacher).
    #[serde(default)]
    pub label_source: Option<String>,
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
    /// Seed of initialisation, order and augmentation (default: the run's seed).
    #[serde(default)]
    pub seed: Option<u64>,
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
}

#[derive(Debug, Serialize, Deserialize)]
struct CheckpointState {
    /// The next epoch to run.
    next_epoch: usize,
    fingerprint: String,
    log: Vec<EpochRow>,
}

const CHECKPOINT: &str = "checkpoint";
const CHECKPOINT_NEXT: &str = "checkpoint.next";

/// Writes a checkpoint into `checkpoint.next/` and swaps it whole for `checkpoint/`, so weights,
/// optimizer state and position always come from the same epoch, whenever the process dies.
fn save_checkpoint(dir: &Path, model: &Model, opt: &Sgd, state: &CheckpointState) -> Result<()> {
    let ck = dir.join(CHECKPOINT_NEXT);
    if ck.exists() {
        std::fs::remove_dir_all(&ck).map_err(|e| StageError::io(&ck, e))?;
    }
    std::fs::create_dir_all(&ck).map_err(|e| StageError::io(&ck, e))?;
    datasets::atomic::write_bytes(&ck.join("model.safetensors"), &model.to_safetensors()?)?;
    let opt_bytes = safetensors::serialize(
        opt.state().iter().map(|(k, v)| (k.clone(), v.clone())),
        None,
    )
    .map_err(|e| StageError::Numeric(e.to_string()))?;
    datasets::atomic::write_bytes(&ck.join("optimizer.safetensors"), &opt_bytes)?;
    write_json(&ck.join("state.json"), state)?;
    datasets::atomic::sync_dir(&ck).map_err(|e| StageError::io(&ck, e))?;
    Ok(datasets::atomic::replace_dir(&ck, &dir.join(CHECKPOINT))?)
}

fn load_checkpoint(
    dir: &Path,
    fingerprint: &str,
    device: &Device,
    model: &Model,
    opt: &mut Sgd,
) -> Result<Option<CheckpointState>> {
    let ck = dir.join(CHECKPOINT);
    let state_path = ck.join("state.json");
    if !state_path.exists() {
        return Ok(None);
    }
    let state: CheckpointState = read_json(&state_path)?;
    if state.fingerprint != fingerprint {
        return Ok(None);
    }
    model.load(&ck.join("model.safetensors"))?;
    let opt_path = ck.join("optimizer.safetensors");
    let bytes = std::fs::read(&opt_path).map_err(|e| StageError::io(&opt_path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| StageError::invalid(&opt_path, "safetensors header", e.to_string()))?;
    let mut buffers = BTreeMap::new();
    for (name, view) in st.tensors() {
        let t = candle_core::safetensors::Load::load(&view, device)?;
        buffers.insert(name, t);
    }
    opt.load_state(buffers)?;
    Ok(Some(state))
}

/// Runs a `train` stage.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    let seed = p.seed.unwrap_or_default();
    let data = Dataset::open(&ctx.input(Kind::Prepare).dir)?;
    let device = ctx.device.open()?;
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

    let soft = if p.method.reads_labels() {
        let input = ctx.input(Kind::Label);
        let path = input.dir.join("labels.parquet");
        let meta = label_store::read_meta(&path)?;
        let source = match &p.label_source {
            Some(s) => s.clone(),
            None if meta.teachers.len() == 1 => meta.teachers.keys().next().cloned().expect("one"),
            None => "ensemble".into(),
        };
        Some(label_store::read(
            &path,
            &source,
            data.train.len(),
            &data.info.classes,
            &data.train.hash(),
        )?)
    } else {
        None
    };

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
            prefetch: 2,
            seed,
        },
    );
    let steps = loader.batches_per_epoch();

    let (start, mut log) =
        match load_checkpoint(&ctx.dir, &ctx.fingerprint, &device, &model, &mut opt)? {
            Some(state) => {
                tracing::info!(
                    "{}: resuming from the checkpoint after epoch {}",
                    ctx.name,
                    state.next_epoch
                );
                (state.next_epoch, state.log)
            }
            None => (0, Vec::new()),
        };

    let bar = ctx.bar((p.epochs * steps) as u64, "training");
    bar.set_position((start * steps) as u64);
    let mut targets = vec![0f32; p.batch_size * k];
    let mut mixed = Vec::with_capacity(p.batch_size * k);
    for epoch in start..p.epochs {
        let t0 = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let mut lr = 0.0;
        let mut it = loader.epoch(epoch as u64, 0);
        while let Some(batch) = it.next() {
            let b = batch.len();
            lr = lr_at(
                p.lr,
                &p.schedule,
                p.epochs,
                p.warmup_epochs,
                epoch,
                batch.index as f64 / steps as f64,
            );
            let x = Tensor::from_slice(&batch.images, (b, c, h, w), &device)?;
            let y = Tensor::from_slice(&batch.labels, b, &device)?;
            // Dropout masks from (seed, epoch, batch): a resumed run draws the same ones.
            let mode = Mode::train(derive_seed(&[
                seed,
                stream::DROPOUT,
                epoch as u64,
                batch.index as u64,
            ]));
            let logits = model.net.forward_mode(&x, mode)?;
            let loss = match (&soft, &batch.mix) {
                (None, MixRecord::None) => cross_entropy(&logits, &y)?,
                _ => {
                    let rows = &mut targets[..b * k];
                    for (slot, (&i, &label)) in batch.indices.iter().zip(&batch.labels).enumerate()
                    {
                        let row = &mut rows[slot * k..(slot + 1) * k];
                        match &soft {
                            Some(s) => {
                                let i = i as usize;
                                row.copy_from_slice(&s.probs[i * k..(i + 1) * k]);
                            }
                            None => {
                                row.fill(0.0);
                                row[label as usize] = 1.0;
                            }
                        }
                    }
                    // A mixed image's target mixes its sources' targets with the same weights.
                    let z = if batch.mix == MixRecord::None {
                        &rows[..]
                    } else {
                        batch.mix.mix_rows(rows, k, &mut mixed);
                        &mixed[..]
                    };
                    let z = Tensor::from_slice(z, (b, k), &device)?;
                    soft_cross_entropy(&logits, &z)?
                }
            };
            let grads = loss.backward()?;
            opt.step(&grads, lr)?;
            let l = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !l.is_finite() {
                return Err(StageError::Numeric(format!(
                    "{}: the loss became {l} at epoch {epoch}, batch {}; lower the learning rate",
                    ctx.name, batch.index
                )));
            }
            let pred = logits.argmax(1)?.to_vec1::<u32>()?;
            correct += pred
                .iter()
                .zip(&batch.labels)
                .filter(|(a, b)| a == b)
                .count();
            loss_sum += l * b as f64;
            seen += b;
            bar.inc(1);
            bar.set_message(format!(
                "epoch {}/{} loss {:.3} acc {:.1}% {:.0} img/s",
                epoch + 1,
                p.epochs,
                loss_sum / seen as f64,
                100.0 * correct as f64 / seen as f64,
                seen as f64 / t0.elapsed().as_secs_f64()
            ));
            it.recycle(batch);
        }
        let secs = t0.elapsed().as_secs_f64();
        let row = EpochRow {
            epoch: epoch + 1,
            lr,
            loss: loss_sum / seen.max(1) as f64,
            accuracy: correct as f64 / seen.max(1) as f64,
            images_per_s: seen as f64 / secs,
            seconds: secs,
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
        save_checkpoint(
            &ctx.dir,
            &model,
            &opt,
            &CheckpointState {
                next_epoch: epoch + 1,
                fingerprint: ctx.fingerprint.clone(),
                log: log.clone(),
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
        },
    )?;
    let mut csv = String::from("epoch,lr,loss,accuracy,images_per_s,seconds\n");
    for r in &log {
        csv.push_str(&format!(
            "{},{},{},{},{:.1},{:.3}\n",
            r.epoch, r.lr, r.loss, r.accuracy, r.images_per_s, r.seconds
        ));
    }
    datasets::atomic::write_bytes(&ctx.dir.join("train_log.csv"), csv.as_bytes())?;
    for name in [CHECKPOINT, CHECKPOINT_NEXT] {
        let ck = ctx.dir.join(name);
        if ck.exists() {
            std::fs::remove_dir_all(&ck).map_err(|e| StageError::io(&ck, e))?;
        }
    }
    Ok(vec![
        "model.safetensors".into(),
        "model.json".into(),
        "train_log.csv".into(),
    ])
}
