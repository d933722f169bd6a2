//! Prometheus metrics (one registry, every name in this file) and the HTTP
//! endpoints a worker serves: `/metrics`, `/healthz`, `/readyz`.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 only
//! while the worker is connected to RabbitMQ and consuming, 503 otherwise, so
//! Kubernetes stops counting a pod that lost its broker. Queue depths are not
//! exported here: RabbitMQ's own `rabbitmq_prometheus` plugin has them.
//!
//! Recording goes through typed methods ([`Metrics::settled`],
//! [`Metrics::graph_error`], [`Metrics::gate_opened`], …): label strings and
//! series names live in this file only. Label sets are bounded: `class` is
//! one of the classes (or `none`), `code` a code of the classification table
//! or `other`/`http_*`/`timeout`/`transport`/`not_a_send`, `scope` a scope
//! kind, `tier` and `reason` come from fixed lists.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use std::time::Duration;

use crate::classify::{Class, CodeLabel, DeadReason, ScopeKind, Verdict};
use crate::graph::UsageHint;

/// The names of the series, each written once.
mod name {
    pub(super) const JOBS: &str = "mmsend_jobs_total";
    pub(super) const GRAPH_ERRORS: &str = "mmsend_graph_errors_total";
    pub(super) const GRAPH_REQUEST_DURATION: &str = "mmsend_graph_request_duration_seconds";
    pub(super) const JOB_LATENCY: &str = "mmsend_job_latency_seconds";
    pub(super) const INFLIGHT: &str = "mmsend_inflight";
    pub(super) const RETRIES: &str = "mmsend_retries_total";
    pub(super) const DEAD_LETTERS: &str = "mmsend_dead_letters_total";
    pub(super) const GATES_OPEN: &str = "mmsend_gates_open";
    pub(super) const AMQP_CONNECTED: &str = "mmsend_amqp_connected";
    pub(super) const AMQP_RECONNECTS: &str = "mmsend_amqp_reconnects_total";
    pub(super) const GRAPH_USAGE: &str = "mmsend_graph_usage_ratio";
    pub(super) const REDELIVERED: &str = "mmsend_redelivered_total";
    pub(super) const AMBIGUOUS: &str = "mmsend_ambiguous_total";
    pub(super) const BUILD_INFO: &str = "mmsend_build_info";
    pub(super) const DUPLICATES_SUPPRESSED: &str = "mmsend_duplicates_suppressed_total";
    pub(super) const SUSPECTED_DUPLICATES: &str = "mmsend_suspected_duplicates_total";
    pub(super) const PACING_WAIT: &str = "mmsend_pacing_wait_seconds";
    pub(super) const REDIS_UP: &str = "mmsend_redis_up";
    pub(super) const REDIS_MAY_EVICT: &str = "mmsend_redis_may_evict";
    pub(super) const REDIS_DURATION: &str = "mmsend_redis_request_duration_seconds";
    pub(super) const REDIS_ERRORS: &str = "mmsend_redis_errors_total";
    pub(super) const PUBLISH_FAILURES: &str = "mmsend_publish_failures_total";
    pub(super) const JOB_PANICS: &str = "mmsend_job_panics_total";
    pub(super) const PAGE_TOKENS: &str = "mmsend_page_tokens";
    pub(super) const PAGE_TOKENS_RELOADS: &str = "mmsend_page_tokens_reloads_total";
    pub(super) const WEBHOOK_REQUESTS: &str = "mmsend_webhook_requests_total";
    pub(super) const WEBHOOK_EVENTS: &str = "mmsend_webhook_events_total";
    pub(super) const SILENT_PAGES: &str = "mmsend_silent_pages";
    pub(super) const MAYBE_SENT: &str = "mmsend_maybe_sent_total";
}

/// Every series mmsend exports (histograms without their `_bucket`/`_sum`/
/// `_count` suffixes; the standard `process_*` series besides). The
/// dashboard and alert rules are checked against this list by
/// `tests/deploy.rs`.
pub const SERIES: &[&str] = &[
    name::JOBS,
    name::GRAPH_ERRORS,
    name::GRAPH_REQUEST_DURATION,
    name::JOB_LATENCY,
    name::INFLIGHT,
    name::RETRIES,
    name::DEAD_LETTERS,
    name::GATES_OPEN,
    name::AMQP_CONNECTED,
    name::AMQP_RECONNECTS,
    name::GRAPH_USAGE,
    name::REDELIVERED,
    name::AMBIGUOUS,
    name::BUILD_INFO,
    name::DUPLICATES_SUPPRESSED,
    name::SUSPECTED_DUPLICATES,
    name::PACING_WAIT,
    name::REDIS_UP,
    name::REDIS_MAY_EVICT,
    name::REDIS_DURATION,
    name::REDIS_ERRORS,
    name::PUBLISH_FAILURES,
    name::JOB_PANICS,
    name::PAGE_TOKENS,
    name::PAGE_TOKENS_RELOADS,
    name::WEBHOOK_REQUESTS,
    name::WEBHOOK_EVENTS,
    name::SILENT_PAGES,
    name::MAYBE_SENT,
];

