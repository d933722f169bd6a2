//! What each page shows: the page models handed to the templates
//! (`templates/*.html`, compiled in by askama, HTML-escaped), built from
//! the snapshot and the actions. Everything is formatted here (counts,
//! times, links), so the templates only place text; a page is built from
//! at most one page of rows, whatever the DLQ's size.
//!
//! Every text from a letter reaches a page masked: the snapshot masks what
//! it keeps ([`super::mask`]); job ids are shown (and linked) as
//! [`Letter::job_label`]; messages that could quote one (a failed
//! refresh's or action's error) are masked here. What else the console
//! serves is built from the same masked snapshot: the JSONL download and
//! `/status.json` (module `letters`).

use std::time::Duration;

use askama::Template;
use chrono::{DateTime, Utc};

use super::actions::{Action, Kind, Outcome, Scope, State};
use super::mask;
use super::snapshot::{Letter, Notice, Snapshot, Status};
use crate::dlq::{Dimension, Group, Stop};

/// Rows per page of letters or groups.
pub(crate) const PAGE_ROWS: usize = 50;
/// Groups per dimension on the overview.
pub(crate) const OVERVIEW_GROUPS: usize = 20;

/// `12,345`.
pub(crate) fn count(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `2026-11-26 12:09:33`, or `-`.
pub(crate) fn time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}

/// `4 s`, `3 min`, `2 h 5 min`.
pub(crate) fn age(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=89 => format!("{s} s"),
        90..=5399 => format!("{} min", (s + 30) / 60),
        _ => format!("{} h {} min", s / 3600, (s % 3600) / 60),
    }
}

fn seconds(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// A query string, percent-encoded.
pub fn query(pairs: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        out.push(if i == 0 { '?' } else { '&' });
        encode_into(&mut out, k);
        out.push('=');
        encode_into(&mut out, v);
    }
    out
}

fn encode_into(out: &mut String, s: &str) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
}

pub(crate) fn group_href(d: Dimension, key: &str) -> String {
    format!("/group{}", query(&[("dim", d.as_str()), ("key", key)]))
}

pub(crate) fn letter_href(l: &Letter) -> String {
    let job = l.job_label();
    if job.is_empty() {
        // a body that is not JSON names no job: the fingerprint alone does
        return format!("/letter{}", query(&[("fp", &l.fingerprint_hex())]));
    }
    format!(
        "/letter{}",
        query(&[("job", &job), ("fp", &l.fingerprint_hex())])
    )
}

/// What a letter without a job id is called in lists and titles.
pub(crate) const NO_JOB_ID: &str = "(no job id)";

/// A letter's job id as lists and titles show it.
pub(crate) fn job_text(l: &Letter) -> String {
    let job = l.job_label();
    if job.is_empty() {
        NO_JOB_ID.to_string()
    } else {
        job.into_owned()
    }
}

/// A message that may quote what it failed on, as a page may show it.
fn masked(message: &str) -> String {
    mask::text(message, 2_000)
}

fn confirm_group_href(kind: Kind, d: Dimension, key: &str) -> String {
    format!(
        "/confirm{}",
        query(&[("kind", kind.as_str()), ("dim", d.as_str()), ("key", key)])
    )
}

/// What every page has around its content.
pub(crate) struct Chrome {
    pub(crate) title: String,
    pub(crate) prefix: String,
    pub(crate) csrf: String,
    pub(crate) read_only: bool,
    /// Show the navigation and the snapshot line (not on the login page).
    pub(crate) nav: bool,
    /// Signed in with the token through a cookie (offer to sign out).
    pub(crate) signed_in: bool,
    pub(crate) snapshot: SnapshotLine,
    /// Unfinished actions: (link, text).
    pub(crate) running: Vec<(String, String)>,
    /// Where the refresh button returns to.
    pub(crate) back: String,
    /// The page's content is reloaded in place when a new snapshot lands
    /// (`console.js` polls `/status.json`).
    pub(crate) live: bool,
}

