//! What a checkpoint holds, read without building any tensor (for `pipeline inspect`): the
//! saved object's top-level entries, every place in it holding tensors (a state dict, a whole
//! network) with each tensor's name, dtype and shape as the file has them, and the place the
//! import takes when no `key` is given. It helps choose an import's `key`, `prefix` and
//! `model` before writing stages.toml.

use super::pickled::{self, Names};
use super::places::{self, Place};
use super::unpickler::{Id, Pickle, Value};
use super::{legacy, sniff, unpanicked, zipfile, Format};
use crate::error::{EngineError, Result};
use std::path::Path;

/// What a checkpoint holds.
#[derive(Debug)]
pub struct Contents {
    /// The file's format.
    pub format: Format,
    /// What the saved object is (`a dict of 4 entries`, `a whole network (resnet.ResNet)`).
    pub saved: String,
    /// The saved object's entries (a dict's, a plain object's attributes, a safetensors file's
    /// `__metadata__`): key and what it holds, in the file's order.
    pub entries: Vec<(String, String)>,
    /// The places holding tensors, the shallowest first: the first [`SHOWN`] of them, and the
    /// one the import reads.
    pub holders: Vec<Holder>,
    /// How many places hold tensors (up to 10,000: the walk stops there).
    pub places: usize,
    /// The holder the import reads, with the `key` given or by default (its index in
    /// `holders`), or why it finds none.
    pub read: std::result::Result<usize, String>,
}

/// A place holding tensors: a state dict, a whole network, or a dict with a few tensors beside
/// other values (a checkpoint dict's `best_acc`).
#[derive(Debug, Clone)]
pub struct Holder {
    /// The import's `key` for it (dot-joined entries), `None` for the saved object itself.
    pub key: Option<String>,
    /// What it is.
    pub what: String,
    /// Its tensors, by their names in the file, in the file's order.
    pub tensors: Vec<TensorInfo>,
    /// Why its tensors (all, or those after the ones listed) cannot be listed.
    pub error: Option<String>,
}

/// Places listed with their tensors.
pub const SHOWN: usize = 20;

/// Entries of the saved object listed.
const MAX_ENTRIES: usize = 50;

/// `text` cut at 100 characters: a key or class name can be a megabyte long.
fn short(text: &str) -> String {
    match text.char_indices().nth(100) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// A tensor's name, element type and shape.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// Its name in the file.
    pub name: String,
    /// PyTorch's name of its element type (`float32`, `int64`, ...).
    pub dtype: String,
    /// Its shape.
    pub dims: Vec<usize>,
}

/// Reads what `path` holds: its pickle (or safetensors header) only, no storage; `key` as the
/// import's.
pub fn survey(path: &Path, key: Option<&str>) -> Result<Contents> {
    let format = sniff(path)?;
    if format == Format::Safetensors {
        return of_safetensors(path, key);
    }
    unpanicked(path, || match format {
        Format::Pth => {
            let (_, place, p) = zipfile::saved(path)?;
            of_pickle(path, &place, Format::Pth, &p, key)
        }
        _ => {
            let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
            // Safety: mapped read-only; a checkpoint is not written while it is read.
            let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
            let (p, _) = legacy::saved(path, &map)?;
            of_pickle(path, legacy::SAVED, Format::PthLegacy, &p, key)
        }
    })
}

