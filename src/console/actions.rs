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
//!   once. Only an action that moved nothing (the DLQ was busy for too
//!   long, the broker was unreachable, it was stopped at once) or whose end
//!   was never recorded may be started again: the set is exact, so a letter
//!   moved meanwhile is gone and counted as missing, never moved twice.
//! - The action scans the DLQ for exactly those letters ([`LetterSet`]):
//!   letters that joined the group after the snapshot are not touched, and
//!   letters gone meanwhile are counted as missing. Replay keeps the
//!   library's promise (a letter is acked only after its copy is confirmed)
//!   and its rate limit.
//! - Actions take the DLQ lane ([`Access::lane`]) like the snapshot does:
//!   they queue behind each other and behind a refresh. When another reader
//!   holds the DLQ the action waits and tries again for a while, saying so.
//!   Afterwards the snapshot is refreshed.
//! - Progress counts a replayed letter when its copy is confirmed (the scan
//!   settles confirms as they come), and shows the scan's own numbers
//!   (letters read of the depth at its start, selected).
//! - Each action has its own cancellation token, a child of the console's.
//!   **Stop** cancels it: the scan stops reading, settles the copies in
//!   flight and returns every letter it holds, so the exact-set rule holds:
//!   moved + still in the DLQ (+ already gone) = the confirmed count. After
//!   a stop, letters of the set the scan had not read yet are still in the
//!   DLQ, not missing ([`Action::outcome`]).
//! - A purge of [`PURGE_TYPE_COUNT_AT`] letters or more asks the person to
//!   type the count; the server refuses the form without it.
//!
//! **The audit trail.** Every action records its start, a stop (who asked
//! for it) and its end (moved, still in the DLQ, already gone), with who
//! started it. With Redis the entries go to the campaign audit trail
//! ([`Campaigns::audit`]: the stream `{<prefix>}:audit`, and the log).
//! Decision: a console without Redis keeps the same trail in its log only —
//! one info line `audit` per entry with the same fields (`who`, `action`,
//! `campaign`, `what`, `count`) as the Redis trail writes — and its Actions
//! page says so. No file of its own: the log is already where a console's
//! operator looks, and a second store would be one more thing to keep.
//!
//! **Across a restart.** With Redis every action's record (id, kind, scope,
//! counts, state, who, times) is kept in `{<prefix>}:console:actions` (the
//! newest [`MAX_SAVED`]; see [`Campaigns::save_console_action`]) and read
//! back when the console starts, so the Actions page lists the earlier
//! actions. One that was still running when the console stopped is shown as
//! interrupted by a restart (the console's stop settled it: copies in flight
//! confirmed, the rest returned). Without Redis actions are remembered only
//! while the console runs, and the Actions page says so.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::access::Access;
use super::snapshot::Snapshots;
use crate::dlq::{
    self, DeadLetter, Dimension, DlqError, Flow, LetterKey, LetterSet, Observer, Progress,
    ScanOptions, ScanReport, Stop,
};
use crate::fleet::campaign::Campaigns;

/// Confirmation pages remembered at once; the oldest is forgotten first.
const MAX_PLANS: usize = 16;
/// How long a confirmation page stays valid.
const PLAN_TTL: Duration = Duration::from_secs(30 * 60);
/// Finished actions remembered (the newest).
const MAX_FINISHED: usize = 100;
/// How long an action waits for a DLQ that another reader holds.
const BUSY_PATIENCE: Duration = Duration::from_secs(120);
const BUSY_RETRY: Duration = Duration::from_secs(2);
/// A purge of at least this many letters asks the person to type the count
/// on the confirmation page, and the server refuses it otherwise.
pub(crate) const PURGE_TYPE_COUNT_AT: usize = 100;
/// Actions kept in Redis across restarts (the newest).
pub(crate) const MAX_SAVED: usize = MAX_FINISHED;
/// How long a stopping console waits for its actions to record their end.
const RECORD_PATIENCE: Duration = Duration::from_secs(10);

/// What an action does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    /// Read back after a restart: it had not finished when the console
    /// stopped (the stop settled it; what it did not move is in the DLQ).
    Interrupted,
}

impl State {
    /// Whether confirming the same set again starts it again: only when
    /// nothing of it was moved (stopped before moving, failed, every copy
    /// unconfirmed) or its end was never recorded. The set is exact, so
    /// letters moved meanwhile are gone and counted as missing, never moved
    /// twice; anything else shows the action already there.
    pub(crate) fn may_start_again(&self) -> bool {
        match self {
            State::Failed { moved: 0, .. } | State::Interrupted => true,
            State::Done(r) => r.replayed + r.purged == 0,
            _ => false,
        }
    }

