//! Where a worker's pacing, gates and send ledger live: in this process, or
//! shared by the fleet through Redis ([`crate::fleet`]), with the fallback
//! while Redis cannot be reached.
//!
//! [`Coordination::before`] is asked once before a call and answers what
//! to do ([`Ahead`]); [`Coordination::after`] is told once after the call.
//! Without Redis: local gates, local token buckets, no ledger. With Redis:
//! one round trip each way, and the local gates and buckets stand by.
//!
//! **Redis trouble is never job trouble.** A failed or slow Redis call
//! marks Redis down (`mmsend_redis_up` 0, one warning) and the worker falls
//! back as configured: `local` (per-process pacing and gates, no ledger —
//! what mmsend does without Redis) or `hold` (no send without the ledger:
//! jobs wait in a delay tier, `/readyz` answers 503). While down, at most
//! one call a second tries Redis again, so a dead Redis costs no latency;
//! the first success marks it up again. What each failure costs is in the
//! book (docs/src/fleet.md, "Fleet coordination on Redis").

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::gates::{GateTimes, Gates, Held, PROBE_TIMEOUT};
use super::pacing::{Pacer, PacingConfig};
use crate::classify::{Class, Route, ScopeKind, Verdict};
use crate::fleet::campaign::CampaignState;
use crate::fleet::track::Evidence;
use crate::fleet::{Ask, Before, FailMode, Fleet, Record, Tell};
use crate::job::Job;
use crate::metrics::Metrics;

/// Records Redis's eviction policy ([`crate::fleet::Eviction`]) in
/// `mmsend_redis_may_evict`, warning loudly when it turns to one that may
/// evict the ledger (a worker started with `allow_eviction`, or a policy
/// changed under a running fleet): a running worker does not stop for it.
pub(crate) fn eviction_seen(metrics: &Metrics, e: &crate::fleet::Eviction) {
    let may = e.may_evict();
    if may && !metrics.redis_may_evict() {
        warn!(
            policy = %e.policy,
            maxmemory = e.maxmemory,
            "Redis MAY EVICT send-ledger records and claims under memory pressure (maxmemory-policy is not noeviction): a job could be sent twice. Set maxmemory-policy to noeviction"
        );
    }
    metrics.set_redis_may_evict(may);
}

/// How often a maybe-sent job looks for its echo while it waits.
const ECHO_POLL: Duration = Duration::from_millis(250);

/// What to do before the call.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Ahead {
    /// Call the API. `maybe_sent`: an earlier call for this job may have
    /// been the send. `claimed`: the ledger holds our claim, so
    /// [`Coordination::after`] must report.
    Call { maybe_sent: bool, claimed: bool },
    /// The ledger says the job was sent: ack without a call.
    AlreadySent { tracking_id: String },
    /// The ledger holds another send under this job's id (`sent`: that one
    /// was sent): dead-lettered `invalid_job` without a call.
    Reused { sent: bool },
    /// A closed gate holds the job.
    Held(Held),
    /// The job's campaign is paused or cancelled: no call. `maybe_sent`:
    /// the ledger had a record of an earlier claim (that call may have
    /// been the send).
    Stopped {
        state: CampaignState,
        maybe_sent: bool,
    },
    /// Not now: in flight on another worker, or waiting for Redis.
    /// `behind`: another copy of this very send is in flight (another
    /// worker's live claim, or a copy in this worker): that copy settles
    /// the job, so this one waits for it whatever its age (see
    /// `Policy::route_behind`).
    Wait {
        delay: Duration,
        why: String,
        behind: bool,
    },
}

/// This worker's send-ledger claim on a job it has not called yet, from
/// the moment it is asked for. Dropped before [`Claim::calling`] (the job's
/// task ended by a lost session, a stop's grace period or a panic, while
/// its ask was in flight, while it waited for its pacing slot or before its
/// call), it is given back: queued for Redis at once, ahead of any later
/// ask of this worker. A claim left to run out would make the job's next
/// delivery "maybe sent", and a 2300035 answer to it (another campaign's
/// send to the recipient) would settle as sent a job that was never
/// called. Giving back a claim that was never written, or that another
/// worker holds, does nothing (`after.lua` deletes only this worker's).
pub(crate) struct Claim<'a> {
    coord: &'a Coordination,
    job: &'a Job,
    held: bool,
    /// The id of the call this claim is for (the job's story records it
    /// once the call is made: see [`crate::broker::headers::CALL`]).
    call: String,
}

