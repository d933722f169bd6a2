//! The console's HTTP side: the axum router, the guard every request
//! passes (host, origin, token or session, CSRF identity, security headers)
//! and one handler per page. Handlers read the shared snapshot and never
//! touch the broker: the only ways to the DLQ are a snapshot refresh and an
//! action, both in the background.
//!
//! | method | path | what |
//! |---|---|---|
//! | GET | `/` | overview: queue depths, groups of every dimension |
//! | GET | `/groups?dim=` | every group of a dimension, paged |
//! | GET | `/group?dim=&key=&page=` | a group's letters, 50 a page |
//! | GET | `/letters?reason=&class=&code=&campaign=&page=&since=&until=&job_id=&p=` | the letters a filter selects (module `letters`) |
//! | GET | `/letters.jsonl?…` | the same letters as JSON lines |
//! | GET | `/status.json` | snapshot id, live depths: pages poll it to stay current |
//! | GET | `/letter?job=&fp=` | one letter's story (`job` alone: find it by job id) |
//! | GET | `/confirm?kind=&dim=&key=`, `&job=&fp=` or `&<filter>` | the exact set, asking for confirmation |
//! | POST | `/actions` | start (or find) the action of a confirmed set |
//! | GET | `/actions`, `/actions/{id}` | actions, one action's progress and result |
//! | GET | `/actions/{id}.json` | one action's figures, for the page's live update |
//! | POST | `/actions/{id}/stop` | stop a running action (its letters settled or left in the DLQ) |
//! | POST | `/refresh` | a new snapshot now |
//! | GET, POST | `/login`; POST `/logout` | the token's login form |
//! | GET, POST | `/campaigns`, `/campaign…` | campaigns (module `campaigns`) |
//!
//! After a sign-in (`next`) or a refresh (`back`) the console redirects
//! only to a path of its own ([`local_path`]): never to another site,
//! whatever the browser makes of the value.

use std::sync::Arc;

use askama::Template;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use serde::Deserialize;

use super::actions::{Kind, Plan, Scope};
use super::auth::{self, Auth, Identity};
use super::limit::{self, Client};
use super::snapshot::Snapshot;
use super::views::{self, Chrome, SnapshotLine};
use super::{mask, Shared};
use crate::dlq::Dimension;

const CSS: &str = include_str!("static/console.css");
const JS: &str = include_str!("static/console.js");

const CSP: &str = "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/", get(overview))
        .route("/groups", get(groups))
        .route("/group", get(group))
        .route("/letters", get(super::letters::list))
        .route("/letters.jsonl", get(super::letters::download))
        .route("/status.json", get(super::letters::status))
        .route("/letter", get(letter))
        .route("/confirm", get(confirm))
        .route("/actions", get(actions).post(start))
        .route("/actions/{id}", get(action))
        .route("/actions/{id}/stop", post(stop))
        .route("/refresh", post(refresh))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/campaigns", get(super::campaigns::list))
        .route("/campaign", get(super::campaigns::show))
        .route("/campaign/confirm", get(super::campaigns::confirm))
        .route("/campaign/act", post(super::campaigns::act))
        .route("/job", get(super::campaigns::job))
        .route("/metrics", get(super::campaigns::metrics))
        .route(
            "/console.css",
            get(|| async { asset("text/css; charset=utf-8", CSS) }),
        )
        .route(
            "/console.js",
            get(|| async { asset("text/javascript; charset=utf-8", JS) }),
        )
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(shared.clone(), guard))
        .with_state(shared)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
        ],
        body,
    )
        .into_response()
}

fn text(status: StatusCode, body: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        body,
    )
        .into_response()
}

/// The answer to a client locked out for sending wrong tokens.
fn too_many(client: Client, wait: std::time::Duration) -> Response {
    let seconds = limit::retry_after(wait);
    tracing::warn!(%client, seconds, "console: a client is locked out after too many wrong tokens");
    (
        StatusCode::TOO_MANY_REQUESTS,
        [
            (header::RETRY_AFTER, seconds.to_string()),
            (
                header::CONTENT_TYPE,
                "text/plain; charset=utf-8".to_string(),
            ),
        ],
        format!("Too many wrong tokens from your address: try again in {seconds} s.\n"),
    )
        .into_response()
}

