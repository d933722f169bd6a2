//! The deployment files agree with the code: the dashboard and the alert
//! rules use only series mmsend exports (or RabbitMQ's own), every alert has
//! a promtool test case, and the RabbitMQ definitions are the topology the
//! workers declare.

use std::collections::BTreeSet;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR")))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every `mmsend_…` name in `text`, without histogram suffixes.
fn mmsend_series(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("mmsend_") {
        let start = i + pos;
        let before_ok =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        if before_ok {
            let mut name = &text[start..end];
            for suffix in ["_bucket", "_sum", "_count"] {
                if let Some(stripped) = name.strip_suffix(suffix) {
                    if stripped.ends_with("_seconds") {
                        name = stripped;
                    }
                }
            }
            out.insert(name.to_string());
        }
        i = end;
    }
    out
}

#[test]
fn dashboard_uses_only_real_series() {
    let text = read("deploy/grafana/mmsend.json");
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let panels = dash["panels"].as_array().expect("panels");
    assert!(panels.len() >= 10, "{} panels", panels.len());
    let exprs: String = panels
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().unwrap_or("").to_string() + "\n")
        .collect();
    let used = mmsend_series(&exprs);
    assert!(used.len() >= 10, "{used:?}");
    for name in &used {
        assert!(
            mmsend::metrics::SERIES.contains(&name.as_str())
                || mmsend::metrics::CONSOLE_SERIES.contains(&name.as_str()),
            "dashboard uses {name}, which mmsend does not export"
        );
    }
    for rabbit in ["rabbitmq_queue_messages_ready", "rabbitmq_queue_consumers"] {
        assert!(exprs.contains(rabbit), "queue depths come from {rabbit}");
    }
}

#[test]
fn alerts_use_real_series_and_each_has_a_test() {
    let rules = read("deploy/prometheus/alerts.yml");
    let tests = read("deploy/prometheus/alerts.test.yml");
    for name in mmsend_series(&rules) {
        assert!(
            mmsend::metrics::SERIES.contains(&name.as_str()),
            "alerts use {name}, which mmsend does not export"
        );
    }
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .collect();
    assert!(alerts.len() >= 10, "{alerts:?}");
    for a in alerts {
        assert!(
            tests.contains(&format!("alertname: {a}")),
            "alert {a} has no promtool test"
        );
        assert!(
            tests.contains(&format!("{a} fires")) && tests.contains(&format!("{a} stays quiet")),
            "{a}: firing and quiet cases"
        );
    }
}

#[test]
fn rabbitmq_definitions_are_the_declared_topology() {
    let file: serde_json::Value = serde_json::from_str(&read("deploy/rabbitmq/definitions.json"))
        .expect("definitions are JSON");
    let topology = mmsend::broker::Topology::with_prefix("mmsend").unwrap();
    let want = topology.definitions("/");
    for key in ["exchanges", "queues", "bindings"] {
        assert_eq!(
            file[key], want[key],
            "definitions.json {key} differ from the code's topology"
        );
    }
}

/// The JSON array after `key` on a line (`command: ["worker"]`,
/// `CMD ["mmsend", "healthcheck"]`), as the deploy files write exec forms.
fn exec_array(line: &str, key: &str) -> Option<Vec<String>> {
    let rest = line.trim().strip_prefix(key)?.trim();
    if !rest.starts_with('[') {
        return None;
    }
    Some(serde_json::from_str(rest).unwrap_or_else(|e| panic!("{line:?}: {e}")))
}

/// Parses `argv` (without the program name) as mmsend's command line.
fn assert_parses(where_: &str, argv: &[String]) {
    use clap::Parser;
    let full = std::iter::once("mmsend".to_string()).chain(argv.iter().cloned());
    if let Err(e) = mmsend::cli::Cli::try_parse_from(full) {
        panic!(
            "{where_}: `mmsend {}` is not a valid command: {e}",
            argv.join(" ")
        );
    }
}

#[test]
fn every_mmsend_command_in_deploy_is_a_real_command() {
    let mut checked = 0;

    // Dockerfile: ENTRYPOINT + CMD, and the HEALTHCHECK's CMD
    let dockerfile = read("deploy/Dockerfile");
    let runtime = &dockerfile[dockerfile.rfind("\nFROM ").expect("a runtime stage")..];
    let entry = runtime
        .lines()
        .find_map(|l| exec_array(l, "ENTRYPOINT"))
        .expect("ENTRYPOINT in exec form");
    assert_eq!(entry, ["mmsend"], "the entrypoint is the mmsend binary");
    let mut after_healthcheck = false;
    for line in runtime.lines() {
        if line.starts_with("HEALTHCHECK") {
            after_healthcheck = true;
        }
        if let Some(argv) = exec_array(line, "CMD") {
            let (what, argv) = if after_healthcheck {
                after_healthcheck = false;
                assert_eq!(argv[0], "mmsend", "the healthcheck runs mmsend");
                ("Dockerfile HEALTHCHECK", argv[1..].to_vec())
            } else {
                ("Dockerfile CMD", argv)
            };
            assert_parses(what, &argv);
            checked += 1;
        }
    }

    // compose: the command of every service built from the mmsend image,
    // and every healthcheck that runs mmsend
    let compose = read("deploy/compose.yml");
    let mut service = String::new();
    let mut mmsend_image = false;
    for line in compose.lines() {
        if let Some(name) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(':')) {
            if !name.starts_with(' ') {
                service = name.to_string();
                mmsend_image = false;
            }
        }
        if line.trim().starts_with("image: mmsend:") {
            mmsend_image = true;
        }
        if let Some(argv) = exec_array(line, "command:") {
            if mmsend_image {
                assert_parses(&format!("compose {service} command"), &argv);
                checked += 1;
            }
        }
        if let Some(argv) = exec_array(line, "test:") {
            if argv.get(1).map(String::as_str) == Some("mmsend") {
                assert_parses(&format!("compose {service} healthcheck"), &argv[2..]);
                checked += 1;
            }
        }
    }

    // Kubernetes: the worker's args (the image's ENTRYPOINT is mmsend)
    for line in read("deploy/k8s/deployment.yaml").lines() {
        if let Some(argv) = exec_array(line, "args:") {
            assert_parses("k8s deployment args", &argv);
            checked += 1;
        }
    }
    assert!(
        checked >= 6,
        "found only {checked} mmsend commands in deploy/"
    );
}

#[test]
fn generated_monitoring_files_name_their_template() {
    // deploy/check.sh runs generate.py --check; this keeps a hand edit of an
    // output from going unnoticed by someone who only runs cargo test.
    for (out, template) in [
        ("deploy/prometheus/alerts.yml", "alerts.yml.in"),
        ("deploy/grafana/mmsend.json", "mmsend.json.in"),
    ] {
        assert!(
            read(out).contains(&format!("deploy/monitoring/{template}")),
            "{out} does not say it is generated from deploy/monitoring/{template}"
        );
    }
}
