//! The published JSON Schemas (`schemas/`) are the code's, and they agree
//! with what the worker accepts:
//!
//! - `schemas/job.v1.json` and `schemas/result.v1.json` are what
//!   `mmsend::schema` generates today (after changing the types, write them
//!   again with `MMSEND_WRITE_SCHEMAS=1 cargo test --test schemas`);
//! - every job fixture in the repository (the jobs the docs show, the demo's
//!   jobs, the test harness's, the cluster script's, the examples and the
//!   producers in other languages) is valid against the job schema **and**
//!   accepted by `Job::parse`; a set of invalid jobs is refused by both;
//! - results events (the docs' and ones the code serializes) are valid
//!   against the results schema and read back as `ResultEvent`.
//!
//! The validator here is small and fails closed: it knows the keywords the
//! generated schemas use and panics on any other, so a schema that grows a
//! keyword makes this test say so instead of passing unchecked. (A full
//! validator crate would add some thirty crates and a third copy of
//! `getrandom`, which the supply-chain policy in deny.toml refuses.)

mod common;

use std::path::{Path, PathBuf};

use mmsend::job::Job;
use mmsend::results::{ResultEvent, ResultOutcome};
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[test]
fn committed_schemas_are_the_generated_ones() {
    let write = std::env::var("MMSEND_WRITE_SCHEMAS").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for (path, schema) in [
        ("schemas/job.v1.json", mmsend::schema::job_v1()),
        ("schemas/result.v1.json", mmsend::schema::result_v1()),
    ] {
        let text = mmsend::schema::to_file_text(&schema);
        let file = root().join(path);
        if write {
            std::fs::create_dir_all(file.parent().unwrap()).unwrap();
            std::fs::write(&file, &text).unwrap();
        } else if std::fs::read_to_string(&file).ok().as_deref() != Some(text.as_str()) {
            stale.push(path);
        }
    }
    assert!(
        stale.is_empty(),
        "{stale:?} differ from the schemas the types generate; write them again with \
         `MMSEND_WRITE_SCHEMAS=1 cargo test --test schemas` and commit them"
    );
}

fn job_schema() -> Value {
    serde_json::from_str(&read("schemas/job.v1.json")).expect("schemas/job.v1.json is JSON")
}

fn result_schema() -> Value {
    serde_json::from_str(&read("schemas/result.v1.json")).expect("schemas/result.v1.json is JSON")
}

// ---- the validator ----------------------------------------------------------