/// Checks every request before its handler; see the module docs of
/// [`super::auth`] and [`super::limit`].
async fn guard(State(st): State<Arc<Shared>>, mut req: Request, next: Next) -> Response {
    let headers = req.headers();
    let get = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |c| c.0.ip());
    let client = st.limits.client(
        peer,
        headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok()),
    );
    let host = get(header::HOST).unwrap_or_default().to_string();
    if !st.auth.required() && !auth::loopback_host(&host) {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            format!("This console has no token and answers only to loopback names (127.0.0.1, localhost, [::1]), not to Host {host:?}. Open it as http://127.0.0.1:{}/ or set MMSEND_CONSOLE_TOKEN.\n", st.port),
        );
    }
    if req.method() == Method::POST {
        let cross_origin = get(header::ORIGIN).is_some_and(|o| !auth::same_origin(o, &host));
        let cross_site =
            get(header::HeaderName::from_static("sec-fetch-site")) == Some("cross-site");
        if cross_origin || cross_site {
            return text(
                StatusCode::FORBIDDEN,
                "Refused: this form was sent from another site.\n".into(),
            );
        }
    }
    let public = matches!(req.uri().path(), "/login" | "/console.css" | "/console.js");
    let secure = get(header::HeaderName::from_static("x-forwarded-proto")) == Some("https");
    let html = get(header::ACCEPT).is_some_and(|a| a.contains("text/html"));
    let mut new_cookie = None;
    let identity = if let Some(authorization) = get(header::AUTHORIZATION) {
        // a locked-out client is refused before its token is compared
        if let Some(wait) = st.limits.locked(client) {
            return too_many(client, wait);
        }
        match st.auth.bearer(authorization) {
            Some(id) => id,
            None => {
                if let Some(wait) = st.limits.wrong_token(client) {
                    return too_many(client, wait);
                }
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "Refused: that is not the console token.\n",
                )
                    .into_response();
            }
        }
    } else {
        let session = get(header::COOKIE)
            .and_then(auth::cookie_value)
            .and_then(|c| st.auth.session(c));
        match session {
            Some(s) if s.authenticated || !st.auth.required() || public => s.identity(),
            _ if !st.auth.required() || public => {
                let (s, cookie) = st.auth.issue(false);
                new_cookie = Some(cookie);
                s.identity()
            }
            _ if html && req.method() == Method::GET => {
                let next = req
                    .uri()
                    .path_and_query()
                    .map_or("/", |p| p.as_str())
                    .to_string();
                return Redirect::to(&format!("/login{}", views::query(&[("next", &next)])))
                    .into_response();
            }
            _ => {
                return (
                    StatusCode::UNAUTHORIZED,
                    [(header::WWW_AUTHENTICATE, "Bearer")],
                    "Refused: sign in at /login, or send Authorization: Bearer <MMSEND_CONSOLE_TOKEN>.\n",
                )
                    .into_response()
            }
        }
    };
    req.extensions_mut().insert(identity);
    req.extensions_mut().insert(client);
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    if let Some(c) = new_cookie {
        if let Ok(v) = HeaderValue::from_str(&Auth::set_cookie(&c, secure)) {
            h.append(header::SET_COOKIE, v);
        }
    }
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // not `no-referrer`: Chromium then sends `Origin: null` with the forms'
    // POSTs, which the origin check above must refuse
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    resp
}

