//! Where in a saved object the network's tensors are: the place the import reads (the saved
//! object itself, the entry a `key` names, dot-joined through nested dicts, or the first of
//! [`STATE_DICT_KEYS`] holding tensors) with its tensors, and every place holding tensors, for
//! `pipeline inspect` and for errors that say where tensors are when the import finds none.
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
    for (name, value) in named {
        if not_a_weight(&name) {
            continue;
        }
        let t = tensor_ref(p, value)
            .map_err(|e| EngineError::invalid(path, format!("tensor `{name}`"), e))?;
        refs.push((name, t));
    }
    Ok((refs, key))
}

/// Where the network's tensors are: the saved object itself (a state dict or a module, key
/// `None`), else the entry `key` names (a dot-joined path into nested dicts: `state.model`) or
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
    let walkable = matches!(
        p.get(top),
        Value::List(_) | Value::Tuple(_) | Value::Object { state: Some(_), .. }
    );
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
    let keys: Vec<Key> = children(p, id).into_iter().map(|(k, _)| k).collect();
    match keys.len() {
        _ if !is_sequence(p, id) => format!("{} of keys {}", kind(p, id), some_keys(&keys)),
        0 => format!("{} of no items", kind(p, id)),
        n => format!("{} of {n} items (0 to {})", kind(p, id), n - 1),
    }
}

/// Whether the value at `id` is reached into by index: a list, a tuple, a list subclass.
fn is_sequence(p: &Pickle, id: Id) -> bool {
    match p.get(id) {
        Value::List(_) | Value::Tuple(_) => true,
        Value::Object { list, items, .. } => !list.is_empty() && items.is_empty(),
        _ => false,
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
/// int keys, lists' and tuples' items and plain objects' attributes, not into modules (their tensors are theirs), up to
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
            ..
        } = p.get(id)
        {
            if items.is_empty() && !states.insert(*state) {
                continue;
            }
        }
        let module = is_module(p, id);
        let tensors = if module {
            named_tensors(p, id, &mut names).map_or(0, |t| t.len())
        } else {
            if depth < MAX_KEY_DEPTH {
                for (key, v) in attributes(p, id) {
                    if key.len() <= MAX_KEY_BYTES && can_hold(p, v) && seen.insert(v) {
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
            Key::Index(i) => i.to_string().len(),
        }
    }

    /// Whether `part` of a key path names it: the text itself, or the index in decimal
    /// without leading zeros (`0`, `12`), as Python writes it.
    fn is(&self, part: &str, index: Option<u64>) -> bool {
        match *self {
            Key::Text(t) => t == part,
            Key::Index(i) => index == Some(i),
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
    (canonical && !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
        .then(|| part.parse().ok())
        .flatten()
}

/// The entries of the dict at `id`, the items of the list or tuple at `id`, or the attributes
/// of the plain object (not a module) at `id`.
pub(super) fn children(p: &Pickle, id: Id) -> Vec<(Key<'_>, Id)> {
    if p.entries(id).is_none() && is_module(p, id) {
        return Vec::new();
    }
    attributes(p, id)
}

/// The entries under text or non-negative int keys of the dict at `id`, the items of the list
/// or tuple (or of the list subclass) at `id`, or the attributes of the object at `id`.
fn attributes(p: &Pickle, id: Id) -> Vec<(Key<'_>, Id)> {
    let items = |v: &[Id]| -> Vec<(Key, Id)> {
        v.iter()
            .enumerate()
            .map(|(i, &x)| (Key::Index(i as u64), x))
            .collect()
    };
    let entries = match (p.entries(id), p.get(id)) {
        (Some(d), _) => d,
        (None, Value::List(v) | Value::Tuple(v)) => return items(v),
        (None, Value::Object { list, .. }) if !list.is_empty() => return items(list),
        (
            None,
            Value::Object {
                state: Some(state), ..
            },
        ) => p.entries(*state).unwrap_or_default(),
        _ => &[],
    };
    entries
        .iter()
        .filter_map(|&(k, v)| {
            let key = match p.get(k) {
                Value::Str(s) => Key::Text(s),
                &Value::Int(i) => Key::Index(u64::try_from(i).ok()?),
                _ => return None,
            };
            Some((key, v))
        })
        .collect()
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
        let entries = children(p, at);
        let before = todo.len();
        // Pushed shortest first, so that the longest key is tried first. Compared, not
        // hashed: a key can be a megabyte long (its length tells it apart at once).
        for j in i + 1..=parts.len() {
            let head = parts[i..j].join(".");
            let index = index_of(&head);
            // The last entry of a key wins, as in Python.
            if let Some(&(_, v)) = entries.iter().rev().find(|(k, _)| k.is(&head, index)) {
                todo.push((v, j));
            }
        }
        if todo.len() == before && deepest.is_none_or(|(d, _)| i > d) {
            deepest = Some((i, at));
        }
    }
    let (i, at) = deepest.unwrap_or((0, p.root));
    let keys: Vec<Key> = children(p, at).into_iter().map(|(k, _)| k).collect();
    let (walked, rest) = (parts[..i].join("."), parts[i..].join("."));
    Err(if is_sequence(p, at) {
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

    /// Lists, tuples and int-keyed dicts are walked and reached by index:
    /// `{'members': [{'x': 1}, {'w': t}], 'pair': ({'w': t},), 'by_int': {0: {'w': t}}}` has its
    /// places at `members.1`, `pair.0` and `by_int.0`, the shallowest first, in the file's
    /// order; an index past the end, or written with a leading zero, is named with the list's
    /// length.
    #[test]
    fn lists_tuples_and_int_keys_are_reached_by_index() {
        let holder = || dict(&[("w", TENSOR.to_vec())]);
        let mut by_int = b"}(K\x00".to_vec();
        by_int.extend(holder());
        by_int.push(b'u');
        let p = pickle(&dict(&[
            (
                "members",
                list(&[dict(&[("x", b"K\x01".to_vec())]), holder()]),
            ),
            ("pair", [b"(".to_vec(), holder(), b"t".to_vec()].concat()),
            ("by_int", by_int),
        ]));
        let found: Vec<(Option<String>, usize)> = places(&p)
            .into_iter()
            .map(|pl| (pl.path, pl.tensors))
            .collect();
        let at = |k: &str| (Some(k.to_owned()), 1);
        assert_eq!(found, [at("members.1"), at("pair.0"), at("by_int.0")]);
        for key in ["members.1", "pair.0", "by_int.0"] {
            assert_eq!(keys(&p, resolve(&p, key).unwrap()), ["w"], "{key}");
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
}
