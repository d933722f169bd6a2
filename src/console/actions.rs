//! Replay and purge from the console: a person confirms an exact set of
//! letters, and the action works on that set, once.
//!
//! - A [`Plan`] is what a confirmation page shows: the kind, the scope (a
//!   group or one letter) and the exact [`LetterKey`]s of the snapshot. Its
//!   id is a digest of the kind and the keys, so the same set always has the
//!   same id.
//! - Confirming starts an [`Action`] with that id. Starting an id that
//!   already has an action (a second click, a resubmitted form, a second
//!   operator) starts nothing and shows the existing one: a set is acted on
//!   once. Only an action that failed before it moved anything (the DLQ was
//!   busy for too long, the broker was unreachable) may be started again.
//! - The action scans the DLQ for exactly those letters ([`LetterSet`]):
//!   letters that joined the group after the snapshot are not touched, and
//!   letters gone meanwhile are counted as missing. Replay keeps the
//!   library's promise (a letter is acked only after its copy is confirmed)
//!   and its rate limit.
//! - Actions take the DLQ lane ([`Access::lane`]) like the snapshot does:
//!   they queue behind each other and behind a refresh. When another reader
//!   holds the DLQ the action waits and tries again for a while, saying so.
//!   Afterwards the snapshot is refreshed.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::access::Access;
use super::snapshot::Snapshots;
use crate::dlq::{
    self, DeadLetter, Dimension, DlqError, Flow, LetterKey, LetterSet, Observer, Progress,
    ScanOptions, ScanReport,
};

/// Confirmation pages remembered at once; the oldest is forgotten first.
const MAX_PLANS: usize = 16;
/// How long a confirmation page stays valid.
const PLAN_TTL: Duration = Duration::from_secs(30 * 60);
/// Finished actions remembered (the newest).
const MAX_FINISHED: usize = 100;
/// How long an action waits for a DLQ that another reader holds.
const BUSY_PATIENCE: Duration = Duration::from_secs(120);
const BUSY_RETRY: Duration = Duration::from_secs(2);

/// What an action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Kind {
    Replay,
    Purge,
}

impl Kind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Kind::Replay => "replay",
            Kind::Purge => "purge",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "replay" => Ok(Kind::Replay),
            "purge" => Ok(Kind::Purge),
            other => Err(format!("{other:?} is not an action (replay, purge)")),
        }
    }
}

/// What a person chose in the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Scope {
    Group {
        dimension: Dimension,
        key: String,
    },
    Letter {
        job_id: String,
        fingerprint: String,
    },
    /// The letters a filter selected in the snapshot (`/letters?…`):
    /// `query` is its `?…`, `text` says it in words.
    Filter {
        query: String,
        text: String,
    },
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Group { dimension, key } => write!(f, "group {dimension} = {key}"),
            Scope::Letter { job_id, .. } => write!(f, "letter {job_id}"),
            Scope::Filter { text, .. } => write!(f, "letters matching {text}"),
        }
    }
}

/// A confirmation shown to a person: the exact set an action would touch.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) id: String,
    pub(crate) kind: Kind,
    pub(crate) scope: Scope,
    pub(crate) keys: Vec<LetterKey>,
    pub(crate) snapshot_at: Option<DateTime<Utc>>,
    created: Instant,
}

impl Plan {
    pub(crate) fn new(
        kind: Kind,
        scope: Scope,
        keys: Vec<LetterKey>,
        snapshot_at: Option<DateTime<Utc>>,
    ) -> Plan {
        Plan {
            id: plan_id(kind, &keys),
            kind,
            scope,
            keys,
            snapshot_at,
            created: Instant::now(),
        }
    }
}

/// The id of an action on a set: the same kind and keys, the same id.
pub(crate) fn plan_id(kind: Kind, keys: &[LetterKey]) -> String {
    let mut sorted: Vec<&LetterKey> = keys.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    h.update(kind.as_str().as_bytes());
    for k in sorted {
        h.update([0]);
        h.update(k.job_id.as_bytes());
        h.update([0]);
        h.update(k.fingerprint.as_bytes());
    }
    hex::encode(&h.finalize()[..12])
}

