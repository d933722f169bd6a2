//! Campaign control (issue 27, "Done when") with the real `mmsend` binary
//! for the workers and the commands, the real broker, the shared Redis and
//! the Graph API simulator's own record of every call:
//!
//! - pause A while A and B run: no call for A later than 2 s after the
//!   command started, on any worker; B is all sent; A's other jobs wait in
//!   `<prefix>.held` without churn (no delay tier holds one, the depth
//!   stays put), and `campaign show` says `paused` with `held` = the depth;
//! - resume A: every parked job is sent within 30 s, each exactly once;
//! - cancel C (`--yes`, refused without): no call after the command, every
//!   job not sent dead-lettered `cancelled`, also the retrying ones and the
//!   parked ones of a paused campaign D; `campaign show` agrees with the
//!   simulator and the DLQ;
//! - without Redis every `campaign` command refuses in one line naming
//!   `MMSEND_REDIS_URL`;
//! - `show --json` carries the counters and the audit trail (who, counts).
//!
//! Small by default (3 workers, 300 + 300 jobs, 200 to cancel); the
//! issue's size with `MMSEND_CAMPAIGN_FULL=1` (3 workers, 2,000 + 2,000,
//! 1,000 to cancel). Measured times are printed (`--nocapture`); only the
//! issue's bounds (2 s, 30 s) are asserted.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use common::{eventually, Harness, Opts};
use mmsend::broker::headers;
use mmsend::classify::DeadReason;
use mmsend::simulator::{Latency, SimRecord};
use serde_json::{json, Value};

/// Every call takes this long at the simulator: the campaigns take long
/// enough to be stopped half-way.
const LATENCY: Duration = Duration::from_millis(100);
/// The OS user the commands run as (`cli:<user>` in the audit trail).
const OPERATOR: &str = "campaign-test-op";
/// Waits for whole campaigns.
const T: Duration = Duration::from_secs(180);

/// The multi-process tests take turns: each runs three workers, and the
/// 2 s bound must not measure another test's load.
static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

struct Size {
    workers: usize,
    concurrency: u16,
    /// Jobs of each of A and B.
    paused: usize,
    /// Jobs of C (cancelled while it runs); D, paused then cancelled, has
    /// half as many.
    cancelled: usize,
}

fn size() -> Size {
    if std::env::var("MMSEND_CAMPAIGN_FULL").is_ok_and(|v| !v.is_empty() && v != "0") {
        Size {
            workers: 3,
            concurrency: 8,
            paused: 2000,
            cancelled: 1000,
        }
    } else {
        Size {
            workers: 3,
            concurrency: 2,
            paused: 300,
            cancelled: 200,
        }
    }
}

/// A campaign of the test: its `campaign` label and its own `message_id`
/// (the simulator records the message id of every call).
struct Camp {
    name: &'static str,
    message_id: &'static str,
    jobs: usize,
}

impl Camp {
    fn job(&self, i: usize) -> Value {
        json!({"v": 1, "job_id": format!("{}-{i:05}", self.name),
               "ad_account_id": "act_1234567890", "page_id": "9876543210",
               "message_id": self.message_id,
               "subscription_token": self.recipient(i),
               "message": {"text": "Hi"}, "campaign": self.name})
    }

    fn recipient(&self, i: usize) -> String {
        format!("{}-r{i:05}", self.name)
    }
}

/// What the simulator saw of one campaign.
#[derive(Debug, Default)]
struct Calls {
    /// When each request reached the simulator (its answer's time less the
    /// latency), in order.
    arrivals: Vec<DateTime<Utc>>,
    /// Successful sends per recipient (one recipient per job).
    sends: BTreeMap<String, u32>,
    /// Requests answered with an error.
    errors: usize,
}

