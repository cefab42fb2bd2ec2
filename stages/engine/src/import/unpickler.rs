//! A pickle machine for the checkpoints `torch.save` writes: runs a pickle's opcodes (protocols
//! 0 to 5) into a graph of plain values without running any Python, so that the importer can
//! find the tensors in what was saved: a state dict, a checkpoint dict, a whole pickled
//! `nn.Module` or a TorchScript archive's module tree.
//!
//! Why not candle's unpickler, which the importer used before: it copies a memoised object when
//! it is put, so a dict referenced twice read back empty the second time (pickle memoises a
//! dict before filling it); it reads protocol 2 only (no `FRAME`, `MEMOIZE`, `STACK_GLOBAL`,
//! `SHORT_BINUNICODE` of protocol 4); and a damaged pickle could make it panic, nest values
//! deeper than dropping them recursively allows, or copy memoised values exponentially.
//!
//! Here every value lives in one arena and refers to others by index, as Python's objects refer
//! to each other: the memo holds indices, so a value filled after being memoised is seen filled
//! wherever it is referenced, a copy is never made, and nothing is recursive (no stack overflow
//! however deep the nesting, cycles included). Each opcode adds at most one value, so memory
//! stays proportional to the pickle's length. Unknown classes are kept as [`Value::Object`]:
//! their constructor's arguments and state, as the pickle gives them.

use std::collections::HashMap;

/// A value's place in [`Pickle::values`].
pub(super) type Id = usize;

/// One value of a pickle.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Value {
    None,
    Bool(bool),
    Int(i64),
    /// An integer of more than 64 bits: its little-endian two's-complement bytes.
    BigInt(Vec<u8>),
    Float(f64),
    /// Text; Python 2's byte strings (`STRING`, `BINSTRING`, `SHORT_BINSTRING`) too, as the
    /// names PyTorch 0.x wrote under Python 2 are.
    Str(String),
    /// Bytes, by their length only: nothing here reads their content.
    Bytes(usize),
    Tuple(Vec<Id>),
    List(Vec<Id>),
    /// A dict (also a `collections.OrderedDict` or `defaultdict`), in insertion order; a key
    /// set twice keeps both entries, the later one winning on lookup.
    Dict(Vec<(Id, Id)>),
    Set(Vec<Id>),
    /// A class or function named by `GLOBAL`/`STACK_GLOBAL`: the texts of its module and
    /// name (`STACK_GLOBAL` takes them from the stack, memoised ones too: held by place, not
    /// copied, so that naming a class again costs nothing however long its name).
    Global {
        module: Id,
        name: Id,
    },
    /// What a call of `class` (`REDUCE`, `NEWOBJ`, `INST`, `OBJ`) made, with what `BUILD` gave
    /// it as state and what `SETITEMS`/`APPENDS` added to it.
    Object {
        class: Id,
        args: Id,
        state: Option<Id>,
        items: Vec<(Id, Id)>,
        list: Vec<Id>,
    },
    /// A persistent id (`PERSID`, `BINPERSID`): for PyTorch, a storage.
    Persistent(Id),
}

/// A pickle's values and the one it returned.
#[derive(Debug)]
pub(super) struct Pickle {
    pub values: Vec<Value>,
    pub root: Id,
}

impl Pickle {
    /// The value at `id`.
    pub fn get(&self, id: Id) -> &Value {
        &self.values[id]
    }