/// The contents of a pickled checkpoint (`place`: where in the file the pickle is).
fn of_pickle(
    path: &Path,
    place: &str,
    format: Format,
    p: &Pickle,
    key: Option<&str>,
) -> Result<Contents> {
    let mut found = places::places(p);
    let count = found.len();
    found.truncate(SHOWN);
    let read = match places::state_dict_key(path, place, p, key) {
        // A place reached under two keys is listed under the first; the key given names it
        // under the other.
        Ok((k, id)) => Ok(
            match found.iter().position(|pl| pl.id == id && pl.path == k) {
                Some(i) => i,
                None => {
                    found.push(Place {
                        path: k,
                        id,
                        tensors: 0,
                    });
                    found.len() - 1
                }
            },
        ),
        Err(e) => Err(e.to_string()),
    };
    // One budget for all the names made, as for one place; the place read first, so that
    // the others cannot spend it.
    let mut names = Names::default();
    let first = read
        .as_ref()
        .ok()
        .map(|&i| holder(p, &found[i], &mut names));
    let holders: Vec<Holder> = found
        .iter()
        .enumerate()
        .map(|(i, pl)| match (&first, read.as_ref()) {
            (Some(h), Ok(&r)) if r == i => h.clone(),
            _ => holder(p, pl, &mut names),
        })
        .collect();
    // Tensors are listed with their holders; a few entries, their keys cut short.
    let others: Vec<(places::Key, Id)> = places::children(p, p.root)
        .into_iter()
        .filter(|&(_, v)| !pickled::is_tensor(p, v))
        .collect();
    let mut entries: Vec<(String, String)> = others
        .iter()
        .take(MAX_ENTRIES)
        .map(|&(k, v)| (short(&k.to_string()), what(p, v)))
        .collect();
    if others.len() > MAX_ENTRIES {
        entries.push(("…".into(), format!("{} such entries in all", others.len())));
    }
    Ok(Contents {
        format,
        saved: what(p, p.root),
        entries,
        holders,
        places: count,
        read,
    })
}

/// The tensors of one place, as the file names them, up to the first that cannot be read.
fn holder<'p>(p: &'p Pickle, place: &Place, names: &mut Names<'p>) -> Holder {
    let mut out = Holder {
        key: place.path.clone(),
        what: what(p, place.id),
        tensors: Vec::new(),
        error: None,
    };
    let named = match pickled::named_tensors(p, place.id, names) {
        Ok(named) => named,
        Err(e) => {
            out.error = Some(e);
            return out;
        }
    };
    for (name, v) in named {
        match pickled::tensor_ref(p, v) {
            Ok(t) => out.tensors.push(TensorInfo {
                name,
                dtype: dtype_name(&t.class),
                dims: t.dims,
            }),
            Err(e) => {
                out.error = Some(format!("tensor `{name}`: {e}"));
                break;
            }
        }
    }
    out
}

/// PyTorch's name of the element type of a storage class (`FloatStorage`: `float32`).
fn dtype_name(class: &str) -> String {
    let name = match class {
        "FloatStorage" => "float32",
        "DoubleStorage" => "float64",
        "HalfStorage" => "float16",
        "BFloat16Storage" => "bfloat16",
        "LongStorage" => "int64",
        "IntStorage" => "int32",
        "ShortStorage" => "int16",
        "CharStorage" => "int8",
        "ByteStorage" => "uint8",
        "BoolStorage" => "bool",
        other => other,
    };
    name.to_owned()
}

/// What the value at `id` is, in a few words.
fn what(p: &Pickle, id: Id) -> String {
    if pickled::is_tensor(p, id) {
        return match pickled::tensor_ref(p, id) {
            Ok(t) => format!("a tensor, {} {:?}", dtype_name(&t.class), t.dims),
            Err(e) => format!("a tensor that cannot be read: {e}"),
        };
    }
    // The legacy format names a module's class by a persistent id `('module', class, ...)`.
    let class = |class: Id| {
        let global = match p.get(class) {
            Value::Persistent(pid) => match p.get(*pid) {
                Value::Tuple(t) => t.get(1).and_then(|&c| p.global(c)),
                _ => None,
            },
            _ => p.global(class),
        };
        global.map_or("?".to_owned(), |(m, n)| short(&format!("{m}.{n}")))
    };
    let count = |entries: &[(Id, Id)]| {
        let tensors = entries
            .iter()
            .filter(|&&(_, v)| pickled::is_tensor(p, v))
            .count();
        let s = |n: usize| if n == 1 { "" } else { "s" };
        match (entries.len(), tensors) {
            (n, 0) => format!("{n} entr{}", if n == 1 { "y" } else { "ies" }),
            (n, t) if t == n => format!("{n} tensor{}", s(n)),
            (n, t) => format!("{n} entries, {t} of them tensor{}", s(t)),
        }
    };
    match p.get(id) {
        Value::Object { class: c, .. } if pickled::is_module(p, id) => {
            let scripted = class(*c).starts_with("__torch__");
            let kind = if scripted {
                "a TorchScript module"
            } else {
                "a whole network"
            };
            format!("{kind} ({})", class(*c))
        }
        Value::Dict(d) if !d.is_empty() && d.iter().all(|&(_, v)| pickled::is_tensor(p, v)) => {
            format!("a state dict of {}", count(d))
        }
        Value::Dict(d) => format!("a dict of {}", count(d)),
        Value::Object {
            class: c, items, ..
        } if !items.is_empty() => {
            format!("a {} of {}", class(*c), count(items))
        }
        Value::Object {
            class: c, list: v, ..
        } if !v.is_empty() => format!("a {} of {} items", class(*c), v.len()),
        Value::Object { class: c, .. } => format!("a {} object", class(*c)),
        Value::List(v) => format!("a list of {} items", v.len()),
        Value::Tuple(v) => format!("a tuple of {} items", v.len()),
        Value::Set(v) => format!("a set of {} items", v.len()),
        _ => p.describe(id),
    }
}