/// The frame of a page: the snapshot line, the running actions.
pub(super) fn chrome(st: &Shared, id: &Identity, title: impl Into<String>, back: &str) -> Chrome {
    let snapshot = st.snapshots.current();
    let status = st.snapshots.status();
    Chrome {
        title: title.into(),
        prefix: st.access.topology.prefix.clone(),
        csrf: st.auth.csrf(id),
        read_only: st.read_only,
        nav: true,
        signed_in: st.auth.required() && id.authenticated && !id.bearer,
        snapshot: SnapshotLine {
            live: super::letters::live_line(st, &snapshot),
            ..SnapshotLine::new(&snapshot, &status, &st.access.topology.dead_queue())
        },
        running: st
            .actions
            .unfinished()
            .iter()
            .map(|a| (format!("/actions/{}", a.id), views::action_title(a)))
            .collect(),
        back: back.to_string(),
        live: false,
    }
}

pub(super) fn page(status: StatusCode, t: &impl Template) -> Response {
    match t.render() {
        Ok(body) => (
            status,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(e) => {
            tracing::error!(error = %e, "console: a page failed to render");
            text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "This page failed to render; the console's log has the reason.\n".into(),
            )
        }
    }
}

pub(super) fn message(
    st: &Shared,
    id: &Identity,
    status: StatusCode,
    heading: &str,
    text: String,
    link: Option<(String, String)>,
) -> Response {
    let class = if status.is_client_error() || status.is_server_error() {
        "bad"
    } else {
        "info"
    };
    page(
        status,
        &views::Message {
            chrome: chrome(st, id, heading, "/"),
            heading: heading.into(),
            text,
            class,
            link,
        },
    )
}

/// A page that says why nothing was done, with a way back to the overview.
fn refused(
    st: &Shared,
    id: &Identity,
    status: StatusCode,
    heading: &str,
    text: impl Into<String>,
) -> Response {
    let back = Some(("/".into(), "Overview".into()));
    message(st, id, status, heading, text.into(), back)
}

/// A view of the snapshot: starts a refresh in the background when one is due.
pub(super) fn viewed(st: &Shared) {
    st.snapshots.refresh(&st.access, false);
}

/// The frame of a page of the snapshot's groups or letters: the queue
/// depths read live first, and the content reloaded in place when a new
/// snapshot lands.
pub(super) async fn live_chrome(
    st: &Shared,
    id: &Identity,
    title: impl Into<String>,
    back: &str,
) -> Chrome {
    super::letters::live_depths(st).await;
    Chrome {
        live: true,
        ..chrome(st, id, title, back)
    }
}

async fn overview(State(st): State<Arc<Shared>>, Extension(id): Extension<Identity>) -> Response {
    viewed(&st);
    let c = live_chrome(&st, &id, "Overview", "/").await;
    let s = st.snapshots.current();
    let status = st.snapshots.status();
    let dead_queue = st.access.topology.dead_queue();
    let cx = views::OverviewContext {
        dead_queue: &dead_queue,
        prefix: &st.access.topology.prefix,
        live: st.depths.recent(),
        grafana: st.grafana.as_deref(),
    };
    page(StatusCode::OK, &views::Overview::new(c, &s, &status, cx))
}

#[derive(Deserialize)]
struct GroupsQuery {
    #[serde(default)]
    dim: String,
    #[serde(default)]
    key: Option<String>,
    #[serde(default)]
    page: Option<String>,
}

fn page_number(p: &Option<String>) -> usize {
    p.as_deref().and_then(|p| p.parse().ok()).unwrap_or(1)
}

fn dimension(st: &Shared, id: &Identity, dim: &str) -> Result<Dimension, Box<Response>> {
    dim.parse().map_err(|e: String| {
        Box::new(refused(
            st,
            id,
            StatusCode::BAD_REQUEST,
            "Unknown dimension",
            e,
        ))
    })
}

/// Where the group pages start: the view counted, the dimension asked for
/// (or the page that says it is unknown) and the current snapshot.
fn dimension_view(
    st: &Shared,
    id: &Identity,
    dim: &str,
) -> Result<(Dimension, Arc<Snapshot>), Box<Response>> {
    viewed(st);
    Ok((dimension(st, id, dim)?, st.snapshots.current()))
}

