//! Faults: the broker closing the worker's connection, API faults of every
//! shape, and a corpus of bad input. Each test is bounded in time and
//! reconciles what the simulator saw, the DLQ and the queues against the
//! jobs published.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, job, Harness, Opts};
use lapin::types::FieldTable;
use serde_json::json;

#[tokio::test]
async fn worker_reconnects_after_the_broker_closes_its_connection() {
    let mut opts = Opts::new("reconnect");
    opts.sim.latency = mmsend::simulator::Latency::Fixed(Duration::from_millis(50));
    let h = Harness::start(opts).await;
    let n = 300;
    for i in 0..n {
        h.publish_job(&job(&format!("c{i}"), &format!("cr{i}")))
            .await;
    }
    eventually!(
        Duration::from_secs(20),
        h.sim.stats().sent >= 30,
        "the worker started sending: {:?}",
        h.sim.stats().sent
    );
    assert_eq!(
        common::close_connections(&h.config.worker_id),
        1,
        "found the worker's connection"
    );
    // readiness drops, then comes back
    eventually!(
        Duration::from_secs(20),
        h.metrics.reconnects() > 0 && h.metrics.is_ready(),
        "worker did not reconnect"
    );
    eventually!(
        Duration::from_secs(30),
        h.sim.distinct_sent() >= n,
        "not all sent: {:?}",
        h.sim.stats().sent
    );
    let stats = h.sim.stats();
    assert_eq!(stats.sends_by_recipient.len(), n, "every job sent");
    // A job repeats only if its ack had not reached the broker at the close:
    // one still in flight (at most `concurrency`), or one already sent whose
    // ack waited in the batching window or on the wire. At 50 ms latency the
    // 16 tasks finish in step, so a close inside the window can catch a whole
    // round settled but unacked and the next round in flight: 2 × concurrency.
    let bound = 2 * u64::from(h.config.concurrency);
    assert!(
        stats.duplicates <= bound,
        "only jobs in flight or settled within the ack window at the close may repeat: {} > {bound}",
        stats.duplicates
    );
    assert!(h.metrics.redelivered_count() >= stats.duplicates);
    assert!(h.drain_dlq().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn api_faults_get_their_classes_and_never_panic() {
    let mut opts = Opts::new("apifaults");
    opts.policy.max_attempts = 2;
    // classes only: the 429's app-wide gate would hold the others back
    opts.gates = false;
    opts.tiers = vec!["200ms", "1s", "8s"];
    let h = Harness::start(opts).await;
    let faults = [
        ("html502", "transient", Some(502)),
        ("empty500", "transient", Some(500)),
        ("truncated", "transient", Some(500)),
        ("429", "throttled", Some(429)),
        ("reset", "transient", None),
        ("hang", "transient", None),
    ];
    for (f, _, _) in &faults {
        let mut j = job(f, &format!("sim:fault:{f}:x"));
        // each on its own page and app scope would share the throttle gate;
        // that is fine, they end in the DLQ either way
        j["page_id"] = json!("1");
        h.publish_job(&j).await;
    }
    h.wait_settled(faults.len() as u64, Duration::from_secs(60))
        .await;
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), faults.len());
    for (f, class, status) in faults {
        let d = dead
            .iter()
            .find(|d| d.job_id().as_deref() == Some(f))
            .unwrap();
        assert_eq!(d.story.last_error.class.as_deref(), Some(class), "{f}");
        assert_eq!(d.story.last_error.http_status, status, "{f}");
        assert!(d.story.last_error.message.is_some(), "{f}");
        if f == "hang" || f == "reset" {
            assert!(d.story.last_error.ambiguous, "{f}: the request was sent");
        }
    }
    h.finish().await;
}