    /// The text at `id`, if it is text.
    pub fn str(&self, id: Id) -> Option<&str> {
        match self.get(id) {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The entries of the dict at `id`, or those an object of a dict subclass was given
    /// (`SETITEMS` on it: an `EasyDict`, a `defaultdict` subclass).
    pub fn entries(&self, id: Id) -> Option<&[(Id, Id)]> {
        match self.get(id) {
            Value::Dict(d) => Some(d),
            Value::Object { items, .. } if !items.is_empty() => Some(items),
            _ => None,
        }
    }

    /// The value under the text key `key` of the dict at `id` (the last entry of that key).
    pub fn lookup(&self, id: Id, key: &str) -> Option<Id> {
        self.entries(id)?
            .iter()
            .rev()
            .find(|(k, _)| self.str(*k) == Some(key))
            .map(|&(_, v)| v)
    }

    /// The class at `id` as `module.name`, if it is a class.
    pub fn global(&self, id: Id) -> Option<(&str, &str)> {
        match self.get(id) {
            Value::Global { module, name } => Some((self.str(*module)?, self.str(*name)?)),
            _ => None,
        }
    }

    /// The value at `id` as Python would print it, cut short past a few levels and entries
    /// (for errors; never recursive without bound).
    pub fn describe(&self, id: Id) -> String {
        let mut out = String::new();
        self.describe_into(id, 3, &mut out);
        out
    }

    fn describe_into(&self, id: Id, depth: usize, out: &mut String) {
        use std::fmt::Write;
        let list = |items: &[Id], open: &str, close: &str, out: &mut String| {
            out.push_str(open);
            for (i, &x) in items.iter().enumerate() {
                if i == 6 {
                    let _ = write!(out, ", … {} more", items.len() - 6);
                    break;
                }
                if i > 0 {
                    out.push_str(", ");
                }
                self.describe_into(x, depth - 1, out);
            }
            out.push_str(close);
        };
        match self.get(id) {
            Value::None => out.push_str("None"),
            Value::Bool(b) => out.push_str(if *b { "True" } else { "False" }),
            Value::Int(i) => {
                let _ = write!(out, "{i}");
            }
            Value::BigInt(b) => {
                let _ = write!(out, "<integer of {} bytes>", b.len());
            }
            Value::Float(f) => {
                let _ = write!(out, "{f}");
            }
            Value::Str(s) if s.chars().count() > 60 => {
                let _ = write!(out, "'{}…'", s.chars().take(60).collect::<String>());
            }
            Value::Str(s) => {
                let _ = write!(out, "'{s}'");
            }
            Value::Bytes(n) => {
                let _ = write!(out, "<{n} bytes>");
            }
            Value::Global { .. } => {
                let (module, name) = self.global(id).unwrap_or(("?", "?"));
                let _ = write!(out, "<class {module}.{name}>");
            }
            _ if depth == 0 => out.push('…'),
            Value::Tuple(v) => list(v, "(", ")", out),
            Value::List(v) => list(v, "[", "]", out),
            Value::Set(v) => list(v, "{", "}", out),
            Value::Dict(d) => {
                let flat: Vec<Id> = d.iter().take(6).map(|&(k, _)| k).collect();
                list(&flat, "dict with keys [", "", out);
                if d.len() > 6 {
                    let _ = write!(out, ", … {} more", d.len() - 6);
                }
                out.push(']');
            }
            Value::Object { class, args, .. } => {
                self.describe_into(*class, depth - 1, out);
                self.describe_into(*args, depth - 1, out);
            }
            Value::Persistent(pid) => {
                out.push_str("persistent_load");
                self.describe_into(*pid, depth - 1, out);
            }
        }
    }
}

/// Runs the pickle starting at byte `*at` of `data` and leaves `*at` just after its `STOP`.
/// Errors say what was wrong and at which byte.
pub(super) fn unpickle(data: &[u8], at: &mut usize) -> Result<Pickle, String> {
    let mut m = Machine {
        data,
        pos: *at,
        values: Vec::new(),
        stack: Vec::new(),
        marks: Vec::new(),
        memo: HashMap::new(),
    };
    loop {
        let op = m.pos;
        let code = m.byte().map_err(|_| "no STOP before the end".to_string())?;
        match m.step(code) {
            Ok(Some(root)) => {
                *at = m.pos;
                return Ok(Pickle {
                    values: m.values,
                    root,
                });
            }
            Ok(None) => {}
            Err(e) => return Err(format!("{e} (opcode {code:#04x} at byte {op})")),
        }
    }
}

/// The machine's state: the values made so far, the stack of their indices with the marks'
/// places beside it (as CPython's `metastack`), and the memo.
struct Machine<'a> {
    data: &'a [u8],
    pos: usize,
    values: Vec<Value>,
    stack: Vec<Id>,
    marks: Vec<usize>,
    memo: HashMap<u64, Id>,
}

type Step = Result<Option<Id>, String>;

impl<'a> Machine<'a> {
    /// Runs one opcode; `Some(root)` at `STOP`.
    fn step(&mut self, code: u8) -> Step {
        match code {
            0x80 => {
                let v = self.byte()?;
                if v > 5 {
                    return Err(format!("pickle protocol {v}; protocols 0 to 5 are read"));
                }
            }
            0x95 => {
                self.take(8)?; // FRAME: only a hint for buffered readers
            }
            b'.' => return self.pop().map(Some),
            b'(' => self.marks.push(self.stack.len()),
            b'0' => {
                if self.marks.last() == Some(&self.stack.len()) {
                    self.marks.pop();
                } else {
                    self.pop()?;
                }
            }
            b'1' => {
                self.pop_mark()?;
            }
            b'2' => {
                let top = *self.stack.last().ok_or("DUP on an empty stack")?;
                self.stack.push(top);
            }
            _ => return self.step_value(code),
        }
        Ok(None)
    }

