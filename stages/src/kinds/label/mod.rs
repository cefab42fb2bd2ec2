//! The `label` stage: runs one or more trained teachers, in eval mode, over the training split
//! (and the validation or test split when asked) and stores their softmax distributions (and,
//! with several teachers, the ensemble mean) in the Parquet label store `labels.parquet`
//! (schema in [`crate::label_store`]). A teacher trained with dropout also gets a Monte-Carlo
//! dropout source `<teacher>.mc`: the mean of `mc_samples` stochastic passes with its per-class
//! standard deviation, entropy and mutual information.
//!
//! Inference runs chunk by chunk ([`chunks`]), each chunk stored as soon as it is computed, so
//! that a killed or stopped stage resumes with the first chunk it lacks.

mod chunks;

use crate::artifacts::labels::file_for;
use crate::artifacts::{Dataset, DatasetInfo, Kind, Split, TrainedModel};
use crate::context::Context;
use crate::error::{Result, StageError};
use crate::label_store::{self, LabelMeta, McMeta, McRows, SourceRows, StoreDtype};
use crate::params::{self, at_least, positive, RangeError};
use crate::progress;
use candle_core::Device;
use datasets::PackedStore;
use engine::inference::{Inference, McSummary};
use engine::models::Model;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;
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
    /// Images per resumable chunk, rounded down to whole batches (at least one): a killed
    /// stage redoes at most one chunk. Not fingerprinted: the labels do not depend on it.
    pub chunk_size: usize,
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
            chunk_size: 10_000,
        }
    }
}

params::stage_params! {
    Params,
    omitted: [
        "mc_samples",
        "top_k",
        "dtype",
        "splits",
        "seed",
        "chunk_size",
    ],
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
        at_least("chunk_size", self.chunk_size, 1)?;
        at_least("batch_size", self.batch_size, 1)
    }
}

/// A teacher, loaded once for every split.
struct Teacher {
    name: String,
    meta: TrainedModel,
    model: Model,
    /// The blake3 of its `model.safetensors`.
    weights: String,
}

/// How far the label stage whose (partial) folder is `dir` got, for `pipeline status`: the
/// chunks of teacher outputs stored, out of those of its splits in the prepared dataset's
/// folder `dataset` (`4 of 13 chunks labelled`), and the time left at the pace the last chunks
/// were written since before `resumed` (when the run writing now started) (`, about 3 min of
/// labelling left`; the label stores assembled at the end are not in it); only the count when
/// the dataset cannot be read (`4 chunks labelled`). `None` before the first chunk.
pub fn progress(
    p: &Params,
    dir: &Path,
    dataset: Option<&Path>,
    resumed: Option<std::time::SystemTime>,
) -> Option<String> {
    let Some(plans) = dataset.and_then(|d| split_plans(p, d)) else {
        return match chunks::stored(dir, p.batch_size, p.chunk_size).len() {
            0 => None,
            1 => Some("1 chunk labelled".into()),
            n => Some(format!("{n} chunks labelled")),
        };
    };
    // The chunks a run would reuse, as `label_split` finds them.
    let files: Vec<std::path::PathBuf> = plans
        .iter()
        .flat_map(|(split, plan)| {
            (0..plan.count()).map(move |c| chunks::path(dir, split.as_str(), plan, c))
        })
        .filter(|f| f.exists())
        .collect();
    let n = files.len();
    let total: usize = plans.iter().map(|(_, plan)| plan.count()).sum();
    if n == 0 {
        return None;
    }
    let unit = if total == 1 { "chunk" } else { "chunks" };
    let mut out = format!("{n} of {total} {unit} labelled");
    let times: Vec<_> = files.iter().filter_map(|f| progress::written(f)).collect();
    if let Some(s) = progress::left_at_pace(&times, total.saturating_sub(n), resumed) {
        out += &format!(", about {} of labelling left", progress::rough(s));
    }
    Some(out)
}

