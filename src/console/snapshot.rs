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
//! half a DLQ.
//!
//! What a snapshot keeps is bounded per letter, whatever the letter
//! carries ([`LETTER_BYTES_MAX`], under 6 KiB; about 2.5 KiB of resident memory typically):
//! the summary fields, the headers a page shows (the `x-mmsend-*` headers
//! mmsend writes, [`headers::ALL`], and the entries of RabbitMQ's
//! `x-death`: reason, queue, time, count; any other header is dropped),
//! each value cut at
//! [`VALUE_BYTES`] and all of them at [`HEADERS_BYTES`], and a short masked
//! body preview; plus an index from each group of each [`Dimension`] to
//! its letters, so a group's page is a slice, whatever the DLQ's size.
//! Every text is masked as it enters the snapshot ([`mask`]), so no page
//! can show a token: the groups are counted here from the masked letters
//! (as `dlq stats` counts them), not taken from the DLQ library's stats.
//! (While a scan runs, the letters the broker has sent ahead, up to the
//! scan's consumer window, are in memory whole for a moment; that passes
//! with the scan, the bound is what stays.)

use std::collections::{HashMap, HashSet};
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio_util::sync::CancellationToken;

use super::access::Access;
use super::mask::{self, Masker, BODY_PREVIEW_BYTES, CUT_MARK};
use crate::broker::headers;
use crate::broker::topology::QueueInfo;
use crate::dlq::{
    self, filter::Facets, DeadLetter, Dimension, DlqError, Filter, Flow, Group, LetterKey,
    Observer, Progress, ScanOptions, ScanReport,
};

/// Longest text kept per value (a header, the last error, a group key:
/// reason, class, campaign, page), in bytes, before [`CUT_MARK`].
pub(crate) const VALUE_BYTES: usize = 300;
/// Header value bytes kept per letter in all; past them a header shows
/// only [`CUT_MARK`].
pub(crate) const HEADERS_BYTES: usize = 1024;
/// RabbitMQ's record of how it dead-lettered a message: its entries
/// (reason, queue, time, count) are kept as [`Letter::deaths`].
pub(crate) const X_DEATH: &str = "x-death";
/// `x-death` entries a letter keeps at most (RabbitMQ writes one per queue
/// and reason, newest first).
const DEATHS_MAX: usize = 4;
/// Bytes of one `x-death` text (reason, queue) at most.
const DEATH_TEXT_BYTES: usize = 100;
/// Headers a letter keeps at most: every `x-mmsend-*` header mmsend writes
/// ([`headers::ALL`]), and the `x-death` entries (one more value). Any
/// other header a letter carries is not kept.
const SHOWN_HEADERS: usize = headers::ALL.len() + 1;
/// A job id's bytes at most (the DLQ library's key cuts it at 200
/// characters).
const JOB_ID_BYTES: usize = 200 * 4 + CUT_MARK.len();
/// What the snapshot's indexes hold per letter: its place in five group
/// lists and in the fingerprint map (with the map's slack).
const INDEX_BYTES: usize = 5 * size_of::<u32>() + 44;
/// The count and weak count in front of each shared string.
const ARC_HEADER: usize = 2 * size_of::<usize>();
/// What the allocator adds to each allocation at most (its header and the
/// rounding of sizes to 16 bytes).
const ALLOC_OVERHEAD: usize = 24;

/// What one letter costs a snapshot at most, in bytes, whatever it
/// carries (the record, its strings counted as if none were shared, its
/// share of the indexes); typically under half of it (about 2.5 KiB of
/// resident memory measured at 100,000 letters, docs/src/console.md). `--max-letters` times this bounds a
/// snapshot.
pub(crate) const LETTER_BYTES_MAX: usize = size_of::<Letter>()
    + (JOB_ID_BYTES + ALLOC_OVERHEAD)
    + 6 * (ARC_HEADER + VALUE_BYTES + CUT_MARK.len() + ALLOC_OVERHEAD)
    + ALLOC_OVERHEAD
    + SHOWN_HEADERS
        * (size_of::<(&str, Arc<str>)>() + ARC_HEADER + CUT_MARK.len() + ALLOC_OVERHEAD)
    + HEADERS_BYTES
    + (BODY_PREVIEW_BYTES + ALLOC_OVERHEAD)
    + INDEX_BYTES;

