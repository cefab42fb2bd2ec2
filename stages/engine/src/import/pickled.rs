//! What `torch.save` pickles, in both its formats: the saved object, whose tensors are calls of
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` (or `_rebuild_tensor`
//! before PyTorch 0.4, wrapped in `_rebuild_parameter` for an `nn.Parameter`) on a persistent
//! id `('storage', <class torch.XStorage>, key, location, numel[, view])`. Finds the state dict
//! in it, says where each tensor's elements lie, and builds a tensor from its storage's bytes.
//! The formats differ only in where the pickle and the storages are ([`super::zipfile`],
//! [`super::legacy`]).

use super::{not_a_weight, STATE_DICT_KEYS};
use crate::error::{EngineError, Result};
use candle_core::pickle::{Object, Stack};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// Tensors by name, with where their elements lie.
pub(super) type Refs = Vec<(String, TensorRef)>;

/// Where a tensor's elements are: which storage, of which class, and how they lie in it.
pub(super) struct TensorRef {
    /// The storage's key: its file in the zip archive, its place in the legacy stream.
    pub storage: String,
    /// The storage's class (`FloatStorage`, ...).
    pub class: String,
    /// Elements before the first, counting a storage view's offset.
    pub offset: usize,
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
}

/// The pickle starting at byte `*at` of `data`, read with candle's unpickler; `*at` is left
/// just after its `STOP`.
pub(super) fn unpickle(path: &Path, data: &[u8], at: &mut usize, what: &str) -> Result<Object> {
    let cannot = |e: String| {
        EngineError::invalid(
            path,
            what,
            format!(
                "cannot unpickle: {e} (torch.save's default pickle protocol 2 is read; a file \
                 saved with another `pickle_protocol` may not be)"
            ),
        )
    };
    let mut r = std::io::Cursor::new(data);
    r.set_position(*at as u64);
    let mut stack = Stack::empty();
    loop {
        let op = r.position() as usize;
        // candle shifts LONG1's bytes into an i64: more than 8 overflow it.
        if let (Some(0x8a), Some(&n)) = (data.get(op), data.get(op + 1)) {
            if n > 8 {
                return Err(cannot(format!(
                    "an integer of {n} bytes at byte {op}; up to 8 are read"
                )));
            }
        }
        match stack.read(&mut r) {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(cannot(e.to_string())),
        }
    }
    *at = r.position() as usize;
    stack.finalize().map_err(|e| cannot(e.to_string()))
}

/// Whether a pickled object is a tensor (or an `nn.Parameter`).
pub(super) fn is_tensor(o: &Object) -> bool {
    let Object::Reduce { callable, .. } = o else {
        return false;
    };
    matches!(&**callable, Object::Class { module_name, class_name }
        if (module_name == "torch._utils"
            && (class_name == "_rebuild_tensor_v2"
                || class_name == "_rebuild_tensor"
                || class_name == "_rebuild_parameter"))
            || (module_name == "torch._tensor" && class_name == "_rebuild_from_type_v2"))
}

/// A dict's string keys.
fn dict_keys(entries: &[(Object, Object)]) -> Vec<String> {
    entries
        .iter()
        .filter_map(|(k, _)| match k {
            Object::Unicode(s) => Some(s.clone()),
            _ => None,
        })
        .collect()
}

/// Where the state dict is: `None` for the top level (a dict of tensors), else the entry of
/// the top-level dict named by `key` or found among [`STATE_DICT_KEYS`].
fn state_dict_key(
    path: &Path,
    place: &str,
    top: &Object,
    key: Option<&str>,
) -> Result<Option<String>> {
    let not_state_dict = |what: &str| {
        EngineError::invalid(
            path,
            place,
            format!(
                "not a state dict: the pickle's top level is {what}; save `model.state_dict()` \
                 (a whole pickled `nn.Module` needs its Python class to load)"
            ),
        )
    };
    let Object::Dict(entries) = top else {
        return Err(not_state_dict(match top {
            Object::Build { .. } | Object::Reduce { .. } => "a Python object",
            Object::List(_) => "a list",
            Object::Tuple(_) => "a tuple",
            _ => "a plain value",
        }));
    };
    let entry = |k: &str| {
        entries
            .iter()
            .find(|(n, _)| *n == Object::Unicode(k.to_owned()))
            .map(|(_, v)| v)
    };
    let holds_tensors =
        |o: &Object| matches!(o, Object::Dict(d) if d.iter().any(|(_, v)| is_tensor(v)));
    if let Some(k) = key {
        return match entry(k) {
            Some(v) if holds_tensors(v) => Ok(Some(k.to_owned())),
            Some(_) => Err(EngineError::invalid(
                path,
                format!("key `{k}`"),
                "holds no tensors: not a state dict",
            )),
            None => Err(EngineError::invalid(
                path,
                format!("key `{k}`"),
                format!(
                    "not in the checkpoint, whose top-level keys are {:?}",
                    dict_keys(entries)
                ),
            )),
        };
    }
    // The known entries first: a checkpoint dict may hold tensors beside the state dict
    // (RepDistiller's `best_acc` is a 0-d tensor), a state dict never holds a dict of tensors.
    if let Some(k) = STATE_DICT_KEYS
        .into_iter()
        .find(|k| entry(k).is_some_and(holds_tensors))
    {
        return Ok(Some(k.to_owned()));
    }
    if entries.iter().any(|(_, v)| is_tensor(v)) {
        return Ok(None);
    }
    Err(not_state_dict(&format!(
        "a dict of keys {:?} with no tensors and no state dict under {STATE_DICT_KEYS:?}; \
         name the entry holding it with `key`",
        dict_keys(entries)
    )))
}

/// The tensors of the state dict in `top` (the saved object, read from `place`) with where their
/// elements lie, by their names in the file, and the dict key the state dict was under (`key`,
/// or found). BatchNorm's step counters and other entries that are no weight are left out.
pub(super) fn tensors(
    path: &Path,
    place: &str,
    top: &Object,
    key: Option<&str>,
) -> Result<(Refs, Option<String>)> {
    let key = state_dict_key(path, place, top, key)?;
    let dict = match (top, &key) {
        (Object::Dict(entries), Some(k)) => entries
            .iter()
            .find(|(n, _)| *n == Object::Unicode(k.clone()))
            .map(|(_, v)| v)
            .expect("state_dict_key found it"),
        _ => top,
    };
    let Object::Dict(entries) = dict else {
        unreachable!("state_dict_key checked it is a dict");
    };
    let mut refs = Vec::new();
    for (name, value) in entries {
        let (Object::Unicode(name), true) = (name, is_tensor(value)) else {
            continue;
        };
        if not_a_weight(name) {
            continue;
        }
        let t = tensor_ref(value)
            .map_err(|e| EngineError::invalid(path, format!("tensor `{name}`"), e))?;
        refs.push((name.clone(), t));
    }
    Ok((refs, key))
}

/// A tensor's storage, offset, shape and strides from its pickled form.
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
    // The zip format's ids have five entries, the legacy format's a sixth: the view.
    let (class, key, view) = match id.as_slice() {
        [Object::Unicode(tag), class, Object::Unicode(key), _location, _numel, rest @ ..]
            if tag == "storage" && rest.len() <= 1 =>
        {
            (
                storage_class(class)?,
                key,
                rest.first().unwrap_or(&Object::None),
            )
        }
        _ => return Err(format!("unexpected storage id {id:?}")),
    };
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
        class: class.to_owned(),
        offset: view_offset
            .checked_add(int(offset)?)
            .ok_or("its offset overflows")?,
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
pub(super) fn element_size(class: &str) -> Option<usize> {
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
pub(super) fn storage_types(o: &Object) -> HashMap<String, String> {
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

/// The tensor `t` of a storage's little-endian `bytes`, row-major.
pub(super) fn materialise(bytes: &[u8], t: &TensorRef) -> std::result::Result<Tensor, String> {
    let dtype = dtype_of(&t.class)?;
    let size = dtype.size_in_bytes();
    let stored = bytes.len() / size;
    let n = extent(t, stored)?;
    if is_row_major(&t.dims, &t.strides) {
        let start = t.offset * size;
        return Tensor::from_raw_buffer(
            &bytes[start..start + n * size],
            dtype,
            &t.dims,
            &Device::Cpu,
        )
        .map_err(|e| e.to_string());
    }
    // Each element's place in the storage, in row-major order of the shape.
    let mut at = vec![t.offset as u32];
    for (&d, &s) in t.dims.iter().zip(&t.strides) {
        at = at
            .iter()
            .flat_map(|&base| (0..d).map(move |i| base + (i * s) as u32))
            .collect();
    }
    let storage = Tensor::from_raw_buffer(&bytes[..stored * size], dtype, &[stored], &Device::Cpu)
        .map_err(|e| e.to_string())?;
    let index = Tensor::new(at.as_slice(), &Device::Cpu).map_err(|e| e.to_string())?;
    storage
        .index_select(&index, 0)
        .and_then(|x| x.reshape(t.dims.as_slice()))
        .map_err(|e| e.to_string())
}

/// The number of elements of `t`, once checked that its shape and strides match and that its
/// elements are distinct places of a storage of `stored` elements (a weight never repeats one,
/// as an `expand`ed tensor would), in reach of a `u32` index.
fn extent(t: &TensorRef, stored: usize) -> std::result::Result<usize, String> {
    let (dims, strides, offset) = (&t.dims, &t.strides, t.offset);
    if dims.len() != strides.len() {
        return Err(format!(
            "its shape {dims:?} and strides {strides:?} have different lengths"
        ));
    }
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n == Some(0) {
        return Ok(0);
    }
    // The furthest element: offset + Σ (d − 1)·s.
    let last = dims.iter().zip(strides).try_fold(offset, |a, (&d, &s)| {
        (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))
    });
    match (n, last) {
        (Some(n), Some(last)) if last < stored && n <= stored && last <= u32::MAX as usize => Ok(n),
        _ => Err(format!(
            "its shape {dims:?} with strides {strides:?} from element {offset} does not fit as \
             distinct elements in a storage of {stored}"
        )),
    }
}

/// Whether `strides` are the row-major strides of `dims` (of the same length: [`extent`]).
fn is_row_major(dims: &[usize], strides: &[usize]) -> bool {
    let mut expected = 1;
    for (&d, &s) in dims.iter().zip(strides).rev() {
        if d != 1 && s != expected {
            return false;
        }
        expected *= d;
    }
    true
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
pub(super) fn kind(o: &Object) -> &'static str {
    match o {
        Object::Dict(_) => "a dict",
        Object::List(_) => "a list",
        Object::Tuple(_) => "a tuple",
        Object::Build { .. } | Object::Reduce { .. } => "a Python object",
        _ => "a plain value",
    }
}