/// Where an action is.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum State {
    /// Waiting for the DLQ lane (a snapshot or another action runs).
    Queued,
    /// Another reader holds the DLQ; tried again every few seconds.
    Waiting {
        why: String,
    },
    Running(Progress),
    Done(ScanReport),
    Failed {
        message: String,
        /// Letters replayed or purged before it failed (done; the rest are
        /// still in the DLQ).
        moved: usize,
    },
}

impl State {
    pub(crate) fn finished(&self) -> bool {
        matches!(self, State::Done(_) | State::Failed { .. })
    }
}

/// An action as pages show it.
#[derive(Debug, Clone)]
pub(crate) struct Action {
    pub(crate) id: String,
    pub(crate) kind: Kind,
    pub(crate) scope: Scope,
    /// Letters confirmed.
    pub(crate) count: usize,
    /// Replays per second (0 = no limit).
    pub(crate) rate: u32,
    pub(crate) snapshot_at: Option<DateTime<Utc>>,
    pub(crate) requested_at: DateTime<Utc>,
    pub(crate) finished_at: Option<DateTime<Utc>>,
    pub(crate) state: State,
    /// Times it was asked for again after it started (second clicks).
    pub(crate) repeats: u32,
}

struct Entry {
    action: Arc<Mutex<Action>>,
    /// The confirmed set, kept until the action has run (to start it again
    /// when it failed before moving anything).
    set: Arc<Mutex<Option<LetterSet>>>,
}

/// Why an action was not started.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum StartError {
    #[error("this confirmation is no longer known (it is older than 30 minutes, or the console was restarted); open the group again to see its letters now and confirm again")]
    Expired,
}