/// The chunk plan of every split the stage labels, by the sizes in the dataset's `dataset.json`
/// in `dataset`; `None` when it cannot be read or lacks a split.
fn split_plans(p: &Params, dataset: &Path) -> Option<Vec<(Split, chunks::Plan)>> {
    let info: DatasetInfo = engine::json::read(&dataset.join("dataset.json")).ok()?;
    p.splits
        .iter()
        .map(|&split| {
            let n = match split {
                Split::Train => info.train.n,
                Split::Test => info.test.n,
                Split::Val => info.val.as_ref()?.n,
            };
            Some((split, chunks::Plan::new(n, p.batch_size, p.chunk_size)))
        })
        .collect()
}

/// Runs a `label` stage: loads the teachers, then labels each split asked for.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    if !(p.temperature > 0.0 && p.temperature.is_finite()) {
        return Err(StageError::config(format!(
            "{}: temperature must be a positive number, got {}",
            ctx.name, p.temperature
        )));
    }
    let data = Dataset::open(&ctx.input(Kind::Prepare).dir)?;
    let device = ctx.device.open()?;
    let k = data.info.classes.len();
    if let Some(t) = p.top_k.filter(|&t| t > k) {
        return Err(StageError::config(format!(
            "{}: top_k = {t} is more than the dataset's {k} classes",
            ctx.name
        )));
    }
    let mut teachers = Vec::new();
    let mut fingerprints = BTreeMap::new();
    let mut checkpoints = BTreeMap::new();
    for input in ctx.model_inputs() {
        let (meta, model) = TrainedModel::load(&input.dir, &device, k)?;
        let weights = TrainedModel::weights_blake3(&input.dir)?;
        checkpoints.insert(input.name.clone(), weights.clone());
        fingerprints.insert(input.name.clone(), input.fingerprint.clone());
        teachers.push(Teacher {
            name: input.name.clone(),
            meta,
            model,
            weights,
        });
    }
    distinct_sources(ctx, p, &teachers)?;
    let mc_dropout: BTreeMap<String, f64> = teachers
        .iter()
        .filter(|t| has_mc(p, t))
        .map(|t| (t.name.clone(), t.model.spec.dropout))
        .collect();
    let mut files = Vec::new();
    for &split in &p.splits {
        let store = split_store(ctx, &data, split)?;
        let chunks = label_split(ctx, p, &data, &device, &teachers, split, &store)?;
        let meta = LabelMeta {
            classes: data.info.classes.clone(),
            dataset_fingerprint: store.hash(),
            teachers: fingerprints.clone(),
            temperature: p.temperature,
            checkpoints: checkpoints.clone(),
            mc: (!mc_dropout.is_empty()).then(|| McMeta {
                samples: p.mc_samples,
                dropout: mc_dropout.clone(),
            }),
            top_k: p.top_k,
            dtype: p.dtype,
        };
        files.push(write_split(ctx, split, &store, &meta, &teachers, &chunks)?);
    }
    // The chunks the stores were assembled from are not outputs: the runner removes them once
    // it has recorded the stores, so that a kill before that does not label again.
    Ok(files)
}

/// The source of the teachers' mean distribution.
const ENSEMBLE: &str = "ensemble";

/// The source of teacher `name`'s Monte-Carlo dropout mean.
fn mc_source(name: &str) -> String {
    format!("{name}.mc")
}

/// Refuses teachers whose stage names would name two sources alike: a teacher called
/// `ensemble` beside the ensemble, or `<t>.mc` beside teacher `t`'s Monte-Carlo source. Both
/// would be written, and students would find every sample twice.
fn distinct_sources(ctx: &Context, p: &Params, teachers: &[Teacher]) -> Result<()> {
    let mut names: Vec<(String, String)> = Vec::new();
    for t in teachers {
        names.push((t.name.clone(), format!("teacher `{}`", t.name)));
        if has_mc(p, t) {
            let what = format!("the Monte-Carlo source of teacher `{}`", t.name);
            names.push((mc_source(&t.name), what));
        }
    }
    if teachers.len() > 1 {
        names.push((ENSEMBLE.into(), "the ensemble of the teachers".into()));
    }
    for (i, (name, what)) in names.iter().enumerate() {
        if let Some((_, first)) = names[..i].iter().find(|(n, _)| n == name) {
            return Err(StageError::config(format!(
                "{}: {first} and {what} would both be source `{name}` of the label store; \
                 rename the teacher stage",
                ctx.name
            )));
        }
    }
    Ok(())
}

