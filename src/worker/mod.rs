//! The worker: consume `prefix.send`, process each job on its own task, settle
//! out of order.
//!
//! One connection, two channels: one consumes, one publishes retry and dead
//! copies in confirm mode. Each delivery gets a task (`process`); tasks
//! finish in any order and hand their settled deliveries to `acks`, which
//! writes them within 2 ms, one `multiple` ack for every contiguous run of
//! tags (an ack is still written only after the outcome is durable).
//!
//! Concurrency and prefetch: at most `concurrency` jobs are processed at
//! once (a semaphore), but the prefetch is larger (by default twice the
//! concurrency, at least 8 more; three times, at least 16 more, with Redis)
//! so the next job is already here when one finishes. A slot of the
//! prefetch window is busy for the call *and* for the round trip of its ack
//! to the quorum queue and of a new delivery back, a few milliseconds;
//! against a fast API that round trip is as long as the call, so the window
//! must hold about twice the jobs being called (measured at concurrency 64
//! and a 0 ms API: prefetch 80 drained 13,700 jobs/s, 128 drained
//! 19,500–21,100, 256 drained 19,200; against a 50 ms API a quarter more
//! was already enough). With the send ledger each delivery also waits for
//! two Redis round trips (the claim, and the record before its ack), each
//! about as long as the call against a fast API, hence the third
//! `concurrency` of spares. Spare deliveries have not been sent to the API,
//! so a crash repeats no send because of them.
//!
//! Connection loss: the session ends, in-flight tasks are dropped (their
//! deliveries were never acked, so RabbitMQ redelivers them with the
//! `redelivered` flag; an ack on the dead channel is refused by lapin, never
//! sent twice), and the worker reconnects with exponential backoff and
//! jitter (`backon`), redeclares the topology and subscribes again. A
//! server-side consumer cancel (queue deleted) is handled the same way. The
//! backoff starts over only after a session that consumed for
//! [`HEALTHY_SESSION`]: a session that dies young, whatever killed it,
//! keeps backing off, so nothing can turn reconnecting into a hot loop.
//!
//! A broken publish path ends the session too: the publish channel closed
//! (the broker closes it on a channel error: an exchange deleted under it,
//! a message over the size limit) or a copy came back unroutable (a tier or
//! the DLQ deleted; reconnecting redeclares them). Readiness drops, the
//! consumer is cancelled, calls in flight run to their end and settle what
//! they can (a sent job is acked on the consuming channel), every other
//! delivery goes back to the queue, and the worker reconnects after its
//! backoff. A copy the broker refused (`Nacked`: a full queue) is held and
//! published again with backoff instead, never requeued at once: a requeued
//! job is called again, and a hot loop of calls is what this prevents.
//!
//! Shutdown (SIGINT/SIGTERM, or the token passed to [`run`]): readiness
//! drops, the consumer is cancelled (basic.cancel) and the worker finishes
//! what it holds, spare deliveries included, within `shutdown_grace`. Spares
//! are processed rather than returned because every return counts toward
//! the work queue's `x-delivery-limit` on RabbitMQ ≤ 4.2 (and a channel
//! close does on every version): a job returned by one shutdown after
//! another would end in the DLQ as `delivery_limit` without ever having
//! failed. When the grace period is over, jobs that have not started their
//! API call go back to the queue, but a call in flight is never cut: it runs
//! to its own request timeout and settles (Meta may already have processed
//! it; cutting it would send it twice). So a stop takes at most
//! `shutdown_grace` + the request timeout + a few seconds. Nothing is lost
//! on SIGKILL either: unacked deliveries return to the queue.
//!
//! Every broker step has a time limit and gives way to the shutdown signal:
//! connecting ([`broker::CONNECT_TIMEOUT`] per node), declaring, opening
//! channels, cancelling and closing.

mod acks;
mod coordination;
pub mod gates;
pub mod pacing;
mod process;
pub(crate) mod tokens;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::{self, Publisher, Topology};
use crate::classify::{CodeTable, RetryPolicy};
use crate::fleet::campaign::Tally;
use crate::fleet::{Fleet, FleetConfig};
use crate::graph::{self, ClientConfig, Outcome, Secret, SendRequest, TokenStore};
use crate::metrics::Metrics;
use coordination::Coordination;
use gates::GateTimes;
use pacing::PacingConfig;