/// The problems of `value` against `schema` (empty: valid). `root` resolves
/// `$ref`s of the form `#/$defs/Name`.
fn problems(root: &Value, schema: &Value, value: &Value, at: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Some(keywords) = schema.as_object() else {
        match schema {
            Value::Bool(true) => {}
            Value::Bool(false) => out.push(format!("{at}: nothing is allowed here")),
            other => panic!("{at}: a schema must be an object or a boolean, got {other}"),
        }
        return out;
    };
    for (keyword, arg) in keywords {
        let mut fail = |what: String| out.push(format!("{at}: {what}"));
        match keyword.as_str() {
            "$schema" | "title" | "description" | "$defs" | "default" => {}
            "$ref" => {
                let name = arg
                    .as_str()
                    .and_then(|r| r.strip_prefix("#/$defs/"))
                    .unwrap_or_else(|| panic!("{at}: unsupported $ref {arg}"));
                let target = &root["$defs"][name];
                assert!(!target.is_null(), "{at}: $ref to a missing definition {name}");
                out.extend(problems(root, target, value, at));
            }
            "type" => {
                let types: Vec<&str> = match arg {
                    Value::String(t) => vec![t.as_str()],
                    Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
                    other => panic!("{at}: bad type {other}"),
                };
                if !types.iter().any(|t| has_type(value, t)) {
                    fail(format!("expected {types:?}, got {value}"));
                }
            }
            "properties" => {
                if let Some(object) = value.as_object() {
                    for (name, sub) in arg.as_object().expect("properties is an object") {
                        if let Some(v) = object.get(name) {
                            out.extend(problems(root, sub, v, &format!("{at}/{name}")));
                        }
                    }
                }
            }
            "additionalProperties" => {
                if let Some(object) = value.as_object() {
                    let known = keywords.get("properties").and_then(Value::as_object);
                    for (name, v) in object {
                        if !known.is_some_and(|k| k.contains_key(name)) {
                            out.extend(problems(root, arg, v, &format!("{at}/{name}")));
                        }
                    }
                }
            }
            "required" => {
                if let Some(object) = value.as_object() {
                    for name in arg.as_array().expect("required is an array") {
                        let name = name.as_str().expect("required names are strings");
                        if !object.contains_key(name) {
                            fail(format!("{name:?} is required"));
                        }
                    }
                }
            }
            "minProperties" => {
                if let Some(object) = value.as_object() {
                    if (object.len() as u64) < arg.as_u64().expect("a count") {
                        fail(format!("fewer than {arg} properties"));
                    }
                }
            }
            "const" => {
                if !same(value, arg) {
                    fail(format!("must be {arg}, got {value}"));
                }
            }
            "enum" => {
                if !arg.as_array().expect("enum is an array").iter().any(|a| same(value, a)) {
                    fail(format!("{value} is not one of {arg}"));
                }
            }
            "oneOf" | "anyOf" => {
                let valid = arg
                    .as_array()
                    .expect("a list of schemas")
                    .iter()
                    .filter(|s| problems(root, s, value, at).is_empty())
                    .count();
                let ok = match keyword.as_str() {
                    "oneOf" => valid == 1,
                    _ => valid >= 1,
                };
                if !ok {
                    fail(format!("{value} matches {valid} of the {keyword} schemas"));
                }
            }
            "minLength" | "maxLength" => {
                if let Some(s) = value.as_str() {
                    let n = s.chars().count() as u64;
                    let limit = arg.as_u64().expect("a length");
                    if (keyword == "minLength" && n < limit) || (keyword == "maxLength" && n > limit)
                    {
                        fail(format!("{keyword} {limit}, got {n} characters"));
                    }
                }
            }
            "pattern" => {
                if let Some(s) = value.as_str() {
                    let re = regex::Regex::new(arg.as_str().expect("a pattern")).unwrap();
                    if !re.is_match(s) {
                        fail(format!("{s:?} does not match {arg}"));
                    }
                }
            }
            "minimum" | "maximum" => {
                if let (Some(n), Some(limit)) = (value.as_f64(), arg.as_f64()) {
                    if (keyword == "minimum" && n < limit) || (keyword == "maximum" && n > limit) {
                        fail(format!("{keyword} {limit}, got {n}"));
                    }
                }
            }
            "format" => {
                let ok = match arg.as_str().expect("a format") {
                    "date-time" => value
                        .as_str()
                        .is_none_or(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok()),
                    "uint64" => !value.is_number() || value.is_u64(),
                    "uint32" => {
                        !value.is_number() || value.as_u64().is_some_and(|n| n <= u32::MAX as u64)
                    }
                    "int64" => !value.is_number() || value.is_i64(),
                    other => panic!("{at}: the validator does not know format {other:?}"),
                };
                if !ok {
                    fail(format!("{value} is not a {arg}"));
                }
            }
            other => panic!(
                "{at}: the validator does not know the keyword {other:?}; teach it (tests/schemas.rs)"
            ),
        }
    }
    out
}

fn has_type(value: &Value, t: &str) -> bool {
    match t {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "number" => value.is_number(),
        // JSON Schema counts 5.0 as an integer; Job::parse does not, and
        // neither does this check (stricter is the safe side for fixtures)
        "integer" => value.is_i64() || value.is_u64(),
        other => panic!("unknown type {other:?}"),
    }
}

fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) if a.is_number() && b.is_number() => x == y,
        _ => a == b,
    }
}

fn validate(schema: &Value, value: &Value) -> Vec<String> {
    problems(schema, schema, value, "")
}

#[test]
fn the_validator_catches_what_it_should() {
    let schema = json!({"type": "object", "required": ["a"], "additionalProperties": false,
                        "properties": {"a": {"type": ["string", "null"], "pattern": "^x", "maxLength": 2}}});
    assert!(validate(&schema, &json!({"a": "xy"})).is_empty());
    assert!(validate(&schema, &json!({"a": null})).is_empty());
    for bad in [
        json!({}),
        json!({"a": "yx"}),
        json!({"a": "xyz"}),
        json!({"a": 1}),
        json!({"a": "x", "b": 1}),
        json!([]),
    ] {
        assert!(!validate(&schema, &bad).is_empty(), "{bad}");
    }
}

// ---- job fixtures -----------------------------------------------------------

