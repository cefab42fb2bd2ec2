//! The `prepare` stage: turns a dataset source (the built-in synthetic dataset, the official
//! CIFAR-10, CIFAR-100 or STL-10 binaries — read from `path` or fetched into a cache — or an
//! ImageFolder tree) into packed splits (`train.pack`, `test.pack`, optionally `val.pack`) and a
//! `dataset.json` describing them (classes, sizes, hashes, normalisation statistics).

use crate::artifacts::{records, DatasetInfo, SplitInfo};
use crate::context::Context;
use crate::error::{Result, StageError};
use crate::params::RangeError;
use datasets::augment::{Normalize, NormalizeSums};
use datasets::cifar::Cifar100Label;
use datasets::cifar::Split;
use datasets::synthetic::SyntheticSpec;
use datasets::{PackedWriter, StoreInfo};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Where the images come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The built-in procedural dataset (no files needed).
    Synthetic,
    /// CIFAR-10, binary version, from `path`.
    Cifar10,
    /// CIFAR-100, binary version, from `path`.
    Cifar100,
    /// STL-10, binary version (labelled train and test splits), from `path`.
    Stl10,
    /// An ImageFolder tree `path/<split>/<class>/**/<image file>` (torchvision's extensions),
    /// resized to `image_size`.
    Imagefolder,
}

/// Parameters of a `prepare` stage. Keys that do not apply to the chosen `source` are refused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The dataset source.
    pub source: Source,
    /// Folder of the official files (CIFAR, STL-10) or the ImageFolder root; relative to the
    /// stages.toml's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// CIFAR-10/100, STL-10: download the official archive into `cache` instead of reading
    /// `path` (verified by its md5; a partial download resumes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fetch: Option<bool>,
    /// Folder of downloaded archives (default `$LDL_CACHE`, else `$XDG_CACHE_HOME/ldl`, else
    /// `~/.cache/ldl`); relative to the stages.toml's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
    /// Download address replacing the official one (a mirror); needs `md5`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Expected md5 of the archive at `url`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub md5: Option<String>,
    /// ImageFolder: the training split's folder (default `train`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_split: Option<String>,
    /// ImageFolder: the test split's folder (default `val`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_split: Option<String>,
    /// CIFAR-10: which training batches to read (default all five, 1..=5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batches: Option<Vec<u32>>,
    /// CIFAR-100: `"fine"` (100 classes, default) or `"coarse"` (20).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<Cifar100Label>,
    /// Keep a seeded random subset of this many training images (default: all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
    /// Hold this many training images out as a validation split `val.pack` (default: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val: Option<usize>,
    /// Draw `limit` and `val` per class, each class in proportion to its images (default:
    /// uniform draws over the images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stratify: Option<bool>,
    /// Seed of the synthetic generator and of the `limit`/`val` draws (default: the run's seed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Synthetic: training images (default 5000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_size: Option<usize>,
    /// Synthetic: test images (default 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_size: Option<usize>,
    /// Synthetic: number of classes (default 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub classes: Option<usize>,
    /// Synthetic: image side in pixels (default 32). ImageFolder: side of the square the
    /// images are resized (shorter side) and centre-cropped to, or with `keep_aspect` their
    /// shorter side (required).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_size: Option<usize>,
    /// ImageFolder: keep each image whole, resized so its shorter side is `image_size`
    /// (torchvision's `Resize(image_size)`), instead of centre-cropping it to a square; the
    /// packed images then vary in size (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_aspect: Option<bool>,
    /// Synthetic: per-pixel noise standard deviation, full scale 1 (default 0.08).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise: Option<f32>,
    /// Synthetic: per-image hue jitter in turns of the colour wheel (default 0.035).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hue_jitter: Option<f32>,
    /// What the files read from `path` hold (their [`datasets::digest`]), computed where
    /// stages.toml is read and fingerprinted in place of `path`. Empty for `synthetic`, for
    /// `fetch` (the archive's md5 identifies it), and while `path` cannot be read (the stage is
    /// then identified by its `path`, and fails if it must run).
    #[serde(default, skip_deserializing, skip_serializing_if = "String::is_empty")]
    pub source_digest: String,
}

/// Per-channel statistics conventionally used for CIFAR-10 (as in the reference code bases).
pub const CIFAR10_NORMALIZE: ([f32; 3], [f32; 3]) =
    ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]);