// the bound `--max-letters` and the docs state
const _: () = assert!(LETTER_BYTES_MAX <= 6 * 1024);

/// One dead letter as the snapshot keeps it: bounded, masked.
#[derive(Debug, Clone)]
pub(crate) struct Letter {
    /// As the DLQ library names the letter (not masked: pages show
    /// [`Letter::job_label`]).
    pub(crate) job_id: Box<str>,
    /// The key's fingerprint, as a number.
    pub(crate) fingerprint: u64,
    /// The letter's group keys (masked, bounded, as the groups name them).
    pub(crate) reason: Arc<str>,
    pub(crate) class: Option<Arc<str>>,
    pub(crate) code: Option<i64>,
    pub(crate) campaign: Option<Arc<str>>,
    pub(crate) page: Option<Arc<str>>,
    /// The campaign as campaign control and `--campaign` name it when the
    /// job has no `campaign` label: its `message_id` (masked, bounded).
    pub(crate) message_id: Option<Arc<str>>,
    /// The last failure's error code and subcode, as `--code` matches them.
    pub(crate) error_codes: [Option<i64>; 2],
    pub(crate) attempts: u32,
    pub(crate) replays: u32,
    pub(crate) dead_at: Option<DateTime<Utc>>,
    pub(crate) error: Option<Arc<str>>,
    /// The headers a page shows (see [`SHOWN_HEADERS`]), masked, bounded.
    pub(crate) headers: Box<[(&'static str, Arc<str>)]>,
    /// RabbitMQ's `x-death` entries, masked, bounded, one a line
    /// (`reason\tqueue\ttime\tcount`; read with [`Letter::deaths`]); its
    /// bytes count in [`HEADERS_BYTES`].
    pub(crate) x_death: Option<Box<str>>,
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

    /// The job id as pages show it (and link it).
    pub(crate) fn job_label(&self) -> std::borrow::Cow<'_, str> {
        job_label_of(&self.job_id)
    }

    /// RabbitMQ's `x-death` entries, as it wrote them (newest first).
    pub(crate) fn deaths(&self) -> Vec<Death> {
        self.x_death
            .as_deref()
            .unwrap_or_default()
            .lines()
            .map(|line| {
                let mut f = line.split('\t');
                let mut next = || f.next().unwrap_or_default();
                let (reason, queue, time, count) = (next(), next(), next(), next());
                Death {
                    reason: reason.to_string(),
                    queue: queue.to_string(),
                    time: time
                        .parse()
                        .ok()
                        .and_then(|t| DateTime::from_timestamp(t, 0)),
                    count: count.parse().unwrap_or(1),
                }
            })
            .collect()
    }

    /// What this letter costs the snapshot at most, in bytes: its record,
    /// its allocations (each string counted whole, though a string shared
    /// with other letters is stored once) and its share of the indexes.
    pub(crate) fn bytes(&self) -> usize {
        let alloc = |n: usize| if n == 0 { 0 } else { n + ALLOC_OVERHEAD };
        let shared = |s: &str| alloc(ARC_HEADER + s.len());
        let maybe = |s: &Option<Arc<str>>| s.as_deref().map_or(0, shared);
        size_of::<Letter>()
            + alloc(self.job_id.len())
            + shared(&self.reason)
            + maybe(&self.class)
            + maybe(&self.campaign)
            + maybe(&self.page)
            + maybe(&self.message_id)
            + maybe(&self.error)
            + alloc(self.headers.len() * size_of::<(&str, Arc<str>)>())
            + self.headers.iter().map(|(_, v)| shared(v)).sum::<usize>()
            + self.x_death.as_deref().map_or(0, |d| alloc(d.len()))
            + alloc(self.body.len())
            + INDEX_BYTES
    }
}

/// A letter key's job id as pages show it (and a filter matches it).
pub(crate) fn job_label_of(job_id: &str) -> std::borrow::Cow<'_, str> {
    mask::shown(job_id, JOB_ID_BYTES)
}

