//! PyTorch's legacy checkpoint format: what `torch.save` wrote before PyTorch 1.6, and still
//! writes with `_use_new_zipfile_serialization=False`. Most published CIFAR teachers of
//! 2017–2020 (akamaster/pytorch_resnet_cifar10's, RepDistiller's) are in it.
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

use super::pickled::{element_size, kind, materialise, storage_types, tensors, unpickle};
use crate::error::{EngineError, Result};
use candle_core::pickle::Object;
use candle_core::Tensor;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::Path;

/// The first pickle of a legacy file: protocol 2, `LONG1` of 10 bytes, the magic number
/// (little-endian), `STOP`.
const MAGIC: [u8; 15] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19, 0x2e,
];

/// The protocol version `_legacy_save` writes (the only one there is).
const PROTOCOL_VERSION: i32 = 1001;

/// Whether a file starting with `head` is a legacy checkpoint.
pub(super) fn is_legacy(head: &[u8]) -> bool {
    head.starts_with(&MAGIC)
}

/// The tensors of the state dict in a legacy checkpoint, by their names in the file, and the
/// dict key they were under (as for the zip format: `key`, or found).
pub(super) fn read(
    path: &Path,
    key: Option<&str>,
) -> Result<(BTreeMap<String, Tensor>, Option<String>)> {
    let file = std::fs::File::open(path).map_err(|e| EngineError::io(path, e))?;
    let mut r = BufReader::new(file);
    read_header(path, &mut r)?;
    const SAVED: &str = "the saved object (4th pickle)";
    let top = unpickle(path, &mut r, SAVED)?;
    let (refs, key) = tensors(path, SAVED, &top, key)?;
    let order = match unpickle(path, &mut r, "the storage keys (5th pickle)")? {
        Object::List(keys) => keys,
        other => {
            return Err(EngineError::invalid(
                path,
                "the storage keys (5th pickle)",
                format!("expected a list of keys, found {}", kind(&other)),
            ))
        }
    };
    let needed = refs.iter().map(|(_, t)| t.storage.as_str()).collect();
    let storages = read_storages(path, &mut r, &order, &storage_types(&top), &needed)?;
    let mut out = BTreeMap::new();
    for (name, t) in refs {
        let place = || format!("tensor `{name}`");
        let bytes = storages.get(&t.storage).ok_or_else(|| {
            EngineError::invalid(
                path,
                place(),
                format!(
                    "its storage `{}` is not among the file's storages",
                    t.storage
                ),
            )
        })?;
        let tensor = materialise(bytes, &t).map_err(|e| EngineError::invalid(path, place(), e))?;
        out.insert(name, tensor);
    }
    Ok((out, key))
}

/// Checks the first three pickles: the magic number, the protocol version and a little-endian
/// `sys_info`.
fn read_header(path: &Path, r: &mut BufReader<std::fs::File>) -> Result<()> {
    let mut magic = [0u8; MAGIC.len()];
    r.read_exact(&mut magic)
        .map_err(|e| EngineError::io(path, e))?;
    if magic != MAGIC {
        return Err(EngineError::invalid(
            path,
            "file header",
            "not the magic number of a legacy `torch.save` file written with pickle protocol 2",
        ));
    }
    let version = unpickle(path, r, "the protocol version (2nd pickle)")?;
    if version != Object::Int(PROTOCOL_VERSION) {
        return Err(EngineError::invalid(
            path,
            "the protocol version (2nd pickle)",
            format!("expected {PROTOCOL_VERSION}, found {version:?}"),
        ));
    }
    let little = match unpickle(path, r, "sys_info (3rd pickle)")? {
        Object::Dict(entries) => entries
            .into_iter()
            .find(|(k, _)| *k == Object::Unicode("little_endian".into()))
            .map(|(_, v)| v),
        _ => None,
    };
    match little {
        Some(Object::Bool(true)) => Ok(()),
        Some(Object::Bool(false)) => Err(EngineError::invalid(
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

/// Reads the `needed` storages after the pickles (stored in the order of `keys`; the others are
/// skipped), each checked to lie within the file.
fn read_storages(
    path: &Path,
    r: &mut BufReader<std::fs::File>,
    keys: &[Object],
    types: &HashMap<String, String>,
    needed: &HashSet<&str>,
) -> Result<HashMap<String, Vec<u8>>> {
    let len = r
        .get_ref()
        .metadata()
        .map_err(|e| EngineError::io(path, e))?
        .len();
    let mut out = HashMap::new();
    for key in keys {
        let Object::Unicode(key) = key else {
            return Err(EngineError::invalid(
                path,
                "the storage keys (5th pickle)",
                format!("a key {key:?}, expected a string"),
            ));
        };
        let place = || format!("storage `{key}`");
        let size = types
            .get(key)
            .and_then(|c| element_size(c))
            .ok_or_else(|| {
                EngineError::invalid(
                    path,
                    place(),
                    format!("of unknown storage type {:?}", types.get(key)),
                )
            })?;
        let mut count = [0u8; 8];
        r.read_exact(&mut count)
            .map_err(|e| EngineError::invalid(path, place(), format!("no element count: {e}")))?;
        let count = i64::from_le_bytes(count);
        let at = r.stream_position().map_err(|e| EngineError::io(path, e))?;
        let bytes = u64::try_from(count)
            .ok()
            .and_then(|c| c.checked_mul(size as u64))
            .filter(|&b| at.saturating_add(b) <= len)
            .ok_or_else(|| {
                EngineError::invalid(
                    path,
                    place(),
                    format!(
                        "{count} elements of {size} bytes at byte {at}: past the end of the file \
                         ({len} bytes)"
                    ),
                )
            })?;
        if needed.contains(key.as_str()) {
            let mut data = vec![0u8; bytes as usize];
            r.read_exact(&mut data)
                .map_err(|e| EngineError::io(path, e))?;
            out.insert(key.clone(), data);
        } else {
            r.seek_relative(bytes as i64)
                .map_err(|e| EngineError::io(path, e))?;
        }
    }
    if r.fill_buf()
        .map_err(|e| EngineError::io(path, e))?
        .is_empty()
    {
        Ok(out)
    } else {
        let at = r.stream_position().map_err(|e| EngineError::io(path, e))?;
        Err(EngineError::invalid(
            path,
            format!("byte {at}"),
            format!("{} bytes after the last storage", len - at),
        ))
    }
}