/// The contents of a safetensors file: its header.
fn of_safetensors(path: &Path, key: Option<&str>) -> Result<Contents> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    // Safety: mapped read-only; a checkpoint is not written while it is read.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&map).map_err(|e| {
        EngineError::invalid(path, "safetensors header", format!("cannot parse: {e}"))
    })?;
    let mut tensors: Vec<(usize, TensorInfo)> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| {
            let t = TensorInfo {
                name,
                dtype: safetensors_dtype(info.dtype),
                dims: info.shape.clone(),
            };
            (info.data_offsets.0, t)
        })
        .collect();
    // The file's order: by where each tensor's bytes start.
    tensors.sort_by(|a, b| (a.0, &a.1.name).cmp(&(b.0, &b.1.name)));
    let mut entries: Vec<(String, String)> = meta
        .metadata()
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), format!("{v:?}")))
        .collect();
    entries.sort();
    let n = tensors.len();
    Ok(Contents {
        format: Format::Safetensors,
        saved: format!("{n} tensors"),
        entries,
        holders: vec![Holder {
            key: None,
            what: "a safetensors file".into(),
            tensors: tensors.into_iter().map(|(_, t)| t).collect(),
            error: None,
        }],
        places: 1,
        read: match key {
            Some(k) => Err(format!(
                "key `{k}`: a safetensors file holds tensors only, not a checkpoint dict"
            )),
            None => Ok(0),
        },
    })
}

