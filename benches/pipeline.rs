//! The pipeline benchmark: mmsend's throughput against the ceilings of its
//! two dependencies and against a reference Python worker, all measured in
//! one run on the same machine, the same RabbitMQ and the in-process Graph
//! API simulator, so the ratios mean something on a noisy machine.
//!
//! ```sh
//! cargo bench --bench pipeline                      # all of it (a few minutes)
//! MMSEND_BENCH_JOBS=5000 cargo bench --bench pipeline -- W C1 C2   # a subset
//! ```
//!
//! | id | what | target |
//! |---|---|---|
//! | C1@p | broker ceiling at prefetch p (64, 128, 256, 512, 1024): raw lapin consume + ack (awaited one by one) of N real-size jobs from the real work queue (quorum, delivery limit, DLX), no HTTP | |
//! | C1 | the best of the C1@p rows | |
//! | C2 | HTTP ceiling: raw reqwest POSTs to the simulator, same concurrency, no broker | |
//! | W  | the `mmsend worker` binary end to end (consume → send → ack), concurrency 64, simulator at 0 ms; best of three runs | ≥ 0.7 × best C1; ≤ 40 µs CPU/job |
//! | WL | W with the send ledger on (`MMSEND_REDIS_URL`, `MMSEND_BENCH_REDIS_URL` overrides); run alternately with W (three rounds, in turn W first and WL first), best of three; its ratio to W is the median of the rounds' ratios (the two runs of a round are next to each other, so the machine's drift over seconds cancels); Redis round trips per job from the worker's metrics | ≥ 0.8 × W; ≤ 2 round trips/job |
//! | Py | `benches/python_worker.py` (aio-pika + aiohttp, prefetch = concurrency = 64) on the same jobs and simulator; best of two runs | W ≥ 4 × Py |
//! | L  | the worker with 50 ms simulator latency at concurrency 128 and 512 | L128: Little's-law efficiency ≥ 0.9; L512: ≥ 0.8 × min(Little's law, best C1) |
//! | R  | retry storm: jobs answered 2300012 wait in delay tiers; worker CPU per job while they wait, and the drain | |
//! | P  | `enqueue` (library producer) confirmed publish rate vs raw lapin confirmed publishing | |
//! | M  | worker peak RSS (VmHWM) at concurrency 64 and 512 under load | M64 ≤ 64 MiB; M512 ≤ 128 MiB |
//!
//! The simulator serves on a thread of its own (one current-thread runtime,
//! as `mmsend simulate` serves by default), not on the bench's scheduler,
//! which the C1 and C2 clients use. The workers run as child processes so
//! their CPU time and memory are their own (`MMSEND_BENCH_WORKER_LOG=<file>`
//! keeps mmsend's debug log).
//! Py sets up its own virtualenv in `bench-venv` under cargo's
//! `CARGO_TARGET_TMPDIR` (`target/tmp/` by default; `python3 -m venv`,
//! `pip install aio-pika aiohttp`; `MMSEND_BENCH_PYTHON` names another
//! interpreter) and reuses it; without Python or pip the row says why it
//! was skipped, as WL does without Redis. Results are printed as a table,
//! each target checked against the numbers of the same run, and written to
//! `bench-pipeline.json` in `CARGO_TARGET_TMPDIR`.

#[path = "common/select.rs"]
mod select;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use mmsend::broker::{self, Topology};
use mmsend::fleet::{Fleet, FleetConfig};
use mmsend::metrics::Metrics;
use mmsend::producer::{self, Producer};
use mmsend::simulator::{Latency, SimConfig, SimHandle, Simulator};
use serde_json::{json, Value};

fn amqp_url() -> String {
    std::env::var("MMSEND_AMQP_URL").unwrap_or_else(|_| broker::DEFAULT_AMQP_URL.to_string())
}

fn jobs() -> usize {
    std::env::var("MMSEND_BENCH_JOBS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20_000)
}

fn job_body(i: usize, recipient: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"v": 1, "job_id": format!("b{i}"), "ad_account_id": "1234567890",
        "page_id": "9876543210", "message_id": "120210000000000000",
        "subscription_token": recipient, "message": {"text": "Hi {{first_name}}, new deals are in!"},
        "campaign": "bench"}))
    .unwrap()
}

struct Bench {
    conn: Connection,
    topology: Topology,
}

impl Bench {
    async fn new(name: &str) -> Bench {
        let conn = broker::connect(&amqp_url(), "bench")
            .await
            .expect("RabbitMQ must be running");
        let prefix = format!(
            "mmsend-bench-{name}-{:06x}",
            rand::random::<u32>() & 0xffffff
        );
        let topology = Topology::new(&prefix, &TIERS, 10).unwrap();
        topology.declare(&conn).await.unwrap();
        Bench { conn, topology }
    }