/// Per-channel statistics of CIFAR-100, as the paper's code uses.
pub const CIFAR100_NORMALIZE: ([f32; 3], [f32; 3]) =
    ([0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]);

impl Params {
    /// The synthetic generator's settings, defaults filled in.
    pub fn synthetic_spec(&self) -> SyntheticSpec {
        let d = SyntheticSpec::default();
        SyntheticSpec {
            classes: self.classes.unwrap_or(d.classes),
            image_size: self.image_size.unwrap_or(d.image_size),
            noise: self.noise.unwrap_or(d.noise),
            hue_jitter: self.hue_jitter.unwrap_or(d.hue_jitter),
        }
    }

    /// Checks that every key given applies to the source, and the values' ranges; on error
    /// returns the key and what was expected.
    pub fn validate(&self) -> std::result::Result<(), RangeError> {
        self.check_keys()?;
        match self.source {
            Source::Synthetic => self.check_synthetic(),
            Source::Imagefolder => self.check_imagefolder(),
            Source::Cifar10 | Source::Cifar100 | Source::Stl10 => self.check_official(),
        }
    }

    /// `limit` and `val`, and that every key given applies to the source.
    fn check_keys(&self) -> std::result::Result<(), RangeError> {
        let synthetic_keys = [
            ("train_size", self.train_size.is_some()),
            ("test_size", self.test_size.is_some()),
            ("classes", self.classes.is_some()),
            ("image_size", self.image_size.is_some()),
            ("noise", self.noise.is_some()),
            ("hue_jitter", self.hue_jitter.is_some()),
        ];
        let allowed: &[&str] = match self.source {
            Source::Synthetic => &[
                "seed",
                "train_size",
                "test_size",
                "classes",
                "image_size",
                "noise",
                "hue_jitter",
            ],
            Source::Cifar10 => &["path", "batches", "seed", "fetch", "cache", "url", "md5"],
            Source::Cifar100 => &["path", "label", "seed", "fetch", "cache", "url", "md5"],
            Source::Stl10 => &["path", "seed", "fetch", "cache", "url", "md5"],
            Source::Imagefolder => &[
                "path",
                "seed",
                "image_size",
                "keep_aspect",
                "train_split",
                "test_split",
            ],
        };
        let given = synthetic_keys.into_iter().chain([
            ("path", self.path.is_some()),
            ("batches", self.batches.is_some()),
            ("label", self.label.is_some()),
            ("seed", self.seed.is_some()),
            ("fetch", self.fetch.is_some()),
            ("cache", self.cache.is_some()),
            ("url", self.url.is_some()),
            ("md5", self.md5.is_some()),
            ("train_split", self.train_split.is_some()),
            ("test_split", self.test_split.is_some()),
            ("keep_aspect", self.keep_aspect.is_some()),
        ]);
        for (key, v) in [("limit", self.limit), ("val", self.val)] {
            if v == Some(0) {
                return Err((key, "must be at least 1, found 0".into()));
            }
        }
        if self.stratify == Some(true) && self.limit.is_none() && self.val.is_none() {
            return Err((
                "stratify",
                "stratifies the `limit` and `val` draws, and neither is set".into(),
            ));
        }
        let kept = match self.source {
            Source::Synthetic => Some(self.train_size.unwrap_or(5000)),
            _ => None,
        };
        if let (Some(n), Some(v), None) = (kept, self.val, self.limit) {
            if v >= n {
                return Err((
                    "val",
                    format!("holding out {v} of the {n} training images leaves none to train on"),
                ));
            }
        }
        if let (Some(l), Some(v)) = (self.limit, self.val) {
            if v >= l {
                return Err((
                    "val",
                    format!(
                        "holding out {v} of the {l} images kept by `limit` leaves none to train on"
                    ),
                ));
            }
        }
        for (key, set) in given {
            if set && !allowed.contains(&key) {
                return Err((
                    key,
                    format!("does not apply to source = \"{}\"", self.source.as_str()),
                ));
            }
        }
        Ok(())
    }

