//! The `mmsend worker` binary under signals: SIGTERM drains and exits 0
//! losing nothing; SIGKILL loses nothing either (unacked deliveries return),
//! and the only duplicates are jobs that were in flight at the kill, each
//! seen again with the `redelivered` flag.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{job, signal, Harness, Opts};

fn spawn_worker(h: &Harness, dir: &std::path::Path, concurrency: u16, logs: Stdio) -> Child {
    spawn_worker_with(h, dir, concurrency, logs, "", &[])
}

/// [`spawn_worker`] with more TOML (`extra`) and environment (`env`, which
/// wins over the defaults).
fn spawn_worker_with(
    h: &Harness,
    dir: &std::path::Path,
    concurrency: u16,
    logs: Stdio,
    extra: &str,
    env: &[(&str, &str)],
) -> Child {
    let mut cmd = h.worker_command(dir, extra);
    cmd.env("MMSEND_CONCURRENCY", concurrency.to_string())
        .env("MMSEND_SHUTDOWN_GRACE", "20s")
        .env("MMSEND_LOG", "debug")
        .stderr(logs);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().unwrap()
}

async fn wait_sent(h: &Harness, n: u64) {
    common::eventually!(
        Duration::from_secs(30),
        h.sim.stats().sent >= n,
        "worker never got going: {:?}",
        h.sim.stats()
    );
}

async fn loaded(name: &'static str, n: usize) -> Harness {
    let mut opts = Opts::new(name);
    opts.sim.latency = mmsend::simulator::Latency::Fixed(Duration::from_millis(100));
    opts.start_worker = false;
    let h = Harness::start(opts).await;
    for i in 0..n {
        h.publish_job(&job(&format!("{name}{i}"), &format!("{name}-r{i}")))
            .await;
    }
    h
}

#[tokio::test]
async fn sigterm_drains_in_flight_jobs_and_exits_zero() {
    let mut h = loaded("sigterm", 400).await;
    let dir = common::tmpdir("sigterm");
    let mut child = spawn_worker(&h, &dir, 32, Stdio::piped());
    // read the logs as they come, or the pipe fills and the worker blocks
    let mut stderr = child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut err = String::new();
        use std::io::Read;
        stderr.read_to_string(&mut err).unwrap();
        err
    });
    wait_sent(&h, 50).await;
    signal(&child, "-TERM");
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    let status = (exit, logs.join().unwrap());
    assert!(status.0.success(), "exit status {:?}", status.0);
    assert!(status.1.contains("stopped cleanly"), "log: {}", status.1);
    // the token never reaches the logs, even at debug level
    assert!(!status.1.contains(common::TOKEN));
    let sent = h.sim.stats().sent;
    let left = h.depth(&h.topology.send_queue()).await as u64;
    assert_eq!(sent + left, 400, "sent {sent} + queued {left}");
    assert!(left > 0, "SIGTERM came mid-run");
    h.start_worker();
    h.wait_settled(400 - sent, Duration::from_secs(30)).await;
    let stats = h.sim.stats();
    assert_eq!((stats.sent, stats.duplicates), (400, 0));
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
}

