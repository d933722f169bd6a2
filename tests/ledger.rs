//! The fleet on Redis with real workers: one page paced for three workers
//! together, a budget gate closed by one worker holding the whole fleet, the
//! broker closing a worker's connection mid-run with the recipient cap on
//! (no recipient gets a second send), two copies of one job in one worker
//! at once (one call), and Redis stopped and started mid-run (nothing lost
//! or stuck, in both fail modes).

mod common;

use std::time::Duration;

use common::{eventually, job, Harness, Opts, PrivateRedis};
use mmsend::fleet::FailMode;
use mmsend::simulator::Latency;

const T: Duration = Duration::from_secs(60);

fn fleet_opts(name: &'static str) -> Opts {
    let mut opts = Opts::new(name);
    opts.redis = Some(common::redis_url());
    opts
}

#[tokio::test]
async fn three_workers_pace_one_page_together() {
    let mut opts = fleet_opts("pace3");
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    h.config.pacing.per_page = 20;
    let n = 100;
    for i in 0..n {
        h.publish_job(&job(&format!("p{i}"), &format!("r{i}")))
            .await;
    }
    h.start_worker();
    let b = h.extra_worker("b");
    let c = h.extra_worker("c");
    eventually!(
        T,
        h.sim.distinct_sent() >= n,
        "all sent: {:?}",
        h.sim.stats().sent
    );
    let stats = h.sim.stats();
    assert_eq!(stats.duplicates, 0);
    // a second's worth at once, then 20/s for the whole fleet
    let by_second = &stats.sends_by_second;
    eprintln!("sends by second: {by_second:?}");
    assert!(by_second[0] <= 40 + 2, "{by_second:?}");
    for (s, count) in by_second.iter().enumerate().skip(1) {
        assert!(*count <= 22, "second {s}: {count} sends; {by_second:?}");
    }
    assert!(
        by_second.len() >= (n - 40) / 20,
        "the run takes as long as the rate implies: {by_second:?}"
    );
    b.stop().await;
    c.stop().await;
    h.finish().await;
}

#[tokio::test]
async fn a_budget_answer_holds_the_campaign_for_the_whole_fleet() {
    let mut opts = fleet_opts("budget3");
    // the campaign's budget is reached for 3 s after its first request
    opts.sim.budget_window = Duration::from_secs(3);
    opts.policy.budget_max_age = Duration::from_secs(60);
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    h.config.gate_times.budget = Duration::from_millis(500);
    h.start_worker();
    h.publish_job(&job("first", "r-first")).await;
    eventually!(
        T,
        h.sim.stats().errors.get("2300015") == Some(&1),
        "the first answer closes the campaign"
    );
    let b = h.extra_worker("b");
    let c = h.extra_worker("c");
    for i in 0..60 {
        h.publish_job(&job(&format!("j{i}"), &format!("r{i}")))
            .await;
    }
    eventually!(
        T,
        h.sim.distinct_sent() >= 61,
        "all sent: {:?}",
        h.sim.stats()
    );
    let stats = h.sim.stats();
    // after the first answer, one probe per gate interval for the fleet:
    // 3 s / 0.5 s, give or take one at each end
    let failed = stats.errors["2300015"];
    eprintln!("budget answers: {failed}; requests {}", stats.requests);
    assert!(failed <= 1 + 6 + 2, "{failed} budget answers: {stats:?}");
    assert_eq!(stats.duplicates, 0);
    b.stop().await;
    c.stop().await;
    h.finish().await;
}

#[tokio::test]
async fn a_closed_connection_mid_run_sends_nobody_twice() {
    let mut opts = fleet_opts("ledgerclose");
    opts.sim.latency = Latency::Fixed(Duration::from_millis(50));
    opts.sim.cap_window = Some(Duration::from_secs(3600));
    opts.policy.recipient_capped_max_age = Duration::from_secs(3600);
    opts.concurrency = 32;
    let h = Harness::start(opts).await;
    let n = 600;
    for i in 0..n {
        h.publish_job(&job(&format!("c{i}"), &format!("cr{i}")))
            .await;
    }
    eventually!(T, h.sim.stats().sent >= 100, "the worker got going");
    assert_eq!(common::close_connections(&h.config.worker_id), 1);
    eventually!(
        T,
        h.sim.distinct_sent() >= n,
        "not all sent: {:?}",
        h.sim.stats().sent
    );
    h.wait_settled(n as u64, T).await;
    let stats = h.sim.stats();
    eprintln!(
        "redelivered {}, suppressed {}, suspected {}, requests {}, sent {}",
        h.metrics.redelivered_count(),
        h.metrics.duplicates_suppressed(),
        h.metrics.suspected_duplicates(),
        stats.requests,
        stats.sent
    );
    assert_eq!(stats.duplicates, 0, "no recipient got a second send");
    assert!(h.drain_dlq().await.is_empty());
    h.finish().await;
}

