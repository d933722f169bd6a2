//! The pages of a filter: `/letters?…` (the matching letters, their count,
//! their breakdown and per-hour chart, and the actions on exactly them),
//! `/letters.jsonl?…` (the same set as JSON lines), `/letter?job=` without a
//! fingerprint (find a letter by its job id), and `/status.json`, which
//! every page polls to show live queue depths and to reload its content in
//! place when a new snapshot lands.
//!
//! The download holds what the snapshot keeps of each letter (masked,
//! bounded: the summary, the shown headers and the body's preview), never
//! a token; the page prints the `mmsend dlq export` command that writes the
//! same letters whole, to re-enqueue or archive them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use askama::Template;
use axum::extract::{Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};
use axum::Extension;
use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use serde::Deserialize;

use super::access::Access;
use super::auth::Identity;
use super::routes::{live_chrome, message, page, viewed};
use super::select::{
    breakdown, Chart, FilterQuery, Selected, BAR_WIDTH, CHART_HEIGHT, CHART_HOURS,
};
use super::snapshot::Snapshot;
use super::views::{self, count, Chrome, LetterRow, Pager, SetActions};
use super::Shared;
use crate::broker::topology::QueueInfo;
use crate::classify::{Class, DeadReason};
use crate::dlq::Dimension;

/// One choice of a filter bar's list.
pub(crate) struct Choice {
    pub(crate) value: &'static str,
    pub(crate) selected: bool,
}

/// The filter bar: every filter field, filled as the page's query gave it.
pub(crate) struct FilterBar {
    pub(crate) q: FilterQuery,
    pub(crate) reasons: Vec<Choice>,
    pub(crate) classes: Vec<Choice>,
}

impl FilterBar {
    pub(crate) fn new(q: &FilterQuery) -> FilterBar {
        let choices = |all: &[&'static str], current: &str| {
            all.iter()
                .map(|&value| Choice {
                    value,
                    selected: value == current.trim(),
                })
                .collect()
        };
        let reasons: Vec<&'static str> = DeadReason::ALL.iter().map(|r| r.as_str()).collect();
        let classes: Vec<&'static str> = Class::ALL.iter().map(|c| c.as_str()).collect();
        // what was typed, as pages show it
        let shown = |v: &str| super::mask::shown(v, super::snapshot::VALUE_BYTES).into_owned();
        let q = FilterQuery {
            reason: shown(&q.reason),
            class: shown(&q.class),
            code: shown(&q.code),
            campaign: shown(&q.campaign),
            page: shown(&q.page),
            since: shown(&q.since),
            until: shown(&q.until),
            job_id: shown(&q.job_id),
        };
        FilterBar {
            reasons: choices(&reasons, &q.reason),
            classes: choices(&classes, &q.class),
            q,
        }
    }
}

/// The per-hour chart as the template draws it.
#[derive(Clone, Debug)]
pub(crate) struct ChartView {
    pub(crate) chart: Chart,
    pub(crate) width: usize,
    pub(crate) height: usize,
    pub(crate) bar_width: usize,
}

impl ChartView {
    pub(crate) fn new(s: &Snapshot, members: &[u32], sel: &Selected) -> ChartView {
        let now = s.taken_at.unwrap_or_else(Utc::now);
        ChartView {
            chart: Chart::new(&s.letters, members, now, sel),
            width: CHART_HOURS * BAR_WIDTH,
            height: CHART_HEIGHT,
            bar_width: BAR_WIDTH - 2,
        }
    }
}

/// A breakdown of a set by one dimension: (key, count, link to the set
/// narrowed to it).
#[derive(Clone, Debug)]
pub(crate) struct Breakdown {
    pub(crate) name: &'static str,
    pub(crate) rows: Vec<(String, String, String)>,
}

