//! What `torch.save` pickles, in both its formats: the saved object, whose tensors are calls of
//! `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)` (or `_rebuild_tensor`
//! before PyTorch 0.4, wrapped in `_rebuild_parameter` for an `nn.Parameter`) on a persistent
//! id `('storage', <class torch.XStorage>, key, location, numel[, view])`. Tells tensors and
//! modules apart, names a module's tensors as `state_dict()` does, says where each tensor's
//! elements lie, and builds a tensor from its storage's bytes ([`super::places`] finds the
//! state dict). The formats differ only in where the pickle and the storages are
//! ([`super::zipfile`], [`super::legacy`]).

use super::unpickler::{self, Id, Pickle, Value};
use crate::error::{EngineError, Result};
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

/// The pickle starting at byte `*at` of `data` (the part of the file named `what`), run by
/// [`unpickler`]; `*at` is left just after its `STOP`.
pub(super) fn unpickle(path: &Path, data: &[u8], at: &mut usize, what: &str) -> Result<Pickle> {
    unpickler::unpickle(data, at)
        .map_err(|e| EngineError::invalid(path, what, format!("cannot unpickle: {e}")))
}

/// Whether the value at `id` is a tensor (or an `nn.Parameter`: PyTorch ≤ 0.3 pickled one as
/// a call of its class on the tensor, later ones as `_rebuild_parameter`).
pub(super) fn is_tensor(p: &Pickle, id: Id) -> bool {
    let Value::Object { class, args, .. } = p.get(id) else {
        return false;
    };
    let on_a_value = || match p.get(*args) {
        Value::Tuple(a) => a
            .first()
            .is_some_and(|&t| matches!(p.get(t), Value::Object { .. })),
        _ => false,
    };
    match p.global(*class) {
        Some(("torch._utils", name)) => matches!(
            name,
            "_rebuild_tensor_v2"
                | "_rebuild_tensor"
                | "_rebuild_parameter"
                | "_rebuild_parameter_with_state"
        ),
        Some(("torch._tensor", "_rebuild_from_type_v2")) => true,
        Some(("torch.nn.parameter", "Parameter") | ("torch.autograd.variable", "Variable")) => {
            on_a_value()
        }
        _ => false,
    }
}

/// Whether the value at `id` is a whole pickled network: an `nn.Module` (`torch.save(model)`:
/// its attributes hold `_parameters`, `_buffers` and `_modules`) or a TorchScript module
/// (`torch.jit.save`: a class of `__torch__`, its parameters and submodules as attributes).
pub(super) fn is_module(p: &Pickle, id: Id) -> bool {
    let Value::Object { class, state, .. } = p.get(id) else {
        return false;
    };
    let scripted = p
        .global(*class)
        .is_some_and(|(module, _)| module == "__torch__" || module.starts_with("__torch__."));
    scripted || state.is_some_and(|s| p.lookup(s, "_modules").is_some())
}

/// The tensors of the place at `id` (a state dict, or a module whose tensors are named as
/// `state_dict()` names them), by name, in the file's order.
pub(super) fn named_tensors<'p>(
    p: &'p Pickle,
    id: Id,
    names: &mut Names<'p>,
) -> std::result::Result<Vec<(String, Id)>, String> {
    if is_module(p, id) {
        return module_tensors(p, id, names);
    }
    p.entries(id)
        .unwrap_or_default()
        .iter()
        .filter(|&&(_, v)| is_tensor(p, v))
        .filter_map(|&(k, v)| Some((p.str(k)?, v)))
        .map(|(name, v)| Ok((names.join("", name)?, v)))
        .collect()
}

/// Modules nested deeper than any network is (ResNets nest 4 deep, DLA 7); a module among its
/// own submodules reaches it (PyTorch's `state_dict()` recurses for ever on one).
const MAX_MODULE_DEPTH: usize = 100;

/// Tensor names made, bounded: a pickle of a few megabytes can name one memoised tensor a
/// million times under a memoised name of a megabyte, or share one module among many. Also
/// what was read of each module on the way, so that a module shared by many places of one walk
/// is read once.
#[derive(Default)]
pub(super) struct Names<'p> {
    count: usize,
    bytes: usize,
    locals: HashMap<Id, Local<'p>>,
    modules: HashMap<Id, bool>,
}

