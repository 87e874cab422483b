//! The shape of the house, checked (in the spirit of rust-analyzer's tidy
//! tests): this test reads `src/`, builds the import graph of its files
//! from `crate::` and `super::` paths, and fails on
//! - a file no layer below claims (every new file takes a place),
//! - an import that runs up the layers (a lower layer naming a higher one),
//! - a circle between files,
//! - a file over 800 lines, or one without its `//!` paragraph.
//!
//! The layers (ARCHITECTURE.md draws the same table):
//! 0. rules: the config model, routing, forwarding, target, error kinds,
//!    cache rules, balancing, limiter and detector math: no tokio, no
//!    network, no threads;
//! 1. runtime state built from a config: bodies, upstream groups and
//!    pools, cache store and flights, protection tables, observability
//!    sinks, TLS material, and the snapshot that owns them;
//! 2. the request path: the pipeline phases;
//! 3. serving: listeners, connections, TLS termination, endpoints, demo;
//! 4. `main.rs`.
//!
//! `cargo test --test architecture -- --nocapture` prints the graph's
//! size (files, arrows, arrows running upward, circles).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::too_many_lines,
    reason = "test code fails loudly, and a test table reads best whole"
)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Every file of `src/` by path prefix (the longest prefix wins).
const LAYERS: &[(&str, u8)] = &[
    // 0: rules
    ("config", 0),
    ("routing", 0),
    ("forwarding", 0),
    ("plan", 0),
    ("change", 0),
    ("target", 0),
    ("error", 0),
    ("secret", 0),
    ("cache/control", 0),
    ("cache/freshness", 0),
    ("cache/validators", 0),
    ("cache/vary", 0),
    ("cache/storable", 0),
    ("cache/key", 0),
    ("cache/range", 0),
    ("upstream/balance", 0),
    ("protect/detect", 0),
    ("observe/clock", 0),
    ("observe/request_id", 0),
    // 1: runtime state
    ("body", 1),
    ("cache", 1),
    ("upstream", 1),
    ("protect", 1),
    ("observe", 1),
    ("tls", 1),
    ("state", 1),
    // 2: the request path
    ("pipeline", 2),
    // 3: serving
    ("server", 3),
    ("demo", 3),
    ("lib", 3),
    // 4: the command line
    ("main", 4),
];

const MAX_LINES: usize = 800;

struct Unit {
    path: PathBuf,
    text: String,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("read src")
        .map(|e| e.expect("dir entry").path())
        .collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/cache/serve.rs` -> `cache/serve`; `mod.rs` names its directory;
/// a `tests.rs` beside a file belongs to it.
fn unit_name(path: &Path) -> String {
    let rel = path.strip_prefix(src_dir()).expect("under src");
    let mut name = rel.with_extension("").to_string_lossy().replace('\\', "/");
    for suffix in ["/mod", "/tests"] {
        if let Some(stripped) = name.strip_suffix(suffix) {
            name = stripped.to_owned();
        }
    }
    name
}

fn layer_of(unit: &str) -> Option<u8> {
    LAYERS
        .iter()
        .filter(|(prefix, _)| unit == *prefix || unit.starts_with(&format!("{prefix}/")))
        .max_by_key(|(prefix, _)| prefix.len())
        .map(|&(_, layer)| layer)
}

/// The file's code without its inline `#[cfg(test)] mod tests` (tests may
/// import what they like).
fn code_of(text: &str) -> &str {
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    }
}

/// The unit a `crate::a::b::c` path names: its longest prefix that is a unit.
fn resolve(segments: &[&str], units: &BTreeSet<String>) -> Option<String> {
    (1..=segments.len())
        .rev()
        .map(|k| segments[..k].join("/"))
        .find(|candidate| units.contains(candidate))
}

/// Module paths after `prefix` (`crate::`, `super::`) in `code`.
fn paths_after<'a>(code: &'a str, prefix: &str) -> Vec<Vec<&'a str>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(prefix) {
        let before = rest[..i].chars().last();
        rest = &rest[i + prefix.len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let mut segments = Vec::new();
        let mut tail = rest;
        loop {
            let end = tail
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if end == 0 {
                break;
            }
            segments.push(&tail[..end]);
            match tail[end..].strip_prefix("::") {
                Some(next) => tail = next,
                None => break,
            }
        }
        if !segments.is_empty() {
            out.push(segments);
        }
    }
    out
}