/// Everything a worker needs, validated.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// RabbitMQ: one URL or a comma-separated list of cluster nodes.
    pub amqp_url: String,
    /// The queues to consume from and settle into.
    pub topology: Topology,
    /// How to reach the Graph API.
    pub graph: ClientConfig,
    /// The access tokens, by page.
    pub tokens: TokenStore,
    /// The page tokens file `tokens` was loaded from: read again when it
    /// changes and on SIGHUP (`worker::tokens`); `None`: tokens fixed.
    pub tokens_file: Option<std::path::PathBuf>,
    /// The classification table.
    pub table: CodeTable,
    /// The retry schedule and limits.
    pub policy: RetryPolicy,
    /// Per-page and global pacing (fleet-wide with `fleet`).
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
    /// On a graceful stop, how long jobs that wait may still start; a call
    /// in flight always runs to its request timeout.
    pub shutdown_grace: Duration,
    /// Written to `x-mmsend-worker` of dead letters; the send ledger's
    /// owner of a claim.
    pub worker_id: String,
    /// Redis for the send ledger and fleet-wide pacing and gates; `None`
    /// keeps them per process.
    pub fleet: Option<FleetConfig>,
    /// Run the delivery tracker in this process when `fleet` is set
    /// (default; `--no-tracker` turns it off): see [`crate::tracker`].
    pub tracker: bool,
    /// Run on each delivery's body inside its job task, just before the
    /// job is processed; `None` (always, outside tests). Tests use it to
    /// inject faults that no input can cause, such as a panic.
    pub job_hook: Option<JobHook>,
}

/// See [`WorkerConfig::job_hook`].
#[derive(Clone)]
pub struct JobHook(pub Arc<HookFn>);

/// The function of a [`JobHook`]: it gets the delivery's body.
pub type HookFn = dyn Fn(&[u8]) + Send + Sync;

impl std::fmt::Debug for JobHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobHook")
    }
}

impl WorkerConfig {
    /// The prefetch in use: `prefetch` if set (never below `concurrency`),
    /// else twice the concurrency, at least 8 more, or with Redis three
    /// times, at least 16 more (see the module docs).
    pub fn effective_prefetch(&self) -> u16 {
        if self.prefetch == 0 {
            let spare = self.concurrency.max(8);
            let spare = if self.fleet.is_some() {
                spare.saturating_mul(2)
            } else {
                spare
            };
            self.concurrency.saturating_add(spare)
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
            tokens_file: None,
            table: CodeTable::default(),
            policy: RetryPolicy::default(),
            pacing: PacingConfig::default(),
            gates: true,
            gate_times: GateTimes::default(),
            concurrency: 64,
            prefetch: 0,
            shutdown_grace: Duration::from_secs(30),
            worker_id: default_worker_id(),
            fleet: None,
            tracker: true,
            job_hook: None,
        }
    }
}

/// The longest worker id: it names the worker's AMQP consumer
/// (`mmsend-<id>`, a short string of at most 255 bytes).
pub const MAX_WORKER_ID_BYTES: usize = 200;

/// `host:pid-nonce`, the host from `$HOSTNAME` or `/etc/hostname`, the
/// nonce 6 random hex digits drawn at start: containers with host
/// networking share a host name and each runs as PID 1, and two workers
/// with one id would take each other's send-ledger claims for their own.
/// Control characters in the host name are dropped (the ledger refuses
/// them in an id).
pub fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.chars().filter(|c| !c.is_control()).collect::<String>())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .map(|h| {
            // a host name longer than any real one still makes a valid id
            let mut end = h.len().min(MAX_WORKER_ID_BYTES - 32);
            while !h.is_char_boundary(end) {
                end -= 1;
            }
            h[..end].to_string()
        })
        .unwrap_or_else(|| "mmsend".to_string());
    let nonce = rand::random::<u32>() & 0xff_ffff;
    format!("{host}:{}-{nonce:06x}", std::process::id())
}

#[cfg(test)]
mod id_tests {
    #[test]
    fn two_workers_of_one_host_and_pid_get_different_default_ids() {
        let (a, b) = (super::default_worker_id(), super::default_worker_id());
        assert_ne!(
            a, b,
            "same host, same PID (containers with host networking)"
        );
        let pid = format!(":{}-", std::process::id());
        assert!(a.contains(&pid), "{a}");
    }
}