/// At least 30 bodies that are not valid v1 jobs.
fn bad_inputs() -> Vec<(String, Vec<u8>)> {
    let base = job("bad", "r");
    let with = |k: &str, v: serde_json::Value| {
        let mut j = base.clone();
        j[k] = v;
        serde_json::to_vec(&j).unwrap()
    };
    let without = |k: &str| {
        let mut j = base.clone();
        j.as_object_mut().unwrap().remove(k);
        serde_json::to_vec(&j).unwrap()
    };
    let mut out: Vec<(String, Vec<u8>)> = vec![
        ("empty".into(), b"".to_vec()),
        ("whitespace".into(), b"   \n".to_vec()),
        ("not json".into(), b"hello".to_vec()),
        ("truncated".into(), br#"{"v": 1, "job_id": "x""#.to_vec()),
        ("array".into(), b"[1,2,3]".to_vec()),
        ("number".into(), b"42".to_vec()),
        ("null".into(), b"null".to_vec()),
        ("string".into(), br#""a job""#.to_vec()),
        ("binary".into(), vec![0, 159, 146, 150, 255]),
        (
            "bom".into(),
            [
                b"\xef\xbb\xbf".as_slice(),
                &serde_json::to_vec(&base).unwrap(),
            ]
            .concat(),
        ),
        (
            "huge".into(),
            with("message", json!({"text": "x".repeat(300 * 1024)})),
        ),
        (
            "big message".into(),
            with("message", json!({"text": "y".repeat(70 * 1024)})),
        ),
        ("v2".into(), with("v", json!(2))),
        ("v string".into(), with("v", json!("1"))),
        ("v null".into(), with("v", json!(null))),
        ("bad date".into(), with("not_after", json!("next tuesday"))),
        ("date number".into(), with("not_after", json!(1764000000))),
        (
            "date no zone".into(),
            with("not_after", json!("2026-11-27T00:00:00")),
        ),
        (
            "past date".into(),
            with("not_after", json!("2001-01-01T00:00:00Z")),
        ),
        (
            "ad account letters".into(),
            with("ad_account_id", json!("act_12x")),
        ),
        (
            "ad account number".into(),
            with("ad_account_id", json!(123)),
        ),
        (
            "page unicode digits".into(),
            with("page_id", json!("１２３")),
        ),
        ("page empty".into(), with("page_id", json!(""))),
        ("message string".into(), with("message", json!("hi"))),
        ("message array".into(), with("message", json!(["hi"]))),
        ("message empty".into(), with("message", json!({}))),
        (
            "gap negative".into(),
            with("min_conversation_gap_seconds", json!(-1)),
        ),
        (
            "gap float".into(),
            with("min_conversation_gap_seconds", json!(1.5)),
        ),
        (
            "gap string".into(),
            with("min_conversation_gap_seconds", json!("60")),
        ),
        ("campaign object".into(), with("campaign", json!({"a": 1}))),
        ("job id null".into(), with("job_id", json!(null))),
        ("token bool".into(), with("subscription_token", json!(true))),
        ("job id blank".into(), with("job_id", json!(" "))),
    ];
    for field in [
        "job_id",
        "ad_account_id",
        "page_id",
        "message_id",
        "subscription_token",
    ] {
        out.push((format!("missing {field}"), without(field)));
    }
    out
}

#[tokio::test]
async fn bad_input_corpus_ends_in_the_dlq_as_invalid_job_with_a_readable_error() {
    let h = Harness::start(Opts::new("badinput")).await;
    let corpus = bad_inputs();
    assert!(corpus.len() >= 30);
    for (i, (_, body)) in corpus.iter().enumerate() {
        let mut headers = FieldTable::default();
        headers.insert(
            "case".into(),
            lapin::types::AMQPValue::LongLongInt(i as i64),
        );
        h.publish_raw(body, headers).await;
    }
    // a good job with unicode makes it through
    let mut ok = job("unicode-ok", "r-ü");
    ok["message"] = json!({"text": "Grüße 🎉 こんにちは"});
    h.publish_job(&ok).await;
    h.wait_settled(corpus.len() as u64 + 1, Duration::from_secs(30))
        .await;
    assert_eq!(h.sim.stats().sent, 1);
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), corpus.len());
    for d in &dead {
        let case = common::headers(d)
            .inner()
            .get(&lapin::types::ShortString::from("case"))
            .and_then(mmsend::broker::headers::as_int)
            .unwrap() as usize;
        let (name, body) = &corpus[case];
        let reason = d.story.dead_reason.as_deref();
        // a job whose not_after passed is valid but expired
        let want = if name == "past date" {
            "expired"
        } else {
            "invalid_job"
        };
        assert_eq!(reason, Some(want), "{name}");
        let msg = d.story.last_error.message.clone().unwrap_or_default();
        assert!(!msg.is_empty() && msg.len() < 600, "{name}: {msg}");
        assert_eq!(&d.body, body, "{name}: body kept byte for byte");
    }
    h.finish().await;
}

