//! The pipeline benchmark: mmsend's throughput against the ceilings of its
//! two dependencies, all measured in one run on the same machine, the same
//! RabbitMQ and the in-process Graph API simulator, so the ratios mean
//! something on a noisy machine.
//!
//! ```sh
//! cargo bench --bench pipeline                      # all of it (a few minutes)
//! MMSEND_BENCH_JOBS=5000 cargo bench --bench pipeline -- W C1 C2   # a subset
//! ```
//!
//! | id | what |
//! |---|---|
//! | C1 | broker ceiling: raw lapin consume + ack of N jobs from a quorum queue, no HTTP |
//! | C2 | HTTP ceiling: raw reqwest POSTs to the simulator, same concurrency, no broker |
//! | W  | the `mmsend worker` binary end to end (consume → send → ack), simulator at 0 ms |
//! | L  | the worker with 50 ms simulator latency at concurrency 128 and 512: Little's-law efficiency |
//! | R  | retry storm: jobs answered 2300012 wait in delay tiers; worker CPU per job while they wait, and the drain |
//! | P  | `enqueue` (library producer) confirmed publish rate vs raw lapin confirmed publishing |
//! | M  | worker peak RSS (VmHWM) at concurrency 64 and 512 under load |
//!
//! The worker runs as a child process so its CPU time and memory are its
//! own (`MMSEND_BENCH_WORKER_LOG=<file>` keeps its debug log). Results are printed as a table and written to
//! `target/bench-pipeline.json`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use mmsend::broker::{self, Topology};
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

/// The worker binary on `bench`'s topology.
fn spawn_worker(b: &Bench, sim: &SimHandle, concurrency: u16) -> Child {
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
    Simulator::start(
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

/// W / L / M: the worker binary on n pre-published jobs. Returns (rate,
/// peak RSS KiB, worker CPU µs per job).
async fn worker_run(sim: &SimHandle, n: usize, concurrency: u16) -> (f64, u64, f64) {
    sim.reset();
    let b = Bench::new("w").await;
    b.fill(n, |i| format!("w{i}")).await;
    let child = spawn_worker(&b, sim, concurrency);
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
    (rate, hwm, cpu / n as f64 * 1e6)
}

/// R: every job answers 2300012 for `window` (shorter than the 30 s
/// `not_ready` delay). The first pass parks every job in the 30 s tier (the
/// first failures close the campaign's gate, the rest go without an API
/// call); then the broker holds them while the worker idles; then they come
/// back, one probe reopens the gate, and they drain.
/// Returns (CPU µs per job to park, % of a core while waiting, drain s).
async fn retry_storm(n: usize, window: Duration) -> (f64, f64, f64) {
    let sim = Simulator::start(
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
    let child = spawn_worker(&b, &sim, 64);
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

#[derive(Default)]
struct Results {
    rows: Vec<(String, String, String)>,
    out: serde_json::Map<String, Value>,
}

impl Results {
    fn record(&mut self, id: &str, what: String, value: String, json: Value) {
        println!("{id:<5} {what:<58} {value}");
        self.rows.push((id.to_string(), what, value));
        self.out.insert(id.to_string(), json);
    }
}

#[tokio::main]
async fn main() {
    let all: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this
    // binary without it: then only a small smoke run of the fast parts.
    let smoke = !all.iter().any(|a| a == "--bench");
    let args: Vec<String> = all.into_iter().filter(|a| !a.starts_with('-')).collect();
    let want = |id: &str| {
        if smoke {
            ["C1", "C2", "W", "P"].contains(&id)
        } else {
            args.is_empty() || args.iter().any(|a| a == id)
        }
    };
    let n = if smoke { 300 } else { jobs() };
    if smoke {
        println!("smoke run (cargo test): C1, C2, W, P on {n} jobs; `cargo bench --bench pipeline` measures");
    }
    let mut results = Results::default();
    let mut record =
        |id: &str, what: String, value: String, json: Value| results.record(id, what, value, json);
    println!(
        "mmsend pipeline bench: {n} jobs, {} cores",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );

    let sim0 = Simulator::start("127.0.0.1:0", SimConfig::default())
        .await
        .unwrap();
    let (mut c1, mut c2) = (0.0, 0.0);
    if want("C1") || want("W") {
        c1 = broker_ceiling(n, 64).await;
        record(
            "C1",
            "broker ceiling: lapin consume+ack, prefetch 64".into(),
            format!("{c1:.0} jobs/s"),
            json!({"jobs_per_s": c1}),
        );
    }
    if want("C2") || want("W") {
        c2 = http_ceiling(&sim0, n, 64).await;
        record(
            "C2",
            "HTTP ceiling: reqwest POST, 64 in flight".into(),
            format!("{c2:.0} req/s"),
            json!({"req_per_s": c2}),
        );
    }
    if want("W") {
        let (w, _, cpu) = worker_run(&sim0, n, 64).await;
        let ratio = w / c1.min(c2);
        record(
            "W",
            "worker end to end, concurrency 64, 0 ms API".into(),
            format!("{w:.0} jobs/s = {ratio:.2} × min(C1, C2); {cpu:.0} µs CPU/job"),
            json!({"jobs_per_s": w, "ratio": ratio, "worker_cpu_us_per_job": cpu}),
        );
    }
    if want("L") {
        let slow = slow_sim(Duration::from_millis(50)).await;
        for c in [128u16, 512] {
            let jobs = (c as usize) * 100;
            let (rate, _, _) = worker_run(&slow, jobs, c).await;
            let eff = rate / (c as f64 / 0.05);
            record(
                &format!("L{c}"),
                format!("worker, 50 ms API, concurrency {c} ({jobs} jobs)"),
                format!("{rate:.0} jobs/s, efficiency {eff:.2}"),
                json!({"concurrency": c, "jobs_per_s": rate, "efficiency": eff}),
            );
        }
        slow.shutdown().await;
    }
    if want("M") {
        let slow = slow_sim(Duration::from_millis(20)).await;
        for c in [64u16, 512] {
            let (_, hwm, _) = worker_run(&slow, n.min(20_000), c).await;
            record(
                &format!("M{c}"),
                format!("worker peak RSS under load, concurrency {c}"),
                format!("{:.1} MiB", hwm as f64 / 1024.0),
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
        record(
            "R",
            format!("retry storm, {storm} jobs on 2300012 for 25 s"),
            format!(
                "park {park_us:.0} µs CPU/job; waiting {cpu_pct:.1}% of a core; drain {drain:.1} s"
            ),
            json!({"jobs": storm, "park_cpu_us_per_job": park_us, "cpu_percent_waiting": cpu_pct, "drain_s": drain}),
        );
    }
    if want("P") {
        let (ours, raw) = publish(n).await;
        record(
            "P",
            "enqueue (validate + confirmed publish) vs raw lapin".into(),
            format!("{ours:.0} vs {raw:.0} jobs/s = {:.2}", ours / raw),
            json!({"jobs_per_s": ours, "raw_jobs_per_s": raw, "ratio": ours / raw}),
        );
    }
    sim0.shutdown().await;
    let Results { rows, out } = results;
    if smoke {
        return;
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/target/bench-pipeline.json");
    std::fs::write(
        path,
        serde_json::to_string_pretty(&Value::Object(out)).unwrap(),
    )
    .unwrap();
    println!(
        "\n{}",
        mmsend::report::table(
            &["id", "measure", "result"],
            &[],
            rows.into_iter().map(|(a, b, c)| vec![a, b, c]).collect()
        )
    );
    println!("written to target/bench-pipeline.json");
}