/// The packed split `split` of the dataset.
fn split_store(ctx: &Context, data: &Dataset, split: Split) -> Result<Arc<PackedStore>> {
    Ok(match split {
        Split::Train => data.train.clone(),
        Split::Test => data.test.clone(),
        Split::Val => data.val.clone().ok_or_else(|| {
            StageError::config(format!(
                "{}: split `val` asked for, but the prepare stage held no validation split out (set its `val` key)",
                ctx.name
            ))
        })?,
    })
}

/// A split's chunks, all computed and stored: what the label store is assembled from.
struct SplitChunks<'a> {
    plan: chunks::Plan,
    expect: chunks::Expect<'a>,
}

/// Runs every teacher over `store`, chunk by chunk, each chunk stored as soon as it is computed
/// and not kept in memory; the chunks a killed run stored are reused.
fn label_split<'a>(
    ctx: &'a Context,
    p: &Params,
    data: &Dataset,
    device: &Device,
    teachers: &'a [Teacher],
    split: Split,
    store: &Arc<PackedStore>,
) -> Result<SplitChunks<'a>> {
    let plan = chunks::Plan::new(store.len(), p.batch_size, p.chunk_size);
    let expect = chunks::Expect {
        stage: &ctx.fingerprint,
        split: split.as_str(),
        teachers: teachers.iter().map(|t| t.name.clone()).collect(),
        mc: teachers.iter().map(|t| has_mc(p, t)).collect(),
        weights: teachers.iter().map(|t| t.weights.clone()).collect(),
        k: data.info.classes.len(),
    };
    let done = (0..plan.count())
        .filter(|&c| chunks::path(&ctx.dir, split.as_str(), &plan, c).exists())
        .count();
    if done > 0 {
        tracing::info!(
            "{}: {} split: resuming with {done} of {} chunks labelled",
            ctx.name,
            split.as_str(),
            plan.count()
        );
    }
    for c in 0..plan.count() {
        match chunks::open(&ctx.dir, &expect, &plan, c)? {
            chunks::State::Ready(_) => {}
            state => {
                if let chunks::State::Stale(why) = state {
                    tracing::info!(
                        "{}: chunk {} of the {} split {why}: labelling it again",
                        ctx.name,
                        c + 1,
                        split.as_str()
                    );
                }
                let chunk = label_chunk(ctx, p, data, device, teachers, split, store, &plan, c)?;
                chunks::write(&ctx.dir, &expect, &plan, c, &chunk)?;
            }
        }
        if ctx.stop_requested() && c + 1 < plan.count() {
            return Err(ctx.interrupted(&format!(
                "chunk {} of {} of the {} split",
                c + 1,
                plan.count(),
                split.as_str()
            )));
        }
    }
    Ok(SplitChunks { plan, expect })
}

/// Whether teacher `t` gets a Monte-Carlo dropout source.
fn has_mc(p: &Params, t: &Teacher) -> bool {
    t.model.spec.dropout > 0.0 && p.mc_samples > 0
}

