//! Where a job goes: [`RetryPolicy::route`] turns a [`Verdict`] and the
//! job's history ([`Attempt`]) into a [`Route`].
//!
//! Limits, as an operator would expect them: `transient` and `throttled`
//! are bounded by `max_attempts`; `not_ready`, `budget` and
//! `recipient_capped` wait for something outside mmsend (a campaign to
//! populate, a budget to refill, a recipient's cap to lapse) and are bounded
//! by age since the first attempt instead. Every retry is also bounded by the
//! job's `not_after`: a retry that would come back after it dies `expired`
//! now rather than later.
//!
//! The wait: a table row's own delay if it has one, else the class's delay
//! (the schedule is data, as in Svix: `transient_delays` by attempt,
//! `not_ready_delay`, `budget_delay`, `recipient_capped_delay`); a hint from
//! the answer (`Retry-After`, BUC) replaces it for `throttled` and lengthens
//! it for every other class. All time arithmetic is checked: a wait too long
//! to represent is "later than any deadline", never a panic.

use std::time::Duration;

use chrono::{DateTime, FixedOffset, TimeDelta, Utc};
use serde::Deserialize;

use super::table::RowDelay;
use super::{Class, DeadReason, Verdict};

/// Where a job goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Acked: the job was sent. `suspected` when it is settled as sent on
    /// evidence rather than a success answer (2300035 after a call that may
    /// have been the send).
    Sent {
        /// Settled on evidence, not on a success answer.
        suspected: bool,
    },
    /// Acked without a call: the send ledger knows the job as sent (a
    /// redelivery or a replay of a job that was sent): a suppressed duplicate.
    Duplicate,
    /// A copy waits `delay` in a delay tier, then comes back to work.
    Retry {
        /// The class of the failure (or of the gate) behind the wait.
        class: Class,
        /// How long to wait.
        delay: Duration,
    },
    /// A copy is parked in the held queue (`<prefix>.held`) without a call:
    /// its campaign is paused. `campaign resume` brings it back to work.
    Park {
        /// The class of the job's last failure, if any.
        class: Option<Class>,
    },
    /// A copy goes to the dead-letter queue.
    Dead {
        /// The class of the last failure; `None` when no call was made
        /// (invalid job, no token, expired before a call).
        class: Option<Class>,
        /// Why.
        reason: DeadReason,
    },
}

/// What the router knows about the job's history. Built once per delivery.
#[derive(Debug, Clone, Copy)]
pub struct Attempt {
    /// Sends tried so far, this one included (1 after the first try).
    pub number: u32,
    /// When a worker first took the job.
    pub first_attempt_at: DateTime<Utc>,
    /// Now.
    pub now: DateTime<Utc>,
    /// The job's `not_after`.
    pub not_after: Option<DateTime<Utc>>,
    /// An earlier call for this job may have been the send: its last failure
    /// was ambiguous, the broker redelivered it, or a send-ledger lease
    /// expired under another worker.
    pub maybe_sent: bool,
}

