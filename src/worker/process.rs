//! One delivery, start to settle: read the story → validate → pick the token
//! → check the deadline → gate and pace → call Graph → classify → settle.
//!
//! Settling is exactly one of: ack (sent); publish a copy to a delay tier,
//! wait for the confirm, ack (retry); publish a copy to the dead-letter
//! queue, wait for the confirm, ack (dead). If the copy is not confirmed the
//! original is nacked with requeue, so the job is tried again rather than
//! lost. The copy carries the original body byte for byte (unknown fields
//! and all) and the original properties, with the `x-mmsend-*` headers
//! updated.
//!
//! Logging: sent and retried jobs are logged at debug level (a healthy
//! worker settles thousands a second; per-job info lines would drown the
//! logs); dead letters at info, with their reason and error. The worker logs
//! an info summary of its counts every few seconds instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::BasicProperties;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn, Instrument};

use super::Ctx;
use crate::broker::headers::{LastError, Story};
use crate::broker::Publisher;
use crate::classify::{Attempt, Class, DeadReason, Route};
use crate::graph::{Failure, FailureKind, Outcome, SendRequest};
use crate::job::Job;

/// How a delivery is to be settled, with the story to write.
enum Settle {
    Sent {
        tracking_id: Option<String>,
    },
    Retry {
        class: Class,
        delay: Duration,
        story: Story,
    },
    Dead {
        class: Option<Class>,
        reason: DeadReason,
        story: Story,
    },
}

/// Processes and settles one delivery. Never panics on message content.
pub(crate) async fn handle(
    ctx: Arc<Ctx>,
    publisher: Publisher,
    slots: Arc<Semaphore>,
    delivery: Delivery,
) {
    // a spare prefetched delivery waits here for one of `concurrency` slots;
    // on shutdown the slots close and it goes back to the queue untouched
    let Ok(_slot) = slots.acquire().await else {
        let _ = delivery
            .acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await;
        return;
    };
    let _inflight = Inflight::new(&ctx);
    if delivery.redelivered {
        ctx.metrics.redelivered.inc();
    }
    let story = Story::read(delivery.properties.headers().as_ref());
    let span = tracing::debug_span!(
        "job",
        job_id = tracing::field::Empty,
        campaign = tracing::field::Empty,
        page_id = tracing::field::Empty,
        attempt = story.attempt + 1,
        class = tracing::field::Empty,
    );
    async move {
        let enqueued_at = story
            .enqueued_at
            .or_else(|| amqp_timestamp(&delivery.properties));
        let settle = decide(&ctx, &delivery.data, story).await;
        settle_delivery(&ctx, &publisher, delivery, settle, enqueued_at).await;
    }
    .instrument(span)
    .await
}

