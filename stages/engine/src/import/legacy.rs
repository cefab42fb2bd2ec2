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

use super::{gather, is_tensor, state_dict_key};
use crate::error::{EngineError, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
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

/// Where a tensor's elements are: which storage, and how they lie in it.
struct TensorRef {
    storage: String,
    dtype: DType,
    /// Elements before the first, counting a storage view's offset.
    offset: usize,
    dims: Vec<usize>,
    strides: Vec<usize>,
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
    let top = unpickle(path, &mut r, "the saved object (4th pickle)")?;
    let key = state_dict_key(path, &top, key)?;
    let dict = match (&top, &key) {
        (Object::Dict(entries), Some(k)) => entries
            .iter()
            .find(|(n, _)| *n == Object::Unicode(k.clone()))
            .map(|(_, v)| v)
            .expect("state_dict_key found it"),
        _ => &top,
    };
    let Object::Dict(entries) = dict else {
        unreachable!("state_dict_key checked it is a dict");
    };
    let mut refs = Vec::new();
    for (name, value) in entries {
        let (Object::Unicode(name), true) = (name, is_tensor(value)) else {
            continue;
        };
        let place = || format!("tensor `{name}`");
        let t = tensor_ref(value).map_err(|e| EngineError::invalid(path, place(), e))?;
        refs.push((name.clone(), t));
    }
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
        let Some(bytes) = storages.get(&t.storage) else {
            return Err(EngineError::invalid(
                path,
                format!("tensor `{name}`"),
                format!(
                    "its storage `{}` is not among the file's storages",
                    t.storage
                ),
            ));
        };
        let tensor = if is_row_major(&t.dims, &t.strides) {
            contiguous(bytes, &t)
        } else {
            gather(bytes, t.dtype, &t.dims, &t.strides, t.offset)
        }
        .map_err(|e| EngineError::invalid(path, format!("tensor `{name}`"), e))?;
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

/// The next pickle of the stream; the reader is left just after its `STOP`.
fn unpickle(path: &Path, r: &mut impl BufRead, what: &str) -> Result<Object> {
    let mut stack = Stack::empty();
    stack
        .read_loop(r)
        .and_then(|()| stack.finalize())
        .map_err(|e| {
            EngineError::invalid(
                path,
                what,
                format!(
                    "cannot unpickle: {e} (torch.save's default pickle protocol 2 is read; a file \
                     saved with another `pickle_protocol` may not be)"
                ),
            )
        })
}

/// A tensor's storage, dtype, offset, shape and strides from its pickled form.
fn tensor_ref(value: &Object) -> std::result::Result<TensorRef, String> {
    let Object::Reduce { callable, args } = value else {
        unreachable!("is_tensor checked it");
    };
    let Object::Class { class_name, .. } = &**callable else {
        unreachable!("is_tensor checked it");
    };
    let Object::Tuple(args) = &**args else {
        return Err("its arguments are not a tuple".into());
    };
    match class_name.as_str() {
        // (data, requires_grad, backward_hooks)
        "_rebuild_parameter" => args
            .first()
            .filter(|t| is_tensor(t))
            .ok_or_else(|| "a parameter without its data".to_string())
            .and_then(tensor_ref),
        // (func, type, (storage, offset, size, stride, ...), state)
        "_rebuild_from_type_v2" => match args.get(2) {
            Some(Object::Tuple(inner)) => rebuild_args(inner),
            _ => Err("a tensor subclass without its arguments".into()),
        },
        _ => rebuild_args(args),
    }
}

/// `(storage, offset, size, stride, ...)`, the arguments of `_rebuild_tensor(_v2)`.
fn rebuild_args(args: &[Object]) -> std::result::Result<TensorRef, String> {
    let [Object::PersistentLoad(id), offset, size, stride, ..] = args else {
        return Err("expected (storage, offset, size, stride) arguments".into());
    };
    let Object::Tuple(id) = &**id else {
        return Err("its storage is not a ('storage', ...) tuple".into());
    };
    let (class, key, view) = match id.as_slice() {
        [Object::Unicode(tag), class, Object::Unicode(key), _location, _numel, view]
            if tag == "storage" =>
        {
            (storage_class(class)?, key, view)
        }
        _ => return Err(format!("unexpected storage id {id:?}")),
    };
    let dtype = dtype_of(class)?;
    // A view of part of a storage (PyTorch < 0.4 pickled them) starts `view offset` elements in.
    let (storage, view_offset) = match view {
        Object::None => (key.clone(), 0),
        Object::Tuple(v) => match v.as_slice() {
            [Object::Unicode(root), off, _size] => (root.clone(), int(off)?),
            _ => return Err(format!("unexpected storage view {v:?}")),
        },
        other => return Err(format!("unexpected storage view {other:?}")),
    };
    Ok(TensorRef {
        storage,
        dtype,
        offset: view_offset + int(offset)?,
        dims: ints(size)?,
        strides: ints(stride)?,
    })
}

/// The class name of a pickled `torch.XStorage`.
fn storage_class(o: &Object) -> std::result::Result<&str, String> {
    match o {
        Object::Class { class_name, .. } => Ok(class_name),
        other => Err(format!(
            "a storage type {other:?}, expected a torch storage class"
        )),
    }
}

/// The bytes per element of a storage class.
fn element_size(class: &str) -> Option<usize> {
    Some(match class {
        "DoubleStorage" | "LongStorage" | "ComplexFloatStorage" => 8,
        "FloatStorage" | "IntStorage" | "QInt32Storage" => 4,
        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
        "ByteStorage" | "CharStorage" | "BoolStorage" | "QInt8Storage" | "QUInt8Storage"
        | "UntypedStorage" => 1,
        "ComplexDoubleStorage" => 16,
        _ => return None,
    })
}

/// The dtype a storage class's elements are read as.
fn dtype_of(class: &str) -> std::result::Result<DType, String> {
    Ok(match class {
        "FloatStorage" => DType::F32,
        "DoubleStorage" => DType::F64,
        "HalfStorage" => DType::F16,
        "BFloat16Storage" => DType::BF16,
        "LongStorage" => DType::I64,
        "ByteStorage" => DType::U8,
        other => {
            return Err(format!(
                "stored as {other}; weights are read from float, double, half, bfloat16, long or \
                 byte storages"
            ))
        }
    })
}

/// The storage class of every storage the object refers to, by key: what tells how many
/// bytes each storage in the stream takes, including those of tensors not read (an
/// optimizer's state).
fn storage_types(o: &Object) -> HashMap<String, String> {
    fn walk(o: &Object, out: &mut HashMap<String, String>) {
        match o {
            Object::PersistentLoad(id) => {
                if let Object::Tuple(id) = &**id {
                    if let [_, Object::Class { class_name, .. }, Object::Unicode(key), ..] =
                        id.as_slice()
                    {
                        out.insert(key.clone(), class_name.clone());
                    }
                }
            }
            Object::Tuple(v) | Object::List(v) => v.iter().for_each(|x| walk(x, out)),
            Object::Dict(d) => d.iter().for_each(|(k, v)| {
                walk(k, out);
                walk(v, out);
            }),
            Object::Reduce { callable, args } | Object::Build { callable, args } => {
                walk(callable, out);
                walk(args, out);
            }
            _ => {}
        }
    }
    let mut out = HashMap::new();
    walk(o, &mut out);
    out
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

/// Whether `strides` are the row-major strides of `dims`.
fn is_row_major(dims: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in dims.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    dims.len() == strides.len()
}

/// A row-major tensor: its elements are one slice of the storage.
fn contiguous(bytes: &[u8], t: &TensorRef) -> std::result::Result<Tensor, String> {
    let size = t.dtype.size_in_bytes();
    let n: usize = t.dims.iter().product();
    let (start, end) = (t.offset * size, (t.offset + n) * size);
    if end > bytes.len() {
        return Err(format!(
            "its {n} elements from element {} pass the end of a storage of {}",
            t.offset,
            bytes.len() / size
        ));
    }
    Tensor::from_raw_buffer(&bytes[start..end], t.dtype, &t.dims, &Device::Cpu)
        .map_err(|e| e.to_string())
}

/// A pickled integer.
fn int(o: &Object) -> std::result::Result<usize, String> {
    match o {
        Object::Int(i) => usize::try_from(*i).map_err(|_| format!("a negative integer {i}")),
        Object::Long(i) => usize::try_from(*i).map_err(|_| format!("a negative integer {i}")),
        other => Err(format!("{other:?}, expected an integer")),
    }
}

/// A pickled tuple of integers (a shape or strides).
fn ints(o: &Object) -> std::result::Result<Vec<usize>, String> {
    match o {
        Object::Tuple(v) | Object::List(v) => v.iter().map(int).collect(),
        other => Err(format!("{other:?}, expected a tuple of integers")),
    }
}

/// What kind of object a pickle held, for errors.
fn kind(o: &Object) -> &'static str {
    match o {
        Object::Dict(_) => "a dict",
        Object::List(_) => "a list",
        Object::Tuple(_) => "a tuple",
        Object::Build { .. } | Object::Reduce { .. } => "a Python object",
        _ => "a plain value",
    }
}
