//! The history: what the run did and when — every publish (with its copy
//! number), every fault as applied or skipped (a fault on a worker that is
//! already down is skipped), every restart — each with its wall-clock time
//! (to set against the simulator's, the DLQ's and the results stream's
//! times) and its offset from the start.
//!
//! It also keeps the windows in which Redis was unusable (frozen, paused,
//! down), which the checker needs to tell a ledger that was lost from one
//! that failed.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

/// What happened.
#[derive(Debug, Clone)]
pub enum Entry {
    /// Job `job` (index into the plan) published, copy `copy` (1 = the original).
    Publish { job: usize, copy: u32 },
    /// A fault (`kind`: its name in the summary) or a recovery step (kind
    /// `recover`); `applied` false: skipped, and why in `what`.
    Fault {
        kind: &'static str,
        what: String,
        applied: bool,
    },
    /// Anything else worth reading (a worker that exited by itself, a replay's output).
    Note(String),
}

/// One entry with its times.
#[derive(Debug, Clone)]
pub struct Record {
    pub at: DateTime<Utc>,
    pub since: Duration,
    pub entry: Entry,
}

#[derive(Default)]
struct Inner {
    records: Vec<Record>,
    outages: Vec<(DateTime<Utc>, Option<DateTime<Utc>>)>,
    ledger_losses: Vec<DateTime<Utc>>,
    worker_faults: Vec<(DateTime<Utc>, String)>,
}

/// The run's history, shared by the publisher and the fault executor.
#[derive(Clone)]
pub struct History {
    start: Instant,
    inner: Arc<Mutex<Inner>>,
}

impl History {
    pub fn new() -> History {
        History {
            start: Instant::now(),
            inner: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Time since the run started.
    pub fn since(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn push(&self, entry: Entry) {
        let record = Record {
            at: Utc::now(),
            since: self.start.elapsed(),
            entry,
        };
        self.lock().records.push(record);
    }

    pub fn fault(&self, kind: &'static str, what: impl Into<String>, applied: bool) {
        self.push(Entry::Fault {
            kind,
            what: what.into(),
            applied,
        });
    }

    pub fn note(&self, what: impl Into<String>) {
        self.push(Entry::Note(what.into()));
    }

    /// A worker lost what it held now (killed, told to stop, cut off by
    /// the broker): noted, and kept for the checker.
    pub fn worker_fault(&self, what: impl Into<String>) {
        let what = what.into();
        self.lock().worker_faults.push((Utc::now(), what.clone()));
        self.note(what);
    }

    /// When workers lost what they held, and how.
    pub fn worker_faults(&self) -> Vec<(DateTime<Utc>, String)> {
        self.lock().worker_faults.clone()
    }

    /// Redis became unusable now (until [`History::redis_back`]).
    pub fn redis_gone(&self) {
        let mut inner = self.lock();
        let now = Utc::now();
        if inner.outages.last().is_none_or(|(_, end)| end.is_some()) {
            inner.outages.push((now, None));
        }
    }

    /// Redis lost every key now (killed; it comes back empty).
    pub fn ledger_lost(&self) {
        self.lock().ledger_losses.push(Utc::now());
    }

    /// When Redis lost every key.
    pub fn ledger_losses(&self) -> Vec<DateTime<Utc>> {
        self.lock().ledger_losses.clone()
    }

    /// Redis usable again.
    pub fn redis_back(&self) {
        if let Some((_, end @ None)) = self.lock().outages.last_mut() {
            *end = Some(Utc::now());
        }
    }

    /// A window of known length in which Redis was unusable (a CLIENT PAUSE).
    pub fn redis_paused(&self, hold: Duration) {
        let now = Utc::now();
        let end = now + chrono::Duration::from_std(hold).unwrap_or_default();
        self.lock().outages.push((now, Some(end)));
    }

    /// Windows in which Redis was unusable; an open one ends now.
    pub fn outages(&self) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
        let now = Utc::now();
        self.lock()
            .outages
            .iter()
            .map(|(a, b)| (*a, b.unwrap_or(now)))
            .collect()
    }

    /// When each job (by index) was first published.
    pub fn first_published(&self, jobs: usize) -> Vec<Option<DateTime<Utc>>> {
        let mut first = vec![None; jobs];
        for r in &self.lock().records {
            if let Entry::Publish { job, .. } = r.entry {
                first[job].get_or_insert(r.at);
            }
        }
        first
    }

    /// Copies published per job index.
    pub fn copies(&self, jobs: usize) -> Vec<u32> {
        let mut copies = vec![0; jobs];
        for r in &self.lock().records {
            if let Entry::Publish { job, .. } = r.entry {
                copies[job] += 1;
            }
        }
        copies
    }

    /// The faults and notes, one a line, for a failure report.
    pub fn faults_text(&self) -> String {
        let mut out = String::new();
        for r in self.lock().records.iter() {
            let line = match &r.entry {
                Entry::Publish { .. } => continue,
                Entry::Fault {
                    what,
                    applied: true,
                    ..
                } => what.clone(),
                Entry::Fault {
                    what,
                    applied: false,
                    ..
                } => format!("(skipped) {what}"),
                Entry::Note(what) => format!("note: {what}"),
            };
            out.push_str(&format!(
                "  {:>8.3}s  {}  {line}\n",
                r.since.as_secs_f64(),
                r.at.format("%H:%M:%S%.3f")
            ));
        }
        out
    }

    /// The publishes of one job, for a failure report.
    pub fn publishes_of(&self, job: usize) -> Vec<Record> {
        self.lock()
            .records
            .iter()
            .filter(|r| matches!(r.entry, Entry::Publish { job: j, .. } if j == job))
            .cloned()
            .collect()
    }

    /// Faults applied, by kind (recovery steps left out).
    pub fn applied_faults(&self) -> std::collections::BTreeMap<&'static str, usize> {
        let mut by = std::collections::BTreeMap::new();
        for r in self.lock().records.iter() {
            if let Entry::Fault {
                kind,
                applied: true,
                ..
            } = r.entry
            {
                if kind != "recover" {
                    *by.entry(kind).or_insert(0) += 1;
                }
            }
        }
        by
    }
}