/// The snapshot is filtered as the CLI filters the DLQ (`dlq stats
/// --campaign … --code …` and the console's `/letters?campaign=…&code=…`
/// count the same letters), on the values as the snapshot keeps them.
impl Facets for Letter {
    fn reason_facet(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(&self.reason)
    }
    fn class_facet(&self) -> Option<&str> {
        self.class.as_deref()
    }
    fn has_code_facet(&self, code: i64) -> bool {
        self.error_codes.contains(&Some(code))
    }
    fn campaign_facet(&self) -> Option<&str> {
        self.campaign.as_deref().or(self.message_id.as_deref())
    }
    fn page_facet(&self) -> Option<&str> {
        self.page.as_deref()
    }
    /// As pages show it: a console filter's job id is taken the same way.
    fn job_id_facet(&self) -> Option<std::borrow::Cow<'_, str>> {
        (!self.job_id.is_empty()).then(|| self.job_label())
    }
    fn died_at_facet(&self) -> Option<DateTime<Utc>> {
        self.dead_at
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
    /// Every queue of the topology with its depth, read just before the scan.
    pub(crate) queues: Vec<QueueInfo>,
    /// Why `queues` is empty, when the depths could not be read.
    pub(crate) depth_note: Option<String>,
    /// In queue order.
    pub(crate) letters: Vec<Letter>,
    /// Each dimension's groups, largest first, as `dlq stats` counts them
    /// (keys and errors masked).
    groups: [Vec<Group>; 5],
    /// Each dimension's group key → its letters.
    members: [HashMap<Arc<str>, Vec<u32>>; 5],
    by_fingerprint: HashMap<u64, u32>,
    /// The overview's counts over every letter, counted once (by the
    /// refresh that took the snapshot, so no view waits for them).
    facts: std::sync::OnceLock<super::views::OverviewFacts>,
}

impl Snapshot {
    /// The overview's counts (see [`super::views::OverviewFacts`]).
    pub(crate) fn facts(&self) -> &super::views::OverviewFacts {
        self.facts
            .get_or_init(|| super::views::OverviewFacts::new(self))
    }

    /// The groups of a dimension, largest first.
    pub(crate) fn groups(&self, dimension: Dimension) -> &[Group] {
        &self.groups[dim_index(dimension)]
    }

    /// The letters of one group (indices into [`Snapshot::letters`], in
    /// queue order).
    pub(crate) fn members(&self, dimension: Dimension, key: &str) -> Option<&[u32]> {
        self.members[dim_index(dimension)]
            .get(key)
            .map(Vec::as_slice)
    }

    /// The counts of one group.
    pub(crate) fn group(&self, dimension: Dimension, key: &str) -> Option<&Group> {
        self.groups(dimension).iter().find(|g| g.key == key)
    }

    /// The letter named by a job id (as stored or as shown) and fingerprint.
    pub(crate) fn letter(&self, job_id: &str, fingerprint: &str) -> Option<&Letter> {
        self.letter_index(job_id, fingerprint)
            .map(|i| &self.letters[i as usize])
    }

    /// Where the letter named by a job id (as stored or as shown) and
    /// fingerprint is in [`Snapshot::letters`].
    pub(crate) fn letter_index(&self, job_id: &str, fingerprint: &str) -> Option<u32> {
        let fp = u64::from_str_radix(fingerprint, 16).ok()?;
        let i = *self.by_fingerprint.get(&fp)?;
        let l = &self.letters[i as usize];
        (&*l.job_id == job_id || l.job_label() == job_id).then_some(i)
    }

