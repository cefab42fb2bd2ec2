//! The `label` stage: runs one or more trained teachers, in eval mode, over the training split
//! (and the validation or test split when asked) and stores their softmax distributions (and,
//! with several teachers, the ensemble mean) in the Parquet label store `labels.parquet`
//! (schema in [`crate::label_store`]). A teacher trained with dropout also gets a Monte-Carlo
//! dropout source `<teacher>.mc`: the mean of `mc_samples` stochastic passes with its per-class
//! standard deviation, entropy and mutual information.

use crate::artifacts::labels::file_for;
use crate::artifacts::{Dataset, Kind, Split, TrainedModel};
use crate::context::Context;
use crate::error::{Result, StageError};
use crate::label_store::{self, LabelMeta, McMeta, McRows, SourceRows, StoreDtype};
use crate::params::{self, at_least, positive, ParamDefaults, RangeError};
use candle_core::Device;
use datasets::PackedStore;
use engine::inference::{Inference, McSummary};
use engine::models::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Parameters of a `label` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(remote = "Self", default, deny_unknown_fields)]
pub struct Params {
    /// Softmax temperature τ.
    pub temperature: f64,
    /// Images per inference batch.
    pub batch_size: usize,
    /// Monte-Carlo dropout passes for teachers trained with dropout (0: no MC source).
    pub mc_samples: usize,
    /// Store each distribution as its `top_k` largest probabilities and the remaining mass
    /// (for large K; see docs/label-store.md), instead of full vectors.
    pub top_k: Option<usize>,
    /// Storage type of the probability vectors: `f32` (default) or `f16` (half the size,
    /// about 3 significant digits; readers renormalise each row).
    pub dtype: StoreDtype,
    /// The prepared splits to label: `train` (default; `labels.parquet`), `val` and `test`
    /// (`labels-val.parquet`, `labels-test.parquet`).
    pub splits: Vec<Split>,
    /// Seed of the Monte-Carlo dropout masks (default: each teacher's training seed).
    pub seed: Option<u64>,
}

impl Default for Params {
    fn default() -> Self {
        Params {
            temperature: 1.0,
            batch_size: 256,
            mc_samples: 20,
            top_k: None,
            dtype: StoreDtype::F32,
            splits: vec![Split::Train],
            seed: None,
        }
    }
}

impl ParamDefaults for Params {
    const OMITTED_AT_DEFAULT: &'static [&'static str] =
        &["mc_samples", "top_k", "dtype", "splits", "seed"];
    fn serialize_all<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        Params::serialize(self, s)
    }
}

impl Serialize for Params {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        params::serialize(self, s)
    }
}

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Params::deserialize(d)
    }
}

impl Params {
    /// Checks value ranges that the types alone do not.
    pub fn validate(&self) -> Result<(), RangeError> {
        positive("temperature", self.temperature)?;
        at_least("top_k", self.top_k.unwrap_or(1), 1)?;
        let mut seen = self.splits.clone();
        seen.sort_by_key(|s| *s as u8);
        seen.dedup();
        if self.splits.is_empty() || seen.len() != self.splits.len() {
            return Err((
                "splits",
                "must list distinct splits among \"train\", \"val\" and \"test\"".into(),
            ));
        }
        at_least("batch_size", self.batch_size, 1)
    }
}

/// A teacher, loaded once for every split.
struct Teacher {
    name: String,
    meta: TrainedModel,
    model: Model,
}

/// Runs a `label` stage: loads the teachers, then labels each split asked for.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    if !(p.temperature > 0.0 && p.temperature.is_finite()) {
        return Err(StageError::Config(format!(
            "{}: temperature must be a positive number, got {}",
            ctx.name, p.temperature
        )));
    }
    let data = Dataset::open(&ctx.input(Kind::Prepare).dir)?;
    let device = ctx.device.open()?;
    let k = data.info.classes.len();
    let mut teachers = Vec::new();
    let mut fingerprints = BTreeMap::new();
    let mut checkpoints = BTreeMap::new();
    for input in ctx.inputs_of(Kind::Train) {
        let (meta, model) = TrainedModel::load(&input.dir, &device, k)?;
        let weights = input.dir.join("model.safetensors");
        let bytes = std::fs::read(&weights).map_err(|e| StageError::io(&weights, e))?;
        checkpoints.insert(
            input.name.clone(),
            blake3::hash(&bytes).to_hex().to_string(),
        );
        fingerprints.insert(input.name.clone(), input.fingerprint.clone());
        teachers.push(Teacher {
            name: input.name.clone(),
            meta,
            model,
        });
    }
    let mut files = Vec::new();
    for &split in &p.splits {
        let store = split_store(ctx, &data, split)?;
        let labels = label_split(ctx, p, &data, &device, &teachers, split, &store)?;
        let meta = LabelMeta {
            classes: data.info.classes.clone(),
            dataset_fingerprint: store.hash(),
            teachers: fingerprints.clone(),
            temperature: p.temperature,
            checkpoints: checkpoints.clone(),
            mc: (!labels.mc_dropout.is_empty()).then_some(McMeta {
                samples: p.mc_samples,
                dropout: labels.mc_dropout.clone(),
            }),
            top_k: p.top_k,
            dtype: p.dtype,
        };
        files.push(write_split(ctx, split, &store, &meta, &labels)?);
    }
    Ok(files)
}

