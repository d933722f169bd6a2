//! The worker against the real RabbitMQ and the in-process simulator: every
//! route (sent, each retry class, each dead reason), the headers of the
//! dead letters, and shutdown under load.

mod common;

use std::time::Duration;

use common::{by, eventually, job, job_for, Harness, Opts};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use mmsend::broker::headers;
use mmsend::classify::{Class, DeadReason};
use mmsend::graph::{Secret, TokenStore};
use mmsend::metrics::Settled;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn sent_jobs_are_acked_and_sent_exactly_once() {
    let h = Harness::start(Opts::new("sent")).await;
    for i in 0..60 {
        h.publish_job(&job(&format!("j{i}"), &format!("rcpt-{i}")))
            .await;
    }
    h.wait_settled(60, T).await;
    let stats = h.sim.stats();
    assert_eq!(stats.sent, 60);
    assert_eq!(stats.duplicates, 0);
    assert!(stats.sends_by_recipient.values().all(|n| *n == 1));
    assert_eq!(h.settled(), (60, 0));
    assert!(h.drain_dlq().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn populating_campaign_waits_in_delay_then_sends_once() {
    let mut opts = Opts::new("populating");
    opts.sim.populating = Duration::from_millis(1500);
    // every job is queued before the first call opens the window, however
    // slowly a loaded machine publishes
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    for i in 0..20 {
        h.publish_job(&job_for(&format!("p{i}"), &format!("r{i}"), "555"))
            .await;
    }
    h.start_worker();
    h.wait_settled(20, T).await;
    let stats = h.sim.stats();
    assert_eq!(stats.sent, 20);
    assert_eq!(stats.duplicates, 0);
    assert!(
        stats.errors.get("2300012").copied().unwrap_or(0) >= 1,
        "{stats:?}"
    );
    assert!(
        h.metrics
            .settled_count(Settled::Retried, Some(Class::NotReady))
            >= 20,
        "every job waited at least once"
    );
    // the gate kept most jobs away from the API while the campaign populated
    assert!(
        stats.errors["2300012"] < 20,
        "gate should hold jobs back: {stats:?}"
    );
    assert!(h.drain_dlq().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn terminal_codes_go_to_the_dlq_with_the_whole_story() {
    let h = Harness::start(Opts::new("terminal")).await;
    // (job, token, class, code, page): every job on a page of its own, so
    // the auth answer's page hold cannot touch the others
    let cases = [
        ("m1", "sim:err:2300005:a", "mismatch", 2300005, "7701"),
        ("m2", "sim:suberr:2300014:b", "mismatch", 2300014, "7702"),
        // the current reference: the attachment could not be saved
        (
            "r1",
            "sim:err:2300018:c",
            "invalid_request",
            2300018,
            "7703",
        ),
        ("r2", "sim:err:2300030:d", "region", 2300030, "7704"),
        ("r3", "sim:suberr:2300031:e", "region", 2300031, "7705"),
        ("r4", "sim:err:2300032:f", "region", 2300032, "7706"),
        (
            "c1",
            "sim:err:2300011:g",
            "campaign_config",
            2300011,
            "7707",
        ),
        ("a1", "sim:err:190:h", "auth", 190, "7708"),
    ];
    let mut bodies = std::collections::HashMap::new();
    for (id, token, _, _, page) in &cases {
        let mut j = job(id, token);
        j["page_id"] = json!(page);
        h.publish_job(&j).await;
        bodies.insert(*id, serde_json::to_vec(&j).unwrap());
    }
    h.wait_settled(cases.len() as u64, T).await;
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), cases.len());
    for (id, _, class, code, _) in cases {
        let d = dead
            .iter()
            .find(|d| d.job_id().as_deref() == Some(id))
            .unwrap();
        let s = &d.story;
        assert_eq!(s.dead_reason.as_deref(), Some("terminal"), "{id}");
        assert_eq!(s.last_error.class.as_deref(), Some(class), "{id}");
        let got = s
            .last_error
            .subcode
            .filter(|c| *c > 2_000_000)
            .or(s.last_error.code);
        assert_eq!(got, Some(code), "{id}");
        assert_eq!(s.attempt, 1);
        assert!(s.first_attempt_at.is_some() && s.dead_at.is_some());
        // the simulator answers every one of these codes with HTTP 400
        assert_eq!(s.last_error.http_status, Some(400), "{id}");
        assert!(s
            .last_error
            .message
            .as_deref()
            .is_some_and(|m| !m.is_empty()));
        assert!(s.last_error.fbtrace_id.is_some(), "{id}");
        assert_eq!(s.worker.as_deref(), Some(h.config.worker_id.as_str()));
        // the body is the original, byte for byte
        assert_eq!(d.body, bodies[id], "{id}");
    }
    assert_eq!(
        h.metrics.settled_count(Settled::Dead, Some(Class::Region)),
        3
    );
    assert_eq!(
        h.metrics
            .settled_count(Settled::Dead, Some(Class::InvalidRequest)),
        1
    );
    assert_eq!(
        h.metrics
            .settled_count(Settled::Dead, Some(Class::Mismatch)),
        2
    );
    assert_eq!(
        h.sim.stats().requests,
        cases.len() as u64,
        "terminal jobs are tried once"
    );
    h.finish().await;
}

#[tokio::test]
async fn budget_codes_wait_then_expire() {
    let h = Harness::start(Opts::new("budget")).await;
    h.publish_job(&job_for("b1", "sim:err:2300015:x", "901"))
        .await;
    h.publish_job(&job_for("b2", "sim:err:2300017:y", "902"))
        .await;
    h.wait_settled(2, T).await;
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 2);
    for d in &dead {
        assert_eq!(d.class(), Some(Class::Budget));
        assert_eq!(d.reason(), Some(DeadReason::Expired));
    }
    assert!(
        h.metrics
            .settled_count(Settled::Retried, Some(Class::Budget))
            >= 2
    );
    h.finish().await;
}

#[tokio::test]
async fn transient_failures_retry_until_sent_or_exhausted() {
    let h = Harness::start(Opts::new("transient")).await;
    h.publish_job(&job("f1", "sim:flaky:2:f1")).await;
    h.publish_job(&job("x1", "sim:err:2:x1")).await;
    h.wait_settled(2, T).await;
    let stats = h.sim.stats();
    assert_eq!(stats.sends_by_recipient.get("sim:flaky:2:f1"), Some(&1));
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    let s = &dead[0].story;
    assert_eq!(dead[0].job_id().as_deref(), Some("x1"));
    assert_eq!(s.dead_reason.as_deref(), Some("retries_exhausted"));
    assert_eq!(s.attempt, 4, "max_attempts of the test policy");
    assert_eq!(s.last_error.class.as_deref(), Some("transient"));
    assert_eq!(stats.errors.get("2"), Some(&(2 + 4)));
    assert!(h.metrics.retried_to_count("200ms") >= 5);
    h.finish().await;
}

#[tokio::test]
async fn throttling_hint_picks_a_tier_at_least_as_long() {
    let mut opts = Opts::new("throttle");
    opts.sim.regain_minutes = 1;
    let h = Harness::start(opts).await;
    h.publish_job(&job("t1", "sim:err:4:t1")).await;
    let two_minutes = format!("{}.retry.2m", h.topology.prefix);
    eventually!(
        T,
        h.depth(&two_minutes).await > 0,
        "job never reached the 2m tier"
    );
    assert_eq!(h.metrics.retried_to_count("2m"), 1);
    assert_eq!(
        h.metrics
            .settled_count(Settled::Retried, Some(Class::Throttled)),
        1
    );
    assert!(h.drain_dlq().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn invalid_jobs_and_missing_tokens_are_dead_with_a_reason() {
    let mut opts = Opts::new("invalid");
    opts.tokens = TokenStore::new(None).with_page("9876543210", Secret::new(common::TOKEN));
    let h = Harness::start(opts).await;
    let garbage = b"{\"v\": 1, \"job_id\": ".to_vec();
    h.publish_raw(&garbage, FieldTable::default()).await;
    let mut wrong = job("w1", "r");
    wrong["page_id"] = json!(42);
    h.publish_job(&wrong).await;
    let mut other_page = job("p1", "r");
    other_page["page_id"] = json!("111");
    h.publish_job(&other_page).await;
    let mut late = job("l1", "r");
    late["not_after"] = json!("2020-01-01T00:00:00Z");
    h.publish_job(&late).await;
    h.wait_settled(4, T).await;
    let dead = h.drain_dlq().await;
    let reasons = by(dead.iter().map(|d| d.story.dead_reason.clone().unwrap()));
    assert_eq!(reasons.get("invalid_job"), Some(&2), "{reasons:?}");
    assert_eq!(reasons.get("no_token"), Some(&1));
    assert_eq!(reasons.get("expired"), Some(&1));
    let g = dead
        .iter()
        .find(|d| d.body == garbage)
        .expect("garbage kept byte for byte");
    assert!(g
        .story
        .last_error
        .message
        .as_deref()
        .unwrap()
        .contains("not valid JSON"));
    let w = dead
        .iter()
        .find(|d| d.job_id().as_deref() == Some("w1"))
        .unwrap();
    assert_eq!(
        w.story.last_error.message.as_deref(),
        Some("field \"page_id\": expected a string, got a number")
    );
    let p = dead
        .iter()
        .find(|d| d.job_id().as_deref() == Some("p1"))
        .unwrap();
    assert!(p
        .story
        .last_error
        .message
        .as_deref()
        .unwrap()
        .contains("no access token for page 111"));
    assert_eq!(h.sim.stats().requests, 0, "none of these calls the API");
    h.finish().await;
}

#[tokio::test]
async fn dead_letter_headers_are_complete_and_foreign_headers_survive() {
    let h = Harness::start(Opts::new("headers")).await;
    let mut hdrs = FieldTable::default();
    hdrs.insert(
        "traceparent".into(),
        AMQPValue::LongString("00-abc-01".into()),
    );
    hdrs.insert(
        headers::ENQUEUED_AT.into(),
        AMQPValue::LongString("2026-11-24T10:00:00Z".into()),
    );
    h.publish_raw(
        &serde_json::to_vec(&job("h1", "sim:err:2300005:h1")).unwrap(),
        hdrs,
    )
    .await;
    h.wait_settled(1, T).await;
    let dead = h.drain_dlq().await;
    let names: Vec<String> = common::headers(&dead[0])
        .inner()
        .keys()
        .map(|k| k.as_str().to_string())
        .collect();
    for want in [
        headers::ATTEMPT,
        headers::FIRST_ATTEMPT_AT,
        headers::ENQUEUED_AT,
        headers::CLASS,
        headers::ERROR_CODE,
        headers::ERROR_MESSAGE,
        headers::HTTP_STATUS,
        headers::FBTRACE_ID,
        headers::DEAD_REASON,
        headers::DEAD_AT,
        headers::WORKER,
        "traceparent",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "missing {want} in {names:?}"
        );
    }
    assert!(!common::headers(&dead[0])
        .inner()
        .contains_key(&ShortString::from(headers::AMBIGUOUS)));
    // no header carries the access token
    let dump = format!("{:?}", common::headers(&dead[0]));
    assert!(!dump.contains(common::TOKEN));
    h.finish().await;
}

#[tokio::test]
async fn graceful_shutdown_under_load_loses_nothing() {
    let mut opts = Opts::new("shutdown");
    opts.sim.latency = mmsend::simulator::Latency::Fixed(Duration::from_millis(100));
    opts.concurrency = 32;
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    let n = 300u64;
    for i in 0..n {
        h.publish_job(&job(&format!("s{i}"), &format!("rc{i}")))
            .await;
    }
    h.start_worker();
    // stop mid-run
    while h.sim.stats().sent < 40 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.stop_worker().await;
    let after_stop = h.sim.stats().sent;
    let left = h.depth(&h.topology.send_queue()).await as u64;
    assert_eq!(
        after_stop + left,
        n,
        "every job is either sent or back in the queue"
    );
    assert!(left > 0, "the stop came mid-run");
    // a new worker finishes the rest
    h.start_worker();
    h.wait_settled(n, T).await;
    let stats = h.sim.stats();
    assert_eq!(stats.sent, n);
    assert_eq!(stats.duplicates, 0);
    h.finish().await;
}
