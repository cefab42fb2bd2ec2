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
use std::collections::{BTreeMap, HashMap};
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
    /// The part of the storage a view of it (PyTorch < 0.4) covers: first element and length.
    pub view: Option<(usize, usize)>,
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
}

/// The pickle starting at byte `*at` of `data`, read with candle's unpickler; `*at` is left
/// just after its `STOP`. Three kinds of opcode are given to candle in another form: Python 2's
/// byte strings (`SHORT_BINSTRING`, `BINSTRING`: PyTorch 0.x under Python 2 wrote names so) as
/// the same text, and integers of more than 8 bytes (a saved seed of 2^63 or more), which
/// candle would shift past 64 bits, as `None`. [`Shape`] bounds what the pickle builds.
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
    let mut shape = Shape::new(data.len());
    loop {
        let op = r.position() as usize;
        let code = *data
            .get(op)
            .ok_or_else(|| cannot("no STOP before the end".into()))?;
        shape
            .step(code, data.get(op + 1..).unwrap_or_default())
            .map_err(|e| EngineError::invalid(path, what, format!("{e} at byte {op}")))?;
        // The opcode's length (header and argument) and what candle reads in its place.
        let (len, replacement) = match (code, data.get(op + 1)) {
            (b'U', Some(&n)) => (2 + n as usize, Some(b'X')),
            (b'T', Some(_)) => match data.get(op + 1..op + 5) {
                Some(n) => (
                    5 + u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize,
                    Some(b'X'),
                ),
                None => (0, None),
            },
            (0x8a, Some(&n)) if n > 8 => (2 + n as usize, Some(b'N')),
            _ => (0, None),
        };
        let done = match replacement {
            Some(op_code) => {
                let bytes = data.get(op..op + len).ok_or_else(|| {
                    cannot(format!("opcode {code:#04x} at byte {op} passes the end"))
                })?;
                let mut instead = vec![op_code];
                if op_code == b'X' {
                    // BINUNICODE: a 4-byte length and the text, after the old header.
                    let text = &bytes[if code == b'U' { 2 } else { 5 }..];
                    instead.extend_from_slice(&(text.len() as u32).to_le_bytes());
                    instead.extend_from_slice(text);
                }
                r.set_position((op + len) as u64);
                stack.read(&mut std::io::Cursor::new(instead))
            }
            None => stack.read(&mut r),
        };
        match done {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => return Err(cannot(e.to_string())),
        }
    }
    *at = r.position() as usize;
    stack.finalize().map_err(|e| cannot(e.to_string()))
}

/// The depth and size of what a pickle builds, followed opcode by opcode beside candle's
/// unpickler, which builds it without bounds: a few bytes can nest objects deeper than a stack
/// can drop them (`TUPLE1` repeated) or, since candle copies memoised objects on every get,
/// double their size with each get (`BINGET 0, BINGET 0, TUPLE2, BINPUT 0` repeated). Each
/// stack entry is followed as (depth, parts); a mark as `None`.
struct Shape {
    stack: Vec<Option<(u32, u64)>>,
    memo: HashMap<u32, (u32, u64)>,
    /// Parts built so far, counting every copy.
    built: u64,
    budget: u64,
}

/// Deeper nesting than any checkpoint has; far below what dropping it recursively needs.
const MAX_DEPTH: u32 = 1000;

impl Shape {
    fn new(len: usize) -> Shape {
        Shape {
            stack: Vec::new(),
            memo: HashMap::new(),
            built: 0,
            // Every byte of a pickle builds a part or two; copies of memoised objects add to it.
            budget: 64 * len as u64 + 1_000_000,
        }
    }

    /// Follows opcode `code`, whose arguments start `args`.
    fn step(&mut self, code: u8, args: &[u8]) -> std::result::Result<(), String> {
        let id = |n: usize| -> u32 {
            let mut b = [0u8; 4];
            b[..n.min(args.len())].copy_from_slice(&args[..n.min(args.len())]);
            u32::from_le_bytes(b)
        };
        match code {
            b'(' => self.stack.push(None),
            // Pushes of a leaf.
            b'c' | b')' | b'X' | b'U' | b'T' | b'J' | b'K' | b'M' | 0x88 | 0x89 | b'N' | b'}'
            | b']' | b'G' | 0x8a => self.push((1, 1))?,
            // candle's memo holds a copy of what is put.
            b'q' | b'r' => {
                let top = self.stack.last().copied().flatten().unwrap_or((1, 1));
                self.memo.insert(id(if code == b'q' { 1 } else { 4 }), top);
                self.count(top.1)?;
            }
            b'h' | b'j' => {
                let got = self.memo.get(&id(if code == b'h' { 1 } else { 4 }));
                self.push(got.copied().unwrap_or((1, 1)))?
            }
            b'Q' | 0x85 => self.combine(1, false)?,
            0x86 | b'R' | 0x81 | b'b' => self.combine(2, false)?,
            0x87 => self.combine(3, false)?,
            b't' | b'd' => self.combine(self.to_mark(), true)?,
            // Into the object below: SETITEM, APPEND; SETITEMS, APPENDS from a mark.
            b's' => self.combine_into(2, false)?,
            b'a' => self.combine_into(1, false)?,
            b'u' | b'e' => self.combine_into(self.to_mark(), true)?,
            _ => {}
        }
        Ok(())
    }

    /// Entries above the topmost mark.
    fn to_mark(&self) -> usize {
        self.stack.iter().rev().take_while(|e| e.is_some()).count()
    }

