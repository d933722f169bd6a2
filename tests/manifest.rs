//! Cargo.toml stays true: `rust-version` is at least what every dependency
//! in the lockfile declares, `unsafe_code` stays forbidden, and the fuzz
//! crate (which compiles two modules of ours by path) has a committed
//! lockfile and the same versions and features of the dependencies it
//! shares with the main crate.
//!
//! `clippy::incompatible_msrv` (on by default, run with `-D warnings` by the
//! test command) covers the other half of `rust-version`: no standard library
//! API newer than it in our own code.

use std::collections::BTreeMap;
use std::process::Command;

fn root(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

fn manifest(path: &str) -> toml::Table {
    let text = std::fs::read_to_string(root(path)).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.parse().unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn version(s: &str) -> (u64, u64, u64) {
    let mut parts = s.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

fn cargo(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| panic!("cargo {}: {e}", args.join(" ")));
    assert!(
        out.status.success(),
        "cargo {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn rust_version_covers_every_dependency() {
    let ours = manifest("Cargo.toml")["package"]["rust-version"]
        .as_str()
        .expect("Cargo.toml sets package.rust-version")
        .to_string();
    // Every package cargo builds for any target (normal, build and dev
    // dependencies), as `name vX.Y.Z`.
    let built: std::collections::BTreeSet<(String, String)> = cargo(&[
        "tree",
        "--locked",
        "--target",
        "all",
        "-e",
        "normal,build,dev",
        "--prefix",
        "none",
        "-f",
        "{p}",
    ])
    .lines()
    .filter_map(|l| {
        let mut w = l.split_whitespace();
        Some((
            w.next()?.to_string(),
            w.next()?.trim_start_matches('v').to_string(),
        ))
    })
    .collect();
    let meta: serde_json::Value =
        serde_json::from_str(&cargo(&["metadata", "--format-version", "1", "--locked"]))
            .expect("cargo metadata is JSON");
    let mut needs: BTreeMap<(u64, u64, u64), Vec<String>> = BTreeMap::new();
    for p in meta["packages"].as_array().expect("packages") {
        let (Some(name), Some(v), Some(rv)) = (
            p["name"].as_str(),
            p["version"].as_str(),
            p["rust_version"].as_str(),
        ) else {
            continue;
        };
        if built.contains(&(name.to_string(), v.to_string())) {
            needs
                .entry(version(rv))
                .or_default()
                .push(format!("{name} {v}"));
        }
    }
    assert!(
        built.len() > 100,
        "cargo tree listed only {} packages",
        built.len()
    );
    let (max, who) = needs
        .iter()
        .next_back()
        .expect("some dependency declares rust-version");
    assert!(
        version(&ours) >= *max,
        "Cargo.toml says rust-version = {ours:?}, but {} need {}.{}: raise it",
        who.join(", "),
        max.0,
        max.1
    );
}

#[test]
fn unsafe_code_is_forbidden() {
    let m = manifest("Cargo.toml");
    assert_eq!(
        m["lints"]["rust"]["unsafe_code"].as_str(),
        Some("forbid"),
        "[lints.rust] unsafe_code = \"forbid\""
    );
}

/// `version` and `features` of a dependency entry, either form.
fn req(dep: &toml::Value) -> (String, Vec<String>, bool) {
    match dep {
        toml::Value::String(v) => (v.clone(), vec![], true),
        t => (
            t["version"].as_str().unwrap_or("").to_string(),
            t.get("features")
                .and_then(|f| f.as_array())
                .map(|f| {
                    f.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default(),
            t.get("default-features")
                .and_then(|d| d.as_bool())
                .unwrap_or(true),
        ),
    }
}

#[test]
fn fuzz_crate_is_locked_and_in_step_with_the_main_crate() {
    assert!(
        std::path::Path::new(&root("fuzz/Cargo.lock")).exists(),
        "fuzz/Cargo.lock is committed (cd fuzz && cargo generate-lockfile)"
    );
    let ignore = std::fs::read_to_string(root("fuzz/.gitignore")).unwrap_or_default();
    assert!(
        !ignore.lines().any(|l| l.trim() == "Cargo.lock"),
        "fuzz/.gitignore must not ignore Cargo.lock"
    );
    let main = manifest("Cargo.toml");
    let fuzz = manifest("fuzz/Cargo.toml");
    let main_deps = main["dependencies"].as_table().unwrap();
    let mut shared = 0;
    for (name, dep) in fuzz["dependencies"].as_table().unwrap() {
        if let Some(ours) = main_deps.get(name) {
            assert_eq!(
                req(dep),
                req(ours),
                "fuzz/Cargo.toml's {name} differs from Cargo.toml's: keep them in step"
            );
            shared += 1;
        }
    }
    assert!(shared >= 4, "the fuzz crate shares {shared} dependencies");
}