async fn groups(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<GroupsQuery>,
) -> Response {
    let (d, s) = match dimension_view(&st, &id, &q.dim) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let back = format!("/groups{}", views::query(&[("dim", d.as_str())]));
    let c = live_chrome(&st, &id, format!("Groups by {d}"), &back).await;
    page(
        StatusCode::OK,
        &views::Groups::new(c, &s, d, page_number(&q.page)),
    )
}

async fn group(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<GroupsQuery>,
) -> Response {
    let (d, s) = match dimension_view(&st, &id, &q.dim) {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let key = q.key.unwrap_or_default();
    let (Some(g), Some(members)) = (s.group(d, &key), s.members(d, &key)) else {
        return refused(
            &st,
            &id,
            StatusCode::NOT_FOUND,
            "No such group",
            format!(
                "The snapshot of {} UTC has no group {d} = {} (it may have emptied since).",
                views::time(s.taken_at),
                mask::text(&key, 300)
            ),
        );
    };
    let back = views::group_href(d, &key);
    let c = live_chrome(&st, &id, format!("{d} = {}", mask::text(&key, 300)), &back).await;
    page(
        StatusCode::OK,
        &views::GroupPage::new(c, &s, d, g, members, page_number(&q.page)),
    )
}

#[derive(Deserialize)]
struct LetterQuery {
    #[serde(default)]
    job: String,
    #[serde(default)]
    fp: String,
}

async fn letter(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<LetterQuery>,
) -> Response {
    viewed(&st);
    if q.fp.is_empty() && !q.job.trim().is_empty() {
        return super::letters::find_job(&st, &id, &q.job);
    }
    let s = st.snapshots.current();
    let Some(l) = s.letter(&q.job, &q.fp) else {
        return refused(
            &st,
            &id,
            StatusCode::NOT_FOUND,
            "No such letter",
            format!("The snapshot of {} UTC has no letter {} with fingerprint {} (replayed or purged since?).", views::time(s.taken_at), mask::text(&q.job, 300), mask::text(&q.fp, 100)),
        );
    };
    let back = views::letter_href(l);
    let c = chrome(&st, &id, format!("Letter {}", views::job_text(l)), &back);
    page(StatusCode::OK, &views::LetterPage::new(c, l))
}

#[derive(Deserialize)]
struct ConfirmQuery {
    #[serde(default)]
    kind: String,
    dim: Option<String>,
    key: Option<String>,
    job: Option<String>,
    fp: Option<String>,
    #[serde(flatten)]
    filter: super::select::FilterQuery,
}

pub(super) fn read_only(st: &Shared, id: &Identity) -> Response {
    const WHY: &str = "This console was started with --read-only: it shows the DLQ and changes nothing. Use mmsend dlq replay / purge, or a console without --read-only.";
    refused(st, id, StatusCode::FORBIDDEN, "Read-only console", WHY)
}

async fn confirm(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<ConfirmQuery>,
) -> Response {
    if st.read_only {
        return read_only(&st, &id);
    }
    let kind: Kind = match q.kind.parse() {
        Ok(k) => k,
        Err(e) => return message(&st, &id, StatusCode::BAD_REQUEST, "Unknown action", e, None),
    };
    let s = st.snapshots.current();
    let (scope, members): (Scope, Vec<u32>) = match (&q.dim, &q.key, &q.job, &q.fp) {
        (Some(dim), Some(key), None, None) => {
            let d = match dimension(&st, &id, dim) {
                Ok(d) => d,
                Err(r) => return *r,
            };
            (
                Scope::Group {
                    dimension: d,
                    key: key.clone(),
                },
                s.members(d, key).map(<[u32]>::to_vec).unwrap_or_default(),
            )
        }
        (None, None, Some(job), Some(fp)) => {
            let index = s.letter_index(job, fp);
            (
                Scope::Letter {
                    // as pages show it, however the link gave it
                    job_id: index.map_or_else(
                        || job.clone(),
                        |i| s.letters[i as usize].job_label().into_owned(),
                    ),
                    fingerprint: fp.clone(),
                },
                index.into_iter().collect(),
            )
        }
        (None, None, None, None) if q.filter.any() => {
            let sel = match super::letters::selected(&st, &id, &q.filter) {
                Ok(sel) => sel,
                Err(r) => return *r,
            };
            (
                Scope::Filter {
                    query: sel.query(&[]),
                    text: sel.describe(),
                },
                sel.members(&s),
            )
        }
        _ => {
            return message(
                &st,
                &id,
                StatusCode::BAD_REQUEST,
                "What to act on?",
                "Give dim and key (a group), job and fp (a letter), or a filter (reason, class, code, campaign, page, since, until, job_id).".into(),
                None,
            )
        }
    };
    if members.is_empty() {
        return refused(
            &st,
            &id,
            StatusCode::NOT_FOUND,
            "Nothing to act on",
            format!(
                "The snapshot of {} UTC has no letters in {}.",
                views::time(s.taken_at),
                mask::text(&scope.to_string(), 600)
            ),
        );
    }
    let keys = members
        .iter()
        .map(|&i| s.letters[i as usize].key())
        .collect();
    let plan = Plan::new(kind, scope.clone(), keys, s.taken_at);
    let plan_id = plan.id.clone();
    st.actions.propose(plan);
    let c = chrome(&st, &id, format!("Confirm {}", kind.as_str()), "/");
    page(
        StatusCode::OK,
        &views::Confirm::new(
            c,
            &s,
            kind,
            &scope,
            &members,
            plan_id,
            st.replay_rate,
            &st.access.topology.send_queue(),
        ),
    )
}

#[derive(Deserialize)]
struct StartForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    plan: String,
    #[serde(default)]
    rate: String,
    /// A large purge: the count, typed by the person.
    #[serde(default)]
    typed: String,
}