/// The JSON values in the ```json blocks of README.md and the book: a block
/// is one value, or one value per line (JSONL).
fn documented_values() -> Vec<(String, Value)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() && p.file_name().is_some_and(|n| n != "book") {
                walk(&p, out);
            } else if p.extension().is_some_and(|e| e == "md") {
                out.push(p);
            }
        }
    }
    let mut files = vec![root().join("README.md")];
    walk(&root().join("docs"), &mut files);
    files.sort();
    let mut out = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let name = file.strip_prefix(root()).unwrap().display().to_string();
        let mut block: Option<String> = None;
        for line in text.lines() {
            match &mut block {
                None if line.trim_start().starts_with("```json") => block = Some(String::new()),
                None => {}
                Some(b) if line.trim_start().starts_with("```") => {
                    let values: Vec<Value> = match serde_json::from_str(b) {
                        Ok(v) => vec![v],
                        Err(_) => b
                            .lines()
                            .filter(|l| !l.trim().is_empty())
                            .map(|l| {
                                serde_json::from_str(l).unwrap_or_else(|e| {
                                    panic!(
                                        "{name}: a ```json block is not JSON or JSONL ({e}): {l}"
                                    )
                                })
                            })
                            .collect(),
                    };
                    out.extend(values.into_iter().map(|v| (name.clone(), v)));
                    block = None;
                }
                Some(b) => {
                    b.push_str(line);
                    b.push('\n');
                }
            }
        }
    }
    out
}

/// The first balanced `{…}` after `marker` in `text`.
fn object_after(text: &str, marker: &str) -> Option<String> {
    let start = text.find(marker)? + marker.len();
    let open = start + text[start..].find('{')?;
    let mut depth = 0;
    let mut in_string = false;
    let mut escaped = false;
    for (i, c) in text[open..].char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_string => escaped = true,
            '"' => in_string = !in_string,
            '{' if !in_string => depth += 1,
            '}' if !in_string => {
                depth -= 1;
                if depth == 0 {
                    return Some(text[open..=open + i].to_string());
                }
            }
            _ => {}
        }
    }
    None
}

/// Every job the repository writes down, with where it comes from.
fn job_fixtures() -> Vec<(String, Value)> {
    let mut jobs: Vec<(String, Value)> = documented_values()
        .into_iter()
        .filter(|(_, v)| v.get("subscription_token").is_some())
        .collect();
    assert!(!jobs.is_empty(), "the docs show at least one job");
    for i in 0..100 {
        jobs.push((format!("the demo's job {i}"), mmsend::demo::sample_job(i)));
    }
    jobs.push(("tests/common job()".into(), common::job("j-1", "t-1")));
    jobs.push((
        "tests/common job_for()".into(),
        common::job_for("j-2", "t-2", "120210000000000001"),
    ));
    // the cluster script writes its jobs with printf, one per line
    let script = read("deploy/cluster/run.sh");
    let line = script
        .lines()
        .find(|l| l.contains("printf '{\"v\":1"))
        .expect("deploy/cluster/run.sh prints its jobs with printf");
    let template = &line[line.find('\'').unwrap() + 1..line.rfind("\\n'").unwrap()];
    jobs.push((
        "deploy/cluster/run.sh".into(),
        serde_json::from_str(&template.replace("%d", "7")).expect("the cluster job is JSON"),
    ));
    // the examples: the Rust one's json! literal and the other languages' literals
    for (path, marker) in [
        ("examples/produce.rs", "let job = json!("),
        ("examples/producers/producer.py", "job = "),
        ("examples/producers/producer.js", "const job = "),
    ] {
        let text = read(path);
        let literal = object_after(&text, marker)
            .unwrap_or_else(|| panic!("{path}: no job literal after {marker:?}"));
        let job = serde_json::from_str(&literal)
            .unwrap_or_else(|e| panic!("{path}: the job literal is not JSON ({e}): {literal}"));
        jobs.push((path.into(), job));
    }
    jobs
}

#[test]
fn every_job_fixture_is_valid_against_the_schema_and_parses() {
    let schema = job_schema();
    let fixtures = job_fixtures();
    for (source, job) in &fixtures {
        let found = validate(&schema, job);
        assert!(
            found.is_empty(),
            "{source}: {job}\nagainst schemas/job.v1.json: {found:?}"
        );
        if let Err(e) = Job::parse(job.to_string().as_bytes()) {
            panic!("{source}: {job}\nJob::parse refuses it: {e}");
        }
    }
    assert!(fixtures.len() > 100, "{} fixtures", fixtures.len());
}