/// More tensors, or bytes of their names, than any network has.
const MAX_NAMES: usize = 1_000_000;
const MAX_NAME_BYTES: usize = 64 << 20;

impl Names<'_> {
    /// `prefix` and `name` joined, counted against the bounds.
    fn join(&mut self, prefix: &str, name: &str) -> std::result::Result<String, String> {
        self.count += 1;
        self.bytes += prefix.len() + name.len();
        if self.count > MAX_NAMES || self.bytes > MAX_NAME_BYTES {
            return Err(format!(
                "more than {MAX_NAMES} tensor names or {} MiB of them: not a network's state",
                MAX_NAME_BYTES >> 20
            ));
        }
        Ok(format!("{prefix}{name}"))
    }
}

/// The tensors of a whole pickled module by the names `state_dict()` gives them: each
/// module's parameters, then its buffers (not those it marks non-persistent), then its
/// submodules', dot-joined. A TorchScript module's tensor attributes are its parameters and
/// buffers, its `__torch__` objects its submodules.
fn module_tensors<'p>(
    p: &'p Pickle,
    root: Id,
    names: &mut Names<'p>,
) -> std::result::Result<Vec<(String, Id)>, String> {
    let mut out = Vec::new();
    // Depth first, in the order the attributes were saved. A module reached twice (shared by
    // two attributes) is named under both, as `state_dict()` names it.
    let mut todo = vec![(String::new(), root, 0)];
    while let Some((prefix, id, depth)) = todo.pop() {
        if depth > MAX_MODULE_DEPTH {
            return Err(format!(
                "modules nested more than {MAX_MODULE_DEPTH} deep at `{prefix}`"
            ));
        }
        // Each module's state is read once: a module shared many times over costs its names
        // only (copied out here, as many as the names they make).
        let modules = &mut names.modules;
        let local = names
            .locals
            .entry(id)
            .or_insert_with(|| Local::of(p, id, modules));
        let (tensors, children) = (local.tensors.clone(), local.children.clone());
        for (name, t) in tensors {
            out.push((names.join(&prefix, name)?, t));
        }
        for &(name, m) in children.iter().rev() {
            todo.push((names.join(&prefix, &format!("{name}."))?, m, depth + 1));
        }
    }
    Ok(out)
}

