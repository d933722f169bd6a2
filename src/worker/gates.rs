//! Scope gates: when one answer says a whole scope is blocked, stop asking.
//!
//! The scope comes from the answer's [`Verdict`] (the classification
//! table's `scope` column): a budget answer holds its campaign or ad
//! account, a rate limit the app or the page, an auth or onboarding answer
//! the page or ad account, a populating campaign its campaign. The gate
//! stays closed for the answer's own wait (the table row's delay, or the
//! `Retry-After`/BUC hint), else the class's usual time ([`GateTimes`]).
//!
//! While a gate is closed the worker sends the scope's jobs straight to a
//! delay tier for the remaining time, without an API call. When the time is
//! up exactly one job goes through as a probe; its success opens the gate,
//! its failure for the same reason closes it again, any other answer opens
//! it. A probe that never reports (its task died) is replaced after
//! [`PROBE_TIMEOUT`].
//!
//! Gates expire by themselves: a gate whose time is up and that no job came
//! to probe within `probe_wait` (the scope's jobs are done or all in long
//! tiers) is dropped by [`Gates::sweep`], which the worker calls every few
//! seconds, so `mmsend_gates_open` returns to 0 and the map never grows with
//! scopes nobody sends to any more. All waits are bounded by
//! [`MAX_GATE_WAIT`]; the arithmetic is checked.
//!
//! These are one process's gates; with Redis the fleet shares its gates
//! instead (`fleet`), and these serve while Redis is unreachable.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::classify::{Class, CodeLabel, ScopeKind, Verdict};
use crate::job::Job;
use crate::metrics::Metrics;

/// How long a probe may stay unanswered before another job probes.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(60);

/// The longest a gate stays closed on one answer, whatever the answer asked.
pub const MAX_GATE_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);

/// A blocked scope: its kind and the id of the thing it names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Scope {
    /// Campaign, ad account, page or app.
    pub kind: ScopeKind,
    /// `message_id`, `ad_account_id` or `page_id`; empty for the app.
    pub id: String,
}

impl Scope {
    /// The job's scope of `kind`; `None` for [`ScopeKind::None`].
    pub fn of(job: &Job, kind: ScopeKind) -> Option<Scope> {
        Scope::id_of(job, kind).map(|id| Scope {
            kind,
            id: id.to_string(),
        })
    }

    /// The id of the job's scope of `kind`, without a copy.
    pub fn id_of(job: &Job, kind: ScopeKind) -> Option<&str> {
        match kind {
            ScopeKind::None => None,
            ScopeKind::App => Some(""),
            ScopeKind::Campaign => Some(&job.message_id),
            ScopeKind::AdAccount => Some(&job.ad_account_id),
            ScopeKind::Page => Some(&job.page_id),
        }
    }

    /// Every scope a job belongs to, widest first.
    fn all_of(job: &Job) -> impl Iterator<Item = Scope> + '_ {
        [
            ScopeKind::App,
            ScopeKind::AdAccount,
            ScopeKind::Page,
            ScopeKind::Campaign,
        ]
        .into_iter()
        .filter_map(move |kind| Scope::of(job, kind))
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            ScopeKind::App => f.write_str("app"),
            kind => write!(f, "{kind}:{}", self.id),
        }
    }
}

/// How long each kind of gate stays closed without a wait of its own.
#[derive(Debug, Clone)]
pub struct GateTimes {
    /// `budget` answers.
    pub budget: Duration,
    /// `throttled` answers.
    pub throttle: Duration,
    /// `auth` and `onboarding` answers: how often a held page or ad account
    /// is probed.
    pub auth: Duration,
    /// `not_ready` answers.
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

impl GateTimes {
    /// How long the scope a verdict holds stays closed: the answer's own
    /// wait (its hint, or the row's fixed delay, the longer) or the class's
    /// usual time, never more than [`MAX_GATE_WAIT`].
    pub fn wait_for(&self, verdict: &Verdict) -> Duration {
        let own = match verdict.delay {
            Some(crate::classify::RowDelay::After(d)) => Some(d),
            // "tomorrow" is the job's wait; the gate probes at the class's
            // interval so an earlier reset is noticed
            _ => None,
        };
        verdict
            .hint
            .into_iter()
            .chain(own)
            .max()
            .unwrap_or_else(|| self.for_class(verdict.class))
            .min(MAX_GATE_WAIT)
    }

