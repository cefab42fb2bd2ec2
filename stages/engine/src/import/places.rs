//! Where in a saved object the network's tensors are: the place the import reads (the saved
//! object itself, the entry a `key` names, dot-joined through nested dicts, lists and tuples
//! (by index) and plain objects' attributes, or the first of [`STATE_DICT_KEYS`] holding
//! tensors) with its tensors, and every place holding tensors, for `pipeline inspect` and for
//! errors that say where tensors are when the import finds none.
//!
//! Every walk here is linear in the pickle: each value is visited once, a key path is built
//! only for a place reported, and the names of modules' tensors count against one budget.

use super::pickled::{is_module, is_tensor, kind, named_tensors, tensor_ref, Names, Refs};
use super::unpickler::{Id, Pickle, Value};
use super::{not_a_weight, with_prefix, Select, STATE_DICT_KEYS};
use crate::error::{EngineError, Result};
use std::collections::{HashSet, VecDeque};
use std::path::Path;

/// The tensors of the state dict in the saved object `p` (read from `place`) with where their
/// elements lie, by their names in the file (those `select.prefix` picks, without it), and the
/// dict key the state dict was under (`select.key`, or found). BatchNorm's step counters and
/// other entries that are no weight are left out.
pub(super) fn tensors(
    path: &Path,
    place: &str,
    p: &Pickle,
    select: Select,
) -> Result<(Refs, Option<String>)> {
    let (key, holder) = state_dict_key(path, place, p, select.key)?;
    let named = named_tensors(p, holder, &mut Names::default())
        .map_err(|e| EngineError::invalid(path, place, e))?;
    // Before any tensor is built: the others may be of types not read (MoCo's int64 queue
    // pointer beside its encoders).
    let named = match select.prefix {
        Some(prefix) => with_prefix(path, named, prefix)?,
        None => named,
    };
    let mut refs = Vec::new();
    let mut counters = Vec::new();
    for (name, value) in named {
        if not_a_weight(&name) {
            counters.push(name);
            continue;
        }
        let t = tensor_ref(p, value)
            .map_err(|e| EngineError::invalid(path, format!("tensor `{name}`"), e))?;
        refs.push((name, t));
    }
    if refs.is_empty() && !counters.is_empty() {
        let at = key
            .as_deref()
            .map_or_else(|| place.to_owned(), |k| format!("key `{k}`"));
        counters.truncate(3);
        return Err(EngineError::invalid(
            path,
            at,
            format!(
                "holds no weights, only counters (`{}`){}",
                counters.join("`, `"),
                elsewhere(p)
            ),
        ));
    }
    Ok((refs, key))
}

/// Where the network's tensors are: the saved object itself (a state dict or a module, key
/// `None`), else the entry `key` names (a dot-joined path into nested dicts, lists and tuples:
/// `state.model`, `members.1`) or
/// the first of [`STATE_DICT_KEYS`] holding tensors; with that place's id. `place` names the
/// pickle in errors.
pub(super) fn state_dict_key(
    path: &Path,
    place: &str,
    p: &Pickle,
    key: Option<&str>,
) -> Result<(Option<String>, Id)> {
    let top = p.root;
    if is_module(p, top) {
        return match key {
            None => Ok((None, top)),
            Some(k) => Err(EngineError::invalid(
                path,
                format!("key `{k}`"),
                "the checkpoint is a whole network, not a dict: leave `key` out (`prefix` picks \
                 a part of it)",
            )),
        };
    }
    let walkable = match p.get(top) {
        Value::List(_) | Value::Tuple(_) | Value::Object { state: Some(_), .. } => true,
        Value::Object { list, .. } => !list.is_empty(),
        _ => false,
    };
    if p.entries(top).is_none() && !walkable {
        return Err(EngineError::invalid(
            path,
            place,
            format!(
                "not a state dict: the pickle's top level is {}; save `model.state_dict()`",
                kind(p, top)
            ),
        ));
    }
    if let Some(k) = key {
        let at = resolve(p, k).map_err(|e| EngineError::invalid(path, format!("key `{k}`"), e))?;
        if !holds_tensors(p, at) {
            return Err(EngineError::invalid(
                path,
                format!("key `{k}`"),
                format!("holds no tensors: not a state dict{}", elsewhere(p)),
            ));
        }
        return Ok((Some(k.to_owned()), at));
    }
    // The known entries first: a checkpoint dict may hold tensors beside the state dict
    // (RepDistiller's `best_acc` is a 0-d tensor), a state dict never holds a dict of tensors.
    let entries = children(p, top);
    if let Some((k, at)) = STATE_DICT_KEYS.into_iter().find_map(|k| {
        let &(_, at) = entries
            .iter()
            .rev()
            .find(|(name, _)| *name == Key::Text(k))?;
        holds_tensors(p, at).then_some((k, at))
    }) {
        return Ok((Some(k.to_owned()), at));
    }
    if holds_tensors(p, top) {
        return Ok((None, top));
    }
    Err(EngineError::invalid(
        path,
        place,
        format!(
            "not a state dict: the pickle's top level is {}, with no tensors and no state dict \
             under {STATE_DICT_KEYS:?}{}",
            described(p, top),
            elsewhere(p)
        ),
    ))
}