/// A module's own tensors and its submodules, by attribute name.
#[derive(Default)]
struct Local<'p> {
    tensors: Vec<(&'p str, Id)>,
    children: Vec<(&'p str, Id)>,
}

impl<'p> Local<'p> {
    /// What the module at `id` holds (nothing if it is no object with a state); `modules`
    /// remembers which values are modules.
    fn of(p: &'p Pickle, id: Id, modules: &mut HashMap<Id, bool>) -> Local<'p> {
        let mut local = Local::default();
        let Value::Object {
            state: Some(state), ..
        } = p.get(id)
        else {
            return local;
        };
        let texts = |d: Option<Id>| {
            let entries = d.and_then(|d| p.entries(d)).unwrap_or_default();
            entries.iter().filter_map(|&(k, v)| Some((p.str(k)?, v)))
        };
        if p.lookup(*state, "_modules").is_some() {
            let skipped: std::collections::HashSet<&str> = p
                .lookup(*state, "_non_persistent_buffers_set")
                .map(|set| set_texts(p, set).into_iter().collect())
                .unwrap_or_default();
            let params = texts(p.lookup(*state, "_parameters"));
            let buffers = texts(p.lookup(*state, "_buffers")).filter(|(n, _)| !skipped.contains(n));
            local.tensors = params
                .chain(buffers)
                .filter(|&(_, v)| is_tensor(p, v))
                .collect();
            local.children = texts(p.lookup(*state, "_modules")).collect();
        } else {
            for (name, v) in texts(Some(*state)) {
                if is_tensor(p, v) {
                    local.tensors.push((name, v));
                } else if *modules.entry(v).or_insert_with(|| is_module(p, v)) {
                    local.children.push((name, v));
                }
            }
        }
        local
    }
}

/// The texts in the set at `id`: `EMPTY_SET` and `ADDITEMS` under protocol 4 and later, a call
/// `set([...])` before.
fn set_texts(p: &Pickle, id: Id) -> Vec<&str> {
    let items = match p.get(id) {
        Value::Set(v) => v.as_slice(),
        Value::Object { class, args, .. } if p.global(*class).is_some_and(|g| g.1 == "set") => {
            match p.get(*args) {
                Value::Tuple(a) => match a.first().map(|&l| p.get(l)) {
                    Some(Value::List(v)) => v.as_slice(),
                    _ => &[],
                },
                _ => &[],
            }
        }
        _ => &[],
    };
    items.iter().filter_map(|&x| p.str(x)).collect()
}

/// A tensor's storage, offset, shape and strides from its pickled form.
pub(super) fn tensor_ref(p: &Pickle, value: Id) -> std::result::Result<TensorRef, String> {
    let mut value = value;
    // A parameter wraps its tensor: once in any real file, a few times at most.
    for _ in 0..4 {
        let Value::Object { class, args, .. } = p.get(value) else {
            return Err(format!("{}, expected a tensor", p.describe(value)));
        };
        let (_, name) = p.global(*class).unwrap_or_default();
        let Value::Tuple(args) = p.get(*args) else {
            return Err("its arguments are not a tuple".into());
        };
        match name {
            // (data, requires_grad, backward_hooks[, state]); PyTorch ≤ 0.3: (data,)
            "_rebuild_parameter" | "_rebuild_parameter_with_state" | "Parameter" | "Variable" => {
                value = *args
                    .first()
                    .ok_or_else(|| "a parameter without its data".to_string())?;
            }
            // (func, type, (storage, offset, size, stride, ...), state)
            "_rebuild_from_type_v2" => {
                return match args.get(2).map(|&a| p.get(a)) {
                    Some(Value::Tuple(inner)) => rebuild_args(p, inner),
                    _ => Err("a tensor subclass without its arguments".into()),
                }
            }
            _ => return rebuild_args(p, args),
        }
    }
    Err("parameters wrapped in parameters more than 4 deep".into())
}

/// Far more dimensions than any network's tensor has (4): a longer shape is taken for a
/// damaged one, which would otherwise be copied for every name of the tensor.
const MAX_RANK: usize = 64;

/// `(storage, offset, size, stride, ...)`, the arguments of `_rebuild_tensor(_v2)`.
fn rebuild_args(p: &Pickle, args: &[Id]) -> std::result::Result<TensorRef, String> {
    let [storage, offset, size, stride, ..] = *args else {
        return Err("expected (storage, offset, size, stride) arguments".into());
    };
    let Some(StorageId { class, key, view }) = storage_id(p, storage)? else {
        return Err(format!(
            "its storage {} is not a ('storage', ...) persistent id",
            p.describe(storage)
        ));
    };
    // A view of part of a storage (PyTorch < 0.4 pickled them): `(view key, offset, size)` in
    // elements of the root storage, whose key the id holds; the tensor lies within the view.
    let view = match view.map(|v| p.get(v)) {
        None | Some(Value::None) => None,
        Some(Value::Tuple(v)) => match v.as_slice() {
            &[k, off, len] if p.str(k).is_some() => Some((int(p, off)?, int(p, len)?)),
            _ => {
                return Err(format!(
                    "unexpected storage view {}",
                    p.describe(view.unwrap())
                ))
            }
        },
        Some(_) => {
            return Err(format!(
                "unexpected storage view {}",
                p.describe(view.unwrap())
            ))
        }
    };
    let offset = int(p, offset)?;
    let dims = ints(p, size)?;
    if dims.len() > MAX_RANK {
        return Err(format!(
            "{} dimensions, more than the {MAX_RANK} read",
            dims.len()
        ));
    }
    let strides = match p.get(stride) {
        // Checked before it is copied: a damaged stride can be as long as the pickle.
        Value::Tuple(v) | Value::List(v) if v.len() != dims.len() => {
            return Err(format!("{} strides for {} dimensions", v.len(), dims.len()))
        }
        _ => ints(p, stride)?,
    };
    Ok(TensorRef {
        storage: key.to_owned(),
        class: class.to_owned(),
        offset: view
            .map_or(Some(offset), |(start, _)| start.checked_add(offset))
            .ok_or("its offset overflows")?,
        view,
        dims,
        strides,
    })
}

/// A storage's persistent id, `('storage', <class torch.XStorage>, key, location, numel[,
/// view])`: the zip format's have five entries, the legacy format's a sixth, the view.
struct StorageId<'a> {
    class: &'a str,
    key: &'a str,
    view: Option<Id>,
}

/// The storage the persistent id at `id` names; `None` if `id` is no storage's persistent
/// id (the legacy format also makes one of a pickled module's class).
fn storage_id(p: &Pickle, id: Id) -> std::result::Result<Option<StorageId<'_>>, String> {
    let Value::Persistent(pid) = p.get(id) else {
        return Ok(None);
    };
    let Value::Tuple(fields) = p.get(*pid) else {
        return Ok(None);
    };
    match *fields.as_slice() {
        [tag, class, key, _location, _numel, ref rest @ ..]
            if p.str(tag) == Some("storage") && rest.len() <= 1 =>
        {
            let class = storage_class(p, class)?;
            let key = p
                .str(key)
                .filter(|k| k.len() <= MAX_STORAGE_TEXT)
                .ok_or_else(|| {
                    format!(
                        "a storage key {}, expected text of at most {MAX_STORAGE_TEXT} bytes",
                        p.describe(key)
                    )
                })?;
            Ok(Some(StorageId {
                class,
                key,
                view: rest.first().copied(),
            }))
        }
        _ => Ok(None),
    }
}