pub(super) fn csrf_refused(st: &Shared, id: &Identity) -> Response {
    const WHY: &str = "This form has no valid CSRF token (it was not sent from this console's own page, or the session changed). Open the page again and resend.";
    refused(st, id, StatusCode::FORBIDDEN, "Refused", WHY)
}

async fn start(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Form(f): Form<StartForm>,
) -> Response {
    if !st.auth.csrf_ok(&id, &f.csrf) {
        return csrf_refused(&st, &id);
    }
    if st.read_only {
        return read_only(&st, &id);
    }
    let rate = match f.rate.trim() {
        "" => st.replay_rate,
        r => match r.parse::<u32>() {
            Ok(r) => r,
            Err(_) => {
                return message(
                    &st,
                    &id,
                    StatusCode::BAD_REQUEST,
                    "Bad rate",
                    format!("{r:?} is not a number of letters per second (0 = no limit)."),
                    None,
                )
            }
        },
    };
    if let Some(refusal) = untyped_purge(&st, &id, &f) {
        return refusal;
    }
    let who = format!("console:{}", id.who());
    match st
        .actions
        .start(&f.plan, rate, &who, &st.access, &st.snapshots)
    {
        Ok(action) => Redirect::to(&format!("/actions/{action}")).into_response(),
        Err(e) => refused(
            &st,
            &id,
            StatusCode::CONFLICT,
            "Confirmation expired",
            e.to_string(),
        ),
    }
}

async fn actions(State(st): State<Arc<Shared>>, Extension(id): Extension<Identity>) -> Response {
    let list = st.actions.list();
    let c = chrome(&st, &id, "Actions", "/actions");
    page(
        StatusCode::OK,
        &views::ActionsPage::new(c, &list, st.actions.stored()),
    )
}

