//! One chaos run: a private Redis, the in-process simulator (recording,
//! with the cap, populating and budget windows, the plan's token and app
//! secret), a private topology with the results stream, and
//! `Size::workers` `mmsend worker` processes; the jobs published on their
//! schedule while the fault executor applies the plan's faults; then every
//! fault undone, a wait until nothing moves, every worker stopped, and the
//! checker given what is left.
//!
//! Decisions:
//! - Each fault becomes timed steps (a kill and, later, the start; a freeze
//!   and the thaw), applied one at a time in time order. A step that does
//!   not apply (a kill of a worker that is down, a thaw of a Redis that was
//!   killed meanwhile) is skipped and said in the history, so what happens
//!   depends only on the seed. Steps that take long (`rabbitmqctl`, a
//!   replay) run beside the executor and do not delay the next step.
//! - Each start of a worker is a new incarnation with a worker id of its
//!   own (`w<n>.<incarnation>-<prefix>`), as a restarted pod would have:
//!   a restarted worker must not take its dead predecessor's ledger leases
//!   for its own.
//! - The end: 5 s in which no queue but the DLQ holds a message, the
//!   simulator gets no request and no results event comes, then SIGTERM to
//!   every worker. What is still queued after that is reported, never waited
//!   for.
//! - Delivery tracking runs through it: the simulator posts Meta's signed
//!   webhooks for each send (echo, then delivery or failure, read, click;
//!   three in ten posted twice, each after a random delay of up to 2 s, so
//!   out of order) to a receiver in this process, and the workers' own
//!   trackers join them, dying with their workers. The end also waits for
//!   the webhook queues to empty; each campaign's funnel is read from Redis
//!   for the checker.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicGetOptions};
use lapin::types::FieldTable;
use mmsend::graph::Secret as GraphSecret;
use mmsend::simulator::{Latency, SimConfig, SimWebhooks};

use super::checker::{self, Observed, Secret, Verdict};
use super::faults::{Fault, Plan, REQUEST_TIMEOUT};
use super::history::{Entry, History};
use crate::common::{self, Harness, Opts, PrivateRedis};

/// Meta's cap: one marketing message per recipient per 12 h.
pub const CAP_WINDOW: Duration = Duration::from_secs(12 * 3600);
/// `retry.max_attempts` of the workers.
pub const MAX_ATTEMPTS: u32 = 4;
const TIERS: [&str; 3] = ["250ms", "1s", "3s"];
/// Jobs in flight per worker.
const CONCURRENCY: &str = "8";
/// How long nothing may move before the run counts as drained: longer than
/// the workers' echo window (a maybe-sent job waits that long, unacked and
/// without a call, for its echo).
const QUIET: Duration = Duration::from_secs(5);

/// The workers' config file beyond the topology: retries short enough for
/// the run to end, the request timeout the late answers overrun.
fn worker_toml() -> String {
    format!(
        r#"[retry]
max_attempts = {MAX_ATTEMPTS}
transient_delays = ["250ms", "1s"]
not_ready_delay = "1s"
not_ready_max_age = "60s"
budget_delay = "1s"
budget_max_age = "60s"
recipient_capped_delay = "1s"
recipient_capped_max_age = "4s"
gated_max_age = "8s"
[graph]
request_timeout = "{}ms"
[redis]
lease_margin = "500ms"
delivery_tracking = "on"
echo_window = "3s"
lowered_rate_for = "5s"
"#,
        REQUEST_TIMEOUT.as_millis()
    )
}

/// What a run gives back.
pub struct Outcome {
    pub plan: Plan,
    pub history: History,
    pub observed: Observed,
    pub verdict: Verdict,
    pub took: Duration,
    /// The workers' logs (kept when the run failed).
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Up,
    Stopping,
    Down,
}

struct Slot {
    child: Option<Child>,
    state: State,
    incarnation: u32,
}

/// The `mmsend worker` processes; every child is killed on drop (a run
/// that panics leaves none behind).
struct Workers<'a> {
    h: &'a Harness,
    plan: &'a Plan,
    dir: PathBuf,
    redis_url: String,
    slots: Vec<Slot>,
    exits: Vec<String>,
}

