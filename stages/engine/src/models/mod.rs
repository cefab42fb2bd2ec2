//! Models, selected by name in stages.toml. Each model maps NCHW `f32` images to logits and
//! exposes its penultimate features; weights live in a candle `VarMap` whose names follow
//! the PyTorch definitions they come from (torchvision's for the ResNets: `conv1.weight`,
//! `layer1.0.bn1.running_mean`, `fc.bias`; kuangliu/pytorch-cifar's for ResNeXt, DenseNet and
//! DLA), so a checkpoint loads in PyTorch by name into those definitions. The CIFAR-stem
//! `resnet18`…`resnet200` keep torchvision's names (`downsample`, `fc`), where kuangliu's and
//! RepDistiller's definitions of them say `shortcut` and `linear`: `import` renames those on the
//! way in, and `pipeline export --naming kuangliu` on the way out ([`crate::export`]). [`arch`] lists the architectures; [`net`]
//! is what they share (pooling, dropout, classifier).

pub mod add_relu;
pub mod arch;
mod basic;
pub mod batch_norm;
mod bottleneck;
pub mod conv;
pub(crate) mod cpu;
pub mod densenet;
pub mod dla;
pub mod dropout;
pub mod net;
pub mod no_grad;
pub mod plan;
pub mod plan_cpu;
pub mod pool;
pub mod resnet;
pub mod resnext;
pub mod sgemm;
pub mod testing;

use crate::error::{EngineError, Result};
pub use arch::{Arch, KNOWN_MODELS};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
pub use dropout::Mode;
pub use net::Net;
use rand::Rng;
use rand_distr::{Distribution, Normal};
pub use resnet::{ResNet, ResNetArch, Shortcut, Stem};
use serde::{Deserialize, Serialize};

/// Everything needed to rebuild a model: written next to its weights as `model.json`.
///
/// `stem` and `dropout` are left out of the file at their defaults, so that a model without
/// them writes the same `model.json` as before they existed, and such files still parse.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// Architecture name, e.g. `resnet20`, `resnet18_imagenet`, `densenet121` (see [`Arch`]).
    pub arch: String,
    /// The architecture's scale ([`Arch::default_width`] for the reference network): a ResNet's
    /// stem and first-stage channels (16 for `resnet<6n+2>`, 64 for resnet18 … resnet200),
    /// ResNeXt's bottleneck width, DenseNet's growth rate, DLA's base channels.
    pub width: usize,
    /// Shortcut type of the CIFAR ResNets `resnet<6n+2>`; the others need `B`.
    pub shortcut: Shortcut,
    /// Number of classes.
    pub classes: usize,
    /// Input channels.
    pub in_channels: usize,
    /// Stem of resnet18 … resnet200 (an `_imagenet` name selects the ImageNet stem whatever
    /// this says).
    #[serde(default, skip_serializing_if = "is_cifar_stem")]
    pub stem: Stem,
    /// Rate of the dropout before the classifier, in [0, 1); 0 for none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dropout: f64,
}

fn is_cifar_stem(stem: &Stem) -> bool {
    *stem == Stem::Cifar
}

fn is_zero(p: &f64) -> bool {
    *p == 0.0
}

impl ModelSpec {
    /// The reference network `arch` (its default width, shortcut B, no dropout) for `classes`
    /// classes and `in_channels` input channels; fails on an unknown name.
    pub fn new(arch: &str, classes: usize, in_channels: usize) -> Result<ModelSpec> {
        Ok(ModelSpec {
            arch: arch.into(),
            width: Arch::parse(arch)?.default_width(),
            shortcut: Shortcut::B,
            classes,
            in_channels,
            stem: Stem::Cifar,
            dropout: 0.0,
        })
    }
}

/// A classifier built from a [`ModelSpec`].
pub struct Model {
    /// The network.
    pub net: Net,
    /// Its variables (weights and BatchNorm statistics).
    pub vars: VarMap,
    /// The spec it was built from.
    pub spec: ModelSpec,
}