    /// What the snapshot's letters cost at most, in bytes
    /// ([`Letter::bytes`]).
    pub(crate) fn bytes(&self) -> usize {
        self.letters.iter().map(Letter::bytes).sum()
    }
}

fn dim_index(d: Dimension) -> usize {
    Dimension::ALL
        .iter()
        .position(|x| *x == d)
        .unwrap_or_default()
}

/// One entry of RabbitMQ's `x-death`: why and from where the broker
/// dead-lettered the message, when it did it first, and how often.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Death {
    pub(crate) reason: String,
    pub(crate) queue: String,
    pub(crate) time: Option<DateTime<Utc>>,
    pub(crate) count: i64,
}

/// RabbitMQ's `x-death` as [`Letter::x_death`] keeps it: at most
/// [`DEATHS_MAX`] entries, one a line, texts masked and cut at
/// [`DEATH_TEXT_BYTES`], at most `max_bytes` in all (whole entries only).
fn deaths_of(table: &FieldTable, masker: &Masker, max_bytes: usize) -> Option<String> {
    let AMQPValue::FieldArray(entries) = table.inner().get(&ShortString::from(X_DEATH))? else {
        return None;
    };
    let text = |t: &FieldTable, k: &str| {
        let v = t
            .inner()
            .get(&ShortString::from(k))
            .and_then(headers::as_text)
            .unwrap_or_else(|| "?".into());
        masker
            .text(&v, DEATH_TEXT_BYTES)
            .replace(['\t', '\n', '\r'], " ")
    };
    let mut out = String::new();
    for t in entries
        .as_slice()
        .iter()
        .filter_map(|e| match e {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        })
        .take(DEATHS_MAX)
    {
        let int = |k: &str| {
            t.inner()
                .get(&ShortString::from(k))
                .and_then(headers::as_int)
        };
        let line = format!(
            "{}\t{}\t{}\t{}\n",
            text(t, "reason"),
            text(t, "queue"),
            int("time").map_or(String::new(), |n| n.to_string()),
            int("count").unwrap_or(1)
        );
        if out.len() + line.len() > max_bytes {
            break;
        }
        out.push_str(&line);
    }
    (!out.is_empty()).then_some(out)
}

/// One group of a dimension, counted from its letters as `dlq stats`
/// counts it (the latest error is that of the letter that died last, the
/// later one of a tie).
fn count_group(key: &str, members: &[u32], letters: &[Letter]) -> Group {
    let mut g = Group {
        key: key.to_string(),
        count: members.len(),
        oldest: None,
        newest: None,
        latest_error: None,
    };
    let mut latest: Option<&Arc<str>> = None;
    for l in members.iter().map(|&i| &letters[i as usize]) {
        match l.dead_at {
            Some(t) => {
                g.oldest = Some(g.oldest.map_or(t, |o| o.min(t)));
                if g.newest.is_none_or(|n| t >= n) {
                    g.newest = Some(t);
                    latest = l.error.as_ref();
                }
            }
            None if latest.is_none() => latest = l.error.as_ref(),
            None => {}
        }
    }
    g.latest_error = latest.map(|e| e.to_string());
    g
}

/// Builds a [`Snapshot`] from the letters of one scan.
#[derive(Default)]
struct Builder {
    letters: Vec<Letter>,
    members: [HashMap<Arc<str>, Vec<u32>>; 5],
    by_fingerprint: HashMap<u64, u32>,
    strings: Interner,
}