/// The breakdowns of a set by each of `dims`, each entry linking to the
/// set narrowed to it.
pub(crate) fn breakdowns(
    s: &Snapshot,
    members: &[u32],
    sel: &Selected,
    dims: &[Dimension],
) -> Vec<Breakdown> {
    dims.iter()
        .map(|&d| Breakdown {
            name: d.as_str(),
            rows: breakdown(s, members, d)
                .into_iter()
                .map(|(key, n)| {
                    // a parameter already set is not narrowed by replacing
                    // it (`code` matches code or subcode, groups count by
                    // one of them): no link then
                    let href =
                        if n.is_empty() || key == crate::dlq::stats::NONE || sel.has(d.as_str()) {
                            String::new()
                        } else {
                            sel.with(d.as_str(), &key).href()
                        };
                    (key, n, href)
                })
                .collect(),
        })
        .collect()
}

#[derive(Template)]
#[template(path = "letters.html", config = "src/console/askama.toml")]
pub(crate) struct LettersPage {
    pub(crate) chrome: Chrome,
    pub(crate) bar: FilterBar,
    pub(crate) describe: String,
    pub(crate) total: String,
    pub(crate) total_n: usize,
    pub(crate) chart: ChartView,
    pub(crate) breakdowns: Vec<Breakdown>,
    pub(crate) rows: Vec<LetterRow>,
    pub(crate) pager: Pager,
    pub(crate) actions: SetActions,
    /// `code` is one of the parameters (it matches code or subcode).
    pub(crate) code_note: bool,
    pub(crate) download: String,
    /// The same selection on the command line.
    pub(crate) cli: String,
}

impl LettersPage {
    fn new(chrome: Chrome, s: &Snapshot, q: &FilterQuery, sel: &Selected, p: usize) -> LettersPage {
        let members = sel.members(s);
        let (pager, range) = Pager::new(p, members.len(), "letters", |n| {
            format!("/letters{}", sel.query(&[("p", &n.to_string())]))
        });
        let confirm = |kind: &str| format!("/confirm{}", sel.query(&[("kind", kind)]));
        let flags = sel.flags();
        LettersPage {
            chrome,
            bar: FilterBar::new(q),
            describe: sel.describe(),
            total: count(members.len()),
            total_n: members.len(),
            chart: ChartView::new(s, &members, sel),
            breakdowns: breakdowns(
                s,
                &members,
                sel,
                &[Dimension::Campaign, Dimension::Code, Dimension::Reason],
            ),
            rows: members[range]
                .iter()
                .map(|&i| LetterRow::new(&s.letters[i as usize]))
                .collect(),
            pager,
            actions: SetActions {
                replay: confirm("replay"),
                purge: confirm("purge"),
            },
            code_note: sel.has("code"),
            download: format!("/letters.jsonl{}", sel.query(&[])),
            cli: if flags.is_empty() {
                "mmsend dlq stats".into()
            } else {
                format!("mmsend dlq stats {flags}")
            },
        }
    }
}

/// `/letters`' query: the filter and the page number `p`.
#[derive(Deserialize)]
pub(crate) struct LettersQuery {
    #[serde(flatten)]
    filter: FilterQuery,
    #[serde(default)]
    p: String,
}

/// The filter of a query, or the page that says what is wrong with it.
pub(crate) fn selected(
    st: &Shared,
    id: &Identity,
    q: &FilterQuery,
) -> Result<Selected, Box<Response>> {
    q.parse(Utc::now()).map_err(|e| {
        Box::new(message(
            st,
            id,
            StatusCode::BAD_REQUEST,
            "Bad filter",
            // it quotes what was typed
            super::mask::text(&format!("{e}."), 1_000),
            Some(("/letters".into(), "All letters".into())),
        ))
    })
}

pub(crate) async fn list(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<LettersQuery>,
) -> Response {
    let sel = match selected(&st, &id, &q.filter) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    viewed(&st);
    let title = format!("Letters: {}", sel.describe());
    let c = live_chrome(&st, &id, title, &sel.href()).await;
    let s = st.snapshots.current();
    let p = q.p.parse().unwrap_or(1);
    page(StatusCode::OK, &LettersPage::new(c, &s, &q.filter, &sel, p))
}