    /// Opcodes that push a new value or change one.
    fn step_value(&mut self, code: u8) -> Step {
        let value = match code {
            b'N' => Value::None,
            0x88 => Value::Bool(true),
            0x89 => Value::Bool(false),
            b'J' => Value::Int(i32::from_le_bytes(self.array()?) as i64),
            b'K' => Value::Int(self.byte()? as i64),
            b'M' => Value::Int(u16::from_le_bytes(self.array()?) as i64),
            0x8a => {
                let n = self.byte()? as usize;
                long(self.take(n)?)
            }
            0x8b => {
                let n = self.len4()?;
                long(self.take(n)?)
            }
            b'I' => match self.line()? {
                "00" => Value::Bool(false),
                "01" => Value::Bool(true),
                s => Value::Int(s.trim().parse().map_err(|_| format!("INT `{s}`"))?),
            },
            b'L' => {
                let s = self.line()?;
                let digits = s.trim().trim_end_matches('L');
                match digits.parse::<i64>() {
                    Ok(i) => Value::Int(i),
                    Err(_) => decimal(digits).ok_or_else(|| {
                        let shown: String = s.chars().take(40).collect();
                        format!(
                            "LONG `{shown}{}`: not an integer of at most 4300 digits",
                            if s.len() > shown.len() { "…" } else { "" }
                        )
                    })?,
                }
            }
            b'G' => Value::Float(f64::from_be_bytes(self.array()?)),
            b'F' => {
                let s = self.line()?;
                Value::Float(s.trim().parse().map_err(|_| format!("FLOAT `{s}`"))?)
            }
            _ => return self.step_text(code),
        };
        self.push(value);
        Ok(None)
    }

    /// Opcodes of text and bytes.
    fn step_text(&mut self, code: u8) -> Step {
        let value = match code {
            0x8c => {
                let n = self.byte()? as usize;
                Value::Str(self.utf8(n)?)
            }
            b'X' => {
                let n = self.len4()?;
                Value::Str(self.utf8(n)?)
            }
            0x8d => {
                let n = self.len8()?;
                Value::Str(self.utf8(n)?)
            }
            b'U' => {
                let n = self.byte()? as usize;
                Value::Str(String::from_utf8_lossy(self.take(n)?).into_owned())
            }
            b'T' => {
                let n = self.len4()?;
                Value::Str(String::from_utf8_lossy(self.take(n)?).into_owned())
            }
            b'S' => Value::Str(unquote(self.line()?)?),
            // raw-unicode-escape: characters below 256 as their Latin-1 byte.
            b'V' => Value::Str(unescape_unicode(
                &self
                    .line_bytes()?
                    .iter()
                    .map(|&b| b as char)
                    .collect::<String>(),
            )),
            b'C' => {
                let n = self.byte()? as usize;
                Value::Bytes(self.take(n)?.len())
            }
            b'B' => {
                let n = self.len4()?;
                Value::Bytes(self.take(n)?.len())
            }
            0x8e | 0x96 => {
                let n = self.len8()?;
                Value::Bytes(self.take(n)?.len())
            }
            _ => return self.step_container(code),
        };
        self.push(value);
        Ok(None)
    }

    /// Opcodes that build containers or add to them.
    fn step_container(&mut self, code: u8) -> Step {
        match code {
            b')' => self.push(Value::Tuple(vec![])),
            b']' => self.push(Value::List(vec![])),
            b'}' => self.push(Value::Dict(vec![])),
            0x8f => self.push(Value::Set(vec![])),
            0x85..=0x87 => {
                let n = (code - 0x84) as usize;
                let at = self
                    .stack
                    .len()
                    .checked_sub(n)
                    .filter(|&at| self.marks.last().is_none_or(|&m| m <= at))
                    .ok_or("too few values on the stack")?;
                let items = self.stack.split_off(at);
                self.push(Value::Tuple(items));
            }
            b't' => {
                let items = self.pop_mark()?;
                self.push(Value::Tuple(items));
            }
            b'l' => {
                let items = self.pop_mark()?;
                self.push(Value::List(items));
            }
            0x91 => {
                let items = self.pop_mark()?;
                self.push(Value::Set(items));
            }
            b'd' => {
                let items = self.pop_mark()?;
                let pairs = pairs(&items)?;
                self.push(Value::Dict(pairs));
            }
            b'a' => {
                let x = self.pop()?;
                self.extend(vec![x])?;
            }
            b'e' => {
                let items = self.pop_mark()?;
                self.extend(items)?;
            }
            0x90 => {
                let items = self.pop_mark()?;
                self.extend(items)?;
            }
            b's' => {
                let v = self.pop()?;
                let k = self.pop()?;
                self.set_items(vec![(k, v)])?;
            }
            b'u' => {
                let items = self.pop_mark()?;
                let pairs = pairs(&items)?;
                self.set_items(pairs)?;
            }
            _ => return self.step_memo(code),
        }
        Ok(None)
    }

    /// The memo's opcodes.
    fn step_memo(&mut self, code: u8) -> Step {
        match code {
            b'q' => {
                let i = self.byte()? as u64;
                self.put(i)?;
            }
            b'r' => {
                let i = self.len4()? as u64;
                self.put(i)?;
            }
            b'p' => {
                let i = self.line()?.trim().parse().map_err(|_| "PUT index")?;
                self.put(i)?;
            }
            0x94 => {
                let i = self.memo.len() as u64;
                self.put(i)?;
            }
            b'h' => {
                let i = self.byte()? as u64;
                self.get(i)?;
            }
            b'j' => {
                let i = self.len4()? as u64;
                self.get(i)?;
            }
            b'g' => {
                let i = self.line()?.trim().parse().map_err(|_| "GET index")?;
                self.get(i)?;
            }
            _ => return self.step_object(code),
        }
        Ok(None)
    }