/// The plans shown and the actions started.
pub(crate) struct Actions {
    plans: Mutex<VecDeque<Plan>>,
    /// Newest first.
    entries: Mutex<Vec<Entry>>,
    max_letters: usize,
    cancel: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Actions {
    /// `cancel` stops a running action cleanly (at shutdown).
    pub(crate) fn new(max_letters: usize, cancel: CancellationToken) -> Actions {
        Actions {
            plans: Mutex::new(VecDeque::new()),
            entries: Mutex::new(Vec::new()),
            max_letters,
            cancel,
        }
    }

    /// Remembers a plan shown on a confirmation page (the same set shown
    /// again replaces the older copy).
    pub(crate) fn propose(&self, plan: Plan) {
        let mut plans = lock(&self.plans);
        plans.retain(|p| p.id != plan.id && p.created.elapsed() < PLAN_TTL);
        while plans.len() >= MAX_PLANS {
            plans.pop_front();
        }
        plans.push_back(plan);
    }

    /// The action with this id, if one was started.
    pub(crate) fn get(&self, id: &str) -> Option<Action> {
        lock(&self.entries)
            .iter()
            .map(|e| lock(&e.action).clone())
            .find(|a| a.id == id)
    }

    /// Every action remembered, newest first.
    pub(crate) fn list(&self) -> Vec<Action> {
        lock(&self.entries)
            .iter()
            .map(|e| lock(&e.action).clone())
            .collect()
    }

    /// The actions not finished yet.
    pub(crate) fn unfinished(&self) -> Vec<Action> {
        self.list()
            .into_iter()
            .filter(|a| !a.state.finished())
            .collect()
    }

    /// Starts the action of a confirmed plan, or finds the one already
    /// started for the same set. Returns the action's id.
    pub(crate) fn start(
        &self,
        plan_id: &str,
        rate: u32,
        access: &Arc<Access>,
        snapshots: &Arc<Snapshots>,
        audit: Option<Audit>,
    ) -> Result<String, StartError> {
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.iter().find(|e| lock(&e.action).id == plan_id) {
            let mut a = lock(&e.action);
            let again = matches!(a.state, State::Failed { moved: 0, .. });
            let set = lock(&e.set).clone();
            match (again, set) {
                (true, Some(set)) => {
                    a.state = State::Queued;
                    a.rate = rate;
                    a.requested_at = Utc::now();
                    a.finished_at = None;
                    drop(a);
                    self.spawn(e, set, access, snapshots, audit);
                }
                _ => a.repeats += 1,
            }
            return Ok(plan_id.to_string());
        }
        let plan = {
            let mut plans = lock(&self.plans);
            let at = plans
                .iter()
                .position(|p| p.id == plan_id && p.created.elapsed() < PLAN_TTL)
                .ok_or(StartError::Expired)?;
            plans.remove(at).ok_or(StartError::Expired)?
        };
        let set: LetterSet = plan.keys.iter().cloned().collect();
        let entry = Entry {
            action: Arc::new(Mutex::new(Action {
                id: plan.id.clone(),
                kind: plan.kind,
                scope: plan.scope,
                count: plan.keys.len(),
                rate,
                snapshot_at: plan.snapshot_at,
                requested_at: Utc::now(),
                finished_at: None,
                state: State::Queued,
                repeats: 0,
            })),
            set: Arc::new(Mutex::new(Some(set.clone()))),
        };
        self.spawn(&entry, set, access, snapshots, audit);
        entries.insert(0, entry);
        // forget the oldest finished ones
        let mut finished = 0;
        entries.retain(|e| {
            if lock(&e.action).state.finished() {
                finished += 1;
                finished <= MAX_FINISHED
            } else {
                true
            }
        });
        Ok(plan.id)
    }

    fn spawn(
        &self,
        entry: &Entry,
        set: LetterSet,
        access: &Arc<Access>,
        snapshots: &Arc<Snapshots>,
        audit: Option<Audit>,
    ) {
        let action = entry.action.clone();
        let kept = entry.set.clone();
        let access = access.clone();
        let snapshots = snapshots.clone();
        let options = ScanOptions {
            max_held: Some(self.max_letters),
            ..ScanOptions::new(dlq::Action::Peek).with_cancel(self.cancel.clone())
        };
        tokio::spawn(async move {
            let state = run(&action, set, options, &access).await;
            let moved_any = !matches!(state, State::Failed { moved: 0, .. });
            if let Some(audit) = audit {
                let (kind, scope) = {
                    let a = lock(&action);
                    (a.kind, a.scope.clone())
                };
                let moved = match &state {
                    State::Done(r) => r.replayed + r.purged,
                    State::Failed { moved, .. } => *moved,
                    _ => 0,
                };
                let campaign = match &scope {
                    Scope::Group {
                        dimension: Dimension::Campaign,
                        key,
                    } => Some(key.as_str()),
                    _ => None,
                };
                let recorded = audit
                    .campaigns
                    .audit(
                        &audit.who,
                        kind.as_str(),
                        campaign,
                        &scope.to_string(),
                        Some(moved as u64),
                    )
                    .await;
                if let Err(e) = recorded {
                    tracing::warn!(error = %e, "console: an action was not recorded in the audit trail");
                }
            }
            {
                let mut a = lock(&action);
                a.state = state;
                a.finished_at = Some(Utc::now());
            }
            if moved_any {
                *lock(&kept) = None;
            }
            snapshots.mark_stale();
            snapshots.refresh(&access, true);
        });
    }
}

/// Where a finished action is recorded (with Redis): the audit trail, and
/// who started it.
pub(crate) struct Audit {
    pub(crate) campaigns: crate::fleet::campaign::Campaigns,
    pub(crate) who: String,
}

/// Runs one action to its end and says how it ended.
async fn run(
    action: &Arc<Mutex<Action>>,
    set: LetterSet,
    mut options: ScanOptions,
    access: &Access,
) -> State {
    let (kind, rate) = {
        let a = lock(action);
        (a.kind, a.rate)
    };
    let scan_action = match kind {
        Kind::Replay => dlq::Action::Replay { rate },
        Kind::Purge => dlq::Action::Purge,
    };
    let defaults = ScanOptions::new(scan_action);
    options.action = scan_action;
    options.consumer_window = defaults.consumer_window;
    let patience = Instant::now() + BUSY_PATIENCE;
    loop {
        let lane = access.lane().await;
        let conn = match access.connection().await {
            Ok(c) => c,
            Err(e) => {
                return State::Failed {
                    message: format!("cannot reach RabbitMQ: {e}; nothing was moved"),
                    moved: 0,
                }
            }
        };
        let mut watch = Watch { action };
        let result = dlq::scan(&conn, &access.topology, set.clone(), &options, &mut watch).await;
        drop(lane);
        match result {
            Ok(report) => return State::Done(report),
            Err(DlqError::Busy { consumers, .. }) if Instant::now() < patience => {
                lock(action).state = State::Waiting {
                    why: format!(
                        "{consumers} other consumer(s) read the DLQ (a mmsend dlq run or another console?); trying again every {} s",
                        BUSY_RETRY.as_secs()
                    ),
                };
                tokio::select! {
                    _ = tokio::time::sleep(BUSY_RETRY) => {}
                    _ = options.cancel.as_ref().map_or_else(CancellationToken::new, Clone::clone).cancelled_owned() => {
                        return State::Failed { message: "the console stopped before the DLQ was free; nothing was moved".into(), moved: 0 };
                    }
                }
            }
            Err(DlqError::Aborted {
                replayed,
                purged,
                source,
                ..
            }) => {
                return State::Failed {
                    message: format!(
                        "stopped on an error after {} moved (those are done; every other letter is still in the DLQ): {source}",
                        replayed + purged
                    ),
                    moved: replayed + purged,
                }
            }
            Err(e) => {
                return State::Failed {
                    message: format!("{e}; nothing was moved"),
                    moved: 0,
                }
            }
        }
    }
}

/// Reports a running action's progress.
struct Watch<'a> {
    action: &'a Arc<Mutex<Action>>,
}