/// The series of [`SERIES`] only `mmsend webhooks` exports (a worker's
/// scrape has none of them).
pub const WEBHOOK_SERIES: &[&str] = &[name::WEBHOOK_REQUESTS];

/// The series of [`SERIES`] only the delivery tracker exports (inside a
/// worker with Redis, or `mmsend tracker`).
pub const TRACKER_SERIES: &[&str] = &[name::WEBHOOK_EVENTS, name::SILENT_PAGES];

/// The series `mmsend console` serves at its `/metrics` (with Redis):
/// each campaign's counters from Redis, for the most recently active
/// [`CAMPAIGN_SERIES_MAX`] campaigns only, so the label set stays bounded
/// however many campaigns a year brings. Workers export no per-campaign
/// label (their series are multiplied by the fleet's size).
pub const CONSOLE_SERIES: &[&str] = &[
    "mmsend_campaign_jobs",
    "mmsend_campaign_state",
    "mmsend_campaign_rate_per_minute",
];

/// Campaigns the console's `/metrics` covers at most.
pub const CAMPAIGN_SERIES_MAX: usize = 50;

/// Why a retry or dead copy was not published: the `reason` label of
/// `mmsend_publish_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishFailure {
    /// Unroutable: a queue is missing.
    Returned,
    /// Refused: a full queue.
    Nacked,
    /// The publish channel is gone.
    ChannelClosed,
    /// Any other error.
    Error,
}

impl PublishFailure {
    /// Every reason.
    pub const ALL: [PublishFailure; 4] = [
        PublishFailure::Returned,
        PublishFailure::Nacked,
        PublishFailure::ChannelClosed,
        PublishFailure::Error,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            PublishFailure::Returned => "returned",
            PublishFailure::Nacked => "nacked",
            PublishFailure::ChannelClosed => "channel_closed",
            PublishFailure::Error => "error",
        }
    }
}

/// A Redis call of the fleet layer: the `op` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOp {
    /// The round trip before a Graph call (ledger claim, gates, pacing).
    Before,
    /// The round trip after it (ledger record, gates, page rate).
    After,
    /// One round trip carrying both scripts (jobs that ask and jobs that
    /// tell at the same time).
    BeforeAfter,
    /// The periodic count of open gates.
    Census,
    /// A health check.
    Ping,
    /// Campaign counters, state and audit (`mmsend campaign`, the
    /// workers' counter writes).
    Campaigns,
    /// The delivery tracker's joins, and a maybe-sent job's look for its
    /// echo.
    Tracking,
}

impl RedisOp {
    /// Every op.
    pub const ALL: [RedisOp; 7] = [
        RedisOp::Before,
        RedisOp::After,
        RedisOp::BeforeAfter,
        RedisOp::Census,
        RedisOp::Ping,
        RedisOp::Campaigns,
        RedisOp::Tracking,
    ];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RedisOp::Before => "before",
            RedisOp::After => "after",
            RedisOp::BeforeAfter => "before_after",
            RedisOp::Census => "census",
            RedisOp::Ping => "ping",
            RedisOp::Campaigns => "campaigns",
            RedisOp::Tracking => "tracking",
        }
    }
}

/// Redis round-trip buckets, 0.1 ms … 1 s.
const REDIS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Pacing-wait buckets, 1 ms … 60 s.
const PACING_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Request-duration buckets, 10 ms … 60 s.
const REQUEST_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];
/// End-to-end buckets: a job may wait in delay tiers for hours.
const LATENCY_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
    21600.0, 86400.0,
];

/// How a delivery was settled: the `outcome` label of `mmsend_jobs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Settled {
    /// Acked as sent.
    Sent,
    /// Copied to a delay tier.
    Retried,
    /// Copied to the dead-letter queue.
    Dead,
    /// Parked in the held queue: its campaign is paused.
    Held,
}

impl Settled {
    /// Every outcome.
    pub const ALL: [Settled; 4] = [
        Settled::Sent,
        Settled::Retried,
        Settled::Dead,
        Settled::Held,
    ];