/// Retry schedule and limits; the schedule is data (as in Svix), set from the
/// `[retry]` section of the TOML config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts before a transient/throttled job dies `retries_exhausted`.
    pub max_attempts: u32,
    /// Delay before attempt n+1 of a transient failure (last one repeats).
    #[serde(deserialize_with = "durations")]
    pub transient_delays: Vec<Duration>,
    /// Wait of a `not_ready` job.
    #[serde(with = "humantime_serde")]
    pub not_ready_delay: Duration,
    /// Oldest a `not_ready` job gets before it dies `expired`.
    #[serde(with = "humantime_serde")]
    pub not_ready_max_age: Duration,
    /// Wait of a `budget` job.
    #[serde(with = "humantime_serde")]
    pub budget_delay: Duration,
    /// Oldest a `budget` job gets before it dies `expired`.
    #[serde(with = "humantime_serde")]
    pub budget_max_age: Duration,
    /// Wait of a `recipient_capped` job.
    #[serde(with = "humantime_serde")]
    pub recipient_capped_delay: Duration,
    /// Oldest a `recipient_capped` job gets before it dies `expired`.
    #[serde(with = "humantime_serde")]
    pub recipient_capped_max_age: Duration,
    /// How long a job held back by a gate of a terminal class (a page whose
    /// token fails, an ad account not onboarded) keeps waiting for the fix.
    #[serde(with = "humantime_serde")]
    pub gated_max_age: Duration,
    /// Where "the next day" starts for rows that wait until then (2300054,
    /// the daily budget): the ad accounts' UTC offset, e.g. `"-08:00"`.
    #[serde(deserialize_with = "utc_offset")]
    pub daily_reset_utc_offset: FixedOffset,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        let m = |n: u64| Duration::from_secs(60 * n);
        RetryPolicy {
            max_attempts: 10,
            transient_delays: vec![
                Duration::from_secs(5),
                Duration::from_secs(30),
                m(2),
                m(10),
                m(60),
            ],
            not_ready_delay: m(2),
            not_ready_max_age: m(120),
            budget_delay: m(60),
            budget_max_age: m(24 * 60),
            recipient_capped_delay: m(6 * 60),
            recipient_capped_max_age: m(48 * 60),
            gated_max_age: m(24 * 60),
            daily_reset_utc_offset: FixedOffset::east_opt(0).expect("UTC is a valid offset"),
        }
    }
}

/// `["5s", "30s", …]` → durations.
fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    let items: Vec<humantime_serde::Serde<Duration>> = Vec::deserialize(d)?;
    Ok(items.into_iter().map(|s| s.into_inner()).collect())
}

/// `"+02:00"` → an offset.
fn utc_offset<'de, D: serde::Deserializer<'de>>(d: D) -> Result<FixedOffset, D::Error> {
    let s = String::deserialize(d)?;
    s.trim().parse::<FixedOffset>().map_err(|_| {
        serde::de::Error::custom(format!(
            "{s:?} is not a UTC offset like \"+00:00\" or \"-08:00\""
        ))
    })
}

/// A `[retry]` section that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `max_attempts = 0`.
    #[error("retry.max_attempts must be at least 1")]
    NoAttempts,
    /// An empty `transient_delays`.
    #[error("retry.transient_delays must list at least one delay")]
    NoDelays,
}