impl Builder {
    fn add(&mut self, d: &DeadLetter) {
        let index = self.letters.len() as u32;
        let s = &mut self.strings;
        // the same masked, bounded key names the group and the letter's
        // link to it
        let keys = Dimension::ALL.map(|dim| s.get(&mask::shown(&dim.key_of(d), VALUE_BYTES)));
        for (map, key) in self.members.iter_mut().zip(&keys) {
            match map.get_mut(key) {
                Some(v) => v.push(index),
                None => {
                    map.insert(key.clone(), vec![index]);
                }
            }
        }
        let [reason, class, _, campaign, page] = keys;
        let key = d.key();
        let fingerprint = u64::from_str_radix(&key.fingerprint, 16).unwrap_or_default();
        self.by_fingerprint.entry(fingerprint).or_insert(index);
        let body = mask::preview(&d.body);
        let masker = Masker::new(body.secrets);
        let mut kept: Vec<(&'static str, Arc<str>)> = Vec::new();
        let mut x_death = None;
        if let Some(table) = d.properties.headers() {
            let mut budget = HEADERS_BYTES;
            let mut keep = |name: &'static str, value: &str| {
                let shown = masker.text(value, VALUE_BYTES.min(budget));
                budget = budget.saturating_sub(shown.len());
                kept.push((name, s.get(&shown)));
            };
            for name in headers::ALL {
                if let Some(v) = table.inner().get(&ShortString::from(name)) {
                    keep(
                        name,
                        &headers::as_text(v).unwrap_or_else(|| "(not text)".into()),
                    );
                }
            }
            x_death = deaths_of(table, &masker, (2 * VALUE_BYTES).min(budget));
        }
        let story = &d.story;
        // the job id is already bounded by the key (DeadLetter::key)
        self.letters.push(Letter {
            job_id: key.job_id.into_boxed_str(),
            fingerprint,
            reason,
            class: d.class_label().map(|_| class),
            code: d.code(),
            campaign: d.campaign_str().map(|_| campaign),
            page: d.page_str().map(|_| page),
            message_id: match d.campaign_str() {
                Some(_) => None,
                None => d
                    .campaign_name()
                    .map(|m| s.get(&mask::shown(m, VALUE_BYTES))),
            },
            error_codes: [story.last_error.code, story.last_error.subcode],
            attempts: story.attempt,
            replays: story.replays,
            dead_at: d.died_at(),
            error: story
                .last_error
                .message
                .as_deref()
                .map(|m| s.get(&masker.text(m, VALUE_BYTES))),
            headers: kept.into_boxed_slice(),
            x_death: x_death.map(String::into_boxed_str),
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
        for map in &mut self.members {
            map.values_mut().for_each(Vec::shrink_to_fit);
        }
        let letters = self.letters;
        let groups = self.members.each_ref().map(|map| {
            let mut v: Vec<Group> = map
                .iter()
                .map(|(key, members)| count_group(key, members, &letters))
                .collect();
            v.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.key.cmp(&b.key)));
            v
        });
        Snapshot {
            id,
            taken_at: Some(Utc::now()),
            took,
            report: Some(report),
            queues,
            depth_note: None,
            letters,
            groups,
            members: self.members,
            by_fingerprint: self.by_fingerprint,
            facts: std::sync::OnceLock::new(),
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
            if let Ok(snapshot) = &result {
                // counted here, before any view asks
                snapshot.facts();
            }
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
                    tracing::debug!(
                        letters = snapshot.letters.len(),
                        bytes_at_most = snapshot.bytes(),
                        "console snapshot taken"
                    );
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
    use crate::dlq::StatsBuilder;
    use lapin::types::{FieldArray, LongString};
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
        // the groups are `dlq stats`'s (nothing here needs masking)
        let mut stats = StatsBuilder::default();
        letters.iter().for_each(|d| stats.add(d));
        let stats = stats.build();
        for dimension in Dimension::ALL {
            assert_eq!(s.groups(dimension), stats.groups(dimension), "{dimension}");
            for g in s.groups(dimension) {
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

    /// A letter as a careless or hostile producer could leave one.
    fn heavy(extra_headers: usize, value_bytes: usize) -> DeadLetter {
        let mut d = dead(
            "heavy",
            2300005,
            "c",
            &format!("recipient-{}", "r".repeat(40)),
        );
        let mut h = d.properties.headers().clone().unwrap_or_default();
        for i in 0..extra_headers {
            h.insert(
                format!("x-mmsend-extra-{i:03}").into(),
                AMQPValue::LongString(LongString::from("v".repeat(value_bytes))),
            );
        }
        // every header mmsend writes, at its longest
        for name in headers::ALL {
            h.insert(
                name.into(),
                AMQPValue::LongString(LongString::from("é".repeat(value_bytes))),
            );
        }
        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        death.insert(
            "queue".into(),
            AMQPValue::LongString("q".repeat(value_bytes).into()),
        );
        h.insert(
            X_DEATH.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death); 50])),
        );
        d.properties = d.properties.with_headers(h);
        d
    }

