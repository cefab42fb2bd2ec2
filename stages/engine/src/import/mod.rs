//! Models trained elsewhere: reads the state dict of a PyTorch checkpoint (`torch.save`'s zip
//! format of PyTorch ≥ 1.6, [`zipfile`], or its legacy format, [`legacy`]; what both pickle,
//! [`pickled`], run by our own pickle machine, [`unpickler`]: a state dict, a network saved
//! whole, a TorchScript archive, or a dict holding one) or of a safetensors file, maps the common
//! naming schemes onto ours, infers the shape keys of the [`ModelSpec`] from the tensors, and
//! loads it into a [`Model`], checking every tensor's name and shape. [`Select`] names the part
//! of a checkpoint holding the network (a `key`, dot-joined through nested dicts, and a name
//! `prefix`). For `pipeline inspect`, [`survey`] lists what a checkpoint holds without building
//! a tensor, and [`model_of`] names the model a set of tensors is of ([`guess`]).
//!
//! Naming schemes (detected from the names, recorded as [`Naming`]):
//! - ours = torchvision = RepDistiller's CIFAR ResNets (`conv1`, `bn1`, `layerL.B.conv1`,
//!   `downsample.0`, `fc`): taken as they are;
//! - kuangliu/pytorch-cifar (`shortcut.0`, `shortcut.1`, `linear`): for a ResNet renamed to
//!   `downsample.0`, `downsample.1`, `fc`; ResNeXt, DenseNet and DLA have kuangliu's names
//!   already and take them as they are;
//! - wrapper prefixes on every name (`module.` of `DataParallel` or `DistributedDataParallel`,
//!   `_orig_mod.` of `torch.compile`, `model.`, `net.`) are removed.
//!
//! BatchNorm's `num_batches_tracked` counters are dropped (our BatchNorm uses a fixed momentum
//! and never reads them); every other tensor must be one the model has, of its shape.

use crate::error::{EngineError, Result};
use crate::models::{Arch, Model, ModelSpec, ResNetArch, Shortcut, Stem};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

mod fit;
mod guess;
mod legacy;
mod pickled;
mod places;
mod survey;
mod unpickler;
mod zipfile;

pub use guess::model_of;
pub use survey::{survey, Contents, Holder, TensorInfo, SHOWN};

/// The file format of a checkpoint, told by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `torch.save`'s zip archive holding a pickle (`data.pkl`) and the tensors' storages.
    Pth,
    /// `torch.save`'s legacy format (PyTorch < 1.6, or `_use_new_zipfile_serialization=False`):
    /// pickles followed by the storages, in one stream.
    #[serde(rename = "pth-legacy")]
    PthLegacy,
    /// A safetensors file.
    Safetensors,
}

/// The naming scheme a state dict was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Naming {
    /// Ours, torchvision's and RepDistiller's (the same names).
    Torchvision,
    /// kuangliu/pytorch-cifar's (`shortcut.N`, `linear`).
    Kuangliu,
}

/// A state dict read from a file, names mapped onto ours.
#[derive(Debug)]
pub struct StateDict {
    /// The file's format.
    pub format: Format,
    /// The entry of the checkpoint's top-level dict the state dict was under (`model`,
    /// `state_dict`, ...), `None` for a bare state dict.
    pub key: Option<String>,
    /// The naming scheme found.
    pub naming: Naming,
    /// Whether every name carried a `module.` prefix.
    pub data_parallel: bool,
    /// The tensors, by our names, in the dtype stored (f32, f16, bf16, f64).
    pub tensors: BTreeMap<String, Tensor>,
}

/// Entries of a checkpoint dict searched, in this order, for the state dict when no `key` is
/// given: RepDistiller saves `{'model': ..., 'epoch': ...}`, many training scripts
/// `{'state_dict': ...}` or `{'net': ...}`.
pub const STATE_DICT_KEYS: [&str; 4] = ["state_dict", "model", "model_state_dict", "net"];

/// Which part of a checkpoint holds the network.
#[derive(Debug, Clone, Copy, Default)]
pub struct Select<'a> {
    /// The entry of a checkpoint dict holding the state dict (or the whole network), or a
    /// dot-joined path of entries of nested dicts (`run.ema`); by default the first of
    /// [`STATE_DICT_KEYS`] that holds tensors, else the top level.
    pub key: Option<&'a str>,
    /// Only the tensors whose names, as the file has them, start with this: one network of a
    /// checkpoint holding several (MoCo's `module.encoder_q.`, a distillation wrapper's
    /// `student.`), named without it.
    pub prefix: Option<&'a str>,
}

/// Reads the state dict of `path` for a model of architecture `arch` (which decides how names
/// are mapped), from the part of the checkpoint `select` names.
pub fn read(path: &Path, select: Select, arch: Arch) -> Result<StateDict> {
    let format = sniff(path)?;
    let (raw, key) = match format {
        Format::Pth => unpanicked(path, || zipfile::read(path, select))?,
        Format::PthLegacy => unpanicked(path, || legacy::read(path, select))?,
        Format::Safetensors => {
            if let Some(k) = select.key {
                return Err(EngineError::invalid(
                    path,
                    format!("key `{k}`"),
                    "a safetensors file holds tensors only, not a checkpoint dict: leave `key` out",
                ));
            }
            let tensors = candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| {
                EngineError::invalid(path, "safetensors header", format!("cannot parse: {e}"))
            })?;
            let tensors = match select.prefix {
                Some(prefix) => with_prefix(path, tensors, prefix)?.into_iter().collect(),
                None => tensors.into_iter().collect(),
            };
            (tensors, None)
        }
    };
    let (tensors, naming, data_parallel) = rename(path, raw, arch.is_resnet())?;
    Ok(StateDict {
        format,
        key,
        naming,
        data_parallel,
        tensors,
    })
}