    /// The label value (`sent`, `retried`, `dead`, `held`).
    pub fn label(self) -> &'static str {
        match self {
            Settled::Sent => "sent",
            Settled::Retried => "retried",
            Settled::Dead => "dead",
            Settled::Held => "held",
        }
    }
}

/// The `class` label: a class, or `none` (sent first time, or dead without
/// a call: invalid job, no token, expired).
fn class_label(class: Option<Class>) -> &'static str {
    class.map_or("none", Class::as_str)
}

/// Jobs settled so far, by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SettledCounts {
    /// Acked as sent.
    pub sent: u64,
    /// Copied to a delay tier.
    pub retried: u64,
    /// Copied to the dead-letter queue.
    pub dead: u64,
}

/// All of a process's metrics. Recording goes through the typed methods;
/// the label strings live here and nowhere else.
pub struct Metrics {
    registry: Registry,
    jobs: IntCounterVec,
    graph_errors: IntCounterVec,
    graph_request_duration: Histogram,
    job_latency: HistogramVec,
    inflight: IntGauge,
    retries: IntCounterVec,
    dead_letters: IntCounterVec,
    gates_open: IntGaugeVec,
    amqp_connected: IntGauge,
    amqp_reconnects: IntCounter,
    graph_usage: prometheus::GaugeVec,
    /// `graph_usage`'s series, [app, buc] × [call_count, total_cputime,
    /// total_time], looked up once (and only once reported: an unknown
    /// usage has no series rather than 0).
    usage_gauges: [[std::sync::OnceLock<prometheus::Gauge>; 3]; 2],
    redelivered: IntCounter,
    ambiguous: IntCounter,
    duplicates_suppressed: IntCounter,
    suspected_duplicates: IntCounter,
    pacing_wait: Histogram,
    redis_up: IntGauge,
    redis_may_evict: IntGauge,
    redis_duration: HistogramVec,
    redis_errors: IntCounterVec,
    publish_failures: IntCounterVec,
    job_panics: IntCounter,
    page_tokens: IntGauge,
    page_tokens_reloads: IntCounterVec,
    webhook_requests: IntCounterVec,
    webhook_events: IntCounterVec,
    silent_pages: IntGauge,
    maybe_sent: IntCounterVec,
    ready: AtomicBool,
    holding: AtomicBool,
}

