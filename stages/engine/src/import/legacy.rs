//! PyTorch's legacy checkpoint format: what `torch.save` wrote before PyTorch 1.6, and still
//! writes with `_use_new_zipfile_serialization=False`. Published CIFAR teachers of 2017–2020
//! are in it: akamaster/pytorch_resnet_cifar10's (read in the tests), and by their dates
//! RepDistiller's.
//!
//! The file is one stream (torch/serialization.py, `_legacy_save`): five pickles, then the
//! storages' bytes.
//! 1. the magic number 0x1950a86a20f9469cfc6c;
//! 2. the protocol version, 1001;
//! 3. `sys_info`: `{'protocol_version', 'little_endian', 'type_sizes'}`;
//! 4. the saved object, each storage a persistent id `('storage', <class torch.XStorage>, key,
//!    location, numel, view_metadata)` and each tensor `_rebuild_tensor_v2(storage, offset,
//!    size, stride, ...)` (PyTorch ≥ 0.4) or `_rebuild_tensor(storage, offset, size, stride)`;
//! 5. the storage keys, sorted, as a list;
//!
//! and for each key in that order a little-endian int64 element count and the elements' bytes.
//! The tar format of PyTorch < 0.1.10 is not read.

use super::pickled::{element_size, kind, materialise_all, storage_types, unpickle};
use super::places::tensors;
use super::unpickler::{self, Pickle, Value};
use super::Select;
use crate::error::{EngineError, Result};
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;
use std::path::Path;

/// The magic number 0x1950a86a20f9469cfc6c, the first pickle of a legacy file, as pickle
/// holds it: little-endian two's complement (`LONG1` of 10 bytes under protocol 2).
const MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

/// The protocol version `_legacy_save` writes (the only one there is).
const PROTOCOL_VERSION: i64 = 1001;

/// Where the first pickle ends if `data` starts with the pickled magic number (of any pickle
/// protocol: `pickle_protocol` was an argument of `torch.save`), `None` if it does not.
pub(super) fn after_magic(data: &[u8]) -> Option<usize> {
    let mut at = 0;
    let magic = unpickler::unpickle(data, &mut at).ok()?;
    matches!(magic.get(magic.root), Value::BigInt(b) if *b == MAGIC).then_some(at)
}

/// The tensors of the state dict in a legacy checkpoint, by their names in the file, and the
/// dict key they were under (as for the zip format: `key`, or found).
pub(super) fn read(
    path: &Path,
    select: Select,
) -> Result<(BTreeMap<String, Tensor>, Option<String>)> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    // Safety: mapped read-only; a checkpoint is not written while it is imported.
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| EngineError::io(path, e))?;
    let data: &[u8] = &map;
    let (top, mut at) = saved(path, data)?;
    let (refs, key) = tensors(path, SAVED, &top, select)?;
    const KEYS: &str = "the storage keys (5th pickle)";
    let keys = unpickle(path, data, &mut at, KEYS)?;
    let Value::List(order) = keys.get(keys.root) else {
        return Err(EngineError::invalid(
            path,
            KEYS,
            format!("expected a list of keys, found {}", kind(&keys, keys.root)),
        ));
    };
    let storages = storage_extents(path, data, at, (&keys, order), &storage_types(&top))?;
    let out = materialise_all(path, refs, |key| {
        storages.get(key).map(|extent| &data[extent.clone()])
    })?;
    Ok((out, key))
}

/// What the saved object is the 4th pickle.
pub(super) const SAVED: &str = "the saved object (4th pickle)";

/// The saved object of the legacy file `data`, and where the pickle after it starts.
pub(super) fn saved(path: &Path, data: &[u8]) -> Result<(Pickle, usize)> {
    let mut at = read_header(path, data)?;
    let top = unpickle(path, data, &mut at, SAVED)?;
    Ok((top, at))
}

/// Checks the first three pickles: the magic number, the protocol version and a little-endian
/// `sys_info`; returns where the next one starts.
fn read_header(path: &Path, data: &[u8]) -> Result<usize> {
    let Some(mut at) = after_magic(data) else {
        return Err(EngineError::invalid(
            path,
            "file header",
            "not the magic number of a legacy `torch.save` file",
        ));
    };
    let version = unpickle(path, data, &mut at, "the protocol version (2nd pickle)")?;
    if version.get(version.root) != &Value::Int(PROTOCOL_VERSION) {
        return Err(EngineError::invalid(
            path,
            "the protocol version (2nd pickle)",
            format!(
                "expected {PROTOCOL_VERSION}, found {}",
                version.describe(version.root)
            ),
        ));
    }
    let info = unpickle(path, data, &mut at, "sys_info (3rd pickle)")?;
    let little = info.lookup(info.root, "little_endian").map(|v| info.get(v));
    match little {
        Some(Value::Bool(true)) => Ok(at),
        Some(Value::Bool(false)) => Err(EngineError::invalid(
            path,
            "sys_info (3rd pickle)",
            "storages in big-endian byte order; only little-endian ones are read",
        )),
        _ => Err(EngineError::invalid(
            path,
            "sys_info (3rd pickle)",
            "no `little_endian` flag: not a legacy `torch.save` file",
        )),
    }
}

/// Where each storage's bytes are in `data`: from byte `at`, for each of `keys` in order, an
/// int64 element count and the elements, which must end the file together.
fn storage_extents(
    path: &Path,
    data: &[u8],
    mut at: usize,
    (pickle, keys): (&Pickle, &[usize]),
    types: &HashMap<String, String>,
) -> Result<HashMap<String, Range<usize>>> {
    let mut out = HashMap::new();
    for &id in keys {
        let Some(key) = pickle.str(id) else {
            return Err(EngineError::invalid(
                path,
                "the storage keys (5th pickle)",
                format!("a key {}, expected a string", pickle.describe(id)),
            ));
        };
        let place = || format!("storage `{key}`");
        let size = match types.get(key) {
            Some(class) => element_size(class).ok_or_else(|| {
                EngineError::invalid(path, place(), format!("of unknown storage type {class}"))
            })?,
            None => {
                return Err(EngineError::invalid(
                    path,
                    place(),
                    "listed among the storages but used by no tensor of the saved object",
                ))
            }
        };
        let count = data
            .get(at..at + 8)
            .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
            .ok_or_else(|| {
                EngineError::invalid(path, place(), "no element count: past the end of the file")
            })?;
        at += 8;
        let end = usize::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(size))
            .and_then(|b| b.checked_add(at))
            .filter(|&end| end <= data.len())
            .ok_or_else(|| {
                EngineError::invalid(
                    path,
                    place(),
                    format!(
                        "{count} elements of {size} bytes at byte {at}: past the end of the file \
                         ({} bytes)",
                        data.len()
                    ),
                )
            })?;
        out.insert(key.to_owned(), at..end);
        at = end;
    }
    if at == data.len() {
        Ok(out)
    } else {
        Err(EngineError::invalid(
            path,
            format!("byte {at}"),
            format!("{} bytes after the last storage", data.len() - at),
        ))
    }
}