    fn for_class(&self, class: Class) -> Duration {
        match class {
            Class::Budget => self.budget,
            Class::Throttled => self.throttle,
            Class::NotReady => self.not_ready,
            Class::Auth | Class::Onboarding => self.auth,
            // a scope-holding override of another class: the probe wait
            _ => self.probe_wait,
        }
    }
}

/// A job held back by a closed gate.
#[derive(Debug, Clone, PartialEq)]
pub struct Held {
    /// The closed scope.
    pub scope: Scope,
    /// The class of the answer that closed it.
    pub class: Class,
    /// The code of that answer.
    pub label: CodeLabel,
    /// How long the job should wait.
    pub wait: Duration,
}

struct Gate {
    class: Class,
    label: CodeLabel,
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
    /// No gate closed yet.
    pub fn new(times: GateTimes, enabled: bool, metrics: Arc<Metrics>) -> Gates {
        Gates {
            times,
            enabled,
            gates: Mutex::new(HashMap::new()),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Scope, Gate>> {
        self.gates.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// If one of the job's scopes is closed: which, why and how long to
    /// wait. `None` lets the job call the API (possibly as the probe of a
    /// gate whose time is up).
    pub fn closed_for(&self, job: &Job, now: Instant) -> Option<Held> {
        if !self.enabled {
            return None;
        }
        let mut gates = self.lock();
        if gates.is_empty() {
            return None;
        }
        for scope in Scope::all_of(job) {
            let Some(gate) = gates.get_mut(&scope) else {
                continue;
            };
            if now < gate.until {
                let wait = gate.until - now;
                return Some(Held {
                    scope,
                    class: gate.class,
                    label: gate.label,
                    wait,
                });
            }
            match gate.probe_since {
                Some(since) if now.saturating_duration_since(since) < PROBE_TIMEOUT => {
                    return Some(Held {
                        scope,
                        class: gate.class,
                        label: gate.label,
                        wait: self.times.probe_wait,
                    });
                }
                _ => gate.probe_since = Some(now),
            }
        }
        None
    }

    /// Records a classified failure. A probe's failure settles its gate
    /// first (the scope is closed again below only if the verdict says so),
    /// then the scope the verdict holds, if any, is closed.
    pub fn observe(&self, job: &Job, verdict: &Verdict, now: Instant) {
        if !self.enabled {
            return;
        }
        let mut gates = self.lock();
        for scope in Scope::all_of(job) {
            let probed = gates
                .get(&scope)
                .is_some_and(|g| g.probe_since.is_some() && now >= g.until);
            if probed {
                self.remove(&mut gates, &scope);
            }
        }
        let Some(scope) = Scope::of(job, verdict.scope) else {
            return;
        };
        let wait = self.times.wait_for(verdict);
        let until = now.checked_add(wait).unwrap_or(now);
        let gate = Gate {
            class: verdict.class,
            label: verdict.label,
            until,
            probe_since: None,
        };
        if let Some(old) = gates.insert(scope.clone(), gate) {
            self.metrics.gate_closed(scope.kind, old.class);
        }
        self.metrics.gate_opened(scope.kind, verdict.class);
    }

    /// Records a success: every gate of the job's scopes opens.
    pub fn opened(&self, job: &Job) {
        if !self.enabled {
            return;
        }
        let mut gates = self.lock();
        if gates.is_empty() {
            return;
        }
        for scope in Scope::all_of(job) {
            self.remove(&mut gates, &scope);
        }
    }

    /// Drops gates whose time is up and that nobody is probing (or whose
    /// probe never reported): their scope has no jobs left to hold.
    pub fn sweep(&self, now: Instant) {
        let mut gates = self.lock();
        let expired: Vec<Scope> = gates
            .iter()
            .filter(|(_, g)| {
                let idle_since = g.probe_since.map_or(g.until, |p| {
                    p.checked_add(PROBE_TIMEOUT).unwrap_or(p).max(g.until)
                });
                now.saturating_duration_since(idle_since) > self.times.probe_wait
            })
            .map(|(s, _)| s.clone())
            .collect();
        for scope in expired {
            self.remove(&mut gates, &scope);
        }
    }

    /// How many gates are closed now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no gate is closed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn remove(&self, gates: &mut HashMap<Scope, Gate>, scope: &Scope) {
        if let Some(gate) = gates.remove(scope) {
            self.metrics.gate_closed(scope.kind, gate.class);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::RowDelay;

    fn job(page: &str, campaign: &str) -> Job {
        Job::parse(
            format!(
                r#"{{"v":1,"job_id":"j","ad_account_id":"1","page_id":"{page}","message_id":"{campaign}","subscription_token":"s"}}"#
            )
            .as_bytes(),
        )
        .unwrap()
    }

    fn verdict(class: Class, scope: ScopeKind) -> Verdict {
        Verdict {
            class,
            label: CodeLabel::Other,
            scope,
            delay: None,
            hint: None,
            ambiguous: false,
            already_sent: false,
        }
    }

    fn open(m: &Metrics, kind: ScopeKind, class: Class) -> i64 {
        m.gates_open(kind, class)
    }

    #[test]
    fn a_populating_campaign_is_gated_then_probed_then_opened() {
        let m = Metrics::new();
        let g = Gates::new(GateTimes::default(), true, m.clone());
        let t0 = Instant::now();
        let a = job("1", "c1");
        g.observe(&a, &verdict(Class::NotReady, ScopeKind::Campaign), t0);
        assert_eq!(open(&m, ScopeKind::Campaign, Class::NotReady), 1);
        // same campaign: gated for the rest of the window
        let held = g
            .closed_for(&job("2", "c1"), t0 + Duration::from_secs(20))
            .unwrap();
        assert_eq!(held.scope.to_string(), "campaign:c1");
        assert_eq!(held.class, Class::NotReady);
        assert_eq!(held.wait, Duration::from_secs(100));
        // another campaign: free
        assert!(g.closed_for(&job("2", "c2"), t0).is_none());
        // window over: one probe goes, the next waits for it
        let later = t0 + Duration::from_secs(121);
        assert!(g.closed_for(&a, later).is_none());
        assert_eq!(
            g.closed_for(&a, later).unwrap().wait,
            Duration::from_secs(5)
        );
        // probe succeeded
        g.opened(&a);
        assert!(g.closed_for(&a, later).is_none());
        assert_eq!(open(&m, ScopeKind::Campaign, Class::NotReady), 0);
    }

    #[test]
    fn the_verdict_names_the_scope_and_the_wait() {
        let m = Metrics::new();
        let g = Gates::new(GateTimes::default(), true, m);
        let t0 = Instant::now();
        let a = job("1", "c1");
        // throttling with a hint closes the whole app for the hint
        let throttled = Verdict {
            hint: Some(Duration::from_secs(180)),
            ..verdict(Class::Throttled, ScopeKind::App)
        };
        g.observe(&a, &throttled, t0);
        let held = g.closed_for(&job("9", "c9"), t0).unwrap();
        assert_eq!(
            (held.scope.kind, held.wait),
            (ScopeKind::App, Duration::from_secs(180))
        );
        // a spend limit holds the ad account, an onboarding answer the page
        g.observe(&a, &verdict(Class::Budget, ScopeKind::AdAccount), t0);
        g.observe(&a, &verdict(Class::Onboarding, ScopeKind::Page), t0);
        // a row's own wait closes the scope that long
        let thirty = Verdict {
            delay: Some(RowDelay::After(Duration::from_secs(1800))),
            ..verdict(Class::Transient, ScopeKind::Campaign)
        };
        g.observe(&a, &thirty, t0);
        // no scope: nothing closes
        g.observe(&a, &verdict(Class::Mismatch, ScopeKind::None), t0);
        let gates = g.lock();
        assert_eq!(gates.len(), 4);
        let c1 = Scope::of(&a, ScopeKind::Campaign).unwrap();
        assert_eq!(gates[&c1].until - t0, Duration::from_secs(1800));
        let page = Scope::of(&a, ScopeKind::Page).unwrap();
        assert_eq!(gates[&page].class, Class::Onboarding);
        assert_eq!(gates[&page].until - t0, Duration::from_secs(600));
    }

    #[test]
    fn a_probe_failing_for_another_reason_opens_the_gate() {
        let m = Metrics::new();
        let g = Gates::new(GateTimes::default(), true, m.clone());
        let t0 = Instant::now();
        let a = job("1", "c1");
        let auth = verdict(Class::Auth, ScopeKind::Page);
        g.observe(&a, &auth, t0);
        let later = t0 + Duration::from_secs(601);
        assert!(g.closed_for(&a, later).is_none(), "probe goes");
        g.observe(&a, &verdict(Class::Transient, ScopeKind::None), later);
        assert!(g.closed_for(&job("1", "c2"), later).is_none());
        assert_eq!(open(&m, ScopeKind::Page, Class::Auth), 0);
        // a probe failing for the same reason closes it again
        g.observe(&a, &auth, later);
        assert!(g.closed_for(&a, later).is_some());
        assert_eq!(open(&m, ScopeKind::Page, Class::Auth), 1);
    }

    #[test]
    fn gates_expire_by_themselves() {
        let m = Metrics::new();
        let g = Gates::new(GateTimes::default(), true, m.clone());
        let t0 = Instant::now();
        let a = job("1", "c1");
        g.observe(&a, &verdict(Class::Budget, ScopeKind::Campaign), t0);
        // still closed: nothing to sweep
        g.sweep(t0 + Duration::from_secs(3599));
        assert_eq!(g.len(), 1);
        // time up, and no job came to probe within the probe wait
        g.sweep(t0 + Duration::from_secs(3606));
        assert!(g.is_empty());
        assert_eq!(open(&m, ScopeKind::Campaign, Class::Budget), 0);

        // a probe in flight keeps its gate until the probe times out
        g.observe(&a, &verdict(Class::Budget, ScopeKind::Campaign), t0);
        let up = t0 + Duration::from_secs(3600);
        assert!(g.closed_for(&a, up).is_none(), "the probe");
        g.sweep(up + Duration::from_secs(30));
        assert_eq!(g.len(), 1);
        g.sweep(up + PROBE_TIMEOUT + Duration::from_secs(6));
        assert!(g.is_empty());
    }

    #[test]
    fn absurd_hints_are_bounded() {
        let g = Gates::new(GateTimes::default(), true, Metrics::new());
        let t0 = Instant::now();
        let a = job("1", "c1");
        let v = Verdict {
            hint: Some(Duration::from_secs(u64::MAX)),
            ..verdict(Class::Throttled, ScopeKind::App)
        };
        g.observe(&a, &v, t0);
        assert_eq!(g.closed_for(&a, t0).unwrap().wait, MAX_GATE_WAIT);
    }

    #[test]
    fn disabled_gates_never_close() {
        let g = Gates::new(GateTimes::default(), false, Metrics::new());
        let a = job("1", "c1");
        g.observe(&a, &verdict(Class::Auth, ScopeKind::Page), Instant::now());
        assert!(g.closed_for(&a, Instant::now()).is_none());
    }
}