/// Whether the value at `id` holds a network's tensors: a dict with a tensor among its values,
/// or a whole module.
pub(super) fn holds_tensors(p: &Pickle, id: Id) -> bool {
    is_module(p, id)
        || p.entries(id)
            .is_some_and(|d| d.iter().any(|&(_, v)| is_tensor(p, v)))
}

/// What the value at `id` is, with its keys: `a dict of keys ["epoch", "run"]`, `a list of 2
/// items (0 to 1)`.
fn described(p: &Pickle, id: Id) -> String {
    match items(p, id) {
        None => {
            let keys: Vec<Key> = children(p, id).into_iter().map(|(k, _)| k).collect();
            format!("{} of keys {}", kind(p, id), some_keys(&keys))
        }
        Some(0) => format!("{} of no items", kind(p, id)),
        Some(n) => format!("{} of {n} items (0 to {})", kind(p, id), n - 1),
    }
}

/// How many items the value at `id` has if it is reached into by index (a list, a tuple, a
/// list subclass that is no dict subclass), else `None`.
fn items(p: &Pickle, id: Id) -> Option<usize> {
    match p.get(id) {
        Value::List(v) | Value::Tuple(v) => Some(v.len()),
        Value::Object { list, items, .. } if !list.is_empty() && items.is_empty() => {
            Some(list.len())
        }
        _ => None,
    }
}

/// Up to 20 keys, as a list (`["epoch", "run"]`, `["a", …, 300 in all]`, `[0, 1]`).
fn some_keys(keys: &[Key]) -> String {
    let shown: Vec<String> = keys.iter().take(20).map(Key::quoted).collect();
    let more = if keys.len() > 20 {
        format!(", … {} in all", keys.len())
    } else {
        String::new()
    };
    format!("[{}{more}]", shown.join(", "))
}

/// Where else tensors are, for an error: `; tensors are under `a.b` (62), …: name one with
/// `key``, or nothing if nowhere.
fn elsewhere(p: &Pickle) -> String {
    let found: Vec<String> = places(p)
        .iter()
        .filter_map(|pl| Some(format!("`{}` ({})", pl.path.as_ref()?, pl.tensors)))
        .take(12)
        .collect();
    if found.is_empty() {
        return String::new();
    }
    format!(
        "; tensors are under {}: name one with `key`",
        found.join(", ")
    )
}

/// A place in the saved object holding tensors: a dict with tensors among its values (a state
/// dict) or a whole module.
pub(super) struct Place {
    /// The dot-joined keys leading to it from the saved object, `None` for the saved object.
    pub path: Option<String>,
    pub id: Id,
    /// Its tensors: a dict's tensor values, or a module's as `state_dict()` names them (0 once
    /// the names' budget is spent).
    pub tensors: usize,
}

