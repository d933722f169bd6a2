//! The worker: consume `prefix.send`, process each job on its own task, settle
//! out of order.
//!
//! One connection, two channels: one consumes, one publishes retry and dead
//! copies in confirm mode. Each delivery gets a task ([`process`]); tasks
//! finish and ack in any order.
//!
//! Concurrency and prefetch: at most `concurrency` jobs are processed at
//! once (a semaphore), but the prefetch is a little larger (by default
//! `concurrency` + a quarter, at least 8 more) so the next job is already
//! here when one finishes. Without that spare, every finished job would wait
//! for its ack to reach the quorum queue and a new delivery to come back, a
//! few milliseconds each time, which costs ~15 % of throughput against a
//! 50 ms API. Spare deliveries have not been sent to the API, so a crash
//! repeats no send because of them; on shutdown they are returned to the
//! queue at once (nack with requeue).
//!
//! Connection loss: the session ends, in-flight tasks are dropped (their
//! deliveries were never acked, so RabbitMQ redelivers them with the
//! `redelivered` flag; an ack on the dead channel is refused by lapin, never
//! sent twice), and the worker reconnects with exponential backoff and
//! jitter (`backon`), redeclares the topology and subscribes again. A
//! server-side consumer cancel (queue deleted) is handled the same way.
//!
//! Shutdown (SIGINT/SIGTERM, or the token passed to [`run`]): stop consuming
//! (basic.cancel), let in-flight jobs finish within `shutdown_grace`, then
//! close the channels; anything still unsettled is requeued by RabbitMQ as
//! the channel closes. Nothing is lost on SIGKILL either: unacked deliveries
//! return to the queue.

pub mod gates;
pub mod pacing;
mod process;

use std::sync::Arc;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::broker::{self, Publisher, Topology};
use crate::classify::{CodeTable, RetryPolicy};
use crate::graph::{self, ClientConfig, TokenStore};
use crate::metrics::Metrics;
use gates::{GateTimes, Gates};
use pacing::{Pacer, PacingConfig};

/// Everything a worker needs, validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub amqp_url: String,
    pub topology: Topology,
    pub graph: ClientConfig,
    pub tokens: TokenStore,
    pub table: CodeTable,
    pub policy: RetryPolicy,
    pub pacing: PacingConfig,
    /// Scope gates on (default) or off.
    pub gates: bool,
    /// How long gates stay closed without a hint.
    pub gate_times: GateTimes,
    /// Jobs processed at once.
    pub concurrency: u16,
    /// Deliveries held unacked (≥ concurrency); 0 = automatic, see
    /// [`WorkerConfig::effective_prefetch`].
    pub prefetch: u16,
    pub shutdown_grace: Duration,
    /// Written to `x-mmsend-worker` of dead letters.
    pub worker_id: String,
}

impl WorkerConfig {
    /// The prefetch in use: `prefetch` if set (never below `concurrency`),
    /// else `concurrency` + a quarter, at least 8 more.
    pub fn effective_prefetch(&self) -> u16 {
        if self.prefetch == 0 {
            self.concurrency
                .saturating_add((self.concurrency / 4).max(8))
        } else {
            self.prefetch.max(self.concurrency)
        }
    }

    /// Sets the retry policy, and the gates' budget and not-ready times to
    /// match it.
    pub fn with_policy(mut self, policy: RetryPolicy) -> Self {
        self.gate_times.budget = policy.budget_delay;
        self.gate_times.not_ready = policy.not_ready_delay;
        self.policy = policy;
        self
    }

    /// A config with defaults around the essentials (tests, demo).
    pub fn new(
        amqp_url: &str,
        topology: Topology,
        graph: ClientConfig,
        tokens: TokenStore,
    ) -> Self {
        WorkerConfig {
            amqp_url: amqp_url.to_string(),
            topology,
            graph,
            tokens,
            table: CodeTable::default(),
            policy: RetryPolicy::default(),
            pacing: PacingConfig::default(),
            gates: true,
            gate_times: GateTimes::default(),
            concurrency: 64,
            prefetch: 0,
            shutdown_grace: Duration::from_secs(30),
            worker_id: default_worker_id(),
        }
    }
}

/// `host:pid`, from `$HOSTNAME` or `/etc/hostname`.
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "mmsend".to_string());
    format!("{host}:{}", std::process::id())
}

/// Shared by every job task.
pub(crate) struct Ctx {
    pub topology: Topology,
    pub client: graph::Client,
    pub tokens: TokenStore,
    pub table: CodeTable,
    pub policy: RetryPolicy,
    pub gates: Gates,
    pub pacer: Pacer,
    pub metrics: Arc<Metrics>,
    pub worker_id: String,
}