    pub(crate) fn finished(&self) -> bool {
        matches!(
            self,
            State::Done(_) | State::Failed { .. } | State::Interrupted
        )
    }
}

/// Where the letters of a finished action are: `moved + kept + missing`
/// is the confirmed count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Outcome {
    /// Replayed (copy confirmed) or purged.
    pub(crate) moved: usize,
    /// Still in the DLQ, untouched (or returned after a failed copy).
    pub(crate) kept: usize,
    /// Not found: gone before the action read the DLQ.
    pub(crate) missing: usize,
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
    /// Who started it (`console:<identity>`).
    pub(crate) who: String,
    /// Who asked it to stop, once someone did.
    pub(crate) stopped_by: Option<String>,
}

impl Action {
    /// Where the confirmed letters are, once it finished (`None` before, and
    /// for an action interrupted by a restart, whose counts were not kept).
    pub(crate) fn outcome(&self) -> Option<Outcome> {
        let (moved, missing) = match &self.state {
            State::Done(r) => {
                // A run that read the whole queue (or found every letter)
                // knows which ones are gone; after a stop, letters of the set
                // not read yet are still in the DLQ, not missing.
                let missing = match r.stop {
                    Stop::Depth | Stop::Selected | Stop::QueueEmpty => r.missing,
                    Stop::Interrupted | Stop::HoldLimit | Stop::Observer => 0,
                };
                (r.replayed + r.purged, missing)
            }
            State::Failed { moved, .. } => (*moved, 0),
            _ => return None,
        };
        let missing = missing.min(self.count.saturating_sub(moved));
        Some(Outcome {
            moved,
            kept: self.count - moved.min(self.count) - missing,
            missing,
        })
    }

    /// Whether someone stopped it (or the console's stop interrupted it).
    pub(crate) fn stopped(&self) -> bool {
        matches!(&self.state, State::Done(r) if r.stop == Stop::Interrupted)
    }
}

struct Entry {
    action: Arc<Mutex<Action>>,
    /// The confirmed set, kept until the action has run (to start it again
    /// when it failed before moving anything).
    set: Arc<Mutex<Option<LetterSet>>>,
    /// Cancelled by Stop (a child of the console's token).
    cancel: CancellationToken,
}

