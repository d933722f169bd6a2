//! The dead-letter queue at campaign scale: `mmsend dlq` over a DLQ of N
//! letters (default 100,000; five codes, three campaigns, ~500-byte
//! bodies), all measured in one run on one broker.
//!
//! ```sh
//! cargo bench --bench dlq                                   # N = 100,000
//! MMSEND_BENCH_DLQ_LETTERS=1000000 cargo bench --bench dlq -- M S   # a subset at 1M
//! ```
//!
//! | id | what |
//! |---|---|
//! | C | broker ceiling: a plain lapin consumer (prefetch 1,000, one ack per message) draining a copy of the N letters from another quorum queue |
//! | G | before: the former engine, one `basic.get` per letter, on the first 5,000 letters (rate, and N at that rate) |
//! | M | broker memory while a peek holds all N letters: `rabbitmqctl status` (total, by category) and `list_queues … memory`, against the same broker just before the scan |
//! | S | `mmsend dlq stats` over N letters (the release binary, wall time) |
//! | L | `mmsend dlq list --limit 5` at depth N |
//! | R | `mmsend dlq replay --code 2300005` moving N/5 of N at unlimited rate; then every copy on `.send` is counted: exactly N/5, each job once, the rest still in the DLQ |
//!
//! S, L and R also report the CPU seconds the broker (from `rabbitmqctl
//! status`) and the `mmsend` process used, and every run prints the load
//! average: on a shared 2-core machine the wall times move with the load,
//! the CPU seconds much less.
//!
//! M needs `rabbitmqctl` for the broker under test:
//! `MMSEND_BENCH_RABBITMQCTL` is the command line to run it (default
//! `rabbitmqctl`), e.g. `env HOME=<dir with the node's cookie> rabbitmqctl -n
//! <node>` for a private node, which keeps other tenants out of the memory
//! figures. Results are printed as a table and written to
//! `bench-dlq.json` in cargo's `CARGO_TARGET_TMPDIR` (`target/tmp/` unless
//! `CARGO_TARGET_DIR` moves it). Under `cargo test` (no `--bench`) it is a smoke
//! run of S, L and R on 2,000 letters.

#[path = "common/fill.rs"]
mod fill;
#[path = "common/select.rs"]
mod select;

use std::collections::HashSet;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use mmsend::broker::headers::{LastError, Story};
use mmsend::broker::{self, Topology};
use mmsend::dlq::{self, DeadLetter, Filter, Flow, Observer, Phase, Progress, ScanOptions};
use serde_json::{json, Value};

fn amqp_url() -> String {
    std::env::var("MMSEND_AMQP_URL").unwrap_or_else(|_| broker::DEFAULT_AMQP_URL.to_string())
}

/// The five codes of a wrong campaign and a few other deaths.
const CODES: [(i64, &str); 5] = [
    (2300005, "mismatch"),
    (2300014, "mismatch"),
    (2300030, "region"),
    (2300012, "not_ready"),
    (2300015, "budget"),
];
const CAMPAIGNS: [&str; 3] = ["black-friday", "cyber-monday", "xmas"];

/// A dead letter of about 500 bytes (body + headers), as a worker writes it.
fn letter(i: usize) -> (Vec<u8>, BasicProperties) {
    let (code, class) = CODES[i % CODES.len()];
    let body = json!({"v": 1, "job_id": format!("bench-{i:07}"), "ad_account_id": "1234567890",
        "page_id": "9876543210", "message_id": "120210000000000000",
        "subscription_token": format!("recipient-token-{i:07}-{}", "x".repeat(40)),
        "message": {"text": "Hi {{first_name}}, the black friday deals are in: 40% off everything in the store until Sunday!"},
        "campaign": CAMPAIGNS[i % CAMPAIGNS.len()]});
    let story = Story {
        attempt: 1,
        first_attempt_at: Some(chrono::Utc::now()),
        dead_reason: Some(
            if class == "budget" {
                "expired"
            } else {
                "terminal"
            }
            .into(),
        ),
        dead_at: Some(chrono::Utc::now()),
        worker: Some("bench-worker:4242".into()),
        last_error: LastError {
            class: Some(class.into()),
            code: Some(100),
            subcode: Some(code),
            message: Some(format!(
                "({code}) the campaign targets a page or ad account this token cannot send for"
            )),
            http_status: Some(400),
            fbtrace_id: Some("AbCdEfGhIjK".into()),
            ambiguous: false,
        },
        ..Default::default()
    };
    let mut headers = FieldTable::default();
    story.write(&mut headers);
    (
        serde_json::to_vec(&body).expect("json"),
        BasicProperties::default()
            .with_message_id(format!("bench-{i:07}").into())
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers),
    )
}