#[tokio::test]
async fn a_job_that_keeps_killing_its_consumer_ends_in_the_dlq_as_delivery_limit() {
    let h = Harness::start(Opts::idle("poison")).await;
    h.publish_job(&job("poison", "r")).await;
    // a consumer that dies holding the job, again and again: its channel
    // closes without an ack, so RabbitMQ requeues and counts the delivery
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut deliveries = 0;
    loop {
        match h.crash_holding_one().await {
            true => deliveries += 1,
            false if h.depth(&h.topology.dead_queue()).await == 1 => break,
            false => tokio::time::sleep(Duration::from_millis(20)).await,
        }
        assert!(
            Instant::now() < deadline,
            "never dead-lettered after {deliveries} deliveries"
        );
    }
    assert!(
        deliveries as u32 > h.topology.delivery_limit,
        "{deliveries} deliveries"
    );
    assert_eq!(h.dead_reasons().await, ["delivery_limit"]);
    h.finish().await;
}

#[tokio::test]
async fn worker_resubscribes_when_the_broker_cancels_its_consumer() {
    let h = Harness::start(Opts::new("cancel")).await;
    h.publish_job(&job("before", "before")).await;
    h.wait_settled(1, Duration::from_secs(20)).await;
    // deleting the work queue cancels the consumer server-side
    let ch = h.conn.create_channel().await.unwrap();
    ch.queue_delete(h.topology.send_queue().as_str().into(), Default::default())
        .await
        .unwrap();
    eventually!(
        Duration::from_secs(20),
        h.metrics.reconnects() > 0 && h.metrics.is_ready(),
        "worker did not resubscribe"
    );
    // the worker redeclared the queue and consumes it again
    h.publish_job(&job("after", "after")).await;
    h.wait_settled(2, Duration::from_secs(20)).await;
    assert_eq!(h.sim.stats().sends_by_recipient.get("after"), Some(&1));
    h.finish().await;
}

#[tokio::test]
async fn a_url_list_connects_to_the_first_node_that_answers() {
    let dead = "amqp://guest:sekrit@127.0.0.1:1/%2f";
    let conn = mmsend::broker::connect(&format!("{dead}, {}", common::amqp_url()), "test")
        .await
        .expect("falls through to the live node");
    assert!(conn.status().connected());
    let _ = conn.close(200, "done".into()).await;
    let err = mmsend::broker::connect(&format!("{dead},{dead}"), "test")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("127.0.0.1:1"), "{err}");
    assert!(!err.contains("sekrit"), "password redacted: {err}");
    assert!(
        err.contains("rabbitmq-server -detached"),
        "says what to do: {err}"
    );
}

/// Issue 12 item 7, measured: a job the worker holds when its connection
/// is lost (in flight or a spare) is returned by the broker, and every
/// return counts toward `x-delivery-limit` on every RabbitMQ version. A
/// quorum queue hands returned messages out first, so the reconnected
/// worker holds the same jobs again: a connection lost `delivery_limit` + 1
/// times in a row before they are processed sends innocent jobs to the DLQ
/// as `delivery_limit`. This cannot be fixed from the worker (the channel
/// is gone; nothing can be settled on it); docs/src/limits.md says how
/// to size the limit and how to replay. This test keeps the number true.
#[tokio::test]
async fn connection_losses_in_a_row_push_held_jobs_to_the_delivery_limit() {
    let mut opts = Opts::new("losses");
    opts.concurrency = 1;
    // each job is still in its call when the connection goes
    opts.sim.latency = mmsend::simulator::Latency::Fixed(Duration::from_millis(1200));
    let h = Harness::start(opts).await;
    for i in 0..10 {
        h.publish_job(&job(&format!("l{i}"), &format!("l-{i}")))
            .await;
    }
    let limit = h.topology.delivery_limit as usize;
    let mut losses = 0;
    let mut seen = 0;
    while h.depth(&h.topology.dead_queue()).await == 0 {
        assert!(losses <= limit + 2, "no job dead after {losses} losses");
        eventually!(
            Duration::from_secs(30),
            h.metrics.is_ready() && h.sim.requests() > seen,
            "worker consuming again after {losses} losses"
        );
        seen = h.sim.requests();
        assert_eq!(common::close_connections(&h.config.worker_id), 1);
        losses += 1;
        eventually!(
            Duration::from_secs(10),
            !h.metrics.is_ready() || h.depth(&h.topology.dead_queue()).await > 0,
            "the loss was noticed"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    eprintln!(
        "connection losses until a held job was dead as delivery_limit: {losses} (limit {limit})"
    );
    assert_eq!(losses, limit + 1);
    let reasons = h.dead_reasons().await;
    assert!(reasons.iter().all(|r| r == "delivery_limit"), "{reasons:?}");
    h.finish().await;
}