/// Why an action was not stopped.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum StopError {
    #[error("there is no such action (ids are remembered while the console runs, or in Redis)")]
    Unknown,
    #[error("it has already finished; nothing was stopped")]
    Finished,
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
    /// Redis: where records and the audit trail go (`None`: the log only).
    store: Option<Campaigns>,
    /// The running actions' tasks (a stopping console waits for them).
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
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
            store: None,
            tasks: Mutex::new(Vec::new()),
        }
    }

    /// Keeps records and the audit trail in Redis.
    pub(crate) fn with_store(mut self, store: Option<Campaigns>) -> Actions {
        self.store = store;
        self
    }

    /// Whether actions are kept in Redis (they survive a restart, and the
    /// audit trail is the campaign trail).
    pub(crate) fn stored(&self) -> bool {
        self.store.is_some()
    }

    /// Reads back the actions of earlier runs of this console (with Redis).
    /// One that had not finished is shown as interrupted by the restart.
    pub(crate) async fn restore(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let records = match store.console_actions(MAX_SAVED).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, "console: the earlier actions were not read back from Redis; the Actions page lists only this run's");
                return;
            }
        };
        let mut entries = lock(&self.entries);
        for json in records {
            let record: Record = match serde_json::from_str(&json) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "console: an earlier action's record was not understood; it is not listed");
                    continue;
                }
            };
            let Some(mut action) = record.into_action() else {
                continue;
            };
            if entries.iter().any(|e| lock(&e.action).id == action.id) {
                continue;
            }
            if !action.state.finished() {
                action.state = State::Interrupted;
            }
            entries.push(Entry {
                action: Arc::new(Mutex::new(action)),
                set: Arc::new(Mutex::new(None)),
                cancel: self.cancel.child_token(),
            });
        }
    }

    /// The plan shown for `plan_id`, while it is valid: its kind and count.
    pub(crate) fn planned(&self, plan_id: &str) -> Option<(Kind, usize)> {
        let planned = lock(&self.plans)
            .iter()
            .find(|p| p.id == plan_id && p.created.elapsed() < PLAN_TTL)
            .map(|p| (p.kind, p.keys.len()));
        // an action started again is checked as its first start was
        planned.or_else(|| {
            lock(&self.entries)
                .iter()
                .map(|e| lock(&e.action).clone())
                .find(|a| a.id == plan_id)
                .map(|a| (a.kind, a.count))
        })
    }

    /// Asks a running action to stop: it stops reading, settles the copies
    /// in flight and returns the rest. Recorded in the audit trail with
    /// `who`.
    pub(crate) async fn stop(&self, id: &str, who: &str) -> Result<(), StopError> {
        let (action, cancel) = {
            let entries = lock(&self.entries);
            let e = entries
                .iter()
                .find(|e| lock(&e.action).id == id)
                .ok_or(StopError::Unknown)?;
            let mut a = lock(&e.action);
            if a.state.finished() {
                return Err(StopError::Finished);
            }
            if a.stopped_by.is_some() {
                // asked already: a second click changes nothing
                return Ok(());
            }
            a.stopped_by = Some(who.to_string());
            (a.clone(), e.cancel.clone())
        };
        cancel.cancel();
        let what = format!("stop {}: {}, asked by {who}", action.id, action.scope);
        audit(&self.store, who, &action, what, None).await;
        Ok(())
    }

    /// Waits (a while) for the actions' tasks to record how they ended: a
    /// stopping console calls it after cancelling them.
    pub(crate) async fn settle(&self) {
        let tasks = std::mem::take(&mut *lock(&self.tasks));
        let all = futures_util::future::join_all(tasks);
        if tokio::time::timeout(RECORD_PATIENCE, all).await.is_err() {
            tracing::warn!("console: an action did not record its end before the console stopped; after a restart it shows as interrupted");
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
        who: &str,
        access: &Arc<Access>,
        snapshots: &Arc<Snapshots>,
    ) -> Result<String, StartError> {
        let mut entries = lock(&self.entries);
        if let Some(e) = entries.iter_mut().find(|e| lock(&e.action).id == plan_id) {
            let mut a = lock(&e.action);
            let again = a.state.may_start_again();
            // (an action read back after a restart has no set: the plan
            // shown again has it)
            let set = lock(&e.set).clone().or_else(|| {
                let mut plans = lock(&self.plans);
                let at = plans
                    .iter()
                    .position(|p| p.id == plan_id && p.created.elapsed() < PLAN_TTL)?;
                let plan = plans.remove(at)?;
                Some(plan.keys.iter().cloned().collect())
            });
            match (again, set) {
                (true, Some(set)) => {
                    a.state = State::Queued;
                    a.rate = rate;
                    a.requested_at = Utc::now();
                    a.finished_at = None;
                    a.who = who.to_string();
                    a.stopped_by = None;
                    drop(a);
                    *lock(&e.set) = Some(set.clone());
                    e.cancel = self.cancel.child_token();
                    self.spawn(e, set, access, snapshots);
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
                who: who.to_string(),
                stopped_by: None,
            })),
            set: Arc::new(Mutex::new(Some(set.clone()))),
            cancel: self.cancel.child_token(),
        };
        self.spawn(&entry, set, access, snapshots);
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
    ) {
        let action = entry.action.clone();
        let kept = entry.set.clone();
        let access = access.clone();
        let snapshots = snapshots.clone();
        let store = self.store.clone();
        let options = ScanOptions {
            max_held: Some(self.max_letters),
            ..ScanOptions::new(dlq::Action::Peek).with_cancel(entry.cancel.clone())
        };
        let task = tokio::spawn(async move {
            let started = lock(&action).clone();
            let rate = match (started.kind, started.rate) {
                (Kind::Replay, 0) => ", no rate limit".to_string(),
                (Kind::Replay, r) => format!(", at most {r} a second"),
                (Kind::Purge, _) => String::new(),
            };
            let what = format!(
                "start {}: {}, {} letters confirmed{rate}",
                started.id, started.scope, started.count
            );
            audit(&store, &started.who, &started, what, None).await;
            save(&store, &started).await;
            let state = run(&action, set, options, &access).await;
            let moved_any = !matches!(state, State::Failed { moved: 0, .. });
            let ended = {
                let mut a = lock(&action);
                a.state = state;
                a.finished_at = Some(Utc::now());
                a.clone()
            };
            if moved_any {
                *lock(&kept) = None;
            }
            let outcome = ended.outcome().unwrap_or(Outcome {
                moved: 0,
                kept: ended.count,
                missing: 0,
            });
            let how = match (&ended.state, &ended.stopped_by) {
                (State::Failed { message, .. }, _) => format!("failed: {message}"),
                (_, Some(by)) => format!("stopped by {by}"),
                _ if ended.stopped() => "interrupted: the console was stopping".into(),
                _ => "finished".into(),
            };
            let what = format!(
                "end {}: {}: {} moved, {} still in the DLQ, {} already gone ({how})",
                ended.id, ended.scope, outcome.moved, outcome.kept, outcome.missing
            );
            audit(&store, &ended.who, &ended, what, Some(outcome.moved as u64)).await;
            save(&store, &ended).await;
            snapshots.mark_stale();
            snapshots.refresh(&access, true);
        });
        let mut tasks = lock(&self.tasks);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task);
    }
}