    fn check_synthetic(&self) -> std::result::Result<(), RangeError> {
        for (key, v) in [
            ("train_size", self.train_size),
            ("test_size", self.test_size),
        ] {
            if v == Some(0) {
                return Err((key, "must be at least 1, found 0".into()));
            }
        }
        self.synthetic_spec().validate().map_err(|e| match e {
            datasets::DatasetError::Param { name, message } => (name, message),
            other => ("source", other.to_string()),
        })
    }

    fn check_imagefolder(&self) -> std::result::Result<(), RangeError> {
        if self.path.is_none() {
            return Err(("path", "is required for source = \"imagefolder\"".into()));
        }
        match self.image_size {
                    None => Err((
                        "image_size",
                        "is required for source = \"imagefolder\" (the side images are resized and cropped to)".into(),
                    )),
                    Some(0) => Err(("image_size", "must be at least 1, found 0".into())),
                    Some(_) => Ok(()),
                }
    }

    /// CIFAR-10, CIFAR-100, STL-10: a `path`, or `fetch` with its cache and mirror keys.
    fn check_official(&self) -> std::result::Result<(), RangeError> {
        let fetch = self.fetch == Some(true);
        if fetch && self.path.is_some() {
            return Err((
                "path",
                "does not apply with fetch = true (the archive is unpacked into `cache`)".into(),
            ));
        }
        if !fetch {
            for (key, set) in [
                ("cache", self.cache.is_some()),
                ("url", self.url.is_some()),
                ("md5", self.md5.is_some()),
            ] {
                if set {
                    return Err((key, "applies only with fetch = true".into()));
                }
            }
        }
        if self.url.is_some() != self.md5.is_some() {
            let key = if self.url.is_some() { "md5" } else { "url" };
            return Err((
                key,
                "`url` and `md5` go together: a mirror's archive is verified by its md5".into(),
            ));
        }
        if let Some(m) = &self.md5 {
            if m.len() != 32 || !m.chars().all(|c| c.is_ascii_hexdigit()) {
                return Err(("md5", format!("must be 32 hexadecimal digits, found `{m}`")));
            }
        }
        if self.path.is_none() && !fetch {
            return Err((
                        "path",
                        format!(
                            "is required for source = \"{}\" (or set fetch = true to download the official archive)",
                            self.source.as_str()
                        ),
                    ));
        }
        if let Some(b) = &self.batches {
            let repeated = b.iter().enumerate().any(|(i, x)| b[..i].contains(x));
            if b.is_empty() || repeated || b.iter().any(|x| !(1..=5).contains(x)) {
                return Err((
                    "batches",
                    format!(
                        "must list distinct CIFAR-10 training batches among 1..=5, found {b:?}"
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Fills the synthetic defaults (the seed from the run), so they are fingerprinted and
    /// recorded.
    pub fn resolve(&mut self, run_seed: u64) {
        if self.source == Source::Synthetic {
            let spec = self.synthetic_spec();
            self.seed.get_or_insert(run_seed);
            self.train_size.get_or_insert(5000);
            self.test_size.get_or_insert(1000);
            self.classes = Some(spec.classes);
            self.image_size = Some(spec.image_size);
            self.noise = Some(spec.noise);
            self.hue_jitter = Some(spec.hue_jitter);
        }
        if self.source == Source::Cifar100 {
            self.label.get_or_insert(Cifar100Label::Fine);
        }
        if self.limit.is_some() || self.val.is_some() {
            self.seed.get_or_insert(run_seed);
        }
        // `stratify = false` and `keep_aspect = false` are the defaults: the same stage as
        // without the key.
        if self.stratify == Some(false) {
            self.stratify = None;
        }
        if self.keep_aspect == Some(false) {
            self.keep_aspect = None;
        }
    }
}

impl Params {
    /// Fills [`source_digest`](Self::source_digest) from the files under `path` (relative to
    /// `base_dir`), digests cached in `cache`. A source that cannot be read is left without a
    /// digest and the reason returned: the caller warns, and the stage fails if it must run.
    pub fn digest_source(&mut self, base_dir: &Path, cache: Option<&Path>) -> Option<String> {
        match self.current_digest(base_dir, cache) {
            Ok(Some((digest, _))) => {
                self.source_digest = digest;
                None
            }
            Ok(None) => None,
            Err(e) => Some(e),
        }
    }

    /// Keys that only say where the source lives: `path` once its digest stands in for it,
    /// a fetch's `cache` and mirror `url` (its `md5`, or the source's official one, says what
    /// the archive holds).
    pub fn located_keys(&self) -> &'static [&'static str] {
        if self.fetch == Some(true) {
            &["cache", "url"]
        } else if self.source_digest.is_empty() {
            &[]
        } else {
            &["path"]
        }
    }

    /// The digest of the files under `path` now and a line saying what was hashed; `None` for
    /// the sources not read from `path` (`synthetic`, `fetch`).
    fn current_digest(
        &self,
        base_dir: &Path,
        cache: Option<&Path>,
    ) -> std::result::Result<Option<(String, String)>, String> {
        if self.source == Source::Synthetic || self.fetch == Some(true) {
            return Ok(None);
        }
        let dir = base_dir.join(self.path.as_deref().unwrap_or_default());
        let files = match self.source {
            Source::Cifar10 => datasets::cifar::cifar10_files(&dir, self.batches.as_deref()),
            Source::Cifar100 => {
                datasets::cifar::cifar100_files(&dir, self.label.unwrap_or(Cifar100Label::Fine))
            }
            Source::Stl10 => datasets::stl10::stl10_files(&dir),
            Source::Imagefolder => datasets::imagefolder::files(
                &dir,
                self.train_split.as_deref().unwrap_or("train"),
                self.test_split.as_deref().unwrap_or("val"),
            )
            .map_err(|e| e.to_string())?,
            Source::Synthetic => return Ok(None),
        };
        let d = datasets::digest::digest(&dir, &files, cache).map_err(|e| e.to_string())?;
        let how = if d.cached { "cached" } else { "hashed" };
        let line = format!(
            "{} files, {:.1} MB of {} ({how})",
            d.files,
            d.bytes as f64 / 1e6,
            dir.display()
        );
        Ok(Some((d.hex, line)))
    }
}

impl Source {
    /// The source's name in stages.toml.
    pub fn as_str(&self) -> &'static str {
        match self {
            Source::Synthetic => "synthetic",
            Source::Cifar10 => "cifar10",
            Source::Cifar100 => "cifar100",
            Source::Stl10 => "stl10",
            Source::Imagefolder => "imagefolder",
        }
    }
}

/// The folder of the official files: `path`, or the archive fetched into the cache.
fn source_dir(ctx: &Context, p: &Params) -> Result<std::path::PathBuf> {
    if p.fetch != Some(true) {
        return Ok(ctx.base_dir.join(p.path.as_deref().unwrap_or_default()));
    }
    let mut archive = datasets::fetch::Archive::official(p.source.as_str())
        .expect("an official archive for every fetchable source");
    if let (Some(url), Some(md5)) = (&p.url, &p.md5) {
        archive.url = url.clone();
        archive.md5 = md5.to_ascii_lowercase();
    }
    let cache = match &p.cache {
        Some(c) => ctx.base_dir.join(c),
        None => datasets::fetch::default_cache().ok_or_else(|| {
            StageError::invalid(
                &ctx.base_dir,
                "key `cache`",
                "no cache folder: set `cache`, $LDL_CACHE or $HOME",
            )
        })?,
    };
    let bar = ctx.bar(0, &format!("downloading {}", archive.url));
    let dir = datasets::fetch::fetch(&archive, &cache, &mut |done, total| {
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    Ok(dir)
}

/// Runs a `prepare` stage.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    check_unchanged(
        &ctx.name,
        &ctx.base_dir,
        p,
        datasets::digest::default_cache().as_deref(),
    )?;
    let (info, records) = if p.source == Source::Imagefolder {
        pack_image_folder(ctx, p)?
    } else {
        pack_in_memory(ctx, p)?
    };
    records::write(&ctx.dir.join(records::FILE), &records)?;
    engine::json::write(&ctx.dir.join("dataset.json"), &info)?;
    tracing::info!(
        "{}: {} train + {} val + {} test images, {} classes, {}×{}",
        ctx.name,
        info.train.n,
        info.val.as_ref().map_or(0, |v| v.n),
        info.test.n,
        info.classes.len(),
        info.shape[1],
        info.shape[2]
    );
    let mut outputs = vec![info.train.file.clone(), info.test.file.clone()];
    outputs.extend(info.val.as_ref().map(|v| v.file.clone()));
    outputs.push("dataset.json".into());
    outputs.push(records::FILE.into());
    Ok(outputs)
}

/// Packs a source small enough to hold in memory (CIFAR, STL-10, synthetic): read whole, drawn
/// from, fitted, written.
fn pack_in_memory(ctx: &Context, p: &Params) -> Result<(DatasetInfo, Vec<records::SplitRecords>)> {
    let bar = ctx.bar(2, "reading splits");
    let read = read_source(ctx, p, &bar)?;
    let ((train, train_records), val) = datasets::holdout::limit_and_hold_out(
        read.train,
        p.limit,
        p.val,
        p.seed.unwrap_or_default(),
        p.stratify.unwrap_or(false),
    )?;
    let normalize = read
        .normalize
        .unwrap_or_else(|| Normalize::fit(train.0.c, train.2.chunks_exact(train.0.image_len())));
    let test_records: Vec<usize> = (0..read.test.0.n).collect();
    let mut records = vec![
        provenance("train", train_records, None),
        provenance("test", test_records, None),
    ];
    let mut named = vec![("train", train), ("test", read.test)];
    if let Some((v, val_records)) = val {
        records.push(provenance("val", val_records, None));
        named.push(("val", v));
    }
    let mut splits = Vec::new();
    for (name, (info, labels, pixels)) in named {
        let file = format!("{name}.pack");
        let hash = PackedWriter::write(&ctx.dir.join(&file), &info, &labels, &pixels)?;
        splits.push(split_info(info, file, &labels, hash));
    }
    bar.inc(1);
    bar.finish_and_clear();
    Ok((describe(splits, normalize), records))
}

/// Packs an ImageFolder (ImageNet's 1.28 million images are 193 GB at 224 pixels) in bounded
/// memory: the draws of `limit` and `val` are made from the file list's labels, then each
/// split is decoded and written a chunk of images at a time, the normalisation fitted on the
/// training images as they pass.
fn pack_image_folder(
    ctx: &Context,
    p: &Params,
) -> Result<(DatasetInfo, Vec<records::SplitRecords>)> {
    use datasets::imagefolder as folder;
    let root = ctx.base_dir.join(p.path.as_deref().unwrap_or_default());
    // Required and at least 1 for an ImageFolder (checked when stages.toml is read).
    let size = p.image_size.unwrap_or_default();
    let (train_split, test_split) = (
        p.train_split.as_deref().unwrap_or("train"),
        p.test_split.as_deref().unwrap_or("val"),
    );
    if train_split == test_split {
        tracing::warn!(
            "{}: train_split and test_split are both `{train_split}`: the test images are the \
             training images, so evaluations measure how well they were learnt, not how well the \
             model generalises",
            ctx.name
        );
    }
    let classes = folder::classes(&root, train_split)?;
    let train_files = folder::split_files(&root, train_split, &classes)?;
    let test_files = folder::split_files(&root, test_split, &classes)?;
    let labels: Vec<u32> = train_files.iter().map(|f| f.1).collect();
    let (train_idx, val_idx) = datasets::holdout::draw(
        &labels,
        &classes,
        p.limit,
        p.val,
        p.seed.unwrap_or_default(),
        p.stratify.unwrap_or(false),
    )?;
    let test_idx: Vec<usize> = (0..test_files.len()).collect();
    let total = train_idx.len() + test_idx.len() + val_idx.as_ref().map_or(0, Vec::len);
    let bar = ctx.bar(total as u64, "decoding and packing images");
    let shape = StoreInfo {
        n: 0,
        h: size,
        w: size,
        c: 3,
        classes,
        // Kept whole, every image is at least `size` on both sides (its shorter one is `size`).
        varying: p.keep_aspect.unwrap_or(false),
    };
    let mut fit = NormalizeSums::new(3);
    let pack = |name: &str, files: &[(PathBuf, u32)], idx: &[usize], fit| {
        pack_files(ctx, name, files, idx, &shape, fit, &bar)
    };
    let mut splits = vec![
        pack("train", &train_files, &train_idx, Some(&mut fit))?,
        pack("test", &test_files, &test_idx, None)?,
    ];
    if let Some(v) = &val_idx {
        splits.push(pack("val", &train_files, v, None)?);
    }
    bar.finish_and_clear();
    let names = |files: &[(PathBuf, u32)]| -> Vec<String> {
        files
            .iter()
            .map(|(f, _)| datasets::digest::relative(&root, f))
            .collect()
    };
    let (train_names, test_names) = (names(&train_files), names(&test_files));
    let mut records = vec![
        provenance("train", train_idx, Some(&train_names)),
        provenance("test", test_idx, Some(&test_names)),
    ];
    if let Some(v) = val_idx {
        records.push(provenance("val", v, Some(&train_names)));
    }
    Ok((describe(splits, fit.finish()), records))
}

/// Images per chunk of [`pack_files`]: about 256 MiB of pixels (images kept whole counted at
/// twice the square's size: most photographs are at most 2:1).
fn chunk_images(info: &StoreInfo) -> usize {
    let len = info.image_len() * if info.varying { 2 } else { 1 };
    ((256 << 20) / len.max(1)).max(1)
}

/// Writes split `name` of the images `files[i]` for `i` in `idx`, decoded a chunk at a time
/// (each image also added to `fit`, if given).
fn pack_files(
    ctx: &Context,
    name: &str,
    files: &[(PathBuf, u32)],
    idx: &[usize],
    shape: &StoreInfo,
    mut fit: Option<&mut NormalizeSums>,
    bar: &indicatif::ProgressBar,
) -> Result<(StoreInfo, SplitInfo)> {
    use datasets::imagefolder as folder;
    let info = StoreInfo {
        n: idx.len(),
        ..shape.clone()
    };
    let file = format!("{name}.pack");
    let labels: Vec<u32> = idx.iter().map(|&i| files[i].1).collect();
    let mut stream = PackedWriter::start(&ctx.dir.join(&file), &info, &labels)?;
    let chunk = chunk_images(&info);
    let mut add = |img: &[u8]| {
        if let Some(fit) = fit.as_deref_mut() {
            fit.add(img);
        }
    };
    if info.varying {
        for part in idx.chunks(chunk) {
            for (img, dims) in folder::decode_shorter_side(files, part, info.h)? {
                add(&img);
                stream.push_sized(&img, dims)?;
            }
            bar.inc(part.len() as u64);
        }
    } else {
        let len = info.image_len();
        let mut pixels = vec![0u8; chunk.min(idx.len()) * len];
        for part in idx.chunks(chunk) {
            let out = &mut pixels[..part.len() * len];
            folder::decode(files, part, info.h, out)?;
            out.chunks_exact(len).for_each(&mut add);
            stream.push(out)?;
            bar.inc(part.len() as u64);
        }
    }
    let hash = stream.finish()?;
    Ok(split_info(info, file, &labels, hash))
}

/// A written split's description (file, count, hash, images per class).
fn split_info(
    info: StoreInfo,
    file: String,
    labels: &[u32],
    hash: String,
) -> (StoreInfo, SplitInfo) {
    let mut class_counts = vec![0usize; info.k()];
    for &l in labels {
        class_counts[l as usize] += 1;
    }
    let split = SplitInfo {
        file,
        n: labels.len(),
        hash,
        class_counts,
    };
    (info, split)
}

/// The dataset described by its written splits (`train`, `test`, maybe `val`, in that order).
fn describe(splits: Vec<(StoreInfo, SplitInfo)>, normalize: Normalize) -> DatasetInfo {
    let mut splits = splits.into_iter();
    let (train_info, train) = splits.next().expect("train split");
    let (_, test) = splits.next().expect("test split");
    let val = splits.next().map(|(_, v)| v);
    DatasetInfo {
        classes: train_info.classes.clone(),
        shape: [train_info.c, train_info.h, train_info.w],
        varying: train_info.varying,
        train,
        test,
        val,
        normalize,
    }
}

/// The provenance of a packed split whose images are the source split's `records`; `files`
/// names every image of that source split (ImageFolder).
fn provenance(
    split: &'static str,
    records: Vec<usize>,
    files: Option<&[String]>,
) -> records::SplitRecords {
    let files = files.map(|f| records.iter().map(|&r| f[r].clone()).collect());
    records::SplitRecords {
        split,
        records,
        files,
    }
}

/// Refuses to pack a source that changed since stages.toml was read: the output would be
/// recorded under the digest of other contents. A stage identified by its `path` (a source
/// unreadable when stages.toml was read, a run from before digests) has nothing to compare: an
/// unreadable source then fails below, where the reader's error names the file.
fn check_unchanged(name: &str, base_dir: &Path, p: &Params, cache: Option<&Path>) -> Result<()> {
    if p.source_digest.is_empty() {
        return Ok(());
    }
    let now = match p.current_digest(base_dir, cache) {
        Ok(now) => now,
        Err(e) => return Err(StageError::config(format!("{name}: {e}"))),
    };
    let Some((now, line)) = now else {
        return Ok(());
    };
    if now != p.source_digest {
        let dir = base_dir.join(p.path.as_deref().unwrap_or_default());
        return Err(StageError::invalid(
            &dir,
            "content",
            format!(
                "changed since stages.toml was read (digest {now}, was {}): run again",
                p.source_digest
            ),
        ));
    }
    tracing::info!("{name}: source {line}, digest {now}");
    Ok(())
}

/// What a source held in memory holds: its training and test splits, and its fixed
/// normalisation if it has one.
struct SourceSplits {
    train: Split,
    test: Split,
    normalize: Option<Normalize>,
}

/// Reads the source's training and test splits.
fn read_source(ctx: &Context, p: &Params, bar: &indicatif::ProgressBar) -> Result<SourceSplits> {
    let plain = |(train, test): (Split, Split), normalize: Option<Normalize>| SourceSplits {
        train,
        test,
        normalize,
    };
    Ok(match p.source {
        Source::Synthetic => {
            let spec = p.synthetic_spec();
            spec.validate()?;
            let seed = p.seed.unwrap_or_default();
            let train = spec.generate(seed, 0, p.train_size.unwrap_or(5000))?;
            bar.inc(1);
            let test = spec.generate(seed, 1, p.test_size.unwrap_or(1000))?;
            plain((train, test), None)
        }
        Source::Imagefolder => unreachable!("an ImageFolder is packed by pack_image_folder"),
        Source::Stl10 => {
            let dir = source_dir(ctx, p)?;
            let splits = datasets::stl10::stl10(&dir)?;
            bar.inc(1);
            // No statistics are fixed by the paper's code for STL-10: fitted on the train split.
            plain(splits, None)
        }
        Source::Cifar10 | Source::Cifar100 => {
            let dir = source_dir(ctx, p)?;
            let (splits, (mean, std)) = if p.source == Source::Cifar10 {
                (
                    datasets::cifar::cifar10(&dir, p.batches.as_deref())?,
                    CIFAR10_NORMALIZE,
                )
            } else {
                (
                    datasets::cifar::cifar100(&dir, p.label.unwrap_or(Cifar100Label::Fine))?,
                    CIFAR100_NORMALIZE,
                )
            };
            bar.inc(1);
            let fixed = Normalize {
                mean: mean.to_vec(),
                std: std.to_vec(),
            };
            plain(splits, Some(fixed))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_changed_after_stages_toml_was_read_is_refused() {
        let (base, cache) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let data = base.path().join("stl");
        std::fs::create_dir_all(&data).unwrap();
        for f in datasets::stl10::stl10_files(&data) {
            std::fs::write(f, b"x").unwrap();
        }
        let mut p: Params =
            serde_json::from_str(r#"{"source": "stl10", "path": "stl"}"#).expect("parameters");
        assert_eq!(p.digest_source(base.path(), Some(cache.path())), None);
        assert!(p.source_digest.starts_with("blake3:"));
        assert_eq!(p.located_keys(), ["path"]);
        check_unchanged("d", base.path(), &p, Some(cache.path())).unwrap();
        std::fs::write(data.join("test_y.bin"), b"y").unwrap();
        let e = check_unchanged("d", base.path(), &p, Some(cache.path()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("changed since stages.toml was read"), "{e}");
        // Unreadable when read and now: identified by `path`, the reader's error comes later.
        std::fs::remove_dir_all(&data).unwrap();
        let mut gone: Params =
            serde_json::from_str(r#"{"source": "stl10", "path": "stl"}"#).expect("parameters");
        let why = gone.digest_source(base.path(), Some(cache.path())).unwrap();
        assert!(why.contains("class_names.txt"), "{why}");
        assert!(gone.source_digest.is_empty() && gone.located_keys().is_empty());
        check_unchanged("d", base.path(), &gone, Some(cache.path())).unwrap();
    }
}
