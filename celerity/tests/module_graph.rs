//! The layering rule inside each library crate: the modules of broker/, client/, worker/ and beat/
//! import each other without a cycle, so each file can be read knowing only what it imports.
//!
//! A module is a source file (`redis/consumer.rs` is `redis::consumer`, a `mod.rs` is its folder's
//! module). An edge A → B is any `use crate::…`/`use super::…` or inline `crate::…` path in A's code
//! (comments and the `#[cfg(test)]` module excluded) that names B or an item B defines; a path to
//! a name the crate root re-exports counts as an edge to the module it comes from. A module's edges
//! to its own submodules (declaring and re-exporting them) are structure, not imports, and are left
//! out; a submodule using its parent is an edge like any other.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// Module path (`["redis", "consumer"]`; the root is `[]`) → its code.
type Sources = BTreeMap<Vec<String>, String>;

fn read_sources(src: &Path) -> Sources {
    let mut out = Sources::new();
    let mut stack = vec![src.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                out.insert(module_of(src, &path), code_only(&text));
            }
        }
    }
    out
}

fn module_of(src: &Path, file: &Path) -> Vec<String> {
    let rel: PathBuf = file.strip_prefix(src).unwrap_or(file).with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its unit-test module.
fn code_only(text: &str) -> String {
    let mut out = String::new();
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        let t = line.trim_start();
        if t.starts_with("#[cfg(test)]")
            && lines
                .peek()
                .is_some_and(|n| n.trim_start().starts_with("mod tests"))
        {
            break;
        }
        if t.starts_with("//") {
            continue;
        }
        out.push_str(line.split(" //").next().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Every `use` tree in `code`, expanded to single paths (`a::{b, c::d}` → `a::b`, `a::c::d`).
fn use_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("use ") {
        let before_ok = i == 0
            || rest[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_whitespace() || c == '(' || c == ')');
        let tail = &rest[i + 4..];
        let Some(end) = tail.find(';') else { break };
        if before_ok {
            let tree: String = tail[..end].chars().filter(|c| !c.is_whitespace()).collect();
            expand("", &tree, &mut out);
        }
        rest = &tail[end..];
    }
    out
}

fn expand(prefix: &str, tree: &str, out: &mut Vec<String>) {
    match tree.find('{') {
        None => out.push(format!("{prefix}{tree}")),
        Some(open) => {
            let head = &tree[..open];
            let inner = tree[open + 1..]
                .strip_suffix('}')
                .unwrap_or(&tree[open + 1..]);
            let mut depth = 0;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        expand(&format!("{prefix}{head}"), &inner[start..i], out);
                        start = i + 1;
                    }
                    _ => {}
                }
            }
            if start < inner.len() {
                expand(&format!("{prefix}{head}"), &inner[start..], out);
            }
        }
    }
}

/// Inline `crate::a::b` paths in code.
fn inline_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        if code[..i]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_alphanumeric() || c == '_')
        {
            continue; // e.g. `celerity_broker::…` is another crate
        }
        let p: String = code[i..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        out.push(p);
    }
    out
}

/// The module a path points into, seen from module `from`.
fn target(
    from: &[String],
    is_mod_rs: bool,
    path: &str,
    modules: &BTreeSet<Vec<String>>,
    root_names: &HashMap<String, Vec<String>>,
) -> Option<Vec<String>> {
    let mut segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
    // The module a `mod.rs` is in is its folder's; `super` from `a/b.rs` is `a`.
    let mut base: Vec<String> = match segs.first().copied()? {
        "crate" => {
            segs.remove(0);
            Vec::new()
        }
        "super" | "self" => {
            let mut b = from.to_vec();
            if segs[0] == "super" && !is_mod_rs {
                b.pop();
            }
            segs.remove(0);
            while segs.first() == Some(&"super") {
                b.pop();
                segs.remove(0);
            }
            b
        }
        _ => return None,
    };
    if base.is_empty() {
        if let Some(first) = segs.first() {
            if !modules.contains(&vec![first.to_string()]) {
                return root_names.get(*first).cloned();
            }
        }
    }
    for s in segs {
        let mut next = base.clone();
        next.push(s.to_owned());
        if !modules.contains(&next) {
            break;
        }
        base = next;
    }
    Some(base)
}

