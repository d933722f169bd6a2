//! Every job ends as it truly ended (reliability round 3), with real
//! workers, the real broker and the shared Redis:
//!
//! - a `job_id` reused for a different send is dead-lettered `invalid_job`,
//!   never dropped as a duplicate; a true duplicate gets a results event;
//! - a job the broker redelivered but no worker ever called is not settled
//!   as sent because another campaign's send capped its recipient;
//! - a wait that made no call (another worker's live claim, Redis down with
//!   `fail_mode = "hold"`) spends no attempt and keeps the job's class;
//! - a burst of page rate-limit answers halves the page's rate once, not
//!   once per answer.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, job_for, Harness, Opts};
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use lapin::types::{AMQPValue, FieldTable};
use mmsend::broker::headers;
use mmsend::fleet::FailMode;
use mmsend::results::{ResultEvent, ResultOutcome};

const T: Duration = Duration::from_secs(60);

fn fleet_opts(name: &'static str) -> Opts {
    let mut opts = Opts::new(name);
    opts.redis = Some(common::redis_url());
    opts
}

/// Every event on the results stream, read from the first offset until
/// `n` have come (or 10 s passed), in order.
async fn results(h: &Harness, n: usize) -> Vec<ResultEvent> {
    let (ch, mut consumer) = h.results_consumer("endings-test", 100).await;
    let mut events = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while events.len() < n && std::time::Instant::now() < deadline {
        if let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
        {
            events.push(serde_json::from_slice::<ResultEvent>(&d.data).unwrap());
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
        }
    }
    let _ = ch.close(200, "done".into()).await;
    events
}