/// Keys deeper than any checkpoint nests its state dicts (`{'state': {'model': ...}}` is 2).
const MAX_KEY_DEPTH: usize = 16;
/// Keys longer than any checkpoint's: not followed.
const MAX_KEY_BYTES: usize = 256;
/// More places than any checkpoint has; the walk stops there.
const MAX_PLACES: usize = 10_000;

/// A value reached by the walk: the node it was reached from (an index into the walk's nodes),
/// by which key, and how deep.
struct Node<'p> {
    parent: Option<usize>,
    key: Key<'p>,
    id: Id,
    depth: usize,
}

/// Every place holding tensors, breadth first (the shallowest first), through dicts' text and
/// int (and bool) keys, lists' and tuples' items and plain objects' attributes, not into modules (their tensors are theirs), up to
/// [`MAX_KEY_DEPTH`] keys deep and [`MAX_PLACES`] places. A value reached under two keys is
/// listed under the first.
pub(super) fn places(p: &Pickle) -> Vec<Place> {
    let mut out = Vec::new();
    let mut names = Names::default();
    let mut seen = HashSet::from([p.root]);
    // States of objects walked, apart from the values seen: a dict may be both an entry and an
    // object's state.
    let mut states = HashSet::new();
    let mut nodes = vec![Node {
        parent: None,
        key: Key::Text(""),
        id: p.root,
        depth: 0,
    }];
    let mut todo = VecDeque::from([0]);
    while let Some(n) = todo.pop_front() {
        if out.len() == MAX_PLACES {
            break;
        }
        let (id, depth) = (nodes[n].id, nodes[n].depth);
        // Objects sharing one state (not a dict subclass's items) are one object: that state
        // is walked once.
        if let Value::Object {
            state: Some(state),
            items,
            list,
            ..
        } = p.get(id)
        {
            if items.is_empty() && list.is_empty() && !states.insert(*state) {
                continue;
            }
        }
        let module = is_module(p, id);
        let tensors = if module {
            named_tensors(p, id, &mut names).map_or(0, |t| t.len())
        } else {
            if depth < MAX_KEY_DEPTH {
                for (key, v) in attributes(p, id) {
                    if can_hold(p, v) && key.len() <= MAX_KEY_BYTES && seen.insert(v) {
                        nodes.push(Node {
                            parent: Some(n),
                            key,
                            id: v,
                            depth: depth + 1,
                        });
                        todo.push_back(nodes.len() - 1);
                    }
                }
            }
            let entries = p.entries(id).unwrap_or_default();
            entries.iter().filter(|&&(_, v)| is_tensor(p, v)).count()
        };
        if tensors > 0 || module {
            out.push(Place {
                path: key_path(&nodes, n),
                id,
                tensors,
            });
        }
    }
    out
}

/// Whether the value at `id` can lead to tensors: a dict, list, tuple or object that is not
/// itself a tensor. Numbers and texts are not walked: a list of a million floats (a training
/// history) adds no node.
fn can_hold(p: &Pickle, id: Id) -> bool {
    match p.get(id) {
        Value::Dict(_) | Value::List(_) | Value::Tuple(_) => true,
        Value::Object { .. } => !is_tensor(p, id),
        _ => false,
    }
}

/// The dot-joined keys leading to node `n`, `None` for the saved object.
fn key_path(nodes: &[Node], mut n: usize) -> Option<String> {
    let mut keys = Vec::new();
    while let Some(parent) = nodes[n].parent {
        keys.push(nodes[n].key.to_string());
        n = parent;
    }
    keys.reverse();
    (!keys.is_empty()).then(|| keys.join("."))
}

/// How a value is reached from the one holding it: a dict's text key or an object's attribute
/// name, or the index of a list's or tuple's item or of an int-keyed dict's entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Key<'p> {
    Text(&'p str),
    Index(u64),
}

impl Key<'_> {
    /// Its length as written in a key path.
    fn len(&self) -> usize {
        match self {
            Key::Text(t) => t.len(),
            Key::Index(i) => i.checked_ilog10().map_or(1, |digits| digits as usize + 1),
        }
    }

    /// As a list of keys shows it: text quoted, an index bare.
    fn quoted(&self) -> String {
        match self {
            Key::Text(t) => format!("{t:?}"),
            Key::Index(i) => i.to_string(),
        }
    }
}