impl Model {
    /// Builds a model with weights initialised deterministically from `seed` as its reference
    /// does: a ResNet's convolutions He-normal, fan-out (torchvision, RepDistiller); ResNeXt,
    /// DenseNet and DLA, which kuangliu/pytorch-cifar leaves at PyTorch's defaults, uniform in
    /// ±1/√fan_in (`kaiming_uniform_(a = √5)`, fan_in = input channels per group × kernel
    /// area); every classifier PyTorch's uniform default; BatchNorm γ = 1, β = 0.
    pub fn new(spec: &ModelSpec, device: &Device, seed: u64) -> Result<Model> {
        let vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, device);
        let net = arch::build(spec, &vb)?;
        let model = Model {
            net,
            vars,
            spec: spec.clone(),
        };
        model.init(seed)?;
        Ok(model)
    }

    fn init(&self, seed: u64) -> Result<()> {
        let classifier = format!("{}.", self.net.classifier_name());
        let data = self.vars.data().lock().expect("var map lock");
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut rng = datasets::rng::rng_for(&[seed, datasets::rng::stream::INIT]);
        let he_normal = matches!(Arch::parse(&self.spec.arch), Ok(Arch::ResNet(_)));
        for name in names {
            let var = &data[name];
            let dims = var.dims().to_vec();
            let n: usize = dims.iter().product();
            let values: Option<Vec<f32>> = if dims.len() == 4 && he_normal {
                let fan_out = dims[0] * dims[2] * dims[3];
                let normal = Normal::new(0.0, (2.0 / fan_out as f32).sqrt()).expect("std > 0");
                Some((0..n).map(|_| normal.sample(&mut rng)).collect())
            } else if dims.len() == 4 {
                let bound = 1.0 / ((dims[1] * dims[2] * dims[3]) as f32).sqrt();
                Some((0..n).map(|_| rng.random_range(-bound..bound)).collect())
            } else if name.starts_with(&classifier) {
                let fan_in = data[&format!("{classifier}weight")].dims()[1];
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

    /// The trainable variables by name (BatchNorm running statistics excluded), for the optimizer.
    pub fn trainable(&self) -> Vec<(String, candle_core::Var)> {
        let data = self.vars.data().lock().expect("var map lock");
        data.iter()
            .filter(|(n, _)| !n.ends_with("running_mean") && !n.ends_with("running_var"))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect()
    }

    /// Number of trainable parameters (BatchNorm running statistics excluded).
    pub fn parameter_count(&self) -> usize {
        let data = self.vars.data().lock().expect("var map lock");
        data.iter()
            .filter(|(k, _)| !k.ends_with("running_mean") && !k.ends_with("running_var"))
            .map(|(_, v)| v.elem_count())
            .sum()
    }

    /// Every variable (weights and BatchNorm statistics), names sorted.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        let data = self.vars.data().lock().expect("var map lock");
        let mut items: Vec<(String, Tensor)> = data
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        items.sort_by(|a, b| a.0.cmp(&b.0));
        items
    }

    /// Serialises every variable to safetensors bytes, names sorted.
    pub fn to_safetensors(&self) -> Result<Vec<u8>> {
        safetensors::serialize(self.tensors(), None)
            .map_err(|e| EngineError::Numeric(e.to_string()))
    }

    /// Loads every variable from a safetensors file, checking names and shapes.
    pub fn load(&self, path: &std::path::Path) -> Result<()> {
        let bytes = std::fs::read(path).map_err(|e| EngineError::io(path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
            EngineError::invalid(path, "safetensors header", format!("cannot parse: {e}"))
        })?;
        let mut tensors = std::collections::BTreeMap::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)?;
            tensors.insert(name, t.to_dtype(DType::F32)?);
        }
        self.set_tensors(path, &tensors)
    }

    /// Sets every variable from `tensors` (read from `origin`, which errors name), checking
    /// that the names are exactly the model's and each shape is the variable's.
    pub fn set_tensors(
        &self,
        origin: &std::path::Path,
        tensors: &std::collections::BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let data = self.vars.data().lock().expect("var map lock");
        // Extra tensors mean another architecture whose names happen to include ours (a deeper
        // ResNet of the same width): refuse it rather than load part of it.
        let extra: Vec<&String> = tensors.keys().filter(|n| !data.contains_key(*n)).collect();
        if let Some(first) = extra.first() {
            return Err(extra_tensors(origin, &self.spec.arch, first, extra.len()));
        }
        // In name order, so that the first mismatch reported is the same on every run.
        let mut vars: Vec<_> = data.iter().collect();
        vars.sort_by(|a, b| a.0.cmp(b.0));
        for (name, var) in vars {
            let t = tensors
                .get(name)
                .ok_or_else(|| missing_tensor(origin, &self.spec.arch, name))?;
            if t.dims() != var.dims() {
                return Err(EngineError::invalid(
                    origin,
                    format!("tensor `{name}`"),
                    format!("shape {:?}, the model expects {:?}", t.dims(), var.dims()),
                ));
            }
            var.set(&t.to_device(var.device())?.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }
}

/// The error for a checkpoint of `count` tensors the model of architecture `arch` does not
/// have, `first` the first of them by name.
pub fn extra_tensors(
    origin: &std::path::Path,
    arch: &str,
    first: &str,
    count: usize,
) -> EngineError {
    EngineError::invalid(
        origin,
        format!("tensor `{first}`"),
        format!(
            "not in this model: the checkpoint is not a {arch} model ({count} tensors more than it has)"
        ),
    )
}

/// The error for a checkpoint lacking the tensor `name` of the model of architecture `arch`.
pub fn missing_tensor(origin: &std::path::Path, arch: &str, name: &str) -> EngineError {
    EngineError::invalid(
        origin,
        format!("tensor `{name}`"),
        format!("missing: the checkpoint is not a {arch} model"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `model.json` spec written before `stem` and `dropout` existed still parses, and a spec
    /// at their defaults writes the same bytes as then; set, they round-trip.
    #[test]
    fn specs_without_the_new_keys_still_parse() {
        let old = r#"{"arch":"resnet20","width":16,"shortcut":"B","classes":10,"in_channels":3}"#;
        let spec: ModelSpec = serde_json::from_str(old).unwrap();
        assert_eq!(spec, ModelSpec::new("resnet20", 10, 3).unwrap());
        assert_eq!(serde_json::to_string(&spec).unwrap(), old);
        let new = ModelSpec {
            stem: Stem::Imagenet,
            dropout: 0.25,
            ..ModelSpec::new("resnet50", 100, 3).unwrap()
        };
        let json = serde_json::to_string(&new).unwrap();
        assert!(
            json.contains(r#""stem":"imagenet""#) && json.contains(r#""dropout":0.25"#),
            "{json}"
        );
        assert_eq!(serde_json::from_str::<ModelSpec>(&json).unwrap(), new);
        assert!(ModelSpec::new("resnet9", 10, 3).is_err());
    }

    /// Convolutions start as their reference's: a ResNet's He-normal with fan-out (std
    /// √(2 / (C_out·k²))), a DenseNet's (kuangliu, PyTorch's default) uniform in ±1/√fan_in,
    /// std 1/√(3·fan_in). Sample statistics of one large convolution of each, against those
    /// values computed by hand.
    #[test]
    fn convolutions_start_as_their_reference_initialises_them() {
        let stats = |arch: &str, name: &str| {
            let spec = ModelSpec::new(arch, 10, 3).unwrap();
            let m = Model::new(&spec, &Device::Cpu, 3).unwrap();
            let data = m.vars.data().lock().unwrap();
            let w = data[name]
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let dims = data[name].dims().to_vec();
            let n = w.len() as f64;
            let mean = w.iter().map(|&v| v as f64).sum::<f64>() / n;
            let var = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
            let max = w.iter().fold(0f32, |a, &v| a.max(v.abs()));
            (dims, var.sqrt(), max)
        };
        // resnet20's layer3.2.conv2: 64 × 64 × 3 × 3, fan-out 576: std √(2/576) = 0.05893.
        let (dims, std, _) = stats("resnet20", "layer3.2.conv2.weight");
        assert_eq!(dims, [64, 64, 3, 3]);
        assert!((std - 0.05893).abs() < 0.05893 * 0.03, "{std}");
        // densenet121's dense4.15.conv1: 128 × 992 × 1 × 1, fan-in 992: bound 1/√992 =
        // 0.031750, std 0.031750/√3 = 0.018331.
        let (dims, std, max) = stats("densenet121", "dense4.15.conv1.weight");
        assert_eq!(dims, [128, 992, 1, 1]);
        assert!((std - 0.018331).abs() < 0.018331 * 0.03, "{std}");
        assert!(max <= 0.031750 && max > 0.0317, "{max}");
    }
}