/// The packed split `split` of the dataset.
fn split_store(ctx: &Context, data: &Dataset, split: Split) -> Result<Arc<PackedStore>> {
    Ok(match split {
        Split::Train => data.train.clone(),
        Split::Test => data.test.clone(),
        Split::Val => data.val.clone().ok_or_else(|| {
            StageError::Config(format!(
                "{}: split `val` asked for, but the prepare stage held no validation split out (set its `val` key)",
                ctx.name
            ))
        })?,
    })
}

/// Every source's distributions over one split.
struct SplitLabels {
    /// Each teacher's softmax (and the ensemble mean with several teachers), `N × K`.
    sources: Vec<(String, Vec<f32>)>,
    /// The Monte-Carlo dropout summaries of the teachers trained with dropout.
    mc: Vec<(String, McSummary)>,
    /// Those teachers' dropout rates.
    mc_dropout: BTreeMap<String, f64>,
}

/// Runs every teacher over `store`.
fn label_split(
    ctx: &Context,
    p: &Params,
    data: &Dataset,
    device: &Device,
    teachers: &[Teacher],
    split: Split,
    store: &Arc<PackedStore>,
) -> Result<SplitLabels> {
    let (n, k) = (store.len(), data.info.classes.len());
    let mut out = SplitLabels {
        sources: Vec::new(),
        mc: Vec::new(),
        mc_dropout: BTreeMap::new(),
    };
    for Teacher { name, meta, model } in teachers {
        let inference = Inference {
            model,
            device,
            normalize: &data.info.normalize,
            batch_size: p.batch_size,
            temperature: p.temperature,
            workers: ctx.threads,
            progress: ctx,
        };
        let what = format!("labelling {} with {name}", split.as_str());
        let probs = inference.predict(store, &what)?;
        if model.spec.dropout > 0.0 && p.mc_samples > 0 {
            let summary = inference.predict_mc(
                store,
                p.mc_samples,
                // Each split has its own mask stream.
                datasets::rng::derive_seed(&[p.seed.unwrap_or(meta.seed), split as u64]),
                &format!("MC dropout on {} with {name}", split.as_str()),
            )?;
            out.mc.push((format!("{name}.mc"), summary));
            out.mc_dropout.insert(name.clone(), model.spec.dropout);
        }
        out.sources.push((name.clone(), probs));
    }
    if out.sources.len() > 1 {
        let mut mean = vec![0f32; n * k];
        for (_, probs) in &out.sources {
            for (m, p) in mean.iter_mut().zip(probs) {
                *m += p / out.sources.len() as f32;
            }
        }
        out.sources.push(("ensemble".into(), mean));
    }
    Ok(out)
}

/// Writes one split's label store; returns its file name.
fn write_split(
    ctx: &Context,
    split: Split,
    store: &Arc<PackedStore>,
    meta: &LabelMeta,
    labels: &SplitLabels,
) -> Result<String> {
    let n = store.len();
    let indices: Vec<u32> = (0..n as u32).collect();
    let classes = store.labels();
    let mut rows: Vec<SourceRows> = labels
        .sources
        .iter()
        .map(|(name, probs)| SourceRows {
            source: name,
            indices: &indices,
            labels: &classes,
            probs,
            mc: None,
        })
        .collect();
    rows.extend(labels.mc.iter().map(|(name, m)| SourceRows {
        source: name,
        indices: &indices,
        labels: &classes,
        probs: &m.mean,
        mc: Some(McRows {
            std: &m.std,
            entropy: &m.entropy,
            mutual_information: &m.mutual_information,
        }),
    }));
    let file = file_for(split);
    label_store::write(&ctx.dir.join(&file), meta, &rows)?;
    tracing::info!(
        "{}: {file}: {} rows × {} sources written",
        ctx.name,
        n,
        rows.len()
    );
    Ok(file)
}