fn text(h: &FieldTable, name: &str) -> Option<String> {
    match h.inner().get(name)? {
        AMQPValue::LongString(s) => Some(s.to_string()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongUInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

#[tokio::test]
async fn a_reused_job_id_for_another_send_is_dead_invalid_job_and_a_true_duplicate_has_an_event() {
    let mut opts = fleet_opts("reuse");
    opts.results = true;
    let h = Harness::start(opts).await;
    // campaign 111 numbers its jobs from 1; so does campaign 222
    h.publish_job(&job_for("0000017", "recipient-a", "111"))
        .await;
    h.wait_settled(1, T).await;
    assert_eq!(h.sim.stats().sent, 1);
    h.publish_job(&job_for("0000017", "recipient-b", "222"))
        .await;
    h.wait_settled(2, T).await;
    // and the first job, published again by its producer
    h.publish_job(&job_for("0000017", "recipient-a", "111"))
        .await;
    h.wait_settled(3, T).await;

    assert_eq!(
        h.sim.stats().sent,
        1,
        "neither the reuse nor the duplicate is called"
    );
    let dead = h.drain_dlq().await;
    assert_eq!(
        dead.len(),
        1,
        "the reused id's job is a dead letter, not dropped"
    );
    let story = common::headers(&dead[0]);
    assert_eq!(
        text(&story, headers::DEAD_REASON).as_deref(),
        Some("invalid_job")
    );
    let message = text(&story, headers::ERROR_MESSAGE).unwrap_or_default();
    assert!(
        message.contains("job_id reused for a different send"),
        "{message}"
    );
    let body: serde_json::Value = serde_json::from_slice(&dead[0].body).unwrap();
    assert_eq!(
        body["subscription_token"], "recipient-b",
        "the letter is the second job"
    );

    let events = results(&h, 3).await;
    let outcomes: Vec<ResultOutcome> = events.iter().map(|e| e.outcome).collect();
    assert_eq!(
        outcomes,
        [
            ResultOutcome::Sent,
            ResultOutcome::Dead,
            ResultOutcome::Duplicate
        ],
        "{events:?}"
    );
    assert_eq!(events[1].reason.as_deref(), Some("invalid_job"));
    assert_eq!(
        events[2].tracking_id, events[0].tracking_id,
        "a duplicate's event names the send it duplicates"
    );

    // a send the ledger holds without a tracking id (settled on a 2300035,
    // or a 2xx without one): its duplicate's event has none, not ""
    sent_elsewhere(&h, "0000018", "").await;
    h.publish_job(&job_for("0000018", "recipient-c", "111"))
        .await;
    h.wait_settled(4, T).await;
    let events = results(&h, 4).await;
    assert_eq!(events.len(), 4, "{events:?}");
    assert_eq!(events[3].outcome, ResultOutcome::Duplicate);
    assert_eq!(events[3].tracking_id, None, "{events:?}");
    h.finish().await;
}

#[tokio::test]
async fn a_redelivered_job_never_called_is_not_settled_as_sent_on_another_campaigns_cap() {
    let mut opts = fleet_opts("nevercalled");
    opts.sim.cap_window = Some(Duration::from_secs(3600));
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    h.start_worker();
    // campaign 111 reaches the recipient
    h.publish_job(&job_for("x-1", "recipient-r", "111")).await;
    h.wait_settled(1, T).await;
    h.stop_worker().await;
    // campaign 222's job for the same recipient is taken by a consumer
    // that loses its connection before calling: the broker redelivers it
    h.publish_job(&job_for("y-1", "recipient-r", "222")).await;
    assert!(h.crash_holding_one().await);
    h.start_worker();
    h.wait_settled(2, T).await;

    let stats = h.sim.stats();
    assert_eq!(stats.sent, 1, "{stats:?}");
    assert!(
        stats.errors.get("2300035").is_some_and(|n| *n >= 1),
        "{stats:?}"
    );
    assert!(h.metrics.redelivered_count() >= 1);
    assert_eq!(
        h.metrics.suspected_duplicates(),
        0,
        "a fresh ledger claim proves no call was in flight: 2300035 is the other campaign's send"
    );
    let dead = h.drain_dlq().await;
    assert_eq!(
        dead.len(),
        1,
        "campaign 222's job waits for the cap, then expires"
    );
    let story = common::headers(&dead[0]);
    assert_eq!(
        text(&story, headers::CLASS).as_deref(),
        Some("recipient_capped")
    );
    assert_eq!(
        text(&story, headers::DEAD_REASON).as_deref(),
        Some("expired")
    );
    h.finish().await;
}

/// Closes `page`'s gate in the fleet for `wait` as a throttling answer
/// would.
async fn close_page_gate(h: &Harness, page: &str, wait: Duration) {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let time: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let until = time.0 * 1000 + time.1 / 1000 + wait.as_millis() as u64;
    let tag = format!("{{{}}}", h.topology.prefix);
    let gate = format!("{tag}:gate:page:{page}");
    let _: () = redis::cmd("HSET")
        .arg(&gate)
        .arg("class")
        .arg("throttled")
        .arg("code")
        .arg("2300078")
        .arg("until")
        .arg(until)
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("ZADD")
        .arg(format!("{tag}:gates"))
        .arg(until + 60_000)
        .arg(&gate)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_gate_hold_keeps_an_earlier_calls_maybe_sent() {
    let mut opts = fleet_opts("holdambiguous");
    opts.sim.cap_window = Some(Duration::from_secs(3600));
    let h = Harness::start(opts).await;
    // the recipient got this job's message: its first call timed out after
    // the request was written (the job's story says maybe sent) ...
    h.publish_job(&job_for("a-0", "recipient-h", "111")).await;
    h.wait_settled(1, T).await;
    let mut story = FieldTable::default();
    story.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(1));
    story.insert(
        headers::CLASS.into(),
        AMQPValue::LongString("transient".into()),
    );
    story.insert(headers::AMBIGUOUS.into(), AMQPValue::Boolean(true));
    story.insert(
        headers::FIRST_ATTEMPT_AT.into(),
        AMQPValue::LongString(chrono::Utc::now().to_rfc3339().into()),
    );
    // ... and its page is gated when it comes back: held without a call
    let page = common::job("x", "y")["page_id"]
        .as_str()
        .unwrap()
        .to_string();
    close_page_gate(&h, &page, Duration::from_millis(300)).await;
    let body = serde_json::to_vec(&job_for("a-1", "recipient-h", "111")).unwrap();
    h.publish_raw(&body, story).await;
    // its call after the hold is answered 2300035: the earlier call was
    // the send, settled as sent (suspected), not retried until it expires
    h.wait_settled(2, T).await;
    assert_eq!(h.settled(), (2, 0), "{:?}", h.dead_reasons().await);
    assert_eq!(h.metrics.suspected_duplicates(), 1);
    h.finish().await;
}

/// Writes a live claim of another worker on `job_id`'s ledger record.
async fn claim_elsewhere(h: &Harness, job_id: &str, lease: Duration) {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let time: (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = time.0 * 1000 + time.1 / 1000;
    let until = now_ms + lease.as_millis() as u64;
    let _: () = redis::cmd("SET")
        .arg(format!("{{{}}}:job:{job_id}", h.topology.prefix))
        .arg(format!("sending\n{until}\nother-worker:1"))
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
}

/// A job that has been tried 12 times and waits for its campaign to
/// populate (`not_ready`, bounded by age, not attempts), first tried
/// `age` ago.
fn not_ready_story(age: chrono::Duration) -> FieldTable {
    let mut story = FieldTable::default();
    story.insert(headers::ATTEMPT.into(), AMQPValue::LongUInt(12));
    story.insert(
        headers::CLASS.into(),
        AMQPValue::LongString("not_ready".into()),
    );
    story.insert(
        headers::ERROR_CODE.into(),
        AMQPValue::LongString("2300012".into()),
    );
    story.insert(
        headers::FIRST_ATTEMPT_AT.into(),
        AMQPValue::LongString((chrono::Utc::now() - age).to_rfc3339().into()),
    );
    story
}

#[tokio::test]
async fn a_wait_without_a_call_spends_no_attempt_and_keeps_the_jobs_class() {
    let h = Harness::start(fleet_opts("waitnoattempt")).await;
    // in flight on another worker for the next 400 ms
    claim_elsewhere(&h, "w-1", Duration::from_millis(400)).await;
    let body = serde_json::to_vec(&job_for("w-1", "recipient-w", "111")).unwrap();
    h.publish_raw(&body, not_ready_story(chrono::Duration::seconds(1)))
        .await;
    // it waits while the claim lives, then is sent: never dead for the
    // attempts its wait did not make
    h.wait_settled(1, T).await;
    assert_eq!(
        h.settled(),
        (1, 0),
        "sent, not dead: {:?}",
        h.dead_reasons().await
    );
    assert_eq!(h.sim.stats().sent, 1);

    // a copy behind a copy in flight waits for it whatever its age: first
    // tried past not_ready_max_age, it is not dead `expired` while the
    // other copy may yet send the job (found by the chaos run: the other
    // copy sent it, and the job had a letter and a send) ...
    // (the lease is shorter than the test's shortest delay tier but one,
    // so the wait is short; the other copy is sent inside it)
    claim_elsewhere(&h, "w-2", Duration::from_millis(450)).await;
    let body = serde_json::to_vec(&job_for("w-2", "recipient-w2", "111")).unwrap();
    h.publish_raw(&body, not_ready_story(chrono::Duration::seconds(600)))
        .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    // ... and when that copy is sent, this one is its duplicate: one end
    sent_elsewhere(&h, "w-2", "tracking-w2").await;
    h.wait_settled(2, T).await;
    assert_eq!(h.settled(), (2, 0), "{:?}", h.dead_reasons().await);
    assert_eq!(h.sim.stats().sent, 1, "the waiting copy was not called");
    h.finish().await;
}

/// Writes a sent record of `job_id` in the ledger (as a 0.2 worker did:
/// without a digest, so it stands for any send under the id).
async fn sent_elsewhere(h: &Harness, job_id: &str, tracking_id: &str) {
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("SET")
        .arg(format!("{{{}}}:job:{job_id}", h.topology.prefix))
        .arg(format!(
            "sent\n{}\n0\nother-worker:1\n{tracking_id}",
            chrono::Utc::now().timestamp_millis()
        ))
        .arg("PX")
        .arg(60_000)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
async fn waiting_for_redis_in_hold_mode_spends_no_attempt() {
    let mut opts = fleet_opts("holdnoattempt");
    // nothing listens there: Redis is down for this worker from the start
    opts.redis = Some("redis://127.0.0.1:1/".into());
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    if let Some(fleet) = h.config.fleet.as_mut() {
        fleet.fail_mode = FailMode::Hold;
        fleet.op_timeout = Duration::from_millis(200);
    }
    h.start_worker();
    let body = serde_json::to_vec(&job_for("h-1", "recipient-h", "111")).unwrap();
    h.publish_raw(&body, not_ready_story(chrono::Duration::seconds(1)))
        .await;
    eventually!(
        T,
        h.metrics.settled_counts().retried >= 5,
        "the job waits round after round ({} retries)",
        h.metrics.settled_counts().retried
    );
    assert_eq!(h.settled(), (0, 0), "dead: {:?}", h.dead_reasons().await);
    assert_eq!(h.sim.stats().requests, 0);
    h.finish().await;
}

#[tokio::test]
async fn a_burst_of_page_rate_limit_answers_halves_the_page_rate_once() {
    let mut opts = fleet_opts("halveonce");
    opts.concurrency = 16;
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    h.config.pacing.per_page = 40;
    h.config.gates = false;
    // 12 answers of 2300078 (page rate limit) arrive together
    for i in 0..12 {
        let token = format!("sim:suberr:2300078:burst{i}");
        h.publish_job(&job_for(&format!("b-{i}"), &token, "111"))
            .await;
    }
    h.start_worker();
    eventually!(
        T,
        h.sim.stats().errors.get("2300078").copied().unwrap_or(0) >= 12,
        "all 12 answered: {:?}",
        h.sim.stats().errors
    );
    let client = redis::Client::open(common::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{{{}}}:rate:page:9876543210", h.topology.prefix);
    let lowered: Option<String> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        lowered.as_deref(),
        Some("20"),
        "40/s halved once, not {lowered:?}"
    );
    let by: BTreeMap<String, usize> = common::by(h.dead_reasons().await);
    eprintln!("dead so far: {by:?}");
    h.finish().await;
}

#[tokio::test]
async fn a_worker_id_too_long_for_its_consumer_tag_is_refused_not_a_panic() {
    let h = Harness::start(Opts::idle("longworkerid")).await;
    let mut config = h.config.clone();
    config.worker_id = "w".repeat(300);
    let refused = mmsend::worker::run(
        config,
        mmsend::metrics::Metrics::new(),
        tokio_util::sync::CancellationToken::new(),
    )
    .await
    .expect_err("refused at start");
    assert!(refused.to_string().contains("at most 200"), "{refused}");
    h.finish().await;
}

#[tokio::test]
async fn a_job_claimed_but_not_called_when_the_connection_drops_is_not_settled_as_sent() {
    let mut opts = fleet_opts("claimdrop");
    opts.sim.cap_window = Some(Duration::from_secs(3600));
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    // one send a second for the page: a job's slot can be seconds away
    h.config.pacing.per_page = 1;
    h.start_worker();
    // campaign 111 reaches the recipient
    h.publish_job(&job_for("x-1", "recipient-r", "111")).await;
    h.wait_settled(1, T).await;
    // campaign 222: a filler, then the recipient's job, which is claimed
    // and waits for its pacing slot, about 2 s away
    h.publish_job(&job_for("y-0", "recipient-f", "222")).await;
    h.publish_job(&job_for("y-1", "recipient-r", "222")).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        h.sim.stats().requests,
        1,
        "y-1 waits for its slot, not called"
    );
    // the broker drops the worker's connection while y-1 waits
    assert_eq!(common::close_connections(&h.config.worker_id), 1);
    // (the filler may have been in its call: then it is sent by the old
    // session and its redelivery suppressed, and counts twice as settled)
    eventually!(
        T,
        h.metrics.settled_counts().dead >= 1,
        "y-1 ends: {:?}",
        h.metrics.settled_counts()
    );
    h.wait_settled(3, T).await;

    let stats = h.sim.stats();
    assert_eq!(stats.sent, 2, "x-1 and the filler: {stats:?}");
    assert_eq!(
        h.metrics.suspected_duplicates(),
        0,
        "y-1 was never called before: its 2300035 is campaign 111's send"
    );
    let dead = h.drain_dlq().await;
    assert_eq!(
        dead.len(),
        1,
        "y-1 waits for the cap, then expires: {:?}, {} suppressed, sim {stats:?}",
        h.metrics.settled_counts(),
        h.metrics.duplicates_suppressed()
    );
    let story = common::headers(&dead[0]);
    assert_eq!(
        text(&story, headers::CLASS).as_deref(),
        Some("recipient_capped")
    );
    h.finish().await;
}