#[test]
fn invalid_jobs_are_refused_by_both() {
    let schema = job_schema();
    let valid = json!({"v": 1, "job_id": "cmp42-000017", "ad_account_id": "act_1234567890",
                       "page_id": "9876543210", "message_id": "120210000000000000",
                       "subscription_token": "sub-abc", "message": {"text": "Hi"},
                       "min_conversation_gap_seconds": 3600, "campaign": "black-friday",
                       "not_after": "2026-11-27T00:00:00+01:00", "x_custom": [1, 2]});
    assert!(
        validate(&schema, &valid).is_empty(),
        "{:?}",
        validate(&schema, &valid)
    );
    assert!(Job::parse(valid.to_string().as_bytes()).is_ok());
    let mut nulls = valid.clone();
    for field in [
        "message",
        "min_conversation_gap_seconds",
        "campaign",
        "not_after",
    ] {
        nulls[field] = Value::Null;
    }
    assert!(validate(&schema, &nulls).is_empty());
    assert!(Job::parse(nulls.to_string().as_bytes()).is_ok());

    let with = |field: &str, value: Value| {
        let mut v = valid.clone();
        v[field] = value;
        v
    };
    let without = |field: &str| {
        let mut v = valid.clone();
        v.as_object_mut().unwrap().remove(field);
        v
    };
    let invalid = [
        without("job_id"),
        without("v"),
        without("subscription_token"),
        with("v", json!(2)),
        with("v", json!("1")),
        with("job_id", json!("  ")),
        with("job_id", json!("j".repeat(256))),
        with("page_id", json!(98765)),
        with("page_id", json!("12ab")),
        with("ad_account_id", json!("act_12ab")),
        with("ad_account_id", json!("act_")),
        with("message_id", json!("")),
        with("message", json!("hi")),
        with("message", json!({})),
        with("min_conversation_gap_seconds", json!(-5)),
        with("min_conversation_gap_seconds", json!("60")),
        with("campaign", json!(" ")),
        with("campaign", json!(7)),
        with("not_after", json!("tomorrow")),
        json!([1, 2]),
        json!("a job"),
    ];
    for job in invalid {
        assert!(
            !validate(&schema, &job).is_empty(),
            "the schema accepts {job}"
        );
        assert!(
            Job::parse(job.to_string().as_bytes()).is_err(),
            "Job::parse accepts {job}"
        );
    }
}

#[test]
fn results_events_are_valid_against_their_schema() {
    let schema = result_schema();
    let mut events: Vec<(String, Value)> = documented_values()
        .into_iter()
        .filter(|(_, v)| v.get("outcome").is_some())
        .collect();
    assert!(!events.is_empty(), "the docs show results events");
    let at = "2026-11-26T10:00:00.123Z".parse().unwrap();
    for (outcome, class, code, tracking) in [
        (ResultOutcome::Sent, None, None, Some("mm.1")),
        (ResultOutcome::Dead, Some("mismatch"), Some(2300005), None),
        (ResultOutcome::Duplicate, None, None, Some("mm.2")),
    ] {
        let e = ResultEvent {
            v: 1,
            job_id: "cmp42-000017".into(),
            campaign: Some("black-friday".into()),
            outcome,
            class: class.map(Into::into),
            reason: class.map(|_| "terminal".into()),
            code,
            tracking_id: tracking.map(Into::into),
            suspected: false,
            attempts: 2,
            status: None,
            at,
        };
        events.push((format!("{outcome:?}"), serde_json::to_value(&e).unwrap()));
    }
    for (source, event) in &events {
        let found = validate(&schema, event);
        assert!(found.is_empty(), "{source}: {event}: {found:?}");
        serde_json::from_value::<ResultEvent>(event.clone())
            .unwrap_or_else(|e| panic!("{source}: {event} does not read as an event: {e}"));
    }
    let mut bad = events[0].1.clone();
    bad["outcome"] = json!("maybe");
    assert!(!validate(&schema, &bad).is_empty());
    assert!(serde_json::from_value::<ResultEvent>(bad).is_err());
    let mut bad = events[0].1.clone();
    bad.as_object_mut().unwrap().remove("job_id");
    assert!(!validate(&schema, &bad).is_empty());
    assert!(serde_json::from_value::<ResultEvent>(bad).is_err());
}
