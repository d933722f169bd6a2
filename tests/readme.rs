//! The README cannot drift from the code: its classification table is the
//! code's table, and every `mmsend …` command and flag it shows exists.
//!
//! After changing the table in `src/classify/table.rs`, refresh the README with
//! `MMSEND_UPDATE_README=1 cargo test --test readme`.

use std::collections::BTreeSet;
use std::process::Command;

const START: &str = "<!-- classification:start -->\n";
const END: &str = "<!-- classification:end -->";

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

#[test]
fn classification_table_is_the_codes_table() {
    let text = readme();
    let start = text
        .find(START)
        .expect("README has the classification markers")
        + START.len();
    let end = text.find(END).expect("README has the end marker");
    let want = mmsend::classify::markdown_table();
    if text[start..end] != want {
        if std::env::var("MMSEND_UPDATE_README").is_ok() {
            let new = format!("{}{}{}", &text[..start], want, &text[end..]);
            std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"), new).unwrap();
            return;
        }
        panic!(
            "README classification table differs from src/classify/table.rs; run MMSEND_UPDATE_README=1 cargo test --test readme\n--- want ---\n{want}"
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

fn help(path: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_mmsend"))
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "`mmsend {} --help` failed: the README names a command that does not exist",
        path.join(" ")
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn every_command_and_flag_in_the_readme_exists() {
    let text = readme();
    let mut checked = 0;
    let mut in_code = false;
    let mut all_help = String::new();
    for sub in [
        vec!["worker"],
        vec!["enqueue"],
        vec!["demo"],
        vec!["simulate"],
        vec!["topology", "show"],
        vec!["dlq", "replay"],
        vec!["healthcheck"],
        vec!["console"],
    ] {
        all_help.push_str(&help(&sub));
    }
    for line in text.lines() {
        if line.starts_with("```") {
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
                let h = help(&path);
                for flag in words.iter().filter(|w| w.starts_with("--")) {
                    assert!(
                        h.contains(flag),
                        "README: `mmsend {}` has no flag {flag}",
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
                if !flag.is_empty() && flag.chars().all(|c| c.is_ascii_lowercase() || c == '-') {
                    assert!(
                        all_help.contains(&format!("--{flag}")),
                        "README names --{flag}, which no command has"
                    );
                    checked += 1;
                }
            }
        }
    }
    // every MMSEND_* variable the README names is read somewhere
    let vars: BTreeSet<&str> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("MMSEND_") && w.len() > 7)
        .collect();
    let sources = [
        include_str!("../src/cli.rs"),
        include_str!("../src/simulator.rs"),
        include_str!("../tests/readme.rs"),
        include_str!("../tests/chaos.rs"),
        include_str!("../benches/pipeline.rs"),
        include_str!("../deploy/local/test.sh"),
    ]
    .concat();
    for v in vars {
        assert!(
            sources.contains(&format!("\"{v}\""))
                || sources.contains(&format!("${{{v}"))
                || all_help.contains(v),
            "README names {v}, which nothing reads"
        );
    }
    assert!(
        checked > 20,
        "the README should show commands; checked only {checked}"
    );
}