impl Workers<'_> {
    fn id(&self, w: usize) -> String {
        format!(
            "w{w}.{}-{}",
            self.slots[w].incarnation, self.h.topology.prefix
        )
    }

    fn spawn(&mut self, w: usize, history: &History) {
        self.slots[w].incarnation += 1;
        let id = self.id(w);
        let log = File::create(self.dir.join(format!("{id}.log"))).expect("log file");
        // a directory per worker: the command writes its config file, which
        // another worker may be reading at that moment
        let own = self.dir.join(format!("w{w}"));
        std::fs::create_dir_all(&own).expect("worker directory");
        let mut cmd = own_binary(self.h.worker_command(&own, &worker_toml()), &self.dir);
        cmd.env("MMSEND_CONCURRENCY", CONCURRENCY)
            .env("MMSEND_REDIS_URL", &self.redis_url)
            .env("MMSEND_REDIS_FAIL_MODE", self.plan.fail_mode)
            .env("MMSEND_WORKER_ID", &id)
            .env("MMSEND_ACCESS_TOKEN", &self.plan.access_token)
            .env("MMSEND_APP_SECRET", &self.plan.app_secret)
            .env("MMSEND_LOG", "info,mmsend=debug")
            .env("MMSEND_SHUTDOWN_GRACE", "5s")
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        let child = cmd.spawn().expect("mmsend worker starts");
        let slot = &mut self.slots[w];
        slot.child = Some(child);
        slot.state = State::Up;
        history.fault("recover", format!("worker {w} started as {id}"), true);
    }

    /// Notices workers that exited without being told to (and starts
    /// them again: a crash is a finding, the run goes on).
    fn check_exits(&mut self, history: &History) {
        for w in 0..self.slots.len() {
            let slot = &mut self.slots[w];
            if slot.state != State::Up {
                continue;
            }
            if let Some(Ok(Some(status))) = slot.child.as_mut().map(Child::try_wait) {
                let what = format!("worker {w} ({}) exited by itself: {status}", self.id(w));
                history.note(what.clone());
                self.exits.push(what);
                self.slots[w].state = State::Down;
                self.slots[w].child = None;
                self.spawn(w, history);
            }
        }
    }

    async fn wait_exit(&mut self, w: usize, limit: Duration, history: &History) {
        let Some(child) = self.slots[w].child.as_mut() else {
            return;
        };
        let deadline = Instant::now() + limit;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    if !status.success() && self.slots[w].state == State::Stopping {
                        history.note(format!("worker {w} stopped with {status}"));
                    }
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                _ => {
                    history.note(format!("worker {w} did not stop within {limit:?}: SIGKILL"));
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
            }
        }
        self.slots[w].child = None;
        self.slots[w].state = State::Down;
    }

    async fn kill(&mut self, w: usize, history: &History) {
        match self.slots[w].state {
            State::Down => history.fault("kill", format!("SIGKILL worker {w}: it is down"), false),
            _ => {
                if let Some(c) = self.slots[w].child.as_mut() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                history.fault("kill", format!("SIGKILL worker {w} ({})", self.id(w)), true);
                history.worker_fault(format!("SIGKILL {}", self.id(w)));
                self.slots[w].child = None;
                self.slots[w].state = State::Down;
            }
        }
    }

    fn term(&mut self, w: usize, history: &History) {
        match (self.slots[w].state, self.slots[w].child.as_ref()) {
            (State::Up, Some(c)) => {
                common::signal(c, "-TERM");
                self.slots[w].state = State::Stopping;
                history.fault("term", format!("SIGTERM worker {w} ({})", self.id(w)), true);
                history.worker_fault(format!("SIGTERM {}", self.id(w)));
            }
            _ => history.fault("term", format!("SIGTERM worker {w}: it is not up"), false),
        }
    }

    async fn start(&mut self, w: usize, history: &History) {
        match self.slots[w].state {
            State::Up => history.fault("recover", format!("start worker {w}: it is up"), false),
            State::Stopping => {
                self.wait_exit(w, Duration::from_secs(15), history).await;
                self.spawn(w, history);
            }
            State::Down => self.spawn(w, history),
        }
    }

    /// SIGTERM to all, then wait for every exit.
    async fn stop_all(&mut self, history: &History) {
        self.check_exits(history);
        for w in 0..self.slots.len() {
            if self.slots[w].state == State::Up {
                if let Some(c) = self.slots[w].child.as_ref() {
                    common::signal(c, "-TERM");
                }
                self.slots[w].state = State::Stopping;
            }
        }
        for w in 0..self.slots.len() {
            self.wait_exit(w, Duration::from_secs(20), history).await;
        }
    }
}