async fn action(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Path(action_id): Path<String>,
) -> Response {
    if let Some(json_id) = action_id.strip_suffix(".json") {
        return action_json(&st, json_id);
    }
    let Some(a) = st.actions.get(&action_id) else {
        return message(
            &st,
            &id,
            StatusCode::NOT_FOUND,
            "No such action",
            format!("No action {action_id} is known: the Actions page lists the ones this console remembers."),
            Some(("/actions".into(), "Actions".into())),
        );
    };
    let c = chrome(
        &st,
        &id,
        views::action_title(&a),
        &format!("/actions/{action_id}"),
    );
    page(StatusCode::OK, &views::ActionPage::new(c, &a))
}

// ------------------------------------------------- live progress and Stop

/// `GET /actions/{id}.json`: what `console.js` updates the action's page
/// (and the Actions list) with, in place.
fn action_json(st: &Shared, action_id: &str) -> Response {
    let Some(a) = st.actions.get(action_id) else {
        return (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({
                "error": format!("no action {action_id} is known; open the Actions page")
            })),
        )
            .into_response();
    };
    let f = views::ActionFigures::new(&a, st.read_only);
    axum::Json(f.json(&a)).into_response()
}

#[derive(Deserialize)]
struct StopForm {
    #[serde(default)]
    csrf: String,
}

/// `POST /actions/{id}/stop`: stops a running action safely (see
/// [`super::actions::Actions::stop`]).
async fn stop(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Path(action_id): Path<String>,
    Form(f): Form<StopForm>,
) -> Response {
    if !st.auth.csrf_ok(&id, &f.csrf) {
        return csrf_refused(&st, &id);
    }
    if st.read_only {
        return read_only(&st, &id);
    }
    let who = format!("console:{}", id.who());
    match st.actions.stop(&action_id, &who).await {
        Ok(()) => Redirect::to(&format!("/actions/{action_id}")).into_response(),
        Err(e) => message(
            &st,
            &id,
            StatusCode::CONFLICT,
            "Not stopped",
            format!("Action {action_id} was not stopped: {e}."),
            Some(("/actions".into(), "Actions".into())),
        ),
    }
}

/// A purge of [`super::actions::PURGE_TYPE_COUNT_AT`] letters or more goes
/// only with its count typed in: the refusal otherwise (`None`: it may go).
fn untyped_purge(st: &Shared, id: &Identity, f: &StartForm) -> Option<Response> {
    let (Kind::Purge, n) = st.actions.planned(&f.plan)? else {
        return None;
    };
    if n < super::actions::PURGE_TYPE_COUNT_AT {
        return None;
    }
    let typed: String = f
        .typed
        .chars()
        .filter(|c| !matches!(c, ',' | '.' | '_' | ' ' | '\u{a0}' | '\u{202f}'))
        .collect();
    if typed.parse::<usize>().ok() == Some(n) {
        return None;
    }
    let said = if f.typed.trim().is_empty() {
        "no count was typed".to_string()
    } else {
        format!("{:?} was typed", f.typed.trim())
    };
    Some(message(
        st,
        id,
        StatusCode::BAD_REQUEST,
        "Type the count to purge",
        format!("Nothing was purged: this purge deletes {} letters for good, and {said}. Go back to the confirmation page, type {n} in the box and confirm again.", views::count(n)),
        Some(("/actions".into(), "Actions".into())),
    ))
}

#[derive(Deserialize)]
struct RefreshForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    back: String,
}

/// Where a redirect after a login or a refresh may go: a path of this
/// console, else `/`.
///
/// Accepted: `/` followed by anything but `/` or `\`, with no backslash,
/// control character or whitespace anywhere. Browsers read `//host` and
/// `/\host` as another site, and they drop tab, CR and LF from a URL before
/// reading it, so `/\t/host` is `//host` to them; a redirect never needs any
/// of these, so none is let through (a value already percent-encoded, such
/// as `/%09/host`, is a path of this console and stays one).
fn local_path(p: &str) -> &str {
    let mut chars = p.chars();
    let local = chars.next() == Some('/')
        && !matches!(chars.next(), Some('/' | '\\'))
        && !p
            .chars()
            .any(|c| c == '\\' || c.is_control() || c.is_whitespace());
    if local {
        p
    } else {
        "/"
    }
}