impl Claim<'_> {
    /// The call starts: from here the claim stays until the call is told
    /// ([`Coordination::after`]) or its lease runs out (Meta may have the
    /// call). Answers the call's id, for the job's story.
    pub(crate) fn calling(mut self) -> String {
        self.held = false;
        std::mem::take(&mut self.call)
    }

    /// The answer wrote no claim (already sent, busy, gated, reused).
    fn none_written(mut self) {
        self.held = false;
    }

    /// The job was settled without a call (sent, on the echo of an earlier
    /// call): the claim was recorded over, nothing to give back.
    pub(crate) fn settled(mut self) {
        self.held = false;
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.held {
            return;
        }
        if let Some(fleet) = &self.coord.fleet {
            if tokio::runtime::Handle::try_current().is_ok() {
                // a failure leaves the claim to run out with its lease (the
                // job's next delivery is then taken for maybe sent)
                fleet.after_detached(self.job, &self.coord.release(self.job));
            }
        }
    }
}

/// How a call ended, for [`Coordination::after`].
pub(crate) enum After<'a> {
    /// Sent, with Meta's tracking id.
    Sent(&'a str),
    /// The call failed as `verdict` says and the job goes `route`.
    Failed { verdict: &'a Verdict, route: Route },
}

/// The local backend and, with Redis, the fleet's.
pub(crate) struct Coordination {
    gates: Gates,
    pacer: Pacer,
    pacing: PacingConfig,
    gate_times: GateTimes,
    gates_on: bool,
    request_timeout: Duration,
    fleet: Option<Arc<Fleet>>,
    fail_mode: FailMode,
    /// Redis answered the last time it was asked.
    up: AtomicBool,
    /// While down: when (ms since `epoch`) Redis may be tried again.
    retry_at: AtomicU64,
    epoch: Instant,
    metrics: Arc<Metrics>,
    /// The job ids this worker is processing now ([`Coordination::enter`]).
    jobs: Mutex<HashSet<String>>,
    /// With Redis: each page's first send since this worker last wrote them
    /// (ms), for the silent-page watch ([`crate::fleet::track`]).
    page_sends: Mutex<HashMap<String, i64>>,
}

/// A job id held as being processed by this worker; let go when dropped.
pub(crate) struct InFlight<'a> {
    jobs: &'a Mutex<HashSet<String>>,
    id: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.jobs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(self.id);
    }
}

impl Coordination {
    pub(crate) fn new(
        pacing: PacingConfig,
        gate_times: GateTimes,
        gates_on: bool,
        request_timeout: Duration,
        fleet: Option<Arc<Fleet>>,
        metrics: Arc<Metrics>,
    ) -> Coordination {
        let fail_mode = fleet
            .as_ref()
            .map_or(FailMode::Local, |f| f.config().fail_mode);
        metrics.set_redis_up(true);
        Coordination {
            gates: Gates::new(gate_times.clone(), gates_on, metrics.clone()),
            pacer: Pacer::new(&pacing),
            pacing,
            gate_times,
            gates_on,
            request_timeout,
            fleet,
            fail_mode,
            up: AtomicBool::new(true),
            retry_at: AtomicU64::new(0),
            epoch: Instant::now(),
            metrics,
            jobs: Mutex::new(HashSet::new()),
            page_sends: Mutex::new(HashMap::new()),
        }
    }