/// Runs a worker until `shutdown` is cancelled. Returns an error only for
/// problems that retrying cannot fix (bad topology arguments, a bad Graph
/// client config); broker outages are retried forever.
pub async fn run(
    config: WorkerConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut graph_config = config.graph.clone();
    graph_config.pool_max_idle_per_host = usize::from(config.concurrency).max(1);
    let client = graph::Client::new(graph_config)?;
    let ctx = Arc::new(Ctx {
        topology: config.topology.clone(),
        client,
        tokens: config.tokens.clone(),
        table: config.table.clone(),
        policy: config.policy.clone(),
        gates: Gates::new(config.gate_times.clone(), config.gates, metrics.clone()),
        pacer: Pacer::new(&config.pacing),
        metrics: metrics.clone(),
        worker_id: config.worker_id.clone(),
    });

    let housekeeping = {
        let ctx = ctx.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            let mut last = (0, 0, 0);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                ctx.pacer.shrink();
                let now = settled_counts(&ctx.metrics);
                if now != last {
                    info!(
                        sent = now.0 - last.0,
                        retried = now.1 - last.1,
                        dead = now.2 - last.2,
                        inflight = ctx.metrics.inflight.get(),
                        "settled in the last 10 s"
                    );
                    last = now;
                }
            }
        })
    };

    let mut backoff = reconnect_backoff();
    let mut first = true;
    let result = loop {
        if shutdown.is_cancelled() {
            break Ok(());
        }
        if !first {
            metrics.amqp_reconnects.inc();
        }
        first = false;
        match session(&config, &ctx, &shutdown).await {
            Ok(()) => break Ok(()),
            Err(SessionError::Fatal(e)) => break Err(e),
            Err(SessionError::Lost(e, was_consuming)) => {
                metrics.set_ready(false);
                if was_consuming {
                    backoff = reconnect_backoff();
                }
                if shutdown.is_cancelled() {
                    break Ok(());
                }
                let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "lost RabbitMQ; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    metrics.set_ready(false);
    housekeeping.abort();
    result
}

/// Exponential, with jitter, capped at 30 s, never giving up.
fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

fn settled_counts(m: &Metrics) -> (u64, u64, u64) {
    let mut out = (0, 0, 0);
    for family in prometheus::core::Collector::collect(&m.jobs) {
        for metric in family.get_metric() {
            let outcome = metric
                .get_label()
                .iter()
                .find(|l| l.name() == "outcome")
                .map(|l| l.value().to_string())
                .unwrap_or_default();
            let v = metric.get_counter().get_value() as u64;
            match outcome.as_str() {
                "sent" => out.0 += v,
                "retried" => out.1 += v,
                "dead" => out.2 += v,
                _ => {}
            }
        }
    }
    out
}

enum SessionError {
    /// Retrying will not help.
    Fatal(anyhow::Error),
    /// The connection or channel went away; reconnect. `true` when the
    /// session had been consuming (the backoff starts over).
    Lost(anyhow::Error, bool),
}

/// One connection's life: connect, declare, consume until shutdown or loss.
async fn session(
    config: &WorkerConfig,
    ctx: &Arc<Ctx>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let lost = |what: &str| {
        let what = what.to_string();
        move |e: lapin::Error| SessionError::Lost(anyhow::anyhow!("{what}: {e}"), false)
    };
    let conn = broker::connect(&config.amqp_url, &format!("worker {}", ctx.worker_id))
        .await
        .map_err(|e| SessionError::Lost(e.into(), false))?;
    config.topology.declare(&conn).await.map_err(|e| match e {
        broker::TopologyError::Inequivalent { .. } | broker::TopologyError::Config(_) => {
            SessionError::Fatal(e.into())
        }
        other => SessionError::Lost(other.into(), false),
    })?;
    let publisher = Publisher::open(&conn, config.topology.exchange())
        .await
        .map_err(lost("open publish channel"))?;
    let prefetch = config.effective_prefetch();
    let channel = conn.create_channel().await.map_err(lost("open channel"))?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .map_err(lost("set prefetch"))?;
    let tag = format!("mmsend-{}", ctx.worker_id);
    let mut consumer = channel
        .basic_consume(
            config.topology.send_queue().as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(lost("consume"))?;
    ctx.metrics.set_ready(true);
    info!(
        queue = %config.topology.send_queue(),
        concurrency = config.concurrency,
        prefetch,
        "consuming"
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(usize::from(
        config.concurrency.max(1),
    )));

    let mut tasks = JoinSet::new();
    let end = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            next = consumer.next() => match next {
                Some(Ok(delivery)) => {
                    tasks.spawn(process::handle(ctx.clone(), publisher.clone(), slots.clone(), delivery));
                }
                Some(Err(e)) => break Err(SessionError::Lost(anyhow::anyhow!("consumer: {e}"), true)),
                None => break Err(SessionError::Lost(anyhow::anyhow!(
                    "the broker cancelled the consumer (queue deleted or moved?)"
                ), true)),
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    warn!(error = %e, "job task failed; its delivery returns to the queue when the channel closes");
                }
            }
        }
    };
    ctx.metrics.set_ready(false);
    match end {
        Ok(()) => {
            // Graceful: no new deliveries, finish what we hold.
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
            // deliveries still waiting for a slot go back to the queue now
            slots.close();
            let inflight = tasks.len();
            info!(
                inflight,
                grace_s = config.shutdown_grace.as_secs(),
                "stopping: finishing in-flight jobs"
            );
            let drained = tokio::time::timeout(config.shutdown_grace, async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            if drained.is_err() {
                warn!(
                    unfinished = tasks.len(),
                    "grace period over; unfinished jobs return to the queue"
                );
                tasks.shutdown().await;
            }
            let _ = channel.close(200, "shutdown".into()).await;
            let _ = publisher.channel().close(200, "shutdown".into()).await;
            let _ = conn.close(200, "shutdown".into()).await;
            info!("stopped cleanly");
            Ok(())
        }
        Err(e) => {
            // Lost: whatever is in flight cannot be acked on this channel.
            tasks.shutdown().await;
            let _ = conn.close(200, "reconnecting".into()).await;
            Err(e)
        }
    }
}