#[tokio::test]
async fn sigkill_loses_nothing_and_duplicates_only_in_flight_jobs() {
    let concurrency = 32;
    let mut h = loaded("sigkill", 400).await;
    let dir = common::tmpdir("sigkill");
    let mut child = spawn_worker(&h, &dir, concurrency, Stdio::null());
    wait_sent(&h, 50).await;
    signal(&child, "-KILL");
    let _ = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap();
    let at_kill = h.sim.stats().sent;
    // an in-process worker takes over what the dead one held
    h.start_worker();
    common::eventually!(
        Duration::from_secs(40),
        h.sim.distinct_sent() >= 400,
        "not all sent: {:?}",
        h.sim.stats().sent
    );
    h.wait_settled(
        (400 - at_kill).saturating_sub(concurrency as u64),
        Duration::from_secs(30),
    )
    .await;
    let stats = h.sim.stats();
    assert_eq!(stats.sends_by_recipient.len(), 400, "every job sent");
    // A job repeats only if its ack had not reached the broker at the kill:
    // one still in flight (at most `concurrency`), or one already sent whose
    // ack waited in the batching window or on the wire. At 100 ms latency the
    // tasks finish in step, so a kill inside the window can catch a whole
    // round settled but unacked and the next round in flight: 2 × concurrency.
    let bound = 2 * concurrency as u64;
    assert!(
        stats.duplicates <= bound,
        "{} duplicates, more than the jobs in flight or settled within the ack window at the kill ({bound})",
        stats.duplicates
    );
    assert!(
        h.metrics.redelivered_count() >= stats.duplicates,
        "each duplicate was a redelivery ({} redelivered, {} duplicates)",
        h.metrics.redelivered_count(),
        stats.duplicates
    );
    assert!(h.drain_dlq().await.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
}

/// SIGKILL mid-run with Meta's one-message-per-recipient cap on: a job
/// whose call went through before the kill must never be sent again, not
/// even hours later when the cap would have lapsed.
async fn sigkill_with_the_cap_on(name: &'static str, redis: bool) {
    let concurrency = 32;
    let n = 600;
    let mut opts = Opts::new(name);
    // long calls: at the kill, the worker has ~32 calls in Meta's hands
    opts.sim.latency = mmsend::simulator::Latency::Fixed(Duration::from_millis(300));
    opts.sim.cap_window = Some(Duration::from_secs(3600));
    // capped jobs come back soon, so a wrongly capped job would be seen
    opts.policy.recipient_capped_delay = Duration::from_millis(300);
    opts.policy.recipient_capped_max_age = Duration::from_secs(3600);
    opts.redis = redis.then(common::redis_url);
    // a job in flight under the dead worker's lease waits out the lease
    // (2.5 s) in a tier before it is looked at again
    opts.tiers = vec!["200ms", "500ms", "1s", "3s", "2m"];
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    for i in 0..n {
        h.publish_job(&job(&format!("{name}{i}"), &format!("{name}-r{i}")))
            .await;
    }
    let dir = common::tmpdir(name);
    let redis_env = common::redis_url();
    let env: Vec<(&str, &str)> = if redis {
        vec![("MMSEND_REDIS_URL", redis_env.as_str())]
    } else {
        Vec::new()
    };
    let extra = "[graph]\nrequest_timeout = \"2s\"\n[redis]\nlease_margin = \"500ms\"\n[retry]\nrecipient_capped_delay = \"300ms\"\nrecipient_capped_max_age = \"1h\"\n";
    let mut child = spawn_worker_with(&h, &dir, concurrency, Stdio::null(), extra, &env);
    wait_sent(&h, n as u64 / 3).await;
    signal(&child, "-KILL");
    let _ = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap();
    // an in-process worker of the same fleet takes over
    h.start_worker();
    common::eventually!(
        Duration::from_secs(60),
        h.sim.distinct_sent() >= n,
        "not all sent: {:?}",
        h.sim.stats().sent
    );
    // every delivery settled: nothing waits in a tier
    common::eventually!(
        Duration::from_secs(30),
        h.waiting().await == 0 && h.metrics.inflight() == 0,
        "deliveries still waiting"
    );
    let stats = h.sim.stats();
    eprintln!(
        "{name}: redelivered {}, suppressed {}, suspected {}, 2300035 answers {:?}",
        h.metrics.redelivered_count(),
        h.metrics.duplicates_suppressed(),
        h.metrics.suspected_duplicates(),
        stats.errors.get("2300035")
    );
    assert_eq!(stats.sends_by_recipient.len(), n, "every job sent");
    assert_eq!(stats.duplicates, 0, "no recipient got a second send");
    assert!(
        h.metrics.suspected_duplicates() + h.metrics.duplicates_suppressed() > 0,
        "the kill caught calls in flight"
    );
    assert!(h.drain_dlq().await.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
}

#[tokio::test]
async fn sigkill_with_the_recipient_cap_on_sends_nobody_twice_with_the_ledger() {
    sigkill_with_the_cap_on("killcapledger", true).await;
}

#[tokio::test]
async fn sigkill_with_the_recipient_cap_on_sends_nobody_twice_without_redis() {
    sigkill_with_the_cap_on("killcaplocal", false).await;
}

/// Reads a child's stderr on a thread (a full pipe would block it).
fn read_logs(child: &mut Child) -> std::thread::JoinHandle<String> {
    let mut stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::Read;
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    })
}

