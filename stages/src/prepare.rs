//! The `prepare` stage: turns a dataset source into packed splits (`train.pack`, `test.pack`)
//! and a `dataset.json` describing them (classes, sizes, hashes, normalisation statistics).

use crate::context::Context;
use crate::error::Result;
use datasets::augment::Normalize;
use datasets::synthetic::SyntheticSpec;
use datasets::{PackedStore, PackedWriter};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;

/// Where the images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The built-in procedural dataset (no files needed).
    Synthetic,
}

fn default_train() -> usize {
    5000
}
fn default_test() -> usize {
    1000
}
fn default_classes() -> usize {
    10
}
fn default_size() -> usize {
    32
}
fn default_noise() -> f32 {
    SyntheticSpec::default().noise
}
fn default_jitter() -> f32 {
    SyntheticSpec::default().hue_jitter
}

/// Parameters of a `prepare` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The dataset source.
    pub source: Source,
    /// Seed of the synthetic generator (default: the run's seed).
    #[serde(default)]
    pub seed: Option<u64>,
    /// Training images to generate.
    #[serde(default = "default_train")]
    pub train_size: usize,
    /// Test images to generate.
    #[serde(default = "default_test")]
    pub test_size: usize,
    /// Number of classes.
    #[serde(default = "default_classes")]
    pub classes: usize,
    /// Image side in pixels.
    #[serde(default = "default_size")]
    pub image_size: usize,
    /// Per-pixel noise standard deviation (full scale = 1).
    #[serde(default = "default_noise")]
    pub noise: f32,
    /// Per-image hue jitter (turns of the colour wheel).
    #[serde(default = "default_jitter")]
    pub hue_jitter: f32,
}

/// One packed split as described in `dataset.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SplitInfo {
    /// File name in the stage folder.
    pub file: String,
    /// Number of images.
    pub n: usize,
    /// Content hash of the packed file (its fingerprint).
    pub hash: String,
}

/// `dataset.json`: what a prepared dataset holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Class names.
    pub classes: Vec<String>,
    /// Channels, height, width.
    pub shape: [usize; 3],
    /// Training split.
    pub train: SplitInfo,
    /// Test split.
    pub test: SplitInfo,
    /// Per-channel statistics of the training split, used to normalise every split.
    pub normalize: Normalize,
}

/// A prepared dataset opened for reading.
pub struct Dataset {
    /// Its description.
    pub info: DatasetInfo,
    /// Training split.
    pub train: Arc<PackedStore>,
    /// Test split.
    pub test: Arc<PackedStore>,
}

impl Dataset {
    /// Opens the dataset a `prepare` stage wrote into `dir`, checking that the packed files
    /// match `dataset.json`.
    pub fn open(dir: &Path) -> Result<Dataset> {
        let info: DatasetInfo = crate::error::read_json(&dir.join("dataset.json"))?;
        let open = |s: &SplitInfo| -> Result<Arc<PackedStore>> {
            let p = dir.join(&s.file);
            let store = PackedStore::open(&p)?;
            if store.hash() != s.hash || store.len() != s.n || store.info().classes != info.classes
            {
                return Err(crate::StageError::invalid(
                    &p,
                    "header",
                    format!(
                        "does not match dataset.json (hash {}, {} images): the folder was modified",
                        s.hash, s.n
                    ),
                ));
            }
            Ok(Arc::new(store))
        };
        let (train, test) = (open(&info.train)?, open(&info.test)?);
        Ok(Dataset { info, train, test })
    }
}

/// Runs a `prepare` stage.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    let seed = p.seed.unwrap_or_default();
    let spec = match p.source {
        Source::Synthetic => SyntheticSpec {
            classes: p.classes,
            image_size: p.image_size,
            noise: p.noise,
            hue_jitter: p.hue_jitter,
        },
    };
    spec.validate()?;
    let bar = ctx.bar(2, "generating splits");
    let mut splits = Vec::new();
    let mut normalize = None;
    for (split, name, n) in [(0u64, "train", p.train_size), (1, "test", p.test_size)] {
        let (info, labels, pixels) = spec.generate(seed, split, n)?;
        if split == 0 {
            normalize = Some(Normalize::fit(
                info.c,
                pixels.chunks_exact(info.image_len()),
            ));
        }
        let file = format!("{name}.pack");
        let hash = PackedWriter::write(&ctx.dir.join(&file), &info, &labels, &pixels)?;
        splits.push((info, SplitInfo { file, n, hash }));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (test_info, test) = splits.pop().expect("two splits");
    let (_, train) = splits.pop().expect("two splits");
    let info = DatasetInfo {
        classes: test_info.classes.clone(),
        shape: [test_info.c, test_info.h, test_info.w],
        train,
        test,
        normalize: normalize.expect("train split generated"),
    };
    crate::error::write_json(&ctx.dir.join("dataset.json"), &info)?;
    tracing::info!(
        "{}: {} train + {} test images, {} classes, {}×{}",
        ctx.name,
        info.train.n,
        info.test.n,
        info.classes.len(),
        info.shape[1],
        info.shape[2]
    );
    Ok(vec![info.train.file, info.test.file, "dataset.json".into()])
}