    /// Opcodes naming classes, calling them, and persistent ids.
    fn step_object(&mut self, code: u8) -> Step {
        match code {
            b'c' => {
                let class = self.global_line()?;
                self.stack.push(class);
            }
            0x93 => {
                let name = self.pop()?;
                let module = self.pop()?;
                match (&self.values[module], &self.values[name]) {
                    (Value::Str(_), Value::Str(_)) => self.push(Value::Global { module, name }),
                    _ => return Err("STACK_GLOBAL of values that are not text".into()),
                }
            }
            b'R' | 0x81 => {
                let args = self.pop()?;
                let class = self.pop()?;
                self.call(class, args);
            }
            0x92 => {
                let _kwargs = self.pop()?;
                let args = self.pop()?;
                let class = self.pop()?;
                self.call(class, args);
            }
            b'i' => {
                let class = self.global_line()?;
                let items = self.pop_mark()?;
                let args = self.add(Value::Tuple(items));
                self.call(class, args);
            }
            b'o' => {
                let mut items = self.pop_mark()?;
                if items.is_empty() {
                    return Err("OBJ without a class".into());
                }
                let class = items.remove(0);
                let args = self.add(Value::Tuple(items));
                self.call(class, args);
            }
            b'b' => {
                let state = self.pop()?;
                let obj = *self.stack.last().ok_or("BUILD on an empty stack")?;
                // The state of a dict-like object (an OrderedDict's `_metadata`) is an
                // attribute, not an entry: it is left out.
                if let Value::Object { state: s, .. } = &mut self.values[obj] {
                    *s = Some(state);
                }
            }
            b'P' => {
                let id = Value::Str(self.line()?.to_owned());
                let id = self.add(id);
                self.push(Value::Persistent(id));
            }
            b'Q' => {
                let id = self.pop()?;
                self.push(Value::Persistent(id));
            }
            0x82..=0x84 => return Err("the copyreg extension registry is not read".into()),
            0x97 | 0x98 => return Err("out-of-band buffers are not read".into()),
            _ => return Err("not a pickle opcode".into()),
        }
        Ok(None)
    }

    /// `GLOBAL`/`INST`'s two lines, module and name, as a new [`Value::Global`].
    fn global_line(&mut self) -> Result<Id, String> {
        let module = Value::Str(self.line()?.to_owned());
        let module = self.add(module);
        let name = Value::Str(self.line()?.to_owned());
        let name = self.add(name);
        Ok(self.add(Value::Global { module, name }))
    }

    /// A call of `class` on `args`: a dict for the dict classes PyTorch pickles (a state
    /// dict is an `OrderedDict`), with the items of its arguments (Python 2's
    /// `OrderedDict.__reduce__` gives them there, Python 3's by `SETITEMS`), an
    /// [`Value::Object`] for any other.
    fn call(&mut self, class: Id, args: Id) {
        let text = |id: Id| match &self.values[id] {
            Value::Str(s) => s.as_str(),
            _ => "",
        };
        let dict_like = matches!(&self.values[class], Value::Global { module, name }
            if text(*module) == "collections"
                && matches!(text(*name), "OrderedDict" | "defaultdict"));
        let value = if dict_like {
            Value::Dict(self.pairs_in(args))
        } else {
            Value::Object {
                class,
                args,
                state: None,
                items: vec![],
                list: vec![],
            }
        };
        self.push(value);
    }

    /// The `(key, value)` pairs of a call's first argument, a list of pairs (`OrderedDict([[k,
    /// v], ...])`); none for anything else.
    fn pairs_in(&self, args: Id) -> Vec<(Id, Id)> {
        let Value::Tuple(args) = &self.values[args] else {
            return vec![];
        };
        let Some(Value::List(items)) = args.first().map(|&a| &self.values[a]) else {
            return vec![];
        };
        items
            .iter()
            .filter_map(|&i| match &self.values[i] {
                Value::List(p) | Value::Tuple(p) if p.len() == 2 => Some((p[0], p[1])),
                _ => None,
            })
            .collect()
    }

    /// `APPEND(S)`/`ADDITEMS` into the list, set or object under the items.
    fn extend(&mut self, items: Vec<Id>) -> Result<(), String> {
        let target = *self.stack.last().ok_or("APPENDS on an empty stack")?;
        match &mut self.values[target] {
            Value::List(v) | Value::Set(v) => v.extend(items),
            Value::Object { list, .. } => list.extend(items),
            _ => return Err("APPENDS to a value that is not a list".into()),
        }
        Ok(())
    }

