//! Shared test harness: a private topology (random prefix, short tiers) on
//! the real RabbitMQ, the in-process Graph API simulator, an in-process
//! worker, and the `mmsend` binary pointed at them. Everything is deleted at
//! the end of each test.
#![allow(dead_code, unused_macros, unused_imports)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use mmsend::broker::{self, Topology};
use mmsend::classify::RetryPolicy;
use mmsend::graph::{ClientConfig, Secret, TokenStore};
use mmsend::metrics::Metrics;
use mmsend::simulator::{SimConfig, SimHandle, Simulator};
use mmsend::worker::{self, pacing::PacingConfig, WorkerConfig};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

pub const TOKEN: &str = "EAAB-test-token-7c1f9e";

pub fn amqp_url() -> String {
    std::env::var("MMSEND_AMQP_URL").unwrap_or_else(|_| broker::DEFAULT_AMQP_URL.to_string())
}

pub fn redis_url() -> String {
    std::env::var("MMSEND_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/".into())
}

/// Deletes every Redis key of a prefix (`{<prefix>}…`); Redis errors are
/// ignored (a test that stopped its own Redis has nothing to clean).
pub async fn delete_redis_keys(url: &str, prefix: &str) {
    let config = mmsend::fleet::FleetConfig::new(url);
    if let Ok(fleet) = mmsend::fleet::Fleet::new(config, prefix, "cleanup", Metrics::new()) {
        let _ = fleet.delete_all().await;
    }
}

/// Closes, from the broker's side, every connection whose name contains
/// `needle`. Returns how many were closed.
pub fn close_connections(needle: &str) -> usize {
    use std::process::Command;
    let out = Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .expect("rabbitmqctl is installed with RabbitMQ");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines().filter(|l| l.contains(needle)) {
        let pid = line.split('\t').next().unwrap_or_default();
        let ok = Command::new("rabbitmqctl")
            .args(["close_connection", pid, "fault test"])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(ok, "rabbitmqctl close_connection {pid} failed");
        closed += 1;
    }
    closed
}

/// Sends `sig` (`-TERM`, `-KILL`, `-STOP`, …) to a child process.
pub fn signal(child: &std::process::Child, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} failed");
}

/// A Redis of the test's own on a free port (the shared one must not stop),
/// with no persistence: [`PrivateRedis::down`] then [`PrivateRedis::up`] is
/// a restart that has lost every key.
pub struct PrivateRedis {
    port: u16,
    child: Option<std::process::Child>,
    dir: std::path::PathBuf,
    extra: Vec<String>,
}

impl PrivateRedis {
    pub fn start() -> PrivateRedis {
        PrivateRedis::start_with(&[])
    }

