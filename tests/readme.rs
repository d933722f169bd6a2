//! The documentation cannot drift from the code: `README.md` and every page
//! of the book under `docs/` are read, and
//!
//! - the classification table (between its markers, in the classification
//!   chapter) is the code's table;
//! - every `mmsend …` command and `--flag` they show exists, and every
//!   `MMSEND_*` variable they name is read somewhere;
//! - every `mmsend_*` metric they name is a series the code exports;
//! - every relative link and `#anchor` resolves, and every page of the book
//!   is in its `SUMMARY.md`.
//!
//! After changing the table in `src/classify/table.rs`, refresh the page that
//! holds it with `MMSEND_UPDATE_README=1 cargo test --test readme`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

const START: &str = "<!-- classification:start -->\n";
const END: &str = "<!-- classification:end -->";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `README.md` and every Markdown file under `docs/` (the built book in
/// `docs/book/` aside), as (path relative to the repository, text).
fn pages() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n != "book") {
                    walk(&p, out);
                }
            } else if p.extension().is_some_and(|e| e == "md") {
                out.push(p);
            }
        }
    }
    let mut files = vec![root().join("README.md")];
    walk(&root().join("docs"), &mut files);
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.strip_prefix(root()).unwrap().to_path_buf(), text)
        })
        .collect()
}

#[test]
fn classification_table_is_the_codes_table() {
    let holders: Vec<(PathBuf, String)> = pages()
        .into_iter()
        .filter(|(_, text)| text.contains(START))
        .collect();
    assert_eq!(
        holders.len(),
        1,
        "exactly one page holds the classification markers: {:?}",
        holders.iter().map(|(p, _)| p).collect::<Vec<_>>()
    );
    let (path, text) = &holders[0];
    let start = text.find(START).unwrap() + START.len();
    let end = text.find(END).expect("the page has the end marker");
    let want = mmsend::classify::markdown_table();
    if text[start..end] != want {
        if std::env::var("MMSEND_UPDATE_README").is_ok() {
            let new = format!("{}{}{}", &text[..start], want, &text[end..]);
            std::fs::write(root().join(path), new).unwrap();
            return;
        }
        panic!(
            "{}: classification table differs from src/classify/table.rs; run MMSEND_UPDATE_README=1 cargo test --test readme\n--- want ---\n{want}",
            path.display()
        );
    }
    for code in (2300000..=2300020).chain(2300030..=2300032) {
        assert!(
            want.contains(&code.to_string()) || covered_by_range(&want, code),
            "{code}"
        );
    }
}

/// `2300060–2300063` covers 2300061.
fn covered_by_range(table: &str, code: i64) -> bool {
    table.split([',', '|']).any(|part| {
        let part = part.trim();
        match part.split_once('–') {
            Some((lo, hi)) => match (lo.parse::<i64>(), hi.parse::<i64>()) {
                (Ok(lo), Ok(hi)) => (lo..=hi).contains(&code),
                _ => false,
            },
            None => false,
        }
    })
}