    /// Publishes `n` jobs as fast as confirms allow.
    async fn fill(&self, n: usize, recipient: impl Fn(usize) -> String) {
        let p = Producer::on(&self.conn, &self.topology)
            .await
            .unwrap()
            .with_max_inflight(512);
        let bodies: Vec<Vec<u8>> = (0..n).map(|i| job_body(i, &recipient(i))).collect();
        let results = p.send_batch(bodies.iter().map(|b| b.as_slice())).await;
        assert!(results.iter().all(|r| r.is_ok()));
        p.close().await;
    }

    async fn depth(&self) -> u32 {
        self.topology.show(&self.conn).await.unwrap()[0].messages
    }

    async fn done(self) {
        self.topology.delete(&self.conn).await.unwrap();
        let _ = self.conn.close(200, "bench done".into()).await;
    }
}

/// Delay tiers of the bench topology: 5 s is the gates' probe wait, 30 s
/// the `not_ready` delay of the retry storm.
const TIERS: [&str; 3] = ["1s", "5s", "30s"];

/// The worker binary on `bench`'s topology; `env` adds to (or overrides)
/// its environment.
fn spawn_worker(b: &Bench, sim: &SimHandle, concurrency: u16, env: &[(&str, String)]) -> Child {
    let dir = std::env::temp_dir().join(format!("mmsend-bench-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("mmsend.toml");
    std::fs::write(
        &config,
        format!(
            "[topology]\ntiers = {TIERS:?}\n[pacing]\nper_page = 0\n[retry]\nnot_ready_delay = \"30s\"\n"
        ),
    )
    .unwrap();
    let exe = env!("CARGO_BIN_EXE_mmsend");
    Command::new(exe)
        .arg("worker")
        .env("MMSEND_AMQP_URL", amqp_url())
        .env("MMSEND_PREFIX", &b.topology.prefix)
        .env("MMSEND_CONFIG", &config)
        .env("MMSEND_GRAPH_BASE_URL", sim.base_url())
        .env("MMSEND_ACCESS_TOKEN", "bench-token")
        .env("MMSEND_METRICS_ADDR", "127.0.0.1:0")
        .env("MMSEND_CONCURRENCY", concurrency.to_string())
        .env(
            "MMSEND_LOG",
            std::env::var("MMSEND_BENCH_WORKER_LOG").map_or("warn", |_| "mmsend=debug"),
        )
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        // MMSEND_BENCH_WORKER_LOG=<file>: the worker's debug log goes there
        .stderr(match std::env::var("MMSEND_BENCH_WORKER_LOG") {
            Ok(path) => Stdio::from(std::fs::File::create(path).expect("worker log file")),
            Err(_) => Stdio::null(),
        })
        .spawn()
        .expect("the mmsend binary")
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

/// (user + system CPU seconds, peak RSS KiB) of a process, from /proc.
fn proc_usage(pid: u32) -> (f64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|s| s.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // fields after the command: state is 0, utime is 11, stime is 12
    let cpu = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    (cpu, hwm)
}

/// An in-process simulator that answers every call after `latency`.
async fn slow_sim(latency: Duration) -> SimHandle {
    Simulator::start_on_own_thread(
        "127.0.0.1:0",
        SimConfig {
            latency: Latency::Fixed(latency),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap()
}

async fn wait_sent(sim: &SimHandle, n: u64, limit: Duration) -> Duration {
    let t = Instant::now();
    while sim.sent() < n {
        assert!(t.elapsed() < limit, "stuck at {} of {n}", sim.sent());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    t.elapsed()
}

/// C1: consume + ack, nothing else.
async fn broker_ceiling(n: usize, prefetch: u16) -> f64 {
    let b = Bench::new("c1").await;
    b.fill(n, |i| format!("r{i}")).await;
    let ch = b.conn.create_channel().await.unwrap();
    ch.basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let mut consumer = ch
        .basic_consume(
            b.topology.send_queue().as_str().into(),
            "c1".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let t = Instant::now();
    let mut got = 0;
    while got < n {
        let d = consumer.next().await.unwrap().unwrap();
        // parse like the worker does, so the ceiling is not just the socket
        let _: Value = serde_json::from_slice(&d.data).unwrap();
        d.acker.ack(BasicAckOptions::default()).await.unwrap();
        got += 1;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    let _ = ch.close(200, "done".into()).await;
    b.done().await;
    rate
}

/// C2: POSTs at `concurrency`, nothing else.
async fn http_ceiling(sim: &SimHandle, n: usize, concurrency: usize) -> f64 {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .build()
        .unwrap();
    let url = format!("{}/v24.0/act_1234567890/messages", sim.base_url());
    let t = Instant::now();
    let ok = futures_util::stream::iter(0..n)
        .map(|i| {
            let http = http.clone();
            let url = url.clone();
            async move {
                let body = json!({"message_id": "120210000000000000",
                    "messenger_delivery_data": {"subscription_token": format!("c2-{i}")},
                    "message": {"text": "Hi"}});
                http.post(&url)
                    .bearer_auth("t")
                    .json(&body)
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
            }
        })
        .buffer_unordered(concurrency)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    assert_eq!(ok, n);
    n as f64 / t.elapsed().as_secs_f64()
}

/// One run of a worker (mmsend or the Python reference) on pre-published
/// jobs.
#[derive(Clone, Copy, Default)]
struct Run {
    /// Jobs per second from the first send to the last.
    rate: f64,
    /// Peak RSS, KiB.
    hwm_kib: u64,
    /// The worker process's user + system CPU per job, µs.
    cpu_us: f64,
    /// The worker's Redis round trips (WL only), all ops.
    redis_calls: u64,
    /// ... of which `before` and `after`, the per-job ones (the rest is
    /// housekeeping: the gate census, pings).
    redis_per_job_calls: u64,
}

/// W / L / M: the worker binary on n pre-published jobs.
async fn worker_run(sim: &SimHandle, n: usize, concurrency: u16) -> Run {
    sim.reset();
    let b = Bench::new("w").await;
    b.fill(n, |i| format!("w{i}")).await;
    let child = spawn_worker(&b, sim, concurrency, &[]);
    let pid = child.id();
    // time from the first send, so process start-up is not counted
    wait_sent(sim, 1, Duration::from_secs(30)).await;
    let t = Instant::now();
    wait_sent(sim, n as u64, Duration::from_secs(600)).await;
    let rate = (n - 1) as f64 / t.elapsed().as_secs_f64();
    let (cpu, hwm) = proc_usage(pid);
    stop(child);
    assert_eq!(sim.stats().duplicates, 0);
    b.done().await;
    Run {
        rate,
        hwm_kib: hwm,
        cpu_us: cpu / n as f64 * 1e6,
        ..Run::default()
    }
}

/// The Redis of WL.
fn redis_url() -> String {
    std::env::var("MMSEND_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The fleet layer's client for a prefix (WL's checks and clean-up).
fn fleet(url: &str, prefix: &str) -> Result<Fleet, String> {
    Fleet::new(FleetConfig::new(url), prefix, "bench", Metrics::new()).map_err(|e| e.to_string())
}

/// Whether WL can run: Redis answers a PING.
async fn redis_reachable(url: &str) -> Result<(), String> {
    let f = fleet(url, "mmsend-bench-probe")?;
    match tokio::time::timeout(Duration::from_secs(3), f.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("Redis is not reachable: {e}")),
        Err(_) => Err("Redis is not reachable: no answer to PING in 3 s".into()),
    }
}

/// A free port on 127.0.0.1 (bound, then let go) for a worker's metrics.
fn free_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// The worker's Redis round trips from its `/metrics`: (all ops, `before`,
/// `after` and `before_after`).
async fn redis_round_trips(addr: SocketAddr) -> (u64, u64) {
    let text = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .and_then(|r| r.error_for_status())
        .expect("the worker's /metrics")
        .text()
        .await
        .unwrap();
    let (mut all, mut per_job) = (0, 0);
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("mmsend_redis_request_duration_seconds_count") else {
            continue;
        };
        let count = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
        all += count;
        if ["before", "after", "before_after"]
            .iter()
            .any(|op| rest.contains(&format!("op=\"{op}\"")))
        {
            per_job += count;
        }
    }
    (all, per_job)
}

/// WL: W with the send ledger on `redis`; counts the worker's Redis round
/// trips, then deletes the keys of the run's prefix.
async fn ledger_run(sim: &SimHandle, n: usize, concurrency: u16, redis: &str) -> Run {
    sim.reset();
    let b = Bench::new("wl").await;
    b.fill(n, |i| format!("wl{i}")).await;
    let metrics = free_addr();
    let child = spawn_worker(
        &b,
        sim,
        concurrency,
        &[
            ("MMSEND_REDIS_URL", redis.to_string()),
            ("MMSEND_METRICS_ADDR", metrics.to_string()),
        ],
    );
    let pid = child.id();
    wait_sent(sim, 1, Duration::from_secs(30)).await;
    let t = Instant::now();
    wait_sent(sim, n as u64, Duration::from_secs(600)).await;
    let rate = (n - 1) as f64 / t.elapsed().as_secs_f64();
    let (cpu, hwm) = proc_usage(pid);
    // the last sends' `after` calls may still be on their way: read until
    // the count stands still
    let settle = Instant::now();
    let mut counts = redis_round_trips(metrics).await;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let again = redis_round_trips(metrics).await;
        if again.1 == counts.1 || settle.elapsed() > Duration::from_secs(5) {
            counts = again;
            break;
        }
        counts = again;
    }
    let (all, per_job) = counts;
    stop(child);
    assert_eq!(sim.stats().duplicates, 0);
    match fleet(redis, &b.topology.prefix) {
        Ok(f) => {
            if let Err(e) = f.delete_all().await {
                eprintln!("WL: the ledger keys of {} stay: {e}", b.topology.prefix);
            }
        }
        Err(e) => eprintln!("WL: the ledger keys of {} stay: {e}", b.topology.prefix),
    }
    b.done().await;
    Run {
        rate,
        hwm_kib: hwm,
        cpu_us: cpu / n as f64 * 1e6,
        redis_calls: all,
        redis_per_job_calls: per_job,
    }
}

/// Py: the reference worker's interpreter, with aio-pika and aiohttp, in a
/// virtualenv `bench-venv` under `CARGO_TARGET_TMPDIR` (made on first use,
/// then reused).
/// Also returns "aio-pika x, aiohttp y, Python z".
fn python_env() -> Result<(PathBuf, String), String> {
    let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench-venv");
    let python = venv.join("bin/python");
    let versions = |python: &Path| -> Option<String> {
        let out = Command::new(python)
            .args([
                "-c",
                "import sys, aiohttp, importlib.metadata as m; \
                 print(f\"aio-pika {m.version('aio-pika')}, aiohttp {aiohttp.__version__}, \
                 Python {sys.version.split()[0]}\")",
            ])
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    if let Some(v) = versions(&python) {
        return Ok((python, v));
    }
    let last_line = |out: &std::process::Output| {
        let text = String::from_utf8_lossy(&out.stderr);
        text.lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("")
            .to_string()
    };
    let base = std::env::var("MMSEND_BENCH_PYTHON").unwrap_or_else(|_| "python3".into());
    println!(
        "Py: setting up {} (python -m venv, pip install aio-pika aiohttp)",
        venv.display()
    );
    let out = Command::new(&base)
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .map_err(|e| format!("no {base}: {e}"))?;
    if !out.status.success() {
        return Err(format!("{base} -m venv failed: {}", last_line(&out)));
    }
    let out = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "aio-pika",
            "aiohttp",
        ])
        .output()
        .map_err(|e| format!("no pip in the venv: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "pip install aio-pika aiohttp failed: {}",
            last_line(&out)
        ));
    }
    versions(&python)
        .map(|v| (python, v))
        .ok_or_else(|| "aio-pika or aiohttp do not import after pip install".into())
}

/// Py: `benches/python_worker.py` on n pre-published jobs, timed like
/// [`worker_run`]. An error says why it could not run.
async fn python_run(
    sim: &SimHandle,
    n: usize,
    concurrency: u16,
    python: &Path,
) -> Result<Run, String> {
    sim.reset();
    let b = Bench::new("py").await;
    b.fill(n, |i| format!("py{i}")).await;
    let log = std::env::temp_dir().join(format!("mmsend-bench-py-{}.log", rand::random::<u32>()));
    let mut child = Command::new(python)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/benches/python_worker.py"
        ))
        .env("MMSEND_AMQP_URL", amqp_url())
        .env("MMSEND_PREFIX", &b.topology.prefix)
        .env("MMSEND_GRAPH_BASE_URL", sim.base_url())
        .env("MMSEND_ACCESS_TOKEN", "bench-token")
        .env("MMSEND_CONCURRENCY", concurrency.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", python.display()))?;
    let pid = child.id();
    // like wait_sent, but a Python worker that dies or stalls is an answer
    let mut wait = async |target: u64, limit: Duration| -> Result<(), String> {
        let t = Instant::now();
        while sim.sent() < target {
            if let Ok(Some(status)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let last = text.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
                return Err(format!("the Python worker exited ({status}): {last}"));
            }
            if t.elapsed() > limit {
                return Err(format!(
                    "the Python worker stalled at {} of {target}",
                    sim.sent()
                ));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    };
    let mut result = wait(1, Duration::from_secs(60)).await;
    let t = Instant::now();
    if result.is_ok() {
        result = wait(n as u64, Duration::from_secs(600)).await;
    }
    let rate = (n - 1) as f64 / t.elapsed().as_secs_f64();
    let (cpu, hwm) = proc_usage(pid);
    stop(child);
    let _ = std::fs::remove_file(&log);
    b.done().await;
    result?;
    Ok(Run {
        rate,
        hwm_kib: hwm,
        cpu_us: cpu / n as f64 * 1e6,
        ..Run::default()
    })
}

/// R: every job answers 2300012 for `window` (shorter than the 30 s
/// `not_ready` delay). The first pass parks every job in the 30 s tier (the
/// first failures close the campaign's gate, the rest go without an API
/// call); then the broker holds them while the worker idles; then they come
/// back, one probe reopens the gate, and they drain.
/// Returns (CPU µs per job to park, % of a core while waiting, drain s).
async fn retry_storm(n: usize, window: Duration) -> (f64, f64, f64) {
    let sim = Simulator::start_on_own_thread(
        "127.0.0.1:0",
        SimConfig {
            populating: window,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let b = Bench::new("r").await;
    b.fill(n, |i| format!("r{i}")).await;
    let child = spawn_worker(&b, &sim, 64, &[]);
    let pid = child.id();
    let started = Instant::now();
    // first pass: every job tried once or gated into the 30 s tier
    while b.depth().await > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (cpu_pass, _) = proc_usage(pid);
    // waiting: the broker holds the jobs; the worker's CPU meanwhile
    let quiet_start = Instant::now();
    let until = Duration::from_secs(29).saturating_sub(started.elapsed());
    tokio::time::sleep(until).await;
    let quiet_cpu = proc_usage(pid).0 - cpu_pass;
    let quiet_secs = quiet_start.elapsed().as_secs_f64().max(0.001);
    let drain_start = Instant::now();
    wait_sent(&sim, n as u64, Duration::from_secs(600)).await;
    let drain = drain_start.elapsed().as_secs_f64();
    stop(child);
    let stats = sim.stats();
    assert_eq!(stats.sends_by_recipient.len(), n, "every job sent");
    assert_eq!(stats.duplicates, 0, "none twice");
    b.done().await;
    sim.shutdown().await;
    (
        cpu_pass / n as f64 * 1e6,
        quiet_cpu / quiet_secs * 100.0,
        drain,
    )
}

/// P: the producer vs raw confirmed publishing of the same bodies. Each
/// side runs twice, alternating, on a fresh queue each time; the best of
/// each counts (the broker's first round on a new queue is often slower).
async fn publish(n: usize) -> (f64, f64) {
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| job_body(i, &format!("p{i}"))).collect();
    let (mut raw, mut ours) = (0f64, 0f64);
    for _ in 0..2 {
        raw = raw.max(publish_raw(&bodies).await);
        ours = ours.max(publish_enqueue(&bodies).await);
    }
    (ours, raw)
}

/// Raw lapin: confirms, 256 in flight, the same properties as the producer
/// (built beforehand) so both put the same bytes on the wire.
async fn publish_raw(bodies: &[Vec<u8>]) -> f64 {
    let b = Bench::new("p").await;
    let props: Vec<BasicProperties> = (0..bodies.len())
        .map(|i| producer::properties(&format!("b{i}")))
        .collect();
    let ch = b.conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    let t = Instant::now();
    let mut window = std::collections::VecDeque::new();
    for (body, props) in bodies.iter().zip(props) {
        let c = ch
            .basic_publish(
                b.topology.exchange().into(),
                b.topology.send_queue().as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .unwrap();
        window.push_back(c);
        if window.len() >= 256 {
            window.pop_front().unwrap().await.unwrap();
        }
    }
    for c in window {
        c.await.unwrap();
    }
    let rate = bodies.len() as f64 / t.elapsed().as_secs_f64();
    let _ = ch.close(200, "done".into()).await;
    b.done().await;
    rate
}

/// mmsend: the enqueue path (read JSONL, validate each line, publish,
/// confirm), 256 in flight by default.
async fn publish_enqueue(bodies: &[Vec<u8>]) -> f64 {
    let mut text = Vec::new();
    for body in bodies {
        text.extend_from_slice(body);
        text.push(b'\n');
    }
    let b = Bench::new("p").await;
    let p = Producer::on(&b.conn, &b.topology).await.unwrap();
    let t = Instant::now();
    let report = producer::enqueue(text.as_slice(), Some(&p), |_, _| {})
        .await
        .unwrap();
    let rate = bodies.len() as f64 / t.elapsed().as_secs_f64();
    assert_eq!(report.published, bodies.len());
    p.close().await;
    b.done().await;
    rate
}

/// One target of a row: what it asks, and whether this run met it.
struct Target {
    what: String,
    met: bool,
}

fn target(what: impl Into<String>, met: bool) -> Target {
    Target {
        what: what.into(),
        met,
    }
}

/// Targets as a table cell: "≥ 0.9 ✔; ≤ 40 µs CPU/job ✘".
fn target_cell(targets: &[Target]) -> String {
    if targets.is_empty() {
        return "—".into();
    }
    targets
        .iter()
        .map(|t| format!("{} {}", t.what, if t.met { "✔" } else { "✘" }))
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Default)]
struct Results {
    rows: Vec<[String; 4]>,
    out: serde_json::Map<String, Value>,
}

impl Results {
    fn record(
        &mut self,
        id: &str,
        what: String,
        value: String,
        targets: Vec<Target>,
        mut json: Value,
    ) {
        let cell = target_cell(&targets);
        println!("{id:<6} {what:<58} {value}   [{cell}]");
        if let Value::Object(map) = &mut json {
            if !targets.is_empty() {
                map.insert(
                    "targets".into(),
                    targets
                        .iter()
                        .map(|t| json!({"target": t.what, "met": t.met}))
                        .collect(),
                );
            }
        }
        self.rows.push([id.to_string(), what, value, cell]);
        self.out.insert(id.to_string(), json);
    }

    /// A row that could not be measured here.
    fn skipped(&mut self, id: &str, what: String, why: &str) {
        self.record(
            id,
            what,
            format!("skipped: {why}"),
            Vec::new(),
            json!({"skipped": why}),
        );
    }
}

/// Prefetches of the C1 sweep.
const C1_PREFETCH: [u16; 5] = [64, 128, 256, 512, 1024];

#[tokio::main]
async fn main() {
    let select = select::Select::from_args(&["C1", "C2", "W", "P"]);
    let smoke = select.smoke;
    let want = |id: &str| select.want(id);
    let n = if smoke { 300 } else { jobs() };
    if smoke {
        println!("smoke run (cargo test): C1, C2, W, P on {n} jobs; `cargo bench --bench pipeline` measures");
    }
    let mut results = Results::default();
    println!(
        "mmsend pipeline bench: {n} jobs, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let sim0 = Simulator::start_on_own_thread("127.0.0.1:0", SimConfig::default())
        .await
        .unwrap();
    // best C1: the broker's ceiling, which W and L512 are held to
    let mut c1: Option<(f64, u16)> = None;
    if want("C1") || want("W") || want("L") {
        let job_bytes = job_body(0, "r0").len();
        let sweep: &[u16] = if smoke {
            &C1_PREFETCH[..2]
        } else {
            &C1_PREFETCH
        };
        for &prefetch in sweep {
            let rate = broker_ceiling(n, prefetch).await;
            results.record(
                &format!("C1@{prefetch}"),
                format!(
                    "broker ceiling: lapin consume+ack, prefetch {prefetch}, {job_bytes} B jobs"
                ),
                format!("{rate:.0} jobs/s"),
                Vec::new(),
                json!({"prefetch": prefetch, "jobs_per_s": rate, "job_bytes": job_bytes}),
            );
            if c1.is_none_or(|(best, _)| rate > best) {
                c1 = Some((rate, prefetch));
            }
        }
        let (rate, prefetch) = c1.unwrap();
        results.record(
            "C1",
            "broker ceiling: the best of the prefetch sweep".into(),
            format!("{rate:.0} jobs/s (prefetch {prefetch})"),
            Vec::new(),
            json!({"jobs_per_s": rate, "prefetch": prefetch}),
        );
    }
    let mut c2 = None;
    if want("C2") || want("W") {
        let rate = http_ceiling(&sim0, n, 64).await;
        results.record(
            "C2",
            "HTTP ceiling: reqwest POST, 64 in flight".into(),
            format!("{rate:.0} req/s"),
            Vec::new(),
            json!({"req_per_s": rate}),
        );
        c2 = Some(rate);
    }

    // W and WL alternately (fresh queue each), the best of each: the
    // broker's first rounds on a new queue are often slower. This machine's
    // speed drifts over seconds, so WL's ratio to W is taken per round (the
    // two runs of a round are next to each other in time, in turn W first
    // and WL first) and the median of the rounds is reported
    let ledger = if want("WL") {
        let url = redis_url();
        redis_reachable(&url).await.map(|()| url)
    } else {
        Err(String::new())
    };
    let run_w = want("W") || want("WL") || want("Py");
    let rounds = if smoke {
        1
    } else {
        std::env::var("MMSEND_BENCH_ROUNDS")
            .ok()
            .and_then(|r| r.parse().ok())
            .unwrap_or(5usize)
            .max(1)
    };
    let (mut w, mut wl): (Option<Run>, Option<Run>) = (None, None);
    let (mut w_rates, mut wl_rates) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let order = if round % 2 == 0 {
            [false, true]
        } else {
            [true, false]
        };
        for with_ledger in order {
            if !with_ledger && run_w {
                let r = worker_run(&sim0, n, 64).await;
                w_rates.push(r.rate);
                if w.is_none_or(|b| r.rate > b.rate) {
                    w = Some(r);
                }
            }
            if let (true, Ok(url)) = (with_ledger, &ledger) {
                let r = ledger_run(&sim0, n, 64, url).await;
                wl_rates.push(r.rate);
                if wl.is_none_or(|b| r.rate > b.rate) {
                    wl = Some(r);
                }
            }
        }
    }
    if let Some(w) = w {
        let mut value = format!("{:.0} jobs/s", w.rate);
        let mut targets = Vec::new();
        let mut out = json!({"jobs_per_s": w.rate, "runs_jobs_per_s": w_rates,
            "worker_cpu_us_per_job": w.cpu_us});
        let mut ratios = Vec::new();
        if let Some((best, _)) = c1 {
            let ratio = w.rate / best;
            ratios.push(format!("{ratio:.2} × best C1"));
            targets.push(target("≥ 0.7 × best C1", ratio >= 0.7));
            out["ratio_to_best_c1"] = json!(ratio);
        }
        if let Some(c2) = c2 {
            let ratio = w.rate / c2;
            ratios.push(format!("{ratio:.2} × C2"));
            out["ratio_to_c2"] = json!(ratio);
        }
        if !ratios.is_empty() {
            value = format!("{value} = {}", ratios.join("; "));
        }
        value = format!("{value}; {:.0} µs CPU/job", w.cpu_us);
        targets.push(target("≤ 40 µs CPU/job", w.cpu_us <= 40.0));
        results.record(
            "W",
            format!("worker end to end, concurrency 64, 0 ms API, best of {rounds}"),
            value,
            targets,
            out,
        );
    }
    if want("WL") {
        let what = format!(
            "W with the send ledger (Redis), best of {rounds}; ratio to W: the median of the rounds'"
        );
        match (&ledger, wl, w) {
            (Err(why), _, _) => results.skipped("WL", what, why),
            (Ok(_), Some(wl), Some(w)) => {
                let mut pairs: Vec<f64> =
                    wl_rates.iter().zip(&w_rates).map(|(l, w)| l / w).collect();
                pairs.sort_by(f64::total_cmp);
                let ratio = pairs[pairs.len() / 2];
                let of_bests = wl.rate / w.rate;
                let shown: Vec<String> = pairs.iter().map(|r| format!("{r:.2}")).collect();
                let per_job = wl.redis_calls as f64 / n as f64;
                let housekeeping = wl.redis_calls - wl.redis_per_job_calls;
                results.record(
                    "WL",
                    what,
                    format!(
                        "{:.0} jobs/s; {ratio:.2} × W (rounds {}; bests {of_bests:.2}); {:.0} µs CPU/job; {per_job:.2} Redis round trips/job ({} for {n} jobs, {housekeeping} of them housekeeping)",
                        wl.rate, shown.join(", "), wl.cpu_us, wl.redis_calls
                    ),
                    vec![
                        target("≥ 0.8 × W", ratio >= 0.8),
                        // at the precision shown: the census every few
                        // seconds is not a per-job cost
                        target("≤ 2 round trips/job", (per_job * 100.0).round() <= 200.0),
                    ],
                    json!({"jobs_per_s": wl.rate, "runs_jobs_per_s": wl_rates, "ratio_to_w": ratio,
                        "round_ratios_to_w": pairs, "ratio_of_bests": of_bests,
                        "worker_cpu_us_per_job": wl.cpu_us,
                        "redis_round_trips_per_job": per_job, "redis_round_trips": wl.redis_calls,
                        "redis_housekeeping_round_trips": housekeeping}),
                );
            }
            _ => unreachable!("W and WL both run whenever Redis answers"),
        }
    }
    if want("Py") {
        let what = "Python reference worker (aio-pika + aiohttp), prefetch 64, best of 2";
        match python_env() {
            Err(why) => results.skipped("Py", what.into(), &why),
            Ok((python, versions)) => {
                let mut runs = Vec::new();
                let mut failed = None;
                for _ in 0..2 {
                    match python_run(&sim0, n, 64, &python).await {
                        Ok(r) => runs.push(r),
                        Err(why) => {
                            failed = Some(why);
                            break;
                        }
                    }
                }
                let best = runs
                    .iter()
                    .copied()
                    .reduce(|a, b| if b.rate > a.rate { b } else { a });
                match (failed, best, w) {
                    (Some(why), _, _) => results.skipped("Py", what.into(), &why),
                    (None, Some(py), Some(w)) => {
                        let ratio = w.rate / py.rate;
                        let cpu_ratio = py.cpu_us / w.cpu_us;
                        results.record(
                            "Py",
                            what.into(),
                            format!(
                                "{:.0} jobs/s, {:.0} µs CPU/job; W = {ratio:.1} × Py jobs/s at 1/{cpu_ratio:.1} of its CPU/job",
                                py.rate, py.cpu_us
                            ),
                            vec![target("W ≥ 4 × Py", ratio >= 4.0)],
                            json!({"jobs_per_s": py.rate,
                                "runs_jobs_per_s": runs.iter().map(|r| r.rate).collect::<Vec<_>>(),
                                "cpu_us_per_job": py.cpu_us, "peak_rss_kib": py.hwm_kib,
                                "w_ratio": ratio, "w_cpu_ratio": cpu_ratio, "versions": versions}),
                        );
                    }
                    _ => unreachable!("W runs with Py, and Py twice unless it failed"),
                }
            }
        }
    }
    if want("L") {
        let slow = slow_sim(Duration::from_millis(50)).await;
        for c in [128u16, 512] {
            let jobs = (c as usize) * 100;
            let rate = worker_run(&slow, jobs, c).await.rate;
            let little = c as f64 / 0.05;
            let eff = rate / little;
            let mut out = json!({"concurrency": c, "jobs_per_s": rate, "efficiency": eff});
            let (value, targets) = match (c, c1) {
                (128, _) => (
                    format!("{rate:.0} jobs/s, efficiency {eff:.2}"),
                    vec![target("efficiency ≥ 0.9", eff >= 0.9)],
                ),
                (_, Some((best, _))) => {
                    let bound = little.min(best);
                    let ratio = rate / bound;
                    out["ratio_to_min_little_best_c1"] = json!(ratio);
                    (
                        format!(
                            "{rate:.0} jobs/s, efficiency {eff:.2}; {ratio:.2} × min(Little {little:.0}, best C1 {best:.0})"
                        ),
                        vec![target("≥ 0.8 × min(Little, best C1)", ratio >= 0.8)],
                    )
                }
                (_, None) => unreachable!("C1 runs with L"),
            };
            results.record(
                &format!("L{c}"),
                format!("worker, 50 ms API, concurrency {c} ({jobs} jobs)"),
                value,
                targets,
                out,
            );
        }
        slow.shutdown().await;
    }
    if want("M") {
        let slow = slow_sim(Duration::from_millis(20)).await;
        for (c, limit_mib) in [(64u16, 64.0), (512, 128.0)] {
            let hwm = worker_run(&slow, n.min(20_000), c).await.hwm_kib;
            let mib = hwm as f64 / 1024.0;
            results.record(
                &format!("M{c}"),
                format!("worker peak RSS under load, concurrency {c}"),
                format!("{mib:.1} MiB"),
                vec![target(format!("≤ {limit_mib:.0} MiB"), mib <= limit_mib)],
                json!({"concurrency": c, "peak_rss_kib": hwm}),
            );
        }
        slow.shutdown().await;
    }
    if want("R") {
        let storm = std::env::var("MMSEND_BENCH_STORM_JOBS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(50_000);
        let (park_us, cpu_pct, drain) = retry_storm(storm, Duration::from_secs(25)).await;
        results.record(
            "R",
            format!("retry storm, {storm} jobs on 2300012 for 25 s"),
            format!(
                "park {park_us:.0} µs CPU/job; waiting {cpu_pct:.1}% of a core; drain {drain:.1} s"
            ),
            Vec::new(),
            json!({"jobs": storm, "park_cpu_us_per_job": park_us, "cpu_percent_waiting": cpu_pct, "drain_s": drain}),
        );
    }
    if want("P") {
        let (ours, raw) = publish(n).await;
        results.record(
            "P",
            "enqueue (validate + confirmed publish) vs raw lapin".into(),
            format!("{ours:.0} vs {raw:.0} jobs/s = {:.2}", ours / raw),
            Vec::new(),
            json!({"jobs_per_s": ours, "raw_jobs_per_s": raw, "ratio": ours / raw}),
        );
    }
    sim0.shutdown().await;
    let Results { rows, out } = results;
    if smoke {
        return;
    }
    let path = concat!(env!("CARGO_TARGET_TMPDIR"), "/bench-pipeline.json");
    std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).unwrap();
    std::fs::write(
        path,
        serde_json::to_string_pretty(&Value::Object(out)).unwrap(),
    )
    .unwrap();
    println!(
        "\n{}",
        mmsend::report::table(
            &["id", "measure", "result", "target"],
            &[],
            rows.into_iter().map(Vec::from).collect()
        )
    );
    println!("written to {path}");
}