impl RetryPolicy {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.max_attempts == 0 {
            return Err(PolicyError::NoAttempts);
        }
        if self.transient_delays.is_empty() {
            return Err(PolicyError::NoDelays);
        }
        Ok(())
    }

    /// The route of a classified failure, given the job's history.
    pub fn route(&self, verdict: &Verdict, attempt: &Attempt) -> Route {
        if verdict.already_sent && attempt.maybe_sent {
            return Route::Sent { suspected: true };
        }
        let class = verdict.class;
        if !class.is_retryable() {
            return Route::Dead {
                class: Some(class),
                reason: DeadReason::Terminal,
            };
        }
        let base = match verdict.delay {
            Some(RowDelay::After(d)) => d,
            Some(RowDelay::NextDay) => self.until_next_day(attempt.now),
            None => self.class_delay(class, attempt.number),
        };
        let delay = match verdict.hint {
            Some(hint) if class == Class::Throttled && verdict.delay.is_none() => hint,
            Some(hint) => base.max(hint),
            None => base,
        };
        self.within_limits(class, delay, attempt)
    }

    /// The route of a job that waits without a call: held back by a closed
    /// gate, in flight under another worker's claim, a second copy of a job
    /// this worker is processing, or waiting for Redis (`fail_mode =
    /// "hold"`). No call was made, so no attempt is spent: the wait is
    /// bounded by `not_after` and by the job's age, never by
    /// `max_attempts`. The age limit: a class that waits for something
    /// outside mmsend keeps its own (`not_ready_max_age`, …; the job must
    /// not come back older than it); a terminal class that holds a scope
    /// (auth, onboarding) delays instead of killing jobs that were never
    /// tried, up to `gated_max_age` (the probe after the gate reopens
    /// decides); `transient` and `throttled`, bounded by attempts when
    /// called, wait while the job is younger than `gated_max_age` (a
    /// throttle gate's hint may be a day long: the job waits it out once).
    pub fn route_gated(&self, class: Class, wait: Duration, attempt: &Attempt) -> Route {
        let back_at = later(attempt.now, wait);
        let too_old = match self.max_age(class) {
            Some(max_age) => age(attempt, back_at) > max_age,
            None if class.is_retryable() => age(attempt, attempt.now) > self.gated_max_age,
            None => age(attempt, back_at) > self.gated_max_age,
        };
        if attempt.not_after.is_some_and(|deadline| back_at > deadline) || too_old {
            return Route::Dead {
                class: Some(class),
                reason: DeadReason::Expired,
            };
        }
        Route::Retry { class, delay: wait }
    }

    /// The route of a copy of a job that waits, without a call, behind
    /// another copy of the same send in flight (another worker's live
    /// claim in the send ledger, or a copy in this worker). Bounded by
    /// `not_after` only, not by age: the copy in flight settles the job —
    /// sent, and this copy is acked as a duplicate; not sent, and this copy
    /// takes its turn, under its class's limits after its call — and the
    /// wait itself ends with the holder's lease. Dead by age here, a job
    /// the other copy then sent had two ends (a letter and a send).
    pub fn route_behind(&self, class: Class, wait: Duration, attempt: &Attempt) -> Route {
        if attempt
            .not_after
            .is_some_and(|deadline| later(attempt.now, wait) > deadline)
        {
            return Route::Dead {
                class: Some(class),
                reason: DeadReason::Expired,
            };
        }
        Route::Retry { class, delay: wait }
    }

    /// The route of a failed attempt of `class` that no answer classified
    /// (the worker panicked processing the job): `delay`, within the class's
    /// limits (`max_attempts` for `transient`).
    pub fn route_attempt(&self, class: Class, delay: Duration, attempt: &Attempt) -> Route {
        self.within_limits(class, delay, attempt)
    }

    /// The class's own wait before attempt `number + 1`.
    fn class_delay(&self, class: Class, number: u32) -> Duration {
        match class {
            Class::NotReady => self.not_ready_delay,
            Class::Budget => self.budget_delay,
            Class::RecipientCapped => self.recipient_capped_delay,
            _ => self.transient_delay(number),
        }
    }

    /// The transient schedule's wait before attempt `number + 1` (the last
    /// delay repeats).
    pub fn transient_delay(&self, number: u32) -> Duration {
        let last = self.transient_delays.len().saturating_sub(1);
        let i = (number.max(1) as usize - 1).min(last);
        self.transient_delays
            .get(i)
            .copied()
            .unwrap_or(Duration::from_secs(5))
    }

    /// The age limit of a class that waits for something outside mmsend.
    fn max_age(&self, class: Class) -> Option<Duration> {
        match class {
            Class::NotReady => Some(self.not_ready_max_age),
            Class::Budget => Some(self.budget_max_age),
            Class::RecipientCapped => Some(self.recipient_capped_max_age),
            _ => None,
        }
    }

    /// `Retry { delay }` if the job may still wait that long, else `Dead`.
    fn within_limits(&self, class: Class, delay: Duration, attempt: &Attempt) -> Route {
        let back_at = later(attempt.now, delay);
        let dead = |reason| Route::Dead {
            class: Some(class),
            reason,
        };
        if attempt.not_after.is_some_and(|deadline| back_at > deadline) {
            return dead(DeadReason::Expired);
        }
        match self.max_age(class) {
            Some(max_age) if age(attempt, back_at) > max_age => dead(DeadReason::Expired),
            Some(_) => Route::Retry { class, delay },
            None if attempt.number >= self.max_attempts => dead(DeadReason::RetriesExhausted),
            None => Route::Retry { class, delay },
        }
    }

    /// From `now` to the next start of a day at `daily_reset_utc_offset`,
    /// plus a minute so the retry lands after the reset.
    fn until_next_day(&self, now: DateTime<Utc>) -> Duration {
        let local = now.with_timezone(&self.daily_reset_utc_offset);
        let next = local
            .date_naive()
            .succ_opt()
            .and_then(|d| d.and_hms_opt(0, 1, 0))
            .and_then(|t| t.and_local_timezone(self.daily_reset_utc_offset).single());
        match next {
            Some(next) => (next.with_timezone(&Utc) - now)
                .to_std()
                .unwrap_or(Duration::from_secs(24 * 3600)),
            None => Duration::from_secs(24 * 3600),
        }
    }
}