/// One letter of the download.
#[derive(serde::Serialize)]
struct Line<'a> {
    job_id: &'a str,
    fingerprint: String,
    reason: &'a str,
    class: Option<&'a str>,
    code: Option<i64>,
    campaign: Option<&'a str>,
    page_id: Option<&'a str>,
    attempts: u32,
    replays: u32,
    dead_at: Option<String>,
    error: Option<&'a str>,
    headers: std::collections::BTreeMap<&'a str, &'a str>,
    body_preview: &'a str,
    body_bytes: u32,
    body_cut: bool,
}

pub(crate) async fn download(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<FilterQuery>,
) -> Response {
    let sel = match selected(&st, &id, &q) {
        Ok(s) => s,
        Err(r) => return *r,
    };
    let s = st.snapshots.current();
    let members = sel.members(&s);
    let snapshot = s.clone();
    // streamed a thousand lines at a time: a download of the whole DLQ
    // holds one chunk, not the whole file
    let chunks = members.len().div_ceil(DOWNLOAD_CHUNK);
    let body = futures_util::stream::iter(0..chunks).map(move |c| {
        let end = ((c + 1) * DOWNLOAD_CHUNK).min(members.len());
        let mut out = Vec::new();
        for &i in &members[c * DOWNLOAD_CHUNK..end] {
            write_line(&mut out, &snapshot.letters[i as usize]);
        }
        Ok::<_, std::convert::Infallible>(axum::body::Bytes::from(out))
    });
    let name = format!(
        "mmsend-dead-letters-{}.jsonl",
        s.taken_at
            .map_or_else(|| "none".into(), |t| t.format("%Y%m%dT%H%M%SZ").to_string())
    );
    (
        [
            (
                header::CONTENT_TYPE,
                "application/x-ndjson; charset=utf-8".to_string(),
            ),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ),
        ],
        axum::body::Body::from_stream(body),
    )
        .into_response()
}

/// Letters per chunk of a download.
const DOWNLOAD_CHUNK: usize = 1000;

/// One letter of a download, as a JSON line.
fn write_line(out: &mut Vec<u8>, l: &super::snapshot::Letter) {
    let label = l.job_label();
    let line = Line {
        job_id: &label,
        fingerprint: l.fingerprint_hex(),
        reason: &l.reason,
        class: l.class.as_deref(),
        code: l.code,
        campaign: l.campaign.as_deref(),
        page_id: l.page.as_deref(),
        attempts: l.attempts,
        replays: l.replays,
        dead_at: l.dead_at.map(|t| t.to_rfc3339()),
        error: l.error.as_deref(),
        headers: l.headers.iter().map(|(k, v)| (*k, &**v)).collect(),
        body_preview: &l.body,
        body_bytes: l.body_bytes,
        body_cut: l.body_cut,
    };
    if serde_json::to_writer(&mut *out, &line).is_ok() {
        out.push(b'\n');
    }
}

