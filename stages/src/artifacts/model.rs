//! A trained model: `model.json` (architecture, method, seed) beside `model.safetensors`, as a
//! `train` stage writes them and `label`, `evaluate` and the online methods load them.

use crate::error::{Result, StageError};
use crate::science::methods::Method;
use candle_core::Device;
use engine::models::{Model, ModelSpec};
use serde::{Deserialize, Serialize};
use std::path::Path;

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
        let meta: TrainedModel = engine::json::read(&path)?;
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
