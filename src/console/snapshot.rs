//! The one snapshot of the DLQ that every page shows.
//!
//! A scan costs the broker about 70 µs of CPU per letter (8 s at 100,000),
//! so no page view ever scans: [`Snapshots`] keeps one [`Snapshot`], taken
//! by one peek ([`crate::dlq::scan`], which never loses, reorders or
//! duplicates a letter), shared by every viewer. A view of a snapshot older
//! than the refresh interval starts a refresh in the background and is
//! answered at once from the snapshot it has; a refresh can also be asked
//! for (the page's button). One refresh at a time, and an automatic one
//! waits at least three times as long as the last scan took, so a large DLQ
//! is never scanned back to back.
//!
//! When the DLQ is busy (another `mmsend dlq` run or console reads it) or
//! the broker fails, the last snapshot stays and the page says why: never
//! half a DLQ. What a snapshot keeps is bounded per letter ([`Letter`]: the
//! summary fields, the `x-mmsend-*` headers and a short masked body preview),
//! plus an index from each group of each [`Dimension`] to its letters, so a
//! group's page is a slice, whatever the DLQ's size.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tokio_util::sync::CancellationToken;

use super::access::Access;
use super::mask;
use crate::broker::headers;
use crate::broker::topology::QueueInfo;
use crate::dlq::{
    self, DeadLetter, Dimension, DlqError, Filter, Flow, Group, LetterKey, Observer, Progress,
    ScanOptions, ScanReport, Stats, StatsBuilder,
};

/// Longest header value kept per letter.
const HEADER_CHARS: usize = 300;

/// One dead letter as the snapshot keeps it: bounded, masked.
#[derive(Debug, Clone)]
pub(crate) struct Letter {
    pub(crate) job_id: Box<str>,
    /// The key's fingerprint, as a number.
    pub(crate) fingerprint: u64,
    pub(crate) reason: Arc<str>,
    pub(crate) class: Option<Arc<str>>,
    pub(crate) code: Option<i64>,
    pub(crate) campaign: Option<Arc<str>>,
    pub(crate) page: Option<Arc<str>>,
    pub(crate) attempts: u32,
    pub(crate) replays: u32,
    pub(crate) dead_at: Option<DateTime<Utc>>,
    pub(crate) error: Option<Arc<str>>,
    /// Every `x-mmsend-*` header, as text.
    pub(crate) headers: Box<[(Arc<str>, Arc<str>)]>,
    /// The masked body preview.
    pub(crate) body: Box<str>,
    pub(crate) body_bytes: u32,
    pub(crate) body_json: bool,
    pub(crate) body_cut: bool,
}

impl Letter {
    /// The key that names this letter to the DLQ library.
    pub(crate) fn key(&self) -> LetterKey {
        LetterKey {
            job_id: self.job_id.to_string(),
            fingerprint: self.fingerprint_hex(),
        }
    }

    pub(crate) fn fingerprint_hex(&self) -> String {
        format!("{:016x}", self.fingerprint)
    }
}

/// Shares repeated strings (reasons, classes, campaigns, errors) between
/// the letters of one snapshot.
#[derive(Default)]
struct Interner(HashSet<Arc<str>>);

impl Interner {
    fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(a) = self.0.get(s) {
            return a.clone();
        }
        let a: Arc<str> = Arc::from(s);
        self.0.insert(a.clone());
        a
    }
}

/// The DLQ as one scan saw it.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    /// 0 = none taken yet; each snapshot has the next number.
    pub(crate) id: u64,
    pub(crate) taken_at: Option<DateTime<Utc>>,
    pub(crate) took: Duration,
    pub(crate) report: Option<ScanReport>,
    pub(crate) stats: Stats,
    /// Every queue of the topology with its depth, read just before the scan.
    pub(crate) queues: Vec<QueueInfo>,
    /// Why `queues` is empty, when the depths could not be read.
    pub(crate) depth_note: Option<String>,
    /// In queue order.
    pub(crate) letters: Vec<Letter>,
    groups: [HashMap<Box<str>, Vec<u32>>; 5],
    by_fingerprint: HashMap<u64, u32>,
}

impl Snapshot {
    /// The letters of one group (indices into [`Snapshot::letters`], in
    /// queue order).
    pub(crate) fn members(&self, dimension: Dimension, key: &str) -> Option<&[u32]> {
        self.groups[dim_index(dimension)]
            .get(key)
            .map(Vec::as_slice)
    }

