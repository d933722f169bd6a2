//! Scope gates: when one answer says a whole scope is blocked, stop asking.
//!
//! | failure | scope closed | for |
//! |---|---|---|
//! | `budget` 2300017 (ad-account spend limit) | the ad account | hint, else `budget_delay` |
//! | `budget` (other codes) | the campaign (`message_id`) | hint, else `budget_delay` |
//! | `throttled` | the whole app (this worker's token set) | BUC `estimated_time_to_regain_access` / `Retry-After`, else 60 s |
//! | `auth` | the page | `auth_pause` (10 min) |
//! | `not_ready` (2300012 populating) | the campaign | `not_ready_delay` |
//!
//! While a gate is closed, the worker sends the scope's jobs straight to the
//! delay tier for the remaining time, without an API call. When the time is
//! up exactly one job goes through as a probe; its success opens the gate,
//! its failure closes it again. A probe that never reports (its worker task
//! died) is replaced after `PROBE_TIMEOUT`.
//!
//! Gates are per worker process: each worker learns on its own with one
//! failed call per scope, which keeps workers stateless.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::classify::Class;
use crate::job::Job;
use crate::metrics::Metrics;

/// How long a probe may stay unanswered before another job probes.
const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// A blocked scope.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Scope {
    CampaignBudget(String),
    AdAccountBudget(String),
    AppThrottle,
    PageAuth(String),
    CampaignPopulating(String),
}

impl Scope {
    /// The `scope` label of `mmsend_gates_open`.
    pub fn kind(&self) -> &'static str {
        match self {
            Scope::CampaignBudget(_) => "campaign_budget",
            Scope::AdAccountBudget(_) => "ad_account_budget",
            Scope::AppThrottle => "app_throttle",
            Scope::PageAuth(_) => "page_auth",
            Scope::CampaignPopulating(_) => "campaign_populating",
        }
    }

    /// The scopes a job belongs to.
    fn of(job: &Job) -> [Scope; 5] {
        [
            Scope::AppThrottle,
            Scope::AdAccountBudget(job.ad_account_id.clone()),
            Scope::PageAuth(job.page_id.clone()),
            Scope::CampaignBudget(job.message_id.clone()),
            Scope::CampaignPopulating(job.message_id.clone()),
        ]
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::AppThrottle => f.write_str("app_throttle"),
            Scope::CampaignBudget(id)
            | Scope::AdAccountBudget(id)
            | Scope::PageAuth(id)
            | Scope::CampaignPopulating(id) => write!(f, "{}:{id}", self.kind()),
        }
    }
}

/// How long each kind of gate stays closed without a hint.
#[derive(Debug, Clone)]
pub struct GateTimes {
    pub budget: Duration,
    pub throttle: Duration,
    pub auth: Duration,
    pub not_ready: Duration,
    /// How long a job waits when its scope's probe is still in flight.
    pub probe_wait: Duration,
}

impl Default for GateTimes {
    fn default() -> Self {
        GateTimes {
            budget: Duration::from_secs(3600),
            throttle: Duration::from_secs(60),
            auth: Duration::from_secs(600),
            not_ready: Duration::from_secs(120),
            probe_wait: Duration::from_secs(5),
        }
    }
}

struct Gate {
    class: Class,
    until: Instant,
    probe_since: Option<Instant>,
}

/// The gates of one worker process.
pub struct Gates {
    times: GateTimes,
    enabled: bool,
    gates: Mutex<HashMap<Scope, Gate>>,
    metrics: Arc<Metrics>,
}