/// "snapshot of N letters at T" and what the reader must know about it.
pub(crate) struct SnapshotLine {
    /// The snapshot's number (0: none yet).
    pub(crate) id: u64,
    pub(crate) text: String,
    pub(crate) refreshing: Option<String>,
    /// The DLQ's depth read live (see `letters::live_line`).
    pub(crate) live: String,
    /// (css class, text)
    pub(crate) notes: Vec<(&'static str, String)>,
}

impl SnapshotLine {
    pub(crate) fn new(s: &Snapshot, status: &Status, dead_queue: &str) -> SnapshotLine {
        let text = match s.taken_at {
            None => "No snapshot yet.".to_string(),
            Some(t) => {
                let ago = (Utc::now() - t).to_std().unwrap_or_default();
                format!(
                    "Snapshot of {} letters at {} UTC ({} ago, read in {}).",
                    count(s.letters.len()),
                    t.format("%Y-%m-%d %H:%M:%S"),
                    age(ago),
                    seconds(s.took)
                )
            }
        };
        let refreshing = status.refreshing.map(|since| match &status.progress {
            Some(p) => format!(
                "Taking a new snapshot: read {} of {} ({}).",
                count(p.read),
                count(p.depth_at_start as usize),
                age(since.elapsed())
            ),
            None => format!(
                "Taking a new snapshot (waiting for the DLQ, {}).",
                age(since.elapsed())
            ),
        });
        let mut notes = Vec::new();
        match &status.notice {
            Some(Notice::Busy { consumers, at }) => notes.push((
                "warn",
                format!(
                    "At {} UTC {consumers} other consumer(s) were reading {dead_queue} (a mmsend dlq run or another console?), so no new snapshot could be taken; this is the last complete one. It is refreshed again when the DLQ is free.",
                    at.format("%H:%M:%S")
                ),
            )),
            Some(Notice::Failed { message, at }) => notes.push((
                "bad",
                format!(
                    "The last refresh failed at {} UTC: {}.{}",
                    at.format("%H:%M:%S"),
                    masked(message),
                    if s.taken_at.is_some() { " Showing the last complete snapshot." } else { "" }
                ),
            )),
            None => {}
        }
        if let Some(d) = &s.depth_note {
            notes.push(("info", format!("Queue depths unavailable: {}.", masked(d))));
        }
        if status.stale {
            notes.push((
                "info",
                "An action changed the DLQ after this snapshot; a new one is on its way.".into(),
            ));
        }
        if let Some(r) = &s.report {
            if !r.counted_all() {
                let why = match r.stop {
                    Stop::HoldLimit => "the console's --max-letters bound",
                    Stop::Interrupted => "the console was stopping",
                    _ => "the scan stopped early",
                };
                notes.push((
                    "warn",
                    format!(
                        "This snapshot holds the first {} of the {} letters ({why}): counts cover those only.",
                        count(r.read),
                        count(r.depth_at_start as usize)
                    ),
                ));
            }
        }
        SnapshotLine {
            id: s.id,
            text,
            refreshing,
            live: String::new(),
            notes,
        }
    }
}

pub(crate) struct GroupRow {
    pub(crate) key: String,
    pub(crate) href: String,
    /// The group's largest groups of another dimension (a campaign's
    /// codes): (dimension, "2300005 ×40 · 2300030 ×12").
    pub(crate) breakdown: Option<(&'static str, String)>,
    /// Other places to look at the group: (link, text, accessible name).
    pub(crate) links: Vec<(String, String, String)>,
    pub(crate) count: String,
    pub(crate) oldest: String,
    pub(crate) newest: String,
    pub(crate) error: String,
    pub(crate) actions: SetActions,
}

/// The two actions offered on a set of letters (a group): where its replay
/// and its purge confirmation pages are.
pub(crate) struct SetActions {
    pub(crate) replay: String,
    pub(crate) purge: String,
}

impl SetActions {
    fn of_group(d: Dimension, key: &str) -> SetActions {
        SetActions {
            replay: confirm_group_href(Kind::Replay, d, key),
            purge: confirm_group_href(Kind::Purge, d, key),
        }
    }
}

impl GroupRow {
    pub(crate) fn new(d: Dimension, g: &Group) -> GroupRow {
        GroupRow {
            key: g.key.clone(),
            href: group_href(d, &g.key),
            breakdown: None,
            links: Vec::new(),
            count: count(g.count),
            oldest: time(g.oldest),
            newest: time(g.newest),
            error: g.latest_error.clone().unwrap_or_default(),
            actions: SetActions::of_group(d, &g.key),
        }
    }
}

pub(crate) struct DimTable {
    pub(crate) name: &'static str,
    pub(crate) groups: Vec<GroupRow>,
    pub(crate) more: Option<(String, String)>,
}

pub(crate) struct QueueRow {
    pub(crate) name: String,
    pub(crate) role: String,
    pub(crate) messages: String,
    pub(crate) consumers: String,
    pub(crate) dead: bool,
}

#[derive(Template)]
#[template(path = "overview.html", config = "src/console/askama.toml")]
pub(crate) struct Overview {
    pub(crate) chrome: Chrome,
    pub(crate) total: String,
    /// Letters dead in the last hour, and their list.
    pub(crate) last_hour: String,
    pub(crate) last_hour_href: String,
    pub(crate) last_hour_breakdowns: Vec<super::letters::Breakdown>,
    pub(crate) chart: super::letters::ChartView,
    pub(crate) bar: super::letters::FilterBar,
    pub(crate) queues: Vec<QueueRow>,
    /// Where the depths come from: read live, or the snapshot's.
    pub(crate) queues_note: String,
    pub(crate) dims: Vec<DimTable>,
    pub(crate) empty: bool,
    pub(crate) empty_text: String,
}

/// The overview's order: what an operator asks first (which campaign,
/// which code), then why (reason, class), then where (page).
pub(crate) const OVERVIEW_ORDER: [Dimension; 5] = [
    Dimension::Campaign,
    Dimension::Code,
    Dimension::Reason,
    Dimension::Class,
    Dimension::Page,
];

/// What the overview needs besides the snapshot.
pub(crate) struct OverviewContext<'a> {
    pub(crate) dead_queue: &'a str,
    pub(crate) prefix: &'a str,
    /// Queue depths read live (with their age), if the broker answered.
    pub(crate) live: Option<(Duration, Vec<crate::broker::topology::QueueInfo>)>,
    pub(crate) grafana: Option<&'a str>,
}

impl Overview {
    pub(crate) fn new(
        chrome: Chrome,
        s: &Snapshot,
        status: &Status,
        cx: OverviewContext<'_>,
    ) -> Overview {
        let facts = s.facts();
        use super::select::FilterQuery;
        let dims = OVERVIEW_ORDER
            .iter()
            .zip(&facts.breakdowns)
            .map(|(&d, lines)| {
                let all = s.groups(d);
                DimTable {
                    name: d.as_str(),
                    groups: all
                        .iter()
                        .zip(lines)
                        .map(|(g, line)| {
                            let mut row = GroupRow::new(d, g);
                            row.breakdown = line.clone();
                            row.links = group_links(d, g, &cx);
                            row
                        })
                        .collect(),
                    more: (all.len() > OVERVIEW_GROUPS).then(|| {
                        (
                            format!("/groups{}", query(&[("dim", d.as_str())])),
                            format!("all {} groups by {d}", count(all.len())),
                        )
                    }),
                }
            })
            .collect();
        let empty_text = if s.taken_at.is_none() && status.refreshing.is_some() {
            "The first snapshot is being taken; this page updates by itself.".to_string()
        } else if s.taken_at.is_none() {
            "No snapshot yet: see above why.".to_string()
        } else {
            format!(
                "{} held no dead letter at the time of the snapshot.",
                cx.dead_queue
            )
        };
        let (queues, queues_note) = match &cx.live {
            Some((ago, q)) => (q.clone(), format!("read live, {} ago", age(*ago))),
            None => (
                s.queues.clone(),
                format!(
                    "as of the snapshot ({} UTC): RabbitMQ did not answer just now",
                    time(s.taken_at)
                ),
            ),
        };
        Overview {
            chrome,
            total: count(s.letters.len()),
            last_hour: facts.last_hour.clone(),
            last_hour_href: facts.last_hour_href.clone(),
            last_hour_breakdowns: facts.last_hour_breakdowns.clone(),
            chart: facts.chart.clone(),
            bar: super::letters::FilterBar::new(&FilterQuery::default()),
            queues: queues
                .iter()
                .map(|q| QueueRow {
                    name: q.name.clone(),
                    role: q.role.clone(),
                    messages: count(q.messages as usize),
                    consumers: count(q.consumers as usize),
                    dead: q.name == cx.dead_queue,
                })
                .collect(),
            queues_note,
            dims,
            empty: s.letters.is_empty(),
            empty_text,
        }
    }
}

/// What the overview counts over every letter of a snapshot (each group's
/// breakdown, the last hour, the per-hour chart): computed once per
/// snapshot, when it is taken, and shared by every view of it (100,000
/// letters take tens of milliseconds to count; a view of the counts well
/// under one).
#[derive(Debug)]
pub(crate) struct OverviewFacts {
    /// Per dimension of [`OVERVIEW_ORDER`], the breakdown line of each of
    /// its first [`OVERVIEW_GROUPS`] groups.
    breakdowns: Vec<Vec<Option<(&'static str, String)>>>,
    last_hour: String,
    last_hour_href: String,
    last_hour_breakdowns: Vec<super::letters::Breakdown>,
    chart: super::letters::ChartView,
}

impl OverviewFacts {
    pub(crate) fn new(s: &Snapshot) -> OverviewFacts {
        use super::select::{FilterQuery, Selected};
        let breakdowns = OVERVIEW_ORDER
            .iter()
            .map(|&d| {
                s.groups(d)
                    .iter()
                    .take(OVERVIEW_GROUPS)
                    .map(|g| s.members(d, &g.key).and_then(|m| breakdown_line(s, m, d)))
                    .collect()
            })
            .collect();
        let everything: Vec<u32> = (0..s.letters.len() as u32).collect();
        let hour_query = FilterQuery {
            since: "1h".into(),
            ..FilterQuery::default()
        };
        let (last_hour, last_hour_href, last_hour_breakdowns) =
            match hour_query.parse(s.taken_at.unwrap_or_else(Utc::now)) {
                Ok(hour) => {
                    let members = hour.members(s);
                    let b = super::letters::breakdowns(
                        s,
                        &members,
                        &hour,
                        &[Dimension::Campaign, Dimension::Code],
                    );
                    (count(members.len()), hour.href(), b)
                }
                Err(_) => ("0".into(), "/letters?since=1h".into(), Vec::new()),
            };
        OverviewFacts {
            breakdowns,
            last_hour,
            last_hour_href,
            last_hour_breakdowns,
            chart: super::letters::ChartView::new(s, &everything, &Selected::all()),
        }
    }
}

impl OverviewFacts {
    /// The breakdown line of group `d = key` if it is one of the first
    /// [`OVERVIEW_GROUPS`] of its dimension (`None`: not counted here).
    fn line(
        &self,
        d: Dimension,
        key: &str,
        s: &Snapshot,
    ) -> Option<Option<(&'static str, String)>> {
        let at = OVERVIEW_ORDER.iter().position(|&o| o == d)?;
        let place = s
            .groups(d)
            .iter()
            .take(OVERVIEW_GROUPS)
            .position(|g| g.key == key)?;
        self.breakdowns.get(at)?.get(place).cloned()
    }
}

/// A group's breakdown as one line: (dimension, `2300005 ×40 · 2300030
/// ×12 · 2 more`), counted by [`super::select::breakdown_of`] its dimension.
fn breakdown_line(s: &Snapshot, members: &[u32], d: Dimension) -> Option<(&'static str, String)> {
    let by = super::select::breakdown_of(d);
    let parts = super::select::breakdown(s, members, by);
    (!parts.is_empty()).then(|| {
        let text = parts
            .iter()
            .map(|(k, n)| {
                if n.is_empty() {
                    k.clone()
                } else {
                    format!("{k} ×{n}")
                }
            })
            .collect::<Vec<_>>()
            .join(" · ");
        (by.as_str(), text)
    })
}

/// A group's other places: its letters as a filter (to combine with
/// others), and for a campaign its campaign page and the Grafana dashboard
/// over the hours its letters died.
fn group_links(d: Dimension, g: &Group, cx: &OverviewContext<'_>) -> Vec<(String, String, String)> {
    let mut links = Vec::new();
    if let Some(sel) = super::select::Selected::of_group(d, &g.key) {
        links.push((
            sel.href(),
            "filter".to_string(),
            format!(
                "Filter the letters of {d} {} to combine with other filters",
                g.key
            ),
        ));
    }
    if d == Dimension::Campaign && g.key != crate::dlq::stats::NONE {
        links.push((
            format!("/campaign{}", query(&[("c", &g.key)])),
            "campaign".to_string(),
            format!("Campaign page of {}", g.key),
        ));
        if let Some(grafana) = cx.grafana {
            let from = g.oldest.map_or_else(
                || "now-24h".to_string(),
                |t| (t.timestamp_millis() - 3_600_000).to_string(),
            );
            links.push((
                format!(
                    "{grafana}/d/mmsend/mmsend{}",
                    query(&[("var-prefix", cx.prefix), ("from", &from), ("to", "now")])
                ),
                "Grafana".to_string(),
                format!(
                    "Grafana dashboard while campaign {} was dead-lettering",
                    g.key
                ),
            ));
        }
    }
    links
}

pub(crate) struct Pager {
    pub(crate) text: String,
    pub(crate) first: Option<String>,
    pub(crate) prev: Option<String>,
    pub(crate) next: Option<String>,
    pub(crate) last: Option<String>,
}

impl Pager {
    /// Page `page` (1-based, clamped) of `total` rows; `href(n)` links page n.
    /// Returns the pager and the row range to show.
    pub(crate) fn new(
        page: usize,
        total: usize,
        what: &str,
        href: impl Fn(usize) -> String,
    ) -> (Pager, std::ops::Range<usize>) {
        let pages = total.div_ceil(PAGE_ROWS).max(1);
        let page = page.clamp(1, pages);
        let start = (page - 1) * PAGE_ROWS;
        let end = (start + PAGE_ROWS).min(total);
        let text = if total == 0 {
            format!("no {what}")
        } else {
            format!(
                "{what} {}–{} of {} (page {} of {})",
                count(start + 1),
                count(end),
                count(total),
                count(page),
                count(pages)
            )
        };
        let link = |cond: bool, n: usize| cond.then(|| href(n));
        (
            Pager {
                text,
                first: link(page > 2, 1),
                prev: link(page > 1, page - 1),
                next: link(page < pages, page + 1),
                last: link(page + 1 < pages, pages),
            },
            start..end,
        )
    }
}

#[derive(Template)]
#[template(path = "groups.html", config = "src/console/askama.toml")]
pub(crate) struct Groups {
    pub(crate) chrome: Chrome,
    pub(crate) d: DimTable,
    pub(crate) pager: Pager,
}

impl Groups {
    pub(crate) fn new(chrome: Chrome, s: &Snapshot, d: Dimension, page: usize) -> Groups {
        let all = s.groups(d);
        let (pager, range) = Pager::new(page, all.len(), "groups", |n| {
            format!(
                "/groups{}",
                query(&[("dim", d.as_str()), ("page", &n.to_string())])
            )
        });
        Groups {
            chrome,
            d: DimTable {
                name: d.as_str(),
                groups: all[range].iter().map(|g| GroupRow::new(d, g)).collect(),
                more: None,
            },
            pager,
        }
    }
}

pub(crate) struct LetterRow {
    pub(crate) job_id: String,
    pub(crate) href: String,
    pub(crate) campaign: String,
    pub(crate) page: String,
    pub(crate) class: String,
    pub(crate) code: String,
    pub(crate) attempts: String,
    pub(crate) replays: String,
    pub(crate) dead_at: String,
    pub(crate) error: String,
}

fn or_dash(s: &Option<std::sync::Arc<str>>) -> String {
    s.as_deref().unwrap_or("-").to_string()
}

impl LetterRow {
    pub(crate) fn new(l: &Letter) -> LetterRow {
        LetterRow {
            job_id: job_text(l),
            href: letter_href(l),
            campaign: or_dash(&l.campaign),
            page: or_dash(&l.page),
            class: or_dash(&l.class),
            code: l.code.map_or_else(|| "-".into(), |c| c.to_string()),
            attempts: count(l.attempts as usize),
            replays: count(l.replays as usize),
            dead_at: time(l.dead_at),
            error: l.error.as_deref().unwrap_or("").to_string(),
        }
    }
}

#[derive(Template)]
#[template(path = "group.html", config = "src/console/askama.toml")]
pub(crate) struct GroupPage {
    pub(crate) chrome: Chrome,
    pub(crate) dim: &'static str,
    /// The group as the overview lists it.
    pub(crate) group: GroupRow,
    pub(crate) rows: Vec<LetterRow>,
    pub(crate) pager: Pager,
}

impl GroupPage {
    pub(crate) fn new(
        chrome: Chrome,
        s: &Snapshot,
        d: Dimension,
        g: &Group,
        members: &[u32],
        page: usize,
    ) -> GroupPage {
        let (pager, range) = Pager::new(page, members.len(), "letters", |n| {
            format!(
                "/group{}",
                query(&[
                    ("dim", d.as_str()),
                    ("key", &g.key),
                    ("page", &n.to_string())
                ])
            )
        });
        let mut group = GroupRow::new(d, g);
        group.breakdown = s
            .facts()
            .line(d, &g.key, s)
            .unwrap_or_else(|| breakdown_line(s, members, d));
        if let Some(sel) = super::select::Selected::of_group(d, &g.key) {
            group.links.push((
                sel.href(),
                "filter these letters".into(),
                format!(
                    "Filter the letters of {d} {} to combine with other filters",
                    g.key
                ),
            ));
        }
        GroupPage {
            chrome,
            dim: d.as_str(),
            group,
            rows: members[range]
                .iter()
                .map(|&i| LetterRow::new(&s.letters[i as usize]))
                .collect(),
            pager,
        }
    }
}

#[derive(Template)]
#[template(path = "letter.html", config = "src/console/askama.toml")]
pub(crate) struct LetterPage {
    pub(crate) chrome: Chrome,
    pub(crate) job_id: String,
    pub(crate) fingerprint: String,
    /// (dimension, key, link)
    pub(crate) groups: Vec<(&'static str, String, String)>,
    pub(crate) attempts: String,
    pub(crate) replays: String,
    pub(crate) dead_at: String,
    pub(crate) error: String,
    pub(crate) replay_href: String,
    /// The job's page: its ledger record and delivery history.
    pub(crate) job_href: String,
    pub(crate) headers: Vec<(String, String)>,
    /// RabbitMQ's `x-death`: (reason, queue, time, count), newest first.
    pub(crate) deaths: Vec<(String, String, String, String)>,
    /// The body is not JSON (no job id, no job fields).
    pub(crate) not_json: bool,
    pub(crate) body: String,
    pub(crate) body_note: String,
}

impl LetterPage {
    pub(crate) fn new(chrome: Chrome, l: &Letter) -> LetterPage {
        let code = l.code.map_or_else(|| "-".into(), |c| c.to_string());
        let values = [
            (Dimension::Reason, l.reason.to_string()),
            (Dimension::Class, or_dash(&l.class)),
            (Dimension::Code, code),
            (Dimension::Campaign, or_dash(&l.campaign)),
            (Dimension::Page, or_dash(&l.page)),
        ];
        let mut body_note = format!(
            "{} bytes{}, recipient and access tokens masked",
            count(l.body_bytes as usize),
            if l.body_json { ", JSON" } else { ", not JSON" }
        );
        if l.body_cut {
            body_note += "; the start only";
        }
        LetterPage {
            chrome,
            job_id: job_text(l),
            fingerprint: l.fingerprint_hex(),
            groups: values
                .into_iter()
                .map(|(d, v)| (d.as_str(), v.clone(), group_href(d, &v)))
                .collect(),
            attempts: count(l.attempts as usize),
            replays: count(l.replays as usize),
            dead_at: time(l.dead_at),
            error: l.error.as_deref().unwrap_or("").to_string(),
            replay_href: format!(
                "/confirm{}",
                query(&[
                    ("kind", "replay"),
                    ("job", &l.job_label()),
                    ("fp", &l.fingerprint_hex())
                ])
            ),
            // as pages show the id: a token-shaped one stays masked
            job_href: if l.job_id.is_empty() {
                String::new()
            } else {
                format!("/job{}", query(&[("id", &l.job_label())]))
            },
            headers: l
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            deaths: l
                .deaths()
                .into_iter()
                .map(|d| {
                    (
                        d.reason,
                        d.queue,
                        d.time
                            .map_or_else(|| "-".into(), |t| time(Some(t)) + " UTC"),
                        count(usize::try_from(d.count).unwrap_or_default()),
                    )
                })
                .collect(),
            not_json: !l.body_json,
            body: l.body.to_string(),
            body_note,
        }
    }
}

#[derive(Template)]
#[template(path = "confirm.html", config = "src/console/askama.toml")]
pub(crate) struct Confirm {
    pub(crate) chrome: Chrome,
    pub(crate) kind: &'static str,
    pub(crate) verb: &'static str,
    pub(crate) danger: bool,
    pub(crate) scope: String,
    pub(crate) count: String,
    pub(crate) count_n: usize,
    pub(crate) snapshot_at: String,
    pub(crate) effect: String,
    pub(crate) plan: String,
    pub(crate) rate: u32,
    pub(crate) replayed_before: usize,
    /// What a replay of this set will run into, by class (sentences).
    pub(crate) warnings: Vec<String>,
    /// A large purge: the count the person must type (`None`: no box).
    pub(crate) type_count: Option<String>,
    pub(crate) rows: Vec<LetterRow>,
    pub(crate) more: Option<(String, String)>,
    pub(crate) cancel_href: String,
}

impl Confirm {
    /// `members`: the set's letters in the snapshot.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        chrome: Chrome,
        s: &Snapshot,
        kind: Kind,
        scope: &Scope,
        members: &[u32],
        plan: String,
        rate: u32,
        send_queue: &str,
    ) -> Confirm {
        let n = members.len();
        let (verb, effect) = match kind {
            Kind::Replay => (
                "Replay",
                format!("Each letter goes back to {send_queue} with its attempts reset (x-mmsend-replays + 1), and leaves the DLQ once RabbitMQ has confirmed its copy."),
            ),
            Kind::Purge => (
                "Purge",
                "Each letter is deleted from the DLQ. This cannot be undone: export them first (mmsend dlq export) if they may be needed.".to_string(),
            ),
        };
        let (more, cancel_href) = match scope {
            Scope::Group { dimension, key } => (
                (n > PAGE_ROWS).then(|| {
                    (
                        group_href(*dimension, key),
                        format!("all {} on the group's pages", count(n)),
                    )
                }),
                group_href(*dimension, key),
            ),
            Scope::Letter {
                job_id,
                fingerprint,
            } => (
                None,
                format!("/letter{}", query(&[("job", job_id), ("fp", fingerprint)])),
            ),
            Scope::Filter { query, .. } => (
                (n > PAGE_ROWS).then(|| {
                    (
                        format!("/letters{query}"),
                        format!("all {} on the filter's pages", count(n)),
                    )
                }),
                format!("/letters{query}"),
            ),
        };
        Confirm {
            chrome,
            kind: kind.as_str(),
            verb,
            danger: kind == Kind::Purge,
            scope: match scope {
                Scope::Group { dimension, key } => {
                    format!("The letters of group {dimension} = {key}")
                }
                Scope::Letter { job_id, .. } => format!("Letter {job_id}"),
                Scope::Filter { text, .. } => format!("The letters matching {text}"),
            },
            count: count(n),
            count_n: n,
            snapshot_at: format!("{} UTC", time(s.taken_at)),
            effect,
            plan,
            rate,
            replayed_before: members
                .iter()
                .filter(|&&i| s.letters[i as usize].replays > 0)
                .count(),
            warnings: match kind {
                Kind::Replay => replay_warnings(s, members),
                Kind::Purge => Vec::new(),
            },
            type_count: (kind == Kind::Purge && n >= super::actions::PURGE_TYPE_COUNT_AT)
                .then(|| n.to_string()),
            rows: members
                .iter()
                .take(PAGE_ROWS)
                .map(|&i| LetterRow::new(&s.letters[i as usize]))
                .collect(),
            more,
            cancel_href,
        }
    }
}

/// The confirmation page's warnings for a replay: how many letters of the
/// set will most likely die again, by reason (and, for `terminal`, by
/// class), in sentences.
pub(crate) fn replay_warnings(s: &Snapshot, members: &[u32]) -> Vec<String> {
    let mut terminal = std::collections::BTreeMap::<&str, usize>::new();
    let (mut invalid, mut limit) = (0usize, 0usize);
    for &i in members {
        let l = &s.letters[i as usize];
        match &*l.reason {
            "terminal" => {
                *terminal
                    .entry(l.class.as_deref().unwrap_or("none"))
                    .or_default() += 1
            }
            "invalid_job" => invalid += 1,
            "delivery_limit" => limit += 1,
            _ => {}
        }
    }
    let n = members.len();
    let of = |k: usize| {
        if k == n {
            format!("All {} letters", count(k))
        } else if k == 1 {
            format!("1 of these {} letters", count(n))
        } else {
            format!("{} of these {} letters", count(k), count(n))
        }
    };
    let mut out = Vec::new();
    let t: usize = terminal.values().sum();
    if t > 0 {
        let classes = terminal
            .iter()
            .map(|(c, k)| format!("{c} {}", count(*k)))
            .collect::<Vec<_>>()
            .join(", ");
        out.push(format!(
            "{} died of a terminal error ({classes}): Meta refused them for a reason that does not pass with time, so they will fail again unless the cause was fixed (the page, the account or the message). Check a letter's error first.",
            of(t)
        ));
    }
    if invalid > 0 {
        out.push(format!(
            "{} are invalid jobs (reason invalid_job): the job itself is bad, so a replay fails again the same way. Fix the producer and send new jobs instead.",
            of(invalid)
        ));
    }
    if limit > 0 {
        out.push(format!(
            "{} were dead-lettered by RabbitMQ after too many redeliveries (reason delivery_limit): the job crashed or stalled workers, and a replay may do so again. Look at the workers' logs before replaying.",
            of(limit)
        ));
    }
    out
}

/// How an action is described in a line.
pub(crate) fn action_title(a: &Action) -> String {
    let verb = match a.kind {
        Kind::Replay => "Replay",
        Kind::Purge => "Purge",
    };
    format!("{verb} of {} ({} letters)", a.scope, count(a.count))
}

/// (text, css class) of an action's state.
pub(crate) fn action_state(a: &Action) -> (String, &'static str) {
    let verb = match a.kind {
        Kind::Replay => "replayed",
        Kind::Purge => "purged",
    };
    if let (Some(by), false) = (&a.stopped_by, a.state.finished()) {
        let moved = match &a.state {
            State::Running(p) => p.moved,
            _ => 0,
        };
        return (
            format!(
                "Stopping (asked by {}): settling the copies in flight and returning the rest to the DLQ; {} of {} {verb} so far.",
                masked(by),
                count(moved),
                count(a.count)
            ),
            "warn",
        );
    }
    match &a.state {
        State::Queued => (
            "Queued: waiting for the DLQ (a snapshot or another action is reading it).".into(),
            "info",
        ),
        State::Waiting { why } => (format!("Waiting: {}.", masked(why)), "warn"),
        State::Running(p) => (
            format!(
                "Running: {} of {} {verb}; the scan has read {} of the {} letters in the DLQ and found {} of the set.",
                count(p.moved),
                count(a.count),
                count(p.read),
                count(p.depth_at_start as usize),
                count(p.selected),
            ),
            "info",
        ),
        State::Done(r) => {
            let o = a.outcome().unwrap_or(Outcome {
                moved: r.replayed + r.purged,
                kept: 0,
                missing: r.missing,
            });
            let mut text = if a.stopped() {
                match &a.stopped_by {
                    Some(_) => format!(
                        "Stopped: {} {verb}, {} still in the DLQ",
                        count(o.moved),
                        count(o.kept)
                    ),
                    None => format!(
                        "Interrupted (the console was stopping): {} {verb}, {} still in the DLQ",
                        count(o.moved),
                        count(o.kept)
                    ),
                }
            } else {
                format!("Finished: {} of {} {verb}", count(o.moved), count(a.count))
            };
            if o.missing > 0 {
                text += &format!(", {} already gone", count(o.missing));
            }
            if r.failed > 0 && a.stopped() {
                text += &format!(" (of which {} copies were not confirmed)", count(r.failed));
            } else if r.failed > 0 {
                text += &format!(", {} failed (still in the DLQ)", count(r.failed));
            }
            text.push('.');
            let class = if r.failed > 0 || a.stopped() {
                "warn"
            } else {
                "good"
            };
            (text, class)
        }
        State::Failed { moved: 0, .. } if a.stopped_by.is_some() => (
            format!(
                "Stopped before it started: 0 {verb}, {} still in the DLQ.",
                count(a.count)
            ),
            "warn",
        ),
        State::Failed { moved, .. } => (format!("Failed after {} {verb}.", count(*moved)), "bad"),
        State::Interrupted => (
            "Its end was not recorded: it was running when its console stopped (a restart, a crash, or another console on the same prefix that is still running it). A console stopping cleanly settles its actions (copies in flight confirmed, the rest returned to the DLQ); a killed one leaves at most its unconfirmed copies' letters in the DLQ as well. See the audit trail and the DLQ now; confirming the same letters again acts on those still there.".into(),
            "warn",
        ),
    }
}

/// What an action's page and its JSON show, and what `console.js` updates
/// in place.
pub(crate) struct ActionFigures {
    pub(crate) state: String,
    pub(crate) state_class: &'static str,
    pub(crate) finished: bool,
    /// A Stop button is offered.
    pub(crate) stoppable: bool,
    pub(crate) progress_max: usize,
    pub(crate) progress_value: usize,
    /// The progress bar's label.
    pub(crate) progress_text: String,
    pub(crate) message: Option<String>,
    /// (label, value, machine name)
    pub(crate) numbers: Vec<(&'static str, String, &'static str)>,
}

impl ActionFigures {
    pub(crate) fn new(a: &Action, read_only: bool) -> ActionFigures {
        let (state, state_class) = action_state(a);
        let verb = match a.kind {
            Kind::Replay => "replayed",
            Kind::Purge => "purged",
        };
        let mut numbers = vec![
            ("confirmed letters", count(a.count), "confirmed"),
            (
                "from the snapshot of",
                format!("{} UTC", time(a.snapshot_at)),
                "snapshot",
            ),
            (
                "requested",
                format!("{} UTC", time(Some(a.requested_at))),
                "requested",
            ),
        ];
        if !a.who.is_empty() {
            numbers.push(("started by", masked(&a.who), "who"));
        }
        if a.kind == Kind::Replay {
            let rate = if a.rate == 0 {
                "no limit".to_string()
            } else {
                format!("{} / s", count(a.rate as usize))
            };
            numbers.push(("rate", rate, "rate"));
        }
        let mut progress_value = 0;
        let mut message = None;
        match &a.state {
            State::Running(p) => {
                progress_value = p.moved;
                numbers.push(("moved", count(p.moved), "moved"));
                numbers.push(("found of the set", count(p.selected), "selected"));
                numbers.push((
                    "read of the DLQ",
                    format!("{} of {}", count(p.read), count(p.depth_at_start as usize)),
                    "read",
                ));
                numbers.push(("failed", count(p.failed), "failed"));
                numbers.push(("running for", age(p.elapsed), "elapsed"));
            }
            State::Done(r) => {
                let o = a.outcome();
                progress_value = r.replayed + r.purged;
                numbers.push(("moved", count(r.replayed + r.purged), "moved"));
                if let Some(o) = o {
                    numbers.push(("still in the DLQ", count(o.kept), "kept"));
                    numbers.push(("missing (already gone)", count(o.missing), "missing"));
                }
                numbers.push(("failed (still in the DLQ)", count(r.failed), "failed"));
                numbers.push((
                    "letters read",
                    format!("{} of {}", count(r.read), count(r.depth_at_start as usize)),
                    "read",
                ));
                numbers.push(("took", format!("{:.1} s", r.seconds), "took"));
            }
            State::Failed { message: m, moved } => {
                progress_value = *moved;
                numbers.push(("moved", count(*moved), "moved"));
                if let Some(o) = a.outcome() {
                    numbers.push(("still in the DLQ", count(o.kept), "kept"));
                }
                message = Some(masked(m));
            }
            State::Queued | State::Waiting { .. } | State::Interrupted => {}
        }
        if let Some(by) = &a.stopped_by {
            numbers.push(("stop asked by", masked(by), "stopped_by"));
        }
        if let Some(t) = a.finished_at {
            numbers.push(("finished", format!("{} UTC", time(Some(t))), "finished"));
        }
        let finished = a.state.finished();
        ActionFigures {
            state,
            state_class,
            finished,
            stoppable: !finished && !read_only && a.stopped_by.is_none(),
            progress_max: a.count.max(1),
            progress_value,
            progress_text: format!("{} of {} {verb}", count(progress_value), count(a.count)),
            message,
            numbers,
        }
    }