impl Metrics {
    /// A fresh registry (tests run several workers in one process).
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let register = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("unique metric");
        };
        let opts = |n: &str, help: &str| {
            Opts::new(n.trim_start_matches("mmsend_"), help).namespace("mmsend")
        };
        let counter_vec = |n: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(n, help), labels).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let gauge_vec = |n: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(opts(n, help), labels).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let gauge = |n: &str, help: &str| {
            let g = IntGauge::with_opts(opts(n, help)).expect("valid metric");
            register(Box::new(g.clone()));
            g
        };
        let counter = |n: &str, help: &str| {
            let c = IntCounter::with_opts(opts(n, help)).expect("valid metric");
            register(Box::new(c.clone()));
            c
        };
        let histogram_opts = |n: &str, help: &str, buckets: &[f64]| {
            HistogramOpts::new(n.trim_start_matches("mmsend_"), help)
                .namespace("mmsend")
                .buckets(buckets.to_vec())
        };
        let jobs = counter_vec(
            name::JOBS,
            "Jobs settled, by outcome (sent, retried, dead) and class of the last failure (none when sent first time).",
            &["outcome", "class"],
        );
        let graph_errors = counter_vec(
            name::GRAPH_ERRORS,
            "Failed Graph API calls by class and code (table codes, other, http_*, timeout, transport, not_a_send).",
            &["class", "code"],
        );
        let graph_request_duration = Histogram::with_opts(histogram_opts(
            name::GRAPH_REQUEST_DURATION,
            "Graph API call duration, seconds.",
            REQUEST_BUCKETS,
        ))
        .expect("valid metric");
        register(Box::new(graph_request_duration.clone()));
        let job_latency = HistogramVec::new(
            histogram_opts(
                name::JOB_LATENCY,
                "Enqueue (x-mmsend-enqueued-at) to settled, seconds, by outcome.",
                LATENCY_BUCKETS,
            ),
            &["outcome"],
        )
        .expect("valid metric");
        register(Box::new(job_latency.clone()));
        let inflight = gauge(name::INFLIGHT, "Jobs being processed now.");
        let retries = counter_vec(
            name::RETRIES,
            "Jobs sent to a delay tier, by tier.",
            &["tier"],
        );
        let dead_letters = counter_vec(
            name::DEAD_LETTERS,
            "Jobs sent to the dead-letter queue, by reason.",
            &["reason"],
        );
        let gates_open = gauge_vec(
            name::GATES_OPEN,
            "Scopes currently held back (their jobs go to a delay tier without an API call), by scope kind and the class that closed them.",
            &["scope", "class"],
        );
        let amqp_connected = gauge(
            name::AMQP_CONNECTED,
            "1 while connected to RabbitMQ and consuming.",
        );
        let amqp_reconnects = counter(
            name::AMQP_RECONNECTS,
            "Reconnections to RabbitMQ after a lost connection.",
        );
        let graph_usage = prometheus::GaugeVec::new(
            opts(
                name::GRAPH_USAGE,
                "Last usage reported by X-App-Usage / X-Business-Use-Case-Usage, as a ratio of the allowance (0-1; Meta reports percent).",
            ),
            &["kind"],
        )
        .expect("valid metric");
        register(Box::new(graph_usage.clone()));
        let redelivered = counter(
            name::REDELIVERED,
            "Deliveries with the redelivered flag (a previous consumer did not settle them).",
        );
        let ambiguous = counter(
            name::AMBIGUOUS,
            "Graph calls that failed after the request may have been processed (possible duplicate on retry).",
        );
        let duplicates_suppressed = counter(
            name::DUPLICATES_SUPPRESSED,
            "Deliveries acked without a call because the send ledger says the job was sent (a redelivery or a replay of a sent job).",
        );
        let suspected_duplicates = counter(
            name::SUSPECTED_DUPLICATES,
            "Jobs settled as sent because Meta answered 2300035 after a call that may have been the send (never retried into a second send).",
        );
        let pacing_wait = Histogram::with_opts(histogram_opts(
            name::PACING_WAIT,
            "How long a job waited for its page's (and the global) pacing slot, seconds.",
            PACING_BUCKETS,
        ))
        .expect("valid metric");
        register(Box::new(pacing_wait.clone()));
        let redis_up = gauge(
            name::REDIS_UP,
            "1 while the fleet layer's Redis answers; 0 while the worker falls back (or 1 with no Redis configured: nothing to be down).",
        );
        let redis_may_evict = gauge(
            name::REDIS_MAY_EVICT,
            "1 when the fleet's Redis has a memory limit and a maxmemory-policy other than noeviction: it may evict send-ledger records and claims (a job could be sent twice). 0 otherwise, or not known yet.",
        );
        let page_tokens = gauge(
            name::PAGE_TOKENS,
            "Pages with a token of their own in MMSEND_PAGE_TOKENS_FILE, as now in use (the file is read again when it changes and on SIGHUP).",
        );
        let page_tokens_reloads = counter_vec(
            name::PAGE_TOKENS_RELOADS,
            "Reads of a changed MMSEND_PAGE_TOKENS_FILE, by result: ok (swapped in), failed (the tokens before stay in use; the log says why).",
            &["result"],
        );
        // both series from the start, at 0: an alert on their increase
        // sees the first failure
        for result in ["ok", "failed"] {
            page_tokens_reloads.with_label_values(&[result]);
        }
        let webhook_requests = counter_vec(
            name::WEBHOOK_REQUESTS,
            "Requests to `mmsend webhooks`, by result: stored (a signed post confirmed by RabbitMQ, answered 200), unavailable (not stored, answered 503: Meta sends it again), bad_signature (403), too_large (413), bad_request, verified and verify_refused (the subscription handshake).",
            &["result"],
        );
        let webhook_events = counter_vec(
            name::WEBHOOK_EVENTS,
            "Marketing-message webhook events the delivery tracker took, by field (echoed, delivered, read, clicked, delivery_failed; unknown or none for what could not be read; other for fields mmsend does not track) and result: matched (joined to its send, the first of its field), duplicate (already counted: Meta delivered it again), deferred (its send not known yet: tried again in 5 s), unmatched (no send found on the last try), malformed, skipped (other fields).",
            &["field", "result"],
        );
        let silent_pages = gauge(
            name::SILENT_PAGES,
            "Pages with sends and no echo from Meta for longer than [redis] silent_page_after: their webhook subscription was probably dropped (mmsend pages check).",
        );
        let maybe_sent = counter_vec(
            name::MAYBE_SENT,
            "Jobs whose earlier call may have been the send, by how they were settled: echo (Meta's echo of that call found: sent, no second call) or call (no echo within the echo window: called again, 2300035 guarding).",
            &["settled_by"],
        );
        for by in ["echo", "call"] {
            maybe_sent.with_label_values(&[by]);
        }
        let redis_duration = HistogramVec::new(
            histogram_opts(
                name::REDIS_DURATION,
                "Redis round trips of the fleet layer (send ledger, pacing, gates), seconds, by op.",
                REDIS_BUCKETS,
            ),
            &["op"],
        )
        .expect("valid metric");
        register(Box::new(redis_duration.clone()));
        let redis_errors = counter_vec(
            name::REDIS_ERRORS,
            "Redis round trips that failed or timed out, by op.",
            &["op"],
        );
        redis_up.set(1);
        for op in RedisOp::ALL {
            redis_duration.with_label_values(&[op.as_str()]);
            redis_errors.with_label_values(&[op.as_str()]);
        }
        let publish_failures = counter_vec(
            name::PUBLISH_FAILURES,
            "Retry or dead copies not published, by reason: returned (unroutable: a queue is missing), nacked (refused: a full queue), channel_closed, error.",
            &["reason"],
        );
        for reason in PublishFailure::ALL {
            publish_failures.with_label_values(&[reason.as_str()]);
        }
        let job_panics = counter(
            name::JOB_PANICS,
            "Jobs whose processing panicked (a bug); each counts as a failed attempt.",
        );
        let build_info = gauge_vec(
            name::BUILD_INFO,
            "Always 1; the version label tells the build.",
            &["version"],
        );
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        // The standard process_* series (CPU, memory, open fds, start time).
        #[cfg(target_os = "linux")]
        register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));

        // Series that alerts use exist from the start, at zero.
        jobs.with_label_values(&[Settled::Sent.label(), class_label(None)]);
        for reason in DeadReason::ALL {
            if reason != DeadReason::DeliveryLimit {
                dead_letters.with_label_values(&[reason.as_str()]);
            }
        }
        for class in Class::ALL {
            let scope = class.default_scope();
            if scope != ScopeKind::None {
                gates_open.with_label_values(&[scope.as_str(), class.as_str()]);
            }
        }

        Arc::new(Metrics {
            registry,
            jobs,
            graph_errors,
            graph_request_duration,
            job_latency,
            inflight,
            retries,
            dead_letters,
            gates_open,
            amqp_connected,
            amqp_reconnects,
            graph_usage,
            usage_gauges: Default::default(),
            redelivered,
            ambiguous,
            duplicates_suppressed,
            suspected_duplicates,
            pacing_wait,
            redis_up,
            redis_may_evict,
            redis_duration,
            redis_errors,
            publish_failures,
            job_panics,
            page_tokens,
            page_tokens_reloads,
            webhook_requests,
            webhook_events,
            silent_pages,
            maybe_sent,
            ready: AtomicBool::new(false),
            holding: AtomicBool::new(false),
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }

    /// Marks the worker connected-and-consuming (or not).
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
        self.amqp_connected.set(i64::from(ready));
    }

    /// Whether the worker is connected and consuming.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// A delivery was settled; `latency` is enqueue → now, if known.
    pub fn settled(&self, outcome: Settled, class: Option<Class>, latency: Option<Duration>) {
        self.jobs
            .with_label_values(&[outcome.label(), class_label(class)])
            .inc();
        if let Some(l) = latency {
            self.job_latency
                .with_label_values(&[outcome.label()])
                .observe(l.as_secs_f64());
        }
    }

    /// Jobs settled with this outcome and class.
    pub fn settled_count(&self, outcome: Settled, class: Option<Class>) -> u64 {
        self.jobs
            .with_label_values(&[outcome.label(), class_label(class)])
            .get()
    }

    /// Every non-zero (outcome, class) count.
    pub fn settled_by_class(&self) -> Vec<(Settled, Option<Class>, u64)> {
        let mut out = Vec::new();
        for outcome in Settled::ALL {
            for class in std::iter::once(None).chain(Class::ALL.map(Some)) {
                let n = self.settled_count(outcome, class);
                if n > 0 {
                    out.push((outcome, class, n));
                }
            }
        }
        out
    }

    /// Jobs settled so far, by outcome, over every class.
    pub fn settled_counts(&self) -> SettledCounts {
        let count = |outcome: Settled| {
            std::iter::once(None)
                .chain(Class::ALL.map(Some))
                .map(|class| self.settled_count(outcome, class))
                .sum()
        };
        SettledCounts {
            sent: count(Settled::Sent),
            retried: count(Settled::Retried),
            dead: count(Settled::Dead),
        }
    }

    /// A copy went to the delay tier named `tier`.
    pub fn retried_to(&self, tier: &str) {
        self.retries.with_label_values(&[tier]).inc();
    }

    /// Copies sent to the delay tier named `tier`.
    pub fn retried_to_count(&self, tier: &str) -> u64 {
        self.retries.with_label_values(&[tier]).get()
    }

    /// A copy went to the dead-letter queue.
    pub fn dead_lettered(&self, reason: DeadReason) {
        self.dead_letters
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// A Graph call took `elapsed`.
    pub fn graph_call(&self, elapsed: Duration) {
        self.graph_request_duration.observe(elapsed.as_secs_f64());
    }

    /// A Graph call failed as `verdict` says.
    pub fn graph_error(&self, verdict: &Verdict) {
        self.graph_errors
            .with_label_values(&[verdict.class.as_str(), &verdict.label.to_string()])
            .inc();
        if verdict.ambiguous {
            self.ambiguous.inc();
        }
    }

    /// Failed Graph calls with this class and code label.
    pub fn graph_error_count(&self, class: Class, label: CodeLabel) -> u64 {
        self.graph_errors
            .with_label_values(&[class.as_str(), &label.to_string()])
            .get()
    }

    /// A gate closed a scope (the gauge counts held scopes).
    pub fn gate_opened(&self, scope: ScopeKind, class: Class) {
        self.gates_open
            .with_label_values(&[scope.as_str(), class.as_str()])
            .inc();
    }

    /// A held scope was released.
    pub fn gate_closed(&self, scope: ScopeKind, class: Class) {
        self.gates_open
            .with_label_values(&[scope.as_str(), class.as_str()])
            .dec();
    }

    /// Scopes of this kind held back by this class now.
    pub fn gates_open(&self, scope: ScopeKind, class: Class) -> i64 {
        self.gates_open
            .with_label_values(&[scope.as_str(), class.as_str()])
            .get()
    }

    /// A delivery arrived with the `redelivered` flag.
    pub fn redelivered(&self) {
        self.redelivered.inc();
    }

    /// Deliveries that arrived with the `redelivered` flag.
    pub fn redelivered_count(&self) -> u64 {
        self.redelivered.get()
    }

    /// The worker reconnected to RabbitMQ.
    pub fn reconnected(&self) {
        self.amqp_reconnects.inc();
    }

    /// Reconnections to RabbitMQ.
    pub fn reconnects(&self) -> u64 {
        self.amqp_reconnects.get()
    }

    /// Jobs being processed now.
    pub fn inflight(&self) -> i64 {
        self.inflight.get()
    }

    /// Counts a job as in flight until the guard drops, however its task
    /// ends.
    pub fn inflight_guard(self: &Arc<Self>) -> InflightGuard {
        self.inflight.inc();
        InflightGuard(self.inflight.clone())
    }

    /// Records the usage headers of an answer, as ratios (Meta reports
    /// percent of the allowance).
    pub fn record_usage(&self, hint: &UsageHint) {
        let sources = [("app", &hint.app), ("buc", &hint.business)];
        for (gauges, (prefix, usage)) in self.usage_gauges.iter().zip(sources) {
            let Some(u) = usage else { continue };
            let values = [
                ("call_count", u.call_count),
                ("total_cputime", u.total_cputime),
                ("total_time", u.total_time),
            ];
            for (g, (what, percent)) in gauges.iter().zip(values) {
                g.get_or_init(|| {
                    self.graph_usage
                        .with_label_values(&[&format!("{prefix}_{what}")])
                })
                .set(percent / 100.0);
            }
        }
    }

    /// A delivery of a job the ledger knows as sent was acked without a call.
    pub fn duplicate_suppressed(&self) {
        self.duplicates_suppressed.inc();
    }

    /// Deliveries acked without a call because the job was sent already.
    pub fn duplicates_suppressed(&self) -> u64 {
        self.duplicates_suppressed.get()
    }

    /// A retry or dead copy could not be published.
    pub fn publish_failed(&self, why: PublishFailure) {
        self.publish_failures
            .with_label_values(&[why.as_str()])
            .inc();
    }

    /// Copies not published for this reason.
    pub fn publish_failures(&self, why: PublishFailure) -> u64 {
        self.publish_failures
            .with_label_values(&[why.as_str()])
            .get()
    }

    /// A job's processing panicked.
    pub fn job_panicked(&self) {
        self.job_panics.inc();
    }

    /// Jobs whose processing panicked.
    pub fn job_panics(&self) -> u64 {
        self.job_panics.get()
    }

    /// A job was settled as sent on evidence (2300035 after a maybe-sent call).
    pub fn suspected_duplicate(&self) {
        self.suspected_duplicates.inc();
    }

    /// Jobs settled as sent on evidence.
    pub fn suspected_duplicates(&self) -> u64 {
        self.suspected_duplicates.get()
    }

    /// A job waited this long for its pacing slot.
    pub fn paced(&self, wait: Duration) {
        self.pacing_wait.observe(wait.as_secs_f64());
    }

    /// A Redis round trip took `elapsed` and did (not) succeed.
    pub fn redis_call(&self, op: RedisOp, elapsed: Duration, ok: bool) {
        self.redis_duration
            .with_label_values(&[op.as_str()])
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.redis_errors.with_label_values(&[op.as_str()]).inc();
        }
    }

    /// A script that failed in a round trip that did not (one of two
    /// pipelined calls): counted under the script's op.
    pub fn redis_error(&self, op: RedisOp) {
        self.redis_errors.with_label_values(&[op.as_str()]).inc();
    }

    /// Redis round trips of this op so far (the bench counts them).
    pub fn redis_calls(&self, op: RedisOp) -> u64 {
        self.redis_duration
            .with_label_values(&[op.as_str()])
            .get_sample_count()
    }

    /// Redis answers (or not).
    pub fn set_redis_up(&self, up: bool) {
        self.redis_up.set(i64::from(up));
    }

    /// What Redis's eviction policy was last seen to be.
    pub fn set_redis_may_evict(&self, may: bool) {
        self.redis_may_evict.set(i64::from(may));
    }

    /// Pages with a token of their own, as now in use.
    pub fn set_page_tokens(&self, pages: usize) {
        self.page_tokens
            .set(i64::try_from(pages).unwrap_or(i64::MAX));
    }

    /// The webhook receiver's series, at 0 from its start (an alert on
    /// their increase sees the first one); other processes show none.
    pub fn webhook_receiver_started(&self) {
        for result in ["stored", "unavailable", "bad_signature", "too_large"] {
            self.webhook_requests.with_label_values(&[result]);
        }
    }

    /// The tracker's series, at 0 from its start.
    pub fn tracker_started(&self) {
        for field in ["echoed", "delivered", "read", "clicked", "delivery_failed"] {
            for result in ["matched", "unmatched"] {
                self.webhook_events.with_label_values(&[field, result]);
            }
        }
        self.silent_pages.set(0);
    }

    /// A webhook event the tracker took (`field` its status name).
    pub fn webhook_event(&self, field: &str, result: &str) {
        self.webhook_events
            .with_label_values(&[field, result])
            .inc();
    }

    /// The silent pages now.
    pub fn set_silent_pages(&self, n: usize) {
        self.silent_pages.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// A maybe-sent job settled: by its `echo`, or by a `call`.
    pub fn maybe_sent(&self, settled_by: &'static str) {
        self.maybe_sent.with_label_values(&[settled_by]).inc();
    }

    /// A request to the webhook receiver and how it ended (`stored`,
    /// `unavailable`, `bad_signature`, …: see the series' help).
    pub fn webhook_request(&self, result: &'static str) {
        self.webhook_requests.with_label_values(&[result]).inc();
    }

    /// A read of a changed page tokens file: `ok` and the pages now in use.
    pub fn page_tokens_reloaded(&self, ok: bool, pages: usize) {
        self.set_page_tokens(pages);
        self.page_tokens_reloads
            .with_label_values(&[if ok { "ok" } else { "failed" }])
            .inc();
    }

    /// Whether Redis was last seen able to evict keys.
    pub fn redis_may_evict(&self) -> bool {
        self.redis_may_evict.get() == 1
    }

    /// Jobs are held for Redis (`fail_mode = hold` while it is down):
    /// `/readyz` answers 503.
    pub fn set_holding(&self, holding: bool) {
        self.holding.store(holding, Ordering::SeqCst);
    }

    /// Whether Redis answers, as last seen.
    pub fn redis_up(&self) -> bool {
        self.redis_up.get() == 1
    }

    /// Replaces the gate gauge with a fleet-wide count (every worker
    /// exports the same numbers: take `max`, not `sum`, over workers).
    pub fn set_gates(&self, open: &[(ScopeKind, Class)]) {
        for class in Class::ALL {
            for scope in ScopeKind::ALL {
                if scope == ScopeKind::None {
                    continue;
                }
                let n = open.iter().filter(|g| **g == (scope, class)).count();
                let g = self
                    .gates_open
                    .with_label_values(&[scope.as_str(), class.as_str()]);
                if n > 0 || g.get() != 0 {
                    g.set(i64::try_from(n).unwrap_or(i64::MAX));
                }
            }
        }
    }

    /// The last usage ratio of one `kind` (`app_call_count`, …).
    pub fn usage(&self, kind: &str) -> f64 {
        self.graph_usage.with_label_values(&[kind]).get()
    }
}

