//! One delivery, start to settle: read the story → validate → pick the token
//! → check the deadline → gates, pacing and the send ledger → call Graph →
//! classify once and route → settle.
//!
//! Settling is exactly one of: ack (sent); publish a copy to a delay tier,
//! wait for the confirm, ack (retry); publish a copy to the dead-letter
//! queue, wait for the confirm, ack (dead). The copy carries the original
//! body byte for byte (unknown fields and all) and the original properties,
//! with the `x-mmsend-*` headers updated ([`Story::restamp`]).
//!
//! A copy that is not confirmed never loses the job, and never makes a hot
//! loop of API calls: the original stays unacked while the copy is
//! published again with backoff (the broker refused it: a full queue), or
//! the session ends because the publish path is broken (channel closed,
//! copy unroutable), and only then does the original go back to the queue
//! (nack with requeue; the failures are counted in
//! `mmsend_publish_failures_total`).
//!
//! A job whose processing panics is settled too, never left held: the
//! panic is caught, counted (`mmsend_job_panics_total`) and treated as a
//! failed attempt, so the job is retried through the transient tiers and,
//! after `max_attempts`, dead-lettered as `retries_exhausted` with the
//! panic as its last error. That bound does not depend on RabbitMQ's
//! delivery limit, which a requeue would rely on and which RabbitMQ 4.3+
//! no longer counts for a `basic.nack`.
//!
//! Logging: sent and retried jobs are logged at debug level (a healthy
//! worker settles thousands a second; per-job info lines would drown the
//! logs); dead letters at info, with their reason and error. The worker logs
//! an info summary of its counts every few seconds instead.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::FutureExt;
use lapin::message::Delivery;
use lapin::BasicProperties;
use tokio::sync::Semaphore;
use tracing::{debug, error, info, warn, Instrument};

use super::coordination::{After, Ahead};
use super::{Ctx, SessionCtl};
use crate::broker::headers::{LastError, Story};
use crate::broker::{PublishError, Publisher};
use crate::classify::{self, Attempt, Class, CodeLabel, DeadReason, Route};
use crate::fleet::campaign::{CampaignState, Counted};
use crate::graph::{Failure, FailureKind, Outcome, SendRequest};
use crate::job::Job;
use crate::metrics::{PublishFailure, Settled};
use crate::results::{ResultEvent, ResultOutcome};

/// The decision for one delivery: the route, the story to write on a copy,
/// and the tracking id of a send.
struct Decided {
    route: Route,
    story: Story,
    tracking_id: Option<String>,
    /// The job's campaign, for its counters (with Redis; `None` for a body
    /// that is not a job).
    campaign: Option<String>,
}

impl Decided {
    /// A route taken without a call (invalid job, no token, expired, gated).
    /// An earlier call that may have been the send stays one: no call
    /// makes it less ambiguous (the chaos run found a gate's hold dropping
    /// the flag; the job's next 2300035 then read as another campaign's
    /// send, and a job that was sent died `expired`).
    fn without_call(ctx: &Ctx, route: Route, mut story: Story, message: String) -> Decided {
        let class = match route {
            Route::Retry { class, .. } => Some(class),
            Route::Dead { class, .. } | Route::Park { class } => class,
            Route::Sent { .. } | Route::Duplicate => None,
        };
        let ambiguous = story.last_error.ambiguous;
        story.set_last_error(
            class,
            LastError {
                message: Some(message),
                ambiguous,
                ..Default::default()
            },
        );
        Decided::new(ctx, route, story, None)
    }

    fn new(ctx: &Ctx, route: Route, mut story: Story, tracking_id: Option<String>) -> Decided {
        if let Route::Dead { reason, .. } = route {
            story.dead_reason = Some(reason.as_str().to_string());
            story.dead_at = Some(Utc::now());
            story.worker = Some(ctx.worker_id.clone());
        }
        Decided {
            route,
            story,
            tracking_id,
            campaign: None,
        }
    }
}

/// The longest a delivery is held while its copy is refused by the broker
/// (a full queue), trying again with backoff, before it goes back to the
/// queue.
const HOLD_REFUSED_COPY: Duration = Duration::from_secs(60);