/// Every teacher's outputs on the images of chunk `c`.
#[allow(clippy::too_many_arguments)]
fn label_chunk(
    ctx: &Context,
    p: &Params,
    data: &Dataset,
    device: &Device,
    teachers: &[Teacher],
    split: Split,
    store: &Arc<PackedStore>,
    plan: &chunks::Plan,
    c: usize,
) -> Result<chunks::Chunk> {
    let batches = plan.batches_of(c);
    let mut chunk = chunks::Chunk {
        probs: Vec::new(),
        mc: Vec::new(),
    };
    for t in teachers {
        let inference = Inference {
            model: &t.model,
            device,
            normalize: t.meta.normalize(&data.info.normalize),
            view: t.meta.eval_view(&data.info).map_err(|e| {
                StageError::config(format!("{}: teacher `{}`: {e}", ctx.name, t.name))
            })?,
            batch_size: p.batch_size,
            temperature: p.temperature,
            workers: ctx.threads,
            progress: ctx,
        };
        let what = format!(
            "labelling {} with {} (chunk {}/{})",
            split.as_str(),
            t.name,
            c + 1,
            plan.count()
        );
        if has_mc(p, t) {
            // The eval-mode labels and the Monte-Carlo passes from one computation of the
            // features; each split has its own mask stream.
            let (probs, mc) = inference.predict_with_mc_batches(
                store,
                batches.clone(),
                p.mc_samples,
                datasets::rng::derive_seed(&[p.seed.unwrap_or(t.meta.seed), split as u64]),
                &format!("{what}, with MC dropout"),
            )?;
            chunk.probs.push(probs);
            chunk.mc.push(Some(mc));
        } else {
            chunk
                .probs
                .push(inference.predict_batches(store, batches.clone(), &what)?);
            chunk.mc.push(None);
        }
        // Of several teachers, one's evaluation buffers are held at a time (each is a few
        // activations of a batch: gigabytes for an ImageNet ResNet at batch 256).
        if teachers.len() > 1 {
            t.model.net.release_inference();
        }
    }
    Ok(chunk)
}

/// A source of the label store, in the order they are written: each teacher's softmax, the
/// ensemble mean with several teachers, then the Monte-Carlo summaries.
enum Source<'a> {
    Teacher(&'a str),
    Ensemble,
    Mc(&'a str),
}

/// The sources of a store of `teachers`, in order.
fn sources<'a>(teachers: &'a [Teacher], mc: &[bool]) -> Vec<Source<'a>> {
    let mut out: Vec<Source> = teachers.iter().map(|t| Source::Teacher(&t.name)).collect();
    if teachers.len() > 1 {
        out.push(Source::Ensemble);
    }
    out.extend(
        teachers
            .iter()
            .zip(mc)
            .filter(|(_, &m)| m)
            .map(|(t, _)| Source::Mc(&t.name)),
    );
    out
}

/// Writes one split's label store, source by source and chunk by chunk, so that memory holds
/// one chunk's rows of one source, not the split's; returns the store's file name.
fn write_split(
    ctx: &Context,
    split: Split,
    store: &Arc<PackedStore>,
    meta: &LabelMeta,
    teachers: &[Teacher],
    chunks: &SplitChunks,
) -> Result<String> {
    let (plan, expect) = (&chunks.plan, &chunks.expect);
    let labels = store.labels();
    let sources = sources(teachers, &expect.mc);
    let file = file_for(split);
    label_store::write_streamed(&ctx.dir.join(&file), meta, |sink| {
        for source in &sources {
            for c in 0..plan.count() {
                let chunks::State::Ready(chunk) = chunks::open(&ctx.dir, expect, plan, c)? else {
                    return Err(StageError::numeric(format!(
                        "{}: chunk {} of the {} split disappeared while the store was written",
                        ctx.name,
                        c + 1,
                        split.as_str()
                    )));
                };
                let images = plan.images_of_range(c);
                let indices: Vec<u32> = (images.start as u32..images.end as u32).collect();
                let rows = source_chunk(&chunk, source, teachers)?;
                sink.push(&SourceRows {
                    source: &rows.name,
                    indices: &indices,
                    labels: &labels[images],
                    probs: &rows.probs,
                    mc: rows.mc.as_ref().map(|m| McRows {
                        std: &m.std,
                        entropy: &m.entropy,
                        mutual_information: &m.mutual_information,
                    }),
                })?;
            }
        }
        Ok(())
    })?;
    tracing::info!(
        "{}: {file}: {} rows × {} sources written",
        ctx.name,
        store.len(),
        sources.len()
    );
    Ok(file)
}

/// One source's rows of one chunk.
struct SourceChunk {
    name: String,
    probs: Vec<f32>,
    mc: Option<McSummary>,
}