/// `read`, with a panic in it turned into an error naming the file: a guard around the third
/// parties' code the readers call (the zip crate, candle's tensor constructors) on damaged
/// input; no such panic is known.
fn unpanicked<T>(path: &Path, read: impl FnOnce() -> Result<T>) -> Result<T> {
    crate::error::unpanicked(read, |msg| {
        EngineError::invalid(
            path,
            "checkpoint",
            format!("the reader failed on damaged data: {msg}"),
        )
    })
}

/// The format of `path` by its first bytes: a zip archive is a PyTorch checkpoint, the pickled
/// magic number a legacy one, an 8-byte header length followed by `{` a safetensors file; any
/// other pickle (`pickle.dump` of tensors) is refused with what to do.
fn sniff(path: &Path) -> Result<Format> {
    // Room for the magic number pickled under protocol 0 (`L119547037146038801333356L\n.`)
    // or with protocol 4's frame header.
    let mut head = Vec::with_capacity(64);
    let f = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    f.take(64)
        .read_to_end(&mut head)
        .map_err(|e| EngineError::io(path, e))?;
    let (head, n) = (head.as_slice(), head.len());
    if head.starts_with(b"PK\x03\x04") {
        return Ok(Format::Pth);
    }
    if legacy::after_magic(head).is_some() {
        return Ok(Format::PthLegacy);
    }
    if n >= 9 && head[8] == b'{' {
        return Ok(Format::Safetensors);
    }
    if head.first() == Some(&0x80) {
        return Err(EngineError::invalid(
            path,
            "file header",
            "a pickle, but neither `torch.save`'s zip format nor its legacy format: load it in \
             PyTorch and save it again with `torch.save(state_dict, path)`",
        ));
    }
    Err(EngineError::invalid(
        path,
        "file header",
        "neither a PyTorch checkpoint (a zip archive, as `torch.save` writes) nor a safetensors \
         file",
    ))
}

/// The entries of `named` whose names start with `prefix`, named without it; none is an error
/// listing how the names start.
fn with_prefix<T>(
    path: &Path,
    named: impl IntoIterator<Item = (String, T)>,
    prefix: &str,
) -> Result<Vec<(String, T)>> {
    let named: Vec<(String, T)> = named.into_iter().collect();
    if !named.iter().any(|(n, _)| n.starts_with(prefix)) {
        let starts = name_starts(named.iter().map(|(n, _)| n.as_str()));
        let found: Vec<String> = starts
            .iter()
            .take(12)
            .map(|(s, n)| format!("`{s}` ({n})"))
            .collect();
        return Err(EngineError::invalid(
            path,
            format!("prefix `{prefix}`"),
            format!(
                "no tensor's name starts with it; the names start with {}{}",
                found.join(", "),
                if starts.len() > 12 { ", …" } else { "" }
            ),
        ));
    }
    Ok(named
        .into_iter()
        .filter_map(|(name, t)| Some((name.strip_prefix(prefix)?.to_owned(), t)))
        .collect())
}

/// How `names` start: what all share, then each one's next component, with their counts
/// (`module.encoder_k.` (160), `module.encoder_q.` (160), `module.queue` (1)).
pub fn name_starts<'a>(names: impl Iterator<Item = &'a str> + Clone) -> BTreeMap<&'a str, usize> {
    let first = names.clone().next().unwrap_or_default();
    let common = names.clone().fold(first.len(), |c, n| {
        c.min(
            first
                .bytes()
                .zip(n.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        )
    });
    // Bytes: a shared prefix may end inside a character; the last dot before it may not.
    let common = first.as_bytes()[..common]
        .iter()
        .rposition(|&b| b == b'.')
        .map_or(0, |i| i + 1);
    let mut starts = BTreeMap::new();
    for n in names {
        let end = n[common..].find('.').map_or(n.len(), |i| common + i + 1);
        *starts.entry(&n[..end]).or_default() += 1;
    }
    starts
}

/// Prefixes that training wrappers put before every name of the network's: DataParallel and
/// DistributedDataParallel (`module.`), `torch.compile` (`_orig_mod.`), and a wrapper holding
/// the network as `model` or `net` (a Lightning module, a distillation wrapper).
const WRAPPER_PREFIXES: [&str; 4] = ["module.", "_orig_mod.", "model.", "net."];

/// Entries that are no tensor of the network: BatchNorm's step counters (suffix) and
/// `swa_utils.AveragedModel`'s count of averaged models (a whole name).
fn not_a_weight(name: &str) -> bool {
    name.ends_with("num_batches_tracked") || name == "n_averaged"
}

/// The wrapper prefixes on every name of `names`, outermost first (`module._orig_mod.`).
fn wrapper_prefix<'a>(names: impl Iterator<Item = &'a String> + Clone) -> String {
    let mut prefix = String::new();
    // No names start with every prefix, for ever.
    if names.clone().next().is_none() {
        return prefix;
    }
    // Each name is looked at past the prefix found so far (`get`: a name shorter than it, or
    // cut inside a character, has not got it).
    while let Some(p) = WRAPPER_PREFIXES.iter().find(|p| {
        let mut rest = names.clone().map(|n| n.get(prefix.len()..));
        rest.all(|n| n.is_some_and(|n| n.starts_with(*p)))
    }) {
        prefix.push_str(p);
    }
    prefix
}