impl Drop for Workers<'_> {
    fn drop(&mut self) {
        for slot in &mut self.slots {
            if let Some(mut c) = slot.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum RedisState {
    Up,
    Frozen,
    Down,
}

/// One timed step of a fault.
#[derive(Debug, Clone)]
enum Step {
    Kill(usize),
    Term(usize),
    Start(usize),
    Close(usize),
    Freeze,
    Thaw,
    ClientPause(Duration),
    RedisKill,
    RedisStart,
    Duplicate(Vec<usize>),
    Replay,
}

/// The plan's faults as steps in time order.
fn steps(plan: &Plan) -> Vec<(Duration, Step)> {
    let mut out = Vec::new();
    for f in &plan.faults {
        let at = f.at;
        match &f.fault {
            Fault::Kill { worker, down } => {
                out.push((at, Step::Kill(*worker)));
                out.push((at + *down, Step::Start(*worker)));
            }
            Fault::Term { worker, down } => {
                out.push((at, Step::Term(*worker)));
                out.push((at + *down, Step::Start(*worker)));
            }
            Fault::CloseConnection { worker } => out.push((at, Step::Close(*worker))),
            Fault::RedisFreeze { hold } => {
                out.push((at, Step::Freeze));
                out.push((at + *hold, Step::Thaw));
            }
            Fault::RedisClientPause { hold } => out.push((at, Step::ClientPause(*hold))),
            Fault::RedisRestart { down } => {
                out.push((at, Step::RedisKill));
                out.push((at + *down, Step::RedisStart));
            }
            Fault::Duplicate { jobs } => out.push((at, Step::Duplicate(jobs.clone()))),
            Fault::Replay => out.push((at, Step::Replay)),
        }
    }
    out.sort_by_key(|(at, _)| *at);
    out
}

/// Publishes every job at its time, each confirmed.
async fn publish_all(h: &Harness, plan: &Plan, history: &History) {
    for (i, job) in plan.jobs.iter().enumerate() {
        let wait = job.at.saturating_sub(history.since());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        h.publish_raw(&job.body, FieldTable::default()).await;
        history.push(Entry::Publish { job: i, copy: 1 });
    }
}

/// Background work of the executor: `rabbitmqctl` and replays.
type Side = tokio::task::JoinHandle<Option<(String, String)>>;

/// Applies the steps in time order.
async fn execute(
    h: &Harness,
    plan: &Plan,
    workers: &mut Workers<'_>,
    redis: &mut PrivateRedis,
    history: &History,
    config: &Path,
) -> Vec<Side> {
    let mut side: Vec<Side> = Vec::new();
    let mut redis_state = RedisState::Up;
    let mut copies = vec![1u32; plan.jobs.len()];
    for (at, step) in steps(plan) {
        loop {
            let wait = at.saturating_sub(history.since());
            if wait.is_zero() {
                break;
            }
            workers.check_exits(history);
            tokio::time::sleep(wait.min(Duration::from_millis(250))).await;
        }
        match step {
            Step::Kill(w) => workers.kill(w, history).await,
            Step::Term(w) => workers.term(w, history),
            Step::Start(w) => workers.start(w, history).await,
            Step::Close(w) => {
                if workers.slots[w].state != State::Up {
                    history.fault(
                        "close",
                        format!("close worker {w}'s connection: it is not up"),
                        false,
                    );
                    continue;
                }
                let needle = workers.id(w);
                history.fault(
                    "close",
                    format!("rabbitmqctl close_connection of worker {w} ({needle})"),
                    true,
                );
                let history = history.clone();
                // rabbitmqctl takes seconds: the close happens when it returns
                side.push(tokio::task::spawn_blocking(move || {
                    let n = common::close_connections(&needle);
                    history.worker_fault(format!("closed {n} connection(s) of {needle}"));
                    None
                }));
            }
            Step::Freeze => match redis_state {
                RedisState::Up => {
                    redis.freeze();
                    redis_state = RedisState::Frozen;
                    history.redis_gone();
                    history.fault("redis freeze", "Redis frozen (SIGSTOP)", true);
                }
                _ => history.fault("redis freeze", "freeze Redis: it is not up", false),
            },
            Step::Thaw => match redis_state {
                RedisState::Frozen => {
                    redis.thaw();
                    redis_state = RedisState::Up;
                    history.redis_back();
                    history.fault("recover", "Redis thawed (SIGCONT)", true);
                }
                _ => history.fault("recover", "thaw Redis: it is not frozen", false),
            },
            Step::ClientPause(hold) => match redis_state {
                RedisState::Up => {
                    let applied = client_pause(&redis.url(), hold).await;
                    if applied {
                        history.redis_paused(hold);
                    }
                    history.fault(
                        "redis pause",
                        format!("Redis CLIENT PAUSE {} ALL", hold.as_millis()),
                        applied,
                    );
                }
                _ => history.fault("redis pause", "CLIENT PAUSE: Redis is not up", false),
            },
            Step::RedisKill => match redis_state {
                RedisState::Down => history.fault("redis restart", "kill Redis: it is down", false),
                _ => {
                    redis.down();
                    redis_state = RedisState::Down;
                    history.redis_gone();
                    history.ledger_lost();
                    history.fault(
                        "redis restart",
                        "Redis killed (SIGKILL): the ledger is lost",
                        true,
                    );
                }
            },
            Step::RedisStart => match redis_state {
                RedisState::Down => {
                    redis.up();
                    redis_state = RedisState::Up;
                    history.redis_back();
                    history.fault("recover", "Redis started again, empty", true);
                }
                _ => history.fault("recover", "start Redis: it is up", false),
            },
            Step::Duplicate(jobs) => {
                history.fault(
                    "duplicate",
                    format!("{} jobs published again", jobs.len()),
                    true,
                );
                for i in jobs {
                    h.publish_raw(&plan.jobs[i].body, FieldTable::default())
                        .await;
                    copies[i] += 1;
                    history.push(Entry::Publish {
                        job: i,
                        copy: copies[i],
                    });
                }
            }
            Step::Replay => {
                history.fault("replay", "mmsend dlq replay", true);
                let mut cmd = own_binary(h.mmsend(&["dlq", "replay"]), &workers.dir);
                cmd.env("MMSEND_CONFIG", config);
                let history = history.clone();
                side.push(tokio::task::spawn_blocking(move || {
                    let out = cmd.output().ok()?;
                    let text = format!(
                        "{}{}",
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    );
                    let note = format!("dlq replay: {} {}", out.status, text.trim());
                    history.note(note.clone());
                    Some((note, text))
                }));
            }
        }
    }
    // undo what is still undone
    if redis_state == RedisState::Frozen {
        redis.thaw();
        history.redis_back();
        history.fault("recover", "Redis thawed (SIGCONT) at the end", true);
    }
    if redis_state == RedisState::Down {
        redis.up();
        history.redis_back();
        history.fault("recover", "Redis started again at the end", true);
    }
    for w in 0..workers.slots.len() {
        if workers.slots[w].state != State::Up {
            workers.start(w, history).await;
        }
    }
    side
}

/// `CLIENT PAUSE <hold> ALL`; whether Redis took it.
async fn client_pause(url: &str, hold: Duration) -> bool {
    let pause = async {
        let client = redis::Client::open(url).ok()?;
        let mut conn = client.get_multiplexed_async_connection().await.ok()?;
        redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(hold.as_millis() as u64)
            .arg("ALL")
            .query_async::<()>(&mut conn)
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), pause).await,
        Ok(Some(()))
    )
}