/// `/letter?job=` without `fp`: the one letter of that job, the list of
/// its letters when it has several, or a page that says where else to look.
pub(crate) fn find_job(st: &Shared, id: &Identity, job: &str) -> Response {
    let s = st.snapshots.current();
    let job = job.trim();
    // the id as given; else as pages show it (masked), which costs more
    let key = crate::dlq::letter::key_job_id(job);
    let mut found: Vec<&super::snapshot::Letter> =
        s.letters.iter().filter(|l| *l.job_id == *key).collect();
    if found.is_empty() {
        found = s.letters.iter().filter(|l| l.job_label() == job).collect();
    }
    match found.as_slice() {
        [one] => Redirect::to(&views::letter_href(one)).into_response(),
        [] => message(
            st,
            id,
            StatusCode::NOT_FOUND,
            "No such letter",
            format!(
                "The snapshot of {} UTC has no letter of job {:?} (replayed or purged since, or never dead?). Its ledger record and delivery history may say more.",
                views::time(s.taken_at),
                super::mask::text(job, 300)
            ),
            Some((
                format!("/job{}", views::query(&[("id", &super::mask::text(job, 300))])),
                format!("Job {}", super::mask::text(job, 300)),
            )),
        ),
        // (the list takes the id as pages show it: no token in a header)
        _ => Redirect::to(&format!(
            "/letters{}",
            views::query(&[("job_id", &super::mask::shown(job, super::snapshot::VALUE_BYTES))])
        ))
        .into_response(),
    }
}

/// A reading of the queue depths: when, and what RabbitMQ said.
type Reading = (Instant, DateTime<Utc>, Depth);
/// What a reading read: every queue's depth, or why not.
type Depth = Result<Vec<QueueInfo>, String>;

/// Queue depths read from the broker, shared by every view for a moment.
pub(crate) struct Depths {
    last: Mutex<Option<Reading>>,
    /// Held by the one reading under way.
    reading: Arc<tokio::sync::Mutex<()>>,
}

/// How long a reading of the depths serves every view.
const DEPTHS_FRESH: Duration = Duration::from_secs(1);
/// How long a reading may serve a view while a new one is taken in the
/// background (pages poll every 3 s, so an open page never waits; the
/// first view after a quiet spell waits for a new reading).
const DEPTHS_SERVE: Duration = Duration::from_secs(5);
/// How long a view waits for the broker's depths before it shows the
/// snapshot's.
const DEPTHS_WAIT: Duration = Duration::from_secs(2);

