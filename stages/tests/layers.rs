//! The architecture, checked: the stages crate's modules depend on each other only downwards
//! through its layers, the stage kinds never import one another, no modules of the stages or
//! engine crates form an import cycle, and no function of the workspace's crates (datasets,
//! engine, stages, pipeline; their tests aside) is longer than [`MAX_FN_LINES`] lines. (The crate boundaries datasets → engine →
//! stages → pipeline are enforced by Cargo itself: a crate cannot name one that does not list it
//! as a dependency.)
//!
//! The check reads the sources: every path that starts with `crate::`, `super::` or `self::`
//! (in `use` trees and in code) is an edge from the file's module to the deepest module the path
//! names. Edges to a module's own ancestors or descendants (a folder module and its files) are
//! containment, not imports, and `#[cfg(test)]` modules are left out: tests may reach across
//! layers. `cargo test -p stages --test layers -- --nocapture` prints the module graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The longest function allowed outside tests.
const MAX_FN_LINES: usize = 100;

/// The stages crate's layers, lowest first: a module may import its own layer and those below.
const LAYERS: &[(&str, usize)] = &[
    ("error", 0),
    ("params", 0),
    ("progress", 0),
    ("label_store", 1),
    ("stream", 1),
    ("replay_store", 1),
    ("science", 2),
    ("artifacts", 3),
    ("context", 4),
    ("kinds", 5),
    ("registry", 6),
];

/// Source text with comments, string and character literals blanked out (newlines kept), so
/// that neither a doc comment's `crate::x` nor a brace inside a string is taken for code.
fn strip(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let c = b[i];
        let next = b.get(i + 1).copied().unwrap_or(0);
        if c == b'/' && next == b'/' {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && next == b'*' {
            let mut depth = 0;
            loop {
                if i + 1 < b.len() && b[i] == b'/' && b[i + 1] == b'*' {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if i + 1 < b.len() && b[i] == b'*' && b[i + 1] == b'/' {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                } else {
                    break;
                }
            }
        } else if (c == b'r' || (c == b'b' && next == b'r'))
            && !b[..i]
                .last()
                .is_some_and(|p| p.is_ascii_alphanumeric() || *p == b'_')
            && raw_string_start(&b[i..]).is_some()
        {
            let (skip, hashes) = raw_string_start(&b[i..]).expect("checked");
            out.extend(std::iter::repeat_n(b' ', skip));
            i += skip;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while i < b.len() && !b[i..].starts_with(&close) {
                blank(&mut out, b[i]);
                i += 1;
            }
            out.extend(std::iter::repeat_n(b' ', close.len().min(b.len() - i)));
            i += close.len();
        } else if c == b'"' {
            out.push(b' ');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b' ');
            i += 1;
        } else if c == b'\'' {
            // A character literal ('x', '\n', '\u{..}') or a lifetime ('a): only the former
            // closes with a quote within a few bytes.
            let end = if next == b'\\' {
                b[i + 2..]
                    .iter()
                    .position(|&x| x == b'\'')
                    .map(|p| i + 2 + p)
            } else {
                let len = std::str::from_utf8(&b[i + 1..])
                    .ok()
                    .and_then(|s| s.chars().next())
                    .map_or(1, char::len_utf8);
                (b.get(i + 1 + len) == Some(&b'\'')).then_some(i + 1 + len)
            };
            match end {
                Some(e) => {
                    out.extend(std::iter::repeat_n(b' ', e + 1 - i));
                    i = e + 1;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    String::from_utf8(out).expect("ASCII blanks keep UTF-8 intact")
}

/// `r"`, `r#"`, `br##"` …: the prefix length and the number of `#`.
fn raw_string_start(b: &[u8]) -> Option<(usize, usize)> {
    let mut i = if b.first() == Some(&b'b') { 1 } else { 0 };
    if b.get(i) != Some(&b'r') {
        return None;
    }
    i += 1;
    let hashes = b[i..].iter().take_while(|&&c| c == b'#').count();
    (b.get(i + hashes) == Some(&b'"')).then_some((i + hashes + 1, hashes))
}

/// The text with every `#[cfg(test)]` item (a test module or function) removed.
fn without_tests(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(at) = out.find("#[cfg(test)]") {
        let rest = &out[at..];
        let end = match (rest.find('{'), rest.find(';')) {
            (Some(open), semi) if semi.is_none_or(|s| s > open) => {
                at + open + matching_brace(&rest[open..])
            }
            (_, Some(semi)) => at + semi + 1,
            _ => out.len(),
        };
        let blanked: String = out[at..end]
            .chars()
            .map(|c| if c == '\n' { '\n' } else { ' ' })
            .collect();
        out.replace_range(at..end, &blanked);
    }
    out
}

/// The length in bytes of the balanced `{ … }` block `s` starts with.
fn matching_brace(s: &str) -> usize {
    let mut depth = 0usize;
    for (i, c) in s.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return i + 1;
                }
            }
            _ => {}
        }
    }
    s.len()
}

