//! Reliability: no job may vanish into a tier, a dead publish channel, a
//! panic or an absurd hint, and nothing from outside (a URL, a token, a
//! counter in a header) can make the worker loop, leak or overflow.
//!
//! Each test reproduces one way a job could be lost, stranded or repeated
//! without end against the real RabbitMQ, then reconciles what the
//! simulator saw with the queues.

mod common;

use std::time::Duration;

use common::{eventually, job, Harness, Opts};
use lapin::options::BasicGetOptions;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use mmsend::broker::headers;
use mmsend::classify::DeadReason;
use mmsend::metrics::PublishFailure;

fn json_props() -> BasicProperties {
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
}

/// The `x-death` RabbitMQ writes when a quorum queue's delivery limit
/// dead-letters a message, plus the 3.13+/4.x summary headers.
fn broker_death_headers(h: &Harness) -> FieldTable {
    let send = h.topology.send_queue();
    let mut entry = FieldTable::default();
    entry.insert("count".into(), AMQPValue::LongLongInt(1));
    entry.insert("reason".into(), long("delivery_limit"));
    entry.insert("queue".into(), long(&send));
    entry.insert(
        "time".into(),
        AMQPValue::Timestamp(chrono::Utc::now().timestamp() as u64),
    );
    entry.insert("exchange".into(), long(h.topology.exchange()));
    entry.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![long(&send)])),
    );
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(entry)])),
    );
    headers.insert("x-first-death-queue".into(), long(&send));
    headers.insert("x-first-death-reason".into(), long("delivery_limit"));
    headers.insert("x-first-death-exchange".into(), long(h.topology.exchange()));
    headers.insert("x-last-death-queue".into(), long(&send));
    headers.insert("x-last-death-reason".into(), long("delivery_limit"));
    headers.insert("x-last-death-exchange".into(), long(h.topology.exchange()));
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(5));
    headers
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

fn has(headers: &FieldTable, key: &str) -> bool {
    headers.inner().contains_key(&ShortString::from(key))
}

/// Waits until the simulator has sent the test's one job (`what` says how
/// it got there), then until it is settled.
async fn sent_once(h: &Harness, what: &str) {
    eventually!(
        Duration::from_secs(10),
        h.sim.sent() == 1,
        "{what}: sim {:?}, queues {:?}",
        h.sim.stats(),
        h.topology.show(&h.conn).await.unwrap()
    );
    h.wait_settled(1, Duration::from_secs(10)).await;
}