impl Gates {
    pub fn new(times: GateTimes, enabled: bool, metrics: Arc<Metrics>) -> Gates {
        Gates {
            times,
            enabled,
            gates: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    /// If one of the job's scopes is closed: the scope, its class and how
    /// long to wait. `None` lets the job call the API (possibly as the
    /// probe of a gate whose time is up).
    pub fn closed_for(&self, job: &Job, now: Instant) -> Option<(Scope, Class, Duration)> {
        if !self.enabled {
            return None;
        }
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        if gates.is_empty() {
            return None;
        }
        for scope in Scope::of(job) {
            let Some(gate) = gates.get_mut(&scope) else {
                continue;
            };
            if now < gate.until {
                return Some((scope, gate.class, gate.until - now));
            }
            match gate.probe_since {
                Some(since) if now.duration_since(since) < PROBE_TIMEOUT => {
                    return Some((scope, gate.class, self.times.probe_wait));
                }
                _ => gate.probe_since = Some(now),
            }
        }
        None
    }

    /// Records a failure. A probe's failure settles its gate first (the
    /// scope is closed again below only if the failure says so), then the
    /// scope this failure blocks, if any, is closed.
    pub fn observe(
        &self,
        job: &Job,
        class: Class,
        code: Option<i64>,
        hint: Option<Duration>,
        now: Instant,
    ) {
        if !self.enabled {
            return;
        }
        {
            let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
            for scope in Scope::of(job) {
                let probed = gates
                    .get(&scope)
                    .is_some_and(|g| g.probe_since.is_some() && now >= g.until);
                if probed && gates.remove(&scope).is_some() {
                    self.metrics
                        .gates_open
                        .with_label_values(&[scope.kind()])
                        .dec();
                }
            }
        }
        let (scope, wait) = match class {
            Class::Budget if code == Some(2300017) => (
                Scope::AdAccountBudget(job.ad_account_id.clone()),
                hint.unwrap_or(self.times.budget),
            ),
            Class::Budget => (
                Scope::CampaignBudget(job.message_id.clone()),
                hint.unwrap_or(self.times.budget),
            ),
            Class::Throttled => (Scope::AppThrottle, hint.unwrap_or(self.times.throttle)),
            Class::Auth => (Scope::PageAuth(job.page_id.clone()), self.times.auth),
            Class::NotReady => (
                Scope::CampaignPopulating(job.message_id.clone()),
                self.times.not_ready,
            ),
            _ => return,
        };
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        let kind = scope.kind();
        let fresh = gates
            .insert(
                scope,
                Gate {
                    class,
                    until: now + wait,
                    probe_since: None,
                },
            )
            .is_none();
        if fresh {
            self.metrics.gates_open.with_label_values(&[kind]).inc();
        }
    }

    /// Records a success: every gate of the job's scopes opens.
    pub fn opened(&self, job: &Job) {
        if !self.enabled {
            return;
        }
        let mut gates = self.gates.lock().unwrap_or_else(|p| p.into_inner());
        if gates.is_empty() {
            return;
        }
        for scope in Scope::of(job) {
            if gates.remove(&scope).is_some() {
                self.metrics
                    .gates_open
                    .with_label_values(&[scope.kind()])
                    .dec();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(page: &str, campaign: &str) -> Job {
        Job::parse(
            format!(
                r#"{{"v":1,"job_id":"j","ad_account_id":"1","page_id":"{page}","message_id":"{campaign}","subscription_token":"s"}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    #[test]
    fn a_populating_campaign_is_gated_then_probed_then_opened() {
        let m = Metrics::new();
        let g = Gates::new(GateTimes::default(), true, m.clone());
        let t0 = Instant::now();
        let a = job("1", "c1");
        g.observe(&a, Class::NotReady, Some(2300012), None, t0);
        assert_eq!(
            m.gates_open
                .with_label_values(&["campaign_populating"])
                .get(),
            1
        );
        // same campaign: gated for the rest of the window
        let (scope, class, wait) = g
            .closed_for(&job("2", "c1"), t0 + Duration::from_secs(20))
            .unwrap();
        assert_eq!(scope, Scope::CampaignPopulating("c1".into()));
        assert_eq!(class, Class::NotReady);
        assert_eq!(wait, Duration::from_secs(100));
        // another campaign: free
        assert!(g.closed_for(&job("2", "c2"), t0).is_none());
        // window over: one probe goes, the next waits for it
        let later = t0 + Duration::from_secs(121);
        assert!(g.closed_for(&a, later).is_none());
        assert_eq!(g.closed_for(&a, later).unwrap().2, Duration::from_secs(5));
        // probe succeeded
        g.opened(&a);
        assert!(g.closed_for(&a, later).is_none());
        assert_eq!(
            m.gates_open
                .with_label_values(&["campaign_populating"])
                .get(),
            0
        );
    }

    #[test]
    fn hints_scopes_and_terminal_classes() {
        let m = Metrics::new();
        let g = Gates::new(GateTimes::default(), true, m);
        let t0 = Instant::now();
        let a = job("1", "c1");
        g.observe(
            &a,
            Class::Throttled,
            Some(4),
            Some(Duration::from_secs(180)),
            t0,
        );
        // throttling closes the whole app
        let (scope, _, wait) = g.closed_for(&job("9", "c9"), t0).unwrap();
        assert_eq!(
            (scope, wait),
            (Scope::AppThrottle, Duration::from_secs(180))
        );
        g.observe(&a, Class::Budget, Some(2300017), None, t0);
        g.observe(&a, Class::Mismatch, Some(2300005), None, t0);
        assert!(g
            .gates
            .lock()
            .unwrap()
            .contains_key(&Scope::AdAccountBudget("1".into())));
        assert_eq!(g.gates.lock().unwrap().len(), 2, "mismatch gates nothing");
    }

    #[test]
    fn a_probe_failing_for_another_reason_opens_the_gate() {
        let m = Metrics::new();
        let g = Gates::new(GateTimes::default(), true, m.clone());
        let t0 = Instant::now();
        let a = job("1", "c1");
        g.observe(&a, Class::Auth, Some(190), None, t0);
        let later = t0 + Duration::from_secs(601);
        assert!(g.closed_for(&a, later).is_none(), "probe goes");
        g.observe(&a, Class::Transient, Some(2), None, later);
        assert!(g.closed_for(&job("1", "c2"), later).is_none());
        assert_eq!(m.gates_open.with_label_values(&["page_auth"]).get(), 0);
        // a probe failing for the same reason closes it again
        g.observe(&a, Class::Auth, Some(190), None, later);
        assert!(g.closed_for(&a, later).is_some());
    }

    #[test]
    fn disabled_gates_never_close() {
        let g = Gates::new(GateTimes::default(), false, Metrics::new());
        let a = job("1", "c1");
        g.observe(&a, Class::Auth, Some(190), None, Instant::now());
        assert!(g.closed_for(&a, Instant::now()).is_none());
    }
}