impl Depths {
    pub(crate) fn new() -> Depths {
        Depths {
            last: Mutex::new(None),
            reading: Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    fn within(&self, age: Duration) -> Option<(DateTime<Utc>, Depth)> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        last.as_ref()
            .filter(|(at, ..)| at.elapsed() < age)
            .map(|(_, when, d)| (*when, d.clone()))
    }

    /// The depths now: a reading of the last second; else one of the last
    /// [`DEPTHS_SERVE`] while a new one is taken in the background; else a
    /// new one (one reading at a time).
    /// Returns when the reading was taken, and what it read.
    pub(crate) async fn read(self: &Arc<Self>, access: &Arc<Access>) -> (DateTime<Utc>, Depth) {
        if let Some(d) = self.within(DEPTHS_FRESH) {
            return d;
        }
        if let Some(d) = self.within(DEPTHS_SERVE) {
            if let Ok(one) = self.reading.clone().try_lock_owned() {
                let (this, access) = (self.clone(), access.clone());
                tokio::spawn(async move {
                    // kept for the next views, a failure too
                    let _ = this.take(&access).await;
                    drop(one);
                });
            }
            return d;
        }
        let _one = self.reading.lock().await;
        if let Some(d) = self.within(DEPTHS_FRESH) {
            return d;
        }
        self.take(access).await
    }

    /// Reads the depths from the broker and keeps the reading.
    async fn take(&self, access: &Access) -> (DateTime<Utc>, Depth) {
        let when = Utc::now();
        let read = async {
            let conn = access.connection().await.map_err(|e| e.to_string())?;
            access.topology.show(&conn).await.map_err(|e| e.to_string())
        };
        let d = match tokio::time::timeout(DEPTHS_WAIT, read).await {
            Ok(d) => d,
            Err(_) => Err(format!(
                "RabbitMQ did not answer within {} s",
                DEPTHS_WAIT.as_secs()
            )),
        };
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((Instant::now(), when, d.clone()));
        (when, d)
    }

    /// The last reading, when it is recent enough to be called live.
    pub(crate) fn recent(&self) -> Option<(Duration, Vec<QueueInfo>)> {
        let last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        match last.as_ref() {
            Some((at, _, Ok(d))) if at.elapsed() < Duration::from_secs(10) => {
                Some((at.elapsed(), d.clone()))
            }
            _ => None,
        }
    }
}

/// Reads the live depths for the page about to be built; when the DLQ
/// holds another number of letters than the snapshot, a refresh is asked
/// for (taken when `--refresh` allows: every view of a page and every poll
/// of an open page asks), and the page updates itself when it lands.
pub(crate) async fn live_depths(st: &Shared) {
    if let (when, Ok(queues)) = st.depths.read(&st.access).await {
        let dead = st.access.topology.dead_queue();
        let s = st.snapshots.current();
        // a reading from before the snapshot ended (its letters were being
        // returned) or during a refresh says nothing about a change
        let complete = s.report.as_ref().is_some_and(|r| r.counted_all())
            && s.taken_at.is_some_and(|t| when > t)
            && st.snapshots.status().refreshing.is_none();
        // While something reads the DLQ (a scan holds its letters), its
        // ready count is not its size: no refresh for that.
        let now = queues
            .iter()
            .find(|q| q.name == dead && q.consumers == 0)
            .map(|q| q.messages);
        if complete && now.is_some_and(|n| n as usize != s.letters.len()) {
            st.snapshots.refresh(&st.access, false);
        }
    }
}

/// `/status.json`: what a page needs to stay current without reloading.
#[derive(serde::Serialize)]
struct Status {
    snapshot: u64,
    refreshing: bool,
    /// The snapshot line, as pages show it.
    line: String,
    /// The live line (the DLQ now), as pages show it.
    live: String,
    queues: std::collections::BTreeMap<String, QueueDepth>,
}

#[derive(serde::Serialize)]
struct QueueDepth {
    messages: String,
    consumers: String,
}

pub(crate) async fn status(State(st): State<Arc<Shared>>) -> Response {
    live_depths(&st).await;
    let s = st.snapshots.current();
    let status = st.snapshots.status();
    let line = views::SnapshotLine::new(&s, &status, &st.access.topology.dead_queue());
    let live = live_line(&st, &s);
    let queues = st
        .depths
        .recent()
        .map(|(_, q)| q)
        .unwrap_or_default()
        .into_iter()
        .map(|q| {
            (
                q.name,
                QueueDepth {
                    messages: count(q.messages as usize),
                    consumers: count(q.consumers as usize),
                },
            )
        })
        .collect();
    let body = Status {
        snapshot: s.id,
        refreshing: status.refreshing.is_some(),
        line: line.text,
        live,
        queues,
    };
    (
        [(header::CONTENT_TYPE, "application/json")],
        serde_json::to_string(&body).unwrap_or_default(),
    )
        .into_response()
}

/// "The DLQ holds 1,120 letters now (read 1 s ago)", with what differs
/// from the snapshot; empty when no recent reading exists.
pub(crate) fn live_line(st: &Shared, s: &Snapshot) -> String {
    let dead = st.access.topology.dead_queue();
    let Some((ago, queues)) = st.depths.recent() else {
        return String::new();
    };
    let Some(q) = queues.iter().find(|q| q.name == dead) else {
        return String::new();
    };
    let now = q.messages as usize;
    if q.consumers > 0 {
        return format!(
            "The DLQ is being read now ({} consumer(s): a snapshot, an action, a mmsend dlq run?): {} of its letters are not held by the reader.",
            q.consumers,
            count(now)
        );
    }
    let differs = if s.taken_at.is_some() && now != s.letters.len() {
        format!(
            "; the snapshot below counted {}, a new one is taken when the refresh interval allows and this page updates by itself",
            count(s.letters.len())
        )
    } else {
        String::new()
    };
    format!(
        "The DLQ holds {} letters now (read {} ago){differs}.",
        count(now),
        views::age(ago)
    )
}