impl Calls {
    fn of(record: &SimRecord, camp: &Camp) -> Calls {
        let mut calls = Calls::default();
        let latency = chrono::Duration::from_std(LATENCY).unwrap();
        for r in &record.requests {
            if r.message_id.as_deref() != Some(camp.message_id) {
                continue;
            }
            calls.arrivals.push(r.at - latency);
            if r.code.is_some() {
                calls.errors += 1;
            }
        }
        calls.arrivals.sort();
        for s in record
            .sends
            .iter()
            .filter(|s| s.message_id == camp.message_id)
        {
            *calls.sends.entry(s.token.clone()).or_default() += 1;
        }
        calls
    }

    fn last(&self) -> Option<DateTime<Utc>> {
        self.arrivals.last().copied()
    }
}

fn sent_of(h: &Harness, camp: &Camp) -> usize {
    h.sim
        .stats()
        .by_message_id
        .get(camp.message_id)
        .copied()
        .unwrap_or(0) as usize
}

/// `mmsend worker` processes of one fleet; killed if the test fails.
struct Workers {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
}

impl Workers {
    fn start(h: &Harness, dir: &Path, size: &Size, extra: &str) -> Workers {
        let mut children = Vec::new();
        let mut logs = Vec::new();
        for i in 0..size.workers {
            let log = dir.join(format!("worker-{i}.log"));
            // a directory each: `worker_command` writes the config file, and
            // a worker reading it while the next one's is written would
            // start with half of it
            let own = dir.join(format!("worker-{i}"));
            std::fs::create_dir_all(&own).unwrap();
            let mut cmd = h.worker_command(&own, extra);
            cmd.env("MMSEND_REDIS_URL", common::redis_url())
                .env("MMSEND_CONCURRENCY", size.concurrency.to_string())
                .env("MMSEND_SHUTDOWN_GRACE", "5s")
                .env("MMSEND_LOG", "warn")
                .stderr(std::fs::File::create(&log).unwrap());
            children.push(cmd.spawn().expect("mmsend worker starts"));
            logs.push(log);
        }
        Workers { children, logs }
    }