/// `mmsend dlq replay` of every dead letter; it must exit 0.
fn replay_all(h: &Harness) {
    let out = h.mmsend(&["dlq", "replay"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// Issue 12 item 1: a job the broker once dead-lettered by delivery limit
/// (so its `x-death` names `<prefix>.send`) retries through a tier. Its
/// copy must not carry `x-death`, or RabbitMQ's dead-letter cycle check
/// holds it forever between the tier and `.send`.
#[tokio::test]
async fn a_job_with_a_broker_death_history_is_retried_and_sent() {
    let h = Harness::start(Opts::new("xdeath")).await;
    let body = serde_json::to_vec(&job("xdeath", "sim:flaky:1:xd")).unwrap();
    h.publish_with(&body, json_props().with_headers(broker_death_headers(&h)))
        .await;
    sent_once(&h, "the job was retried once and then sent").await;
    assert_eq!(h.sim.stats().requests, 2, "one transient failure, one send");
    h.finish().await;
}

/// Every copy (retry, dead) is free of the broker's own death and
/// delivery headers and of the producer's `expiration`; the broker's
/// delivery-limit history lives on in `x-mmsend-delivery-limit-hits`.
#[tokio::test]
async fn copies_carry_no_broker_headers_and_no_expiration() {
    let h = Harness::start(Opts::new("strip")).await;
    let body = serde_json::to_vec(&job("strip", "sim:err:2300005:s")).unwrap();
    h.publish_with(
        &body,
        json_props()
            .with_expiration("60000".into())
            .with_headers(broker_death_headers(&h)),
    )
    .await;
    h.wait_settled(1, Duration::from_secs(10)).await;
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    for key in [
        "x-death",
        "x-first-death-queue",
        "x-first-death-reason",
        "x-first-death-exchange",
        "x-last-death-queue",
        "x-last-death-reason",
        "x-last-death-exchange",
    ] {
        assert!(
            !has(&common::headers(d), key),
            "{key} was copied: {:?}",
            common::headers(d)
        );
    }
    // a quorum queue stamps its own count on every delivery; the copy's
    // starts over instead of carrying the original's 5
    let count = common::headers(d)
        .inner()
        .get(&ShortString::from("x-delivery-count"))
        .and_then(headers::as_int);
    assert!(count.unwrap_or(0) == 0, "x-delivery-count {count:?}");
    assert_eq!(
        common::headers(d)
            .inner()
            .get(&ShortString::from(headers::DELIVERY_LIMIT_HITS))
            .and_then(headers::as_int),
        Some(1),
        "the broker's delivery-limit history is kept in mmsend's header"
    );
    assert_eq!(d.reason(), Some(DeadReason::Terminal));
    h.finish().await;
}

/// Issue 12 item 2: a job published with an AMQP `expiration` that dies
/// terminally stays in the DLQ (which has no dead-letter route: an expired
/// message there would be gone).
#[tokio::test]
async fn a_dead_letter_never_expires_with_the_producers_expiration() {
    let h = Harness::start(Opts::new("expiration")).await;
    let body = serde_json::to_vec(&job("exp", "sim:err:2300005:e")).unwrap();
    h.publish_with(&body, json_props().with_expiration("3000".into()))
        .await;
    h.wait_settled(1, Duration::from_secs(10)).await;
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 1);
    tokio::time::sleep(Duration::from_millis(4000)).await;
    assert_eq!(
        h.depth(&h.topology.dead_queue()).await,
        1,
        "the dead letter is still there after the producer's expiration"
    );
    let dead = h.drain_dlq().await;
    assert_eq!(dead[0].job_id().as_deref(), Some("exp"));
    h.finish().await;
}

/// Issue 12 item 2, the retry side: a retry copy waits its tier's time,
/// not the producer's shorter `expiration`.
#[tokio::test]
async fn a_retry_copy_waits_its_tier_not_the_producers_expiration() {
    let mut opts = Opts::new("expretry");
    // recipient_capped waits a minute: the 2m tier
    opts.policy.recipient_capped_delay = Duration::from_secs(60);
    opts.policy.recipient_capped_max_age = Duration::from_secs(3600);
    let h = Harness::start(opts).await;
    // unconsumed, the job would expire in `.send` itself after 300 ms
    eventually!(Duration::from_secs(10), h.metrics.is_ready(), "worker up");
    let body = serde_json::to_vec(&job("expretry", "sim:err:2300035:r")).unwrap();
    h.publish_with(&body, json_props().with_expiration("300".into()))
        .await;
    let tier = h
        .topology
        .tier_queue(h.topology.tier_for(Duration::from_secs(60)));
    eventually!(
        Duration::from_secs(10),
        h.depth(&tier).await == 1,
        "the job waits in {tier}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        h.sim.stats().requests,
        1,
        "the copy did not come back after 300 ms"
    );
    let ch = h.conn.create_channel().await.unwrap();
    let msg = ch
        .basic_get(tier.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the copy waits in its tier");
    assert_eq!(msg.delivery.properties.expiration(), &None);
    h.finish().await;
}

/// Issue 12 item 1 end to end, with RabbitMQ's own `x-death`: a job the
/// broker dead-lettered by delivery limit, replayed with `mmsend dlq
/// replay`, fails once transiently and must still be sent within seconds.
#[tokio::test]
async fn a_replayed_poison_job_that_retries_is_sent() {
    let mut h = Harness::start(Opts::idle("replaypoison")).await;
    h.publish_job(&job("poison", "sim:flaky:1:rp")).await;
    // a consumer that dies holding the job until the broker gives up on it
    eventually!(
        Duration::from_secs(20),
        {
            h.crash_holding_one().await;
            h.depth(&h.topology.dead_queue()).await == 1
        },
        "the broker dead-lettered the poison job"
    );
    replay_all(&h);
    // the replayed copy records the broker's verdict in mmsend's header
    let ch = h.conn.create_channel().await.unwrap();
    let msg = ch
        .basic_get(
            h.topology.send_queue().as_str().into(),
            BasicGetOptions { no_ack: false },
        )
        .await
        .unwrap()
        .expect("replayed to .send");
    let replayed = msg.delivery.properties.headers().clone().unwrap();
    assert_eq!(headers::delivery_limit_hits(Some(&replayed)), 1);
    assert!(!has(&replayed, "x-death"), "{replayed:?}");
    let _ = ch.close(200, "look only".into()).await;

    h.start_worker();
    sent_once(&h, "the replayed job was retried and sent").await;
    h.finish().await;
}

/// Issue 12 item 3: a 429 with `Retry-After: 10000000000000` once
/// overflowed time arithmetic and panicked job tasks, stranding their
/// deliveries (held, neither acked nor nacked) and the jobs after them.
/// Now the hint is clamped to a day: the throttled job waits in the
/// longest tier, the jobs behind it are sent or held back in a tier by
/// the app's throttle gate, and nothing stays in the worker's hands.
#[tokio::test]
async fn an_absurd_retry_after_strands_nothing() {
    let h = Harness::start(Opts::new("hugehint")).await;
    h.publish_job(&job("huge", "sim:fault:429huge:h")).await;
    eventually!(
        Duration::from_secs(10),
        h.sim.requests() == 1,
        "the worker called the API"
    );
    for i in 0..10 {
        h.publish_job(&job(&format!("after{i}"), &format!("after-{i}")))
            .await;
    }
    let settled = |h: &Harness| {
        let c = h.metrics.settled_counts();
        c.sent + c.retried + c.dead
    };
    eventually!(
        Duration::from_secs(10),
        settled(&h) == 11 && h.metrics.inflight() == 0,
        "every job settled: {} of 11, {} in flight",
        settled(&h),
        h.metrics.inflight()
    );
    assert_eq!(h.depth(&h.topology.send_queue()).await, 0);
    // the throttled job and every job held back by the gate wait in the
    // longest tier (the clamped day is longer than any tier)
    let longest = h.topology.tier_queue(h.topology.tiers.last().unwrap());
    let waiting = h.depth(&longest).await as u64;
    assert_eq!(
        waiting + h.sim.sent(),
        11,
        "each job was sent or waits in {longest}"
    );
    assert!(waiting >= 1, "the throttled job waits");
    h.finish().await;
}

/// Runs the mmsend binary with `args` and `env`, killing it after `limit`.
/// Returns (exit code, None if it had to be killed; stderr).
fn run_bounded(args: &[&str], env: &[(&str, &str)], limit: Duration) -> (Option<i32>, String) {
    use std::io::Read;
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mmsend"));
    cmd.args(args)
        .env("MMSEND_METRICS_ADDR", "127.0.0.1:0")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = std::time::Instant::now() + limit;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (code, reader.join().unwrap())
}

/// Issue 12 item 5: a malformed `MMSEND_AMQP_URL` (here without `//`)
/// stops the worker and every command at once with a message that names
/// the setting and never contains the password; it is not taken for a lost
/// connection and retried forever.
#[test]
fn a_malformed_amqp_url_stops_every_command_without_its_password() {
    let dir = std::env::temp_dir().join(format!("mmsend-url-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs = dir.join("jobs.jsonl");
    std::fs::write(
        &jobs,
        format!("{}\n", serde_json::to_string(&job("u1", "r")).unwrap()),
    )
    .unwrap();
    let jobs = jobs.to_str().unwrap().to_string();
    for url in [
        "amqp:guest:Pw-7f3a9c@127.0.0.1:5672",
        "amqp://guest:Pw-7f3a9c@127.0.0.1:5672/%2f,amqp:guest:Pw-7f3a9c@127.0.0.1:5672",
        "guest:Pw-7f3a9c@127.0.0.1:5672",
    ] {
        for args in [
            vec!["worker"],
            vec!["topology", "show"],
            vec!["topology", "declare"],
            vec!["dlq", "stats"],
            vec!["enqueue", jobs.as_str()],
        ] {
            let (code, stderr) = run_bounded(
                &args,
                &[
                    ("MMSEND_AMQP_URL", url),
                    ("MMSEND_ACCESS_TOKEN", common::TOKEN),
                    ("MMSEND_PREFIX", "mmsend-test-badurl"),
                    ("MMSEND_LOG", "debug"),
                ],
                Duration::from_secs(15),
            );
            assert_eq!(
                code,
                Some(2),
                "{args:?} with {url}: stops with a usage error\n{stderr}"
            );
            assert!(
                stderr.contains("MMSEND_AMQP_URL") && stderr.contains("amqp://user:password@host"),
                "{args:?} with {url}: says what to fix\n{stderr}"
            );
            assert!(
                !stderr.contains("Pw-7f3a9c"),
                "{args:?} with {url}: the password leaked\n{stderr}"
            );
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

/// Issue 12 item 3, the other half: a job task that panics settles its
/// delivery instead of holding it. The panic is reached only through the
/// worker's test hook (no input can cause one once hints are clamped); a
/// job that panics every time is retried through the transient tier and
/// dead-lettered after `max_attempts`, whatever RabbitMQ's delivery limit
/// does, with the panic as its last error. Jobs around it are untouched.
#[tokio::test]
async fn a_job_that_panics_every_time_is_bounded_and_never_held() {
    let mut h = Harness::start(Opts::idle("panic")).await;
    h.config.job_hook = Some(mmsend::worker::JobHook(std::sync::Arc::new(
        |body: &[u8]| {
            if body.windows(8).any(|w| w == b"panic-me") {
                panic!("injected by the test hook");
            }
        },
    )));
    h.start_worker();
    h.publish_job(&job("panicky", "panic-me")).await;
    for i in 0..5 {
        h.publish_job(&job(&format!("fine{i}"), &format!("fine-{i}")))
            .await;
    }
    h.wait_settled(6, Duration::from_secs(20)).await;
    assert_eq!(h.sim.sent(), 5, "the other jobs were sent");
    let max = h.config.policy.max_attempts;
    assert_eq!(
        h.metrics.job_panics(),
        u64::from(max),
        "one panic per attempt"
    );
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.job_id().as_deref(), Some("panicky"));
    assert_eq!(d.reason(), Some(DeadReason::RetriesExhausted));
    assert_eq!(d.story.attempt, max);
    let msg = d.story.last_error.message.clone().unwrap_or_default();
    assert!(
        msg.contains("panicked") && msg.contains("injected by the test hook"),
        "{msg}"
    );
    h.finish().await;
}

/// Publishes a job straight to `<prefix>.send` through the default
/// exchange (works while the topology's exchange is missing).
async fn publish_direct(h: &Harness, job: &serde_json::Value) {
    let body = serde_json::to_vec(job).unwrap();
    let send = h.topology.send_queue();
    let confirm = h.publish_to("", &send, &body, json_props()).await;
    assert!(confirm.is_ack());
}

/// Polls the simulator's request counter until `n` more requests than at
/// the start arrived; returns when each came, relative to the start.
async fn request_times(h: &Harness, n: u64, limit: Duration) -> Vec<Duration> {
    let start = std::time::Instant::now();
    let base = h.sim.requests();
    let mut seen = base;
    let mut times = Vec::new();
    while seen < base + n && start.elapsed() < limit {
        let now = h.sim.requests();
        for _ in seen..now {
            times.push(start.elapsed());
        }
        seen = now;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    times
}

/// A job that always fails transiently, to be tried exactly
/// `max_attempts` times (plus once per copy lost to a broken publish path).
fn always_transient(id: &str) -> serde_json::Value {
    job(id, &format!("sim:err:2:{id}"))
}

/// Issue 12 item 6, a dead publish channel: the exchange is deleted under a
/// running worker, so the broker closes the publish channel at the first
/// copy. The session ends (readiness drops), the worker reconnects and
/// redeclares, and the job carries on: no hot loop of API calls, no job
/// dead as `delivery_limit` for a fault of the worker's, nothing lost.
#[tokio::test]
async fn a_dead_publish_channel_ends_the_session_without_a_hot_loop() {
    let h = Harness::start(Opts::new("pubdead")).await;
    h.publish_job(&job("before", "before")).await;
    h.wait_settled(1, Duration::from_secs(10)).await;
    let ch = h.conn.create_channel().await.unwrap();
    ch.exchange_delete(h.topology.exchange().into(), Default::default())
        .await
        .unwrap();
    let _ = ch.close(200, "done".into()).await;
    publish_direct(&h, &always_transient("victim")).await;
    for i in 0..10 {
        publish_direct(&h, &job(&format!("bystander{i}"), &format!("by-{i}"))).await;
    }
    eventually!(
        Duration::from_secs(20),
        h.metrics.reconnects() >= 1 && h.metrics.is_ready(),
        "the session ended and the worker reconnected"
    );
    h.wait_settled(12, Duration::from_secs(30)).await;
    let max = u64::from(h.config.policy.max_attempts);
    let stats = h.sim.stats();
    let victim_calls = stats.errors.get("2").copied().unwrap_or(0);
    assert!(
        victim_calls <= max + 1,
        "{victim_calls} calls for a job allowed {max} attempts and one lost copy"
    );
    assert_eq!(
        stats.sends_by_recipient.len(),
        11,
        "every other job sent: {stats:?}"
    );
    assert_eq!(stats.duplicates, 0);
    assert!(h.metrics.publish_failures(PublishFailure::ChannelClosed) >= 1);
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].reason(),
        Some(DeadReason::RetriesExhausted),
        "the job used its attempts; it was not killed by the delivery limit"
    );
    h.finish().await;
}

/// Issue 12 item 6, an unroutable copy: the tier a retry needs is deleted
/// under a running worker, so its copy comes back `Returned`. The failure
/// is counted, the session ends and the reconnect redeclares the tier; the
/// job is not requeued at once and called again in a loop (which on
/// RabbitMQ ≤ 4.2 ended with it dead as `delivery_limit`, and on 4.3+,
/// where a nack does not count, never ended).
#[tokio::test]
async fn an_unroutable_copy_is_counted_and_the_tier_redeclared_without_a_hot_loop() {
    let h = Harness::start(Opts::new("returned")).await;
    // the worker declares on start: delete after that
    eventually!(Duration::from_secs(10), h.metrics.is_ready(), "worker up");
    let first_tier = h.topology.tier_queue(&h.topology.tiers[0]);
    let ch = h.conn.create_channel().await.unwrap();
    ch.queue_delete(first_tier.as_str().into(), Default::default())
        .await
        .unwrap();
    let _ = ch.close(200, "done".into()).await;
    h.publish_job(&always_transient("victim")).await;
    let times = request_times(&h, 2, Duration::from_secs(20)).await;
    assert_eq!(
        times.len(),
        2,
        "the job was called again after the reconnect"
    );
    let gap = times[1] - times[0];
    assert!(
        gap >= Duration::from_millis(100),
        "the second call came {gap:?} after the first: a hot loop"
    );
    h.wait_settled(1, Duration::from_secs(30)).await;
    assert!(
        h.metrics.publish_failures(PublishFailure::Returned) >= 1,
        "{}",
        h.metrics.render()
    );
    assert!(h.metrics.reconnects() >= 1);
    let max = u64::from(h.config.policy.max_attempts);
    let calls = h.sim.requests();
    assert!(calls <= max + 1, "{calls} calls");
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason(), Some(DeadReason::RetriesExhausted));
    assert!(h.depth(&first_tier).await == 0, "the tier exists again");
    h.finish().await;
}

/// Issue 12 item 7, second half: every return of a delivery counts toward
/// the work queue's `x-delivery-limit` (on RabbitMQ ≤ 4.2 a nack too; on
/// 4.3+ a channel close still does). A worker used to return its spare
/// prefetched deliveries at each graceful stop, and a quorum queue hands
/// returned messages out first, so the next worker held them as spares
/// again: the same innocent jobs were returned stop after stop until the
/// broker dead-lettered them as `delivery_limit`. Measured with this test
/// on 3.10.8, spares returned at each stop (delivery limit 5, one job in
/// flight, 23 spares, 100 ms per call, a stop as soon as the first call is
/// made): the first innocent job died at the 6th stop. Now a graceful stop
/// finishes its spares within the grace period: after more stops than
/// that, no job is dead and each is sent exactly once.
#[tokio::test]
async fn graceful_stops_never_push_an_innocent_job_to_the_delivery_limit() {
    let mut opts = Opts::idle("stops");
    opts.concurrency = 1;
    opts.sim.latency = mmsend::simulator::Latency::Fixed(Duration::from_millis(100));
    let mut h = Harness::start(opts).await;
    h.config.prefetch = 24;
    let n = 220;
    for i in 0..n {
        h.publish_job(&job(&format!("s{i}"), &format!("s-{i}")))
            .await;
    }
    let limit = h.topology.delivery_limit as usize;
    let stops = limit + 3;
    let mut first_dead = None;
    for stop in 1..=stops {
        let before = h.sim.requests();
        h.start_worker();
        eventually!(
            Duration::from_secs(10),
            h.sim.requests() > before,
            "worker {stop} is calling"
        );
        h.stop_worker().await;
        if first_dead.is_none() && h.depth(&h.topology.dead_queue()).await > 0 {
            first_dead = Some(stop);
        }
    }
    eprintln!(
        "graceful stops: {stops} (delivery limit {limit}); first innocent job dead at stop {first_dead:?}"
    );
    assert_eq!(
        first_dead, None,
        "an innocent job reached the delivery limit"
    );
    h.config.concurrency = 32;
    h.start_worker();
    h.wait_settled(n, Duration::from_secs(30)).await;
    let stats = h.sim.stats();
    assert_eq!(
        (stats.sends_by_recipient.len() as u64, stats.duplicates),
        (n, 0)
    );
    assert!(h.drain_dlq().await.is_empty());
    h.finish().await;
}

/// Issue 12 item 9: counters from headers near `u32::MAX` saturate. An
/// attempt count at (or beyond) the limit is at the limit: the job is tried
/// once and dies `retries_exhausted` with the API's error, without a panic
/// or a wrap to 0 that would start its attempts over. A replay count at the
/// limit stays there through `dlq replay`.
#[tokio::test]
async fn counters_near_their_limit_saturate() {
    let h = Harness::start(Opts::new("saturate")).await;
    for (id, attempt) in [("max", i64::from(u32::MAX)), ("beyond", 1i64 << 40)] {
        let mut headers = FieldTable::default();
        headers.insert(headers::ATTEMPT.into(), AMQPValue::LongLongInt(attempt));
        h.publish_raw(&serde_json::to_vec(&always_transient(id)).unwrap(), headers)
            .await;
    }
    h.wait_settled(2, Duration::from_secs(10)).await;
    assert_eq!(h.sim.requests(), 2, "each tried once");
    assert_eq!(h.metrics.job_panics(), 0);
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 2);
    for d in &dead {
        assert_eq!(d.story.attempt, u32::MAX, "{:?}", d.job_id());
        assert_eq!(d.reason(), Some(DeadReason::RetriesExhausted));
        assert_eq!(
            d.story.last_error.code,
            Some(2),
            "the API's error, not a panic"
        );
    }

    // a dead letter replayed u32::MAX times already
    let mut headers = FieldTable::default();
    headers.insert(
        headers::REPLAYS.into(),
        AMQPValue::LongLongInt(i64::from(u32::MAX)),
    );
    headers.insert(headers::DEAD_REASON.into(), long("terminal"));
    h.publish_to(
        h.topology.exchange(),
        &h.topology.dead_queue(),
        &serde_json::to_vec(&job("replayed", "sim:err:2300005:z")).unwrap(),
        json_props().with_headers(headers),
    )
    .await;
    replay_all(&h);
    h.wait_settled(3, Duration::from_secs(10)).await;
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].story.replays, u32::MAX);
    h.finish().await;
}