/// Waits for the child to exit, at most `limit`; kills it (and fails) after.
async fn exits_within(mut child: Child, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let start = Instant::now();
    tokio::task::spawn_blocking(move || loop {
        if let Some(status) = child.try_wait().unwrap() {
            return (status, start.elapsed());
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the worker did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    })
    .await
    .unwrap()
}

/// `mmsend worker` (concurrency 4, logs read on a thread) on a harness
/// holding one job, `job_id` with recipient `recipient`, once the worker
/// has called the API with it. Returns the harness, the worker's
/// directory, the worker and its logs.
async fn calling_worker(
    name: &'static str,
    job_id: &str,
    recipient: &str,
    extra: &str,
    env: &[(&str, &str)],
) -> (
    Harness,
    std::path::PathBuf,
    Child,
    std::thread::JoinHandle<String>,
) {
    let h = Harness::start(Opts::idle(name)).await;
    h.publish_job(&job(job_id, recipient)).await;
    let dir = common::tmpdir(name);
    let mut child = spawn_worker_with(&h, &dir, 4, Stdio::piped(), extra, env);
    let logs = read_logs(&mut child);
    common::eventually!(
        Duration::from_secs(20),
        h.sim.requests() > 0,
        "the worker never called"
    );
    (h, dir, child, logs)
}

/// Issue 12 item 8: a graceful stop never cuts a Graph call in flight,
/// even when the grace period is shorter than the call: the grace period
/// covers jobs that wait, a call runs to its own request timeout and its
/// job is settled (here: sent and acked, not returned to be sent again).
#[tokio::test]
async fn sigterm_never_cuts_a_call_in_flight() {
    let (h, dir, child, logs) = calling_worker(
        "inflight",
        "slow",
        "sim:slow:3000:s",
        "[graph]\nrequest_timeout = \"20s\"\n",
        &[("MMSEND_SHUTDOWN_GRACE", "1s")],
    )
    .await;
    signal(&child, "-TERM");
    let (status, took) = exits_within(child, Duration::from_secs(25)).await;
    let logs = logs.join().unwrap();
    assert!(status.success(), "exit {status:?}\n{logs}");
    assert!(
        took >= Duration::from_secs(2),
        "it waited for the call ({took:?})"
    );
    assert_eq!(h.sim.sent(), 1, "the call completed");
    assert_eq!(
        h.depth(&h.topology.send_queue()).await,
        0,
        "the job was acked, not returned to be sent again\n{logs}"
    );
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
}

/// Issue 12 item 8: a second SIGTERM stops at once, even while a call is
/// in flight; the job it held goes back to the queue (nothing lost).
#[tokio::test]
async fn a_second_signal_stops_at_once() {
    let (h, dir, mut child, logs) = calling_worker(
        "twosignals",
        "hang",
        "sim:fault:hang:x",
        "[graph]\nrequest_timeout = \"60s\"\n",
        &[],
    )
    .await;
    signal(&child, "-TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first signal waits for the call"
    );
    signal(&child, "-TERM");
    let (status, took) = exits_within(child, Duration::from_secs(10)).await;
    let logs = logs.join().unwrap();
    assert_eq!(status.code(), Some(143), "{logs}");
    assert!(took < Duration::from_secs(3), "stopped at once ({took:?})");
    assert!(logs.contains("second signal"), "{logs}");
    common::eventually!(
        Duration::from_secs(10),
        h.depth(&h.topology.send_queue()).await == 1,
        "the held job went back to the queue"
    );
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
}

/// Issue 12 item 8: a node that accepts TCP but never speaks AMQP cannot
/// hold the worker: the connect gives up after its time limit (and is
/// retried), and SIGTERM during it stops the worker at once.
#[tokio::test]
async fn a_silent_broker_neither_hangs_the_connect_nor_the_stop() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // accept and hold every connection, answer nothing
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for s in listener.incoming().flatten() {
            held.push(s);
        }
    });
    let url = format!("amqp://guest:guest@127.0.0.1:{port}/%2f");
    let mut child = Command::new(env!("CARGO_BIN_EXE_mmsend"))
        .arg("worker")
        .env("MMSEND_AMQP_URL", &url)
        .env("MMSEND_PREFIX", "mmsend-test-silent")
        .env("MMSEND_ACCESS_TOKEN", common::TOKEN)
        .env("MMSEND_METRICS_ADDR", "127.0.0.1:0")
        .env("MMSEND_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let logs = read_logs(&mut child);
    // one connect attempt runs into its time limit (10 s) and is retried
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert!(child.try_wait().unwrap().is_none(), "still trying");
    signal(&child, "-TERM");
    let (status, took) = exits_within(child, Duration::from_secs(5)).await;
    let logs = logs.join().unwrap();
    assert!(status.success(), "{status:?}\n{logs}");
    assert!(
        took < Duration::from_secs(2),
        "stopped at once ({took:?})\n{logs}"
    );
    assert!(
        logs.contains("did not complete the AMQP handshake within 10 s"),
        "the connect timed out and said so\n{logs}"
    );
}