async fn refresh(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Form(f): Form<RefreshForm>,
) -> Response {
    if !st.auth.csrf_ok(&id, &f.csrf) {
        return csrf_refused(&st, &id);
    }
    st.snapshots.refresh(&st.access, true);
    Redirect::to(local_path(&f.back)).into_response()
}

#[derive(Deserialize)]
struct NextQuery {
    #[serde(default)]
    next: String,
}

fn login_page(st: &Shared, id: &Identity, next: &str, error: Option<String>) -> Response {
    let mut c = chrome(st, id, "Sign in", "/");
    c.nav = false;
    let status = if error.is_some() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::OK
    };
    page(
        status,
        &views::Login {
            chrome: c,
            next: local_path(next).to_string(),
            error,
        },
    )
}

async fn login_form(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Query(q): Query<NextQuery>,
) -> Response {
    if id.authenticated || !st.auth.required() {
        return Redirect::to(local_path(&q.next)).into_response();
    }
    login_page(&st, &id, &q.next, None)
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Extension(client): Extension<Client>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    if !st.auth.csrf_ok(&id, &f.csrf) {
        return login_page(
            &st,
            &id,
            &f.next,
            Some("This form expired; sign in again.".into()),
        );
    }
    // a locked-out client is refused before its token is compared
    if let Some(wait) = st.limits.locked(client) {
        return too_many(client, wait);
    }
    if !st.auth.token_matches(&f.token) {
        tracing::warn!(%client, "console: a sign-in with a wrong token");
        if let Some(wait) = st.limits.wrong_token(client) {
            return too_many(client, wait);
        }
        return login_page(
            &st,
            &id,
            &f.next,
            Some("That is not the console token.".into()),
        );
    }
    let (_, cookie) = st.auth.issue(true);
    let secure = headers
        .get("x-forwarded-proto")
        .is_some_and(|v| v.as_bytes() == b"https");
    let mut resp = Redirect::to(local_path(&f.next)).into_response();
    if let Ok(v) = HeaderValue::from_str(&Auth::set_cookie(&cookie, secure)) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

async fn logout(
    State(st): State<Arc<Shared>>,
    Extension(id): Extension<Identity>,
    Form(f): Form<RefreshForm>,
) -> Response {
    if !st.auth.csrf_ok(&id, &f.csrf) {
        return csrf_refused(&st, &id);
    }
    let mut resp = Redirect::to("/login").into_response();
    if let Ok(v) = HeaderValue::from_str(&Auth::clear_cookie()) {
        resp.headers_mut().append(header::SET_COOKIE, v);
    }
    resp
}

async fn not_found(State(st): State<Arc<Shared>>, Extension(id): Extension<Identity>) -> Response {
    refused(
        &st,
        &id,
        StatusCode::NOT_FOUND,
        "Not found",
        "This console has no such page.",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_paths_of_this_console_are_redirected_to() {
        for ok in [
            "/",
            "/actions",
            "/group?dim=code&key=2300005",
            "/login?next=%2F%2Fevil.example",
            "/%09/evil.example/",
            "/letter?job=a%5Cb",
        ] {
            assert_eq!(local_path(ok), ok, "{ok:?}");
        }
        for bad in [
            "",
            "//evil.example",
            "//evil.example/",
            "/\\evil.example",
            "\\\\evil.example",
            "/\t/evil.example/",
            "/\n/evil.example/",
            "/\r\n/evil.example/",
            "/\r/evil.example",
            "\t//evil.example",
            "/\u{0}/evil.example",
            "/\u{7f}/evil.example",
            "/\u{85}/evil.example",
            "/a\\b",
            "/a\r\nSet-Cookie: x=1",
            "http://evil.example/",
            "https:evil.example",
            "javascript:alert(1)",
            "evil.example",
            " /x",
        ] {
            assert_eq!(local_path(bad), "/", "{bad:?}");
        }
    }
}