/// One source file: its module path (`kinds::train`, `` for lib.rs) and its stripped code.
struct Module {
    path: String,
    file: PathBuf,
    code: String,
}

fn module_path(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let mut parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if matches!(parts.last().map(String::as_str), Some("mod" | "lib")) {
        parts.pop();
    }
    parts.join("::")
}

fn modules(src: &Path) -> Vec<Module> {
    let mut files = Vec::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("readable source folder") {
            let p = entry.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|e| e == "rs")
                // A `tests.rs` file is a `#[cfg(test)] mod tests;`.
                && p.file_name().is_some_and(|f| f != "tests.rs")
            {
                files.push(p);
            }
        }
    }
    files.sort();
    files
        .into_iter()
        .map(|file| {
            let text = std::fs::read_to_string(&file).expect("readable source");
            Module {
                path: module_path(src, &file),
                code: without_tests(&strip(&text)),
                file,
            }
        })
        .collect()
}

fn is_ident(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// Every path named in `code` that starts with `crate`, `super` or `self`, as segments
/// (use-tree groups expanded: `crate::{a, b::c}` gives `crate::a` and `crate::b::c`).
fn paths(code: &str) -> Vec<Vec<String>> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let starts_word = i == 0 || !is_ident(chars[i - 1]);
        let word: String = chars[i..].iter().take_while(|c| is_ident(**c)).collect();
        if starts_word && matches!(word.as_str(), "crate" | "super" | "self") {
            let (tree, used) = use_tree(&chars[i..]);
            out.extend(tree);
            i += used.max(1);
        } else {
            i += word.len().max(1);
        }
    }
    out.retain(|p| p.len() > 1 || p[0] == "crate");
    out
}

fn skip_space(s: &[char], mut i: usize) -> usize {
    while i < s.len() && s[i].is_whitespace() {
        i += 1;
    }
    i
}

/// Parses `a::b::{c, d::e}` at the start of `s`: the expanded paths and the characters used.
fn use_tree(s: &[char]) -> (Vec<Vec<String>>, usize) {
    let mut prefix = Vec::new();
    let mut i = skip_space(s, 0);
    loop {
        let word: String = s[i..].iter().take_while(|c| is_ident(**c)).collect();
        if word.is_empty() {
            break;
        }
        prefix.push(word.clone());
        i = skip_space(s, i + word.chars().count());
        if s.get(i) == Some(&':') && s.get(i + 1) == Some(&':') {
            i = skip_space(s, i + 2);
            if s.get(i) == Some(&'{') {
                let mut all = Vec::new();
                i += 1;
                loop {
                    i = skip_space(s, i);
                    if s.get(i) == Some(&'}') || i >= s.len() {
                        i += 1;
                        break;
                    }
                    let (sub, used) = use_tree(&s[i..]);
                    for p in sub {
                        let mut full = prefix.clone();
                        full.extend(p.into_iter().filter(|seg| seg != "self"));
                        all.push(full);
                    }
                    i = skip_space(s, i + used.max(1));
                    if s.get(i) == Some(&',') {
                        i += 1;
                    }
                }
                return (all, i);
            }
        } else {
            break;
        }
    }
    if prefix.is_empty() {
        return (Vec::new(), i);
    }
    (vec![prefix], i)
}