    /// SIGTERM, and each must exit 0.
    async fn stop(mut self) {
        let children = std::mem::take(&mut self.children);
        let logs = self.logs.clone();
        for c in &children {
            common::signal(c, "-TERM");
        }
        tokio::task::spawn_blocking(move || {
            for (mut c, log) in children.into_iter().zip(logs) {
                let status = c.wait().unwrap();
                assert!(
                    status.success(),
                    "worker exit {status:?}; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
        })
        .await
        .unwrap();
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The `mmsend` binary on this harness's broker, topology (`config`) and
/// the shared Redis, as the operator.
async fn cli(h: &Harness, config: &Path, args: &[&str]) -> Output {
    let mut c = h.mmsend(args);
    c.env("MMSEND_CONFIG", config)
        .env("MMSEND_REDIS_URL", common::redis_url())
        .env("USER", OPERATOR)
        .env_remove("LOGNAME")
        .stdin(Stdio::null());
    tokio::task::spawn_blocking(move || c.output().expect("mmsend runs"))
        .await
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Runs a command that must succeed and print one JSON object.
async fn cli_json(h: &Harness, config: &Path, args: &[&str]) -> Value {
    let out = cli(h, config, args).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "mmsend {args:?}: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("mmsend {args:?}: not JSON ({e}): {}", text(&out.stdout)))
}

async fn show(h: &Harness, config: &Path, camp: &Camp) -> Value {
    cli_json(h, config, &["campaign", "show", camp.name, "--json"]).await
}

/// `campaign show --json` once its counters say what `want` says (workers
/// write their counts once a second): polls up to 15 s.
async fn show_settled(h: &Harness, config: &Path, camp: &Camp, want: &[(&str, u64)]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = show(h, config, camp).await;
        let matches = want.iter().all(|(pointer, n)| {
            let field = match pointer.strip_prefix('/') {
                Some(_) => v.pointer(pointer),
                None => v.get(*pointer),
            };
            field.and_then(Value::as_u64).unwrap_or(0) == *n
        });
        if matches {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "campaign {} counters never became {want:?}: {v:#}",
            camp.name
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The fields `show --json` promises (issue 27).
fn assert_show_fields(v: &Value) {
    for field in [
        "campaign",
        "state",
        "enqueued",
        "sent",
        "retried",
        "dead",
        "held",
        "rate_per_min",
        "eta_seconds",
        "last_activity",
        "trail",
    ] {
        assert!(v.get(field).is_some(), "show --json has no {field}: {v:#}");
    }
}

/// The audit entries of `show --json` with this action, newest first.
fn trail<'a>(v: &'a Value, action: &str) -> Vec<&'a Value> {
    v["trail"]
        .as_array()
        .expect("a trail")
        .iter()
        .filter(|e| e["action"] == action)
        .collect()
}

/// Publishes the jobs with `mmsend enqueue` (counting `enqueued` on
/// Redis), the campaigns' jobs interleaved.
async fn enqueue(h: &Harness, dir: &Path, config: &Path, camps: &[&Camp]) {
    let most = camps.iter().map(|c| c.jobs).max().unwrap_or(0);
    let mut lines = String::new();
    let mut total = 0;
    for i in 0..most {
        for c in camps.iter().filter(|c| i < c.jobs) {
            lines.push_str(&c.job(i).to_string());
            lines.push('\n');
            total += 1;
        }
    }
    let path = dir.join("jobs.jsonl");
    std::fs::write(&path, lines).unwrap();
    let report = cli_json(h, config, &["enqueue", "--json", path.to_str().unwrap()]).await;
    assert_eq!(report["published"].as_u64(), Some(total as u64), "{report}");
}

/// Every tier's depth (delay queues only).
async fn tier_depths(h: &Harness) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    for t in &h.topology.tiers {
        let q = h.topology.tier_queue(t);
        out.insert(q.clone(), h.depth(&q).await);
    }
    out
}

/// The DLQ's letters (a peek): (campaign, job id, reason header, reason).
async fn dead_letters(h: &Harness) -> Vec<(String, String, String, Option<DeadReason>)> {
    let mut out = Vec::new();
    mmsend::dlq::scan(
        &h.conn,
        &h.topology,
        mmsend::dlq::Filter::default(),
        &mmsend::dlq::ScanOptions::peek(),
        &mut |d: &mmsend::dlq::DeadLetter| {
            let reason = common::headers(d)
                .inner()
                .get(headers::DEAD_REASON)
                .map(|v| match v {
                    lapin::types::AMQPValue::LongString(s) => s.to_string(),
                    other => format!("{other:?}"),
                })
                .unwrap_or_default();
            out.push((
                d.campaign_name().unwrap_or_default().to_string(),
                d.job_id().unwrap_or_default(),
                reason,
                d.reason(),
            ))
        },
    )
    .await
    .unwrap();
    out
}

fn secs(d: chrono::Duration) -> f64 {
    d.num_milliseconds() as f64 / 1000.0
}

/// Deletes a test's Redis keys when dropped, also when the test fails
/// half-way (the harness deletes them only in `finish`).
struct RedisKeys(String);

impl Drop for RedisKeys {
    fn drop(&mut self) {
        let prefix = self.0.clone();
        // Drop cannot await: a runtime of its own, on a thread of its own
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(common::delete_redis_keys(&common::redis_url(), &prefix));
            Some(())
        })
        .join();
    }
}

async fn harness(name: &'static str, error_mix: Vec<(u64, f64)>) -> Harness {
    let mut opts = Opts::idle(name);
    opts.redis = Some(common::redis_url());
    opts.sim.latency = Latency::Fixed(LATENCY);
    opts.sim.record = true;
    opts.sim.error_mix = error_mix;
    Harness::start(opts).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_parks_a_campaign_without_churn_while_another_flows_and_resume_sends_each_job_once() {
    let _turn = HEAVY.lock().await;
    let size = size();
    let a = Camp {
        name: "promo-a",
        message_id: "120210000000000101",
        jobs: size.paused,
    };
    let b = Camp {
        name: "promo-b",
        message_id: "120210000000000102",
        jobs: size.paused,
    };
    let h = harness("camppause", Vec::new()).await;
    let _keys = RedisKeys(h.topology.prefix.clone());
    let dir = common::tmpdir("camppause");
    let config = h.write_config(&dir, "");
    enqueue(&h, &dir, &config, &[&a, &b]).await;
    for camp in [&a, &b] {
        let v = show(&h, &config, camp).await;
        assert_eq!(v["enqueued"].as_u64(), Some(camp.jobs as u64), "{v:#}");
        assert_eq!(v["state"], "active");
    }

    let workers = Workers::start(&h, &dir, &size, "");
    let started = Instant::now();
    eventually!(
        T,
        sent_of(&h, &a) >= a.jobs / 5,
        "A gets going: {} sent",
        sent_of(&h, &a)
    );
    let before = (sent_of(&h, &a), sent_of(&h, &b), started.elapsed());

    // 1. pause A
    let t0 = Utc::now();
    let paused_at = Instant::now();
    let report = cli_json(
        &h,
        &config,
        &[
            "campaign",
            "pause",
            a.name,
            "--reason",
            "wrong promo code",
            "--json",
        ],
    )
    .await;
    let pause_took = paused_at.elapsed();
    assert_eq!(
        (&report["action"], &report["previous"], &report["state"]),
        (&json!("pause"), &json!("active"), &json!("paused")),
        "{report}"
    );

    // B goes on to its end
    eventually!(
        T,
        sent_of(&h, &b) >= b.jobs,
        "B all sent: {} of {}",
        sent_of(&h, &b),
        b.jobs
    );
    let b_done = paused_at.elapsed();
    // A's other jobs are parked as they come by, none dead
    let held = h.topology.held_queue();
    eventually!(
        T,
        h.depth(&held).await as usize + sent_of(&h, &a) >= a.jobs,
        "A parked: held {}, A sent {}",
        h.depth(&held).await,
        sent_of(&h, &a)
    );
    let record = h.sim.record();
    let calls_a = Calls::of(&record, &a);
    let calls_b = Calls::of(&record, &b);
    let a_sent = calls_a.sends.len();
    let last_a = calls_a.last().expect("A was called");
    eprintln!(
        "pause: A {}/{} and B {}/{} sent at the pause ({:.1} s in); pause command took {:.2} s; last A call {:+.3} s after the command started; B all sent {:.1} s after the pause (B {:.0}/s before the pause, {:.0}/s after)",
        before.0,
        a.jobs,
        before.1,
        b.jobs,
        before.2.as_secs_f64(),
        pause_took.as_secs_f64(),
        secs(last_a - t0),
        b_done.as_secs_f64(),
        before.1 as f64 / before.2.as_secs_f64(),
        (b.jobs - before.1) as f64 / b_done.as_secs_f64()
    );
    assert!(
        last_a <= t0 + chrono::Duration::seconds(2),
        "an A call {:.3} s after the pause command started",
        secs(last_a - t0)
    );
    assert_eq!(calls_b.sends.len(), b.jobs, "every B job sent");
    assert!(
        calls_b.sends.values().all(|n| *n == 1),
        "B: one send per job"
    );
    assert!(
        calls_a.sends.values().all(|n| *n == 1),
        "A: one send per job"
    );
    assert_eq!(calls_a.errors + calls_b.errors, 0);

    // parked without churn: the depth is the A jobs neither sent nor dead,
    // and stays; no tier holds a job; no A call
    let parked = h.depth(&held).await as usize;
    let dead = h.depth(&h.topology.dead_queue()).await as usize;
    assert_eq!(dead, 0, "{:?}", dead_letters(&h).await);
    assert_eq!(parked, a.jobs - a_sent - dead);
    assert!(parked > 0, "the pause came before A's end");
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            h.depth(&held).await as usize,
            parked,
            "the held queue churns"
        );
        let tiers = tier_depths(&h).await;
        assert!(tiers.values().all(|n| *n == 0), "delay tiers: {tiers:?}");
        assert_eq!(h.depth(&h.topology.send_queue()).await, 0);
    }
    let record = h.sim.record();
    assert_eq!(
        Calls::of(&record, &a).arrivals.len(),
        calls_a.arrivals.len(),
        "no A call while paused"
    );
    eprintln!("pause: {parked} A jobs parked, {a_sent} sent before the pause took hold; held depth steady for 3 s");

    let v = show_settled(
        &h,
        &config,
        &a,
        &[
            ("held", parked as u64),
            ("sent", a_sent as u64),
            ("enqueued", a.jobs as u64),
        ],
    )
    .await;
    assert_show_fields(&v);
    assert_eq!(v["state"], "paused", "{v:#}");
    assert_eq!(v["state_by"], format!("cli:{OPERATOR}"));
    assert_eq!(v["state_why"], "wrong promo code");
    assert_eq!(v["dead"], 0);
    assert_eq!(v["eta_seconds"], Value::Null, "no ETA while paused");
    let pause = trail(&v, "pause");
    assert_eq!(pause.len(), 1, "{v:#}");
    assert_eq!(pause[0]["who"], format!("cli:{OPERATOR}"));
    assert!(
        pause[0]["what"]
            .as_str()
            .unwrap_or_default()
            .contains("wrong promo code"),
        "{v:#}"
    );
    let vb = show_settled(&h, &config, &b, &[("sent", b.jobs as u64), ("held", 0)]).await;
    assert_eq!(vb["state"], "active");
    assert_eq!(vb["enqueued"], b.jobs);

    // 2. resume A
    let resumed_at = Instant::now();
    let report = cli_json(&h, &config, &["campaign", "resume", a.name, "--json"]).await;
    let resume_took = resumed_at.elapsed();
    assert_eq!(report["moved"].as_u64(), Some(parked as u64), "{report}");
    assert_eq!(
        (&report["state"], &report["failed"], &report["interrupted"]),
        (&json!("active"), &json!(0), &json!(false)),
        "{report}"
    );
    eventually!(
        Duration::from_secs(30).saturating_sub(resumed_at.elapsed()),
        sent_of(&h, &a) >= a.jobs,
        "every parked A job sent within 30 s of the resume: {} of {}",
        sent_of(&h, &a),
        a.jobs
    );
    let all_sent = resumed_at.elapsed();
    eprintln!(
        "resume: {} parked jobs moved by a command that took {:.2} s; all of A sent {:.2} s after the resume started",
        report["moved"],
        resume_took.as_secs_f64(),
        all_sent.as_secs_f64()
    );
    // exactly once each, nothing left anywhere
    tokio::time::sleep(Duration::from_secs(1)).await;
    let record = h.sim.record();
    let calls_a = Calls::of(&record, &a);
    assert_eq!(calls_a.sends.len(), a.jobs);
    let twice: Vec<_> = calls_a.sends.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
    assert!(
        (0..a.jobs).all(|i| calls_a.sends.contains_key(&a.recipient(i))),
        "every A job"
    );
    assert_eq!(calls_a.arrivals.len(), a.jobs, "one call per A job");
    assert_eq!(h.depth(&held).await, 0, "the held queue ends empty");
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 0);