/// A producer that published a job twice: both copies in one worker's
/// prefetch at once, the first in its call, and the job is still called
/// once; the second copy waits and is acked as a duplicate the ledger
/// suppressed.
#[tokio::test]
async fn two_copies_of_a_job_at_once_in_one_worker_call_once() {
    let mut opts = fleet_opts("twocopies");
    opts.sim.latency = Latency::Fixed(Duration::from_millis(400));
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    h.config.gate_times.probe_wait = Duration::from_millis(200);
    let twice = job("twice", "r-twice");
    h.publish_job(&twice).await;
    h.publish_job(&twice).await;
    h.start_worker();
    h.wait_settled(2, T).await;
    let stats = h.sim.stats();
    assert_eq!(stats.requests, 1, "one call for two copies: {stats:?}");
    assert_eq!(h.metrics.duplicates_suppressed(), 1);
    assert!(h.drain_dlq().await.is_empty());
    h.finish().await;
}

async fn redis_stops_mid_run(name: &'static str, mode: FailMode) {
    let mut redis = PrivateRedis::start();
    let mut opts = Opts::new(name);
    opts.redis = Some(redis.url());
    // 16 jobs in flight, 100 ms each: 160 sends a second
    opts.sim.latency = Latency::Fixed(Duration::from_millis(100));
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    if let Some(f) = h.config.fleet.as_mut() {
        f.fail_mode = mode;
        f.op_timeout = Duration::from_millis(200);
    }
    let n = 800;
    for i in 0..n {
        h.publish_job(&job(&format!("k{i}"), &format!("kr{i}")))
            .await;
    }
    h.start_worker();
    eventually!(T, h.sim.stats().sent >= 100, "the worker got going");
    assert!(h.sim.stats().sent < 400, "Redis stops mid-run");
    redis.down();
    eventually!(T, !h.metrics.redis_up(), "the worker noticed");
    let at_down = h.sim.stats().sent;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = h.sim.stats().sent - at_down;
    eprintln!("{mode:?}: {during} sends while Redis was down");
    match mode {
        // per-process pacing and gates, no ledger: sending goes on
        FailMode::Local => assert!(during >= 50, "sent {during} while Redis was down"),
        // no send without the ledger: only calls already under way finish
        FailMode::Hold => assert!(during <= 16, "sent {during} while Redis was down"),
    }
    redis.up();
    eventually!(T, h.metrics.redis_up(), "the worker noticed Redis is back");
    h.wait_settled(n as u64, T).await;
    let stats = h.sim.stats();
    assert_eq!(h.sim.distinct_sent(), n, "zero lost");
    assert_eq!(stats.duplicates, 0);
    assert!(h.drain_dlq().await.is_empty(), "zero dead, zero stuck");
    h.finish().await;
}

#[tokio::test]
async fn redis_stopped_mid_run_in_local_mode_loses_nothing() {
    redis_stops_mid_run("redislocal", FailMode::Local).await;
}

#[tokio::test]
async fn redis_stopped_mid_run_in_hold_mode_holds_then_sends() {
    redis_stops_mid_run("redishold", FailMode::Hold).await;
}

/// Every ledger key has a time to live, so a Redis with a memory limit and
/// any policy but `noeviction` may evict `sent` records and live claims:
/// the worker refuses to start on one, unless told to start anyway, and
/// then says so in `mmsend_redis_may_evict`.
#[tokio::test]
async fn a_redis_that_may_evict_the_ledger_is_refused_at_start() {
    let redis =
        PrivateRedis::start_with(&["--maxmemory", "64mb", "--maxmemory-policy", "volatile-lru"]);
    let mut opts = Opts::idle("evicting");
    opts.redis = Some(redis.url());
    let h = Harness::start(opts).await;
    let stop = tokio_util::sync::CancellationToken::new();
    let refused = tokio::time::timeout(
        T,
        mmsend::worker::run(
            h.config.clone(),
            mmsend::metrics::Metrics::new(),
            stop.clone(),
        ),
    )
    .await
    .expect("refused at once");
    let message = refused
        .expect_err("a Redis that may evict is refused")
        .to_string();
    assert!(
        message.contains("volatile-lru")
            && message.contains("noeviction")
            && message.contains("allow_eviction"),
        "{message}"
    );

    // allowed: it runs, warns, and shows it
    let mut config = h.config.clone();
    if let Some(f) = config.fleet.as_mut() {
        f.allow_eviction = true;
    }
    let metrics = mmsend::metrics::Metrics::new();
    let task = tokio::spawn(mmsend::worker::run(config, metrics.clone(), stop.clone()));
    eventually!(T, metrics.redis_may_evict(), "mmsend_redis_may_evict is 1");
    assert!(metrics.render().contains("mmsend_redis_may_evict 1"));
    stop.cancel();
    task.await.unwrap().unwrap();
    h.finish().await;
}