    /// A private Redis with these extra `redis-server` arguments.
    pub fn start_with(extra: &[&str]) -> PrivateRedis {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("mmsend-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut r = PrivateRedis {
            port,
            child: None,
            dir,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        r.up();
        r
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Starts the server (again) on its port.
    pub fn up(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed (deploy/local/ensure-redis.sh)");
        self.child = Some(child);
        let port = self.port;
        eventually_blocking(Duration::from_secs(10), "redis-server starts", || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Kills the server (SIGKILL: a crash, nothing saved).
    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Freezes the server (SIGSTOP): connections stay open, nothing answers.
    pub fn freeze(&self) {
        if let Some(c) = &self.child {
            signal(c, "-STOP");
        }
    }

    /// Lets a frozen server go on (SIGCONT), every key still there.
    pub fn thaw(&self) {
        if let Some(c) = &self.child {
            signal(c, "-CONT");
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.down();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A free TCP port on 127.0.0.1 (bound, read and let go).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn random_prefix(name: &str) -> String {
    format!("mmsend-test-{name}-{:08x}", rand::random::<u32>())
}

/// A new, empty directory of the test's own (`mmsend-<name>-<random>`);
/// the test removes it.
pub fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mmsend-{name}-{:08x}", rand::random::<u32>()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Short delays so retries come back within a test.
pub fn fast_policy() -> RetryPolicy {
    let ms = Duration::from_millis;
    RetryPolicy {
        max_attempts: 4,
        transient_delays: vec![ms(200)],
        not_ready_delay: ms(300),
        not_ready_max_age: Duration::from_secs(60),
        budget_delay: ms(300),
        budget_max_age: Duration::from_secs(2),
        recipient_capped_delay: ms(300),
        recipient_capped_max_age: Duration::from_secs(2),
        gated_max_age: Duration::from_secs(10),
        ..RetryPolicy::default()
    }
}

/// Polls a condition (any expression, `.await` allowed) every 20 ms until it
/// holds; after `timeout` the test fails with the message, formatted at that
/// moment so it can show the state that was wrong.
///
/// ```ignore
/// eventually!(Duration::from_secs(20), h.sim.stats().sent >= 30, "sent {:?}", h.sim.stats());
/// ```
macro_rules! eventually {
    ($timeout:expr, $cond:expr, $($msg:tt)+) => {{
        let timeout: std::time::Duration = $timeout;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if $cond {
                break;
            }
            if std::time::Instant::now() >= deadline {
                panic!("not within {:?}: {}", timeout, format!($($msg)+));
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }};
}
pub(crate) use eventually;

/// [`eventually!`] for code that cannot await (starting a process, a
/// `Drop`): polls `condition` every 20 ms, fails the test after `timeout`.
pub fn eventually_blocking(timeout: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "not within {timeout:?}: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Deletes a test's topology when dropped, also when the test fails or
/// panics half-way, so a failed run leaves no queues behind on a shared
/// broker. [`TopologyGuard::disarm`] after a clean delete.
pub struct TopologyGuard {
    topology: Option<Topology>,
}

impl TopologyGuard {
    pub fn new(topology: &Topology) -> TopologyGuard {
        TopologyGuard {
            topology: Some(topology.clone()),
        }
    }

    pub fn disarm(&mut self) {
        self.topology = None;
    }
}

impl Drop for TopologyGuard {
    fn drop(&mut self) {
        let Some(topology) = self.topology.take() else {
            return;
        };
        // Drop cannot await, and the test's runtime may be gone: delete from
        // a thread of our own with a runtime of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let conn = broker::connect(&amqp_url(), "test cleanup").await.ok()?;
                let _ = topology.delete(&conn).await;
                let _ = conn.close(200, "cleanup".into()).await;
                Some(())
            })
        })
        .join();
    }
}

pub struct Harness {
    pub topology: Topology,
    guard: TopologyGuard,
    pub conn: Connection,
    publish: lapin::Channel,
    pub sim: SimHandle,
    pub metrics: Arc<Metrics>,
    pub config: WorkerConfig,
    shutdown: CancellationToken,
    worker: Option<tokio::task::JoinHandle<Result<(), worker::WorkerError>>>,
}

pub struct Opts {
    pub name: &'static str,
    pub sim: SimConfig,
    pub tiers: Vec<&'static str>,
    pub policy: RetryPolicy,
    pub tokens: TokenStore,
    pub concurrency: u16,
    pub start_worker: bool,
    pub gates: bool,
    /// Share the send ledger, pacing and gates through this Redis.
    pub redis: Option<String>,
    /// Declare the results stream and publish an event per settled job.
    pub results: bool,
}

impl Opts {
    pub fn new(name: &'static str) -> Opts {
        Opts {
            name,
            sim: SimConfig::default(),
            tiers: vec!["200ms", "500ms", "2m"],
            policy: fast_policy(),
            tokens: TokenStore::new(Some(Secret::new(TOKEN))),
            concurrency: 16,
            start_worker: true,
            gates: true,
            redis: None,
            results: false,
        }
    }

    /// [`Opts::new`] without the in-process worker: the test fills the
    /// queues first, or runs the `mmsend` binary instead.
    pub fn idle(name: &'static str) -> Opts {
        Opts {
            start_worker: false,
            ..Opts::new(name)
        }
    }
}

impl Harness {
    pub async fn start(opts: Opts) -> Harness {
        let mut topology = Topology::new(&random_prefix(opts.name), &opts.tiers, 5).unwrap();
        if opts.results {
            topology.results = Some(Duration::from_secs(3600));
        }
        let conn = broker::connect(&amqp_url(), "test").await.expect(
            "RabbitMQ must run on 127.0.0.1:5672 for the integration tests (deploy/local/ensure-rabbitmq.sh)",
        );
        topology.declare(&conn).await.unwrap();
        let publish = conn.create_channel().await.unwrap();
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let sim = Simulator::start("127.0.0.1:0", opts.sim).await.unwrap();
        let graph = ClientConfig {
            base_url: sim.base_url(),
            request_timeout: Duration::from_secs(5),
            ..ClientConfig::default()
        };
        let mut config = WorkerConfig::new(&amqp_url(), topology.clone(), graph, opts.tokens)
            .with_policy(opts.policy);
        config.pacing = PacingConfig {
            per_page: 0,
            ..PacingConfig::default()
        };
        config.concurrency = opts.concurrency;
        config.gates = opts.gates;
        config.gate_times.auth = Duration::from_millis(300);
        config.gate_times.throttle = Duration::from_millis(300);
        config.gate_times.probe_wait = Duration::from_millis(200);
        config.shutdown_grace = Duration::from_secs(10);
        // unique per run: fault tests find the worker's connection by this name,
        // and several test runs may share one broker
        config.worker_id = format!("test-{}", topology.prefix);
        config.fleet = opts.redis.as_deref().map(|url| {
            let mut fleet = mmsend::fleet::FleetConfig::new(url);
            fleet.lease_margin = Duration::from_millis(500);
            fleet
        });
        let mut h = Harness {
            guard: TopologyGuard::new(&topology),
            topology,
            conn,
            publish,
            sim,
            metrics: Metrics::new(),
            config,
            shutdown: CancellationToken::new(),
            worker: None,
        };
        if opts.start_worker {
            h.start_worker();
        }
        h
    }

    pub fn start_worker(&mut self) {
        self.shutdown = CancellationToken::new();
        self.worker = Some(tokio::spawn(worker::run(
            self.config.clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
        )));
    }

    /// Another worker of the same fleet (same topology, config and Redis),
    /// with metrics of its own.
    pub fn extra_worker(&self, id: &str) -> Worker {
        let mut config = self.config.clone();
        config.worker_id = format!("{}-{id}", self.config.worker_id);
        let metrics = Metrics::new();
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker::run(config, metrics.clone(), stop.clone()));
        Worker {
            metrics,
            stop,
            task: Some(task),
        }
    }

    /// Writes a config file (`mmsend.toml` in `dir`) that makes the binary see
    /// this harness's topology (tiers, delivery limit, results stream) with pacing off, plus
    /// `extra` TOML; returns its path.
    pub fn write_config(&self, dir: &std::path::Path, extra: &str) -> std::path::PathBuf {
        let tiers: Vec<String> = self
            .topology
            .tiers
            .iter()
            .map(|t| format!("{:?}", t.name))
            .collect();
        let path = dir.join("mmsend.toml");
        std::fs::write(
            &path,
            format!(
                "[topology]\ntiers = [{}]\ndelivery_limit = {}\n{}[pacing]\nper_page = 0\n{extra}",
                tiers.join(", "),
                self.topology.delivery_limit,
                match self.topology.results {
                    Some(age) =>
                        format!("results = true\nresults_max_age = \"{}s\"\n", age.as_secs()),
                    None => String::new(),
                }
            ),
        )
        .unwrap();
        path
    }

    /// The `mmsend` binary with `args`, pointed at this harness's broker
    /// and topology (`MMSEND_AMQP_URL`, `MMSEND_PREFIX`), no config file.
    pub fn mmsend(&self, args: &[&str]) -> std::process::Command {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mmsend"));
        c.args(args)
            .env("MMSEND_AMQP_URL", amqp_url())
            .env("MMSEND_PREFIX", &self.topology.prefix)
            .env_remove("MMSEND_CONFIG");
        c
    }

    /// `mmsend worker` for this harness: its broker and topology (the
    /// config file of [`Harness::write_config`] in `dir`, with `extra`
    /// TOML), its simulator and token, metrics on a free port, stdout
    /// discarded. The caller adds concurrency, logging and stderr.
    pub fn worker_command(&self, dir: &std::path::Path, extra: &str) -> std::process::Command {
        let mut c = self.mmsend(&["worker"]);
        c.env("MMSEND_CONFIG", self.write_config(dir, extra))
            .env("MMSEND_GRAPH_BASE_URL", self.sim.base_url())
            .env("MMSEND_ACCESS_TOKEN", TOKEN)
            .env("MMSEND_METRICS_ADDR", "127.0.0.1:0")
            .stdout(std::process::Stdio::null());
        c
    }

    pub async fn stop_worker(&mut self) {
        self.shutdown.cancel();
        if let Some(w) = self.worker.take() {
            w.await.unwrap().unwrap();
        }
    }

    /// Publishes like any AMQP client would: exchange `<prefix>`, routing
    /// key `<prefix>.send`, no mmsend headers.
    pub async fn publish_raw(&self, body: &[u8], headers: FieldTable) {
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(chrono::Utc::now().timestamp() as u64)
            .with_headers(headers);
        self.publish_with(body, props).await;
    }

    /// Puts dead letters (message id, job body, `x-mmsend-*` story) straight
    /// into the DLQ, confirms pipelined 256 at a time.
    pub async fn fill_dlq(&self, letters: impl IntoIterator<Item = (String, Value, FieldTable)>) {
        let ch = self.conn.create_channel().await.unwrap();
        ch.confirm_select(Default::default()).await.unwrap();
        let mut pending = Vec::new();
        for (id, body, headers) in letters {
            pending.push(
                ch.basic_publish(
                    self.topology.exchange().into(),
                    self.topology.dead_queue().as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &serde_json::to_vec(&body).unwrap(),
                    BasicProperties::default()
                        .with_message_id(id.as_str().into())
                        .with_delivery_mode(2)
                        .with_headers(headers),
                )
                .await
                .unwrap(),
            );
            if pending.len() >= 256 {
                for p in pending.drain(..) {
                    assert!(p.await.unwrap().is_ack());
                }
            }
        }
        for p in pending {
            assert!(p.await.unwrap().is_ack());
        }
        let _ = ch.close(200, "ok".into()).await;
    }

    /// Publishes `body` to `<prefix>.send` with exactly these properties
    /// and checks the broker confirmed it.
    pub async fn publish_with(&self, body: &[u8], props: BasicProperties) {
        let send = self.topology.send_queue();
        let confirm = self
            .publish_to(self.topology.exchange(), &send, body, props)
            .await;
        assert!(confirm.is_ack());
    }

    /// Publishes `body` (mandatory) to `exchange` with `routing_key` and
    /// waits for the broker's confirm.
    pub async fn publish_to(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> lapin::Confirmation {
        self.publish
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap()
    }

    /// Takes one delivery from the work queue and closes its channel
    /// without an ack, as a consumer that crashes would: RabbitMQ requeues
    /// the job and counts the delivery. Whether there was one to take.
    pub async fn crash_holding_one(&self) -> bool {
        let ch = self.conn.create_channel().await.unwrap();
        ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        let got = ch
            .basic_get(
                self.topology.send_queue().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .unwrap();
        let _ = ch.close(200, "crash".into()).await;
        got.is_some()
    }

    pub async fn publish_job(&self, job: &Value) {
        self.publish_raw(&serde_json::to_vec(job).unwrap(), FieldTable::default())
            .await;
    }

    pub async fn depth(&self, queue: &str) -> u32 {
        let info = self.topology.show(&self.conn).await.unwrap();
        info.into_iter()
            .find(|q| q.name == queue)
            .map(|q| q.messages)
            .unwrap()
    }

    /// Jobs waiting in the work queue and the delay tiers (everywhere but
    /// the DLQ, the webhook queues, which hold no jobs, and the results
    /// stream: a stream keeps its events after they are read, and how many
    /// it reports depends on when the broker last counted them).
    pub async fn waiting(&self) -> u32 {
        let info = self.topology.show(&self.conn).await.unwrap();
        let not_jobs = [
            self.topology.dead_queue(),
            self.topology.results_stream(),
            self.topology.webhook_queue(),
            self.topology.webhook_wait_queue(),
        ];
        info.iter()
            .filter(|q| !not_jobs.contains(&q.name))
            .map(|q| q.messages)
            .sum()
    }

    /// Settled jobs (sent + dead) as the worker counted them; a delivery
    /// the send ledger acked as already sent counts as sent.
    pub fn settled(&self) -> (u64, u64) {
        let c = self.metrics.settled_counts();
        (c.sent + self.metrics.duplicates_suppressed(), c.dead)
    }

    /// Waits until `sent + dead == n` and nothing waits in any queue but the DLQ.
    pub async fn wait_settled(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (s, d) = self.settled();
            if s + d >= n && self.metrics.inflight() == 0 && self.waiting().await == 0 {
                return;
            }
            if Instant::now() >= deadline {
                let depths: Vec<String> = self
                    .topology
                    .show(&self.conn)
                    .await
                    .unwrap()
                    .iter()
                    .map(|q| format!("{}={}", q.name, q.messages))
                    .collect();
                panic!(
                    "not settled in {timeout:?}: sent {s}, dead {d}, want {n}, inflight {}; queues {depths:?}; sim {:?}",
                    self.metrics.inflight(),
                    self.sim.stats()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes every message out of the DLQ, as the DLQ tools see them.
    /// A consumer of the results stream from its first event (as a
    /// campaign service reads it), on a channel of its own with `prefetch`;
    /// the channel is returned to keep it open.
    pub async fn results_consumer(
        &self,
        tag: &str,
        prefetch: u16,
    ) -> (lapin::Channel, lapin::Consumer) {
        let ch = self.conn.create_channel().await.expect("a channel");
        ch.basic_qos(prefetch, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut args = FieldTable::default();
        args.insert(
            "x-stream-offset".into(),
            lapin::types::AMQPValue::LongString("first".into()),
        );
        let consumer = ch
            .basic_consume(
                self.topology.results_stream().as_str().into(),
                tag.into(),
                lapin::options::BasicConsumeOptions::default(),
                args,
            )
            .await
            .expect("the results stream");
        (ch, consumer)
    }

    pub async fn drain_dlq(&self) -> Vec<mmsend::dlq::DeadLetter> {
        let ch = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(msg) = ch
            .basic_get(
                self.topology.dead_queue().as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
        {
            let d = msg.delivery;
            out.push(mmsend::dlq::DeadLetter::new(d.data, d.properties));
        }
        let _ = ch.close(200, "done".into()).await;
        out
    }

    /// The reason of every letter in the DLQ, as the DLQ tools show it, in
    /// queue order (a peek: the letters stay).
    pub async fn dead_reasons(&self) -> Vec<String> {
        let mut reasons = Vec::new();
        mmsend::dlq::scan(
            &self.conn,
            &self.topology,
            mmsend::dlq::Filter::default(),
            &mmsend::dlq::ScanOptions::peek(),
            &mut |d: &mmsend::dlq::DeadLetter| reasons.push(d.reason_label()),
        )
        .await
        .unwrap();
        reasons
    }

    pub async fn finish(mut self) {
        self.stop_worker().await;
        self.topology.delete(&self.conn).await.unwrap();
        self.guard.disarm();
        if let Some(fleet) = &self.config.fleet {
            delete_redis_keys(&fleet.url, &self.topology.prefix).await;
        }
        let _ = self.conn.close(200, "done".into()).await;
        self.sim.shutdown().await;
    }
}

/// A worker started with [`Harness::extra_worker`].
pub struct Worker {
    pub metrics: Arc<Metrics>,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<Result<(), worker::WorkerError>>>,
}

impl Worker {
    pub async fn stop(mut self) {
        self.stop.cancel();
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

/// A dead letter's AMQP headers.
pub fn headers(d: &mmsend::dlq::DeadLetter) -> FieldTable {
    d.properties.headers().clone().unwrap_or_default()
}

pub fn job(id: &str, token: &str) -> Value {
    json!({"v": 1, "job_id": id, "ad_account_id": "act_1234567890", "page_id": "9876543210",
           "message_id": "120210000000000000", "subscription_token": token,
           "message": {"text": "Hi"}, "campaign": "test"})
}

pub fn job_for(id: &str, token: &str, message_id: &str) -> Value {
    let mut j = job(id, token);
    j["message_id"] = json!(message_id);
    j
}

/// Counts of a map, for readable assertion messages.
pub fn by<T: Ord + Clone>(items: impl IntoIterator<Item = T>) -> BTreeMap<T, usize> {
    let mut m = BTreeMap::new();
    for i in items {
        *m.entry(i).or_insert(0) += 1;
    }
    m
}