    /// `SETITEM(S)` into the dict or object under the items.
    fn set_items(&mut self, pairs: Vec<(Id, Id)>) -> Result<(), String> {
        let target = *self.stack.last().ok_or("SETITEMS on an empty stack")?;
        match &mut self.values[target] {
            Value::Dict(d) => d.extend(pairs),
            Value::Object { items, .. } => items.extend(pairs),
            _ => return Err("SETITEMS to a value that is not a dict".into()),
        }
        Ok(())
    }

    fn put(&mut self, i: u64) -> Result<(), String> {
        let top = *self.stack.last().ok_or("memoising from an empty stack")?;
        self.memo.insert(i, top);
        Ok(())
    }

    fn get(&mut self, i: u64) -> Result<(), String> {
        let id = *self.memo.get(&i).ok_or(format!("memo entry {i} not set"))?;
        self.stack.push(id);
        Ok(())
    }

    fn add(&mut self, value: Value) -> Id {
        self.values.push(value);
        self.values.len() - 1
    }

    fn push(&mut self, value: Value) {
        let id = self.add(value);
        self.stack.push(id);
    }

    fn pop(&mut self) -> Result<Id, String> {
        if self.marks.last() == Some(&self.stack.len()) {
            return Err("a value expected where a mark is".into());
        }
        self.stack.pop().ok_or_else(|| "the stack is empty".into())
    }

    /// The values above the topmost mark, which is removed.
    fn pop_mark(&mut self) -> Result<Vec<Id>, String> {
        let m = self.marks.pop().ok_or("no mark on the stack")?;
        Ok(self.stack.split_off(m))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.data.len())
            .ok_or_else(|| format!("an argument of {n} bytes passes the end"))?;
        let bytes = &self.data[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    fn len4(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.array()?) as usize)
    }

    fn len8(&mut self) -> Result<usize, String> {
        usize::try_from(u64::from_le_bytes(self.array()?)).map_err(|_| "a length past 2^64".into())
    }

    /// Text of `n` bytes. Python writes lone surrogates in it (`surrogatepass`: a path decoded
    /// by `os.fsdecode`), which are not UTF-8: they read as U+FFFD, as no name of a tensor
    /// holds one.
    fn utf8(&mut self, n: usize) -> Result<String, String> {
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }

    /// A newline-ended argument of protocol 0, without its newline.
    fn line_bytes(&mut self) -> Result<&'a [u8], String> {
        let rest = &self.data[self.pos..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or("a text argument without its newline")?;
        self.pos += n + 1;
        Ok(&rest[..n])
    }

    /// [`Self::line_bytes`], in UTF-8.
    fn line(&mut self) -> Result<&'a str, String> {
        std::str::from_utf8(self.line_bytes()?).map_err(|_| "a text argument not in UTF-8".into())
    }
}

/// `LONG1`/`LONG4`'s little-endian two's-complement bytes.
fn long(bytes: &[u8]) -> Value {
    if bytes.len() > 8 {
        return Value::BigInt(bytes.to_vec());
    }
    let fill = if bytes.last().is_some_and(|&b| b & 0x80 != 0) {
        0xff
    } else {
        0
    };
    let mut b = [fill; 8];
    b[..bytes.len()].copy_from_slice(bytes);
    Value::Int(i64::from_le_bytes(b))
}

/// A decimal integer of protocol 0's `LONG` too long for 64 bits, as `LONG1` would hold it.
fn decimal(text: &str) -> Option<Value> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, text),
    };
    // CPython's own limit on decimal integer text (`sys.int_info.default_max_str_digits`);
    // the conversion takes time quadratic in the digits.
    if digits.is_empty() || digits.len() > 4300 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // The magnitude, little-endian, times ten plus each digit.
    let mut le: Vec<u8> = vec![0];
    for d in digits.bytes() {
        let mut carry = (d - b'0') as u32;
        for b in le.iter_mut() {
            let x = *b as u32 * 10 + carry;
            *b = x as u8;
            carry = x >> 8;
        }
        if carry > 0 {
            le.push(carry as u8);
        }
    }
    // Room for the sign bit, then two's complement for a negative number.
    if le.last().is_some_and(|&b| b & 0x80 != 0) {
        le.push(0);
    }
    if negative {
        let mut carry = 1u16;
        for b in le.iter_mut() {
            let x = (!*b) as u16 + carry;
            *b = x as u8;
            carry = x >> 8;
        }
    }
    Some(long(&le))
}

/// Keys and values taken in turn.
fn pairs(items: &[Id]) -> Result<Vec<(Id, Id)>, String> {
    if items.len() % 2 == 1 {
        return Err("a key without its value".into());
    }
    Ok(items.chunks(2).map(|p| (p[0], p[1])).collect())
}

