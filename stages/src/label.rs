//! The `label` stage: runs one or more trained teachers, in eval mode, over the training split
//! and stores their softmax distributions (and, with several teachers, the ensemble mean) in the
//! Parquet label store `labels.parquet` (schema in `label_store`).

use crate::context::Context;
use crate::error::Result;
use crate::inference::Inference;
use crate::label_store::{self, LabelMeta, SourceRows};
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
    for input in ctx.inputs_of(Kind::Train) {
        let (_, model) = TrainedModel::load(&input.dir, &device, k)?;
        let inference = Inference {
            model: &model,
            device: &device,
            normalize: &data.info.normalize,
            batch_size: p.batch_size,
            temperature: p.temperature,
        };
        let probs =
            inference.predict(ctx, &data.train, &format!("labelling with {}", input.name))?;
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
    let rows: Vec<SourceRows> = outputs
        .iter()
        .map(|(name, probs)| SourceRows {
            source: name,
            indices: &indices,
            labels: &labels,
            probs,
        })
        .collect();
    label_store::write(
        &ctx.dir.join("labels.parquet"),
        &LabelMeta {
            classes: data.info.classes.clone(),
            dataset_fingerprint: data.train.hash(),
            teachers,
            temperature: p.temperature,
        },
        &rows,
    )?;
    tracing::info!(
        "{}: {} rows × {} sources written",
        ctx.name,
        n,
        outputs.len()
    );
    Ok(vec!["labels.parquet".into()])
}