/// PyTorch's name of a safetensors element type.
fn safetensors_dtype(dtype: safetensors::Dtype) -> String {
    use safetensors::Dtype as D;
    let name = match dtype {
        D::F64 => "float64",
        D::F32 => "float32",
        D::F16 => "float16",
        D::BF16 => "bfloat16",
        D::I64 => "int64",
        D::I32 => "int32",
        D::I16 => "int16",
        D::I8 => "int8",
        D::U8 => "uint8",
        D::BOOL => "bool",
        other => return format!("{other:?}").to_lowercase(),
    };
    name.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::tests::fixture;

    fn info(name: &str, dtype: &str, dims: &[usize]) -> TensorInfo {
        TensorInfo {
            name: name.into(),
            dtype: dtype.into(),
            dims: dims.to_vec(),
        }
    }

    /// RepDistiller's checkpoint dict: its entries other than tensors, the tensor beside the
    /// state dict and the state dict itself, the import's choice of it, and each tensor's
    /// dtype and shape as PyTorch wrote them (make_fixtures.py's resnet8).
    #[test]
    fn a_checkpoint_dict_shows_its_entries_and_where_its_tensors_are() {
        let c = survey(&fixture("repdistiller_best.pth"), None).unwrap();
        assert_eq!(c.format, Format::Pth);
        let entries: Vec<(&str, &str)> = c
            .entries
            .iter()
            .map(|(k, w)| (k.as_str(), w.as_str()))
            .collect();
        assert_eq!(
            entries,
            [
                ("epoch", "40"),
                ("model", "a state dict of 56 tensors"),
                ("optimizer", "a dict of 2 entries")
            ]
        );
        let held: Vec<(Option<&str>, usize)> = c
            .holders
            .iter()
            .map(|h| (h.key.as_deref(), h.tensors.len()))
            .collect();
        assert_eq!(held, [(None, 1), (Some("model"), 56)]);
        assert_eq!(c.holders[0].tensors, [info("best_acc", "float32", &[])]);
        assert_eq!(c.read, Ok(1));
        let model = &c.holders[1].tensors;
        assert_eq!(model[0], info("conv1.weight", "float32", &[16, 3, 3, 3]));
        assert_eq!(model[5], info("bn1.num_batches_tracked", "int64", &[]));
        assert_eq!(model[55], info("fc.bias", "float32", &[10]));
    }

    /// A state dict two dicts deep is found and named by its key path; one object under two
    /// keys is listed under the first, and under the other when that is the key given; a key
    /// that is not there is the import's error.
    #[test]
    fn nested_state_dicts_are_found_by_their_key_paths() {
        let path = fixture("nested.pth");
        let c = survey(&path, None).unwrap();
        let keys: Vec<Option<&str>> = c.holders.iter().map(|h| h.key.as_deref()).collect();
        assert_eq!(keys, [Some("run.weights")]);
        let e = c.read.unwrap_err();
        assert!(e.contains("tensors are under `run.weights` (56)"), "{e}");
        let c = survey(&path, Some("run.ema.v2")).unwrap();
        let read = &c.holders[c.read.unwrap()];
        assert_eq!(
            (read.key.as_deref(), read.tensors.len()),
            (Some("run.ema.v2"), 56)
        );
        let e = survey(&path, Some("run.nope")).unwrap().read.unwrap_err();
        assert!(e.contains("`nope` is not in `run`"), "{e}");
    }

    /// Whole networks (zip and legacy formats) and TorchScript archives are told apart and
    /// named by their class; element types of every kind are named as PyTorch names them.
    #[test]
    fn modules_and_element_types_are_named_as_pytorch_names_them() {
        for (file, what) in [
            ("module_resnet8.pth", "a whole network (resnet.ResNet)"),
            (
                "module_resnet8_legacy.pth",
                "a whole network (resnet.ResNet)",
            ),
            (
                "traced_resnet8.pt",
                "a TorchScript module (__torch__.resnet.ResNet)",
            ),
        ] {
            let c = survey(&fixture(file), None).unwrap();
            assert_eq!(c.saved, what, "{file}");
            assert_eq!(c.read, Ok(0), "{file}");
        }
        let c = survey(&fixture("dtypes.pth"), None).unwrap();
        let dtype = |name: &str| {
            let t = c.holders[0].tensors.iter().find(|t| t.name == name);
            t.unwrap().dtype.as_str()
        };
        // make_reference_fixtures.py stores convolutions in float16, BatchNorm in bfloat16,
        // the classifier in float64.
        assert_eq!(dtype("conv1.weight"), "float16");
        assert_eq!(dtype("fc.weight"), "float64");
        assert_eq!(dtype("bn1.weight"), "bfloat16");
        assert_eq!(dtype("bn1.num_batches_tracked"), "int64");
    }

    /// A safetensors file is its header: every tensor in the order of its bytes; it has no
    /// keys to pick.
    #[test]
    fn a_safetensors_file_is_read_from_its_header() {
        let path = fixture("resnet8.safetensors");
        let c = survey(&path, None).unwrap();
        assert_eq!((c.format, c.read.clone()), (Format::Safetensors, Ok(0)));
        let tensors = &c.holders[0].tensors;
        assert_eq!(tensors.len(), 56);
        assert!(tensors.contains(&info("module.conv1.weight", "float32", &[16, 3, 3, 3])));
        let e = survey(&path, Some("model")).unwrap().read.unwrap_err();
        assert!(e.contains("holds tensors only"), "{e}");
    }
}