/// Source `source`'s rows of `chunk`.
fn source_chunk(
    chunk: &chunks::ChunkFile,
    source: &Source,
    teachers: &[Teacher],
) -> Result<SourceChunk> {
    Ok(match *source {
        Source::Teacher(name) => SourceChunk {
            name: name.to_string(),
            probs: chunk.probs(name)?,
            mc: None,
        },
        Source::Ensemble => SourceChunk {
            name: ENSEMBLE.to_string(),
            probs: ensemble_mean(chunk, teachers)?,
            mc: None,
        },
        Source::Mc(name) => {
            let mut m = chunk.mc(name)?;
            SourceChunk {
                name: mc_source(name),
                probs: std::mem::take(&mut m.mean),
                mc: Some(m),
            }
        }
    })
}

/// The mean of the teachers' softmax over one chunk.
fn ensemble_mean(chunk: &chunks::ChunkFile, teachers: &[Teacher]) -> Result<Vec<f32>> {
    let mut mean: Vec<f32> = Vec::new();
    for t in teachers {
        let probs = chunk.probs(&t.name)?;
        mean.resize(probs.len(), 0.0);
        for (m, p) in mean.iter_mut().zip(&probs) {
            *m += p / teachers.len() as f32;
        }
    }
    Ok(mean)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::SplitInfo;
    use std::time::{Duration, SystemTime};

    fn split(n: usize) -> SplitInfo {
        SplitInfo {
            file: String::new(),
            n,
            hash: String::new(),
            class_counts: Vec::new(),
        }
    }

    /// Chunks are counted against the splits' sizes in `dataset.json`, the time left from the
    /// gap between the chunks' writes; worked by hand below.
    #[test]
    fn progress_counts_chunks_of_the_splits_labelled() {
        let data = tempfile::tempdir().unwrap();
        let info = DatasetInfo {
            classes: vec!["a".into(), "b".into()],
            shape: [3, 8, 8],
            varying: false,
            train: split(2500),
            test: split(1000),
            val: None,
            normalize: datasets::augment::Normalize {
                mean: vec![0.5; 3],
                std: vec![0.25; 3],
            },
        };
        engine::json::write(&data.path().join("dataset.json"), &info).unwrap();
        let dir = tempfile::tempdir().unwrap();
        // Batches of 100, chunks of 10 batches: train's 25 batches make 3 chunks, test's 10
        // one; 4 in all.
        let p = Params {
            batch_size: 100,
            chunk_size: 1000,
            splits: vec![Split::Train, Split::Test],
            ..Params::default()
        };
        assert_eq!(progress(&p, dir.path(), Some(data.path()), None), None);
        std::fs::create_dir_all(chunks::folder(dir.path())).unwrap();
        // Two chunks written 30 s apart: the 2 left take about a minute.
        let t = SystemTime::now() - Duration::from_secs(3600);
        for (name, at) in [("train-b0-10", 0), ("train-b10-20", 30)] {
            let path = chunks::folder(dir.path()).join(format!("{name}.safetensors"));
            let f = std::fs::File::create(&path).unwrap();
            f.set_modified(t + Duration::from_secs(at)).unwrap();
        }
        assert_eq!(
            progress(&p, dir.path(), Some(data.path()), None).as_deref(),
            Some("2 of 4 chunks labelled, about 60 s of labelling left")
        );
        // A chunk of another chunk size (5 batches) is not one a run would reuse.
        std::fs::write(
            chunks::folder(dir.path()).join("train-b5-10.safetensors"),
            b"",
        )
        .unwrap();
        assert_eq!(
            progress(&p, dir.path(), Some(data.path()), None).as_deref(),
            Some("2 of 4 chunks labelled, about 60 s of labelling left")
        );
        // Only the train split: 3 chunks, one left.
        let train = Params {
            splits: vec![Split::Train],
            ..p.clone()
        };
        assert_eq!(
            progress(&train, dir.path(), Some(data.path()), None).as_deref(),
            Some("2 of 3 chunks labelled, about 30 s of labelling left")
        );
        // No dataset to read, or a split it lacks: the count alone.
        assert_eq!(
            progress(&p, dir.path(), None, None).as_deref(),
            Some("2 chunks labelled")
        );
        let val = Params {
            splits: vec![Split::Train, Split::Val],
            ..p
        };
        assert_eq!(
            progress(&val, dir.path(), Some(data.path()), None).as_deref(),
            Some("2 chunks labelled")
        );
    }
}
