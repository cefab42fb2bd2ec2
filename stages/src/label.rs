//! The `label` stage: runs one or more trained teachers, in eval mode, over the training split
//! and stores their softmax distributions (and, with several teachers, the ensemble mean) in the
//! Parquet label store `labels.parquet` (schema in `label_store`). A teacher trained with dropout
//! also gets a Monte-Carlo dropout source `<teacher>.mc`: the mean of `mc_samples` stochastic
//! passes with its per-class standard deviation, entropy and mutual information.

use crate::context::Context;
use crate::error::Result;
use crate::inference::Inference;
use crate::inference::McSummary;
use crate::label_store::{self, LabelMeta, McMeta, McRows, SourceRows};
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
fn d_mc() -> usize {
    20
}
fn is_20(v: &usize) -> bool {
    *v == 20
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
    /// Seed of the Monte-Carlo dropout masks (default: each teacher's training seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
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
    let n = data.train.len();
    let k = data.info.classes.len();
    let mut teachers = BTreeMap::new();
    let mut outputs: Vec<(String, Vec<f32>)> = Vec::new();
    let mut mc: Vec<(String, McSummary)> = Vec::new();
    let mut checkpoints = BTreeMap::new();
    let mut mc_dropout = BTreeMap::new();
    for input in ctx.inputs_of(Kind::Train) {
        let (meta, model) = TrainedModel::load(&input.dir, &device, k)?;
        let inference = Inference {
            model: &model,
            device: &device,
            normalize: &data.info.normalize,
            batch_size: p.batch_size,
            temperature: p.temperature,
        };
        let probs =
            inference.predict(ctx, &data.train, &format!("labelling with {}", input.name))?;
        if model.spec.dropout > 0.0 && p.mc_samples > 0 {
            let summary = inference.predict_mc(
                ctx,
                &data.train,
                p.mc_samples,
                p.seed.unwrap_or(meta.seed),
                &format!("MC dropout with {}", input.name),
            )?;
            mc.push((format!("{}.mc", input.name), summary));
            mc_dropout.insert(input.name.clone(), model.spec.dropout);
        }
        let weights = input.dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| crate::StageError::io(&weights, e))?;
        checkpoints.insert(
            input.name.clone(),
            blake3::hash(&bytes).to_hex().to_string(),
        );
        teachers.insert(input.name.clone(), input.fingerprint.clone());
        outputs.push((input.name.clone(), probs));
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
    let labels = data.train.labels();
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
    label_store::write(
        &ctx.dir.join("labels.parquet"),
        &LabelMeta {
            classes: data.info.classes.clone(),
            dataset_fingerprint: data.train.hash(),
            teachers,
            temperature: p.temperature,
            checkpoints,
            mc: (!mc_dropout.is_empty()).then_some(McMeta {
                samples: p.mc_samples,
                dropout: mc_dropout,
            }),
            top_k: p.top_k,
        },
        &rows,
    )?;
    tracing::info!("{}: {} rows × {} sources written", ctx.name, n, rows.len());
    Ok(vec!["labels.parquet".into()])
}