/// Everything up to the decision; no broker I/O.
async fn decide(ctx: &Ctx, body: &[u8], mut story: Story) -> Settle {
    let now = Utc::now();
    let span = tracing::Span::current();
    let job = match Job::parse(body) {
        Ok(job) => job,
        Err(e) => {
            story.set_last_error(
                None,
                LastError {
                    message: Some(e.to_string()),
                    ..Default::default()
                },
            );
            return dead(ctx, story, None, DeadReason::InvalidJob, now);
        }
    };
    span.record("job_id", job.job_id.as_str());
    span.record("page_id", job.page_id.as_str());
    if let Some(c) = &job.campaign {
        span.record("campaign", c.as_str());
    }
    let Some(token) = ctx.tokens.token_for(&job.page_id).cloned() else {
        story.set_last_error(
            None,
            LastError {
                message: Some(format!(
                    "no access token for page {}; set MMSEND_ACCESS_TOKEN or add the page to MMSEND_PAGE_TOKENS_FILE, then replay",
                    job.page_id
                )),
                ..Default::default()
            },
        );
        return dead(ctx, story, None, DeadReason::NoToken, now);
    };
    if let Err(e) = job.check_not_after(now) {
        story.set_last_error(
            None,
            LastError {
                message: Some(format!("{e}; not sent")),
                ..Default::default()
            },
        );
        return dead(ctx, story, None, DeadReason::Expired, now);
    }

    // Age limits count from the first time a worker took the job, whether
    // it was tried then or held back by a gate.
    story.first_attempt_at.get_or_insert(now);

    // A closed gate sends the job straight back to wait, without a call.
    if let Some((scope, class, wait)) = ctx.gates.closed_for(&job, Instant::now()) {
        debug!(scope = %scope, wait_s = wait.as_secs(), "scope gated; not calling the API");
        story.set_last_error(
            Some(class),
            LastError {
                message: Some(format!(
                    "held back without a call: {scope} is gated after a {class} answer"
                )),
                ..Default::default()
            },
        );
        let attempt = Attempt {
            number: story.attempt,
            first_attempt_at: story.first_attempt_at.unwrap_or(now),
            now,
            not_after: job.not_after,
        };
        return match ctx.policy.route_gated(class, wait, &attempt) {
            Route::Retry { class, delay } => Settle::Retry {
                class,
                delay,
                story,
            },
            Route::Dead { class, reason } => dead(ctx, story, Some(class), reason, now),
            Route::Sent => unreachable!("route_gated never answers Sent"),
        };
    }
    ctx.pacer.until_ready(&job.page_id).await;

    story.attempt += 1;
    span.record("attempt", story.attempt);
    let started = Instant::now();
    let outcome = ctx.client.send(&token, &SendRequest::from(&job)).await;
    ctx.metrics
        .graph_request_duration
        .observe(started.elapsed().as_secs_f64());
    record_usage(ctx, &outcome);

    let failure = match &outcome {
        Outcome::Sent { tracking_id, .. } => {
            ctx.gates.opened(&job);
            return Settle::Sent {
                tracking_id: tracking_id.clone(),
            };
        }
        Outcome::Failed(f) => f,
    };
    let verdict = ctx.table.classify(failure);
    span.record("class", verdict.class.as_str());
    ctx.metrics
        .graph_errors
        .with_label_values(&[verdict.class.as_str(), &verdict.code_label])
        .inc();
    if verdict.ambiguous {
        ctx.metrics.ambiguous.inc();
    }
    ctx.gates.observe(
        &job,
        verdict.class,
        verdict.code_label.parse().ok(),
        failure.hint.wait(),
        Instant::now(),
    );
    story.set_last_error(Some(verdict.class), last_error(failure));
    let attempt = Attempt {
        number: story.attempt,
        first_attempt_at: story.first_attempt_at.unwrap_or(now),
        now: Utc::now(),
        not_after: job.not_after,
    };
    match ctx.policy.route(&outcome, &ctx.table, &attempt) {
        Route::Retry { class, delay } => Settle::Retry {
            class,
            delay,
            story,
        },
        Route::Dead { class, reason } => dead(ctx, story, Some(class), reason, now),
        Route::Sent => Settle::Sent { tracking_id: None },
    }
}

fn dead(
    ctx: &Ctx,
    mut story: Story,
    class: Option<Class>,
    reason: DeadReason,
    now: DateTime<Utc>,
) -> Settle {
    story.dead_reason = Some(reason.as_str().to_string());
    story.dead_at = Some(now);
    story.worker = Some(ctx.worker_id.clone());
    Settle::Dead {
        class,
        reason,
        story,
    }
}

fn last_error(f: &Failure) -> LastError {
    let (code, subcode, fbtrace_id) = match &f.kind {
        FailureKind::Graph { error, .. } => {
            (error.code, error.error_subcode, error.fbtrace_id.clone())
        }
        _ => (None, None, None),
    };
    LastError {
        class: None,
        code,
        subcode,
        message: Some(f.message()),
        http_status: f.status(),
        fbtrace_id,
        ambiguous: f.ambiguous(),
    }
}