/// Keeps `mmsend_inflight` right however a job's task ends.
pub struct InflightGuard(IntGauge);

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The router of `/metrics`, `/healthz`, `/readyz`.
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_handler))
        .with_state(metrics)
}

async fn metrics_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        m.render(),
    )
}

async fn ready_handler(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    if !m.is_ready() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not connected to RabbitMQ or not consuming\n",
        )
    } else if m.holding.load(Ordering::SeqCst) {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: Redis is unreachable and fail_mode = hold; jobs wait in a delay tier\n",
        )
    } else if !m.redis_up() {
        (
            StatusCode::OK,
            "ready; Redis is unreachable: per-process pacing and gates, no send ledger (fail_mode = local)\n",
        )
    } else {
        (StatusCode::OK, "ready\n")
    }
}

/// The metrics endpoint could not be served.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve metrics on {addr}: {source}; set MMSEND_METRICS_ADDR to a free address")]
pub struct ServeError {
    /// The address asked for.
    pub addr: String,
    /// Why binding failed.
    pub source: std::io::Error,
}

/// Binds `addr` and serves the endpoints until `shutdown` resolves. Returns
/// the bound address (use port 0 in tests).
pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<SocketAddr, ServeError> {
    let bind_error = |source| ServeError {
        addr: addr.to_string(),
        source,
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    tokio::spawn(async move {
        let result = axum::serve(listener, router(metrics))
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "metrics server stopped");
        }
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::client::{Failure, FailureKind};

    #[test]
    fn every_series_is_registered_and_named_in_series() {
        let m = Metrics::new();
        let failure = Failure {
            kind: FailureKind::Http {
                status: 502,
                body_snippet: String::new(),
            },
            hint: UsageHint::default(),
        };
        let verdict = crate::classify::CodeTable::default().classify(&failure);
        m.graph_error(&verdict);
        m.graph_call(Duration::from_millis(200));
        m.settled(Settled::Sent, None, Some(Duration::from_secs(1)));
        m.retried_to("5s");
        m.record_usage(&UsageHint {
            app: Some(crate::graph::error::Usage {
                call_count: 30.0,
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!(m.usage("app_call_count"), 0.3);
        m.redelivered();
        m.reconnected();
        m.paced(Duration::from_millis(5));
        m.redis_call(RedisOp::Before, Duration::from_micros(300), false);
        m.webhook_receiver_started();
        m.tracker_started();
        let names: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .filter(|n| !n.starts_with("process_"))
            .collect();
        let mut want: Vec<String> = SERIES.iter().map(|s| s.to_string()).collect();
        let mut got = names.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        let text = m.render();
        assert!(text.contains("mmsend_dead_letters_total{reason=\"no_token\"} 0"));
        assert!(text.contains("mmsend_graph_errors_total{class=\"transient\",code=\"http_5xx\"} 1"));
        assert!(text.contains("mmsend_gates_open{class=\"budget\",scope=\"campaign\"} 0"));
    }

    #[test]
    fn settled_counts_add_up_over_classes() {
        let m = Metrics::new();
        m.settled(Settled::Sent, None, None);
        m.settled(Settled::Sent, Some(Class::Transient), None);
        m.settled(Settled::Retried, Some(Class::Budget), None);
        m.settled(Settled::Dead, Some(Class::Region), None);
        m.settled(Settled::Dead, None, None);
        assert_eq!(
            m.settled_counts(),
            SettledCounts {
                sent: 2,
                retried: 1,
                dead: 2
            }
        );
        assert_eq!(m.settled_count(Settled::Dead, Some(Class::Region)), 1);
    }

    #[test]
    fn readiness_and_inflight_follow_their_owners() {
        let m = Metrics::new();
        assert!(!m.is_ready());
        m.set_ready(true);
        assert!(m.is_ready());
        assert_eq!(m.amqp_connected.get(), 1);
        {
            let _a = m.inflight_guard();
            let _b = m.inflight_guard();
            assert_eq!(m.inflight(), 2);
        }
        assert_eq!(m.inflight(), 0);
    }
}
