//! The Campaigns pages (needs Redis: `MMSEND_REDIS_URL`): every campaign
//! with its state and progress, one campaign's counters, its dead letters
//! by code (from the snapshot) and its audit trail, and pause, resume and
//! cancel, each behind a confirmation page (cancel: type the campaign's
//! name). The actions are [`crate::control`]'s, as `mmsend campaign` runs
//! them, and recorded in the audit trail as `console:<who>`.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/campaigns` | every campaign; pages whose token Meta rejected |
//! | GET | `/campaign?c=` | one campaign |
//! | GET | `/campaign/confirm?c=&action=` | confirm pause, resume or cancel |
//! | POST | `/campaign/act` | do it |
//! | GET | `/job?id=` | one job: its send-ledger record, its delivery history (Meta's webhooks), its dead letters |
//! | GET | `/metrics` | campaign progress for Prometheus (bounded: see [`metrics`]) |

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;

use super::auth::Identity;
use super::routes::{chrome, csrf_refused, message, page, read_only};
use super::views::{count, query, time, Chrome};
use super::{mask, Shared};
use crate::control::{self, ControlError};
use crate::fleet::campaign::{CampaignState, CampaignView, Campaigns};

/// One row of the Campaigns page.
pub(crate) struct Row {
    pub(crate) name: String,
    pub(crate) href: String,
    pub(crate) state: &'static str,
    /// `(value, max)` of the progress bar, when `enqueued` is known.
    pub(crate) progress: Option<(u64, u64)>,
    pub(crate) done: String,
    pub(crate) enqueued: String,
    pub(crate) sent: String,
    pub(crate) dead: String,
    pub(crate) retried: String,
    pub(crate) held: String,
    pub(crate) rate: String,
    pub(crate) eta: String,
    pub(crate) last: String,
}

impl Row {
    fn new(v: &CampaignView) -> Row {
        let progress = v
            .enqueued
            .filter(|n| *n > 0)
            .map(|n| ((v.sent + v.dead).min(n), n));
        Row {
            name: mask::text(&v.campaign, 200),
            href: campaign_href(&v.campaign),
            state: v.state.as_str(),
            progress,
            done: progress.map_or("-".into(), |(d, n)| {
                format!("{:.0}%", 100.0 * d as f64 / n as f64)
            }),
            enqueued: v.enqueued.map_or("-".into(), |n| count(n as usize)),
            sent: count(v.sent as usize),
            dead: count(v.dead as usize),
            retried: count(v.retried as usize),
            held: count(v.held as usize),
            rate: format!("{:.1}/min", v.rate_per_min),
            eta: v.eta_seconds.map_or("-".into(), |s| {
                super::views::age(std::time::Duration::from_secs(s))
            }),
            last: time(v.last_activity),
        }
    }
}

fn ms_time(ms: i64) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::from_timestamp_millis(ms)
}

/// A campaign's name as pages show it and link it: a token-shaped name
/// (a producer's mistake) masked, every other name whole.
fn shown_name(c: &str) -> String {
    mask::text(c, SHOWN_NAME_BYTES)
}

/// Names longer than this are cut on pages (campaign names are short).
const SHOWN_NAME_BYTES: usize = 1_000;

fn campaign_href(c: &str) -> String {
    format!("/campaign{}", query(&[("c", &shown_name(c))]))
}

/// The campaign a link or form names: as stored, or by the masked name
/// pages show for a token-shaped one ([`shown_name`]), so such a campaign
/// can be opened and acted on without its name reaching a page.
async fn resolve(campaigns: &Campaigns, shown: &str) -> String {
    if !shown.contains(mask::MASK_MARK) {
        return shown.to_string();
    }
    campaigns
        .list()
        .await
        .ok()
        .and_then(|list| {
            list.into_iter()
                .map(|v| v.campaign)
                .find(|c| shown_name(c) == shown)
        })
        .unwrap_or_else(|| shown.to_string())
}