/// Records an entry of the audit trail: in Redis (and the log) with a
/// store, else in the log alone, as the same `audit` line.
async fn audit(store: &Option<Campaigns>, who: &str, a: &Action, what: String, count: Option<u64>) {
    let campaign = match &a.scope {
        Scope::Group {
            dimension: Dimension::Campaign,
            key,
        } => Some(key.as_str()),
        _ => None,
    };
    match store {
        Some(c) => {
            if let Err(e) = c.audit(who, a.kind.as_str(), campaign, &what, count).await {
                tracing::warn!(error = %e, what, "console: an action was not recorded in the Redis audit trail (it is in the log above)");
            }
        }
        None => tracing::info!(
            who,
            action = a.kind.as_str(),
            campaign = campaign.unwrap_or(""),
            what,
            count = count.map_or(-1, |c| c as i64),
            "audit"
        ),
    }
}

/// Keeps an action's record in Redis (with a store).
async fn save(store: &Option<Campaigns>, a: &Action) {
    let Some(store) = store else {
        return;
    };
    let record = match serde_json::to_string(&Record::of(a)) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "console: an action's record was not written");
            return;
        }
    };
    let at = a.requested_at.timestamp_millis();
    if let Err(e) = store
        .save_console_action(&a.id, at, &record, MAX_SAVED)
        .await
    {
        tracing::warn!(error = %e, id = %a.id, "console: an action was not saved in Redis; after a restart it is not listed");
    }
}

/// A scope as a record keeps it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum SavedScope {
    Group { dimension: String, key: String },
    Letter { job_id: String, fingerprint: String },
    Filter { query: String, text: String },
}

/// An action as Redis keeps it (JSON).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    kind: Kind,
    scope: SavedScope,
    count: usize,
    rate: u32,
    snapshot_at: Option<DateTime<Utc>>,
    requested_at: DateTime<Utc>,
    finished_at: Option<DateTime<Utc>>,
    state: State,
    repeats: u32,
    who: String,
    stopped_by: Option<String>,
}

impl Record {
    fn of(a: &Action) -> Record {
        Record {
            id: a.id.clone(),
            kind: a.kind,
            scope: match &a.scope {
                Scope::Group { dimension, key } => SavedScope::Group {
                    dimension: dimension.as_str().into(),
                    key: key.clone(),
                },
                Scope::Letter {
                    job_id,
                    fingerprint,
                } => SavedScope::Letter {
                    job_id: job_id.clone(),
                    fingerprint: fingerprint.clone(),
                },
                Scope::Filter { query, text } => SavedScope::Filter {
                    query: query.clone(),
                    text: text.clone(),
                },
            },
            count: a.count,
            rate: a.rate,
            snapshot_at: a.snapshot_at,
            requested_at: a.requested_at,
            finished_at: a.finished_at,
            state: a.state.clone(),
            repeats: a.repeats,
            who: a.who.clone(),
            stopped_by: a.stopped_by.clone(),
        }
    }