    #[test]
    fn a_letter_costs_no_more_than_its_bound_whatever_its_headers() {
        // the review's letter: 300 headers of 1 KiB each
        let mut b = Builder::default();
        b.add(&heavy(300, 1024));
        let s = b.build(1, report(1), Vec::new(), Duration::ZERO);
        let l = &s.letters[0];
        assert!(
            l.bytes() <= LETTER_BYTES_MAX,
            "{} bytes > {LETTER_BYTES_MAX}",
            l.bytes()
        );
        assert_eq!(s.bytes(), l.bytes());
        // only the headers a page shows, each cut with a mark
        assert_eq!(l.headers.len(), headers::ALL.len(), "{:?}", l.headers);
        assert!(l.headers.iter().all(|(k, _)| !k.contains("extra")));
        let attempt = &l
            .headers
            .iter()
            .find(|(k, _)| *k == headers::ATTEMPT)
            .unwrap()
            .1;
        assert!(attempt.len() <= VALUE_BYTES + CUT_MARK.len() && attempt.ends_with(CUT_MARK));
        let values: usize = l.headers.iter().map(|(_, v)| v.len()).sum::<usize>()
            + l.x_death.as_deref().map_or(0, str::len);
        assert!(
            values <= HEADERS_BYTES + SHOWN_HEADERS * CUT_MARK.len(),
            "{values}"
        );
        // a plain letter costs far less
        let mut b = Builder::default();
        b.add(&dead(
            "plain",
            2300005,
            "c",
            "recipient-token-xxxxxxxxxxxxxxxxxxxx",
        ));
        let s = b.build(1, report(1), Vec::new(), Duration::ZERO);
        assert!(s.letters[0].bytes() < 2 * 1024, "{}", s.letters[0].bytes());
    }