/// Protocol 0's `STRING` argument: a quoted Python 2 string literal with backslash escapes.
fn unquote(s: &str) -> Result<String, String> {
    let s = s.trim_end();
    let inner = ["'", "\""]
        .iter()
        .find_map(|q| s.strip_prefix(q).and_then(|r| r.strip_suffix(q)))
        .ok_or_else(|| format!("STRING `{s}` is not quoted"))?;
    let mut out = Vec::new();
    let mut bytes = inner.bytes();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'r') => out.push(b'\r'),
            Some(b'x') => {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                let v = std::str::from_utf8(&hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| format!("STRING `{s}`: a bad \\x escape"))?;
                out.push(v);
            }
            Some(c) => out.push(c),
            None => out.push(b'\\'),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Protocol 0's `UNICODE` argument, in raw-unicode-escape: `\uXXXX` and `\UXXXXXXXX`.
fn unescape_unicode(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let n = match after.chars().next() {
            Some('u') => 4,
            Some('U') => 8,
            _ => 0,
        };
        let code = after
            .get(1..1 + n)
            .and_then(|h| u32::from_str_radix(h, 16).ok())
            .and_then(char::from_u32);
        match code {
            Some(c) if n > 0 => {
                out.push(c);
                rest = &after[1 + n..];
            }
            _ => {
                out.push('\\');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A value as Python prints it, sets of protocols < 4 (`set([...])` calls) included.
    fn show(p: &Pickle, id: Id) -> String {
        let list = |v: &[Id]| v.iter().map(|&x| show(p, x)).collect::<Vec<_>>().join(", ");
        match p.get(id) {
            Value::Int(i) => i.to_string(),
            Value::BigInt(b) => format!("<int {b:02x?}>"),
            Value::Str(s) => format!("'{s}'"),
            Value::Tuple(v) => format!("({})", list(v)),
            Value::List(v) => format!("[{}]", list(v)),
            Value::Set(v) => format!("{{{}}}", list(v)),
            Value::Dict(d) => {
                let e: Vec<_> = d
                    .iter()
                    .map(|&(k, v)| format!("{}: {}", show(p, k), show(p, v)))
                    .collect();
                format!("{{{}}}", e.join(", "))
            }
            Value::Object { class, args, .. } if p.global(*class).map(|g| g.1) == Some("set") => {
                match p.get(*args) {
                    Value::Tuple(a) => match p.get(a[0]) {
                        Value::List(items) => format!("{{{}}}", list(items)),
                        _ => "?".into(),
                    },
                    _ => "?".into(),
                }
            }
            _ => p.describe(id),
        }
    }

    fn run(pickle: &[u8]) -> Result<Pickle, String> {
        let mut at = 0;
        let p = unpickle(pickle, &mut at)?;
        assert_eq!(at, pickle.len(), "STOP ends the pickle");
        Ok(p)
    }

    /// `pickle.dumps(obj, protocol=N)` of CPython 3 for N = 0…5, where obj = {'x': [1, -2,
    /// 3.5, 'é', (True, None)], 'big': 2**70, 'neg': -(2**70), 'i': 2**40, 'od':
    /// OrderedDict([('k', 1)]), 's': {7}}: every protocol reads back the same value.
    #[test]
    fn every_protocol_reads_back_what_cpython_pickled() {
        let want = "{'x': [1, -2, 3.5, 'é', (True, None)], \
                    'big': <int [00, 00, 00, 00, 00, 00, 00, 00, 40]>, \
                    'neg': <int [00, 00, 00, 00, 00, 00, 00, 00, c0]>, 'i': 1099511627776, \
                    'od': {'k': 1}, 's': {7}}";
        for (proto, pickle) in [
            b"(dp0\x0aVx\x0ap1\x0a(lp2\x0aI1\x0aaI-2\x0aaF3.5\x0aaV\xe9\x0ap3\x0aa(I01\x0aNtp4\x0aasVbig\x0ap5\x0aL1180591620717411303424L\x0asVneg\x0ap6\x0aL-1180591620717411303424L\x0asVi\x0ap7\x0aL1099511627776L\x0asVod\x0ap8\x0accollections\x0aOrderedDict\x0ap9\x0a(tRp10\x0aVk\x0ap11\x0aI1\x0assVs\x0ap12\x0ac__builtin__\x0aset\x0ap13\x0a((lp14\x0aI7\x0aatp15\x0aRp16\x0as.".as_slice(),
            b"\x7dq\x00(X\x01\x00\x00\x00xq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00X\x02\x00\x00\x00\xc3\xa9q\x03(I01\x0aNtq\x04eX\x03\x00\x00\x00bigq\x05L1180591620717411303424L\x0aX\x03\x00\x00\x00negq\x06L-1180591620717411303424L\x0aX\x01\x00\x00\x00iq\x07L1099511627776L\x0aX\x02\x00\x00\x00odq\x08ccollections\x0aOrderedDict\x0aq\x09)Rq\x0aX\x01\x00\x00\x00kq\x0bK\x01sX\x01\x00\x00\x00sq\x0cc__builtin__\x0aset\x0aq\x0d(]q\x0eK\x07atq\x0fRq\x10u.".as_slice(),
            b"\x80\x02\x7dq\x00(X\x01\x00\x00\x00xq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00X\x02\x00\x00\x00\xc3\xa9q\x03\x88N\x86q\x04eX\x03\x00\x00\x00bigq\x05\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00@X\x03\x00\x00\x00negq\x06\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\xc0X\x01\x00\x00\x00iq\x07\x8a\x06\x00\x00\x00\x00\x00\x01X\x02\x00\x00\x00odq\x08ccollections\x0aOrderedDict\x0aq\x09)Rq\x0aX\x01\x00\x00\x00kq\x0bK\x01sX\x01\x00\x00\x00sq\x0cc__builtin__\x0aset\x0aq\x0d]q\x0eK\x07a\x85q\x0fRq\x10u.".as_slice(),
            b"\x80\x03\x7dq\x00(X\x01\x00\x00\x00xq\x01]q\x02(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00X\x02\x00\x00\x00\xc3\xa9q\x03\x88N\x86q\x04eX\x03\x00\x00\x00bigq\x05\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00@X\x03\x00\x00\x00negq\x06\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\xc0X\x01\x00\x00\x00iq\x07\x8a\x06\x00\x00\x00\x00\x00\x01X\x02\x00\x00\x00odq\x08ccollections\x0aOrderedDict\x0aq\x09)Rq\x0aX\x01\x00\x00\x00kq\x0bK\x01sX\x01\x00\x00\x00sq\x0ccbuiltins\x0aset\x0aq\x0d]q\x0eK\x07a\x85q\x0fRq\x10u.".as_slice(),
            b"\x80\x04\x95\x8b\x00\x00\x00\x00\x00\x00\x00\x7d\x94(\x8c\x01x\x94]\x94(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00\x8c\x02\xc3\xa9\x94\x88N\x86\x94e\x8c\x03big\x94\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00@\x8c\x03neg\x94\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\xc0\x8c\x01i\x94\x8a\x06\x00\x00\x00\x00\x00\x01\x8c\x02od\x94\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94\x8c\x01k\x94K\x01s\x8c\x01s\x94\x8f\x94(K\x07\x90u.".as_slice(),
            b"\x80\x05\x95\x8b\x00\x00\x00\x00\x00\x00\x00\x7d\x94(\x8c\x01x\x94]\x94(K\x01J\xfe\xff\xff\xffG@\x0c\x00\x00\x00\x00\x00\x00\x8c\x02\xc3\xa9\x94\x88N\x86\x94e\x8c\x03big\x94\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00@\x8c\x03neg\x94\x8a\x09\x00\x00\x00\x00\x00\x00\x00\x00\xc0\x8c\x01i\x94\x8a\x06\x00\x00\x00\x00\x00\x01\x8c\x02od\x94\x8c\x0bcollections\x94\x8c\x0bOrderedDict\x94\x93\x94)R\x94\x8c\x01k\x94K\x01s\x8c\x01s\x94\x8f\x94(K\x07\x90u.".as_slice(),
        ]
        .into_iter()
        .enumerate()
        {
            let p = run(pickle).unwrap_or_else(|e| panic!("protocol {proto}: {e}"));
            assert_eq!(show(&p, p.root), want, "protocol {proto}");
        }
    }

    /// A dict referenced twice (`d = {'w': 1}; pickle.dumps({'a': d, 'b': d}, protocol=2)`)
    /// is the same filled dict at both places; pickle memoises it before filling it.
    #[test]
    fn a_value_referenced_twice_is_the_same_value() {
        let p = run(
            b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01}q\x02X\x01\x00\x00\x00wq\x03K\x01s\
                     X\x01\x00\x00\x00bq\x04h\x02u.",
        )
        .unwrap();
        assert_eq!(show(&p, p.root), "{'a': {'w': 1}, 'b': {'w': 1}}");
        assert_eq!(p.lookup(p.root, "a"), p.lookup(p.root, "b"));
    }

    /// Persistent ids (a `persistent_id` returning ('storage', 'k0')) under protocols 2 and 4,
    /// bytes of protocol 5, and the magic number of a legacy PyTorch file under protocols 0
    /// and 4.
    #[test]
    fn persistent_ids_bytes_and_long_integers() {
        for pickle in [
            b"\x80\x02}q\x00X\x01\x00\x00\x00tq\x01X\x07\x00\x00\x00storageq\x02X\x02\x00\x00\x00k0q\x03\
              \x86q\x04Qs."
                .as_slice(),
            b"\x80\x04\x95\x1a\x00\x00\x00\x00\x00\x00\x00}\x94\x8c\x01t\x94\x8c\x07storage\x94\x8c\x02k0\
              \x94\x86\x94Qs.",
        ] {
            let p = run(pickle).unwrap();
            let t = p.lookup(p.root, "t").unwrap();
            let Value::Persistent(id) = p.get(t) else {
                panic!("{}", p.describe(t))
            };
            assert_eq!(show(&p, *id), "('storage', 'k0')");
        }
        let p = run(
            b"\x80\x05\x95\x17\x00\x00\x00\x00\x00\x00\x00]\x94(C\x02ab\x94\x96\x03\x00\x00\x00\
                     \x00\x00\x00\x00xyz\x94e.",
        )
        .unwrap();
        assert_eq!(p.describe(p.root), "[<2 bytes>, <3 bytes>]");
        let magic = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
        for pickle in [
            b"L119547037146038801333356L\n.".as_slice(),
            b"\x80\x04\x95\x0d\x00\x00\x00\x00\x00\x00\x00\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.",
        ] {
            let p = run(pickle).unwrap();
            assert_eq!(p.get(p.root), &Value::BigInt(magic.to_vec()));
        }
    }

    /// What a pickle builds is linear in its length: 60 references that would double a copied
    /// value each time, and nesting a million deep, are read and dropped without recursion.
    #[test]
    fn memo_bombs_and_deep_nesting_stay_linear() {
        let bomb = [
            b"\x80\x02Nq\x00".as_slice(),
            &b"h\x00h\x00\x86q\x00".repeat(60),
            b".",
        ]
        .concat();
        let p = run(&bomb).unwrap();
        assert_eq!(p.values.len(), 61);
        let deep = [b"\x80\x02N".as_slice(), &[0x85; 1_000_000], b"."].concat();
        let p = run(&deep).unwrap();
        assert_eq!(p.values.len(), 1_000_001);
        assert!(
            p.describe(p.root).starts_with("(((…"),
            "{}",
            p.describe(p.root)
        );
    }

    /// What Python 2 pickled differently: an `OrderedDict` with its items in the call's
    /// arguments (Python 2.7's `__reduce__`; CPython 3 reads these bytes as OrderedDict([('k',
    /// 1)])), and text with a lone surrogate (`pickle.dumps('a\\udcff', 2)`), read lossily.
    #[test]
    fn python_2_ordered_dicts_and_lone_surrogates() {
        let p = run(
            b"\x80\x02ccollections\nOrderedDict\nq\x00]q\x01]q\x02(X\x01\x00\x00\x00kK\x01e\
                     a\x85Rq\x03.",
        )
        .unwrap();
        assert_eq!(show(&p, p.root), "{'k': 1}");
        let p = run(b"\x80\x02X\x04\x00\x00\x00a\xed\xb3\xbfq\x00.").unwrap();
        assert!(p.str(p.root).unwrap().starts_with("a\u{fffd}"));
    }

    /// Naming a class with a memoised megabyte-long name 100,000 times adds a value each time,
    /// not a copy of the name (100 GB); a decimal integer of more digits than CPython reads
    /// (4,300) is refused rather than converted in quadratic time.
    #[test]
    fn long_names_and_long_integers_stay_linear() {
        let name = vec![b'm'; 1 << 20];
        let mut pickle = b"\x80\x04X".to_vec();
        pickle.extend_from_slice(&(name.len() as u32).to_le_bytes());
        pickle.extend_from_slice(&name);
        pickle.extend_from_slice(b"\x94\x8c\x01a\x94");
        pickle.extend_from_slice(&b"h\x00h\x01\x930".repeat(100_000));
        pickle.extend_from_slice(b"N.");
        let p = run(&pickle).unwrap();
        assert_eq!(p.values.len(), 2 + 100_000 + 1);
        let long = [b"L".as_slice(), &[b'9'; 4301], b"L\n."].concat();
        assert!(run(&long).unwrap_err().contains("LONG `999"));
        let ok = [b"L".as_slice(), &[b'9'; 4300], b"L\n."].concat();
        assert!(matches!(run(&ok).unwrap().get(0), Value::BigInt(b) if b.len() == 1786));
    }

    /// Damaged pickles are errors naming the opcode and its byte.
    #[test]
    fn damaged_pickles_are_errors_naming_the_byte() {
        for (pickle, what) in [
            (
                b"\x80\x02X\xff\xff\xff\x7fab.".as_slice(),
                "passes the end (opcode 0x58 at byte 2)",
            ),
            (
                b"\x80\x02h\x05.",
                "memo entry 5 not set (opcode 0x68 at byte 2)",
            ),
            (b"\x80\x02N(s.", "a value expected where a mark is"),
            (b"\x80\x02K\x01K\x02u.", "no mark on the stack"),
            (b"\x80\x02(K\x01d.", "a key without its value"),
            (
                b"\x80\x02K\x01K\x02K\x03s.",
                "SETITEMS to a value that is not a dict",
            ),
            (b"\x80\x06N.", "pickle protocol 6"),
            (
                b"\x80\x02\xff",
                "not a pickle opcode (opcode 0xff at byte 2)",
            ),
            (b"\x80\x02.", "the stack is empty (opcode 0x2e at byte 2)"),
            (b"\x80\x02N", "no STOP before the end"),
        ] {
            let e = run(pickle).unwrap_err();
            assert!(e.contains(what), "{e}");
        }
    }
}