/// The module a path names from module `from` (in file `file`): the deepest known module
/// among its prefixes, resolving `crate`, `super` and `self`.
fn target(
    known: &BTreeSet<String>,
    from: &str,
    is_folder_file: bool,
    p: &[String],
) -> Option<String> {
    let mut base: Vec<&str> = if from.is_empty() {
        Vec::new()
    } else {
        from.split("::").collect()
    };
    let mut rest = p;
    match p[0].as_str() {
        "crate" => {
            base.clear();
            rest = &p[1..];
        }
        "self" => rest = &p[1..],
        "super" => {
            // `super` of a module is its parent, whether it is a file or a folder's mod.rs.
            let _ = is_folder_file;
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
        }
        _ => {}
    }
    let mut best = None;
    let mut cur: Vec<String> = base.iter().map(|s| s.to_string()).collect();
    if known.contains(&cur.join("::")) {
        best = Some(cur.join("::"));
    }
    for seg in rest {
        cur.push(seg.clone());
        let name = cur.join("::");
        if known.contains(&name) {
            best = Some(name);
        } else {
            break;
        }
    }
    best
}

fn related(a: &str, b: &str) -> bool {
    let inside = |outer: &str, inner: &str| {
        outer.is_empty() || inner == outer || inner.starts_with(&format!("{outer}::"))
    };
    inside(a, b) || inside(b, a)
}

/// Module → the modules it imports (containment edges left out).
fn graph(mods: &[Module]) -> BTreeMap<String, BTreeSet<String>> {
    let known: BTreeSet<String> = mods.iter().map(|m| m.path.clone()).collect();
    let mut g = BTreeMap::new();
    for m in mods {
        let folder_file = m.file.file_name().is_some_and(|f| f == "mod.rs");
        let edges: BTreeSet<String> = paths(&m.code)
            .iter()
            .filter_map(|p| target(&known, &m.path, folder_file, p))
            .filter(|t| !related(&m.path, t))
            .collect();
        g.insert(m.path.clone(), edges);
    }
    g
}

/// Strongly connected components of more than one module (Tarjan), each sorted.
fn cycles(g: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on.insert(v);
        for w in &s.g[v] {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next().unwrap_or_default();
    LAYERS.iter().find(|(n, _)| *n == top).map(|&(_, l)| l)
}

/// The stage kind a module belongs to (`kinds::train::epoch` → `train`).
fn kind_of(module: &str) -> Option<&str> {
    module.strip_prefix("kinds::")?.split("::").next()
}

fn print_graph(name: &str, g: &BTreeMap<String, BTreeSet<String>>) {
    println!("== {name}: {} modules", g.len());
    for (m, edges) in g {
        let shown = if m.is_empty() { "(crate root)" } else { m };
        let list: Vec<&str> = edges.iter().map(String::as_str).collect();
        println!("{shown} -> {}", list.join(", "));
    }
}

/// Functions of `code` longer than `max` lines: (name, first line, lines).
fn long_functions(code: &str, max: usize) -> Vec<(String, usize, usize)> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let mut at = 0;
    while let Some(p) = code[at..].find("fn ") {
        let start = at + p;
        at = start + 3;
        if start > 0 && is_ident(bytes[start - 1] as char) {
            continue;
        }
        let name: String = code[at..].chars().take_while(|c| is_ident(*c)).collect();
        if name.is_empty() {
            continue;
        }
        let rest = &code[at..];
        let (Some(open), semi) = (rest.find('{'), rest.find(';')) else {
            continue;
        };
        if semi.is_some_and(|s| s < open) {
            continue;
        }
        let body = &rest[open..open + matching_brace(&rest[open..])];
        let first = code[..start].matches('\n').count() + 1;
        let lines = code[start..at + open].matches('\n').count() + body.matches('\n').count() + 1;
        if lines > max {
            out.push((name, first, lines));
        }
    }
    out
}

