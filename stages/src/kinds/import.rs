//! The `import` stage: a model trained elsewhere — a PyTorch checkpoint (`.pth`/`.pt`) or a
//! safetensors file — turned into the artifact a `train` stage produces (`model.json` beside
//! `model.safetensors`), so that `label`, `evaluate` and the online methods use it unchanged.
//!
//! The file's names are mapped onto ours and every tensor checked ([`engine::import`]); the
//! spec's shape keys (classes, input channels, width, stem, shortcut) are read off the tensors.
//! The stage is fingerprinted by the file's content hash, computed where stages.toml is read
//! ([`Params::hash_file`]), not by its path: moving the file reruns nothing, changing it
//! reruns the stage and everything downstream.

use crate::artifacts::model::Imported;
use crate::artifacts::TrainedModel;
use crate::context::Context;
use crate::error::{Result, StageError};
use crate::params::RangeError;
use candle_core::Device;
use datasets::augment::Normalize;
use engine::json;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// Parameters of an `import` stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// The checkpoint, relative to the stages.toml's folder: a `torch.save` file (the zip
    /// format of PyTorch ≥ 1.6 or the legacy one) of a state dict, a whole network or a dict
    /// holding either, a TorchScript archive, or a safetensors file.
    pub path: String,
    /// The architecture, as a train stage names it (`resnet110`, `resnet50_imagenet`, ...).
    pub model: String,
    /// The entry of a checkpoint dict holding the state dict, or a dot-joined path through
    /// nested dicts, lists, tuples and plain objects' attributes (`run.ema`, `members.1`)
    /// (default: the first of `state_dict`, `model`, `model_state_dict`, `net` that holds
    /// tensors, else the top level).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Only the tensors whose names (as the file has them) start with this, named without it:
    /// one network of a checkpoint holding several (MoCo's `module.encoder_q.`, a
    /// distillation wrapper's `student.`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Rate of the dropout before the classifier the model was trained with (not visible in its
    /// weights; needed for Monte-Carlo dropout labels or evaluation).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropout: f64,
    /// The input normalisation the model was trained with, e.g. torchvision's ImageNet
    /// statistics `{ mean = [0.485, 0.456, 0.406], std = [0.229, 0.224, 0.225] }`; label,
    /// evaluate and the online methods feed it images normalised so (default: the dataset's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<Normalize>,
    /// The side of the square crops the model was trained on (224 for torchvision's ImageNet
    /// models): label and evaluate show it the centre square of that side of each packed
    /// image (default: the whole image; an online teacher sees its student's batches).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_size: Option<usize>,
    /// The file's expected blake3 (hex): any other content is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blake3: Option<String>,
    /// The seed the model was trained with, where it was trained. Imports of one recipe given
    /// distinct seeds are seeds of one run in reports (mean ± std), their files told apart by
    /// the seed; without it each file is a run of its own. Also the default seed of the
    /// model's Monte-Carlo dropout masks, as a trained model's seed is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// The row name of the model in reports. Not fingerprinted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The file's blake3, computed where stages.toml is read; fingerprinted in place of `path`.
    #[serde(default, skip_deserializing)]
    pub file_blake3: String,
}

fn is_zero(v: &f64) -> bool {
    *v == 0.0
}