/// The name of the run's copy of the `mmsend` binary in its directory.
const BINARY: &str = "mmsend";

/// `cmd` (arguments and environment kept) with the run's copy of the
/// binary in `dir`.
fn own_binary(cmd: std::process::Command, dir: &Path) -> std::process::Command {
    let mut own = std::process::Command::new(dir.join(BINARY));
    own.args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => own.env(k, v),
            None => own.env_remove(k),
        };
    }
    own
}

/// Reads the results stream from its first event, into `events`.
async fn read_results(
    h: &Harness,
    events: Arc<Mutex<Vec<Vec<u8>>>>,
) -> tokio::task::JoinHandle<()> {
    let (ch, mut consumer) = h.results_consumer("chaos-results", 500).await;
    tokio::spawn(async move {
        let _channel = ch;
        while let Some(Ok(d)) = consumer.next().await {
            events
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(d.data.clone());
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
    })
}

/// Takes every message out of the work queue and the delay tiers.
async fn take_left(h: &Harness) -> Vec<(String, Vec<u8>)> {
    let ch = h.conn.create_channel().await.expect("a channel");
    let mut queues = vec![h.topology.send_queue()];
    queues.extend(h.topology.tiers.iter().map(|t| h.topology.tier_queue(t)));
    let mut out = Vec::new();
    for q in queues {
        while let Ok(Some(m)) = ch
            .basic_get(q.as_str().into(), BasicGetOptions { no_ack: true })
            .await
        {
            out.push((q.clone(), m.delivery.data));
        }
    }
    let _ = ch.close(200, "done".into()).await;
    out
}

/// Runs `plan` and checks it.
pub async fn run(plan: Plan, drain_limit: Duration) -> Outcome {
    let started = Instant::now();
    let mut redis = PrivateRedis::start();
    // the receiver's port, known before the simulator that posts to it
    let hooks_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut opts = Opts::idle("chaos");
    opts.sim = SimConfig {
        latency: Latency::Range(Duration::from_millis(2), Duration::from_millis(30)),
        populating: plan.populating,
        budget_window: plan.budget_window,
        cap_window: Some(CAP_WINDOW),
        access_token: Some(plan.access_token.clone()),
        app_secret: Some(plan.app_secret.clone()),
        regain_minutes: 0,
        throttle_retry_after: Some(Duration::from_secs(1)),
        record: true,
        webhooks: Some(SimWebhooks {
            url: format!("http://127.0.0.1:{hooks_port}/webhooks"),
            // Meta signs with the app's secret, the one of appsecret_proof
            app_secret: plan.app_secret.clone(),
            page_id: super::faults::PAGES[0].into(),
            page_by_token: Default::default(),
            delivered: 0.9,
            read: 0.5,
            click: 0.3,
            failed: 0.05,
            duplicate: 0.3,
            max_delay: Duration::from_secs(2),
        }),
        ..SimConfig::default()
    };
    opts.tiers = TIERS.to_vec();
    opts.redis = Some(redis.url());
    opts.results = true;
    let h = Harness::start(opts).await;
    let stop_receiver = tokio_util::sync::CancellationToken::new();
    let (_, receiver) = mmsend::webhooks::spawn(
        mmsend::webhooks::WebhookConfig {
            amqp_url: common::amqp_url(),
            topology: h.topology.clone(),
            listen: format!("127.0.0.1:{hooks_port}"),
            verify_token: GraphSecret::new("chaos-verify"),
            app_secret: GraphSecret::new(plan.app_secret.clone()),
            max_body: mmsend::webhooks::MAX_BODY,
        },
        mmsend::metrics::Metrics::new(),
        stop_receiver.clone(),
    )
    .await
    .expect("the webhook receiver listens");
    let dir = common::tmpdir("chaos");
    // the run's own copy of the binary: one build from start to end, and
    // `cargo build` is free to replace target/ meanwhile
    std::fs::copy(env!("CARGO_BIN_EXE_mmsend"), dir.join(BINARY)).expect("a copy of mmsend");
    let config = h.write_config(&dir, &worker_toml());
    let history = History::new();
    let events = Arc::new(Mutex::new(Vec::new()));
    let reader = read_results(&h, events.clone()).await;

    let mut workers = Workers {
        h: &h,
        plan: &plan,
        dir: dir.clone(),
        redis_url: redis.url(),
        slots: (0..plan.size.workers)
            .map(|_| Slot {
                child: None,
                state: State::Down,
                incarnation: 0,
            })
            .collect(),
        exits: Vec::new(),
    };
    for w in 0..plan.size.workers {
        workers.spawn(w, &history);
    }

    let (_, side) = tokio::join!(
        publish_all(&h, &plan, &history),
        execute(&h, &plan, &mut workers, &mut redis, &history, &config)
    );
    let mut outputs = Vec::new();
    for s in side {
        if let Ok(Some((note, text))) = s.await {
            outputs.push((note, text));
        }
    }

    // drain: nothing moves for QUIET
    let count = |e: &Arc<Mutex<Vec<Vec<u8>>>>| e.lock().unwrap_or_else(|p| p.into_inner()).len();
    let deadline = Instant::now() + drain_limit;
    let mut last = (u32::MAX, 0, 0);
    let mut quiet_since = Instant::now();
    let hooks = [h.topology.webhook_queue(), h.topology.webhook_wait_queue()];
    loop {
        workers.check_exits(&history);
        let mut webhooks = 0;
        for q in &hooks {
            webhooks += h.depth(q).await;
        }
        // jobs waiting, and webhook events not yet joined (one the
        // trackers put aside waits 5 s), both count as moving
        let now = (
            h.waiting().await + webhooks,
            h.sim.requests(),
            count(&events),
        );
        if now != last || now.0 != 0 {
            quiet_since = Instant::now();
            last = now;
        }
        if quiet_since.elapsed() >= QUIET {
            break;
        }
        if Instant::now() >= deadline {
            history.note(format!(
                "not drained within {drain_limit:?}: {} still waiting",
                now.0
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    history.note("drained; stopping every worker");
    workers.stop_all(&history).await;
    // the last events in flight
    let mut seen = count(&events);
    loop {
        tokio::time::sleep(Duration::from_millis(700)).await;
        let now = count(&events);
        if now == seen {
            break;
        }
        seen = now;
    }
    reader.abort();
    stop_receiver.cancel();
    let _ = receiver.await;
    // each campaign's funnel as the trackers counted it, by message id
    let mut funnels = std::collections::BTreeMap::new();
    if let Ok(campaigns) = mmsend::fleet::campaign::Campaigns::connect(
        &mmsend::fleet::FleetConfig::new(&redis.url()),
        &h.topology.prefix,
    )
    .await
    {
        for c in &plan.campaigns {
            if let Ok(Some(v)) = campaigns.show(&c.label).await {
                let counted: std::collections::BTreeMap<String, u64> = v
                    .funnel
                    .stages()
                    .into_iter()
                    .filter(|(s, n)| *n > 0 && *s != "unmatched")
                    .map(|(s, n)| (s.to_string(), n))
                    .collect();
                funnels.insert(c.message_id.clone(), counted);
            }
        }
    } else {
        history.note("Redis did not answer at the end: no funnel read");
    }
    let left = take_left(&h).await;
    let letters = h.drain_dlq().await;

    let mut texts = Vec::new();
    for entry in std::fs::read_dir(&dir)
        .expect("the run's directory")
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "log") {
            let text =
                String::from_utf8_lossy(&std::fs::read(&path).unwrap_or_default()).into_owned();
            texts.push((entry.file_name().to_string_lossy().into_owned(), text));
        }
    }
    for (note, text) in outputs {
        texts.push((note.chars().take(40).collect(), text));
    }
    let proof = mmsend::graph::auth::appsecret_proof(
        &GraphSecret::new(plan.app_secret.clone()),
        &GraphSecret::new(plan.access_token.clone()),
    );
    let worker_faults = ["kill", "term", "close"]
        .iter()
        .map(|k| history.applied_faults().get(k).copied().unwrap_or(0))
        .sum();
    let observed = Observed {
        copies: history.copies(plan.jobs.len()),
        published: history.first_published(plan.jobs.len()),
        sim: h.sim.record(),
        letters,
        events: std::mem::take(&mut *events.lock().unwrap_or_else(|p| p.into_inner())),
        left,
        texts,
        outages: history.outages(),
        worker_fault_times: history.worker_faults(),
        ledger_losses: history.ledger_losses(),
        worker_faults,
        exits: std::mem::take(&mut workers.exits),
        max_attempts: MAX_ATTEMPTS,
        cap_window: CAP_WINDOW,
        request_timeout: REQUEST_TIMEOUT,
        posted: h.sim.stats().webhooks,
        funnels,
        secrets: vec![
            Secret {
                name: "access token",
                value: plan.access_token.clone(),
            },
            Secret {
                name: "app secret",
                value: plan.app_secret.clone(),
            },
            Secret {
                name: "appsecret_proof",
                value: proof,
            },
        ],
    };
    let verdict = checker::check(&plan, &observed);
    drop(workers);
    h.finish().await;
    drop(redis);
    if verdict.passed() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Outcome {
        plan,
        history,
        observed,
        verdict,
        took: started.elapsed(),
        dir,
    }
}