impl std::fmt::Display for Key<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Key::Text(t) => f.write_str(t),
            Key::Index(i) => write!(f, "{i}"),
        }
    }
}

/// `part` as an index: decimal digits without leading zeros, as Python writes an int.
fn index_of(part: &str) -> Option<u64> {
    let canonical = part == "0" || !part.starts_with('0');
    let digits = (1..=20).contains(&part.len()) && part.bytes().all(|b| b.is_ascii_digit());
    (canonical && digits).then(|| part.parse().ok()).flatten()
}

/// The entries of the dict at `id`, the items of the list or tuple at `id`, or the attributes
/// of the plain object (not a module) at `id`.
pub(super) fn children(p: &Pickle, id: Id) -> Vec<(Key<'_>, Id)> {
    if p.entries(id).is_none() && is_module(p, id) {
        return Vec::new();
    }
    attributes(p, id)
}

/// The entries under text or non-negative int (or bool: 0 and 1) keys of the dict at `id`, the items of the list
/// or tuple at `id`, or the items and attributes of the object at `id` (a list subclass may
/// have both), in the file's order. Of entries under one key only the last is kept, as Python
/// keeps it, and an int key is left out where a text key of its digits shadows it: every key
/// here names one value.
fn attributes(p: &Pickle, id: Id) -> Vec<(Key<'_>, Id)> {
    let (items, state) = match p.get(id) {
        Value::List(v) | Value::Tuple(v) => (v.as_slice(), None),
        Value::Object { list, state, .. } => (list.as_slice(), *state),
        _ => (&[][..], None),
    };
    let entries = match p.entries(id) {
        Some(d) => d,
        None => state.and_then(|s| p.entries(s)).unwrap_or_default(),
    };
    let indexed = items
        .iter()
        .enumerate()
        .map(|(i, &v)| (Key::Index(i as u64), v));
    let keyed = entries.iter().filter_map(|&(k, v)| {
        let key = match p.get(k) {
            Value::Str(s) => Key::Text(s),
            &Value::Int(i) => Key::Index(u64::try_from(i).ok()?),
            // Python's True == 1 and False == 0, in a dict too (`{True: sd}[1]` finds it).
            &Value::Bool(b) => Key::Index(b.into()),
            _ => return None,
        };
        Some((k, key, v))
    });
    let all: Vec<(Option<Id>, Key, Id)> = indexed
        .map(|(key, v)| (None, key, v))
        .chain(keyed.map(|(k, key, v)| (Some(k), key, v)))
        .collect();
    // The last of each key, found from the end. A key's text is hashed once per value holding
    // it: a memoised key of a megabyte under a million entries is hashed once.
    let (mut ids, mut texts, mut indices) = (HashSet::new(), HashSet::new(), HashSet::new());
    let mut out = Vec::with_capacity(all.len());
    for &(k, key, v) in all.iter().rev() {
        let new = match key {
            Key::Text(t) => k.is_none_or(|k| ids.insert(k)) && texts.insert(t),
            Key::Index(i) => indices.insert(i),
        };
        if new {
            out.push((key, v));
        }
    }
    let shadowed: HashSet<u64> = texts.iter().filter_map(|t| index_of(t)).collect();
    out.retain(|(key, _)| !matches!(key, Key::Index(i) if shadowed.contains(i)));
    out.reverse();
    out
}

/// Parts of a key path: more than any checkpoint nests.
const MAX_KEY_PARTS: usize = 64;