#[derive(Template)]
#[template(path = "campaigns.html", config = "src/console/askama.toml")]
pub(crate) struct CampaignsPage {
    pub(crate) chrome: Chrome,
    pub(crate) rows: Vec<Row>,
    /// (page, code, rejected at, held until)
    pub(crate) pages: Vec<(String, String, String, String)>,
    /// (page, unechoed since, last echo) of the silent pages
    pub(crate) silent: Vec<(String, String, String)>,
    pub(crate) problem: Option<String>,
}

#[derive(Template)]
#[template(path = "campaign.html", config = "src/console/askama.toml")]
pub(crate) struct CampaignPage {
    pub(crate) chrome: Chrome,
    pub(crate) row: Row,
    pub(crate) state_line: String,
    /// (label, value)
    pub(crate) counters: Vec<(String, String)>,
    /// (status, sends, share of sent): Meta's webhooks; empty before the
    /// first event
    pub(crate) funnel: Vec<Vec<String>>,
    /// (code, letters, link to the letters)
    pub(crate) codes: Vec<(String, String, String)>,
    /// (at, who, action, what, count)
    pub(crate) trail: Vec<(String, String, String, String, String)>,
    /// (confirmation link, label, dangerous) of each action the state allows
    pub(crate) actions: Vec<(String, &'static str, bool)>,
    pub(crate) notice: Option<String>,
}

#[derive(Template)]
#[template(path = "campaign_confirm.html", config = "src/console/askama.toml")]
pub(crate) struct ConfirmPage {
    pub(crate) chrome: Chrome,
    pub(crate) campaign: String,
    pub(crate) action: &'static str,
    pub(crate) verb: &'static str,
    pub(crate) effect: String,
    pub(crate) danger: bool,
    pub(crate) back: String,
}

fn needs_redis(st: &Shared, id: &Identity) -> Response {
    message(
        st,
        id,
        StatusCode::SERVICE_UNAVAILABLE,
        "Campaigns need Redis",
        "Campaign state and counters live in the workers' Redis: start the console with MMSEND_REDIS_URL (or --redis-url) set to it.".into(),
        Some(("/".into(), "Overview".into())),
    )
}

fn campaigns(st: &Shared) -> Option<&Campaigns> {
    st.campaigns.as_ref()
}

pub(crate) async fn list(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
) -> Response {
    let Some(campaigns) = campaigns(&st) else {
        return needs_redis(&st, &id);
    };
    let c = chrome(&st, &id, "Campaigns", "/campaigns");
    let (rows, pages, problem) = match (campaigns.list().await, campaigns.rejected_pages().await) {
        (Ok(list), Ok(pages)) => (
            list.iter().map(Row::new).collect(),
            pages
                .iter()
                .map(|p| {
                    (
                        mask::text(&p.page_id, 100),
                        mask::text(&p.code, 20),
                        time(p.rejected_at),
                        time(p.held_until),
                    )
                })
                .collect(),
            None,
        ),
        (Err(e), _) | (_, Err(e)) => (
            Vec::new(),
            Vec::new(),
            Some(mask::text(&e.to_string(), 500)),
        ),
    };
    let silent = campaigns
        .silent_pages(chrono::Utc::now().timestamp_millis())
        .await
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                mask::text(&p.page_id, 100),
                time(ms_time(p.unechoed_since_ms)),
                match p.last_echo_ms {
                    0 => "never".into(),
                    at => time(ms_time(at)),
                },
            )
        })
        .collect();
    super::routes::page(
        StatusCode::OK,
        &CampaignsPage {
            chrome: c,
            rows,
            pages,
            silent,
            problem,
        },
    )
}

#[derive(Deserialize)]
pub(crate) struct CampaignQuery {
    #[serde(default)]
    c: String,
    #[serde(default)]
    action: String,
    #[serde(default)]
    done: Option<String>,
}