impl Observer for Watch<'_> {
    fn selected(&mut self, _: &DeadLetter) -> Flow {
        Flow::Continue
    }

    fn progress(&mut self, progress: &Progress) {
        lock(self.action).state = State::Running(progress.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(j: &str, f: &str) -> LetterKey {
        LetterKey {
            job_id: j.into(),
            fingerprint: f.into(),
        }
    }

    #[test]
    fn a_set_has_one_id_whatever_its_order_and_kinds_differ() {
        let a = vec![key("a", "01"), key("b", "02")];
        let b = vec![key("b", "02"), key("a", "01")];
        assert_eq!(plan_id(Kind::Replay, &a), plan_id(Kind::Replay, &b));
        assert_ne!(plan_id(Kind::Replay, &a), plan_id(Kind::Purge, &a));
        assert_ne!(plan_id(Kind::Replay, &a), plan_id(Kind::Replay, &a[..1]));
        // a twin (the same key twice) is another set
        let twins = vec![key("a", "01"), key("a", "01")];
        assert_ne!(
            plan_id(Kind::Replay, &twins),
            plan_id(Kind::Replay, &a[..1])
        );
        // no key can be shifted into the next one
        assert_ne!(
            plan_id(Kind::Replay, &[key("ab", "c")]),
            plan_id(Kind::Replay, &[key("a", "bc")])
        );
    }

    #[test]
    fn plans_are_bounded_and_an_unknown_plan_starts_nothing() {
        let actions = Actions::new(10, CancellationToken::new());
        for i in 0..(MAX_PLANS + 5) {
            actions.propose(Plan::new(
                Kind::Purge,
                Scope::Letter {
                    job_id: format!("j{i}"),
                    fingerprint: "00".into(),
                },
                vec![key(&format!("j{i}"), "00")],
                None,
            ));
        }
        assert_eq!(lock(&actions.plans).len(), MAX_PLANS);
        let access = Arc::new(Access::new(
            "amqp://127.0.0.1:1/%2f",
            crate::broker::Topology::with_prefix("unused").unwrap(),
        ));
        let snapshots = Arc::new(Snapshots::new(
            Duration::from_secs(5),
            10,
            CancellationToken::new(),
        ));
        assert_eq!(
            actions.start("nope", 0, &access, &snapshots, None),
            Err(StartError::Expired)
        );
        assert!(actions.list().is_empty());
    }
}