/// The value `key` names: an entry of the saved dict, or a dot-joined path of entries of
/// nested dicts, items of lists and tuples by index (`members.1`) and attributes of plain
/// objects. A key holding dots itself is found too:
/// every way of grouping the parts into keys is tried, the longest keys first, each value and
/// part tried once. If none reaches a value, the error names the deepest level reached.
pub(super) fn resolve(p: &Pickle, key: &str) -> std::result::Result<Id, String> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.len() > MAX_KEY_PARTS {
        return Err(format!("more than {MAX_KEY_PARTS} parts"));
    }
    let mut tried = HashSet::new();
    let mut deepest: Option<(usize, Id)> = None;
    let mut todo = vec![(p.root, 0)];
    while let Some((at, i)) = todo.pop() {
        if i == parts.len() {
            return Ok(at);
        }
        if !tried.insert((at, i)) {
            continue;
        }
        // The keys parts i.. can start with, each longer than the one before; only the first
        // (one part) can be an index.
        let heads: Vec<String> = (i + 1..=parts.len())
            .map(|j| parts[i..j].join("."))
            .collect();
        let index = index_of(&heads[0]);
        // One pass over the children, each compared with the one head of its length: a key
        // can be a megabyte long, a list can have millions of items.
        let mut found = vec![None; heads.len()];
        for (k, v) in children(p, at) {
            let h = match k {
                Key::Text(t) => heads
                    .binary_search_by_key(&t.len(), String::len)
                    .ok()
                    .filter(|&h| heads[h] == t),
                Key::Index(n) => (index == Some(n)).then_some(0),
            };
            if let Some(h) = h {
                found[h] = Some(v);
            }
        }
        let before = todo.len();
        // Pushed shortest first, so that the longest key is tried first.
        for (h, v) in found.into_iter().enumerate() {
            if let Some(v) = v {
                todo.push((v, i + 1 + h));
            }
        }
        if todo.len() == before && deepest.is_none_or(|(d, _)| i > d) {
            deepest = Some((i, at));
        }
    }
    let (i, at) = deepest.unwrap_or((0, p.root));
    let keys: Vec<Key> = children(p, at).into_iter().map(|(k, _)| k).collect();
    let (walked, rest) = (parts[..i].join("."), parts[i..].join("."));
    Err(if items(p, at).is_some() {
        let place = if i == 0 {
            "the checkpoint".to_owned()
        } else {
            format!("`{walked}`")
        };
        format!("`{rest}` is not in {place}, {}", described(p, at))
    } else if i == 0 {
        format!(
            "not in the checkpoint, whose top-level keys are {}",
            some_keys(&keys)
        )
    } else if keys.is_empty() {
        format!("`{walked}` is {}, which has no entries", kind(p, at))
    } else {
        format!(
            "`{rest}` is not in `{walked}`, whose keys are {}",
            some_keys(&keys)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::unpickler::unpickle;

    /// Protocol 2 opcodes for the pickles below: text (`BINUNICODE`), a dict (`EMPTY_DICT`,
    /// `MARK`, entries, `SETITEMS`), a tensor (a call of `_rebuild_tensor_v2`), the whole.
    fn text(s: &str) -> Vec<u8> {
        [
            b"X".as_slice(),
            &(s.len() as u32).to_le_bytes(),
            s.as_bytes(),
        ]
        .concat()
    }

    fn dict(entries: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut out = b"}(".to_vec();
        for (k, v) in entries {
            out.extend(text(k));
            out.extend(v);
        }
        out.push(b'u');
        out
    }

    const TENSOR: &[u8] = b"ctorch._utils\n_rebuild_tensor_v2\n)R";

    fn pickle(value: &[u8]) -> Pickle {
        unpickle(&[b"\x80\x02", value, b"."].concat(), &mut 0).unwrap()
    }

    /// The keys of the dict at `id`.
    fn keys(p: &Pickle, id: Id) -> Vec<&str> {
        children(p, id)
            .into_iter()
            .map(|(k, _)| match k {
                Key::Text(t) => t,
                Key::Index(_) => panic!("an index among a dict's keys"),
            })
            .collect()
    }

    /// `{'a.b': {'x': 1}, 'a': {'b': {'c': {'w': tensor}}}}`: `a.b` is the key holding a dot
    /// (tried first), `a.b.c` the path through `a` and `b` (found by trying the other grouping
    /// when `c` is not in `a.b`), and the place holding the tensor is named by a key that
    /// reaches it. A missing part is named with the level it is missing from.
    #[test]
    fn keys_holding_dots_are_found_however_the_parts_group() {
        let p = pickle(&dict(&[
            ("a.b", dict(&[("x", b"K\x01".to_vec())])),
            (
                "a",
                dict(&[("b", dict(&[("c", dict(&[("w", TENSOR.to_vec())]))]))]),
            ),
        ]));
        assert_eq!(keys(&p, resolve(&p, "a.b").unwrap()), ["x"]);
        let c = resolve(&p, "a.b.c").unwrap();
        assert_eq!(keys(&p, c), ["w"]);
        let found = places(&p);
        assert_eq!(found.len(), 1);
        assert_eq!(
            (found[0].path.as_deref(), found[0].id, found[0].tensors),
            (Some("a.b.c"), c, 1)
        );
        assert_eq!(
            resolve(&p, "a.q").unwrap_err(),
            r#"`q` is not in `a`, whose keys are ["b"]"#
        );
        assert_eq!(
            resolve(&p, "z").unwrap_err(),
            r#"not in the checkpoint, whose top-level keys are ["a.b", "a"]"#
        );
        assert_eq!(
            resolve(&p, "a.b.x.y").unwrap_err(),
            "`a.b.x` is a plain value, which has no entries"
        );
    }

    /// Walks stay linear where a path-per-entry walk would not: 100,000 entries under one
    /// memoised key of 1 MiB (100 GiB of paths if each entry built its own), and 20,000 objects
    /// sharing one state of 20,000 attributes (400 million children if each were walked).
    #[test]
    fn long_keys_and_shared_states_are_walked_once() {
        let mut long = b"}(".to_vec();
        long.extend(text(&"k".repeat(1 << 20)));
        long.extend(b"q\x00}");
        long.extend(b"h\x00}".repeat(99_999));
        long.push(b'u');
        let p = pickle(&long);
        assert!(places(&p).is_empty());
        assert!(resolve(&p, "k").unwrap_err().contains("top-level keys"));

        // {'s': state, 'o0': object with state, ... }, every object's state the memoised one.
        let state: Vec<(String, Vec<u8>)> = (0..20_000)
            .map(|i| (format!("k{i}"), b"K\x01".to_vec()))
            .collect();
        let state: Vec<(&str, Vec<u8>)> =
            state.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let mut shared = b"}(".to_vec();
        shared.extend(text("s"));
        shared.extend(dict(&state));
        shared.extend(b"q\x01");
        for i in 0..20_000 {
            shared.extend(text(&format!("o{i}")));
            shared.extend(b"cbuiltins\nobject\n)Rh\x01b");
        }
        shared.extend(b"u");
        let p = pickle(&shared);
        assert!(places(&p).is_empty());
        assert_eq!(resolve(&p, "o19999.k7"), resolve(&p, "s.k7"));
    }

    /// A dict that is both an object's state and an entry elsewhere is walked as the entry:
    /// `{'o': object with state D, 'x': {'d': D}}`, D holding a tensor, has its place at `x.d`.
    #[test]
    fn a_state_dict_that_is_also_an_entry_is_found() {
        let mut b = b"}(".to_vec();
        b.extend(text("o"));
        b.extend(b"cbuiltins\nobject\n)R");
        b.extend(dict(&[("w", TENSOR.to_vec())]));
        b.extend(b"q\x01b");
        b.extend(text("x"));
        b.extend(b"}(");
        b.extend(text("d"));
        b.extend(b"h\x01u");
        b.push(b'u');
        let p = pickle(&b);
        let found: Vec<Option<String>> = places(&p).into_iter().map(|pl| pl.path).collect();
        assert_eq!(found, [Some("x.d".to_owned())]);
    }

    /// `[items]` as a list (`EMPTY_LIST`, `MARK`, items, `APPENDS`).
    fn list(items: &[Vec<u8>]) -> Vec<u8> {
        let mut out = b"](".to_vec();
        out.extend(items.concat());
        out.push(b'e');
        out
    }

    /// A dict `{name: tensor}`: a place holding one tensor, told apart by its name.
    fn holder(name: &str) -> Vec<u8> {
        dict(&[(name, TENSOR.to_vec())])
    }

    /// The places of `p` by path and tensor count, each checked to be what `resolve` finds at
    /// its path.
    fn places_resolved(p: &Pickle) -> Vec<(String, usize)> {
        places(p)
            .into_iter()
            .map(|pl| {
                let path = pl.path.expect("a place below the top level");
                assert_eq!(resolve(p, &path), Ok(pl.id), "{path}");
                (path, pl.tensors)
            })
            .collect()
    }

    /// Lists, tuples and int-keyed dicts are walked and reached by index:
    /// `{'members': [{'x': 1}, {'w1': t}], 'pair': ({'w2': t},), 'by_int': {0: {'w3': t}}}` has
    /// its places at `members.1`, `pair.0` and `by_int.0`, the shallowest first, in the file's
    /// order, each reached again by its path; an index past the end, or written with a leading
    /// zero, is named with the list's length.
    #[test]
    fn lists_tuples_and_int_keys_are_reached_by_index() {
        let mut by_int = b"}(K\x00".to_vec();
        by_int.extend(holder("w3"));
        by_int.push(b'u');
        let p = pickle(&dict(&[
            (
                "members",
                list(&[dict(&[("x", b"K\x01".to_vec())]), holder("w1")]),
            ),
            (
                "pair",
                [b"(".to_vec(), holder("w2"), b"t".to_vec()].concat(),
            ),
            ("by_int", by_int),
        ]));
        let found = places_resolved(&p);
        let at = |k: &str| (k.to_owned(), 1);
        assert_eq!(found, [at("members.1"), at("pair.0"), at("by_int.0")]);
        for (key, name) in [("members.1", "w1"), ("pair.0", "w2"), ("by_int.0", "w3")] {
            assert_eq!(keys(&p, resolve(&p, key).unwrap()), [name], "{key}");
        }
        assert_eq!(keys(&p, resolve(&p, "members.0").unwrap()), ["x"]);
        for bad in ["members.2", "members.01", "members.-1", "members.x"] {
            let part = bad.split_once('.').unwrap().1;
            assert_eq!(
                resolve(&p, bad).unwrap_err(),
                format!("`{part}` is not in `members`, a list of 2 items (0 to 1)")
            );
        }
        assert_eq!(
            resolve(&p, "by_int.1").unwrap_err(),
            "`1` is not in `by_int`, whose keys are [0]"
        );
    }

    /// A bool key is the int Python takes it for: `{False: …, True: …}` is reached by 0 and 1,
    /// and where a dict holds both `True` and `1` (pickled entry by entry, so both can be in
    /// the file) the later one is the one Python keeps.
    #[test]
    fn bool_keys_are_reached_as_zero_and_one() {
        // A dict of pickled keys (opcodes), each holding a tensor named `name`.
        let keyed = |entries: &[(&[u8], &str)]| {
            let mut out = b"}(".to_vec();
            for (key, name) in entries {
                out.extend_from_slice(key);
                out.extend(holder(name));
            }
            out.push(b'u');
            out
        };
        let by_bool = keyed(&[(b"\x89".as_slice(), "w0"), (b"\x88", "w1")]);
        let both = keyed(&[(b"\x88".as_slice(), "first"), (b"K\x01", "second")]);
        let p = pickle(&dict(&[("by_bool", by_bool), ("both", both)]));
        for (key, name) in [
            ("by_bool.0", "w0"),
            ("by_bool.1", "w1"),
            ("both.1", "second"),
        ] {
            assert_eq!(keys(&p, resolve(&p, key).unwrap()), [name], "{key}");
        }
    }

    /// A saved list of state dicts (`torch.save([sd0, sd1])`) is read with an index as `key`;
    /// without one, the error says what the list holds and where the tensors are.
    #[test]
    fn a_saved_list_is_read_by_index() {
        let file = Path::new("ensemble.pth");
        let p = pickle(&list(&[
            dict(&[("x", b"K\x01".to_vec())]),
            dict(&[("w", TENSOR.to_vec())]),
        ]));
        let (key, at) = state_dict_key(file, "data.pkl", &p, Some("1")).unwrap();
        assert_eq!((key.as_deref(), keys(&p, at)), (Some("1"), vec!["w"]));
        let err = state_dict_key(file, "data.pkl", &p, None).unwrap_err();
        let message = err.to_string();
        assert!(
            message
                .contains("the pickle's top level is a list of 2 items (0 to 1), with no tensors")
                && message.contains("tensors are under `1` (1): name one with `key`"),
            "{message}"
        );
        assert_eq!(
            resolve(&p, "2").unwrap_err(),
            "`2` is not in the checkpoint, a list of 2 items (0 to 1)"
        );
    }

    /// A list subclass (`class Ens(list)`, pickled as `NEWOBJ` then `APPENDS`, no `BUILD`) is
    /// read by index at the top level; one with attributes (`BUILD` after `APPENDS`) has both
    /// its items and its attributes walked, and a state dict under `model` found by default;
    /// two sharing one `__dict__` have the items of both walked.
    #[test]
    fn list_subclasses_are_walked_by_item_and_attribute() {
        let file = Path::new("ensemble.pth");
        // GLOBAL `__main__.<class>`, EMPTY_TUPLE, NEWOBJ, MARK.
        let new = |class: &str| [format!("c__main__\n{class}\n)").as_bytes(), b"\x81("].concat();
        let ens = [
            new("Ens"),
            dict(&[("x", b"K\x01".to_vec())]),
            holder("w1"),
            b"e".to_vec(),
        ]
        .concat();
        let p = pickle(&ens);
        let (_, at) = state_dict_key(file, "data.pkl", &p, Some("1")).unwrap();
        assert_eq!(keys(&p, at), ["w1"]);
        assert_eq!(places_resolved(&p), [("1".to_owned(), 1)]);
        let message = state_dict_key(file, "data.pkl", &p, None)
            .unwrap_err()
            .to_string();
        assert!(
            message.contains("a Python object of 2 items (0 to 1)"),
            "{message}"
        );

        let with_model = [
            new("LA"),
            holder("w0"),
            b"e".to_vec(),
            dict(&[("model", holder("w1"))]),
            b"b".to_vec(),
        ]
        .concat();
        let p = pickle(&with_model);
        let found = places_resolved(&p);
        assert_eq!(found, [("0".to_owned(), 1), ("model".to_owned(), 1)]);
        let (key, at) = state_dict_key(file, "data.pkl", &p, None).unwrap();
        assert_eq!((key.as_deref(), keys(&p, at)), (Some("model"), vec!["w1"]));

        // {'a': LA([{'w0': t}]) with __dict__ S, 'b': LA([{'w1': t}]) with the same S}.
        let mut shared = b"}(".to_vec();
        shared.extend(text("a"));
        shared.extend(new("LA"));
        shared.extend(holder("w0"));
        shared.extend(b"e");
        shared.extend(dict(&[("x", b"K\x01".to_vec())]));
        shared.extend(b"q\x01b");
        shared.extend(text("b"));
        shared.extend(new("LA"));
        shared.extend(holder("w1"));
        shared.extend(b"eh\x01bu");
        let p = pickle(&shared);
        let found = places_resolved(&p);
        assert_eq!(found, [("a.0".to_owned(), 1), ("b.0".to_owned(), 1)]);
    }

    /// Every key names one value, as in Python: of a key set twice the last is kept (the
    /// first is neither listed nor reached), and an int key `0` beside a text key `'0'` is left
    /// out, the text key being what `0` in a path names.
    #[test]
    fn a_key_names_one_value() {
        let mut twice = b"}(".to_vec();
        twice.extend(text("a"));
        twice.extend(holder("w0"));
        twice.extend(text("a"));
        twice.extend(holder("w1"));
        twice.extend(b"K\x00");
        twice.extend(holder("w2"));
        twice.extend(text("0"));
        twice.extend(holder("w3"));
        twice.push(b'u');
        let p = pickle(&twice);
        assert_eq!(
            places_resolved(&p),
            [("a".to_owned(), 1), ("0".to_owned(), 1)]
        );
        assert_eq!(keys(&p, resolve(&p, "a").unwrap()), ["w1"]);
        assert_eq!(keys(&p, resolve(&p, "0").unwrap()), ["w3"]);
    }
}
