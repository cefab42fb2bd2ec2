//! Models, selected by name in stages.toml. Each model maps NCHW `f32` images to logits and
//! exposes its penultimate features; weights live in a candle `VarMap` whose names follow
//! PyTorch's conventions (`conv1.weight`, `layer1.0.bn1.running_mean`, `fc.bias`, ...), so a
//! checkpoint loads in PyTorch by name.

pub mod batch_norm;
pub mod conv;
pub mod resnet;
#[cfg(test)]
mod testing;

use crate::error::{Result, StageError};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rand::Rng;
use rand_distr::{Distribution, Normal};
pub use resnet::{ResNet, Shortcut};
use serde::{Deserialize, Serialize};

/// Everything needed to rebuild a model: written next to its weights as `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture name, e.g. `resnet20`.
    pub arch: String,
    /// Channels of the first stage (16 in He et al.'s CIFAR ResNets).
    pub width: usize,
    /// Shortcut type of the CIFAR ResNets.
    pub shortcut: Shortcut,
    /// Number of classes.
    pub classes: usize,
    /// Input channels.
    pub in_channels: usize,
}

/// A classifier built from a [`ModelSpec`].
pub struct Model {
    /// The network.
    pub net: ResNet,
    /// Its variables (weights and BatchNorm statistics).
    pub vars: VarMap,
    /// The spec it was built from.
    pub spec: ModelSpec,
}

impl Model {
    /// Builds a model with weights initialised deterministically from `seed` (He-normal,
    /// fan-out, for convolutions as torchvision does; PyTorch's uniform default for the
    /// classifier; BatchNorm γ = 1, β = 0).
    pub fn new(spec: &ModelSpec, device: &Device, seed: u64) -> Result<Model> {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, device);
        let net = ResNet::new(spec, vb)?;
        let model = Model {
            net,
            vars,
            spec: spec.clone(),
        };
        model.init(seed)?;
        Ok(model)
    }

    fn init(&self, seed: u64) -> Result<()> {
        let data = self.vars.data().lock().expect("var map lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut rng = datasets::rng::rng_for(&[seed, datasets::rng::stream::INIT]);
        for name in names {
            let var = &data[name];
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let values: Option<Vec<f32>> = if dims.len() == 4 {
                let fan_out = dims[0] * dims[2] * dims[3];
                let normal = Normal::new(0.0, (2.0 / fan_out as f32).sqrt()).expect("std > 0");
                Some((0..n).map(|_| normal.sample(&mut rng)).collect())
            } else if name.starts_with("fc.") {
                let fan_in = data["fc.weight"].dims()[1];
                let bound = 1.0 / (fan_in as f32).sqrt();
                Some((0..n).map(|_| rng.random_range(-bound..bound)).collect())
            } else {
                None
            };
            if let Some(v) = values {
                var.set(&Tensor::from_vec(v, dims, var.device())?)?;
            }
        }
        Ok(())
    }

    /// Number of trainable parameters (BatchNorm running statistics excluded).
    pub fn parameter_count(&self) -> usize {
        let data = self.vars.data().lock().expect("var map lock");
        data.iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Serialises every variable to safetensors bytes, names sorted.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        let data = self.vars.data().lock().expect("var map lock");
        let mut items: Vec<(String, Tensor)> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        safetensors::serialize(items, None).map_err(|e| StageError::Numeric(e.to_string()))
    }

    /// Loads every variable from a safetensors file, checking names and shapes.
    pub fn load(&self, path: &std::path::Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| StageError::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            StageError::invalid(path, "safetensors header", format!("cannot parse: {e}"))
        })?;
        let data = self.vars.data().lock().expect("var map lock");
        for (name, var) in data.iter() {
            let view = st.tensor(name).map_err(|_| {
                StageError::invalid(
                    path,
                    format!("tensor `{name}`"),
                    format!("missing: the checkpoint is not a {} model", self.spec.arch),
                )
            })?;
            if view.shape() != var.dims() {
                return Err(StageError::invalid(
                    path,
                    format!("tensor `{name}`"),
                    format!(
                        "shape {:?}, the model expects {:?}",
                        view.shape(),
                        var.dims()
                    ),
                ));
            }
            let t = candle_core::safetensors::Load::load(&view, var.device())?;
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}