/// The class name of a pickled `torch.XStorage`.
fn storage_class(p: &Pickle, id: Id) -> std::result::Result<&str, String> {
    match p.global(id) {
        // Copied for every tensor: a name longer than any storage class's is refused.
        Some((_, name)) if name.len() <= MAX_STORAGE_TEXT => Ok(name),
        _ => Err(format!(
            "a storage type {}, expected a torch storage class",
            p.describe(id)
        )),
    }
}

/// Longer than any storage class name (`ComplexDoubleStorage`) or storage key (a number) is.
const MAX_STORAGE_TEXT: usize = 64;

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

/// The storage class of every storage the pickle refers to, by key: what tells how many
/// bytes each storage in the stream takes, including those of tensors not read (an
/// optimizer's state).
pub(super) fn storage_types(p: &Pickle) -> HashMap<String, String> {
    let mut seen = std::collections::HashSet::new();
    (0..p.values.len())
        // One persistent id memoised and loaded many times is one storage.
        .filter(|&id| matches!(p.get(id), Value::Persistent(pid) if seen.insert(*pid)))
        .filter_map(|id| storage_id(p, id).ok().flatten())
        .map(|s| (s.key.to_owned(), s.class.to_owned()))
        .collect()
}

/// Builds each tensor of `refs` from the bytes `storage` gives for its storage's key. A tensor
/// named twice (tied weights, or one memoised tensor under many names) is built once; the
/// elements built in all may be at most twice the storages' plus 64 MiB, which any real
/// checkpoint is far below (its tensors overlap in their storages only when tied), and a pickle
/// of many views of one large storage would exceed.
pub(super) fn materialise_all<'a>(
    path: &Path,
    refs: Refs,
    storage: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<BTreeMap<String, Tensor>> {
    // Tensors built, by their storage, offset, shape and strides.
    type Layout<'r> = (&'r str, usize, &'r [usize], &'r [usize]);
    let mut built: HashMap<Layout, Tensor> = HashMap::new();
    let mut storages = std::collections::HashSet::new();
    let (mut bytes_stored, mut bytes_built) = (0usize, 0usize);
    let mut out = BTreeMap::new();
    for (name, t) in &refs {
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
        if storages.insert(t.storage.as_str()) {
            bytes_stored += bytes.len();
        }
        let key = (t.storage.as_str(), t.offset, &t.dims[..], &t.strides[..]);
        let tensor = match built.get(&key) {
            Some(tensor) => tensor.clone(),
            None => {
                let tensor =
                    materialise(bytes, t).map_err(|e| EngineError::invalid(path, place(), e))?;
                bytes_built += tensor.elem_count() * tensor.dtype().size_in_bytes();
                if bytes_built > 2 * bytes_stored + (64 << 20) {
                    return Err(EngineError::invalid(
                        path,
                        place(),
                        format!(
                            "the tensors so far take {bytes_built} bytes, more than twice their \
                             storages' and 64 MiB: views overlapping over and over"
                        ),
                    ));
                }
                built.insert(key, tensor.clone());
                tensor
            }
        };
        out.insert(name.clone(), tensor);
    }
    Ok(out)
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
    if n == Some(0) {
        return if offset <= end {
            Ok(0)
        } else {
            Err(format!(
                "an empty tensor at element {offset}, past its storage of {stored} elements"
            ))
        };
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
fn int(p: &Pickle, id: Id) -> std::result::Result<usize, String> {
    match p.get(id) {
        Value::Int(i) => usize::try_from(*i).map_err(|_| format!("a negative integer {i}")),
        _ => Err(format!("{}, expected an integer", p.describe(id))),
    }
}

/// A pickled tuple of integers (a shape or strides).
fn ints(p: &Pickle, id: Id) -> std::result::Result<Vec<usize>, String> {
    match p.get(id) {
        Value::Tuple(v) | Value::List(v) => v.iter().map(|&x| int(p, x)).collect(),
        _ => Err(format!("{}, expected a tuple of integers", p.describe(id))),
    }
}

/// What kind of value the pickle holds at `id`, for errors.
pub(super) fn kind(p: &Pickle, id: Id) -> &'static str {
    match p.get(id) {
        Value::Dict(_) => "a dict",
        Value::List(_) => "a list",
        Value::Tuple(_) => "a tuple",
        Value::Object { .. } => "a Python object",
        _ => "a plain value",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensor(offset: usize, dims: &[usize], strides: &[usize]) -> TensorRef {
        TensorRef {
            storage: "0".into(),
            class: "FloatStorage".into(),
            offset,
            view: None,
            dims: dims.to_vec(),
            strides: strides.to_vec(),
        }
    }

    /// An empty tensor may start at the end of its storage, not past it; a strided one must
    /// reach no further than its storage's last element.
    #[test]
    fn extents_are_checked_against_the_storage() {
        assert_eq!(extent(&tensor(10, &[0], &[1]), 10), Ok(0));
        let e = extent(&tensor(11, &[0], &[1]), 10).unwrap_err();
        assert!(e.contains("element 11, past its storage of 10"), "{e}");
        assert_eq!(extent(&tensor(1, &[3, 3], &[3, 1]), 10), Ok(9));
        assert!(extent(&tensor(2, &[3, 3], &[3, 1]), 10).is_err());
        assert_eq!(extent(&tensor(0, &[2, 5], &[1, 2]), 10), Ok(10));
    }

    /// `_rebuild_tensor_v2(('storage', <class>, '0', 'cpu', 2), 0, (2,), strides)` pickled.
    fn rebuilt(class: &str, strides: &[u8]) -> Pickle {
        let mut b =
            b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storage".to_vec();
        b.extend(format!("ctorch\n{class}\n").bytes());
        b.extend(b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x02tQK\x00K\x02\x85");
        b.extend(strides);
        b.extend(b"tR.");
        super::super::unpickler::unpickle(&b, &mut 0).unwrap()
    }

    /// What is copied for every name of a tensor is checked first: strides as many as the
    /// dimensions (a damaged stride tuple can be as long as the pickle) and a storage class of
    /// a storage class's length.
    #[test]
    fn strides_and_storage_classes_are_checked_before_they_are_copied() {
        let p = rebuilt("FloatStorage", b"K\x01\x85");
        let t = tensor_ref(&p, p.root).unwrap();
        assert_eq!(
            (t.dims, t.strides, t.class),
            (vec![2], vec![1], "FloatStorage".into())
        );
        let p = rebuilt(
            "FloatStorage",
            &[b"(".as_slice(), &b"K\x01".repeat(100_000), b"t"].concat(),
        );
        let e = tensor_ref(&p, p.root).err().unwrap();
        assert_eq!(e, "100000 strides for 1 dimensions");
        let p = rebuilt(&"S".repeat(65), b"K\x01\x85");
        let e = tensor_ref(&p, p.root).err().unwrap();
        assert!(e.contains("expected a torch storage class"), "{e}");
    }
}