fn help(page: &Path, path: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mmsend"))
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`mmsend {} --help` failed: {} names a command that does not exist",
        path.join(" "),
        page.display()
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fence line opens or closes a code block.
fn is_fence(line: &str) -> bool {
    let t = line.trim_start();
    t.starts_with("```") || t.starts_with("~~~")
}

/// The lines of a page outside code blocks.
fn prose_lines(text: &str) -> impl Iterator<Item = &str> {
    let mut in_code = false;
    text.lines().filter(move |line| {
        if is_fence(line) {
            in_code = !in_code;
            return false;
        }
        !in_code
    })
}

#[test]
fn every_command_and_flag_in_the_docs_exists() {
    let mut checked = 0;
    let mut all_help = String::new();
    let here = Path::new("tests/readme.rs");
    for sub in [
        vec!["worker"],
        vec!["enqueue"],
        vec!["demo"],
        vec!["simulate"],
        vec!["topology", "show"],
        vec!["dlq", "replay"],
        vec!["healthcheck"],
        vec!["console"],
        vec!["campaign", "show"],
        vec!["campaign", "pause"],
        vec!["campaign", "cancel"],
        vec!["webhooks"],
    ] {
        all_help.push_str(&help(here, &sub));
    }
    let pages = pages();
    for (page, text) in &pages {
        let mut in_code = false;
        for line in text.lines() {
            if is_fence(line) {
                in_code = !in_code;
                continue;
            }
            // commands in code blocks: `mmsend <sub> [<sub>] [--flag …]`
            if in_code {
                if let Some(rest) = line.trim().strip_prefix("mmsend ") {
                    let words: Vec<&str> = rest
                        .split_whitespace()
                        .take_while(|w| !w.starts_with('#'))
                        .collect();
                    let path: Vec<&str> = words
                        .iter()
                        .take_while(|w| w.chars().all(|c| c.is_ascii_lowercase()))
                        .take(2)
                        .copied()
                        .collect();
                    let h = help(page, &path);
                    for flag in words.iter().filter(|w| w.starts_with("--")) {
                        assert!(
                            h.contains(flag),
                            "{}: `mmsend {}` has no flag {flag}",
                            page.display(),
                            path.join(" ")
                        );
                        checked += 1;
                    }
                    checked += 1;
                }
            }
            // flags named in prose and tables: `--flag`
            for part in line.split('`').skip(1).step_by(2) {
                if let Some(flag) = part.strip_prefix("--") {
                    let flag = flag.split_whitespace().next().unwrap_or("");
                    if !flag.is_empty() && flag.chars().all(|c| c.is_ascii_lowercase() || c == '-')
                    {
                        assert!(
                            all_help.contains(&format!("--{flag}")),
                            "{} names --{flag}, which no command has",
                            page.display()
                        );
                        checked += 1;
                    }
                }
            }
        }
    }
    // every MMSEND_* variable the docs name is read somewhere
    let sources = [
        include_str!("../src/cli.rs"),
        include_str!("../src/simulator.rs"),
        include_str!("../tests/readme.rs"),
        include_str!("../tests/chaos.rs"),
        include_str!("../tests/schemas.rs"),
        include_str!("../tests/producers.rs"),
        include_str!("../benches/pipeline.rs"),
        include_str!("../deploy/local/test.sh"),
    ]
    .concat();
    for (page, text) in &pages {
        let vars: BTreeSet<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("MMSEND_") && w.len() > 7)
            .collect();
        for v in vars {
            assert!(
                sources.contains(&format!("\"{v}\""))
                    || sources.contains(&format!("${{{v}"))
                    || all_help.contains(v),
                "{} names {v}, which nothing reads",
                page.display()
            );
        }
    }
    assert!(
        checked > 20,
        "the docs should show commands; checked only {checked}"
    );
}

/// Every `mmsend_…` name in the docs is a series the code exports (a
/// histogram also as `_bucket`, `_sum`, `_count`), or a setting of the
/// monitoring generator (`deploy/monitoring/config.json`).
#[test]
fn documented_metric_names_exist() {
    let series: BTreeSet<&str> = mmsend::metrics::SERIES
        .iter()
        .chain(mmsend::metrics::CONSOLE_SERIES)
        .copied()
        .collect();
    let settings = include_str!("../deploy/monitoring/config.json");
    let mut checked = 0;
    for (page, text) in pages() {
        let names: BTreeSet<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("mmsend_") && w.len() > 7)
            .collect();
        for name in names {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s).filter(|b| series.contains(b)))
                .unwrap_or(name);
            assert!(
                series.contains(base) || settings.contains(&format!("\"{name}\"")),
                "{} names the metric {name}, which mmsend does not export (mmsend::metrics::SERIES)",
                page.display()
            );
            checked += 1;
        }
    }
    assert!(
        checked > 20,
        "the docs should name metrics; checked {checked}"
    );
}

/// GitHub's (and mdBook's) anchor for a heading: lower case, every character
/// but letters, digits, `-`, `_` and spaces dropped, spaces to `-`.
#[test]
fn every_series_is_in_the_metrics_chapter() {
    let chapter = std::fs::read_to_string(root().join("docs/src/operating/metrics.md")).unwrap();
    let missing: Vec<&str> = mmsend::metrics::SERIES
        .iter()
        .copied()
        .filter(|name| !chapter.contains(&format!("`{name}`")))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/src/operating/metrics.md has no row for {missing:?}; add one to its table"
    );
}

