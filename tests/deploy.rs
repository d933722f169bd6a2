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
            mmsend::metrics::SERIES.contains(&name.as_str()),
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