/// `now + wait`, or the end of time when that is not representable.
fn later(now: DateTime<Utc>, wait: Duration) -> DateTime<Utc> {
    TimeDelta::from_std(wait)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// How old the job will be at `at`.
fn age(attempt: &Attempt, at: DateTime<Utc>) -> Duration {
    (at - attempt.first_attempt_at).to_std().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::{CodeLabel, ScopeKind};

    fn at(number: u32, age_secs: i64) -> Attempt {
        let now: DateTime<Utc> = "2026-11-24T12:00:00Z".parse().unwrap();
        Attempt {
            number,
            first_attempt_at: now - chrono::Duration::seconds(age_secs),
            now,
            not_after: None,
            maybe_sent: false,
        }
    }

    fn v(class: Class) -> Verdict {
        Verdict {
            class,
            label: CodeLabel::Other,
            scope: ScopeKind::None,
            delay: None,
            hint: None,
            ambiguous: false,
            already_sent: false,
        }
    }

    fn hinted(class: Class, secs: u64) -> Verdict {
        Verdict {
            hint: Some(Duration::from_secs(secs)),
            ..v(class)
        }
    }

    #[test]
    fn routes_by_class_and_limits() {
        let p = RetryPolicy::default();
        let s = Duration::from_secs;
        let retry = |class, delay| Route::Retry { class, delay };
        let dead = |class, reason| Route::Dead {
            class: Some(class),
            reason,
        };
        use Class as C;
        let rows: Vec<(Verdict, Attempt, Route)> = vec![
            (v(C::Transient), at(1, 0), retry(C::Transient, s(5))),
            (v(C::Transient), at(3, 60), retry(C::Transient, s(120))),
            (v(C::Transient), at(9, 60), retry(C::Transient, s(3600))),
            (
                v(C::Transient),
                at(10, 60),
                dead(C::Transient, DeadReason::RetriesExhausted),
            ),
            // a throttling hint replaces the schedule, in both directions
            (
                hinted(C::Throttled, 180),
                at(1, 0),
                retry(C::Throttled, s(180)),
            ),
            (hinted(C::Throttled, 1), at(3, 0), retry(C::Throttled, s(1))),
            (v(C::Throttled), at(2, 0), retry(C::Throttled, s(30))),
            // other classes only wait longer for a hint
            (
                hinted(C::Transient, 60),
                at(1, 0),
                retry(C::Transient, s(60)),
            ),
            (hinted(C::Budget, 60), at(1, 0), retry(C::Budget, s(3600))),
            (hinted(C::Budget, 7200), at(1, 0), retry(C::Budget, s(7200))),
            (v(C::NotReady), at(30, 3000), retry(C::NotReady, s(120))),
            (
                v(C::NotReady),
                at(2, 7200),
                dead(C::NotReady, DeadReason::Expired),
            ),
            (v(C::Budget), at(20, 3600), retry(C::Budget, s(3600))),
            (
                v(C::Budget),
                at(2, 86400),
                dead(C::Budget, DeadReason::Expired),
            ),
            (
                v(C::RecipientCapped),
                at(1, 0),
                retry(C::RecipientCapped, s(6 * 3600)),
            ),
            (
                v(C::Mismatch),
                at(1, 0),
                dead(C::Mismatch, DeadReason::Terminal),
            ),
            (
                v(C::Region),
                at(1, 0),
                dead(C::Region, DeadReason::Terminal),
            ),
            (v(C::Auth), at(1, 0), dead(C::Auth, DeadReason::Terminal)),
            (
                v(C::Onboarding),
                at(1, 0),
                dead(C::Onboarding, DeadReason::Terminal),
            ),
        ];
        for (verdict, attempt, want) in rows {
            assert_eq!(p.route(&verdict, &attempt), want, "{verdict:?} {attempt:?}");
        }
    }

    #[test]
    fn a_row_delay_replaces_the_class_delay() {
        let p = RetryPolicy::default();
        let thirty = Verdict {
            delay: Some(RowDelay::After(Duration::from_secs(1800))),
            ..v(Class::Transient)
        };
        assert_eq!(
            p.route(&thirty, &at(1, 0)),
            Route::Retry {
                class: Class::Transient,
                delay: Duration::from_secs(1800)
            }
        );
        // "tomorrow": 12:00 UTC → 00:01 the next day
        let daily = Verdict {
            delay: Some(RowDelay::NextDay),
            ..v(Class::Budget)
        };
        assert_eq!(
            p.route(&daily, &at(1, 0)),
            Route::Retry {
                class: Class::Budget,
                delay: Duration::from_secs(12 * 3600 + 60)
            }
        );
        // at UTC-08:00 it is 04:00 there: the day starts in 20 h
        let west = RetryPolicy {
            daily_reset_utc_offset: FixedOffset::west_opt(8 * 3600).unwrap(),
            ..RetryPolicy::default()
        };
        assert_eq!(
            west.route(&daily, &at(1, 0)),
            Route::Retry {
                class: Class::Budget,
                delay: Duration::from_secs(20 * 3600 + 60)
            }
        );
    }

    #[test]
    fn an_already_sent_answer_after_a_maybe_sent_call_is_a_send() {
        let p = RetryPolicy::default();
        let capped = Verdict {
            already_sent: true,
            ..v(Class::RecipientCapped)
        };
        let mut a = at(2, 10);
        assert!(matches!(p.route(&capped, &a), Route::Retry { .. }));
        a.maybe_sent = true;
        assert_eq!(p.route(&capped, &a), Route::Sent { suspected: true });
        // other answers to a maybe-sent call route as usual
        assert!(matches!(
            p.route(&v(Class::RecipientCapped), &a),
            Route::Retry { .. }
        ));
    }

    #[test]
    fn absurd_waits_never_panic() {
        let p = RetryPolicy::default();
        let huge = Duration::from_secs(u64::MAX);
        // no deadline, no age limit: the longest tier takes it
        assert_eq!(
            p.route(&hinted(Class::Throttled, u64::MAX), &at(1, 0)),
            Route::Retry {
                class: Class::Throttled,
                delay: huge
            }
        );
        // an age limit: later than any age
        assert_eq!(
            p.route(&hinted(Class::Budget, u64::MAX), &at(1, 0)),
            Route::Dead {
                class: Some(Class::Budget),
                reason: DeadReason::Expired
            }
        );
        assert_eq!(
            p.route_gated(Class::Auth, huge, &at(1, 0)),
            Route::Dead {
                class: Some(Class::Auth),
                reason: DeadReason::Expired
            }
        );
        let mut a = at(1, 0);
        a.not_after = Some(a.now + chrono::Duration::minutes(5));
        assert!(matches!(
            p.route(&hinted(Class::Transient, u64::MAX), &a),
            Route::Dead {
                reason: DeadReason::Expired,
                ..
            }
        ));
    }

    #[test]
    fn gated_jobs_wait_even_for_terminal_scopes() {
        let p = RetryPolicy::default();
        let mut a = at(0, 0);
        let wait = Duration::from_secs(600);
        for class in [Class::Auth, Class::Onboarding] {
            assert_eq!(
                p.route_gated(class, wait, &a),
                Route::Retry { class, delay: wait }
            );
        }
        let old = Attempt {
            first_attempt_at: a.now - chrono::Duration::hours(24),
            ..a
        };
        assert_eq!(
            p.route_gated(Class::Auth, wait, &old),
            Route::Dead {
                class: Some(Class::Auth),
                reason: DeadReason::Expired
            }
        );
        a.not_after = Some(a.now + chrono::Duration::minutes(5));
        assert_eq!(
            p.route_gated(Class::Auth, wait, &a),
            Route::Dead {
                class: Some(Class::Auth),
                reason: DeadReason::Expired
            }
        );
    }

    #[test]
    fn gated_retryable_jobs_wait_the_gate_not_the_class_delay() {
        let p = RetryPolicy::default();
        // a probe is in flight: the others wait the probe wait, not the
        // 2-minute not_ready delay (nor the 1-hour budget delay)
        let wait = Duration::from_secs(5);
        for class in [Class::NotReady, Class::Budget, Class::Throttled] {
            assert_eq!(
                p.route_gated(class, wait, &at(1, 0)),
                Route::Retry { class, delay: wait },
                "{class}"
            );
        }
        // the class's limits still hold
        assert_eq!(
            p.route_gated(Class::NotReady, wait, &at(1, 3 * 3600)),
            Route::Dead {
                class: Some(Class::NotReady),
                reason: DeadReason::Expired
            }
        );
    }

    #[test]
    fn a_wait_without_a_call_spends_no_attempt() {
        let p = RetryPolicy::default();
        let wait = Duration::from_secs(5);
        // past max_attempts (a not_ready job tried 12 times), a wait of any
        // class is still a wait: bounded by age, not attempts
        for class in [Class::NotReady, Class::Transient, Class::Throttled] {
            assert_eq!(
                p.route_gated(class, wait, &at(12, 60)),
                Route::Retry { class, delay: wait },
                "{class}"
            );
        }
        // a transient job's waits end once it is older than gated_max_age
        assert_eq!(
            p.route_gated(Class::Transient, wait, &at(3, 24 * 3600 - 1)),
            Route::Retry {
                class: Class::Transient,
                delay: wait
            }
        );
        assert_eq!(
            p.route_gated(Class::Transient, wait, &at(3, 25 * 3600)),
            Route::Dead {
                class: Some(Class::Transient),
                reason: DeadReason::Expired
            }
        );
        // a failed attempt (a panic) is still bounded by max_attempts
        assert_eq!(
            p.route_attempt(Class::Transient, wait, &at(10, 60)),
            Route::Dead {
                class: Some(Class::Transient),
                reason: DeadReason::RetriesExhausted
            }
        );
    }

    #[test]
    fn a_copy_behind_a_copy_in_flight_waits_whatever_its_age() {
        let p = RetryPolicy::default();
        let wait = Duration::from_secs(5);
        // past every age limit and max_attempts: still a wait (the copy in
        // flight ends the job; this one is its duplicate or its next turn)
        for class in [Class::NotReady, Class::Transient, Class::Throttled] {
            assert_eq!(
                p.route_behind(class, wait, &at(12, 30 * 24 * 3600)),
                Route::Retry { class, delay: wait },
                "{class}"
            );
        }
        // not_after still ends it
        let mut a = at(1, 0);
        a.not_after = Some(a.now + chrono::Duration::seconds(2));
        assert_eq!(
            p.route_behind(Class::NotReady, wait, &a),
            Route::Dead {
                class: Some(Class::NotReady),
                reason: DeadReason::Expired
            }
        );
    }

    #[test]
    fn not_after_bounds_every_retry() {
        let p = RetryPolicy::default();
        let mut a = at(1, 0);
        a.not_after = Some(a.now + chrono::Duration::minutes(30));
        assert_eq!(
            p.route(&v(Class::RecipientCapped), &a),
            Route::Dead {
                class: Some(Class::RecipientCapped),
                reason: DeadReason::Expired
            }
        );
        assert_eq!(
            p.route(&v(Class::Transient), &a),
            Route::Retry {
                class: Class::Transient,
                delay: Duration::from_secs(5)
            }
        );
    }

    #[test]
    fn a_bad_offset_is_named() {
        #[derive(Deserialize)]
        struct W {
            #[allow(dead_code)]
            retry: RetryPolicy,
        }
        let e = toml::from_str::<W>("[retry]\ndaily_reset_utc_offset = \"PST\"")
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("\"PST\""), "{e}");
        let w: W = toml::from_str("[retry]\ndaily_reset_utc_offset = \"-08:00\"").unwrap();
        assert_eq!(w.retry.daily_reset_utc_offset.local_minus_utc(), -8 * 3600);
    }
}
