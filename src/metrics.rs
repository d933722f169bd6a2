//! Prometheus metrics (one registry, every name in this file) and the HTTP
//! endpoints a worker serves: `/metrics`, `/healthz`, `/readyz`.
//!
//! `/healthz` answers 200 while the process runs. `/readyz` answers 200 only
//! while the worker is connected to RabbitMQ and consuming, 503 otherwise, so
//! Kubernetes stops counting a pod that lost its broker. Queue depths are not
//! exported here: RabbitMQ's own `rabbitmq_prometheus` plugin has them.
//!
//! Label sets are bounded: `class` is one of the twelve classes (or `none`),
//! `code` is a code of the classification table or `other`/`http_*`/
//! `timeout`/`transport`, `tier` and `reason` come from fixed lists.

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

use crate::classify::DeadReason;

/// Every series mmsend exports (histograms without their `_bucket`/`_sum`/
/// `_count` suffixes). The dashboard and alert rules are checked against
/// this list by `tests/deploy.rs`.
pub const SERIES: &[&str] = &[
    "mmsend_jobs_total",
    "mmsend_graph_errors_total",
    "mmsend_graph_request_duration_seconds",
    "mmsend_job_latency_seconds",
    "mmsend_inflight",
    "mmsend_retries_total",
    "mmsend_dead_letters_total",
    "mmsend_gates_open",
    "mmsend_amqp_connected",
    "mmsend_amqp_reconnects_total",
    "mmsend_graph_usage_percent",
    "mmsend_redelivered_total",
    "mmsend_ambiguous_total",
    "mmsend_build_info",
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

/// The scopes a gate can close (see `worker::gates`).
pub const GATE_SCOPES: [&str; 5] = [
    "campaign_budget",
    "ad_account_budget",
    "app_throttle",
    "page_auth",
    "campaign_populating",
];

/// All of a process's metrics.
pub struct Metrics {
    registry: Registry,
    pub jobs: IntCounterVec,
    pub graph_errors: IntCounterVec,
    pub graph_request_duration: Histogram,
    pub job_latency: HistogramVec,
    pub inflight: IntGauge,
    pub retries: IntCounterVec,
    pub dead_letters: IntCounterVec,
    pub gates_open: IntGaugeVec,
    pub amqp_connected: IntGauge,
    pub amqp_reconnects: IntCounter,
    pub graph_usage: prometheus::GaugeVec,
    pub redelivered: IntCounter,
    pub ambiguous: IntCounter,
    ready: AtomicBool,
}

impl Metrics {
    /// A fresh registry (tests run several workers in one process).
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        let name = |n: &str| n.trim_start_matches("mmsend_").to_string();
        let opts = |n: &str, help: &str| Opts::new(name(n), help).namespace("mmsend");
        let counter_vec = |n: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(opts(n, help), labels).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |n: &str, help: &str| {
            let g = IntGauge::with_opts(opts(n, help)).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let counter = |n: &str, help: &str| {
            let c = IntCounter::with_opts(opts(n, help)).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let jobs = counter_vec(
            "mmsend_jobs_total",
            "Jobs settled, by outcome (sent, retried, dead) and class of the last failure (none when sent first time).",
            &["outcome", "class"],
        );
        let graph_errors = counter_vec(
            "mmsend_graph_errors_total",
            "Failed Graph API calls by class and code (table codes, other, http_*, timeout, transport).",
            &["class", "code"],
        );
        let graph_request_duration = Histogram::with_opts(
            HistogramOpts::new(
                name("mmsend_graph_request_duration_seconds"),
                "Graph API call duration, seconds.",
            )
            .namespace("mmsend")
            .buckets(REQUEST_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        registry
            .register(Box::new(graph_request_duration.clone()))
            .expect("unique metric");
        let job_latency = HistogramVec::new(
            HistogramOpts::new(
                name("mmsend_job_latency_seconds"),
                "Enqueue (x-mmsend-enqueued-at) to settled, seconds, by outcome.",
            )
            .namespace("mmsend")
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["outcome"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(job_latency.clone()))
            .expect("unique metric");
        let inflight = gauge("mmsend_inflight", "Jobs being processed now.");
        let retries = counter_vec(
            "mmsend_retries_total",
            "Jobs sent to a delay tier, by tier.",
            &["tier"],
        );
        let dead_letters = counter_vec(
            "mmsend_dead_letters_total",
            "Jobs sent to the dead-letter queue, by reason.",
            &["reason"],
        );
        let gates_open = IntGaugeVec::new(
            opts(
                "mmsend_gates_open",
                "Scopes currently gated (jobs routed to delay without an API call), by scope kind.",
            ),
            &["scope"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(gates_open.clone()))
            .expect("unique metric");
        let amqp_connected = gauge(
            "mmsend_amqp_connected",
            "1 while connected to RabbitMQ and consuming.",
        );
        let amqp_reconnects = counter(
            "mmsend_amqp_reconnects_total",
            "Reconnections to RabbitMQ after a lost connection.",
        );
        let graph_usage = prometheus::GaugeVec::new(
            opts(
                "mmsend_graph_usage_percent",
                "Last usage reported by X-App-Usage / X-Business-Use-Case-Usage, percent.",
            ),
            &["kind"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(graph_usage.clone()))
            .expect("unique metric");
        let redelivered = counter(
            "mmsend_redelivered_total",
            "Deliveries with the redelivered flag (a previous consumer did not settle them).",
        );
        let ambiguous = counter(
            "mmsend_ambiguous_total",
            "Graph calls that failed after the request may have been processed (possible duplicate on retry).",
        );
        let build_info = IntGaugeVec::new(
            opts(
                "mmsend_build_info",
                "Always 1; the version label tells the build.",
            ),
            &["version"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(build_info.clone()))
            .expect("unique metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);

        // Series that alerts use exist from the start, at zero.
        jobs.with_label_values(&["sent", "none"]);
        for reason in DeadReason::ALL {
            if reason != DeadReason::DeliveryLimit {
                dead_letters.with_label_values(&[reason.as_str()]);
            }
        }
        for scope in GATE_SCOPES {
            gates_open.with_label_values(&[scope]);
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
            redelivered,
            ambiguous,
            ready: AtomicBool::new(false),
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

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    /// Reads a counter of `jobs_total` (tests, demo summary).
    pub fn jobs_count(&self, outcome: &str, class: &str) -> u64 {
        self.jobs.with_label_values(&[outcome, class]).get()
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
    if m.is_ready() {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: not connected to RabbitMQ or not consuming\n",
        )
    }
}

/// Binds `addr` and serves the endpoints until `shutdown` resolves. Returns
/// the bound address (use port 0 in tests).
pub async fn serve(
    addr: &str,
    metrics: Arc<Metrics>,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot serve metrics on {addr}: {e}; set MMSEND_METRICS_ADDR to a free address"
        )
    })?;
    let bound = listener.local_addr()?;
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

    #[test]
    fn every_series_is_registered_and_named_in_series() {
        let m = Metrics::new();
        m.graph_errors.with_label_values(&["auth", "190"]).inc();
        m.graph_request_duration.observe(0.2);
        m.job_latency.with_label_values(&["sent"]).observe(1.0);
        m.retries.with_label_values(&["5s"]).inc();
        m.graph_usage
            .with_label_values(&["app_call_count"])
            .set(3.0);
        m.redelivered.inc();
        m.ambiguous.inc();
        m.amqp_reconnects.inc();
        let names: Vec<String> = m
            .registry
            .gather()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let mut want: Vec<String> = SERIES.iter().map(|s| s.to_string()).collect();
        let mut got = names.clone();
        want.sort();
        got.sort();
        assert_eq!(got, want);
        assert!(m
            .render()
            .contains("mmsend_dead_letters_total{reason=\"no_token\"} 0"));
    }

    #[test]
    fn readiness_follows_the_flag() {
        let m = Metrics::new();
        assert!(!m.is_ready());
        m.set_ready(true);
        assert!(m.is_ready());
        assert_eq!(m.amqp_connected.get(), 1);
    }
}