/// Names the crate root re-exports (`pub use a::b::Name`) → the module they come from.
fn root_reexports(root: &str, modules: &BTreeSet<Vec<String>>) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    for p in use_paths(root) {
        let segs: Vec<&str> = p.split("::").collect();
        let Some((name, path)) = segs.split_last() else {
            continue;
        };
        let module: Vec<String> = path
            .iter()
            .filter(|s| **s != "crate" && **s != "self")
            .map(|s| s.to_string())
            .collect();
        if modules.contains(&module) {
            out.insert(
                name.split(" as ").next().unwrap_or(name).to_string(),
                module,
            );
        }
    }
    out
}

fn graph(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let sources = read_sources(src);
    let modules: BTreeSet<Vec<String>> = sources.keys().cloned().collect();
    let root_names = root_reexports(
        sources.get(&Vec::new()).map_or("", String::as_str),
        &modules,
    );
    let mut edges = BTreeMap::new();
    for (m, code) in &sources {
        let is_mod_rs = m.is_empty() || {
            let dir = m.iter().fold(src.to_path_buf(), |p, s| p.join(s));
            dir.join("mod.rs").exists()
        };
        let mut to = BTreeSet::new();
        for p in use_paths(code).into_iter().chain(inline_paths(code)) {
            if let Some(t) = target(m, is_mod_rs, &p, &modules, &root_names) {
                // Not itself, nor one of its own submodules.
                if !t.starts_with(m) {
                    to.insert(t);
                }
            }
        }
        edges.insert(m.clone(), to);
    }
    edges
}

/// A cycle in `edges`, if there is one, as the list of modules around it.
fn find_cycle(edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Option<Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit(
        n: &Vec<String>,
        edges: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        marks: &mut HashMap<Vec<String>, Mark>,
        path: &mut Vec<Vec<String>>,
    ) -> Option<Vec<String>> {
        match marks.get(n) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let start = path.iter().position(|p| p == n).unwrap_or(0);
                let mut cycle: Vec<String> = path[start..].iter().map(|p| name(p)).collect();
                cycle.push(name(n));
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(n.clone(), Mark::Open);
        path.push(n.clone());
        for t in edges.get(n).into_iter().flatten() {
            if let Some(c) = visit(t, edges, marks, path) {
                return Some(c);
            }
        }
        path.pop();
        marks.insert(n.clone(), Mark::Done);
        None
    }
    let mut marks = HashMap::new();
    for n in edges.keys() {
        if let Some(c) = visit(n, edges, &mut marks, &mut Vec::new()) {
            return Some(c);
        }
    }
    None
}

fn name(m: &[String]) -> String {
    if m.is_empty() {
        "crate".into()
    } else {
        m.join("::")
    }
}

fn crate_src(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(name)
        .join("src")
}

fn assert_acyclic(krate: &str) {
    let edges = graph(&crate_src(krate));
    assert!(edges.len() > 3, "{krate}: no modules found");
    if let Some(cycle) = find_cycle(&edges) {
        panic!(
            "{krate}/src: modules import each other in a cycle: {}",
            cycle.join(" -> ")
        );
    }
}

#[test]
fn broker_modules_have_no_import_cycle() {
    assert_acyclic("broker");
}

#[test]
fn client_modules_have_no_import_cycle() {
    assert_acyclic("client");
}

#[test]
fn worker_modules_have_no_import_cycle() {
    assert_acyclic("worker");
}

#[test]
fn beat_modules_have_no_import_cycle() {
    assert_acyclic("beat");
}

#[test]
fn a_cycle_is_found() {
    let v = |s: &str| s.split("::").map(str::to_owned).collect::<Vec<_>>();
    let mut edges = BTreeMap::new();
    edges.insert(v("a"), BTreeSet::from([v("b")]));
    edges.insert(v("b"), BTreeSet::from([v("c")]));
    edges.insert(v("c"), BTreeSet::from([v("a")]));
    assert_eq!(
        find_cycle(&edges).map(|c| c.join(" ")),
        Some("a b c a".into())
    );
    edges.insert(v("c"), BTreeSet::new());
    assert_eq!(find_cycle(&edges), None);
}

#[test]
fn use_trees_expand() {
    let code = "use crate::{a::X, b::{c::Y, Z}};\nuse super::d;\n";
    assert_eq!(
        use_paths(code),
        ["crate::a::X", "crate::b::c::Y", "crate::b::Z", "super::d"]
    );
}