fn record_usage(ctx: &Ctx, outcome: &Outcome) {
    let hint = match outcome {
        Outcome::Sent { hint, .. } => hint,
        Outcome::Failed(f) => &f.hint,
    };
    let g = &ctx.metrics.graph_usage;
    if let Some(u) = &hint.app {
        g.with_label_values(&["app_call_count"]).set(u.call_count);
        g.with_label_values(&["app_total_cputime"])
            .set(u.total_cputime);
        g.with_label_values(&["app_total_time"]).set(u.total_time);
    }
    if let Some(u) = &hint.business {
        g.with_label_values(&["buc_call_count"]).set(u.call_count);
        g.with_label_values(&["buc_total_cputime"])
            .set(u.total_cputime);
        g.with_label_values(&["buc_total_time"]).set(u.total_time);
    }
}

/// Publishes the copy (if any), then acks; nacks with requeue if the copy
/// was not confirmed.
async fn settle_delivery(
    ctx: &Ctx,
    publisher: &Publisher,
    delivery: Delivery,
    settle: Settle,
    enqueued_at: Option<DateTime<Utc>>,
) {
    let m = &ctx.metrics;
    let (outcome, class_label) = match &settle {
        Settle::Sent { .. } => ("sent", "none"),
        Settle::Retry { class, .. } => ("retried", class.as_str()),
        Settle::Dead { class, .. } => ("dead", class.map_or("none", Class::as_str)),
    };
    let copy = match &settle {
        Settle::Sent { tracking_id } => {
            debug!(tracking_id = tracking_id.as_deref().unwrap_or(""), "sent");
            None
        }
        Settle::Retry {
            class,
            delay,
            story,
        } => {
            let tier = ctx.topology.tier_for(*delay);
            debug!(class = %class, wanted_s = delay.as_secs(), tier = %tier.name, "retry later");
            Some((
                ctx.topology.tier_queue(tier),
                story,
                Some(tier.name.clone()),
            ))
        }
        Settle::Dead { reason, story, .. } => {
            info!(
                reason = %reason,
                class = class_label,
                error = story.last_error.message.as_deref().unwrap_or(""),
                "dead-lettered"
            );
            Some((ctx.topology.dead_queue(), story, None))
        }
    };
    if let Some((queue, story, tier)) = copy {
        let props = story.restamp(&delivery.properties);
        if let Err(e) = publisher.publish(&queue, &delivery.data, props).await {
            warn!(error = %e, queue = %queue, "could not hand the job on; requeueing the original");
            if let Err(e) = delivery
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    multiple: false,
                })
                .await
            {
                warn!(error = %e, "nack failed; RabbitMQ will redeliver when the channel closes");
            }
            return;
        }
        match tier {
            Some(tier) => m.retries.with_label_values(&[&tier]).inc(),
            None => {
                if let Settle::Dead { reason, .. } = &settle {
                    m.dead_letters.with_label_values(&[reason.as_str()]).inc();
                }
            }
        }
    }
    match delivery.acker.ack(BasicAckOptions::default()).await {
        Ok(true) => {}
        Ok(false) => warn!("channel closed before the ack; RabbitMQ will redeliver this job"),
        Err(e) => warn!(error = %e, "ack failed; RabbitMQ will redeliver this job"),
    }
    m.jobs.with_label_values(&[outcome, class_label]).inc();
    if let Some(t) = enqueued_at {
        let secs = (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0;
        m.job_latency.with_label_values(&[outcome]).observe(secs);
    }
}

fn amqp_timestamp(props: &BasicProperties) -> Option<DateTime<Utc>> {
    let ts = (*props.timestamp())?;
    DateTime::from_timestamp(i64::try_from(ts).ok()?, 0)
}

/// Keeps `mmsend_inflight` right however the task ends.
struct Inflight(prometheus::IntGauge);

impl Inflight {
    fn new(ctx: &Ctx) -> Self {
        ctx.metrics.inflight.inc();
        Inflight(ctx.metrics.inflight.clone())
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.0.dec();
    }
}