/// Processes and settles one delivery; whatever happens to the job's
/// processing (a panic included) the delivery is settled or given back.
pub(crate) async fn handle(
    ctx: Arc<Ctx>,
    publisher: Publisher,
    slots: Arc<Semaphore>,
    delivery: Delivery,
    ctl: Arc<SessionCtl>,
) {
    // A spare prefetched delivery waits here for one of `concurrency`
    // slots. It has not been handed to the API: when the grace period is
    // over, or the session ends, it goes back to the queue untouched.
    let slot = tokio::select! {
        biased;
        slot = slots.acquire() => slot.ok(),
        _ = ctl.grace_over.cancelled() => None,
    };
    let Some(_slot) = slot else {
        ctl.acks.requeue(delivery.delivery_tag).await;
        return;
    };
    let _inflight = ctx.metrics.inflight_guard();
    if delivery.redelivered {
        ctx.metrics.redelivered();
    }
    let story = Story::read(delivery.properties.headers().as_ref());
    let span = tracing::debug_span!(
        "job",
        job_id = tracing::field::Empty,
        campaign = tracing::field::Empty,
        page_id = tracing::field::Empty,
        attempt = story.attempt.saturating_add(1),
        class = tracing::field::Empty,
        tracking_id = tracing::field::Empty,
    );
    let tag = delivery.delivery_tag;
    let redelivered = delivery.redelivered;
    async move {
        let enqueued_at = story
            .enqueued_at
            .or_else(|| amqp_timestamp(&delivery.properties));
        let calling = Arc::new(AtomicBool::new(false));
        let decided = {
            let job = super::track_calls(
                calling.clone(),
                AssertUnwindSafe(async {
                    if let Some(hook) = &ctx.job_hook {
                        (hook.0)(&delivery.data);
                    }
                    decide(&ctx, &delivery.data, story, redelivered).await
                })
                .catch_unwind(),
            );
            tokio::pin!(job);
            tokio::select! {
                biased;
                done = &mut job => Some(done),
                _ = ctl.grace_over.cancelled() => {
                    if calling.load(Ordering::SeqCst) {
                        // a call in flight is never cut: Meta may have it
                        Some(job.await)
                    } else {
                        None
                    }
                }
            }
        };
        let decided = match decided {
            None => {
                debug!("not called before the grace period ended; back to the queue");
                ctl.acks.requeue(delivery.delivery_tag).await;
                return;
            }
            Some(Ok(decided)) => decided,
            Some(Err(panic)) => panicked(&ctx, &delivery.properties, &*panic),
        };
        let settled = AssertUnwindSafe(settle_delivery(
            &ctx,
            &publisher,
            delivery,
            decided,
            enqueued_at,
            &ctl,
        ))
        .catch_unwind()
        .await;
        if let Err(panic) = settled {
            // only a bug can get here; the delivery is not left held
            error!(
                panic = panic_text(&*panic),
                "settling a job panicked; it goes back to the queue"
            );
            ctx.metrics.job_panicked();
            ctl.acks.requeue(tag).await;
        }
    }
    .instrument(span)
    .await
}

/// The settlement of a job whose processing panicked: a failed attempt,
/// retried through the transient tiers up to `max_attempts`, then dead as
/// `retries_exhausted`, with the panic message as the last error.
fn panicked(
    ctx: &Ctx,
    properties: &BasicProperties,
    panic: &(dyn std::any::Any + Send),
) -> Decided {
    let message = panic_text(panic);
    ctx.metrics.job_panicked();
    let now = Utc::now();
    let mut story = Story::read(properties.headers().as_ref());
    story.attempt = story.attempt.saturating_add(1);
    let first_attempt_at = *story.first_attempt_at.get_or_insert(now);
    error!(
        panic = %message,
        attempt = story.attempt,
        "processing the job panicked; it counts as a failed attempt"
    );
    let attempt = Attempt {
        number: story.attempt,
        first_attempt_at,
        now,
        not_after: None,
        maybe_sent: false,
    };
    // the transient schedule, up to max_attempts
    let route = ctx.policy.route_attempt(
        Class::Transient,
        ctx.policy.transient_delay(story.attempt),
        &attempt,
    );
    Decided::without_call(
        ctx,
        route,
        story,
        format!("the worker panicked processing this job (a bug in mmsend; please report it): {message}"),
    )
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_string())
}

/// How far back a maybe-sent job's earlier call can be when its story does
/// not say (no first attempt, replay or enqueue time): an echo older than
/// this is not taken for its send.
const ECHO_LOOKBACK: chrono::Duration = chrono::Duration::hours(1);