fn slug(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || matches!(c, '-' | '_' | ' '))
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every anchor a page has: its headings' slugs (a repeated one gets `-1`,
/// `-2`, … as on GitHub) and any `<a id=…>` / `<a name=…>`.
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose_lines(text) {
        let hashes = line.chars().take_while(|&c| c == '#').count();
        if (1..=6).contains(&hashes) && line[hashes..].starts_with(' ') {
            let s = slug(&line[hashes..]);
            let n = seen.entry(s.clone()).or_insert(0);
            out.insert(if *n == 0 {
                s.clone()
            } else {
                format!("{s}-{n}")
            });
            *n += 1;
        }
        for attr in ["id=\"", "name=\""] {
            for (i, _) in line.match_indices(&format!("<a {attr}")) {
                let rest = &line[i + 3 + attr.len()..];
                if let Some(end) = rest.find('"') {
                    out.insert(rest[..end].to_string());
                }
            }
        }
    }
    out
}

/// The targets of the Markdown links and images on a line outside code spans.
fn link_targets(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in line.split('`').step_by(2) {
        let mut rest = part;
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            let mut depth = 0;
            let end = after
                .char_indices()
                .find(|&(_, c)| match c {
                    '(' => {
                        depth += 1;
                        false
                    }
                    ')' if depth == 0 => true,
                    ')' => {
                        depth -= 1;
                        false
                    }
                    _ => false,
                })
                .map(|(j, _)| j)
                .unwrap_or(after.len());
            // `[text](target "title")`
            let target = after[..end].split_whitespace().next().unwrap_or("");
            out.push(target.trim_matches(['<', '>']).to_string());
            rest = &after[end..];
        }
    }
    out
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let pages = pages();
    let texts: BTreeMap<PathBuf, &str> =
        pages.iter().map(|(p, t)| (p.clone(), t.as_str())).collect();
    let mut problems = Vec::new();
    let mut checked = 0;
    for (page, text) in &pages {
        for line in prose_lines(text) {
            for target in link_targets(line) {
                if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                    continue;
                }
                checked += 1;
                let (path, anchor) = match target.split_once('#') {
                    Some((p, a)) => (p, Some(a)),
                    None => (target.as_str(), None),
                };
                let file = if path.is_empty() {
                    page.clone()
                } else {
                    normalize(&page.parent().unwrap().join(path))
                };
                if !root().join(&file).exists() {
                    problems.push(format!(
                        "{}: link to {target}: {} does not exist",
                        page.display(),
                        file.display()
                    ));
                    continue;
                }
                let Some(anchor) = anchor else { continue };
                let target_text = match texts.get(&file) {
                    Some(t) => t.to_string(),
                    None if file.extension().is_some_and(|e| e == "md") => {
                        std::fs::read_to_string(root().join(&file)).unwrap()
                    }
                    None => {
                        problems.push(format!(
                            "{}: link to {target}: an anchor into a file that is not Markdown",
                            page.display()
                        ));
                        continue;
                    }
                };
                if !anchors(&target_text).contains(anchor) {
                    problems.push(format!(
                        "{}: link to {target}: {} has no heading for #{anchor}",
                        page.display(),
                        file.display()
                    ));
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    assert!(checked > 40, "the docs should link; checked only {checked}");
}

#[test]
fn every_page_of_the_book_is_in_its_summary() {
    let summary_path = Path::new("docs/src/SUMMARY.md");
    let summary = std::fs::read_to_string(root().join(summary_path)).unwrap();
    let listed: BTreeSet<PathBuf> = prose_lines(&summary)
        .flat_map(link_targets)
        .map(|t| normalize(&Path::new("docs/src").join(t)))
        .collect();
    for (page, _) in pages() {
        if page.starts_with("docs/src") && page != summary_path {
            assert!(
                listed.contains(&page),
                "{} is not in docs/src/SUMMARY.md, so the book leaves it out",
                page.display()
            );
        }
    }
}

#[test]
fn slugs_are_githubs() {
    assert_eq!(slug("MmsendRedisMayEvict"), "mmsendredismayevict");
    assert_eq!(
        slug("Measured (`cargo bench --bench dlq`)"),
        "measured-cargo-bench---bench-dlq"
    );
    assert_eq!(
        slug("`.dead` never drops a letter"),
        "dead-never-drops-a-letter"
    );
    assert_eq!(
        slug("Exit status, JSON and pipes"),
        "exit-status-json-and-pipes"
    );
    let a = anchors("# A\n\n```sh\n# not a heading\n```\n## A\n<a id=\"x\"></a>\n");
    let want: BTreeSet<String> = ["a", "a-1", "x"].map(String::from).into();
    assert_eq!(a, want);
}
