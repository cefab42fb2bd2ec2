//! The `label` stage: runs one or more trained teachers, in eval mode, over the training split
//! (and the validation or test split when asked) and stores their softmax distributions (and, with several teachers, the ensemble mean) in the
//! Parquet label store `labels.parquet` (schema in `label_store`). A teacher trained with dropout
//! also gets a Monte-Carlo dropout source `<teacher>.mc`: the mean of `mc_samples` stochastic
//! passes with its per-class standard deviation, entropy and mutual information.

use crate::context::Context;
use crate::error::Result;
use crate::inference::Inference;
use crate::inference::McSummary;
use crate::label_store::{self, LabelMeta, McMeta, McRows, SourceRows, StoreDtype};
use crate::prepare::Dataset;
use crate::stage::Kind;
use crate::train::TrainedModel;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn d_tau() -> f64 {
    1.0
}
fn d_batch() -> usize {
    256
}
fn d_splits() -> Vec<Split> {
    vec![Split::Train]
}
fn is_train_only(s: &[Split]) -> bool {
    s == [Split::Train]
}

/// A split of a prepared dataset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    /// `train.pack`.
    Train,
    /// `val.pack` (held out by the prepare stage's `val` key).
    Val,
    /// `test.pack`.
    Test,
}

impl Split {
    /// The split's name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Val => "val",
            Split::Test => "test",
        }
    }
}

fn d_mc() -> usize {
    20
}
fn is_20(v: &usize) -> bool {
    *v == 20
}

fn is_f32(d: &StoreDtype) -> bool {
    *d == StoreDtype::F32
}

/// Parameters of a `label` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Softmax temperature τ.
    #[serde(default = "d_tau")]
    pub temperature: f64,
    /// Images per inference batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Monte-Carlo dropout passes for teachers trained with dropout (0: no MC source).
    #[serde(default = "d_mc", skip_serializing_if = "is_20")]
    pub mc_samples: usize,
    /// Store each distribution as its `top_k` largest probabilities and the remaining mass
    /// (for large K; see docs/label-store.md), instead of full vectors.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_k: Option<usize>,
    /// Storage type of the probability vectors: `f32` (default) or `f16` (half the size,
    /// about 3 significant digits; readers renormalise each row).
    #[serde(default, skip_serializing_if = "is_f32")]
    pub dtype: StoreDtype,
    /// The prepared splits to label: `train` (default; `labels.parquet`), `val` and `test`
    /// (`labels-val.parquet`, `labels-test.parquet`).
    #[serde(default = "d_splits", skip_serializing_if = "is_train_only")]
    pub splits: Vec<Split>,
    /// Seed of the Monte-Carlo dropout masks (default: each teacher's training seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// The file a split's labels are written to: `labels.parquet` for the training split (the one
/// students read), `labels-<split>.parquet` for the others.
pub fn file_for(split: Split) -> String {
    match split {
        Split::Train => "labels.parquet".into(),
        other => format!("labels-{}.parquet", other.as_str()),
    }
}

/// Runs a `label` stage.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    if !(p.temperature > 0.0 && p.temperature.is_finite()) {
        return Err(crate::StageError::Config(format!(
            "{}: temperature must be a positive number, got {}",
            ctx.name, p.temperature
        )));
    }
    let data = Dataset::open(&ctx.input(Kind::Prepare).dir)?;
    let device = ctx.device.open()?;
    let k = data.info.classes.len();
    // The teachers, loaded once for every split.
    let mut teachers = BTreeMap::new();
    let mut checkpoints = BTreeMap::new();
    let mut models = Vec::new();
    for input in ctx.inputs_of(Kind::Train) {
        let (meta, model) = TrainedModel::load(&input.dir, &device, k)?;
        let weights = input.dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| crate::StageError::io(&weights, e))?;
        checkpoints.insert(
            input.name.clone(),
            blake3::hash(&bytes).to_hex().to_string(),
        );
        teachers.insert(input.name.clone(), input.fingerprint.clone());
        models.push((input.name.clone(), meta, model));
    }
    let mut files = Vec::new();
    for &split in &p.splits {
        let store = match split {
            Split::Train => data.train.clone(),
            Split::Test => data.test.clone(),
            Split::Val => data.val.clone().ok_or_else(|| {
                crate::StageError::Config(format!(
                    "{}: split `val` asked for, but the prepare stage held no validation split out (set its `val` key)",
                    ctx.name
                ))
            })?,
        };
        let n = store.len();
        let mut outputs: Vec<(String, Vec<f32>)> = Vec::new();
        let mut mc: Vec<(String, McSummary)> = Vec::new();
        let mut mc_dropout = BTreeMap::new();
        for (name, meta, model) in &models {
            let inference = Inference {
                model,
                device: &device,
                normalize: &data.info.normalize,
                batch_size: p.batch_size,
                temperature: p.temperature,
            };
            let what = format!("labelling {} with {name}", split.as_str());
            let probs = inference.predict(ctx, &store, &what)?;
            if model.spec.dropout > 0.0 && p.mc_samples > 0 {
                let summary = inference.predict_mc(
                    ctx,
                    &store,
                    p.mc_samples,
                    // Each split has its own mask stream.
                    datasets::rng::derive_seed(&[p.seed.unwrap_or(meta.seed), split as u64]),
                    &format!("MC dropout on {} with {name}", split.as_str()),
                )?;
                mc.push((format!("{name}.mc"), summary));
                mc_dropout.insert(name.clone(), model.spec.dropout);
            }
            outputs.push((name.clone(), probs));
        }
        if outputs.len() > 1 {
            let mut mean = vec![0f32; n * k];
            for (_, probs) in &outputs {
                for (m, p) in mean.iter_mut().zip(probs) {
                    *m += p / outputs.len() as f32;
                }
            }
            outputs.push(("ensemble".into(), mean));
        }
        let indices: Vec<u32> = (0..n as u32).collect();
        let labels = store.labels();
        let mut rows: Vec<SourceRows> = outputs
            .iter()
            .map(|(name, probs)| SourceRows {
                source: name,
                indices: &indices,
                labels: &labels,
                probs,
                mc: None,
            })
            .collect();
        rows.extend(mc.iter().map(|(name, m)| SourceRows {
            source: name,
            indices: &indices,
            labels: &labels,
            probs: &m.mean,
            mc: Some(McRows {
                std: &m.std,
                entropy: &m.entropy,
                mutual_information: &m.mutual_information,
            }),
        }));
        let file = file_for(split);
        label_store::write(
            &ctx.dir.join(&file),
            &LabelMeta {
                classes: data.info.classes.clone(),
                dataset_fingerprint: store.hash(),
                teachers: teachers.clone(),
                temperature: p.temperature,
                checkpoints: checkpoints.clone(),
                mc: (!mc_dropout.is_empty()).then_some(McMeta {
                    samples: p.mc_samples,
                    dropout: mc_dropout,
                }),
                top_k: p.top_k,
                dtype: p.dtype,
            },
            &rows,
        )?;
        tracing::info!(
            "{}: {file}: {} rows × {} sources written",
            ctx.name,
            n,
            rows.len()
        );
        files.push(file);
    }
    Ok(files)
}