    /// Pushes an entry of `parts` new parts.
    fn push(&mut self, (depth, parts): (u32, u64)) -> std::result::Result<(), String> {
        if depth > MAX_DEPTH {
            return Err(format!("objects nested more than {MAX_DEPTH} deep"));
        }
        self.count(parts)?;
        self.stack.push(Some((depth, parts)));
        Ok(())
    }

    /// Counts `parts` new parts against the budget.
    fn count(&mut self, parts: u64) -> std::result::Result<(), String> {
        self.built = self.built.saturating_add(parts);
        if self.built > self.budget {
            return Err(format!(
                "more than {} objects built (memoised objects copied over and over)",
                self.budget
            ));
        }
        Ok(())
    }

    /// Pops `n` entries (and the mark under them) into what they build.
    fn popped(&mut self, n: usize, mark: bool) -> (u32, u64) {
        let from = self.stack.len().saturating_sub(n);
        let (mut depth, mut parts) = (0, 1u64);
        for (d, p) in self.stack.drain(from..).flatten() {
            depth = depth.max(d);
            parts = parts.saturating_add(p);
        }
        if mark {
            self.stack.pop();
        }
        (depth + 1, parts)
    }

    /// Replaces `n` entries (and their mark) by one holding them: one new part.
    fn combine(&mut self, n: usize, mark: bool) -> std::result::Result<(), String> {
        let (depth, parts) = self.popped(n, mark);
        self.built = self.built.saturating_sub(parts - 1);
        self.push((depth, parts))
    }

    /// Moves `n` entries (and their mark) into the entry below them: no new part.
    fn combine_into(&mut self, n: usize, mark: bool) -> std::result::Result<(), String> {
        let (depth, parts) = self.popped(n, mark);
        let (d, p) = self.stack.pop().flatten().unwrap_or((1, 1));
        let total = p.saturating_add(parts - 1);
        self.built = self.built.saturating_sub(total);
        self.push((d.max(depth), total))
    }
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
    // A view of part of a storage (PyTorch < 0.4 pickled them): `(view key, offset, size)` in
    // elements of the root storage, whose key the id holds; the tensor lies within the view.
    let view = match view {
        Object::None => None,
        Object::Tuple(v) => match v.as_slice() {
            [Object::Unicode(_), off, len] => Some((int(off)?, int(len)?)),
            _ => return Err(format!("unexpected storage view {v:?}")),
        },
        other => return Err(format!("unexpected storage view {other:?}")),
    };
    let offset = int(offset)?;
    Ok(TensorRef {
        storage: key.clone(),
        class: class.to_owned(),
        offset: view
            .map_or(Some(offset), |(start, _)| start.checked_add(offset))
            .ok_or("its offset overflows")?,
        view,
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
        other => {
            return Err(format!(
                "stored as {other}; weights are read from float, double, half and bfloat16 \
                 storages"
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

/// Builds each tensor of `refs` from the bytes `storage` gives for its storage's key.
pub(super) fn materialise_all<'a>(
    path: &Path,
    refs: Refs,
    storage: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<BTreeMap<String, Tensor>> {
    refs.into_iter()
        .map(|(name, t)| {
            let place = || format!("tensor `{name}`");
            let bytes = storage(&t.storage).ok_or_else(|| {
                EngineError::invalid(
                    path,
                    place(),
                    format!(
                        "its storage `{}` is not among the file's storages",
                        t.storage
                    ),
                )
            })?;
            let tensor =
                materialise(bytes, &t).map_err(|e| EngineError::invalid(path, place(), e))?;
            Ok((name, tensor))
        })
        .collect()
}

/// The tensor `t` of a storage's little-endian `bytes`, row-major.
fn materialise(bytes: &[u8], t: &TensorRef) -> std::result::Result<Tensor, String> {
    let dtype = dtype_of(&t.class)?;
    let size = dtype.size_in_bytes();
    let stored = bytes.len() / size;
    let n = extent(t, stored)?;
    if n == 0 {
        return Tensor::zeros(t.dims.as_slice(), dtype, &Device::Cpu).map_err(|e| e.to_string());
    }
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
    if stored > u32::MAX as usize {
        return Err(format!(
            "strided in a storage of {stored} elements; strided tensors are read from storages \
             of up to 2^32"
        ));
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

/// The number of elements of `t`, once checked that its shape and strides match and that
/// every element lies in a storage of `stored` elements (and in its view, if it is one), which
/// holds at least as many: a weight never repeats elements, as an `expand`ed tensor does.
fn extent(t: &TensorRef, stored: usize) -> std::result::Result<usize, String> {
    let (dims, strides, offset) = (&t.dims, &t.strides, t.offset);
    if dims.len() != strides.len() {
        return Err(format!(
            "its shape {dims:?} and strides {strides:?} have different lengths"
        ));
    }
    let end = match t.view {
        Some((start, len)) => start.saturating_add(len).min(stored),
        None => stored,
    };
    let n = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    if n == Some(0) && offset <= end {
        return Ok(0);
    }
    // The furthest element: offset + Σ (d − 1)·s.
    let last = dims.iter().zip(strides).try_fold(offset, |a, (&d, &s)| {
        (d - 1).checked_mul(s).and_then(|x| a.checked_add(x))
    });
    match (n, last) {
        (Some(n), Some(last)) if last < end && n <= stored => Ok(n),
        _ => Err(format!(
            "its shape {dims:?} with strides {strides:?} from element {offset} does not fit a \
             storage of {stored} elements{}",
            t.view
                .map(|(s, l)| format!(" (a view of {l} from element {s})"))
                .unwrap_or_default()
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