pub(crate) async fn show(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<CampaignQuery>,
) -> Response {
    let Some(campaigns) = campaigns(&st) else {
        return needs_redis(&st, &id);
    };
    let name = resolve(campaigns, &q.c).await;
    let view = match campaigns.show(&name).await {
        Ok(Some(v)) => v,
        Ok(None) => {
            return message(
                &st,
                &id,
                StatusCode::NOT_FOUND,
                "No such campaign",
                format!(
                    "Redis knows no campaign {} (no job of it was counted yet, or its counters expired).",
                    mask::text(&q.c, 200)
                ),
                Some(("/campaigns".into(), "Campaigns".into())),
            )
        }
        Err(e) => {
            return message(
                &st,
                &id,
                StatusCode::SERVICE_UNAVAILABLE,
                "Redis did not answer",
                mask::text(&e.to_string(), 500),
                Some(("/campaigns".into(), "Campaigns".into())),
            )
        }
    };
    let trail = campaigns.trail(Some(&name), 50).await.unwrap_or_default();
    // its dead letters by code, from the snapshot
    let snapshot = st.snapshots.current();
    // as `--campaign` selects (the label, else the message id), on the
    // campaign as the snapshot keeps it (masked, bounded)
    let letters = super::select::Selected::of_group(
        crate::dlq::Dimension::Campaign,
        &mask::shown(&view.campaign, super::snapshot::VALUE_BYTES),
    );
    // (code, letters, link to this campaign's letters of that code), by code
    let codes: Vec<(String, String, String)> = match &letters {
        None => Vec::new(),
        Some(sel) => {
            let members = sel.members(&snapshot);
            let by_code: BTreeMap<String, usize> =
                super::select::counts_by(&snapshot, &members, crate::dlq::Dimension::Code)
                    .into_iter()
                    .collect();
            by_code
                .into_iter()
                .map(|(code, n)| {
                    let href = if code == crate::dlq::stats::NONE {
                        sel.href()
                    } else {
                        sel.with("code", &code).href()
                    };
                    (code, count(n), href)
                })
                .collect()
        }
    };
    let c = chrome(
        &st,
        &id,
        format!("Campaign {}", shown_name(&view.campaign)),
        &campaign_href(&view.campaign),
    );
    let state_line = match (&view.state_by, view.state_at) {
        (Some(by), at) => format!(
            "{} since {} by {}{}",
            view.state,
            time(at),
            mask::text(by, 100),
            view.state_why
                .as_deref()
                .map_or(String::new(), |w| format!(": {}", mask::text(w, 300)))
        ),
        _ => view.state.to_string(),
    };
    let mut counters = vec![
        (
            "suppressed duplicates".to_string(),
            count(view.suppressed as usize),
        ),
        ("first activity".to_string(), time(view.first_activity)),
    ];
    for (class, n) in &view.dead_by_class {
        counters.push((format!("dead, class {class}"), count(*n as usize)));
    }
    for (reason, n) in &view.dead_by_reason {
        counters.push((format!("dead, reason {reason}"), count(*n as usize)));
    }
    let actions = if st.read_only {
        Vec::new()
    } else {
        let allowed: &[(&str, &'static str)] = match view.state {
            CampaignState::Active => &[("pause", "Pause"), ("cancel", "Cancel")],
            CampaignState::Paused => &[("resume", "Resume"), ("cancel", "Cancel")],
            CampaignState::Cancelled => &[("resume", "Resume (undo the cancel)")],
        };
        allowed
            .iter()
            .map(|(action, label)| {
                let href = format!(
                    "/campaign/confirm{}",
                    query(&[("c", &shown_name(&view.campaign)), ("action", action)])
                );
                (href, *label, *action == "cancel")
            })
            .collect()
    };
    page(
        StatusCode::OK,
        &CampaignPage {
            chrome: c,
            row: Row::new(&view),
            state_line,
            counters,
            funnel: if view.funnel.any() {
                view.funnel.rows(view.sent)
            } else {
                Vec::new()
            },
            codes,
            trail: trail
                .iter()
                .map(|e| {
                    (
                        time(Some(e.at)),
                        mask::text(&e.who, 100),
                        e.action.clone(),
                        mask::text(&e.what, 300),
                        e.count.map_or("-".into(), |n| count(n as usize)),
                    )
                })
                .collect(),
            actions,
            notice: q.done.map(|d| mask::text(&d, 500)),
        },
    )
}

fn effect(action: &str, c: &str) -> Option<(&'static str, String, bool)> {
    Some(match action {
        "pause" => ("Pause", format!("No worker calls for {c} from about 2 s after you confirm; its jobs are parked in the held queue, without a call, until you resume it. Other campaigns are not touched."), false),
        "resume" => ("Resume", format!("New jobs of {c} are sent again at once, and every parked job goes back to work (a cancelled campaign's dead letters stay in the DLQ: replay them with --reason cancelled)."), false),
        "cancel" => ("Cancel", format!("Final: no further call for {c}; every job of it still to be sent, queued, retrying or parked, is dead-lettered `cancelled` without a call. Undo: resume it, then replay its `cancelled` letters."), true),
        _ => return None,
    })
}

pub(crate) async fn confirm(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<CampaignQuery>,
) -> Response {
    if campaigns(&st).is_none() {
        return needs_redis(&st, &id);
    }
    if st.read_only {
        return read_only(&st, &id);
    }
    let shown = shown_name(&q.c);
    let Some((verb, effect, danger)) = effect(&q.action, &mask::text(&q.c, 200)) else {
        return message(
            &st,
            &id,
            StatusCode::BAD_REQUEST,
            "No such action",
            "A campaign can be paused, resumed or cancelled.".into(),
            Some(("/campaigns".into(), "Campaigns".into())),
        );
    };
    let action = match q.action.as_str() {
        "pause" => "pause",
        "resume" => "resume",
        _ => "cancel",
    };
    page(
        StatusCode::OK,
        &ConfirmPage {
            chrome: chrome(&st, &id, format!("{verb} {shown}"), &campaign_href(&q.c)),
            campaign: shown,
            action,
            verb,
            effect,
            danger,
            back: campaign_href(&q.c),
        },
    )
}

#[derive(Deserialize)]
pub(crate) struct ActForm {
    csrf: String,
    campaign: String,
    action: String,
    #[serde(default)]
    reason: String,
    #[serde(default)]
    typed: String,
}

pub(crate) async fn act(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Form(f): Form<ActForm>,
) -> Response {
    if !st.auth.csrf_ok(&id, &f.csrf) {
        return csrf_refused(&st, &id);
    }
    if st.read_only {
        return read_only(&st, &id);
    }
    let Some(campaigns) = campaigns(&st) else {
        return needs_redis(&st, &id);
    };
    if f.action == "cancel" && f.typed.trim() != f.campaign {
        return message(
            &st,
            &id,
            StatusCode::BAD_REQUEST,
            "Not cancelled",
            "To cancel, type the campaign's name exactly. Nothing was changed.".into(),
            Some((campaign_href(&f.campaign), "Back to the campaign".into())),
        );
    }
    let who = format!("console:{}", id.who());
    // the form names the campaign as the page showed it
    let name = resolve(campaigns, &f.campaign).await;
    let result = match f.action.as_str() {
        "pause" => control::pause(campaigns, &name, &who, f.reason.trim()).await,
        "resume" | "cancel" => match st.access.connection().await {
            Ok(conn) => {
                let topology = &st.access.topology;
                if f.action == "resume" {
                    control::resume(&conn, topology, campaigns, &name, &who, None).await
                } else {
                    control::cancel(
                        &conn,
                        topology,
                        campaigns,
                        &name,
                        &who,
                        f.reason.trim(),
                        None,
                    )
                    .await
                }
            }
            Err(e) => Err(ControlError::Broker(e)),
        },
        _ => {
            return message(
                &st,
                &id,
                StatusCode::BAD_REQUEST,
                "No such action",
                "A campaign can be paused, resumed or cancelled.".into(),
                Some(("/campaigns".into(), "Campaigns".into())),
            )
        }
    };
    match result {
        Ok(r) => {
            let done = match r.action {
                "pause" => format!("Paused ({} → {}).", r.previous, r.state),
                _ => format!(
                    "{} ({} → {}): {} parked job(s) back to work{}.",
                    if r.action == "resume" {
                        "Resumed"
                    } else {
                        "Cancelled"
                    },
                    r.previous,
                    r.state,
                    r.moved,
                    if r.failed > 0 || r.interrupted {
                        "; some stayed parked: do it again"
                    } else {
                        ""
                    }
                ),
            };
            Redirect::to(&format!(
                "/campaign{}",
                query(&[("c", &shown_name(&name)), ("done", &done)])
            ))
            .into_response()
        }
        Err(e) => message(
            &st,
            &id,
            StatusCode::CONFLICT,
            "Not done",
            mask::text(&e.to_string(), 1_000),
            Some((campaign_href(&f.campaign), "Back to the campaign".into())),
        ),
    }
}

/// `GET /metrics` (Prometheus text): the counters of the most recently
/// active [`crate::metrics::CAMPAIGN_SERIES_MAX`] campaigns
/// ([`crate::metrics::CONSOLE_SERIES`]). Behind the console's guard like
/// every page: scrape it with the console token as a bearer token.
pub(crate) async fn metrics(State(st): State<Arc<Shared>>) -> Response {
    use prometheus::{Encoder as _, GaugeVec, IntGaugeVec, Opts, Registry, TextEncoder};
    let Some(campaigns) = campaigns(&st) else {
        return (
            StatusCode::NOT_FOUND,
            "campaign metrics need MMSEND_REDIS_URL\n",
        )
            .into_response();
    };
    let list = match campaigns.list().await {
        Ok(list) => list,
        Err(e) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "Redis did not answer: {}\n",
                    mask::text(&e.to_string(), 300)
                ),
            )
                .into_response()
        }
    };
    let registry = Registry::new();
    let names = crate::metrics::CONSOLE_SERIES;
    let jobs = IntGaugeVec::new(
        Opts::new(
            names[0],
            "Jobs of a recently active campaign, by counter (from Redis)",
        ),
        &["campaign", "counter"],
    );
    let state = IntGaugeVec::new(
        Opts::new(
            names[1],
            "1 for the campaign's state (active, paused, cancelled)",
        ),
        &["campaign", "state"],
    );
    let rate = GaugeVec::new(
        Opts::new(names[2], "Sends per minute over the last five minutes"),
        &["campaign"],
    );
    let (Ok(jobs), Ok(state), Ok(rate)) = (jobs, state, rate) else {
        return (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n").into_response();
    };
    for c in [
        Box::new(jobs.clone()) as Box<dyn prometheus::core::Collector>,
        Box::new(state.clone()),
        Box::new(rate.clone()),
    ] {
        let _ = registry.register(c);
    }
    for v in list.iter().take(crate::metrics::CAMPAIGN_SERIES_MAX) {
        let name = v.campaign.as_str();
        let counters = [
            ("sent", Some(v.sent)),
            ("dead", Some(v.dead)),
            ("retried", Some(v.retried)),
            ("held", Some(v.held)),
            ("suppressed", Some(v.suppressed)),
            ("enqueued", v.enqueued),
        ];
        for (counter, n) in counters {
            if let Some(n) = n {
                jobs.with_label_values(&[name, counter])
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        for s in [
            CampaignState::Active,
            CampaignState::Paused,
            CampaignState::Cancelled,
        ] {
            state
                .with_label_values(&[name, s.as_str()])
                .set(i64::from(v.state == s));
        }
        rate.with_label_values(&[name]).set(v.rate_per_min);
    }
    let mut out = Vec::new();
    if TextEncoder::new()
        .encode(&registry.gather(), &mut out)
        .is_err()
    {
        return (StatusCode::INTERNAL_SERVER_ERROR, "metrics unavailable\n").into_response();
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

#[derive(Template)]
#[template(path = "job.html", config = "src/console/askama.toml")]
pub(crate) struct JobPage {
    pub(crate) chrome: Chrome,
    pub(crate) job_id: String,
    /// (label, value) of the send-ledger record; empty: none
    pub(crate) ledger: Vec<(String, String)>,
    /// The delivery status, when an event joined the job.
    pub(crate) status: Option<String>,
    /// (status, Meta's time) in the order they were reached
    pub(crate) history: Vec<(String, String)>,
    pub(crate) error: Option<String>,
    /// (reason, code, dead at, link) of its letters in the DLQ snapshot
    pub(crate) letters: Vec<(String, String, String, String)>,
    pub(crate) problem: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct JobQuery {
    #[serde(default)]
    id: String,
}

/// `GET /job?id=`: what Redis holds of one job (its ledger record, its
/// delivery history) and its letters in the DLQ snapshot.
pub(crate) async fn job(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<JobQuery>,
) -> Response {
    let Some(campaigns) = campaigns(&st) else {
        return needs_redis(&st, &id);
    };
    let job_id = q.id.trim().to_string();
    let c = chrome(
        &st,
        &id,
        format!("Job {}", mask::text(&job_id, 100)),
        &format!("/job{}", query(&[("id", &mask::text(&job_id, 300))])),
    );
    let (found, problem) = match campaigns.job(&job_id).await {
        Ok(found) => (found, None),
        Err(e) => ((None, None), Some(mask::text(&e.to_string(), 500))),
    };
    let (ledger, delivery) = found;
    let ledger = ledger
        .map(|r| {
            let mut rows = vec![("state".to_string(), r.state.clone())];
            let at = time(ms_time(r.at_ms));
            rows.push(match r.state.as_str() {
                "sent" => ("sent at".into(), at),
                _ => ("claim lease until".into(), at),
            });
            rows.push(("worker".into(), mask::text(&r.worker, 200)));
            if let Some(t) = &r.tracking_id {
                rows.push(("tracking id".into(), mask::text(t, 200)));
            }
            if r.suspected {
                rows.push((
                    "settled on evidence".into(),
                    "yes (2300035 after a call that may have been the send)".into(),
                ));
            }
            rows
        })
        .unwrap_or_default();
    let (status, history, error) = match delivery {
        Some(d) => {
            let mut history: Vec<(i64, String)> =
                d.at.iter().map(|(s, at)| (*at, s.clone())).collect();
            history.sort();
            (
                Some(d.status.clone()),
                history
                    .into_iter()
                    .map(|(at, s)| (s, time(ms_time(at))))
                    .collect(),
                d.error.as_deref().map(|e| mask::text(e, 500)),
            )
        }
        None => (None, Vec::new(), None),
    };
    let snapshot = st.snapshots.current();
    let letters = snapshot
        .letters
        .iter()
        // by its id, or as pages show it (a token-shaped id is masked)
        .filter(|l| *l.job_id == *job_id || l.job_label() == job_id)
        .map(|l| {
            (
                mask::text(&l.reason, 50),
                l.code.map_or("-".to_string(), |c| c.to_string()),
                time(l.dead_at),
                super::views::letter_href(l),
            )
        })
        .collect();
    page(
        StatusCode::OK,
        &JobPage {
            chrome: c,
            job_id: mask::text(&job_id, 300),
            ledger,
            status,
            history,
            error,
            letters,
            problem,
        },
    )
}