impl Params {
    /// Checks the keys' values.
    pub fn validate(&self) -> std::result::Result<(), RangeError> {
        engine::models::Arch::parse(&self.model).map_err(|e| ("model", e.to_string()))?;
        crate::params::below_one("dropout", self.dropout)?;
        crate::params::at_least("crop_size", self.crop_size.unwrap_or(1), 1)?;
        if let Some(n) = &self.normalize {
            if n.mean.is_empty() || n.mean.len() != n.std.len() {
                return Err((
                    "normalize",
                    format!(
                        "needs `mean` and `std` of one value per input channel, found {} and {}",
                        n.mean.len(),
                        n.std.len()
                    ),
                ));
            }
            if let Some(s) = n.std.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                return Err(("normalize", format!("`std` must be positive, found {s}")));
            }
            // In [0, 1] units, as the images are: mmcv-style 0–255 statistics would pass the
            // checks above and give garbage logits.
            if let Some(v) = n
                .mean
                .iter()
                .chain(&n.std)
                .find(|v| !(v.is_finite() && (0.0..=1.0).contains(*v)))
            {
                return Err((
                    "normalize",
                    format!(
                        "`mean` and `std` are in [0, 1] units (torchvision's ImageNet mean is \
                         [0.485, 0.456, 0.406]), found {v}: divide 0–255 statistics by 255"
                    ),
                ));
            }
        }
        if let Some(prefix) = &self.prefix {
            if !prefix.ends_with('.') {
                return Err((
                    "prefix",
                    format!(
                        "`{prefix}` must end with `.`, where a module's name ends (`{prefix}.`): \
                         names are cut between their parts"
                    ),
                ));
            }
        }
        if let Some(h) = &self.blake3 {
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(("blake3", format!("must be 64 hex digits, found `{h}`")));
            }
        }
        Ok(())
    }

    /// Hashes the file (`path` relative to `base_dir`) into `file_blake3`; refuses a missing
    /// file or one whose hash is not the pinned `blake3`.
    pub fn hash_file(&mut self, base_dir: &Path) -> std::result::Result<(), RangeError> {
        let file = base_dir.join(&self.path);
        let hash =
            hash(&file).map_err(|e| ("path", format!("cannot read {}: {e}", file.display())))?;
        if let Some(pin) = &self.blake3 {
            if !pin.eq_ignore_ascii_case(&hash) {
                return Err((
                    "blake3",
                    format!("{} has blake3 {hash}, not the pinned {pin}", file.display()),
                ));
            }
        }
        self.file_blake3 = hash;
        Ok(())
    }
}

/// The blake3 of a file, streamed.
fn hash(file: &Path) -> std::io::Result<String> {
    let mut h = blake3::Hasher::new();
    h.update_reader(std::fs::File::open(file)?)?;
    Ok(h.finalize().to_hex().to_string())
}

/// Runs an `import` stage: reads, maps and checks the checkpoint, writes the model.
pub fn run(ctx: &Context, p: &Params) -> Result<Vec<String>> {
    let t0 = Instant::now();
    let file = ctx.base_dir.join(&p.path);
    let now = hash(&file).map_err(|e| StageError::io(&file, e))?;
    if now != p.file_blake3 {
        return Err(StageError::invalid(
            &file,
            "content",
            format!(
                "changed since stages.toml was read (blake3 {now}, was {}): run again",
                p.file_blake3
            ),
        ));
    }
    let arch = engine::models::Arch::parse(&p.model)?;
    let select = engine::import::Select {
        key: p.key.as_deref(),
        prefix: p.prefix.as_deref(),
    };
    let state = engine::import::read(&file, select, arch)?;
    let spec = state.spec(&file, &p.model, p.dropout)?;
    if let Some(n) = &p.normalize {
        if n.mean.len() != spec.in_channels {
            return Err(StageError::config(format!(
                "{}: `normalize` has {} channels, the model reads {}",
                ctx.name,
                n.mean.len(),
                spec.in_channels
            )));
        }
    }
    let imported = Imported {
        file: file.display().to_string(),
        blake3: now,
        format: state.format,
        key: state.key.clone(),
        prefix: p.prefix.clone(),
        naming: state.naming,
        data_parallel: state.data_parallel,
    };
    let model = state.into_model(&file, &spec, &Device::Cpu)?;
    datasets::atomic::write_bytes(&ctx.dir.join("model.safetensors"), &model.to_safetensors()?)?;
    json::write(
        &ctx.dir.join("model.json"),
        &TrainedModel {
            spec: spec.clone(),
            method: None,
            seed: p.seed.unwrap_or(0),
            epochs: 0,
            variant: String::new(),
            imported: Some(imported),
            normalize: p.normalize.clone(),
            crop_size: p.crop_size,
        },
    )?;
    tracing::info!(
        "{}: imported {} ({} parameters, {} classes) from {} in {:.2} s",
        ctx.name,
        spec.arch,
        model.parameter_count(),
        spec.classes,
        file.display(),
        t0.elapsed().as_secs_f64()
    );
    Ok(vec!["model.safetensors".into(), "model.json".into()])
}
