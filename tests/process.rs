//! The `mmsend worker` binary under signals: SIGTERM drains and exits 0
//! losing nothing; SIGKILL loses nothing either (unacked deliveries return),
//! and the only duplicates are jobs that were in flight at the kill, each
//! seen again with the `redelivered` flag.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{job, Harness, Opts};

fn spawn_worker(h: &Harness, dir: &std::path::Path, concurrency: u16, logs: Stdio) -> Child {
    let config = dir.join("mmsend.toml");
    let tiers: Vec<String> = h
        .topology
        .tiers
        .iter()
        .map(|t| format!("{:?}", t.name))
        .collect();
    std::fs::write(
        &config,
        format!(
            "[topology]\ntiers = [{}]\ndelivery_limit = {}\n[pacing]\nper_page = 0\n",
            tiers.join(", "),
            h.topology.delivery_limit
        ),
    )
    .unwrap();
    Command::new(env!("CARGO_BIN_EXE_mmsend"))
        .arg("worker")
        .env("MMSEND_AMQP_URL", common::amqp_url())
        .env("MMSEND_PREFIX", &h.topology.prefix)
        .env("MMSEND_CONFIG", &config)
        .env("MMSEND_GRAPH_BASE_URL", h.sim.base_url())
        .env("MMSEND_ACCESS_TOKEN", common::TOKEN)
        .env("MMSEND_METRICS_ADDR", "127.0.0.1:0")
        .env("MMSEND_CONCURRENCY", concurrency.to_string())
        .env("MMSEND_SHUTDOWN_GRACE", "20s")
        .env("MMSEND_LOG", "debug")
        .stdout(Stdio::null())
        .stderr(logs)
        .spawn()
        .unwrap()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

async fn wait_sent(h: &Harness, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while h.sim.stats().sent < n {
        assert!(
            Instant::now() < deadline,
            "worker never got going: {:?}",
            h.sim.stats()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mmsend-{name}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&d).unwrap();
    d
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
    let dir = tmpdir("sigterm");
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
    let dir = tmpdir("sigkill");
    let mut child = spawn_worker(&h, &dir, concurrency, Stdio::null());
    wait_sent(&h, 50).await;
    signal(&child, "-KILL");
    let _ = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap();
    let at_kill = h.sim.stats().sent;
    // an in-process worker takes over what the dead one held
    h.start_worker();
    let deadline = Instant::now() + Duration::from_secs(40);
    while h.sim.distinct_sent() < 400 {
        assert!(
            Instant::now() < deadline,
            "not all sent: {:?}",
            h.sim.stats().sent
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    h.wait_settled(
        (400 - at_kill).saturating_sub(concurrency as u64),
        Duration::from_secs(30),
    )
    .await;
    let stats = h.sim.stats();
    assert_eq!(stats.sends_by_recipient.len(), 400, "every job sent");
    assert!(
        stats.duplicates <= concurrency as u64,
        "{} duplicates, more than the {concurrency} in flight",
        stats.duplicates
    );
    assert!(
        h.metrics.redelivered.get() >= stats.duplicates,
        "each duplicate was a redelivery ({} redelivered, {} duplicates)",
        h.metrics.redelivered.get(),
        stats.duplicates
    );
    assert!(h.drain_dlq().await.is_empty());
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
}