    /// The counts of one group.
    pub(crate) fn group(&self, dimension: Dimension, key: &str) -> Option<&Group> {
        self.stats.groups(dimension).iter().find(|g| g.key == key)
    }

    /// The letter named by a job id and fingerprint.
    pub(crate) fn letter(&self, job_id: &str, fingerprint: &str) -> Option<&Letter> {
        self.letter_index(job_id, fingerprint)
            .map(|i| &self.letters[i as usize])
    }

    /// Where the letter named by a job id and fingerprint is in
    /// [`Snapshot::letters`].
    pub(crate) fn letter_index(&self, job_id: &str, fingerprint: &str) -> Option<u32> {
        let fp = u64::from_str_radix(fingerprint, 16).ok()?;
        let i = *self.by_fingerprint.get(&fp)?;
        (&*self.letters[i as usize].job_id == job_id).then_some(i)
    }
}

fn dim_index(d: Dimension) -> usize {
    Dimension::ALL
        .iter()
        .position(|x| *x == d)
        .unwrap_or_default()
}

/// Builds a [`Snapshot`] from the letters of one scan.
#[derive(Default)]
struct Builder {
    stats: StatsBuilder,
    letters: Vec<Letter>,
    groups: [HashMap<Box<str>, Vec<u32>>; 5],
    by_fingerprint: HashMap<u64, u32>,
    strings: Interner,
}

impl Builder {
    fn add(&mut self, d: &DeadLetter) {
        self.stats.add(d);
        let index = self.letters.len() as u32;
        for dimension in Dimension::ALL {
            let key = dimension.key_of(d);
            let map = &mut self.groups[dim_index(dimension)];
            match map.get_mut(key.as_ref()) {
                Some(v) => v.push(index),
                None => {
                    map.insert(key.as_ref().into(), vec![index]);
                }
            }
        }
        let key = d.key();
        let fingerprint = u64::from_str_radix(&key.fingerprint, 16).unwrap_or_default();
        self.by_fingerprint.entry(fingerprint).or_insert(index);
        let s = &mut self.strings;
        let mut kept: Vec<(Arc<str>, Arc<str>)> = Vec::new();
        if let Some(table) = d.properties.headers() {
            for (k, v) in table.inner() {
                let name = k.as_str();
                if name.starts_with("x-mmsend-") {
                    let text = headers::as_text(v).unwrap_or_else(|| "(not text)".into());
                    kept.push((s.get(name), s.get(&mask::header_value(&text, HEADER_CHARS))));
                }
            }
        }
        let story = &d.story;
        let body = mask::preview(&d.body);
        // already bounded by the key (DeadLetter::key)
        self.letters.push(Letter {
            job_id: key.job_id.into_boxed_str(),
            fingerprint,
            reason: s.get(&d.reason_label()),
            class: d.class_label().map(|c| s.get(c)),
            code: d.code(),
            campaign: d
                .campaign_str()
                .map(|c| s.get(&mask::header_value(c, HEADER_CHARS))),
            page: d
                .page_str()
                .map(|p| s.get(&mask::header_value(p, HEADER_CHARS))),
            attempts: story.attempt,
            replays: story.replays,
            dead_at: story.dead_at,
            error: story
                .last_error
                .message
                .as_deref()
                .map(|m| s.get(&mask::header_value(m, HEADER_CHARS))),
            headers: kept.into_boxed_slice(),
            body: body.text.into_boxed_str(),
            body_bytes: u32::try_from(body.bytes).unwrap_or(u32::MAX),
            body_json: body.json,
            body_cut: body.cut,
        });
    }

    fn build(
        mut self,
        id: u64,
        report: ScanReport,
        queues: Vec<QueueInfo>,
        took: Duration,
    ) -> Snapshot {
        self.letters.shrink_to_fit();
        for map in &mut self.groups {
            map.values_mut().for_each(Vec::shrink_to_fit);
        }
        Snapshot {
            id,
            taken_at: Some(Utc::now()),
            took,
            report: Some(report),
            stats: self.stats.build(),
            queues,
            depth_note: None,
            letters: self.letters,
            groups: self.groups,
            by_fingerprint: self.by_fingerprint,
        }
    }
}