/// Maps names onto ours: drops the wrapper prefixes present on every name and the entries that
/// are no weights, and renames kuangliu/pytorch-cifar's layers. Also says whether DataParallel's
/// `module.` was among the prefixes.
fn rename(
    path: &Path,
    mut raw: BTreeMap<String, Tensor>,
    resnet: bool,
) -> Result<(BTreeMap<String, Tensor>, Naming, bool)> {
    raw.retain(|name, _| !not_a_weight(name));
    if raw.is_empty() {
        return Err(EngineError::invalid(path, "state dict", "holds no tensors"));
    }
    let prefix = wrapper_prefix(raw.keys());
    let data_parallel = prefix.contains("module.");
    let kuangliu = raw.keys().any(|n| {
        let n = &n[prefix.len()..];
        n.contains(".shortcut.") || n.starts_with("linear.")
    });
    let mut out = BTreeMap::new();
    for (name, t) in raw {
        let mut ours = name[prefix.len()..].to_owned();
        if kuangliu && resnet {
            ours = ours.replace(".shortcut.", ".downsample.");
            if let Some(rest) = ours.strip_prefix("linear.") {
                ours = format!("fc.{rest}");
            }
        }
        if out.insert(ours.clone(), t).is_some() {
            return Err(EngineError::invalid(
                path,
                format!("tensor `{name}`"),
                format!("maps to `{ours}`, which another tensor maps to as well"),
            ));
        }
    }
    let naming = if kuangliu {
        Naming::Kuangliu
    } else {
        Naming::Torchvision
    };
    Ok((out, naming, data_parallel))
}

impl StateDict {
    /// The spec of architecture `arch` these tensors are for: classes and input channels from
    /// the classifier and the first convolution; the width from the first convolution (a
    /// ResNet's or DLA's channels, twice a DenseNet's growth rate) or, for ResNeXt, from the
    /// first block's channels per group; a ResNet's stem from its kernel size and a CIFAR
    /// ResNet's shortcut from whether projections are present. `dropout` cannot be seen in the
    /// weights and is given.
    pub fn spec(&self, path: &Path, arch: &str, dropout: f64) -> Result<ModelSpec> {
        let parsed = Arch::parse(arch)?;
        let dims = |name: &str, rank: usize| -> Result<Vec<usize>> {
            let t = self.tensors.get(name).ok_or_else(|| {
                EngineError::invalid(
                    path,
                    format!("tensor `{name}`"),
                    format!("missing: the checkpoint is not a {arch} model"),
                )
            })?;
            if t.rank() != rank {
                return Err(EngineError::invalid(
                    path,
                    format!("tensor `{name}`"),
                    format!("shape {:?}, expected a rank-{rank} tensor", t.dims()),
                ));
            }
            Ok(t.dims().to_vec())
        };
        let first = dims(
            if parsed == Arch::Dla {
                "base.0.weight"
            } else {
                "conv1.weight"
            },
            4,
        )?;
        let classes = dims(&format!("{}.weight", parsed.classifier_name()), 2)?[0];
        let (mut stem, mut shortcut) = (Stem::Cifar, Shortcut::B);
        let width = match parsed {
            Arch::ResNet(r) => {
                if first[2] == 7 {
                    stem = Stem::Imagenet;
                }
                if matches!(r, ResNetArch::Cifar { .. })
                    && !self.tensors.contains_key("layer2.0.downsample.0.weight")
                {
                    shortcut = Shortcut::A;
                }
                first[0]
            }
            Arch::ResNeXt { cardinality, .. } => dims("layer1.0.conv1.weight", 4)?[0] / cardinality,
            Arch::DenseNet { .. } => first[0] / 2,
            Arch::Dla => first[0],
        };
        Ok(ModelSpec {
            arch: arch.to_owned(),
            width,
            shortcut,
            classes,
            in_channels: first[1],
            stem,
            dropout,
        })
    }

    /// Builds the model of `spec` on `device` and loads these tensors into it, every one
    /// checked by name and shape (see [`Model::set_tensors`]).
    pub fn into_model(self, path: &Path, spec: &ModelSpec, device: &Device) -> Result<Model> {
        fit::fits(&self.tensors, path, spec)?;
        let model = Model::new(spec, device, 0)?;
        let tensors = self
            .tensors
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(DType::F32)?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        model.set_tensors(path, &tensors)?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn resnet() -> Arch {
        Arch::parse("resnet8").unwrap()
    }

    fn key(k: &str) -> Select<'_> {
        Select {
            key: Some(k),
            prefix: None,
        }
    }