struct Graph {
    units: BTreeMap<String, Unit>,
    edges: BTreeMap<String, BTreeSet<String>>,
}

fn graph() -> Graph {
    let mut files = Vec::new();
    rust_files(&src_dir(), &mut files);
    let mut units: BTreeMap<String, Unit> = BTreeMap::new();
    for path in files {
        let name = unit_name(&path);
        let text = std::fs::read_to_string(&path).expect("read source");
        if path.file_name().is_some_and(|f| f == "tests.rs") {
            // A sibling test file: counted for length, not for imports.
            units.entry(format!("{name}#tests")).or_insert(Unit { path, text });
            continue;
        }
        units.insert(name, Unit { path, text });
    }
    let names: BTreeSet<String> = units.keys().filter(|n| !n.contains('#')).cloned().collect();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (name, unit) in &units {
        if name.contains('#') {
            continue;
        }
        let code = code_of(&unit.text);
        let mut targets = BTreeSet::new();
        for segments in paths_after(code, "crate::") {
            targets.extend(resolve(&segments, &names));
        }
        // `super::x` from `a/b` (from `a/b.rs` and from `a/b/mod.rs` alike,
        // `super` is `a`).
        let mut parent: Vec<&str> = name.split('/').collect();
        parent.pop();
        for segments in paths_after(code, "super::") {
            let mut full = parent.clone();
            full.extend(segments.iter().copied());
            targets.extend(resolve(&full, &names).or_else(|| {
                let p = parent.join("/");
                names.contains(&p).then_some(p)
            }));
        }
        targets.remove(name);
        edges.insert(name.clone(), targets);
    }
    Graph { units, edges }
}

/// Strongly connected components with more than one file (Tarjan).
fn circles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    struct State<'a> {
        edges: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        s.index.insert(v, s.next);
        s.low.insert(v, s.next);
        s.next += 1;
        s.stack.push(v);
        s.on_stack.insert(v);
        let edges = s.edges;
        for w in edges.get(v).into_iter().flatten() {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let low = s.low[v].min(s.low[w]);
                s.low.insert(v, low);
            } else if s.on_stack.contains(w) {
                let low = s.low[v].min(s.index[w]);
                s.low.insert(v, low);
            }
        }
        if s.low[v] == s.index[v] {
            let mut component = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                component.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                s.out.push(component);
            }
        }
    }
    let mut s = State {
        edges,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        out: Vec::new(),
    };
    for v in edges.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out
}

#[test]
fn the_layers_hold() {
    let g = graph();
    let mut problems = Vec::new();
    let mut upward = BTreeSet::new();
    for (from, targets) in &g.edges {
        let Some(from_layer) = layer_of(from) else {
            problems.push(format!(
                "src/{from}: no layer claims it (add it to LAYERS here and to ARCHITECTURE.md)"
            ));
            continue;
        };
        for to in targets {
            let Some(to_layer) = layer_of(to) else { continue };
            if to_layer > from_layer {
                upward.insert((from.clone(), to.clone()));
            }
        }
    }
    for (from, to) in &upward {
        problems.push(format!(
            "src/{from} (layer {}) imports src/{to} (layer {}): a lower layer must not name a higher one; pass what it needs as a value or a small trait defined below",
            layer_of(from).unwrap_or(0),
            layer_of(to).unwrap_or(0)
        ));
    }
    let found = circles(&g.edges);
    for circle in &found {
        problems.push(format!("a circle between files: {}", circle.join(" -> ")));
    }
    let arrows: usize = g.edges.values().map(BTreeSet::len).sum();
    println!(
        "{} files, {arrows} import arrows between them, {} running upward, {} circles",
        g.edges.len(),
        upward.len(),
        found.len()
    );
    for circle in &found {
        println!("  circle: {}", circle.join(" -> "));
    }
    for (from, to) in &upward {
        println!("  upward: {from} -> {to}");
    }
    assert!(problems.is_empty(), "architecture problems:\n{}", problems.join("\n"));
}