/// Why the snapshot shown is not a fresh one.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Notice {
    /// Another consumer reads the DLQ: no snapshot could be taken.
    Busy { consumers: u32, at: DateTime<Utc> },
    /// The last refresh failed.
    Failed { message: String, at: DateTime<Utc> },
}

/// What the refresher is doing.
#[derive(Debug, Clone, Default)]
pub(crate) struct Status {
    /// A refresh runs (or waits for the lane) since then.
    pub(crate) refreshing: Option<Instant>,
    /// Its progress, once it reads.
    pub(crate) progress: Option<Progress>,
    pub(crate) notice: Option<Notice>,
    /// An action changed the DLQ after this snapshot was taken.
    pub(crate) stale: bool,
    last_done: Option<Instant>,
    last_took: Duration,
}

/// The shared snapshot and its refresher.
pub(crate) struct Snapshots {
    current: RwLock<Arc<Snapshot>>,
    status: Mutex<Status>,
    next_id: AtomicU64,
    /// Automatic refreshes come at most this often.
    pub(crate) interval: Duration,
    /// Letters a snapshot may hold (and so the scan hold on the broker).
    pub(crate) max_letters: usize,
    /// Stops a scan in progress (at shutdown), returning its letters in order.
    cancel: CancellationToken,
}

impl Snapshots {
    pub(crate) fn new(
        interval: Duration,
        max_letters: usize,
        cancel: CancellationToken,
    ) -> Snapshots {
        Snapshots {
            current: RwLock::new(Arc::new(Snapshot::default())),
            status: Mutex::new(Status::default()),
            next_id: AtomicU64::new(1),
            interval,
            max_letters,
            cancel,
        }
    }

