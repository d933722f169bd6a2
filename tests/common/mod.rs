//! Shared test harness: a private topology (random prefix, short tiers) on
//! the real RabbitMQ, the in-process Graph API simulator, and an in-process
//! worker. Everything is deleted at the end of each test.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use mmsend::broker::headers::Story;
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

pub fn random_prefix(name: &str) -> String {
    format!("mmsend-test-{name}-{:08x}", rand::random::<u32>())
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
    }
}

pub struct Harness {
    pub topology: Topology,
    pub conn: Connection,
    publish: lapin::Channel,
    pub sim: SimHandle,
    pub metrics: Arc<Metrics>,
    pub config: WorkerConfig,
    shutdown: CancellationToken,
    worker: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
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
        }
    }
}

impl Harness {
    pub async fn start(opts: Opts) -> Harness {
        let topology = Topology::new(&random_prefix(opts.name), &opts.tiers, 5).unwrap();
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
        config.worker_id = format!("test-{}", opts.name);
        let mut h = Harness {
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

    pub async fn stop_worker(&mut self) {
        self.shutdown.cancel();
        if let Some(w) = self.worker.take() {
            w.await.unwrap().unwrap();
        }
    }

    /// Publishes like any AMQP client would: exchange `<prefix>`, routing
    /// key `<prefix>.send`, no mmsend headers.
    pub async fn publish_raw(&self, body: &[u8], headers: FieldTable) {
        let confirm = self
            .publish
            .basic_publish(
                self.topology.exchange().into(),
                self.topology.send_queue().as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2)
                    .with_timestamp(chrono::Utc::now().timestamp() as u64)
                    .with_headers(headers),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack());
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

    /// Settled jobs (sent + dead) as the worker counted them.
    pub fn settled(&self) -> (u64, u64) {
        let mut sent = 0;
        let mut dead = 0;
        for fam in prometheus::core::Collector::collect(&self.metrics.jobs) {
            for m in fam.get_metric() {
                let outcome = m
                    .get_label()
                    .iter()
                    .find(|l| l.name() == "outcome")
                    .unwrap()
                    .value()
                    .to_string();
                let v = m.get_counter().get_value() as u64;
                match outcome.as_str() {
                    "sent" => sent += v,
                    "dead" => dead += v,
                    _ => {}
                }
            }
        }
        (sent, dead)
    }

    /// Waits until `sent + dead == n` and nothing waits in any queue but the DLQ.
    pub async fn wait_settled(&self, n: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let (s, d) = self.settled();
            if s + d >= n && self.metrics.inflight.get() == 0 {
                let info = self.topology.show(&self.conn).await.unwrap();
                let waiting: u32 = info
                    .iter()
                    .filter(|q| q.name != self.topology.dead_queue())
                    .map(|q| q.messages)
                    .sum();
                if waiting == 0 {
                    return;
                }
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
                    self.metrics.inflight.get(),
                    self.sim.stats()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Takes every message out of the DLQ.
    pub async fn drain_dlq(&self) -> Vec<DeadLetter> {
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
            let d = &msg.delivery;
            out.push(DeadLetter {
                body: d.data.clone(),
                story: Story::read(d.properties.headers().as_ref()),
                headers: d.properties.headers().clone().unwrap_or_default(),
            });
        }
        let _ = ch.close(200, "done".into()).await;
        out
    }

    pub async fn finish(mut self) {
        self.stop_worker().await;
        self.topology.delete(&self.conn).await.unwrap();
        let _ = self.conn.close(200, "done".into()).await;
        self.sim.shutdown().await;
    }
}

pub struct DeadLetter {
    pub body: Vec<u8>,
    pub story: Story,
    pub headers: FieldTable,
}

impl DeadLetter {
    pub fn job_id(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["job_id"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
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
