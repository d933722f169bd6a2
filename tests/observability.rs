//! What an SRE sees: `/metrics`, `/healthz`, `/readyz` of a running worker,
//! a scrape that passes `promtool check metrics`, and counters that match
//! what the Graph API (the simulator) saw.

mod common;

use std::time::Duration;

use common::{job, Harness, Opts};
use tokio_util::sync::CancellationToken;

fn sum(scrape: &str, prefix: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn a_scrape_is_valid_and_its_counters_match_the_simulator() {
    let mut h = Harness::start(Opts::new("metrics")).await;
    let stop = CancellationToken::new();
    let addr = mmsend::metrics::serve("127.0.0.1:0", h.metrics.clone(), stop.clone())
        .await
        .unwrap();
    let base = format!("http://{addr}");
    let tokens = [
        "ok-a",
        "ok-b",
        "ok-c",
        "ok-d",
        "sim:err:2300005:1",
        "sim:err:2300018:2",
        "sim:flaky:1:3",
        "sim:err:2300015:4",
        "sim:fault:html502:5",
    ];
    for (i, t) in tokens.iter().enumerate() {
        h.publish_job(&job(&format!("m{i}"), t)).await;
    }
    h.wait_settled(tokens.len() as u64, Duration::from_secs(30))
        .await;

    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{base}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let scrape = get("/metrics").await.unwrap().text().await.unwrap();

    let sim = h.sim.stats();
    // sent jobs, whatever their last failure before the send
    let sent: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("mmsend_jobs_total{") && l.contains("outcome=\"sent\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(sent, sim.sent as f64);
    let sim_errors: u64 = sim.errors.values().sum();
    assert_eq!(
        sum(&scrape, "mmsend_graph_errors_total{"),
        sim_errors as f64
    );
    assert_eq!(
        sum(&scrape, "mmsend_graph_request_duration_seconds_count"),
        sim.requests as f64
    );
    assert_eq!(
        sum(&scrape, "mmsend_dead_letters_total{reason=\"terminal\"}"),
        2.0
    );
    assert!(sum(&scrape, "mmsend_retries_total{") >= 3.0);
    assert!(scrape.contains("mmsend_graph_usage_ratio{kind=\"app_call_count\"}"));
    assert!(scrape.contains("mmsend_amqp_connected 1"));
    for name in mmsend::metrics::SERIES {
        // the receiver's and the tracker's (this worker has no Redis, so
        // no tracker): tests/webhooks.rs and tests/tracking.rs check those
        if mmsend::metrics::WEBHOOK_SERIES.contains(name)
            || mmsend::metrics::TRACKER_SERIES.contains(name)
        {
            continue;
        }
        assert!(scrape.contains(name), "{name} missing from the scrape");
    }
    assert!(!scrape.contains(common::TOKEN));

    match std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(mut child) => {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(scrape.as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            let report = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                out.status.success(),
                "promtool check metrics failed:\n{report}"
            );
        }
        Err(_) => assert!(
            std::env::var("MMSEND_REQUIRE_PROMTOOL").is_err(),
            "promtool is required here (deploy/local/test.sh installs Debian's prometheus package)"
        ),
    }

    h.stop_worker().await;
    assert_eq!(get("/readyz").await.unwrap().status(), 503);
    stop.cancel();
    h.finish().await;
}