    /// `None` for a record of a dimension this console does not know.
    fn into_action(self) -> Option<Action> {
        let scope = match self.scope {
            SavedScope::Group { dimension, key } => Scope::Group {
                dimension: dimension.parse().ok()?,
                key,
            },
            SavedScope::Letter {
                job_id,
                fingerprint,
            } => Scope::Letter {
                job_id,
                fingerprint,
            },
            SavedScope::Filter { query, text } => Scope::Filter { query, text },
        };
        Some(Action {
            id: self.id,
            kind: self.kind,
            scope,
            count: self.count,
            rate: self.rate,
            snapshot_at: self.snapshot_at,
            requested_at: self.requested_at,
            finished_at: self.finished_at,
            state: self.state,
            repeats: self.repeats,
            who: self.who,
            stopped_by: self.stopped_by,
        })
    }
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
    let cancel = options.cancel.clone().unwrap_or_default();
    loop {
        let lane = tokio::select! {
            // a Stop already pressed wins over a free lane
            biased;
            _ = cancel.cancelled() => {
                return State::Failed {
                    message: "stopped before it could read the DLQ (Stop was pressed, or the console was stopping); nothing was moved".into(),
                    moved: 0,
                };
            }
            lane = access.lane() => lane,
        };
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
                    _ = cancel.cancelled() => {
                        return State::Failed { message: "stopped while waiting for the DLQ (Stop was pressed, or the console was stopping); nothing was moved".into(), moved: 0 };
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

    fn action(count: usize, state: State) -> Action {
        Action {
            id: "0123abcd".into(),
            kind: Kind::Replay,
            scope: Scope::Group {
                dimension: Dimension::Code,
                key: "2300005".into(),
            },
            count,
            rate: 5,
            snapshot_at: Some(Utc::now()),
            requested_at: Utc::now(),
            finished_at: None,
            state,
            repeats: 0,
            who: "console:loopback-0000".into(),
            stopped_by: None,
        }
    }

    fn report(stop: Stop, replayed: usize, failed: usize, missing: usize) -> ScanReport {
        ScanReport {
            queue: "q.dead".into(),
            depth_at_start: 100,
            read: 40,
            selected: replayed + failed,
            replayed,
            purged: 0,
            failed,
            missing,
            stop,
            seconds: 1.0,
        }
    }

    #[test]
    fn only_a_set_that_moved_nothing_or_whose_end_is_unknown_starts_again() {
        let failed = |moved| State::Failed {
            message: "x".into(),
            moved,
        };
        for (state, again) in [
            (State::Done(report(Stop::Interrupted, 0, 0, 0)), true),
            (State::Done(report(Stop::Depth, 0, 4, 0)), true),
            (State::Done(report(Stop::Interrupted, 3, 0, 7)), false),
            (State::Done(report(Stop::Selected, 10, 0, 0)), false),
            (failed(0), true),
            (failed(2), false),
            (State::Interrupted, true),
            (State::Queued, false),
        ] {
            assert_eq!(state.may_start_again(), again, "{state:?}");
        }
    }

    #[test]
    fn moved_kept_and_missing_add_up_to_the_confirmed_count() {
        // stopped: the set's letters not read yet are still in the DLQ
        let a = action(10, State::Done(report(Stop::Interrupted, 3, 0, 7)));
        assert_eq!(
            a.outcome(),
            Some(Outcome {
                moved: 3,
                kept: 7,
                missing: 0
            })
        );
        assert!(a.stopped());
        // the whole queue read: the ones not found are gone
        let a = action(10, State::Done(report(Stop::Depth, 6, 1, 3)));
        assert_eq!(
            a.outcome(),
            Some(Outcome {
                moved: 6,
                kept: 1,
                missing: 3
            })
        );
        assert!(!a.stopped());
        let a = action(
            10,
            State::Failed {
                message: "x".into(),
                moved: 4,
            },
        );
        assert_eq!(
            a.outcome(),
            Some(Outcome {
                moved: 4,
                kept: 6,
                missing: 0
            })
        );
        assert_eq!(action(10, State::Queued).outcome(), None);
        assert_eq!(action(10, State::Interrupted).outcome(), None);
    }

    #[test]
    fn a_record_reads_back_as_the_action_it_was() {
        let mut a = action(10, State::Done(report(Stop::Interrupted, 3, 0, 7)));
        a.stopped_by = Some("console:session-1234".into());
        a.finished_at = Some(Utc::now());
        let json = serde_json::to_string(&Record::of(&a)).unwrap();
        let back: Record = serde_json::from_str(&json).unwrap();
        let b = back.into_action().unwrap();
        assert_eq!(serde_json::to_string(&Record::of(&b)).unwrap(), json);
        assert_eq!(b.scope, a.scope);
        assert_eq!(b.state, a.state);
        // a letter's scope too, and a running one
        a.scope = Scope::Letter {
            job_id: "job-1".into(),
            fingerprint: "00ff".into(),
        };
        a.state = State::Waiting { why: "busy".into() };
        let json = serde_json::to_string(&Record::of(&a)).unwrap();
        let b = serde_json::from_str::<Record>(&json)
            .unwrap()
            .into_action()
            .unwrap();
        assert_eq!((b.scope, b.state), (a.scope, a.state));
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
            actions.start("nope", 0, "console:test", &access, &snapshots),
            Err(StartError::Expired)
        );
        assert!(actions.list().is_empty());
    }
}