    #[test]
    fn x_death_entries_are_kept_bounded_and_give_the_time_of_death() {
        // as RabbitMQ writes it for a quorum queue's delivery limit: no
        // x-mmsend-* story at all
        let entry = |reason: &str, queue: &str, count: i64, time: u64| {
            let mut t = FieldTable::default();
            t.insert("reason".into(), AMQPValue::LongString(reason.into()));
            t.insert("queue".into(), AMQPValue::LongString(queue.into()));
            t.insert("count".into(), AMQPValue::LongLongInt(count));
            t.insert("time".into(), AMQPValue::Timestamp(time));
            t.insert("exchange".into(), AMQPValue::LongString("".into()));
            AMQPValue::FieldTable(t)
        };
        let mut h = FieldTable::default();
        h.insert(
            X_DEATH.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                entry("delivery_limit", "p.send", 2, 1_796_000_000),
                entry("expired", "p.retry.5s", 1, 1_795_990_000),
            ])),
        );
        let d = DeadLetter::new(
            br#"{"v":1,"job_id":"j"}"#.to_vec(),
            BasicProperties::default().with_headers(h.clone()),
        );
        let mut b = Builder::default();
        b.add(&d);
        let s = b.build(1, report(1), Vec::new(), Duration::ZERO);
        let l = &s.letters[0];
        let at = |t| DateTime::from_timestamp(t, 0);
        assert_eq!(
            l.deaths(),
            vec![
                Death {
                    reason: "delivery_limit".into(),
                    queue: "p.send".into(),
                    time: at(1_796_000_000),
                    count: 2
                },
                Death {
                    reason: "expired".into(),
                    queue: "p.retry.5s".into(),
                    time: at(1_795_990_000),
                    count: 1
                },
            ]
        );
        assert_eq!(&*l.reason, "delivery_limit");
        assert_eq!(l.dead_at, at(1_796_000_000), "the broker's time of death");
        // many long entries: whole entries only, within the bound
        let long = "q".repeat(400);
        h.insert(
            X_DEATH.into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                entry("delivery_limit", &long, 1, 1);
                50
            ])),
        );
        let d = DeadLetter::new(Vec::new(), BasicProperties::default().with_headers(h));
        let mut b = Builder::default();
        b.add(&d);
        let s = b.build(1, report(1), Vec::new(), Duration::ZERO);
        let l = &s.letters[0];
        let deaths = l.deaths();
        assert!((1..=DEATHS_MAX).contains(&deaths.len()), "{deaths:?}");
        assert!(deaths
            .iter()
            .all(|d| d.queue.len() <= DEATH_TEXT_BYTES + CUT_MARK.len()));
        assert!(l.bytes() <= LETTER_BYTES_MAX);
    }

    #[test]
    fn tokens_in_errors_and_keys_are_masked_before_a_page_sees_them() {
        const ACCESS: &str = "EAAGm0PX4ZCpsBAFAKEfakeFAKEfake0123456789";
        let recipient = format!("recipient-7-{}", "q".repeat(32));
        let mut d = dead("j7", 2300005, ACCESS, &recipient);
        let mut h = d.properties.headers().clone().unwrap_or_default();
        let message = format!("Malformed access token {ACCESS} for {recipient}");
        h.insert(
            headers::ERROR_MESSAGE.into(),
            AMQPValue::LongString(message.as_str().into()),
        );
        h.insert(headers::WORKER.into(), AMQPValue::LongString(ACCESS.into()));
        d.properties = d.properties.with_headers(h.clone());
        d.story = headers::Story::read(Some(&h));
        let mut b = Builder::default();
        b.add(&d);
        b.add(&dead(
            "j8",
            2300018,
            "plain",
            "recipient-8-xxxxxxxxxxxxxxxxxxxxxxxxxxxx",
        ));
        let s = b.build(1, report(2), Vec::new(), Duration::ZERO);
        let l = &s.letters[0];
        let mut texts: Vec<String> = vec![l.error.as_deref().unwrap_or_default().into()];
        texts.extend(l.headers.iter().map(|(_, v)| v.to_string()));
        texts.extend(l.campaign.as_deref().map(str::to_owned));
        for d in Dimension::ALL {
            for g in s.groups(d) {
                texts.push(g.key.clone());
                texts.extend(g.latest_error.clone());
            }
        }
        for t in &texts {
            assert!(!t.contains(ACCESS) && !t.contains(&recipient), "{t}");
        }
        let error = l.error.as_deref().unwrap();
        assert!(
            error.starts_with("Malformed access token EAAG•••(41 chars) for reci•••("),
            "{error}"
        );
        let by_code = s.group(Dimension::Code, "2300005").unwrap();
        assert_eq!(by_code.latest_error.as_deref(), Some(error));
        // the campaign's group is named by the masked key, and the letter
        // links to it by the same
        let campaign = l.campaign.as_deref().unwrap();
        assert_eq!(campaign, mask::text(ACCESS, VALUE_BYTES));
        assert_eq!(s.members(Dimension::Campaign, campaign), Some(&[0u32][..]));
    }
}
