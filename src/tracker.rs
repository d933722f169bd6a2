//! The delivery tracker (DESIGN §14): consumes the webhook payloads `mmsend
//! webhooks` stored in `<prefix>.webhooks`, joins each event to its job in
//! Redis ([`crate::fleet::track`]) and counts each campaign's funnel.
//!
//! It runs inside `mmsend worker` whenever Redis is configured (`--no-tracker`
//! turns it off there) and alone as `mmsend tracker`; any number of them
//! share the queue (each event's join is atomic and idempotent).
//!
//! - A payload is acked only after every event in it is joined, counted, or
//!   put aside (confirmed) in `<prefix>.webhooks.wait`: a tracker stopped or
//!   killed while events arrive loses none; a payload taken again after a
//!   crash changes no count (a job's delivery record keeps the first time
//!   of each status).
//! - An event whose send is not known yet (Meta's webhook can come before
//!   the worker recorded the send, and the echo of a maybe-sent job before
//!   the job settled on it) waits in `<prefix>.webhooks.wait` and is tried
//!   again, up to [`TRIES`] times ([`WEBHOOK_WAIT`] apart, about a minute);
//!   on its last try it is counted `unmatched`, once.
//! - Each event joined to a job is published on the results stream (when it
//!   is on) as a `delivery` event with its `status`: at least once per job
//!   and status. The join and the publish are not one step, so an event
//!   Meta delivers again (or a payload taken again after a crash between
//!   the two) is published again; consumers dedupe on `job_id` and
//!   `status`, as for the worker's events.
//! - Redis down: the payload goes back to the queue after a pause, and is
//!   taken again when Redis answers; a payload that is not a webhook at all
//!   (a signed post that is not JSON) is counted and dropped with a warning:
//!   there is nothing in it to join.
//! - Every [`SILENT_EVERY`], the pages with sends and no echo for
//!   `silent_page_after` are counted (`mmsend_silent_pages`) and named in the
//!   log when they turn silent.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::broker::topology::WEBHOOK_WAIT;
use crate::broker::{self, Publisher, Topology};
use crate::fleet::track::Joined;
use crate::fleet::Fleet;
use crate::metrics::Metrics;
use crate::results::{ResultEvent, ResultOutcome};
use crate::webhooks::events::{self, Event};

/// How many times an event whose send is not known is tried.
pub const TRIES: u32 = 12;

/// The header that counts an event's tries.
pub const TRIES_HEADER: &str = "x-mmsend-webhook-tries";

/// How often silent pages are looked for.
pub const SILENT_EVERY: Duration = Duration::from_secs(30);

/// Payloads held unacked.
const PREFETCH: u16 = 64;

/// The pause before a payload Redis could not take is given back.
const REDIS_PAUSE: Duration = Duration::from_secs(1);

/// What the tracker needs.
#[derive(Clone)]
pub struct TrackerConfig {
    /// RabbitMQ URL(s).
    pub amqp_url: String,
    /// The topology (its prefix names the queues and the Redis keys).
    pub topology: Topology,
}

/// Why the tracker stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    /// The URL list is malformed.
    #[error(transparent)]
    Url(#[from] broker::UrlError),
}