/// Shared by every job task.
pub(crate) struct Ctx {
    pub topology: Topology,
    pub client: Api,
    pub tokens: tokens::LiveTokens,
    pub table: CodeTable,
    pub policy: RetryPolicy,
    pub coord: Coordination,
    pub metrics: Arc<Metrics>,
    pub worker_id: String,
    pub job_hook: Option<JobHook>,
    /// Campaign counters, written to Redis once a second (with Redis).
    pub tally: Option<Arc<Tally>>,
}

/// A problem that retrying cannot fix; the worker stops.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The Graph client cannot be built (bad base URL, TLS setup).
    #[error(transparent)]
    Client(#[from] graph::ClientError),
    /// The topology clashes with what the broker has, or is misconfigured.
    #[error(transparent)]
    Topology(#[from] broker::TopologyError),
    /// The Redis URL cannot be used.
    #[error(transparent)]
    Fleet(#[from] crate::fleet::FleetError),
    /// The RabbitMQ URL list cannot be used.
    #[error(transparent)]
    Url(#[from] broker::UrlError),
    /// Connecting failed in a way retrying cannot fix.
    #[error(transparent)]
    Connect(#[from] broker::ConnectError),
    /// `MMSEND_WORKER_ID` is too long for the AMQP consumer tag it names.
    #[error("MMSEND_WORKER_ID is {len} bytes long; at most {MAX_WORKER_ID_BYTES} (it names the worker's AMQP consumer, a short string of 255 bytes, and its send-ledger claims): choose a shorter id")]
    WorkerIdTooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// Redis may evict the send ledger's keys.
    #[error("Redis may evict keys (maxmemory {maxmemory} bytes, maxmemory-policy {policy}): an evicted send-ledger record lets a job be sent twice. Set maxmemory-policy to noeviction (redis-cli CONFIG SET maxmemory-policy noeviction, or the managed service's parameter group), or set allow_eviction = true in the [redis] section to start anyway with a warning")]
    Eviction {
        /// `maxmemory-policy`.
        policy: String,
        /// `maxmemory`.
        maxmemory: u64,
    },
}

tokio::task_local! {
    /// Set by [`Api::send`] in the job task that calls: from then on the
    /// task runs to its end, whatever the grace period says.
    static CALLING: Arc<AtomicBool>;
}

/// The Graph client as job tasks use it. [`Api::send`] marks the task as
/// calling before the request leaves, so that a graceful stop knows which
/// jobs it may still put back (not called yet) and which it must let finish
/// (a call in flight may already have been processed by Meta).
pub(crate) struct Api(graph::Client);

impl Api {
    pub(crate) async fn send(&self, token: &Secret, req: &SendRequest<'_>) -> Outcome {
        let _ = CALLING.try_with(|calling| calling.store(true, Ordering::SeqCst));
        self.0.send(token, req).await
    }
}

impl std::ops::Deref for Api {
    type Target = graph::Client;
    fn deref(&self) -> &graph::Client {
        &self.0
    }
}

/// Runs a job task's future with its "calling" flag in scope.
pub(crate) fn track_calls<F: Future>(
    calling: Arc<AtomicBool>,
    job: F,
) -> impl Future<Output = F::Output> {
    CALLING.scope(calling, job)
}

/// What one session's job tasks share with its loop.
pub(crate) struct SessionCtl {
    /// The consume channel's acks and requeues (batched acks).
    pub acks: acks::Acks,
    /// Cancelled when publishing copies no longer works: the session ends
    /// and the worker reconnects.
    publisher_lost: CancellationToken,
    /// Why, for the log.
    lost_because: Mutex<Option<String>>,
    /// Cancelled when the session is ending: a copy that cannot be
    /// published is no longer held and tried again.
    pub stopping: CancellationToken,
    /// Cancelled when jobs that have not called the API should go back to
    /// the queue: the grace period is over, or the publish path broke.
    pub grace_over: CancellationToken,
}

impl SessionCtl {
    fn new(acks: acks::Acks) -> SessionCtl {
        SessionCtl {
            acks,
            publisher_lost: CancellationToken::new(),
            lost_because: Mutex::new(None),
            stopping: CancellationToken::new(),
            grace_over: CancellationToken::new(),
        }
    }

    /// Ends the session because publishing copies no longer works.
    pub(crate) fn publisher_lost(&self, why: String) {
        let mut because = self.lost_because.lock().unwrap_or_else(|p| p.into_inner());
        because.get_or_insert(why);
        self.publisher_lost.cancel();
    }
}

/// A session that consumed at least this long was healthy: the reconnect
/// backoff starts over after it.
pub const HEALTHY_SESSION: Duration = Duration::from_secs(30);
/// Time limits of the broker steps of a session.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(30);
const CHANNEL_TIMEOUT: Duration = Duration::from_secs(10);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the last call in flight may have timed out, time left to settle
/// (publish the copy, ack) before the task is dropped.
const SETTLE_MARGIN: Duration = Duration::from_secs(10);
/// How often a worker writes its campaign counters to Redis.
const COUNTERS_EVERY: Duration = Duration::from_secs(1);

/// Runs a worker until `shutdown` is cancelled. Returns an error only for
/// problems that retrying cannot fix (bad topology arguments, a bad Graph
/// client config); broker outages are retried forever.
pub async fn run(
    config: WorkerConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    if config.worker_id.len() > MAX_WORKER_ID_BYTES {
        return Err(WorkerError::WorkerIdTooLong {
            len: config.worker_id.len(),
        });
    }
    // a bad URL list is a configuration error: stop now, do not retry it
    let urls = broker::parse_urls(&config.amqp_url)?;
    let mut graph_config = config.graph.clone();
    graph_config.pool_max_idle_per_host = usize::from(config.concurrency).max(1);
    let client = Api(graph::Client::new(graph_config)?);
    let fleet = match &config.fleet {
        Some(fleet) => Some(Arc::new(Fleet::new(
            fleet.clone(),
            &config.topology.prefix,
            &config.worker_id,
            metrics.clone(),
        )?)),
        None => None,
    };
    if let Some(f) = &fleet {
        // refused at start; checked again while running (housekeeping). A
        // Redis that does not answer now is checked when it first does.
        match f.eviction().await {
            Ok(e) if e.may_evict() && !f.config().allow_eviction => {
                return Err(WorkerError::Eviction {
                    policy: e.policy,
                    maxmemory: e.maxmemory,
                })
            }
            Ok(e) => coordination::eviction_seen(&metrics, &e),
            Err(e) => {
                warn!(error = %e, "Redis does not answer at start; its eviction policy is checked when it does")
            }
        }
    }
    match &fleet {
        Some(f) => info!(fleet = ?f, fail_mode = f.config().fail_mode.as_str(), "send ledger, pacing and gates shared through Redis"),
        None => info!("MMSEND_REDIS_URL is not set: pacing and gates are per process and there is no send ledger"),
    }
    let tracker = match (&fleet, config.tracker) {
        (Some(f), true) => Some(tokio::spawn(crate::tracker::run(
            crate::tracker::TrackerConfig {
                amqp_url: config.amqp_url.clone(),
                topology: config.topology.clone(),
            },
            f.clone(),
            metrics.clone(),
            shutdown.clone(),
        ))),
        _ => None,
    };
    let campaigns = fleet.as_ref().map(|f| f.campaigns());
    let tally = campaigns.as_ref().map(|_| Arc::new(Tally::default()));
    let ctx = Arc::new(Ctx {
        topology: config.topology.clone(),
        client,
        tokens: Arc::new(arc_swap::ArcSwap::from_pointee(config.tokens.clone())),
        table: config.table.clone(),
        policy: config.policy.clone(),
        coord: Coordination::new(
            config.pacing.clone(),
            config.gate_times.clone(),
            config.gates,
            config.graph.request_timeout,
            fleet,
            metrics.clone(),
        ),
        metrics: metrics.clone(),
        worker_id: config.worker_id.clone(),
        job_hook: config.job_hook.clone(),
        tally: tally.clone(),
    });
    // the campaign counters: once a second, and once more at the end
    let counters = match (&campaigns, &tally) {
        (Some(campaigns), Some(tally)) => {
            let (campaigns, tally, stop) = (campaigns.clone(), tally.clone(), shutdown.clone());
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(COUNTERS_EVERY);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    if let Err(e) = tally.flush(&campaigns).await {
                        debug!(error = %e, "campaign counters not written; kept for the next try");
                    }
                }
            }))
        }
        _ => None,
    };

    let token_watch = config.tokens_file.clone().map(|path| {
        metrics.set_page_tokens(config.tokens.page_count());
        tokio::spawn(tokens::watch(
            path,
            ctx.tokens.clone(),
            metrics.clone(),
            shutdown.clone(),
        ))
    });
    let housekeeping = {
        let ctx = ctx.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(10));
            let mut last = crate::metrics::SettledCounts::default();
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {}
                }
                ctx.coord.housekeeping().await;
                let now = ctx.metrics.settled_counts();
                if now != last {
                    info!(
                        sent = now.sent - last.sent,
                        retried = now.retried - last.retried,
                        dead = now.dead - last.dead,
                        inflight = ctx.metrics.inflight(),
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
            metrics.reconnected();
        }
        first = false;
        match session(&config, &urls, &ctx, &shutdown).await {
            Ok(()) | Err(SessionError::Stopped) => break Ok(()),
            Err(SessionError::Fatal(e)) => break Err(e),
            Err(SessionError::Lost(e, healthy)) => {
                metrics.set_ready(false);
                if healthy {
                    backoff = reconnect_backoff();
                }
                if shutdown.is_cancelled() {
                    break Ok(());
                }
                let wait = backoff.next().unwrap_or(Duration::from_secs(30));
                warn!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64, "lost RabbitMQ; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break Ok(()),
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    };
    metrics.set_ready(false);
    housekeeping.abort();
    if let Some(counters) = counters {
        counters.abort();
    }
    if let (Some(campaigns), Some(tally)) = (&campaigns, &tally) {
        if let Err(e) = tally.flush(campaigns).await {
            warn!(error = %e, "the last campaign counters could not be written");
        }
    }
    if let Some(watch) = token_watch {
        watch.abort();
    }
    if let Some(mut tracker) = tracker {
        // it stops on the same signal (else it is stopped here); a payload
        // it holds goes back to the queue with its connection
        if tokio::time::timeout(CLOSE_TIMEOUT, &mut tracker)
            .await
            .is_err()
        {
            tracker.abort();
        }
    }
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

enum SessionError {
    /// Retrying will not help.
    Fatal(WorkerError),
    /// The connection, a channel or the publish path went away; reconnect.
    /// `true` when the session had been healthy for [`HEALTHY_SESSION`]
    /// (the backoff starts over).
    Lost(anyhow::Error, bool),
    /// The shutdown signal came while connecting or declaring.
    Stopped,
}

/// One broker step, bounded by `limit` and by the shutdown signal.
async fn step<T>(
    what: &str,
    limit: Duration,
    shutdown: &CancellationToken,
    fut: impl Future<Output = T>,
) -> Result<T, SessionError> {
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Err(SessionError::Stopped),
        r = tokio::time::timeout(limit, fut) => r.map_err(|_| {
            SessionError::Lost(
                anyhow::anyhow!("{what}: no answer from RabbitMQ within {} s", limit.as_secs()),
                false,
            )
        }),
    }
}

/// Closing, bounded: a broker that does not answer cannot hold us.
async fn bounded_close<F: Future>(fut: F) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, fut).await;
}