/// Issue 12 item 9: an access token with a trailing newline (a Secret
/// created from a file) used to make every request a builder error, taken
/// for a transient failure, so every job died an hour later as
/// `retries_exhausted`. It is trimmed, with a warning that names the
/// setting (or the page) and never the token; a token with whitespace
/// inside is refused at start.
#[tokio::test]
async fn a_token_with_a_trailing_newline_is_trimmed_and_said() {
    let mut opts = Opts::idle("newline");
    // the simulator accepts only the exact token
    opts.sim.access_token = Some(common::TOKEN.to_string());
    let h = Harness::start(opts).await;
    h.publish_job(&job("default-page", "nl-1")).await;
    let mut other = job("file-page", "nl-2");
    other["page_id"] = serde_json::json!("111");
    h.publish_job(&other).await;
    let dir = common::tmpdir("newline");
    let pages = dir.join("pages.json");
    std::fs::write(
        &pages,
        serde_json::json!({"111": format!("{}\n", common::TOKEN)}).to_string(),
    )
    .unwrap();
    let with_newline = format!("{}\n", common::TOKEN);
    let mut child = spawn_worker_with(
        &h,
        &dir,
        4,
        Stdio::piped(),
        "",
        &[
            ("MMSEND_ACCESS_TOKEN", with_newline.as_str()),
            ("MMSEND_PAGE_TOKENS_FILE", pages.to_str().unwrap()),
        ],
    );
    let logs = read_logs(&mut child);
    common::eventually!(
        Duration::from_secs(20),
        h.sim.sent() == 2,
        "both jobs sent with the trimmed tokens: {:?}",
        h.sim.stats()
    );
    signal(&child, "-TERM");
    let (status, _) = exits_within(child, Duration::from_secs(20)).await;
    let logs = logs.join().unwrap();
    assert!(status.success(), "{logs}");
    assert!(
        logs.contains("MMSEND_ACCESS_TOKEN has whitespace around it"),
        "{logs}"
    );
    assert!(
        logs.contains("111") && logs.contains("using them trimmed"),
        "{logs}"
    );
    assert!(!logs.contains(common::TOKEN), "the token leaked:\n{logs}");

    // whitespace inside cannot be repaired: refused at start, token unshown
    let out = Command::new(env!("CARGO_BIN_EXE_mmsend"))
        .arg("worker")
        .env("MMSEND_AMQP_URL", common::amqp_url())
        .env("MMSEND_ACCESS_TOKEN", "EAAB-half one")
        .env("MMSEND_METRICS_ADDR", "127.0.0.1:0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("MMSEND_ACCESS_TOKEN"), "{stderr}");
    assert!(!stderr.contains("EAAB"), "{stderr}");
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
}

/// A tokens file replaced the way Kubernetes does it: written aside, then
/// renamed over the old one.
fn write_tokens(path: &std::path::Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// The worker's log so far.
fn log_of(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

#[tokio::test]
async fn a_page_added_to_the_tokens_file_is_sent_for_without_a_restart() {
    let h = Harness::start(Opts::idle("tokens")).await;
    let dir = common::tmpdir("tokens");
    let tokens = dir.join("tokens.json");
    let log_path = dir.join("worker.log");
    let token_a = "EAApageAtoken0123456789abcdef";
    let token_b = "EAApageBtoken0123456789abcdef";
    write_tokens(&tokens, &format!(r#"{{"1000000001": "{token_a}"}}"#));
    let log = std::fs::File::create(&log_path).unwrap();
    let mut cmd = h.worker_command(&dir, "");
    cmd.env_remove("MMSEND_ACCESS_TOKEN")
        .env("MMSEND_PAGE_TOKENS_FILE", &tokens)
        .env("MMSEND_LOG", "info")
        .stderr(log);
    let mut child = cmd.spawn().unwrap();
    let page_job = |id: &str, page: &str| {
        let mut j = common::job(id, &format!("r-{id}"));
        j["page_id"] = serde_json::json!(page);
        j
    };
    h.publish_job(&page_job("a-1", "1000000001")).await;
    wait_sent(&h, 1).await;

    // page B is onboarded: its token is in use within 5 s, no restart
    write_tokens(
        &tokens,
        &format!(r#"{{"1000000001": "{token_a}", "1000000002": "{token_b}"}}"#),
    );
    common::eventually!(
        Duration::from_secs(5),
        log_of(&log_path).contains("page tokens reloaded"),
        "the reload in the log: {}",
        log_of(&log_path)
    );
    h.publish_job(&page_job("b-1", "1000000002")).await;
    wait_sent(&h, 2).await;

    // a broken file keeps the tokens in use and says why
    write_tokens(&tokens, r#"{"1000000001": "#);
    common::eventually!(
        Duration::from_secs(5),
        log_of(&log_path).contains("page tokens file not reloaded"),
        "the refusal in the log: {}",
        log_of(&log_path)
    );
    h.publish_job(&page_job("b-2", "1000000002")).await;
    wait_sent(&h, 3).await;

    // SIGHUP reads it again at once (fixed now, page B dropped: its jobs
    // have no token any more and are dead-lettered `no_token`)
    write_tokens(&tokens, &format!(r#"{{"1000000001": "{token_a}"}}"#));
    common::signal(&child, "-HUP");
    common::eventually!(
        Duration::from_secs(5),
        log_of(&log_path).matches("page tokens reloaded").count() >= 2,
        "the second reload in the log: {}",
        log_of(&log_path)
    );
    h.publish_job(&page_job("b-3", "1000000002")).await;
    common::eventually!(
        Duration::from_secs(10),
        h.depth(&h.topology.dead_queue()).await == 1,
        "b-3 dead for want of a token"
    );
    assert_eq!(h.sim.stats().sent, 3);

    common::signal(&child, "-TERM");
    assert!(child.wait().unwrap().success());
    let text = log_of(&log_path);
    for token in [token_a, token_b] {
        assert!(!text.contains(token), "a token in the log");
    }
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
}
