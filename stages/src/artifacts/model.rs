//! A trained model: `model.json` (architecture, method, seed) beside `model.safetensors`, as a
//! `train` or `import` stage writes them and `label`, `evaluate` and the online methods load
//! them.

use crate::artifacts::dataset::DatasetInfo;
use crate::error::{Result, StageError};
use crate::science::methods::Method;
use candle_core::Device;
use datasets::augment::Normalize;
use datasets::view::View;
use engine::import::{Format, Naming};
use engine::models::{Model, ModelSpec};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Where an imported model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Imported {
    /// The file, as the import stage read it.
    pub file: String,
    /// Its blake3.
    pub blake3: String,
    /// Its format.
    pub format: Format,
    /// The entry of the checkpoint dict the state dict was under, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// The prefix of the names taken, if one was given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// The naming scheme its tensors were written in.
    pub naming: Naming,
    /// Whether its names carried DataParallel's `module.` prefix.
    pub data_parallel: bool,
}

/// `model.json`: what a train or import stage produced. The keys added for imported models
/// are left out when unset, so that a trained model's file is what it always was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainedModel {
    /// The architecture.
    pub spec: ModelSpec,
    /// The method it was trained by; `None` for an imported model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<Method>,
    /// Its seed (0 for an imported model).
    pub seed: u64,
    /// Epochs trained (0 for an imported model).
    pub epochs: usize,
    /// What else distinguishes the training in a table row: the mixing augmentation, Cutout,
    /// MC-dropout teachers (e.g. `cutmix, MCDO-T`); empty for none.
    #[serde(default)]
    pub variant: String,
    /// Where the model was imported from (an `import` stage).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub imported: Option<Imported>,
    /// The input normalisation the model expects, when not its dataset's (an imported model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub normalize: Option<Normalize>,
    /// The side of the square crops the model was trained on (`crop_size`): evaluation-mode
    /// passes see the centre square of that side of each image, as torchvision's
    /// `Resize` + `CenterCrop` evaluation does; `None`: the whole image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop_size: Option<usize>,
}

impl TrainedModel {
    /// The method's name in `metrics.json`: the method's, or `imported`.
    pub fn method_name(&self) -> &'static str {
        self.method.map_or("imported", |m| m.as_str())
    }

    /// The normalisation to feed the model images with: its own, else the dataset's.
    pub fn normalize<'a>(&'a self, dataset: &'a Normalize) -> &'a Normalize {
        self.normalize.as_ref().unwrap_or(dataset)
    }

    /// What the model sees of each image of the prepared dataset `data` in evaluation mode:
    /// the centre square of its `crop_size`, else the whole image; an error where the crop is
    /// larger than the images, or the images vary in size and the model takes them whole.
    pub fn eval_view(&self, data: &DatasetInfo) -> std::result::Result<View, String> {
        let [_, h, w] = data.shape;
        let view = View::centre_or_whole(self.crop_size);
        if data.varying && view.is_whole() {
            return Err(
                "the model sees whole images (it has no `crop_size`), but the dataset's images \
                 vary in size (`keep_aspect = true`): give it the side of the crops it was \
                 trained on (an import stage's `crop_size`, 224 for torchvision's ImageNet \
                 models; a train stage must train with `crop_size`), or label and evaluate it \
                 on a dataset prepared without `keep_aspect`"
                    .into(),
            );
        }
        view.check((h, w)).map_err(|_| {
            let (side, _) = view.dims((h, w));
            format!(
                "the model was trained on {side}×{side} crops (`crop_size`), larger than the \
                 dataset's {}: prepare the dataset at `image_size` ≥ {side}",
                crate::stream::images_of(h, w, data.varying)
            )
        })?;
        Ok(view)
    }

    /// The blake3 of the weights (`model.safetensors`) a train or import stage wrote into
    /// `dir`, streamed: what tells a model trained again (same fingerprint, other weights)
    /// from the one a label store or replay store was computed from.
    pub fn weights_blake3(dir: &Path) -> Result<String> {
        let path = dir.join("model.safetensors");
        let mut h = blake3::Hasher::new();
        std::fs::File::open(&path)
            .and_then(|f| h.update_reader(f).map(|_| ()))
            .map_err(|e| StageError::io(&path, e))?;
        Ok(h.finalize().to_hex().to_string())
    }

    /// Loads the model a train or import stage wrote into `dir`, checking that it predicts `classes`
    /// classes. Every stage loads a trained model to run it in evaluation mode (labelling,
    /// evaluating, teaching), so its evaluation-mode passes are switched to the backbone's
    /// planned program where the device has one: bitwise the layers' outputs, in buffers reused
    /// from batch to batch instead of an allocation per op.
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
        let mut model = Model::new(&meta.spec, device, 0)?;
        model.load(&dir.join("model.safetensors"))?;
        model
            .net
            .plan_inference(engine::models::plan::wanted(device));
        Ok((meta, model))
    }
}