/// How the consuming part of a session ended.
enum End {
    Shutdown,
    PublisherLost,
    ConsumerLost(anyhow::Error),
}

/// One connection's life: connect, declare, consume until shutdown or loss.
async fn session(
    config: &WorkerConfig,
    urls: &[broker::AmqpUrl],
    ctx: &Arc<Ctx>,
    shutdown: &CancellationToken,
) -> Result<(), SessionError> {
    let lost = |what: &str| {
        let what = what.to_string();
        move |e: lapin::Error| SessionError::Lost(anyhow::anyhow!("{what}: {e}"), false)
    };
    let role = format!("worker {}", ctx.worker_id);
    // connect tries each node for at most CONNECT_TIMEOUT
    let connect_limit = broker::CONNECT_TIMEOUT * (urls.len() as u32) + Duration::from_secs(1);
    let conn = step(
        "connect",
        connect_limit,
        shutdown,
        broker::connect_to(urls, &role),
    )
    .await?
    .map_err(|e| match e.is_retryable() {
        true => SessionError::Lost(e.into(), false),
        false => SessionError::Fatal(e.into()),
    })?;
    let setup = async {
        step(
            "declare the topology",
            DECLARE_TIMEOUT,
            shutdown,
            config.topology.declare(&conn),
        )
        .await?
        .map_err(|e| match e {
            broker::TopologyError::Inequivalent { .. } | broker::TopologyError::Config(_) => {
                SessionError::Fatal(e.into())
            }
            other => SessionError::Lost(other.into(), false),
        })?;
        let publisher = step(
            "open the publish channel",
            CHANNEL_TIMEOUT,
            shutdown,
            Publisher::open(&conn, config.topology.exchange()),
        )
        .await?
        .map_err(lost("open publish channel"))?;
        let channel = step(
            "open the consume channel",
            CHANNEL_TIMEOUT,
            shutdown,
            conn.create_channel(),
        )
        .await?
        .map_err(lost("open channel"))?;
        step(
            "set the prefetch",
            CHANNEL_TIMEOUT,
            shutdown,
            channel.basic_qos(config.effective_prefetch(), BasicQosOptions::default()),
        )
        .await?
        .map_err(lost("set prefetch"))?;
        Ok((publisher, channel))
    };
    let (publisher, channel) = match setup.await {
        Ok(p) => p,
        Err(e) => {
            bounded_close(conn.close(200, "setup failed".into())).await;
            return Err(e);
        }
    };
    let tag = format!("mmsend-{}", ctx.worker_id);
    let consume = step(
        "consume",
        CHANNEL_TIMEOUT,
        shutdown,
        channel.basic_consume(
            config.topology.send_queue().as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .and_then(|r| r.map_err(lost("consume")));
    let mut consumer = match consume {
        Ok(c) => c,
        Err(e) => {
            bounded_close(conn.close(200, "setup failed".into())).await;
            return Err(e);
        }
    };
    let prefetch = config.effective_prefetch();
    ctx.metrics.set_ready(true);
    let consuming_since = Instant::now();
    info!(
        queue = %config.topology.send_queue(),
        concurrency = config.concurrency,
        prefetch,
        "consuming"
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(usize::from(
        config.concurrency.max(1),
    )));
    let ctl = Arc::new(SessionCtl::new(acks::Acks::new(channel.clone())));
    let flusher = tokio::spawn(ctl.acks.clone().run());
    let spawn = |tasks: &mut JoinSet<()>, delivery: lapin::message::Delivery| {
        // open until settled: no batched ack may cover it before
        ctl.acks.delivered(delivery.delivery_tag);
        // boxed: the task then holds a pointer, not the whole (large)
        // future, which tokio would copy when it starts and ends the task
        tasks.spawn(Box::pin(process::handle(
            ctx.clone(),
            publisher.clone(),
            slots.clone(),
            delivery,
            ctl.clone(),
        )));
    };

    let mut tasks = JoinSet::new();
    // the publish channel can also die while no copy is being published
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let end = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break End::Shutdown,
            _ = ctl.publisher_lost.cancelled() => break End::PublisherLost,
            _ = watch.tick() => {
                if !channel.status().connected() {
                    break End::ConsumerLost(anyhow::anyhow!("the consume channel was closed"));
                }
                if !publisher.channel().status().connected() {
                    ctl.publisher_lost("the publish channel was closed".into());
                }
            }
            next = consumer.next() => match next {
                Some(Ok(delivery)) => spawn(&mut tasks, delivery),
                Some(Err(e)) => break End::ConsumerLost(anyhow::anyhow!("consumer: {e}")),
                None => break End::ConsumerLost(anyhow::anyhow!(
                    "the broker cancelled the consumer (queue deleted or moved?)"
                )),
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    warn!(error = %e, "job task failed; its delivery returns to the queue when the channel closes");
                }
            }
        }
    };
    ctx.metrics.set_ready(false);
    let healthy = consuming_since.elapsed() >= HEALTHY_SESSION;
    // a publish channel that died with the whole connection is a lost
    // connection: nothing can be acked any more, so nothing is waited for
    let end = match end {
        End::PublisherLost if !channel.status().connected() => End::ConsumerLost(anyhow::anyhow!(
            "the connection was lost (both channels closed)"
        )),
        other => other,
    };
    let close_all = || async {
        // the acks settled jobs queued, before the channel closes, and time
        // for the queue to apply them (`broker::ACK_DRAIN`): acks pending
        // at the close would be dropped, and their jobs, settled, redelivered
        bounded_close(ctl.acks.flush()).await;
        flusher.abort();
        ctl.acks.summary();
        tokio::time::sleep(broker::ACK_DRAIN).await;
        bounded_close(channel.close(200, "shutdown".into())).await;
        bounded_close(publisher.channel().close(200, "shutdown".into())).await;
        bounded_close(conn.close(200, "shutdown".into())).await;
    };
    match end {
        End::ConsumerLost(e) => {
            // Nothing can be acked on this channel any more: every delivery
            // returns to the queue with the connection. Jobs that have not
            // called go back at once (their ledger claims given back); calls
            // in flight run to their end in the background and tell the
            // ledger how they ended, so their jobs' redeliveries find them
            // sent (a suppressed duplicate, no second call) or released (a
            // fresh claim, not "maybe sent"). Aborting them instead left
            // their claims to run out, and a redelivery past the lease was
            // taken for maybe sent: a 2300035 answer (another campaign's
            // send to the recipient) then settled a never-called job as sent.
            ctl.stopping.cancel();
            ctl.grace_over.cancel();
            let limit = config.graph.request_timeout + SETTLE_MARGIN;
            let mut running = std::mem::take(&mut tasks);
            tokio::spawn(async move {
                if tokio::time::timeout(limit, join_all(&mut running))
                    .await
                    .is_err()
                {
                    running.shutdown().await;
                }
            });
            flusher.abort();
            bounded_close(conn.close(200, "reconnecting".into())).await;
            Err(SessionError::Lost(e, healthy))
        }
        End::Shutdown => {
            // no new deliveries; those already on their way are handled
            // like the spares: finished within the grace period
            bounded_close(channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()))
                .await;
            take_the_rest(&mut consumer, |d| spawn(&mut tasks, d)).await;
            ctl.stopping.cancel();
            info!(
                jobs = tasks.len(),
                grace_s = config.shutdown_grace.as_secs(),
                "stopping: finishing the jobs held, spares included"
            );
            drain(&mut tasks, config, &ctl).await;
            close_all().await;
            info!("stopped cleanly");
            Ok(())
        }
        End::PublisherLost => {
            let why = ctl
                .lost_because
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
                .unwrap_or_default();
            warn!(reason = %why, "cannot publish copies; ending the session: calls in flight finish, other jobs go back to the queue");
            bounded_close(channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()))
                .await;
            slots.close();
            ctl.stopping.cancel();
            ctl.grace_over.cancel();
            take_the_rest(&mut consumer, |d| spawn(&mut tasks, d)).await;
            drain(&mut tasks, config, &ctl).await;
            close_all().await;
            // never a fresh backoff: a publish path that breaks again right
            // away must not become a loop of calls
            Err(SessionError::Lost(
                anyhow::anyhow!("publishing copies failed: {why}"),
                false,
            ))
        }
    }
}