#[test]
fn files_are_short_and_say_what_they_are() {
    let g = graph();
    let mut problems = Vec::new();
    for unit in g.units.values() {
        let shown = unit
            .path
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(&unit.path)
            .display()
            .to_string();
        let lines = unit.text.lines().count();
        if lines > MAX_LINES {
            problems.push(format!(
                "{shown}: {lines} lines (at most {MAX_LINES}: split it by reason to change)"
            ));
        }
        if !unit.text.trim_start().starts_with("//!") {
            problems.push(format!(
                "{shown}: no `//!` paragraph saying what the module does and how it fits"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// `code` without `//` comments (doc text may name what code must not use).
fn without_comments(code: &str) -> String {
    code.lines()
        .map(|line| line.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// What layer 0 (the rules) must not use: the runtime, files, sockets,
/// threads and the clock. Times and randomness are arguments there.
const NOT_IN_RULES: &[&str] = &[
    "tokio",
    "std::fs",
    "std::net::Tcp",
    "std::net::Udp",
    "std::thread",
    "Instant::now",
    "SystemTime::now",
];

/// The named exceptions: (file, what), each with its reason in
/// ARCHITECTURE.md.
const RULE_EXCEPTIONS: &[(&str, &str)] = &[
    // Config::load reads the file it is given.
    ("config", "std::fs"),
    // read_key reads the key file a config names.
    ("secret", "std::fs"),
    // UUIDv7 ids carry the time they were made; without system randomness
    // the seed falls back to the clock and the thread's id.
    ("observe/request_id", "SystemTime::now"),
    ("observe/request_id", "std::thread"),
];

#[test]
fn the_rules_do_no_io_and_read_no_clock() {
    let g = graph();
    let mut problems = Vec::new();
    for (name, unit) in &g.units {
        if name.contains('#') || layer_of(name) != Some(0) {
            continue;
        }
        let code = without_comments(code_of(&unit.text));
        for what in NOT_IN_RULES {
            if code.contains(what) && !RULE_EXCEPTIONS.contains(&(name.as_str(), what)) {
                problems.push(format!(
                    "src/{name} (layer 0) uses `{what}`: the rules take time, randomness and data as arguments"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_pipeline_phases_are_files_and_documented() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/request-lifecycle.md")).expect("read docs/request-lifecycle.md");
    let forward = std::fs::read_to_string(root.join("src/pipeline/mod.rs")).expect("read src/pipeline/mod.rs");
    let mut problems = Vec::new();
    for phase in portcullis::pipeline::Phase::ALL {
        let name = phase.as_str();
        let file = match name {
            "select" | "send" => "exchange",
            other => other,
        };
        if !root.join(format!("src/pipeline/{file}.rs")).exists() {
            problems.push(format!("phase {name}: no src/pipeline/{file}.rs"));
        }
        if !doc.contains(&format!("| `{name}` |")) {
            problems.push(format!("phase {name}: no row in docs/request-lifecycle.md"));
        }
        let variant = format!("Phase::{}{}", name[..1].to_uppercase(), &name[1..]);
        if !forward.contains(&variant) && !["validate", "select", "send", "rewrite"].contains(&name) {
            problems.push(format!("phase {name}: forward never enters {variant}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_graph_reader_finds_imports() {
    let code =
        "use crate::config::{A, B};\nfn f() { crate::cache::store::Stored::new(); super::x::y(); }\nmod_crate::no";
    let paths = paths_after(code, "crate::");
    assert_eq!(paths, vec![vec!["config"], vec!["cache", "store", "Stored", "new"]]);
    let units: BTreeSet<String> = ["cache", "cache/store", "config"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(
        resolve(&["cache", "store", "Stored"], &units).as_deref(),
        Some("cache/store")
    );
    assert_eq!(resolve(&["cache", "Cache"], &units).as_deref(), Some("cache"));
    assert_eq!(layer_of("cache/store"), Some(1));
    assert_eq!(layer_of("cache/control/sf"), Some(0));
    assert_eq!(layer_of("pipeline/route"), Some(2));
    let mut edges = BTreeMap::new();
    edges.insert("a".to_owned(), BTreeSet::from(["b".to_owned()]));
    edges.insert("b".to_owned(), BTreeSet::from(["a".to_owned()]));
    edges.insert("c".to_owned(), BTreeSet::from(["a".to_owned()]));
    assert_eq!(circles(&edges), vec![vec!["a".to_owned(), "b".to_owned()]]);
}