async fn depth(conn: &Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    let _ = ch.close(200, "ok".into()).await;
    q.message_count()
}

/// G: the former engine, one `basic.get` round trip per letter, holding all.
async fn basic_get_rate(conn: &Connection, topology: &Topology, n: usize) -> f64 {
    let ch = conn.create_channel().await.expect("channel");
    let started = Instant::now();
    let mut last = None;
    for _ in 0..n {
        let Some(m) = ch
            .basic_get(
                topology.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .expect("get")
        else {
            break;
        };
        let _ = DeadLetter::new(m.delivery.data, m.delivery.properties);
        last = Some(m.delivery.delivery_tag);
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    if let Some(tag) = last {
        ch.basic_nack(
            tag,
            BasicNackOptions {
                multiple: true,
                requeue: true,
            },
        )
        .await
        .expect("nack");
    }
    let _ = ch.close(200, "done".into()).await;
    rate
}

/// `rabbitmqctl` for the broker under test.
fn rabbitmqctl(args: &[&str]) -> Option<Value> {
    let line =
        std::env::var("MMSEND_BENCH_RABBITMQCTL").unwrap_or_else(|_| "rabbitmqctl".to_string());
    let mut words = line.split_whitespace();
    let program = words.next()?;
    let out = Command::new(program)
        .args(words)
        .args(args)
        .args(["--formatter", "json"])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    serde_json::from_slice(&out.stdout).ok()
}

/// The broker's memory (bytes): total, the categories that move, and the
/// DLQ's own process.
fn broker_memory(queue: &str) -> Option<Value> {
    let status = rabbitmqctl(&["status"])?;
    let m = &status["memory"];
    let queues = rabbitmqctl(&[
        "list_queues",
        "name",
        "messages",
        "messages_ready",
        "messages_unacknowledged",
        "memory",
    ])?;
    let q = queues
        .as_array()?
        .iter()
        .find(|q| q["name"] == queue)?
        .clone();
    Some(json!({
        "total_erlang": m["total"]["erlang"],
        "total_rss": m["total"]["rss"],
        "quorum_ets": m["quorum_ets"],
        "binary": m["binary"],
        "connection_channels": m["connection_channels"],
        "quorum_queue_procs": m["quorum_queue_procs"],
        "other_proc": m["other_proc"],
        "queue": q,
    }))
}

/// M: measures the broker while a peek holds every letter.
struct Hold {
    queue: String,
    holding: Option<Value>,
}

impl Observer for Hold {
    fn selected(&mut self, _: &DeadLetter) -> Flow {
        Flow::Continue
    }
    fn progress(&mut self, p: &Progress) {
        if p.phase == Phase::Holding && self.holding.is_none() {
            // Blocks this task while the letters are held. Measured now and
            // 6 s later (a quorum queue updates its counts every 5 s), the
            // larger total kept, so a garbage collection does not decide it.
            let first = broker_memory(&self.queue);
            std::thread::sleep(Duration::from_secs(6));
            let second = broker_memory(&self.queue);
            self.holding = match (first, second) {
                (Some(a), Some(mut b)) => {
                    // the later counts, the larger total
                    if a["total_erlang"].as_f64() > b["total_erlang"].as_f64() {
                        let queue = b["queue"].take();
                        let mut a = a;
                        a["queue"] = queue;
                        Some(a)
                    } else {
                        Some(b)
                    }
                }
                (a, b) => a.or(b),
            };
        }
    }
}

/// CPU seconds (user + system) of a process, from `/proc`.
fn cpu_seconds(pid: u64) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // the command name may hold spaces: count fields after its ')'
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

/// CPU seconds of this process's finished children.
fn children_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let get = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (get(13) + get(14)) / 100.0
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The broker's OS process, for its CPU time.
fn broker_pid() -> Option<u64> {
    rabbitmqctl(&["status"])?["pid"].as_u64()
}

/// Runs `mmsend`, returning wall seconds, broker CPU and mmsend CPU seconds.
fn mmsend_cpu(
    broker: Option<u64>,
    topology: &Topology,
    args: &[&str],
) -> (f64, String, std::process::Output) {
    let b0 = broker.and_then(cpu_seconds);
    let c0 = children_cpu();
    let (s, out) = mmsend(topology, args);
    let b1 = broker.and_then(cpu_seconds);
    let mine = children_cpu() - c0;
    let cpu = match (b0, b1) {
        (Some(a), Some(b)) => format!("CPU: broker {:.1} s, mmsend {mine:.1} s", b - a),
        _ => format!("CPU: mmsend {mine:.1} s"),
    };
    (s, cpu, out)
}

/// C: a plain consumer (prefetch 1,000, ack each) draining `n` letters
/// from a queue of their own.
async fn broker_ceiling(conn: &Connection, topology: &Topology, n: usize) -> f64 {
    let queue = format!("{}.ceiling", topology.prefix);
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        queue.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare ceiling queue");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let mut pending = std::collections::VecDeque::new();
    for i in 0..n {
        let (body, props) = letter(i);
        pending.push_back(
            ch.basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await
            .expect("publish"),
        );
        if pending.len() >= 1024 {
            pending
                .pop_front()
                .expect("pending")
                .await
                .expect("confirm");
        }
    }
    for c in pending {
        c.await.expect("confirm");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue.as_str().into(),
            "ceiling".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let started = Instant::now();
    for _ in 0..n {
        let d = consumer.next().await.expect("delivery").expect("delivery");
        d.acker.ack(Default::default()).await.expect("ack");
    }
    let rate = n as f64 / started.elapsed().as_secs_f64();
    ch.queue_delete(queue.as_str().into(), Default::default())
        .await
        .expect("delete");
    let _ = ch.close(200, "done".into()).await;
    rate
}

fn mmsend(topology: &Topology, args: &[&str]) -> (f64, std::process::Output) {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_mmsend"))
        .args(args)
        .env("MMSEND_AMQP_URL", amqp_url())
        .env("MMSEND_PREFIX", &topology.prefix)
        .env("MMSEND_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .expect("run mmsend");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        out.status.success(),
        "mmsend {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (seconds, out)
}

/// Takes every message off `queue` (no ack), counting distinct job ids.
async fn drain_count(conn: &Connection, queue: &str) -> (usize, usize, HashSet<i64>) {
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("qos");
    let want = depth(conn, queue).await as usize;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bench-drain".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut ids = HashSet::new();
    let mut codes = HashSet::new();
    let mut n = 0;
    while n < want {
        let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_secs(10), consumer.next()).await
        else {
            break;
        };
        n += 1;
        let letter = DeadLetter::new(d.data, d.properties);
        ids.insert(letter.job_id().unwrap_or_default());
        if let Some(c) = letter.story.last_error.subcode {
            codes.insert(c);
        }
    }
    let _ = ch.close(200, "drained".into()).await;
    (n, ids.len(), codes)
}

#[derive(Default)]
struct Results {
    rows: Vec<(String, String, String)>,
    json: serde_json::Map<String, Value>,
}

impl Results {
    fn record(&mut self, id: &str, what: String, value: String, json: Value) {
        println!("{id:>3}  {what:<62} {value}");
        self.rows.push((id.into(), what, value));
        self.json.insert(id.into(), json);
    }
}

fn mib(v: &Value) -> f64 {
    v.as_f64().unwrap_or(0.0) / 1_048_576.0
}

#[tokio::main]
async fn main() {
    let select = select::Select::from_args(&["S", "L", "R"]);
    let smoke = select.smoke;
    let want = |id: &str| select.want(id);
    let n: usize = if smoke {
        2_000
    } else {
        std::env::var("MMSEND_BENCH_DLQ_LETTERS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(100_000)
    };
    println!(
        "mmsend dlq bench: {n} letters, {} cores{}",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        if smoke {
            " (smoke run under cargo test; `cargo bench --bench dlq` measures)"
        } else {
            ""
        }
    );
    println!("     load average at start: {}", load_average());
    let conn = broker::connect(&amqp_url(), "bench")
        .await
        .expect("RabbitMQ must be running");
    let broker = broker_pid();
    let prefix = format!("mmsend-bench-dlq-{:06x}", rand::random::<u32>() & 0xffffff);
    let topology = Topology::new(&prefix, &["1s"], 10).expect("topology");
    topology.declare(&conn).await.expect("declare");
    let mut results = Results::default();

    let fill_s = fill::fill(&conn, &topology, n, letter).await;
    println!(
        "     filled {n} letters in {fill_s:.1} s ({:.0}/s)",
        n as f64 / fill_s
    );

    if want("C") {
        let rate = broker_ceiling(&conn, &topology, n).await;
        results.record(
            "C",
            format!("broker ceiling: plain consumer, prefetch 1000, ack each ({n})"),
            format!("{rate:.0} letters/s = {:.1} s for {n}", n as f64 / rate),
            json!({"letters_per_s": rate, "seconds": n as f64 / rate}),
        );
    }

    if want("G") {
        let sample = n.min(5_000);
        let rate = basic_get_rate(&conn, &topology, sample).await;
        results.record(
            "G",
            format!("before: one basic.get per letter ({sample} letters)"),
            format!("{rate:.0} letters/s = {:.0} s for {n}", n as f64 / rate),
            json!({"letters_per_s": rate, "sample": sample, "projected_s": n as f64 / rate}),
        );
    }

    if want("M") {
        let queue = topology.dead_queue();
        // let the broker settle after the fill (WAL flushes, GC)
        tokio::time::sleep(Duration::from_secs(5)).await;
        let before = broker_memory(&queue);
        let mut hold = Hold {
            queue: queue.clone(),
            holding: None,
        };
        let started = Instant::now();
        let report = dlq::scan(
            &conn,
            &topology,
            Filter::default(),
            &ScanOptions::peek(),
            &mut hold,
        )
        .await
        .expect("peek");
        let scan_s = started.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_secs(6)).await;
        let after = broker_memory(&queue);
        match (before, hold.holding, after) {
            (Some(b), Some(h), Some(a)) => {
                let delta = h["total_erlang"].as_f64().unwrap_or(0.0)
                    - b["total_erlang"].as_f64().unwrap_or(0.0);
                let per = delta / report.read.max(1) as f64;
                results.record(
                    "M",
                    format!("broker memory while a peek holds {} letters", report.read),
                    format!(
                        "{:.0} → {:.0} MiB (+{:.0} MiB, {per:.0} B/letter: channels +{:.0}, binaries +{:.0}, queue process +{:.0} MiB); {} unacked; after {:.0} MiB",
                        mib(&b["total_erlang"]),
                        mib(&h["total_erlang"]),
                        delta / 1_048_576.0,
                        mib(&h["connection_channels"]) - mib(&b["connection_channels"]),
                        mib(&h["binary"]) - mib(&b["binary"]),
                        mib(&h["queue"]["memory"]) - mib(&b["queue"]["memory"]),
                        h["queue"]["messages_unacknowledged"],
                        mib(&a["total_erlang"]),
                    ),
                    json!({"before": b, "holding": h, "after": a, "delta_bytes": delta,
                           "bytes_per_letter": per, "scan_s": scan_s, "read": report.read}),
                );
            }
            _ => println!(
                "  M  skipped: rabbitmqctl for this broker did not answer (set MMSEND_BENCH_RABBITMQCTL)"
            ),
        }
    }

    if want("S") {
        let (s, cpu, out) = mmsend_cpu(broker, &topology, &["dlq", "stats", "--json"]);
        let v: Value = serde_json::from_slice(&out.stdout).expect("stats json");
        assert_eq!(v["total"].as_u64(), Some(n as u64), "stats counted all");
        let warnings = String::from_utf8_lossy(&out.stderr);
        assert!(!warnings.contains("interleaved"), "{warnings}");
        results.record(
            "S",
            format!("mmsend dlq stats over {n} letters"),
            format!("{s:.2} s ({:.0} letters/s); {cpu}", n as f64 / s),
            json!({"seconds": s, "letters_per_s": n as f64 / s, "cpu": cpu}),
        );
    }

    if want("L") {
        let (s, cpu, out) = mmsend_cpu(broker, &topology, &["dlq", "list", "--limit", "5"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("stopped at --limit 5"), "{text}");
        results.record(
            "L",
            format!("mmsend dlq list --limit 5 at depth {n}"),
            format!("{s:.2} s; {cpu}"),
            json!({"seconds": s, "cpu": cpu}),
        );
    }

    if want("R") {
        let (s, cpu, out) = mmsend_cpu(
            broker,
            &topology,
            &["dlq", "replay", "--code", "2300005", "--json"],
        );
        let r: Value = serde_json::from_slice(&out.stdout).expect("replay json");
        let want_moved = n.div_ceil(CODES.len());
        let moved = r["replayed"].as_u64().unwrap_or(0) as usize;
        let (copies, distinct, codes) = drain_count(&conn, &topology.send_queue()).await;
        let kept = depth(&conn, &topology.dead_queue()).await as usize;
        let (left, _) = dlq::stats(
            &conn,
            &topology,
            Filter {
                code: Some(2300005),
                ..Filter::default()
            },
        )
        .await
        .expect("stats");
        let exact = moved == want_moved
            && copies == want_moved
            && distinct == want_moved
            && codes == HashSet::from([2300005])
            && kept == n - want_moved
            && left.total == 0;
        results.record(
            "R",
            format!("mmsend dlq replay --code 2300005: {want_moved} of {n}, unlimited rate"),
            format!(
                "{s:.2} s ({:.0} moved/s); {copies} copies, {distinct} distinct, {kept} left in the DLQ, {} of that code left: {}; {cpu}",
                moved as f64 / s,
                left.total,
                if exact { "exact" } else { "NOT EXACT" }
            ),
            json!({"seconds": s, "moved": moved, "copies": copies, "distinct": distinct,
                   "kept": kept, "exact": exact, "cpu": cpu}),
        );
        assert!(exact, "replay was not exact");
    }

    topology.delete(&conn).await.expect("delete");
    let _ = conn.close(200, "bench done".into()).await;
    println!("     load average at the end: {}", load_average());

    println!("\n| id | measure | result |\n|---|---|---|");
    for (id, what, value) in &results.rows {
        println!("| {id} | {what} | {value} |");
    }
    if !smoke {
        let path = concat!(env!("CARGO_TARGET_TMPDIR"), "/bench-dlq.json");
        let _ = std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR"));
        let doc = json!({"letters": n, "results": results.json});
        if let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
        {
            eprintln!("could not write {path}: {e}");
        }
    }
}