    /// Holds `job`'s id for as long as this worker processes it, or says to
    /// wait when it already does: two copies of one job (a producer that
    /// published it twice) in this worker's prefetch at once would both
    /// call, since the send ledger's claim is this worker's own for both
    /// (a worker takes over its own claim: after a lost connection, the
    /// redelivered copy is its to finish). The second copy waits in a tier
    /// and comes back to a ledger that knows the first as sent (without
    /// Redis it is sent again then: there is no ledger to ask).
    pub(crate) fn enter<'a>(&'a self, job: &'a Job) -> Result<InFlight<'a>, Ahead> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if !jobs.insert(job.job_id.clone()) {
            return Err(Ahead::Wait {
                delay: self.gate_times.probe_wait,
                why: "another copy of this job is being processed by this worker; looked at again later, not called".into(),
                behind: true,
            });
        }
        Ok(InFlight {
            jobs: &self.jobs,
            id: &job.job_id,
        })
    }

    /// The fleet, if Redis is configured and worth asking now.
    fn fleet(&self) -> Option<&Fleet> {
        let fleet = self.fleet.as_deref()?;
        if self.up.load(Ordering::Relaxed) {
            return Some(fleet);
        }
        // down: one caller a second tries again
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let at = self.retry_at.load(Ordering::Relaxed);
        (now >= at
            && self
                .retry_at
                .compare_exchange(at, now + 1000, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok())
        .then_some(fleet)
    }

    fn redis_ok(&self) {
        if !self.up.swap(true, Ordering::Relaxed) {
            info!("Redis answers again; pacing, gates and the send ledger are fleet-wide again");
            self.metrics.set_redis_up(true);
            self.metrics.set_holding(false);
        }
    }

    fn redis_failed(&self, error: &crate::fleet::FleetError) {
        let now = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.retry_at.store(now + 1000, Ordering::Relaxed);
        if self.up.swap(false, Ordering::Relaxed) {
            self.metrics.set_redis_up(false);
            self.metrics.set_holding(self.fail_mode == FailMode::Hold);
            match self.fail_mode {
                FailMode::Local => warn!(
                    error = %error,
                    "Redis is unreachable: falling back to per-process pacing and gates with NO send ledger until it answers (fail_mode = local)"
                ),
                FailMode::Hold => warn!(
                    error = %error,
                    "Redis is unreachable: jobs wait in a delay tier until it answers (fail_mode = hold)"
                ),
            }
        }
    }

    /// Asks before a call; waits out the job's pacing slot when it is a go.
    /// With the ledger, a go comes with the job's [`Claim`]: held until the
    /// call starts ([`Claim::calling`]), and given back if the job is
    /// dropped before (a session lost, a stop, a panic), so the job's next
    /// delivery finds no claim and is not taken for maybe sent.
    pub(crate) async fn before<'a>(
        &'a self,
        job: &'a Job,
        last_call: Option<&str>,
    ) -> (Ahead, Option<Claim<'a>>) {
        if let Some(fleet) = self.fleet() {
            let call = format!("{:016x}", rand::random::<u64>());
            let ask = Ask {
                request_timeout: self.request_timeout,
                page_rate: f64::from(self.pacing.page_rate(&job.page_id)),
                global_rate: f64::from(self.pacing.global),
                probe_wait: self.gate_times.probe_wait,
                probe_lock: PROBE_TIMEOUT,
                gates: self.gates_on,
                call: call.clone(),
                last_call: last_call.unwrap_or_default().to_string(),
            };
            // armed before the ask: a job dropped while its ask is in
            // flight gives back whatever claim Redis may have written
            let claim = Claim {
                coord: self,
                job,
                held: true,
                call,
            };
            match fleet.before(job, &ask).await {
                Ok(answer) => {
                    self.redis_ok();
                    let answer = match answer {
                        Before::AlreadySent { tracking_id } => Ahead::AlreadySent { tracking_id },
                        Before::Reused { sent } => Ahead::Reused { sent },
                        Before::Busy { worker, remaining } => Ahead::Wait {
                            delay: remaining.max(self.gate_times.probe_wait),
                            why: format!(
                                "in flight on worker {worker} (its lease runs {}s more); looked at again later, not called",
                                remaining.as_secs()
                            ),
                            behind: true,
                        },
                        Before::Gated(held) => Ahead::Held(held),
                        Before::Controlled { state, maybe_sent } => {
                            Ahead::Stopped { state, maybe_sent }
                        }
                        Before::Go {
                            maybe_sent,
                            pace_wait,
                        } => {
                            self.metrics.paced(pace_wait);
                            if !pace_wait.is_zero() {
                                tokio::time::sleep(pace_wait).await;
                            }
                            return (
                                Ahead::Call {
                                    maybe_sent,
                                    claimed: true,
                                },
                                Some(claim),
                            );
                        }
                    };
                    claim.none_written();
                    return (answer, None);
                }
                // (a round Redis ran before its deadline whose answer was
                // lost: the claim is given back when `claim` drops here)
                Err(e) => self.redis_failed(&e),
            }
        }
        if self.fleet.is_some() && self.fail_mode == FailMode::Hold {
            // look again soon: the shortest wait a gate's probe gets
            let wait = Ahead::Wait {
                delay: self.gate_times.probe_wait,
                why: "waiting for Redis (fail_mode = hold): no send without the send ledger".into(),
                behind: false,
            };
            return (wait, None);
        }
        if let Some(held) = self.gates.closed_for(job, Instant::now()) {
            return (Ahead::Held(held), None);
        }
        let started = Instant::now();
        self.pacer.until_ready(&job.page_id).await;
        self.metrics.paced(started.elapsed());
        let call = Ahead::Call {
            maybe_sent: false,
            claimed: false,
        };
        (call, None)
    }

    /// What gives back a claim whose job was not called (see [`Claim`]):
    /// the ledger deletes it if it is still this worker's. Gates and pacing
    /// are left as they are (nothing was learnt).
    fn release(&self, job: &Job) -> Tell<'static> {
        Tell {
            record: Record::Release,
            success: false,
            close: None,
            lower_page_rate: false,
            page_rate: f64::from(self.pacing.page_rate(&job.page_id)),
            gates: false,
            gate_grace: PROBE_TIMEOUT + self.gate_times.probe_wait,
        }
    }

    /// Tells how a call ended (`claimed` as [`Ahead::Call`] said).
    pub(crate) async fn after(&self, job: &Job, claimed: bool, after: After<'_>) {
        let (verdict, record) = match &after {
            After::Sent(id) => (None, Record::Sent(id)),
            After::Failed {
                verdict,
                route: Route::Sent { .. },
            } => (Some(*verdict), Record::Suspected),
            After::Failed { verdict, .. } => (Some(*verdict), Record::Release),
        };
        if claimed {
            if let Some(fleet) = self.fleet.as_deref() {
                let tell = Tell {
                    record,
                    success: verdict.is_none(),
                    close: verdict.and_then(|v| {
                        (v.scope != ScopeKind::None)
                            .then(|| (v.scope, v.class, v.label, self.gate_times.wait_for(v)))
                    }),
                    lower_page_rate: verdict
                        .is_some_and(|v| v.class == Class::Throttled && v.scope == ScopeKind::Page),
                    page_rate: f64::from(self.pacing.page_rate(&job.page_id)),
                    gates: self.gates_on,
                    gate_grace: PROBE_TIMEOUT + self.gate_times.probe_wait,
                };
                if let After::Sent(_) = after {
                    self.note_page_send(&job.page_id);
                }
                match fleet.after(job, &tell).await {
                    Ok(()) => {
                        self.redis_ok();
                        return;
                    }
                    // the ledger keeps our claim until its lease runs out:
                    // a redelivery after that is treated as maybe sent
                    Err(e) => self.redis_failed(&e),
                }
            }
        }
        match verdict {
            None => self.gates.opened(job),
            Some(v) => self.gates.observe(job, v, Instant::now()),
        }
    }

    fn note_page_send(&self, page: &str) {
        let mut pages = self.page_sends.lock().unwrap_or_else(|e| e.into_inner());
        if !pages.contains_key(page) {
            pages.insert(page.to_string(), chrono::Utc::now().timestamp_millis());
        }
    }

    /// For a job whose earlier call may have been the send: Meta's echo of
    /// that call (its tracking id), looked for until the echo window ends
    /// (`crate::fleet::track`); `None` without Redis, on a Redis failure
    /// (the job is called, 2300035 guarding), when none came, and at once
    /// when the fleet never saw an echo of any page (webhooks are not
    /// tracked: waiting would only delay the job).
    pub(crate) async fn echo_evidence(&self, job: &Job, since_ms: i64) -> Option<String> {
        let fleet = self.fleet.as_deref()?;
        let window = fleet.config().echo_window;
        let started = Instant::now();
        loop {
            match fleet
                .echo_evidence(job, since_ms, self.request_timeout + window)
                .await
            {
                Ok(Evidence::Echo(tracking)) => return Some(tracking),
                Ok(Evidence::Untracked) => return None,
                Ok(Evidence::NotYet) => {}
                Err(e) => {
                    self.redis_failed(&e);
                    return None;
                }
            }
            let left = window.saturating_sub(started.elapsed());
            if left.is_zero() {
                return None;
            }
            tokio::time::sleep(left.min(ECHO_POLL)).await;
        }
    }

    /// Every few seconds: local housekeeping, and the fleet's gate count
    /// (or a ping while Redis is down, so it is seen back without traffic).
    pub(crate) async fn housekeeping(&self) {
        self.pacer.shrink();
        self.gates.sweep(Instant::now());
        let Some(fleet) = self.fleet.as_deref() else {
            return;
        };
        let result = if self.up.load(Ordering::Relaxed) {
            async {
                self.metrics.set_gates(&fleet.gate_census().await?);
                fleet.measure_clock().await?;
                eviction_seen(&self.metrics, &fleet.eviction().await?);
                let pages =
                    std::mem::take(&mut *self.page_sends.lock().unwrap_or_else(|e| e.into_inner()));
                fleet.note_page_sends(&pages).await?;
                Ok(())
            }
            .await
        } else {
            fleet.ping().await
        };
        match result {
            Ok(()) => self.redis_ok(),
            Err(e) => self.redis_failed(&e),
        }
    }
}
