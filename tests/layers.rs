//! Dependencies point down: a module uses only modules of a lower layer
//! (or, inside one module, its own parts of the same layer). The layers are
//! the table below; the rule and the table are explained in the book's
//! code-layout chapter (docs/src/architecture.md#layers).
//!
//! The test reads every file under `src/` and the `crate::…` paths in its
//! code (`use crate::…` lines, `use crate::{a, b::c}` groups and paths
//! written inline), leaving out comments and `#[cfg(test)]` items: a test
//! may use anything. A path names the deepest module of the table it
//! reaches (`crate::worker::gates::Held` is `worker::gates`,
//! `crate::worker::WorkerConfig` is `worker`). `super::` paths stay inside
//! one module and are not checked.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Module → layer, lowest first. A module not named here takes the layer of
/// its nearest parent that is; a top-level module must be named.
const LAYERS: &[(&str, u8)] = &[
    // the bottom: they use nothing of the crate
    ("config", 0),
    ("job", 0),
    ("results", 0),
    ("health", 0),
    // one Graph API call; the published schemas
    ("graph", 1),
    ("schema", 1),
    // Meta's webhook events, as read from a stored payload
    ("webhooks::events", 1),
    // outcome → class → route
    ("classify", 2),
    // RabbitMQ, the metrics registry, the Graph API simulator
    ("broker", 3),
    ("metrics", 3),
    ("simulator", 3),
    // the dead-letter library; the worker's parts that the fleet layer shares
    ("dlq", 4),
    ("worker::acks", 4),
    ("worker::gates", 4),
    ("worker::pacing", 4),
    ("worker::tokens", 4),
    // what workers share through Redis (the ledger, pacing, gates, campaigns)
    ("fleet", 5),
    // publishing jobs (counting them per campaign); campaign control (its
    // state on Redis, the held queue through the DLQ engine); the webhook
    // receiver (the broker and the metrics); the delivery tracker (the
    // fleet's joins, fed from the broker)
    ("producer", 6),
    ("control", 6),
    ("webhooks", 6),
    ("tracker", 6),
    // the worker (which runs a tracker), the console, what the CLI prints
    ("worker", 7),
    ("console", 7),
    ("report", 7),
    // the config file (every stage's section), the demo
    ("settings", 8),
    ("demo", 8),
    // the command line
    ("cli", 9),
];

fn layer(module: &str) -> Option<(&'static str, u8)> {
    LAYERS
        .iter()
        .filter(|(m, _)| module == *m || module.starts_with(&format!("{m}::")))
        .max_by_key(|(m, _)| m.len())
        .map(|&(m, l)| (m, l))
}

fn top(module: &str) -> &str {
    module.split("::").next().unwrap_or(module)
}

/// `src/worker/gates.rs` → `worker::gates`, `src/worker/mod.rs` → `worker`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    parts.join("::")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The file's code: comment lines and `#[cfg(test)]` items left out.
fn code(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if line.starts_with("#[cfg(test)]") {
            // skip the item: to its closing brace, or its semicolon
            let (mut depth, mut opened) = (0i32, false);
            i += 1;
            while i < lines.len() {
                let l = lines[i];
                depth += l.matches('{').count() as i32 - l.matches('}').count() as i32;
                opened |= l.contains('{');
                i += 1;
                if (opened && depth <= 0) || (!opened && l.trim_end().ends_with(';')) {
                    break;
                }
            }
            continue;
        }
        if !line.starts_with("//") {
            out.push_str(lines[i]);
            out.push('\n');
        }
        i += 1;
    }
    out
}

/// Every module path after `crate::` in `code`, groups expanded:
/// `crate::{a, b::{c, d}}` gives `a`, `b::c`, `b::d`.
fn crate_paths(code: &str) -> Vec<String> {
    fn expand(prefix: &str, rest: &str, out: &mut Vec<String>) {
        // rest starts right after "::" (or at a group item)
        let rest = rest.trim_start();
        if let Some(inner) = rest.strip_prefix('{') {
            let mut depth = 1;
            let mut start = 0;
            for (i, c) in inner.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' | ',' if depth == 1 => {
                        expand(prefix, &inner[start..i], out);
                        start = i + 1;
                        if c == '}' {
                            return;
                        }
                    }
                    '}' => depth -= 1,
                    _ => {}
                }
            }
            return;
        }
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if name.is_empty() || name == "self" {
            if !prefix.is_empty() {
                out.push(prefix.to_string());
            }
            return;
        }
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}::{name}")
        };
        match rest[name.len()..].strip_prefix("::") {
            Some(more) => expand(&path, more, out),
            None => out.push(path),
        }
    }
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let before = code[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue; // `$crate::`, `mycrate::`
        }
        expand("", &code[i + "crate::".len()..], &mut out);
    }
    out
}

#[test]
fn the_path_reader_reads_groups_and_inline_paths() {
    let paths = crate_paths(
        "use crate::broker::{self, Topology};\nuse crate::{health, producer::{a, b::C}};\nlet x = crate::worker::gates::Held::new();\n",
    );
    assert_eq!(
        paths,
        [
            "broker",
            "broker::Topology",
            "health",
            "producer::a",
            "producer::b::C",
            "worker::gates::Held::new"
        ]
    );
    let kept = code("use crate::a;\n// use crate::b;\n#[cfg(test)]\nmod tests {\n    use crate::c;\n}\nuse crate::d;\n");
    assert_eq!(crate_paths(&kept), ["a", "d"]);
}

#[test]
fn every_module_uses_only_modules_below_it() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut wrong = Vec::new();
    for file in &files {
        let from = module_of(&src, file);
        if from == "lib" || from == "main" {
            continue;
        }
        let Some((from_entry, from_layer)) = layer(&from) else {
            wrong.push(format!(
                "{from} ({}) is in no layer: add it to LAYERS in tests/layers.rs",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for path in crate_paths(&code(&text)) {
            // the deepest module the path names
            let segments: Vec<&str> = path.split("::").collect();
            let Some(to) = (1..=segments.len())
                .rev()
                .map(|n| segments[..n].join("::"))
                .find(|m| modules.contains(m))
            else {
                continue; // an item of lib.rs, a macro
            };
            if to == from || to.starts_with(&format!("{from}::")) {
                continue; // itself, or a part of itself
            }
            let (to_entry, to_layer) = layer(&to).expect("every module has a layer");
            let same_module = to_layer == from_layer && top(&to) == top(&from);
            if to_layer >= from_layer && !same_module && to_entry != from_entry {
                wrong.push(format!(
                    "{from} (layer {from_layer}) uses crate::{path}, of {to} (layer {to_layer}): \
                     an arrow that points up or sideways"
                ));
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "dependencies must point down (docs/src/architecture.md#layers):\n{}",
        wrong.join("\n")
    );
}

#[test]
fn the_table_names_only_modules_that_exist() {
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    for (m, _) in LAYERS {
        assert!(
            modules.contains(*m),
            "LAYERS names {m}, which src/ does not have"
        );
    }
}
