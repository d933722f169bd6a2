//! A recognisable access token and app secret never leave the worker: not in
//! logs at any level, not in metrics, not in DLQ headers or bodies, not in an
//! export.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{job, Harness, Opts};
use mmsend::dlq::{self, Filter};
use mmsend::graph::{Secret, TokenStore};

const APP_SECRET: &str = "app-secret-5d8e2b9a41";

/// Every log line of every level, kept.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_never_leak_anywhere() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let mut opts = Opts::new("secrets");
    opts.tokens = TokenStore::new(Some(Secret::new(common::TOKEN)))
        .with_page("111", Secret::new(format!("{}-page", common::TOKEN)));
    opts.sim.access_token = Some(common::TOKEN.to_string());
    opts.sim.app_secret = Some(APP_SECRET.to_string());
    let mut h = Harness::start(opts).await;
    h.stop_worker().await;
    h.config.graph.app_secret = Some(Secret::new(APP_SECRET));
    h.start_worker();

    let mut n = 0;
    for (i, token) in [
        "ok-1",
        "ok-2",
        "sim:err:190:a",
        "sim:err:2300005:b",
        "sim:flaky:1:c",
        "sim:fault:html502:d",
    ]
    .iter()
    .enumerate()
    {
        h.publish_job(&job(&format!("s{i}"), token)).await;
        n += 1;
    }
    let mut other_page = job("p", "sim:err:190:p");
    other_page["page_id"] = serde_json::json!("111");
    h.publish_job(&other_page).await;
    n += 1;
    h.wait_settled(n, Duration::from_secs(30)).await;
    assert!(
        h.sim.stats().sent >= 2,
        "app secret proof accepted: {:?}",
        h.sim.stats()
    );

    let mut export = String::new();
    dlq::scan(
        &h.conn,
        &h.topology,
        Filter::default(),
        &dlq::ScanOptions::peek(),
        &mut |d: &dlq::DeadLetter| {
            export.push_str(&d.to_export().to_string());
            export.push('\n');
        },
    )
    .await
    .unwrap();
    let dead = h.drain_dlq().await;
    assert!(dead.len() >= 3);
    let metrics = h.metrics.render();
    h.finish().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("dead-lettered"), "logs were captured");
    for secret in [common::TOKEN, APP_SECRET] {
        assert!(!logs.contains(secret), "secret in logs");
        assert!(!metrics.contains(secret), "secret in metrics");
        assert!(!export.contains(secret), "secret in export");
        for d in &dead {
            assert!(
                !format!("{:?}", common::headers(d)).contains(secret),
                "secret in DLQ headers"
            );
            assert!(
                !String::from_utf8_lossy(&d.body).contains(secret),
                "secret in DLQ body"
            );
        }
    }
}