    /// The snapshot every page shows now.
    pub(crate) fn current(&self) -> Arc<Snapshot> {
        self.current
            .read()
            .map(|s| s.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    pub(crate) fn status(&self) -> Status {
        self.lock_status().clone()
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Marks the snapshot as older than the DLQ (an action moved letters).
    pub(crate) fn mark_stale(&self) {
        self.lock_status().stale = true;
    }

    /// Starts a refresh in the background when one is due (`force`: asked
    /// for) and none is running. Returns whether one was started.
    pub(crate) fn refresh(self: &Arc<Self>, access: &Arc<Access>, force: bool) -> bool {
        {
            let mut st = self.lock_status();
            if st.refreshing.is_some() {
                return false;
            }
            let since = st.last_done.map(|t| t.elapsed());
            let due =
                force || st.stale || since.is_none_or(|s| s >= self.interval.max(st.last_took * 3));
            if !due {
                return false;
            }
            st.refreshing = Some(Instant::now());
            st.progress = None;
        }
        let this = self.clone();
        let access = access.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            let result = this.take(&access).await;
            let mut st = this.lock_status();
            st.refreshing = None;
            st.progress = None;
            st.last_done = Some(Instant::now());
            match result {
                Ok(snapshot) => {
                    st.last_took = started.elapsed();
                    st.notice = None;
                    st.stale = false;
                    drop(st);
                    tracing::debug!(letters = snapshot.letters.len(), "console snapshot taken");
                    match this.current.write() {
                        Ok(mut c) => *c = Arc::new(snapshot),
                        Err(e) => *e.into_inner() = Arc::new(snapshot),
                    }
                }
                Err(TakeError::Dlq(DlqError::Busy { consumers, .. })) => {
                    st.notice = Some(Notice::Busy {
                        consumers,
                        at: Utc::now(),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "console snapshot failed; keeping the last one");
                    st.notice = Some(Notice::Failed {
                        message: e.to_string(),
                        at: Utc::now(),
                    });
                }
            }
        });
        true
    }

    /// Takes a snapshot: queue depths, then one peek of the DLQ.
    async fn take(&self, access: &Access) -> Result<Snapshot, TakeError> {
        let _lane = access.lane().await;
        let conn = access.connection().await?;
        // Depths are a courtesy: a topology declared with other tiers has
        // queues this one does not know, which must not hide the DLQ.
        let (queues, depth_note) = match access.topology.show(&conn).await {
            Ok(q) => (q, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        let started = Instant::now();
        let mut watcher = Watcher {
            builder: Builder::default(),
            snapshots: self,
        };
        let options = ScanOptions {
            max_held: Some(self.max_letters),
            ..ScanOptions::peek().with_cancel(self.cancel.clone())
        };
        let report = dlq::scan(
            &conn,
            &access.topology,
            Filter::default(),
            &options,
            &mut watcher,
        )
        .await?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut snapshot = watcher.builder.build(id, report, queues, started.elapsed());
        snapshot.depth_note = depth_note;
        Ok(snapshot)
    }
}

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
enum TakeError {
    #[error(transparent)]
    Dlq(#[from] DlqError),
    #[error("cannot reach RabbitMQ: {0}")]
    Connect(#[from] crate::broker::ConnectError),
}

/// Hears the scan: builds the snapshot and reports progress.
struct Watcher<'a> {
    builder: Builder,
    snapshots: &'a Snapshots,
}

impl Observer for Watcher<'_> {
    fn selected(&mut self, letter: &DeadLetter) -> Flow {
        self.builder.add(letter);
        Flow::Continue
    }

    fn progress(&mut self, progress: &Progress) {
        self.snapshots.lock_status().progress = Some(progress.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::headers::{LastError, Story};
    use lapin::types::FieldTable;
    use lapin::BasicProperties;

    fn dead(id: &str, code: i64, campaign: &str, token: &str) -> DeadLetter {
        let story = Story {
            attempt: 3,
            dead_reason: Some("terminal".into()),
            dead_at: Some("2026-11-24T10:00:00Z".parse().unwrap()),
            last_error: LastError {
                class: Some("mismatch".into()),
                code: Some(100),
                subcode: Some(code),
                message: Some(format!("error {code}")),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut h = FieldTable::default();
        story.write(&mut h);
        let body = serde_json::json!({"v": 1, "job_id": id, "campaign": campaign,
            "page_id": "42", "subscription_token": token});
        DeadLetter::new(
            serde_json::to_vec(&body).unwrap(),
            BasicProperties::default().with_headers(h),
        )
    }

    fn report(n: usize) -> ScanReport {
        ScanReport {
            queue: "q.dead".into(),
            depth_at_start: n as u32,
            read: n,
            selected: n,
            replayed: 0,
            purged: 0,
            failed: 0,
            missing: 0,
            stop: dlq::Stop::Depth,
            seconds: 0.1,
        }
    }

    #[test]
    fn groups_index_their_letters_and_agree_with_the_stats() {
        let letters: Vec<DeadLetter> = (0..30)
            .map(|i| {
                dead(
                    &format!("j{i}"),
                    if i % 3 == 0 { 2300005 } else { 2300018 },
                    if i % 2 == 0 { "a" } else { "b" },
                    &format!("recipient-{i}-{}", "x".repeat(40)),
                )
            })
            .collect();
        let mut b = Builder::default();
        letters.iter().for_each(|d| b.add(d));
        let s = b.build(7, report(30), Vec::new(), Duration::ZERO);
        assert!(s.report.as_ref().is_some_and(ScanReport::counted_all));
        for dimension in Dimension::ALL {
            for g in s.stats.groups(dimension) {
                let members = s.members(dimension, &g.key).unwrap();
                assert_eq!(members.len(), g.count, "{dimension} {}", g.key);
                assert!(members.windows(2).all(|w| w[0] < w[1]), "queue order");
            }
        }
        let code = s.members(Dimension::Code, "2300005").unwrap();
        assert_eq!(code.len(), 10);
        assert!(code
            .iter()
            .all(|&i| s.letters[i as usize].code == Some(2300005)));
        // each letter is found by its key, and its key selects it
        for (d, l) in letters.iter().zip(&s.letters) {
            assert_eq!(l.key(), d.key());
            let found = s.letter(&l.job_id, &l.fingerprint_hex()).unwrap();
            assert_eq!(found.job_id, l.job_id);
            assert!(
                !found.body.contains("xxxxxxxxxxxxxxxxxxxx"),
                "{}",
                found.body
            );
            assert!(found
                .headers
                .iter()
                .any(|(k, v)| &**k == "x-mmsend-error-subcode" && v.starts_with("2300")));
        }
        assert!(s.letter("j1", "zz").is_none());
        assert!(s.letter("other", &s.letters[0].fingerprint_hex()).is_none());
        // repeated strings are shared, not copied per letter
        assert!(Arc::ptr_eq(&s.letters[0].reason, &s.letters[1].reason));
    }
}