/// Runs the tracker until `shutdown`, reconnecting to RabbitMQ as needed.
pub async fn run(
    config: TrackerConfig,
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<(), TrackerError> {
    let urls = broker::parse_urls(&config.amqp_url)?;
    metrics.tracker_started();
    let silent = tokio::spawn(watch_silent_pages(
        fleet.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    let mut wait = Duration::from_millis(200);
    while !shutdown.is_cancelled() {
        match session(&config, &urls, &fleet, &metrics, &shutdown).await {
            Ok(()) => break,
            Err(e) => {
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "delivery tracker lost RabbitMQ; reconnecting");
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
    silent.abort();
    Ok(())
}

async fn session(
    config: &TrackerConfig,
    urls: &[broker::AmqpUrl],
    fleet: &Fleet,
    metrics: &Metrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let role = format!("tracker {}", config.topology.prefix);
    let conn = broker::connect_to(urls, &role).await?;
    config.topology.declare(&conn).await?;
    let publisher = Publisher::open(&conn, config.topology.exchange()).await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(PREFETCH, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            config.topology.webhook_queue().as_str().into(),
            "mmsend-tracker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    info!(queue = %config.topology.webhook_queue(), "delivery tracker consuming");
    let result = loop {
        let delivery = tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            d = consumer.next() => d,
        };
        let Some(delivery) = delivery else {
            break Err(anyhow::anyhow!("the consumer was cancelled"));
        };
        let delivery = delivery?;
        let tries = tries_of(&delivery.properties);
        match take(config, fleet, metrics, &publisher, &delivery.data, tries).await {
            Ok(()) => {
                delivery.ack(BasicAckOptions::default()).await?;
            }
            Err(e) => {
                warn!(error = %e, "webhook payload not taken; it goes back to the queue");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(REDIS_PAUSE) => {}
                }
                delivery
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..Default::default()
                    })
                    .await?;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), conn.close(200, "bye".into())).await;
    result
}

fn tries_of(props: &BasicProperties) -> u32 {
    props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(TRIES_HEADER))
        .and_then(crate::broker::headers::as_int)
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0)
}

/// Joins one payload's events; `Err` leaves the payload for a later try
/// (nothing it counted is counted twice then).
async fn take(
    config: &TrackerConfig,
    fleet: &Fleet,
    metrics: &Metrics,
    publisher: &Publisher,
    body: &[u8],
    tries: u32,
) -> anyhow::Result<()> {
    let parsed = match events::parse(body) {
        Ok(p) => p,
        Err(e) => {
            metrics.webhook_event("none", "malformed");
            warn!(error = %e, bytes = body.len(), "a stored webhook payload is not a page webhook; dropped");
            return Ok(());
        }
    };
    for _ in 0..parsed.malformed {
        metrics.webhook_event("unknown", "malformed");
    }
    // Meta sends every field the app subscribed to; those mmsend does not
    // track are counted, not joined
    for _ in 0..parsed.other_fields {
        metrics.webhook_event("other", "skipped");
    }
    if parsed.events.is_empty() {
        return Ok(());
    }
    let last_try = tries + 1 >= TRIES;
    let tracked = fleet.track(&parsed.events, last_try).await?;
    let mut later: Vec<&Event> = Vec::new();
    for (event, t) in parsed.events.iter().zip(&tracked) {
        metrics.webhook_event(event.field.status().as_str(), t.joined.as_str());
        match t.joined {
            Joined::Defer => later.push(event),
            Joined::Matched | Joined::Duplicate if !t.job_id.is_empty() => {
                debug!(job_id = %t.job_id, campaign = %t.campaign, status = %t.status, field = event.field.as_str(), joined = t.joined.as_str(), "delivery event joined");
                if config.topology.results.is_some() {
                    publish_delivery(config, publisher, metrics, event, t).await;
                }
            }
            Joined::Unmatched => {
                debug!(
                    field = event.field.as_str(),
                    "webhook event matched no send; counted as unmatched"
                )
            }
            Joined::Matched | Joined::Duplicate => {}
        }
    }
    if !later.is_empty() {
        let body = serde_json::to_vec(&serde_json::Value::Array(
            later.iter().map(|e| e.to_flat()).collect(),
        ))?;
        let mut headers = FieldTable::default();
        headers.insert(
            TRIES_HEADER.into(),
            AMQPValue::LongLongInt(i64::from(tries + 1)),
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        publisher
            .publish(&config.topology.webhook_wait_queue(), &body, props)
            .await?;
        debug!(
            events = later.len(),
            try_no = tries + 1,
            wait_s = WEBHOOK_WAIT.as_secs(),
            "webhook events put aside until their send is known"
        );
    }
    Ok(())
}

/// A `delivery` event on the results stream; a failure is counted and
/// logged, never holds the tracker (as for the worker's events).
async fn publish_delivery(
    config: &TrackerConfig,
    publisher: &Publisher,
    metrics: &Metrics,
    event: &Event,
    t: &crate::fleet::track::Tracked,
) {
    let e = ResultEvent {
        v: 1,
        job_id: t.job_id.clone(),
        campaign: Some(t.campaign.clone()),
        outcome: ResultOutcome::Delivery,
        class: None,
        reason: None,
        code: None,
        tracking_id: t.tracking_id.clone(),
        suspected: false,
        attempts: 0,
        status: Some(event.field.status().as_str().to_string()),
        at: chrono::DateTime::from_timestamp_millis(event.timestamp)
            .unwrap_or_else(chrono::Utc::now),
    };
    if let Err(err) = publisher
        .publish_result(&config.topology.results_stream(), &e)
        .await
    {
        metrics.publish_failed(crate::metrics::PublishFailure::Error);
        warn!(error = %err, "could not publish a delivery event on the results stream");
    }
}

/// Counts the silent pages every [`SILENT_EVERY`] and names those that
/// turned silent (or spoke again) in the log.
async fn watch_silent_pages(fleet: Arc<Fleet>, metrics: Arc<Metrics>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(SILENT_EVERY);
    let mut known: BTreeSet<String> = BTreeSet::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        let now = chrono::Utc::now().timestamp_millis();
        match fleet.silent_pages(now).await {
            Ok(pages) => {
                metrics.set_silent_pages(pages.len());
                let now_silent: BTreeSet<String> =
                    pages.iter().map(|p| p.page_id.clone()).collect();
                for p in &pages {
                    if !known.contains(&p.page_id) {
                        warn!(
                            page_id = %p.page_id,
                            unechoed_for_s = (now - p.unechoed_since_ms) / 1000,
                            "page is silent: sends and no echo from Meta since; its webhook subscription was probably dropped (run `mmsend pages check`; see the runbook)"
                        );
                    }
                }
                for p in known.difference(&now_silent) {
                    info!(page_id = %p, "page is echoed again");
                }
                known = now_silent;
            }
            Err(e) => debug!(error = %e, "silent pages not looked for (Redis)"),
        }
    }
}