    pub(super) fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/import")
            .join(name)
    }

    /// kuangliu/pytorch-cifar's names (`shortcut`, `linear`) map onto ours, and the model then
    /// computes the logits PyTorch recorded for a fixed input.
    #[test]
    fn a_kuangliu_resnet18_maps_and_matches_pytorchs_logits() {
        let path = fixture("kuangliu_resnet18_w2.pth");
        let state = read(&path, Select::default(), resnet()).unwrap();
        assert_eq!(
            (state.naming, state.key.as_deref(), state.data_parallel),
            (Naming::Kuangliu, None, false)
        );
        assert!(state.tensors.contains_key("layer2.0.downsample.0.weight"));
        assert!(state.tensors.contains_key("fc.bias"));
        let spec = state.spec(&path, "resnet18", 0.0).unwrap();
        assert_eq!(
            (spec.width, spec.classes, spec.in_channels, spec.stem),
            (2, 10, 3, Stem::Cifar)
        );
        let model = state.into_model(&path, &spec, &Device::Cpu).unwrap();
        let got = model
            .net
            .forward_t(&linspace_input(), false)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        let want: serde_json::Value = serde_json::from_slice(
            &std::fs::read(fixture("kuangliu_resnet18_w2_logits.json")).unwrap(),
        )
        .unwrap();
        for (r, row) in got.iter().enumerate() {
            for (k, v) in row.iter().enumerate() {
                let w = want["logits"][r][k].as_f64().unwrap();
                assert!(
                    (*v as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                    "{r},{k}: {v} vs {w}"
                );
            }
        }
    }

    /// RepDistiller's `{'model': state_dict, ...}` is found without a key, the safetensors copy
    /// with DataParallel's prefix maps to the same tensors, and both infer a resnet8 of width 16.
    #[test]
    fn a_checkpoint_dict_and_a_prefixed_safetensors_file_hold_the_same_state() {
        let pth_path = fixture("resnet8.pth");
        let pth = read(&pth_path, Select::default(), resnet()).unwrap();
        assert_eq!(
            (pth.format, pth.key.as_deref()),
            (Format::Pth, Some("model"))
        );
        let st = read(&fixture("resnet8.safetensors"), Select::default(), resnet()).unwrap();
        assert_eq!((st.format, st.data_parallel), (Format::Safetensors, true));
        assert_eq!(
            pth.tensors.keys().collect::<Vec<_>>(),
            st.tensors.keys().collect::<Vec<_>>()
        );
        assert!(!pth
            .tensors
            .keys()
            .any(|k| k.contains("num_batches_tracked")));
        for (name, t) in &pth.tensors {
            let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = st.tensors[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            assert_eq!(a, b, "{name}");
        }
        let spec = pth.spec(&pth_path, "resnet8", 0.0).unwrap();
        assert_eq!(spec, ModelSpec::new("resnet8", 10, 3).unwrap());
        // An explicit key works too; a safetensors file has no keys.
        assert_eq!(
            read(&pth_path, key("model"), resnet())
                .unwrap()
                .tensors
                .len(),
            pth.tensors.len()
        );
        let e = read(&fixture("resnet8.safetensors"), key("model"), resnet()).unwrap_err();
        assert!(e.to_string().contains("holds tensors only"), "{e}");
    }

    /// Checkpoints saved by other training code (tests/fixtures/import/derive_fixtures.py
    /// rewrites resnet8.pth): RepDistiller's `_best.pth` with its 0-d `best_acc` tensor beside
    /// `model`, channels-last convolution weights, and `AveragedModel` of a `torch.compile`d
    /// model (`module._orig_mod.` names and `n_averaged`) all hold resnet8.pth's weights.
    #[test]
    fn other_training_codes_checkpoints_hold_the_same_weights() {
        let reference = read(&fixture("resnet8.pth"), Select::default(), resnet()).unwrap();
        for (file, key, data_parallel) in [
            ("repdistiller_best.pth", Some("model"), false),
            ("channels_last.pth", None, false),
            ("wrapped.pth", None, true),
        ] {
            let state = read(&fixture(file), Select::default(), resnet())
                .unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(state.key.as_deref(), key, "{file}");
            assert_eq!(state.data_parallel, data_parallel, "{file}");
            assert_same_tensors(&state, &reference, file);
        }
    }

    /// A checkpoint whose storages are big-endian is refused by its `byteorder` record rather
    /// than read as garbage.
    #[test]
    fn big_endian_storages_are_refused() {
        let e = read(&fixture("big_endian.pth"), Select::default(), resnet())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("big_endian/byteorder") && e.contains("`big` byte order"),
            "{e}"
        );
    }

    /// A file that is neither format is refused by its header.
    #[test]
    fn other_files_are_refused_by_their_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("notes.pth");
        std::fs::write(&p, "hello, world").unwrap();
        let e = read(&p, Select::default(), resnet())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("notes.pth") && e.contains("neither a PyTorch checkpoint"),
            "{e}"
        );
    }

    /// The input of the kuangliu fixtures (here and in tests/fixtures/models):
    /// torch.linspace(-2, 2, n) as 2×3×32×32.
    fn linspace_input() -> Tensor {
        linspace(2, 32)
    }

    /// torch.linspace(-2, 2, n) as `batch`×3×`side`×`side` (start + i·step, the upper half
    /// counted from the end, as PyTorch computes it).
    fn linspace(batch: usize, side: usize) -> Tensor {
        let n = batch * 3 * side * side;
        let step = 4.0 / (n - 1) as f64;
        let x: Vec<f32> = (0..n)
            .map(|i| {
                if i < n / 2 {
                    (-2.0 + step * i as f64) as f32
                } else {
                    (2.0 - step * (n - 1 - i) as f64) as f32
                }
            })
            .collect();
        Tensor::from_vec(x, (batch, 3, side, side), &Device::Cpu).unwrap()
    }

    /// Checks `model`'s logits on `x` against PyTorch's (`want["eval"]`, `want["train"]`),
    /// inference first: a training-mode forward moves the running statistics.
    fn assert_logits(model: &Model, x: &Tensor, want: &serde_json::Value, what: &str) {
        for (mode, train) in [("eval", false), ("train", true)] {
            let got = model
                .net
                .forward_t(x, train)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            for (r, row) in got.iter().enumerate() {
                for (k, v) in row.iter().enumerate() {
                    let w = want[mode][r][k].as_f64().unwrap();
                    assert!(
                        (*v as f64 - w).abs() < 1e-4 * (1.0 + w.abs()),
                        "{what} {mode} {r},{k}: {v} vs {w}"
                    );
                }
            }
        }
    }

    /// kuangliu/pytorch-cifar's ResNeXt-29, DenseNet-121 and DLA, written by PyTorch from
    /// kuangliu's own definitions (tests/fixtures/models/make_fixtures.py, small widths), load
    /// by their names as they are, their widths are inferred, and the models compute the logits
    /// PyTorch recorded, with running statistics and with batch statistics.
    #[test]
    fn kuangliu_resnext_densenet_and_dla_match_pytorchs_logits() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models");
        let want: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("kuangliu_logits.json")).unwrap())
                .unwrap();
        for (arch, file) in [
            ("resnext29_4x64d", "resnext29_4x64d_w2"),
            ("densenet121", "densenet121_w2"),
            ("dla", "dla_w2"),
        ] {
            let path = dir.join(format!("kuangliu_{file}.pth"));
            let state = read(&path, Select::default(), Arch::parse(arch).unwrap()).unwrap();
            assert_eq!(state.naming, Naming::Kuangliu, "{arch}");
            assert!(state.tensors.contains_key("linear.weight"), "{arch}");
            let spec = state.spec(&path, arch, 0.0).unwrap();
            assert_eq!(
                (spec.width, spec.classes, spec.in_channels),
                (2, 5, 3),
                "{arch}"
            );
            let model = state.into_model(&path, &spec, &Device::Cpu).unwrap();
            assert_eq!(
                model.parameter_count() as u64,
                want[file]["parameters"].as_u64().unwrap(),
                "{arch}"
            );
            assert_logits(&model, &linspace_input(), &want[file], arch);
        }
    }

    /// The PyTorch logits of make_reference_fixtures.py's models.
    fn reference_logits() -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(fixture("reference_logits.json")).unwrap()).unwrap()
    }

    /// akamaster/pytorch_resnet_cifar10's published ResNet-20, as downloaded: the legacy format
    /// of PyTorch 0.3 (`_rebuild_tensor`), `{'state_dict', 'best_prec1'}`, DataParallel's
    /// prefix, `linear` and option-A shortcuts. It loads as a resnet20 of width 16 with option A
    /// and computes the logits akamaster's own model code computes in PyTorch 2.
    #[test]
    fn akamasters_published_resnet20_reads_from_the_legacy_format_and_matches_pytorch() {
        let path = fixture("akamaster_resnet20.th");
        let arch = Arch::parse("resnet20").unwrap();
        let state = read(&path, Select::default(), arch).unwrap();
        assert_eq!(
            (state.format, state.key.as_deref(), state.naming),
            (Format::PthLegacy, Some("state_dict"), Naming::Kuangliu)
        );
        assert!(state.data_parallel);
        assert_eq!(state.tensors.len(), 97);
        let spec = state.spec(&path, "resnet20", 0.0).unwrap();
        assert_eq!(
            (spec.width, spec.classes, spec.shortcut, spec.stem),
            (16, 10, Shortcut::A, Stem::Cifar)
        );
        let model = state.into_model(&path, &spec, &Device::Cpu).unwrap();
        let want = &reference_logits()["akamaster_resnet20"];
        assert_eq!(
            model.parameter_count() as u64,
            want["parameters"].as_u64().unwrap()
        );
        assert_logits(&model, &linspace_input(), want, "resnet20");
    }

    /// torchvision's ResNet-18 and ResNet-50 (the ImageNet stem: 7×7 convolution, max-pool;
    /// Bottleneck's stride on its 3×3), written by torchvision's own class at width 4: the stem
    /// is read off `conv1`, and the models compute PyTorch's logits on 64×64 images.
    #[test]
    fn torchvisions_imagenet_resnets_match_pytorchs_logits() {
        let all = reference_logits();
        for arch in ["resnet18", "resnet50"] {
            let path = fixture(&format!("torchvision_{arch}_w4.pth"));
            let state = read(&path, Select::default(), Arch::parse(arch).unwrap()).unwrap();
            assert_eq!(
                (state.format, state.naming),
                (Format::Pth, Naming::Torchvision)
            );
            let spec = state.spec(&path, arch, 0.0).unwrap();
            assert_eq!(
                (spec.width, spec.classes, spec.stem),
                (4, 5, Stem::Imagenet),
                "{arch}"
            );
            let model = state.into_model(&path, &spec, &Device::Cpu).unwrap();
            let want = &all[format!("torchvision_{arch}_w4")];
            assert_eq!(
                model.parameter_count() as u64,
                want["parameters"].as_u64().unwrap(),
                "{arch}"
            );
            assert_logits(&model, &linspace(2, 64), want, arch);
        }
    }

    /// A state dict saved by PyTorch 2 in the legacy format (`_use_new_zipfile_serialization=False`,
    /// `_rebuild_tensor_v2`, `num_batches_tracked` in long storages) holds the tensors the same
    /// state saved in the zip format holds (bad/extra.pth is it plus one tensor).
    #[test]
    fn a_legacy_file_of_pytorch_2_holds_what_its_zip_file_holds() {
        let legacy = read(&fixture("legacy.pth"), Select::default(), resnet()).unwrap();
        let mut zip = read(&fixture("bad/extra.pth"), Select::default(), resnet()).unwrap();
        assert_eq!(
            (legacy.format, zip.format),
            (Format::PthLegacy, Format::Pth)
        );
        zip.tensors.remove("layer4.0.conv1.weight").unwrap();
        assert_same_tensors(&legacy, &zip, "legacy.pth");
        // The same state with every tensor a view into one storage at its own offset, the
        // convolutions' weights channels-last.
        let views = read(&fixture("legacy_views.pth"), Select::default(), resnet()).unwrap();
        assert_same_tensors(&views, &legacy, "legacy_views.pth");
    }

    /// `got` holds the tensors `want` holds: the same names, shapes and values.
    fn assert_same_tensors(got: &StateDict, want: &StateDict, what: &str) {
        assert_eq!(
            got.tensors.keys().collect::<Vec<_>>(),
            want.tensors.keys().collect::<Vec<_>>(),
            "{what}"
        );
        let values = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (name, t) in &want.tensors {
            assert_eq!(got.tensors[name].dims(), t.dims(), "{what} {name}");
            assert_eq!(values(&got.tensors[name]), values(t), "{what} {name}");
        }
    }

    /// Wrapper prefixes are found in time linear in the names: a name of 100,000 `module.`s
    /// (700 KB; a quadratic search would take minutes), and none in no names at all.
    #[test]
    fn wrapper_prefixes_are_found_in_linear_time() {
        let long = format!("{}conv1.weight", "module.".repeat(100_000));
        assert_eq!(wrapper_prefix([long].iter()), "module.".repeat(100_000));
        let both = [
            "module._orig_mod.fc.weight".to_owned(),
            "module.fc.bias".to_owned(),
        ];
        assert_eq!(wrapper_prefix(both.iter()), "module.");
        assert_eq!(wrapper_prefix(std::iter::empty()), "");
    }

    /// `key` reaches a state dict two dicts deep (derive_fixtures.py's nested.pth: resnet8.pth's
    /// state dict under `run.weights` and again under `run.ema.v2`, a key holding a dot), and
    /// reads resnet8.pth's tensors there; without a key the error says where tensors are, and
    /// a key going astray names the level where it did.
    #[test]
    fn a_dotted_key_reaches_a_state_dict_in_nested_dicts() {
        let path = fixture("nested.pth");
        let want = read(&fixture("resnet8.pth"), Select::default(), resnet()).unwrap();
        for k in ["run.weights", "run.ema.v2"] {
            let got = read(&path, key(k), resnet()).unwrap();
            assert_eq!(got.key.as_deref(), Some(k));
            assert_same_tensors(&got, &want, k);
        }
        let error = |select| read(&path, select, resnet()).unwrap_err().to_string();
        let e = error(Select::default());
        assert!(
            e.contains("nested.pth")
                && e.contains(r#"keys ["epoch", "run"]"#)
                && e.contains("tensors are under `run.weights` (56): name one with `key`"),
            "{e}"
        );
        let e = error(key("run.nope"));
        assert!(
            e.contains("key `run.nope`")
                && e.contains(
                    r#"`nope` is not in `run`, whose keys are ["weights", "ema.v2", "optimizer"]"#
                ),
            "{e}"
        );
        let e = error(key("epoch.x"));
        assert!(
            e.contains("`epoch` is a plain value, which has no entries"),
            "{e}"
        );
        let e = error(key("run.optimizer"));
        assert!(
            e.contains("key `run.optimizer`: holds no tensors")
                && e.contains("tensors are under `run.weights` (56)"),
            "{e}"
        );
    }

    /// An ensemble's checkpoint (`{'epoch', 'members': [{'n_averaged': int64 tensor}, state
    /// dict]}`, derive_fixtures.py) is read at `members.1`; the error without a key lists both
    /// members, and `members.0` (no weights) is refused.
    #[test]
    fn an_index_reaches_a_state_dict_in_a_list() {
        let path = fixture("listed.pth");
        let want = read(&fixture("resnet8.pth"), Select::default(), resnet()).unwrap();
        let got = read(&path, key("members.1"), resnet()).unwrap();
        assert_eq!(got.key.as_deref(), Some("members.1"));
        assert_same_tensors(&got, &want, "members.1");
        let error = |select| read(&path, select, resnet()).unwrap_err().to_string();
        let e = error(Select::default());
        assert!(
            e.contains("tensors are under `members.0` (1), `members.1` (56): name one with `key`"),
            "{e}"
        );
        let e = error(key("members.2"));
        assert!(
            e.contains("key `members.2`")
                && e.contains("`2` is not in `members`, a list of 2 items (0 to 1)"),
            "{e}"
        );
        // Its one tensor is a count, no weight.
        let e = error(key("members.0"));
        assert!(
            e.contains("key `members.0`: holds no weights, only counters (`n_averaged`)")
                && e.contains("tensors are under `members.0` (1), `members.1` (56)"),
            "{e}"
        );
    }

    /// `prefix` picks one network of a checkpoint holding two (`student.` over DataParallel's
    /// `module.`, `teacher.`) beside a tensor of neither; a prefix no name has is an error
    /// listing the names' beginnings.
    #[test]
    fn a_prefix_picks_one_network_of_several() {
        let reference = read(&fixture("resnet8.pth"), Select::default(), resnet()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let both = dir.path().join("both.safetensors");
        let mut tensors = std::collections::HashMap::new();
        for (name, t) in &reference.tensors {
            tensors.insert(format!("student.module.{name}"), t.clone());
            tensors.insert(format!("teacher.{name}"), (t * 2.0).unwrap());
        }
        tensors.insert(
            "queue".into(),
            Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
        );
        candle_core::safetensors::save(&tensors, &both).unwrap();
        let select = |prefix| Select {
            key: None,
            prefix: Some(prefix),
        };
        let student = read(&both, select("student."), resnet()).unwrap();
        assert_same_tensors(&student, &reference, "student.");
        assert!(student.data_parallel);
        let teacher = read(&both, select("teacher."), resnet()).unwrap();
        let doubled = |t: &Tensor| (t * 2.0).unwrap().flatten_all().unwrap().to_vec1::<f32>();
        for (name, t) in &reference.tensors {
            let got = teacher.tensors[name]
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>();
            assert_eq!(got.unwrap(), doubled(t).unwrap(), "{name}");
        }
        let n = reference.tensors.len();
        let e = read(&both, select("encoder."), resnet())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("both.safetensors")
                && e.contains("prefix `encoder.`")
                && e.contains(&format!(
                    "the names start with `queue` (1), `student.` ({n}), `teacher.` ({n})"
                )),
            "{e}"
        );
    }

    /// A network saved whole (`torch.save(model)`, zip and legacy formats), traced to a
    /// TorchScript archive, a state dict referenced twice in a checkpoint of pickle protocol 4,
    /// and a legacy file of protocol 4 all hold the tensors `model.state_dict()` gave PyTorch,
    /// by the same names (make_module_fixtures.py, from akamaster's ResNet class, with a
    /// non-persistent buffer `scratch` that only TorchScript's `state_dict()` holds), and so
    /// does MoCo's encoder in a checkpoint of two encoders, a queue and an int64 pointer.
    #[test]
    fn whole_modules_torchscript_and_protocol_4_hold_the_state_dicts_tensors() {
        let reference = read(
            &fixture("module_resnet8_state.pth"),
            Select::default(),
            resnet(),
        )
        .unwrap();
        assert_eq!(reference.naming, Naming::Kuangliu);
        for (file, key, prefix, format) in [
            ("module_resnet8.pth", None, None, Format::Pth),
            ("module_resnet8_legacy.pth", None, None, Format::PthLegacy),
            ("traced_resnet8.pt", None, None, Format::Pth),
            ("shared_protocol4.pth", Some("model"), None, Format::Pth),
            ("shared_protocol4.pth", Some("ema"), None, Format::Pth),
            ("legacy_protocol4.pth", None, None, Format::PthLegacy),
            // Beside an int64 tensor, which is not read: a prefix picks before reading.
            (
                "moco_resnet8.pth",
                None,
                Some("module.encoder_q."),
                Format::Pth,
            ),
        ] {
            let mut got = read(&fixture(file), Select { key, prefix }, resnet())
                .unwrap_or_else(|e| panic!("{file} {key:?}: {e}"));
            // The network's non-persistent buffer: TorchScript keeps no such flag, and its
            // `state_dict()` holds the buffer too; the others leave it out as PyTorch does.
            let scripted = file.ends_with(".pt");
            assert_eq!(got.tensors.remove("scratch").is_some(), scripted, "{file}");
            assert_eq!(got.format, format, "{file}");
            assert_eq!(
                got.key.as_deref(),
                key.or(prefix.map(|_| "state_dict")),
                "{file}"
            );
            assert_same_tensors(&got, &reference, &format!("{file} {key:?}"));
        }
    }

    /// Legacy files as Python 2 wrote names (byte strings: SHORT_BINSTRING, BINSTRING) and
    /// with an integer of 9 bytes beside the state dict (a seed of 2^64 − 1) hold legacy.pth's
    /// tensors.
    #[test]
    fn python_2_strings_and_huge_integers_are_read() {
        let reference = read(&fixture("legacy.pth"), Select::default(), resnet()).unwrap();
        for (file, key) in [
            ("legacy_py2_strings.pth", None),
            ("legacy_seeded.pth", Some("model")),
        ] {
            let state =
                read(&fixture(file), Select::default(), resnet()).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(state.key.as_deref(), key, "{file}");
            assert_same_tensors(&state, &reference, file);
        }
    }

    /// Storage views as PyTorch < 0.4 pickled them (`view_metadata` = view key, offset, size):
    /// elements are counted from the view's start in the root storage, as PyTorch 2's
    /// `torch.load` reads the same file (a = [[3, 4], [5, 6]], b = [0, 1, 2] of a storage
    /// 0, 1, …, 9); a tensor reaching past its view is refused.
    #[test]
    fn storage_views_of_old_pytorch_are_read_within_the_view() {
        let raw = legacy::read(&fixture("legacy_old_views.pth"), Select::default())
            .unwrap()
            .0;
        let a = raw["a"].to_vec2::<f32>().unwrap();
        assert_eq!(a, [[3.0, 4.0], [5.0, 6.0]]);
        assert_eq!(raw["b"].to_vec1::<f32>().unwrap(), [0.0, 1.0, 2.0]);
        let e = legacy::read(&fixture("bad/legacy_out_of_view.pth"), Select::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor `c`") && e.contains("a view of 6 from element 2"),
            "{e}"
        );
    }

    /// float16, bfloat16 and float64 storages are read in their dtype, holding the values
    /// PyTorch rounded to it; int32 and int64 weights are refused naming the tensor and its storage.
    #[test]
    fn weights_of_every_float_dtype_are_read_and_int_ones_refused() {
        let f32s = read(&fixture("legacy.pth"), Select::default(), resnet()).unwrap();
        let mixed = read(&fixture("dtypes.pth"), Select::default(), resnet()).unwrap();
        for (name, t) in &f32s.tensors {
            let want = if t.rank() == 4 {
                DType::F16
            } else if name.starts_with("fc.") {
                DType::F64
            } else {
                DType::BF16
            };
            let got = &mixed.tensors[name];
            assert_eq!(got.dtype(), want, "{name}");
            let values = |t: &Tensor| {
                t.to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
            };
            assert_eq!(values(got), values(&t.to_dtype(want).unwrap()), "{name}");
        }
        for (file, class) in [("int_weight", "IntStorage"), ("long_weight", "LongStorage")] {
            let e = read(
                &fixture(&format!("bad/{file}.pth")),
                Select::default(),
                resnet(),
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("tensor `conv1.weight`") && e.contains(&format!("stored as {class}")),
                "{e}"
            );
        }
    }

    /// The first three pickles of a legacy file: the magic number, the protocol version and
    /// sys_info.
    fn legacy_head() -> Vec<u8> {
        let mut head = vec![
            0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
            0x2e,
        ];
        head.extend_from_slice(
            b"\x80\x02M\xe9\x03.\x80\x02}q\x00(X\x10\x00\x00\x00protocol_versionq\x01M\xe9\x03\
              X\x0d\x00\x00\x00little_endianq\x02\x88X\x0a\x00\x00\x00type_sizesq\x03}q\x04(\
              X\x05\x00\x00\x00shortq\x05K\x02X\x03\x00\x00\x00intq\x06K\x04X\x04\x00\x00\x00\
              longq\x07K\x08uu.",
        );
        head
    }

    /// A legacy file of `pickle` as its saved object is refused naming the file, the place (the
    /// pickle, or tensor `w`) and `what`, at byte `at` of the pickle if given.
    fn assert_refused(file: &str, pickle: &[u8], what: &str, at: Option<usize>) {
        let dir = tempfile::tempdir().unwrap();
        let head = legacy_head();
        let p = dir.path().join(file);
        std::fs::write(&p, [head.as_slice(), pickle].concat()).unwrap();
        let e = read(&p, Select::default(), resnet())
            .unwrap_err()
            .to_string();
        let place = e.contains("the saved object (4th pickle)") || e.contains("tensor `w`");
        assert!(e.contains(file) && place && e.contains(what), "{e}");
        if let Some(at) = at {
            assert!(e.contains(&format!("at byte {}", head.len() + at)), "{e}");
        }
    }

    /// Pickles that would overflow a recursive reader's stack or exhaust memory are read in
    /// linear time and refused as what they are: objects nested a million deep (`TUPLE1`
    /// repeated: a stack overflow when dropped recursively), a memoised object doubled by 60
    /// references to itself (2^60 parts for a reader that copies memoised objects, as candle's
    /// did), a parameter wrapping a parameter 100,000 deep, and 100 MiB of names from one
    /// memoised 1 MiB key.
    #[test]
    fn pickle_bombs_are_refused_in_linear_time() {
        let deep = [b"\x80\x02N".as_slice(), &[0x85; 1_000_000], b"."].concat();
        assert_refused("deep.pth", &deep, "top level is a tuple", None);
        let bomb = [
            b"\x80\x02Nq\x00".as_slice(),
            &b"h\x00h\x00\x86q\x00".repeat(60),
            b".",
        ]
        .concat();
        assert_refused("bomb.pth", &bomb, "top level is a tuple", None);
        // {'w': a parameter of a parameter of ... 100,000 deep}: recursion would overflow.
        let params = [
            b"\x80\x02}(X\x01\x00\x00\x00wctorch._utils\n_rebuild_parameter\nq\x00".as_slice(),
            &b"h\x00".repeat(100_000),
            b")R",
            &b"\x85R".repeat(100_000),
            b"u.",
        ]
        .concat();
        assert_refused(
            "params.pth",
            &params,
            "parameters wrapped in parameters",
            None,
        );
        // One memoised tensor under one memoised key of 1 MiB, 100 times: 100 MiB of names.
        let mut names = b"\x80\x02}(X".to_vec();
        names.extend_from_slice(&(1u32 << 20).to_le_bytes());
        names.extend_from_slice(&vec![b'k'; 1 << 20]);
        names.extend_from_slice(b"q\x00ctorch._utils\n_rebuild_tensor_v2\n)Rq\x01");
        names.extend_from_slice(&b"h\x00h\x01".repeat(99));
        names.extend_from_slice(b"u.");
        let what = "more than 1000000 tensor names or 64 MiB";
        assert_refused("names.pth", &names, what, None);
    }

    /// Damaged pickles are errors naming the file and the place, not panics: a truncated
    /// pickle, a tuple of values the mark hides, and a tensor whose shape does not fit its
    /// storage.
    #[test]
    fn damaged_pickles_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        // A dict of one key whose value is cut off.
        let cut = b"\x80\x02}q\x00X\x01\x00\x00\x00a";
        assert_refused("cut.pth", cut, "no STOP before the end", None);
        // MARK, then TUPLE2 with nothing above the mark.
        assert_refused("mark.pth", b"\x80\x02NN(\x86.", "too few values", Some(5));

        // legacy.pth with `conv1.weight`'s size (2, 3, 3, 3) made (2, 3, 3, 9): 162 elements
        // of a storage of 54.
        let mut bytes = std::fs::read(fixture("legacy.pth")).unwrap();
        let name = b"conv1.weight";
        let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
        let shape = b"(K\x02K\x03K\x03K\x03t";
        let rel = bytes[at..]
            .windows(shape.len())
            .position(|w| w == shape)
            .unwrap();
        bytes[at + rel + 8] = 9;
        let wide = dir.path().join("wide.pth");
        std::fs::write(&wide, &bytes).unwrap();
        let e = read(&wide, Select::default(), resnet())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("wide.pth")
                && e.contains("tensor `conv1.weight`")
                && e.contains("shape [2, 3, 3, 9]")
                && e.contains("storage of 54"),
            "{e}"
        );
    }

    /// A legacy file cut short, or with bytes after its last storage, is refused naming the
    /// storage or the byte; a pickle of another protocol is refused by its header.
    #[test]
    fn damaged_legacy_files_are_refused_naming_the_place() {
        let dir = tempfile::tempdir().unwrap();
        let bytes = std::fs::read(fixture("akamaster_resnet20.th")).unwrap();
        let cut = dir.path().join("cut.th");
        std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
        let e = read(&cut, Select::default(), resnet())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cut.th") && e.contains("storage `") && e.contains("past the end"),
            "{e}"
        );
        let long = dir.path().join("long.th");
        std::fs::write(&long, [bytes.as_slice(), b"xyz"].concat()).unwrap();
        let e = read(&long, Select::default(), resnet())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains(&format!("byte {}", bytes.len())) && e.contains("3 bytes after"),
            "{e}"
        );
        let other = dir.path().join("protocol4.pth");
        std::fs::write(&other, b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00.").unwrap();
        let e = read(&other, Select::default(), resnet())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("file header") && e.contains("nor its legacy format"),
            "{e}"
        );
    }
}