    let v = show_settled(
        &h,
        &config,
        &a,
        &[("held", 0), ("sent", a.jobs as u64), ("dead", 0)],
    )
    .await;
    assert_show_fields(&v);
    assert_eq!(v["state"], "active", "{v:#}");
    assert_eq!(v["enqueued"], a.jobs);
    let resume = trail(&v, "resume");
    assert_eq!(resume.len(), 1, "{v:#}");
    assert_eq!(resume[0]["who"], format!("cli:{OPERATOR}"));
    assert_eq!(resume[0]["count"], parked, "{v:#}");
    assert_eq!(
        v["trail"][0]["action"], "resume",
        "newest first: {:#}",
        v["trail"]
    );
    assert_eq!(v["trail"][1]["action"], "pause");

    let list = cli_json(&h, &config, &["campaign", "list", "--json"]).await;
    let names: BTreeSet<&str> = list["campaigns"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["campaign"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from([a.name, b.name]), "{list:#}");

    workers.stop().await;
    h.finish().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_dead_letters_every_job_not_sent_as_cancelled_without_a_call() {
    let _turn = HEAVY.lock().await;
    let size = size();
    let c = Camp {
        name: "promo-c",
        message_id: "120210000000000103",
        jobs: size.cancelled,
    };
    let d = Camp {
        name: "promo-d",
        message_id: "120210000000000104",
        jobs: size.cancelled / 2,
    };
    // about one call in seven fails (transient): some of C's jobs wait in a delay
    // tier when it is cancelled
    let h = harness("campcancel", vec![(2_300_060, 0.15)]).await;
    let _keys = RedisKeys(h.topology.prefix.clone());
    let dir = common::tmpdir("campcancel");
    let extra = "[retry]\ntransient_delays = [\"500ms\"]\n";
    let config = h.write_config(&dir, extra);
    enqueue(&h, &dir, &config, &[&c, &d]).await;
    // D is paused before any worker runs: all of it is parked
    let report = cli_json(&h, &config, &["campaign", "pause", d.name, "--json"]).await;
    assert_eq!(report["state"], "paused", "{report}");

    let workers = Workers::start(&h, &dir, &size, extra);
    eventually!(
        T,
        sent_of(&h, &c) >= c.jobs * 3 / 10,
        "C gets going: {} sent",
        sent_of(&h, &c)
    );

    // without --yes: refused, exit 2, nothing changes
    let out = cli(&h, &config, &["campaign", "cancel", c.name, "--json"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("--yes") && stderr.contains(c.name),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    assert_eq!(show(&h, &config, &c).await["state"], "active");

    // 3. cancel C
    let t0 = Utc::now();
    let at_cancel = sent_of(&h, &c);
    let report = cli_json(
        &h,
        &config,
        &[
            "campaign", "cancel", c.name, "--yes", "--reason", "typo", "--json",
        ],
    )
    .await;
    let t_back = Utc::now();
    assert_eq!(
        (&report["action"], &report["previous"], &report["state"]),
        (&json!("cancel"), &json!("active"), &json!("cancelled")),
        "{report}"
    );
    assert_eq!(report["moved"], 0, "nothing of C was parked: {report}");

    // every C job ends: sent, or dead `cancelled` (the retrying ones too)
    let dead_q = h.topology.dead_queue();
    eventually!(
        T,
        sent_of(&h, &c) + h.depth(&dead_q).await as usize >= c.jobs
            && tier_depths(&h).await.values().all(|n| *n == 0)
            && h.depth(&h.topology.send_queue()).await == 0,
        "C settles: sent {}, dead {}, tiers {:?}",
        sent_of(&h, &c),
        h.depth(&dead_q).await,
        tier_depths(&h).await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let record = h.sim.record();
    let calls_c = Calls::of(&record, &c);
    let last_c = calls_c.last().expect("C was called");
    eprintln!(
        "cancel: {at_cancel}/{} of C sent at the command, {} in the end; the command took {:.2} s; last C call {:+.3} s after it started; {} C calls failed (retried)",
        c.jobs,
        calls_c.sends.len(),
        secs(t_back - t0),
        secs(last_c - t0),
        calls_c.errors
    );
    assert!(
        last_c <= t_back,
        "a C call {:.3} s after the cancel command returned",
        secs(last_c - t_back)
    );
    assert!(
        last_c <= t0 + chrono::Duration::seconds(2),
        "a C call {:.3} s after the cancel command started",
        secs(last_c - t0)
    );
    assert!(calls_c.sends.values().all(|n| *n == 1), "C: one send each");
    assert!(calls_c.errors > 0, "some C call failed and was retried");
    let letters = dead_letters(&h).await;
    let mut dead_c = BTreeSet::new();
    for (campaign, job_id, reason, parsed) in &letters {
        assert_eq!(campaign, c.name, "only C is dead so far: {letters:?}");
        assert_eq!(reason, "cancelled", "{job_id}");
        assert_eq!(*parsed, Some(DeadReason::Cancelled));
        assert!(dead_c.insert(job_id.clone()), "{job_id} dead twice");
    }
    for i in 0..c.jobs {
        let job_id = format!("{}-{i:05}", c.name);
        let sent = calls_c.sends.contains_key(&c.recipient(i));
        assert!(
            sent != dead_c.contains(&job_id),
            "{job_id}: sent {sent}, dead {}",
            dead_c.contains(&job_id)
        );
    }
    assert!(!dead_c.is_empty(), "the cancel came before C's end");
    let v = show_settled(
        &h,
        &config,
        &c,
        &[
            ("sent", calls_c.sends.len() as u64),
            ("dead", dead_c.len() as u64),
            ("/dead_by_reason/cancelled", dead_c.len() as u64),
            ("retried", calls_c.errors as u64),
            ("enqueued", c.jobs as u64),
            ("held", 0),
        ],
    )
    .await;
    assert_show_fields(&v);
    assert_eq!(v["state"], "cancelled", "{v:#}");
    assert_eq!(v["state_why"], "typo");
    let cancel = trail(&v, "cancel");
    assert_eq!(cancel.len(), 1, "{v:#}");
    assert_eq!(cancel[0]["who"], format!("cli:{OPERATOR}"));
    assert_eq!(cancel[0]["count"], 0, "{v:#}");
    eprintln!(
        "cancel: C {} sent + {} dead `cancelled` = {}; show: {}",
        calls_c.sends.len(),
        dead_c.len(),
        c.jobs,
        json!({"sent": v["sent"], "dead": v["dead"], "retried": v["retried"],
               "dead_by_reason": v["dead_by_reason"]})
    );

    // D: parked, never called; its cancel sends the parked jobs to the DLQ
    let held = h.topology.held_queue();
    assert_eq!(h.depth(&held).await as usize, d.jobs);
    show_settled(&h, &config, &d, &[("held", d.jobs as u64)]).await;
    let report = cli_json(
        &h,
        &config,
        &["campaign", "cancel", d.name, "--yes", "--json"],
    )
    .await;
    assert_eq!(report["moved"].as_u64(), Some(d.jobs as u64), "{report}");
    assert_eq!(report["previous"], "paused");
    eventually!(
        T,
        h.depth(&dead_q).await as usize >= dead_c.len() + d.jobs,
        "D's parked jobs dead-lettered: DLQ {}",
        h.depth(&dead_q).await
    );
    assert_eq!(h.depth(&held).await, 0);
    let letters = dead_letters(&h).await;
    let dead_d: BTreeSet<&String> = letters
        .iter()
        .filter(|l| l.0 == d.name)
        .inspect(|l| assert_eq!(l.2, "cancelled", "{l:?}"))
        .map(|l| &l.1)
        .collect();
    assert_eq!(dead_d.len(), d.jobs);
    let record = h.sim.record();
    assert!(
        Calls::of(&record, &d).arrivals.is_empty(),
        "D was never called"
    );
    assert_eq!(Calls::of(&record, &c).arrivals, calls_c.arrivals);
    let v = show_settled(
        &h,
        &config,
        &d,
        &[
            ("held", 0),
            ("sent", 0),
            ("dead", d.jobs as u64),
            ("/dead_by_reason/cancelled", d.jobs as u64),
        ],
    )
    .await;
    assert_eq!(v["state"], "cancelled");
    let cancel = trail(&v, "cancel");
    assert_eq!(cancel.len(), 1, "{v:#}");
    assert_eq!(cancel[0]["count"], d.jobs, "{v:#}");
    assert_eq!(trail(&v, "pause").len(), 1, "{v:#}");
    eprintln!(
        "cancel: D's {} parked jobs dead-lettered `cancelled`, none called",
        d.jobs
    );

    workers.stop().await;
    h.finish().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// A resume moves each parked job back to work exactly once: no worker
/// runs, so the work queue shows every copy. (It moved some twice: RabbitMQ
/// 3.x drops a quorum queue's acks still pending when their channel closes,
/// and the scan closed its channels right after its last acks; the next
/// pass found those letters back in the held queue and moved them again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_moves_each_parked_job_back_exactly_once() {
    // no worker: it runs beside the others
    let e = Camp {
        name: "promo-e",
        message_id: "120210000000000105",
        jobs: 500,
    };
    let h = harness("campresume", Vec::new()).await;
    let _keys = RedisKeys(h.topology.prefix.clone());
    let dir = common::tmpdir("campresume");
    let config = h.write_config(&dir, "");
    let (held, send) = (h.topology.held_queue(), h.topology.send_queue());
    let ch = h.conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for round in 1..=3 {
        // parked as a worker parks them (the same queue, the job as body)
        let mut confirms = Vec::new();
        for i in 0..e.jobs {
            let body = serde_json::to_vec(&e.job(i)).unwrap();
            confirms.push(
                ch.basic_publish(
                    h.topology.exchange().into(),
                    held.as_str().into(),
                    lapin::options::BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &body,
                    lapin::BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap(),
            );
        }
        for c in confirms {
            assert!(c.await.unwrap().is_ack());
        }
        let report = cli_json(&h, &config, &["campaign", "resume", e.name, "--json"]).await;
        assert_eq!(
            report["moved"].as_u64(),
            Some(e.jobs as u64),
            "round {round}: {report}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(h.depth(&held).await, 0, "round {round}: letters came back");
        assert_eq!(
            h.depth(&send).await as usize,
            e.jobs * round,
            "round {round}: one copy per parked job"
        );
    }
    let _ = ch.close(200, "done".into()).await;
    h.finish().await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every `campaign` command needs Redis and says so in one line.
#[test]
fn without_redis_every_campaign_command_refuses_in_one_line() {
    for url in [None, Some(""), Some("  ")] {
        for args in [
            &["campaign", "list"][..],
            &["campaign", "list", "--json"],
            &["campaign", "show", "promo-x"],
            &["campaign", "pause", "promo-x"],
            &["campaign", "resume", "promo-x"],
            &["campaign", "cancel", "promo-x", "--yes"],
        ] {
            let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mmsend"));
            c.args(args)
                .env("MMSEND_PREFIX", "mmsend-test-noredis")
                .env_remove("MMSEND_CONFIG")
                .env_remove("MMSEND_REDIS_URL");
            if let Some(u) = url {
                c.env("MMSEND_REDIS_URL", u);
            }
            let out = c.output().unwrap();
            let stderr = text(&out.stderr);
            let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
            assert_ne!(out.status.code(), Some(0), "{args:?} with {url:?}");
            assert_eq!(
                out.status.code(),
                Some(2),
                "{args:?} with {url:?}: {stderr}"
            );
            assert_eq!(lines.len(), 1, "{args:?} with {url:?}: {stderr}");
            assert!(
                lines[0].contains("MMSEND_REDIS_URL"),
                "{args:?} with {url:?}: {stderr}"
            );
            assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
        }
    }
}