    /// The figures as `GET /actions/{id}.json` serves them.
    pub(crate) fn json(&self, a: &Action) -> serde_json::Value {
        serde_json::json!({
            "id": a.id,
            "title": action_title(a),
            "finished": self.finished,
            "stoppable": self.stoppable,
            "state": self.state,
            "state_class": self.state_class,
            "progress": {
                "value": self.progress_value,
                "max": self.progress_max,
                "text": self.progress_text,
            },
            "message": self.message,
            "numbers": self.numbers.iter().map(|(label, value, name)| serde_json::json!({
                "name": name,
                "label": label,
                "value": value,
            })).collect::<Vec<_>>(),
        })
    }
}

#[derive(Template)]
#[template(path = "action.html", config = "src/console/askama.toml")]
pub(crate) struct ActionPage {
    pub(crate) chrome: Chrome,
    pub(crate) id: String,
    pub(crate) title: String,
    pub(crate) f: ActionFigures,
    pub(crate) repeats: u32,
}

impl ActionPage {
    pub(crate) fn new(chrome: Chrome, a: &Action) -> ActionPage {
        let f = ActionFigures::new(a, chrome.read_only);
        ActionPage {
            chrome,
            id: a.id.clone(),
            title: action_title(a),
            f,
            repeats: a.repeats,
        }
    }
}

pub(crate) struct ActionRow {
    pub(crate) id: String,
    pub(crate) href: String,
    pub(crate) title: String,
    pub(crate) state: String,
    pub(crate) state_class: &'static str,
    pub(crate) requested: String,
    pub(crate) finished: bool,
}

#[derive(Template)]
#[template(path = "actions.html", config = "src/console/askama.toml")]
pub(crate) struct ActionsPage {
    pub(crate) chrome: Chrome,
    pub(crate) rows: Vec<ActionRow>,
    /// Where the actions are kept and where the audit trail is, in words.
    pub(crate) kept: String,
    /// Some action is not finished.
    pub(crate) running: bool,
}

impl ActionsPage {
    /// `stored`: actions and the audit trail are in Redis.
    pub(crate) fn new(chrome: Chrome, actions: &[Action], stored: bool) -> ActionsPage {
        let audit_key = format!("{{{}}}:audit", chrome.prefix);
        let kept = if stored {
            format!("Actions are kept in Redis (the newest {}), so a restarted console lists them too. Every start, stop and end is in the audit trail in Redis (the stream {}; a campaign's entries show on its page and in mmsend campaign show) and in the console's log.", super::actions::MAX_SAVED, audit_key)
        } else {
            "Without Redis, actions are remembered only while this console runs: a restart forgets them. The audit trail is the console's log: one info line \"audit\" for every start, stop and end, with who, what and how many.".to_string()
        };
        ActionsPage {
            chrome,
            rows: actions
                .iter()
                .map(|a| {
                    let (state, state_class) = action_state(a);
                    ActionRow {
                        id: a.id.clone(),
                        href: format!("/actions/{}", a.id),
                        title: action_title(a),
                        state,
                        state_class,
                        requested: time(Some(a.requested_at)),
                        finished: a.state.finished(),
                    }
                })
                .collect(),
            kept,
            running: actions.iter().any(|a| !a.state.finished()),
        }
    }
}

#[derive(Template)]
#[template(path = "login.html", config = "src/console/askama.toml")]
pub(crate) struct Login {
    pub(crate) chrome: Chrome,
    pub(crate) next: String,
    pub(crate) error: Option<String>,
}

#[derive(Template)]
#[template(path = "message.html", config = "src/console/askama.toml")]
pub(crate) struct Message {
    pub(crate) chrome: Chrome,
    pub(crate) heading: String,
    pub(crate) text: String,
    pub(crate) class: &'static str,
    pub(crate) link: Option<(String, String)>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_times_and_links_read_well() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1_000), "1,000");
        assert_eq!(count(1_234_567), "1,234,567");
        assert_eq!(age(Duration::from_secs(5)), "5 s");
        assert_eq!(age(Duration::from_secs(600)), "10 min");
        assert_eq!(age(Duration::from_secs(7300)), "2 h 1 min");
        assert_eq!(time(None), "-");
        assert_eq!(
            query(&[("dim", "campaign"), ("key", "a b&c/é")]),
            "?dim=campaign&key=a%20b%26c%2F%C3%A9"
        );
    }

    #[test]
    fn pages_are_clamped_and_link_their_neighbours() {
        let (p, r) = Pager::new(1, 120, "letters", |n| format!("/x?page={n}"));
        assert_eq!(r, 0..50);
        assert_eq!(p.prev, None);
        assert_eq!(p.next.as_deref(), Some("/x?page=2"));
        assert_eq!(p.last.as_deref(), Some("/x?page=3"));
        assert_eq!(p.text, "letters 1–50 of 120 (page 1 of 3)");
        let (p, r) = Pager::new(99, 120, "letters", |n| format!("/x?page={n}"));
        assert_eq!(r, 100..120);
        assert_eq!(p.next, None);
        let (p, r) = Pager::new(1, 0, "letters", |n| format!("{n}"));
        assert_eq!((r, p.text.as_str()), (0..0, "no letters"));
    }
}