/// Meta's clock against this host's, for the echo's timestamp, ms.
const ECHO_CLOCK_SKEW_MS: i64 = 60_000;

/// Everything up to the decision; no broker I/O. One straight line: parse,
/// token, deadline, gates, pace, call, classify and route (once).
async fn decide(ctx: &Ctx, body: &[u8], story: Story, redelivered: bool) -> Decided {
    let job = match Job::parse(body) {
        Ok(job) => job,
        Err(e) => {
            let dead = Route::Dead {
                class: None,
                reason: DeadReason::InvalidJob,
            };
            return Decided::without_call(ctx, dead, story, e.to_string());
        }
    };
    let mut decided = decide_job(ctx, &job, story, redelivered).await;
    if ctx.tally.is_some() {
        decided.campaign = Some(job.campaign_name().to_string());
    }
    decided
}

/// [`decide`] for a job that parsed.
async fn decide_job(ctx: &Ctx, job: &Job, mut story: Story, redelivered: bool) -> Decided {
    let now = Utc::now();
    let span = tracing::Span::current();
    let dead = |reason| Route::Dead {
        class: None,
        reason,
    };
    span.record("job_id", job.job_id.as_str());
    span.record("page_id", job.page_id.as_str());
    if let Some(c) = &job.campaign {
        span.record("campaign", c.as_str());
    }
    let Some(token) = ctx.tokens.load().token_for(&job.page_id).cloned() else {
        let message = format!(
            "no access token for page {}; set MMSEND_ACCESS_TOKEN or add the page to MMSEND_PAGE_TOKENS_FILE, then replay",
            job.page_id
        );
        return Decided::without_call(ctx, dead(DeadReason::NoToken), story, message);
    };
    if let Err(e) = job.check_not_after(now) {
        return Decided::without_call(
            ctx,
            dead(DeadReason::Expired),
            story,
            format!("{e}; not sent"),
        );
    }

    // The earliest an earlier call of this job can have been made (for the
    // echo a maybe-sent job looks for), before `first_attempt_at` is set.
    let calls_since = story
        .first_attempt_at
        .or(story.replayed_at)
        .or(story.enqueued_at);
    // Age limits count from the first time a worker took the job, whether
    // it was tried then or held back by a gate.
    let first_attempt_at = *story.first_attempt_at.get_or_insert(now);
    let mut attempt = Attempt {
        number: story.attempt,
        first_attempt_at,
        now,
        not_after: job.not_after,
        // the last call may have been a send (set below with what the
        // send ledger or the broker says of the calls before this one)
        maybe_sent: story.last_error.ambiguous,
    };

    // Gates, pacing and the send ledger: local, or the fleet's (once per
    // job id at a time in this worker; held until the outcome is told).
    let ((ahead, claim), _in_flight) = match ctx.coord.enter(job) {
        Ok(in_flight) => (
            ctx.coord.before(job, story.call.as_deref()).await,
            Some(in_flight),
        ),
        Err(wait) => ((wait, None), None),
    };
    let claimed = match ahead {
        Ahead::Call {
            maybe_sent,
            claimed,
        } => {
            // With the send ledger, only evidence makes an earlier call "maybe
            // the send": an expired claim of a worker that died (maybe_sent)
            // or an ambiguous last answer. A fresh claim proves no call was in
            // flight, whatever the broker's redelivered flag says (a lost
            // connection redelivers every prefetched job, called or not).
            // Without the ledger the flag is all there is: a redelivered job
            // may have been in a call when its worker died.
            attempt.maybe_sent |= if claimed { maybe_sent } else { redelivered };
            claimed
        }
        Ahead::AlreadySent { tracking_id } => {
            debug!(tracking_id = %tracking_id, "already sent (send ledger); acked without a call");
            // a send settled on evidence (2300035) or a 2xx without one has
            // no tracking id: the event then has none, never an empty one
            let tracking_id = Some(tracking_id).filter(|t| !t.is_empty());
            return Decided::new(ctx, Route::Duplicate, story, tracking_id);
        }
        Ahead::Reused { sent } => {
            let other = if sent {
                "was sent"
            } else {
                "is claimed (in flight, or its worker died mid-call)"
            };
            let message = format!(
                "job_id reused for a different send: the send ledger holds another send under this job_id, which {other}; the ad account, page, message id, recipient or message differ. Give each send its own job_id (unique across campaigns), then publish this job again with it"
            );
            return Decided::without_call(ctx, dead(DeadReason::InvalidJob), story, message);
        }
        // Waits without a call (in flight elsewhere, a second copy, Redis
        // down in hold mode) spend no attempt and keep the job's story: its
        // class and last error stay those of its last call. Waiting for
        // Redis is bounded by the job's age under that class and by
        // `not_after`; a copy behind another copy in flight by `not_after`
        // only (that copy ends the job: dead here by age, a job that copy
        // then sent had two ends).
        Ahead::Wait { delay, why, behind } => {
            debug!(wait_ms = delay.as_millis() as u64, why = %why, "waiting without a call");
            let class = story.last_error.known_class();
            let known = class.unwrap_or(Class::Transient);
            let route = match behind {
                true => ctx.policy.route_behind(known, delay, &attempt),
                false => ctx.policy.route_gated(known, delay, &attempt),
            };
            if class.is_none() {
                story.last_error.message = Some(why);
            }
            return Decided::new(ctx, route, story, None);
        }
        // A stopped campaign: parked (paused) or dead (cancelled), without
        // a call, keeping the job's class and its "maybe sent" flag
        Ahead::Stopped { state, maybe_sent } => {
            let campaign = job.campaign_name();
            let class = story.last_error.known_class();
            story.last_error.ambiguous |= maybe_sent;
            let (route, message) = match state {
                CampaignState::Cancelled => (
                    Route::Dead {
                        class,
                        reason: DeadReason::Cancelled,
                    },
                    format!(
                        "campaign {campaign} is cancelled; not sent. To send it after all: mmsend campaign resume {campaign}, then mmsend dlq replay --reason cancelled --campaign {campaign}"
                    ),
                ),
                _ => (
                    Route::Park { class },
                    format!(
                        "held without a call: campaign {campaign} is paused; mmsend campaign resume {campaign} sends it"
                    ),
                ),
            };
            debug!(campaign, state = %state, "campaign stopped; not calling the API");
            return Decided::without_call(ctx, route, story, message);
        }
        // A closed gate sends the job straight back to wait, without a call.
        Ahead::Held(held) => {
            debug!(scope = %held.scope, wait_s = held.wait.as_secs(), "scope gated; not calling the API");
            let route = ctx.policy.route_gated(held.class, held.wait, &attempt);
            let message = format!(
                "held back without a call: {} is gated after a {} answer ({})",
                held.scope, held.class, held.label
            );
            let mut decided = Decided::without_call(ctx, route, story, message);
            // the dead letter of a held job groups under the code that held it
            if let CodeLabel::Code(code) = held.label {
                decided.story.last_error.code = Some(code);
            }
            return decided;
        }
    };

    // A maybe-sent job first looks for Meta's echo of its earlier call (the
    // delivery tracker's evidence): found, that call was the send; settled
    // as sent with its tracking id, no second call.
    if attempt.maybe_sent && claimed {
        let since = calls_since
            .unwrap_or(now - ECHO_LOOKBACK)
            .timestamp_millis()
            .saturating_sub(ECHO_CLOCK_SKEW_MS);
        if let Some(tracking_id) = ctx.coord.echo_evidence(job, since).await {
            ctx.metrics.maybe_sent("echo");
            info!(tracking_id = %tracking_id, "an earlier call may have been the send and Meta's echo says it was; settled as sent, no second call");
            ctx.coord
                .after(job, claimed, After::Sent(&tracking_id))
                .await;
            if let Some(claim) = claim {
                claim.settled();
            }
            span.record("tracking_id", tracking_id.as_str());
            return Decided::new(
                ctx,
                Route::Sent { suspected: false },
                story,
                Some(tracking_id),
            );
        }
        ctx.metrics.maybe_sent("call");
    }

    story.attempt = story.attempt.saturating_add(1);
    span.record("attempt", story.attempt);
    if let Some(claim) = claim {
        story.call = Some(claim.calling());
    }
    let started = Instant::now();
    let outcome = ctx.client.send(&token, &SendRequest::from(job)).await;
    ctx.metrics.graph_call(started.elapsed());
    attempt.number = story.attempt;
    attempt.now = Utc::now();

    match outcome {
        Outcome::Sent { tracking_id, hint } => {
            ctx.metrics.record_usage(&hint);
            ctx.coord
                .after(job, claimed, After::Sent(&tracking_id))
                .await;
            span.record("tracking_id", tracking_id.as_str());
            let route = Route::Sent { suspected: false };
            Decided::new(ctx, route, story, Some(tracking_id))
        }
        Outcome::Failed(failure) => {
            ctx.metrics.record_usage(&failure.hint);
            let classify::Decision { verdict, route } =
                classify::decide(&failure, &ctx.table, &ctx.policy, &attempt);
            span.record("class", verdict.class.as_str());
            ctx.metrics.graph_error(&verdict);
            ctx.coord
                .after(
                    job,
                    claimed,
                    After::Failed {
                        verdict: &verdict,
                        route,
                    },
                )
                .await;
            story.set_last_error(Some(verdict.class), last_error(&failure));
            if let Route::Sent { suspected: true } = route {
                ctx.metrics.suspected_duplicate();
                info!(
                    code = %verdict.label,
                    "an earlier call may have been the send and Meta says it was; settled as sent, not retried"
                );
            }
            Decided::new(ctx, route, story, None)
        }
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

/// Publishes the copy (if any), then acks; nacks with requeue if the copy
/// was not confirmed.
async fn settle_delivery(
    ctx: &Ctx,
    publisher: &Publisher,
    delivery: Delivery,
    decided: Decided,
    enqueued_at: Option<DateTime<Utc>>,
    ctl: &SessionCtl,
) {
    let Decided {
        route,
        story,
        tracking_id,
        campaign,
    } = decided;
    let count = |what| {
        if let (Some(tally), Some(c)) = (&ctx.tally, &campaign) {
            tally.count(c, what);
        }
    };
    let (outcome, class) = match route {
        Route::Sent { suspected } => {
            debug!(
                tracking_id = tracking_id.as_deref().unwrap_or(""),
                suspected, "sent"
            );
            // the class of the last failure before the send, if any
            let class = story.last_error.known_class();
            count(Counted::Sent);
            (Settled::Sent, class)
        }
        Route::Duplicate => {
            // sent before: ack, and count it apart from the sends; its event
            // names the send it duplicates
            ctx.metrics.duplicate_suppressed();
            count(Counted::Suppressed);
            if ctx.topology.results.is_some() {
                publish_result(ctx, publisher, &delivery, &story, route, tracking_id).await;
            }
            ctl.acks.ack(delivery.delivery_tag);
            return;
        }
        Route::Retry { class, delay } => {
            let tier = ctx.topology.tier_for(delay);
            debug!(class = %class, wanted_s = delay.as_secs(), tier = %tier.name, "retry later");
            let queue = ctx.topology.tier_queue(tier);
            if !copy(ctx, publisher, &delivery, &queue, &story, ctl).await {
                return;
            }
            ctx.metrics.retried_to(&tier.name);
            count(Counted::Retried);
            (Settled::Retried, Some(class))
        }
        Route::Park { class } => {
            let queue = ctx.topology.held_queue();
            if !copy(ctx, publisher, &delivery, &queue, &story, ctl).await {
                return;
            }
            count(Counted::Held);
            (Settled::Held, class)
        }
        Route::Dead { class, reason } => {
            info!(
                reason = %reason,
                class = class.map_or("none", Class::as_str),
                error = story.last_error.message.as_deref().unwrap_or(""),
                "dead-lettered"
            );
            let queue = ctx.topology.dead_queue();
            if !copy(ctx, publisher, &delivery, &queue, &story, ctl).await {
                return;
            }
            ctx.metrics.dead_lettered(reason);
            count(Counted::Dead(class, reason));
            (Settled::Dead, class)
        }
    };
    if ctx.topology.results.is_some() && !matches!(outcome, Settled::Retried | Settled::Held) {
        publish_result(ctx, publisher, &delivery, &story, route, tracking_id).await;
    }
    ctl.acks.ack(delivery.delivery_tag);
    let latency = enqueued_at.and_then(|t| (Utc::now() - t).to_std().ok());
    ctx.metrics.settled(outcome, class, latency);
}

/// Publishes a settled job's event on the results stream, confirmed, before
/// its delivery is acked; a failure is counted and logged, never holds the
/// job (see `crate::results`).
async fn publish_result(
    ctx: &Ctx,
    publisher: &Publisher,
    delivery: &Delivery,
    story: &Story,
    route: Route,
    tracking_id: Option<String>,
) {
    // read as the DLQ tools read it (a field named twice names nothing)
    let labels = crate::job::JobLabels::read(&delivery.data);
    let e = &story.last_error;
    let event = ResultEvent {
        v: 1,
        job_id: labels
            .job_id
            .or_else(|| {
                delivery
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|m| m.to_string())
            })
            .unwrap_or_default(),
        campaign: labels.campaign,
        outcome: match route {
            Route::Dead { .. } => ResultOutcome::Dead,
            Route::Duplicate => ResultOutcome::Duplicate,
            _ => ResultOutcome::Sent,
        },
        class: e.class.clone(),
        reason: story.dead_reason.clone(),
        code: e.subcode.or(e.code),
        tracking_id,
        suspected: matches!(route, Route::Sent { suspected: true }),
        attempts: story.attempt,
        status: None,
        at: Utc::now(),
    };
    if let Err(e) = publisher
        .publish_result(&ctx.topology.results_stream(), &event)
        .await
    {
        ctx.metrics.publish_failed(match e {
            PublishError::Returned { .. } => PublishFailure::Returned,
            PublishError::Nacked { .. } => PublishFailure::Nacked,
            PublishError::Amqp { .. } => PublishFailure::Error,
        });
        warn!(error = %e, "could not publish the job's result event; the job is settled anyway");
    }
}

/// Publishes the delivery's copy with `story` to `queue`; when it cannot
/// be published, gives the delivery back to the queue and answers `false`.
async fn copy(
    ctx: &Ctx,
    publisher: &Publisher,
    delivery: &Delivery,
    queue: &str,
    story: &Story,
    ctl: &SessionCtl,
) -> bool {
    let props = story.restamp(&delivery.properties);
    if publish_copy(ctx, publisher, queue, &delivery.data, props, ctl).await {
        return true;
    }
    ctl.acks.requeue(delivery.delivery_tag).await;
    false
}

/// Publishes a copy and waits for its confirm. `false` when it could not
/// be published, after a backoff: a copy the broker refused (`Nacked`, a
/// full queue) is tried again for up to [`HOLD_REFUSED_COPY`] while the
/// delivery stays held; an unroutable copy (`Returned`: a tier or the DLQ
/// is missing) or a dead channel ends the session, whose reconnect
/// redeclares the topology after the reconnect backoff.
async fn publish_copy(
    ctx: &Ctx,
    publisher: &Publisher,
    queue: &str,
    body: &[u8],
    props: BasicProperties,
    ctl: &SessionCtl,
) -> bool {
    let started = Instant::now();
    let mut wait = Duration::from_secs(1);
    loop {
        let e = match publisher.publish(queue, body, props.clone()).await {
            Ok(()) => return true,
            Err(e) => e,
        };
        let channel_ok = publisher.channel().status().connected();
        let reason = match &e {
            PublishError::Returned { .. } => PublishFailure::Returned,
            PublishError::Nacked { .. } => PublishFailure::Nacked,
            PublishError::Amqp { .. } if channel_ok => PublishFailure::Error,
            PublishError::Amqp { .. } => PublishFailure::ChannelClosed,
        };
        ctx.metrics.publish_failed(reason);
        match reason {
            PublishFailure::Returned | PublishFailure::ChannelClosed => {
                warn!(error = %e, queue, "could not publish the copy; ending the session to reconnect and redeclare");
                ctl.publisher_lost(e.to_string());
                return false;
            }
            _ if ctl.stopping.is_cancelled() || started.elapsed() + wait > HOLD_REFUSED_COPY => {
                warn!(error = %e, queue, held_s = started.elapsed().as_secs(), "could not publish the copy; the job goes back to the queue");
                return false;
            }
            _ => {
                warn!(error = %e, queue, retry_in_s = wait.as_secs(), "could not publish the copy; holding the job and trying again");
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = ctl.stopping.cancelled() => return false,
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
        }
    }
}

fn amqp_timestamp(props: &BasicProperties) -> Option<DateTime<Utc>> {
    let ts = (*props.timestamp())?;
    DateTime::from_timestamp(i64::try_from(ts).ok()?, 0)
}