/// After basic.cancel: the deliveries the broker had already sent, until
/// the consumer stream ends (bounded).
async fn take_the_rest(
    consumer: &mut lapin::Consumer,
    mut handle: impl FnMut(lapin::message::Delivery),
) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        while let Some(Ok(delivery)) = consumer.next().await {
            handle(delivery);
        }
    })
    .await;
}

async fn join_all(tasks: &mut JoinSet<()>) {
    while tasks.join_next().await.is_some() {}
}

/// Waits for the job tasks: all of them within the grace period; then the
/// ones whose call is in flight, for at most the request timeout and a
/// margin to settle (the others put their deliveries back on `grace_over`).
async fn drain(tasks: &mut JoinSet<()>, config: &WorkerConfig, ctl: &SessionCtl) {
    if !ctl.grace_over.is_cancelled()
        && tokio::time::timeout(config.shutdown_grace, join_all(tasks))
            .await
            .is_ok()
    {
        return;
    }
    ctl.grace_over.cancel();
    if tasks.is_empty() {
        return;
    }
    info!(
        jobs = tasks.len(),
        "grace period over: jobs that have not called the API go back to the queue; calls in flight run to their end"
    );
    let limit = config.graph.request_timeout + SETTLE_MARGIN;
    if tokio::time::timeout(limit, join_all(tasks)).await.is_err() {
        warn!(
            unfinished = tasks.len(),
            "jobs still unsettled after the request timeout; they return to the queue"
        );
        tasks.shutdown().await;
    }
}