fn crate_src(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

#[test]
fn no_import_cycles_in_the_stages_and_engine_crates() {
    let mut found = Vec::new();
    for (name, src) in [("stages", "src"), ("engine", "engine/src")] {
        let g = graph(&modules(&crate_src(src)));
        print_graph(name, &g);
        for c in cycles(&g) {
            found.push(format!("{name}: {}", c.join(" ↔ ")));
        }
    }
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

#[test]
fn modules_import_only_their_own_layer_and_those_below() {
    let g = graph(&modules(&crate_src("src")));
    let mut wrong = Vec::new();
    for (m, edges) in &g {
        let Some(from) = layer_of(m) else { continue };
        for t in edges {
            match (layer_of(t), kind_of(m), kind_of(t)) {
                (_, Some(a), Some(b)) if a != b => wrong.push(format!(
                    "{m} imports {t}: stage kinds never import each other"
                )),
                (Some(to), _, _) if to > from => {
                    wrong.push(format!("{m} (layer {from}) imports {t} (layer {to})"))
                }
                _ => {}
            }
        }
    }
    let unlayered: Vec<&String> = g
        .keys()
        .filter(|m| !m.is_empty() && layer_of(m).is_none())
        .collect();
    assert!(
        unlayered.is_empty(),
        "modules outside the layers of LAYERS: {unlayered:?}"
    );
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn no_function_outside_tests_is_longer_than_the_limit() {
    let files: Vec<PathBuf> = ["src", "engine/src", "../datasets/src", "../pipeline/src"]
        .into_iter()
        .flat_map(|src| modules(&crate_src(src)))
        .map(|m| m.file)
        .collect();
    let mut long = Vec::new();
    for f in &files {
        let code = without_tests(&strip(&std::fs::read_to_string(f).expect("readable")));
        for (name, line, n) in long_functions(&code, MAX_FN_LINES) {
            long.push(format!("{}:{line}: fn {name}: {n} lines", f.display()));
        }
    }
    assert!(
        long.is_empty(),
        "functions over {MAX_FN_LINES} lines:\n{}",
        long.join("\n")
    );
}

/// The checker itself: it must see a cycle, a layer violation and a long function where there
/// is one, and nothing in comments or strings.
#[test]
fn the_checker_finds_what_it_looks_for() {
    let dir = std::env::temp_dir().join(format!("ldl-layers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("kinds")).expect("scratch");
    let files = [
        ("lib.rs", "pub mod error; pub mod science; pub mod kinds;"),
        (
            "error.rs",
            "// crate::kinds::a is only a comment\nconst S: &str = \"crate::kinds::b\";",
        ),
        ("science.rs", "use crate::{error, kinds::a::Thing};"),
        ("kinds/mod.rs", "pub mod a; pub mod b;"),
        ("kinds/a.rs", "use super::b::Other; pub struct Thing;"),
        (
            "kinds/b.rs",
            "pub struct Other; fn f() -> crate::science::X { todo!() }",
        ),
    ];
    for (name, text) in files {
        std::fs::write(dir.join(name), text).expect("write");
    }
    let g = graph(&modules(&dir));
    assert_eq!(
        g["error"],
        BTreeSet::new(),
        "comments and strings are not imports"
    );
    assert_eq!(
        g["science"],
        BTreeSet::from(["error".to_string(), "kinds::a".to_string()])
    );
    assert_eq!(g["kinds::a"], BTreeSet::from(["kinds::b".to_string()]));
    assert_eq!(
        cycles(&g),
        vec![vec![
            "kinds::a".to_string(),
            "kinds::b".to_string(),
            "science".to_string()
        ]]
    );
    let long = long_functions(
        &format!(
            "fn short() {{}}\nfn long() {{\n{}}}\n",
            "    x();\n".repeat(120)
        ),
        MAX_FN_LINES,
    );
    assert_eq!(long, vec![("long".to_string(), 2, 122)]);
    let _ = std::fs::remove_dir_all(&dir);
}
