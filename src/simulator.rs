//! The Graph API simulator: a local stand-in for
//! `POST /{version}/act_{ad_account_id}/messages`, for tests, the demo and
//! load tests (`mmsend simulate`).
//!
//! It checks what the real endpoint checks (path, bearer token, body,
//! optional `appsecret_proof`), answers the real success and error shapes
//! with the usage headers (`X-App-Usage`, `X-Business-Use-Case-Usage`,
//! `x-fb-trace-id`), adds latency, and counts everything it received
//! (`GET /_sim/stats`, `POST /_sim/reset`) so a test can prove "sent exactly
//! once".
//!
//! With `--record` ([`SimConfig::record`]) it also keeps its own books of
//! every request (time, recipient, message id, answer) and every accepted
//! send (time, recipient, message id, tracking id), read with
//! [`SimHandle::record`] or `GET /_sim/record`: the record a chaos run
//! checks the fleet against. It is off by default: a load test of millions
//! of calls must not grow a list per call.
//!
//! Deterministic triggers, chosen by the recipient (`subscription_token`);
//! each may end in `:anything` to make tokens unique:
//!
//! | token | answer |
//! |---|---|
//! | `sim:err:<code>` | Graph error with `code: <code>` (400; 500 for codes 1 and 2; 403 for 10 and 200) |
//! | `sim:suberr:<code>` | Graph error `code: 100, error_subcode: <code>` |
//! | `sim:flaky:<n>` | 500 code 2 (`is_transient`) for the first n requests, then success |
//! | `sim:errn:<code>:<n>` | Graph error `<code>` for the first n requests of this token, then success (a budget refilled, terms signed) |
//! | `sim:fault:html502` | 502 with an HTML body |
//! | `sim:fault:empty500` | 500 with an empty body |
//! | `sim:fault:truncated` | 500 with JSON cut off mid-way |
//! | `sim:fault:429` | 429, `Retry-After: 7` (or `--throttle-retry-after`), Graph code 4 |
//! | `sim:fault:429huge` | 429, `Retry-After: 10000000000000` (an absurd hint), Graph code 4 |
//! | `sim:slow:<ms>` | waits `<ms>` milliseconds, then answers like any other token |
//! | `sim:fault:hang` | never answers |
//! | `sim:fault:reset` | closes the connection without answering |
//! | `sim:fault:slowbody` | 200 at once, the body trickles over 5 s |
//! | `sim:fault:html200` | 200 with an HTML page (a captive proxy) |
//! | `sim:fault:success_false` | 200 `{"success": false}` |
//! | `sim:fault:no_tracking_id` | the first call is a send answered `{"success": true}` without a tracking id; later calls take the normal path (with `--cap`, 2300035) |
//! | `sim:fault:long2xx` | a send like any other, answered with a body over 16 KiB (the success fields and a long `padding` field) |
//! | `sim:fault:token190` | 400 `OAuthException` code 190 whose message echoes the access token received, as Meta does: "Malformed access token EAA…" |
//! | `sim:latesend:<ms>` | the first send to this recipient is booked at once and answered only after `<ms>` milliseconds: a caller whose request timeout is shorter sees a timeout for a message that went out; later calls answer at once |
//! | `sim:throttle:<n>` | 429 with Graph code 4 and `Retry-After` (see `--throttle-retry-after`) for the first n requests of this recipient, then the normal path |
//!
//! Marketing error codes answer with Meta's description from the
//! classification table's reference (`classify::table::REFERENCE`).
//!
//! Then, for every other token: with `--populating D`, the first request of
//! a `message_id` opens a window of D in which that campaign answers 2300012
//! (and with `--budget-window D`, one answering 2300015);
//! with `--cap`, a second successful send to the same recipient within
//! `--cap-window` answers 2300035; with `--errors 2300012=0.05,…`, each
//! request fails with that code with that probability.
//!
//! Throttling answers (429 and the throttling codes of the classification
//! table) carry `Retry-After: <seconds>` when `--throttle-retry-after` is set
//! (whole seconds, at least 1); `sim:fault:429` says 7 without it. A test can
//! so keep the scope gates a throttling answer closes short.
//!
//! Usage headers: the percentage is the number of calls in the last 60 s
//! against a nominal budget of [`NOMINAL_CALLS_PER_MINUTE`], capped at 100.
//!
//! The accept loop is hyper's, one task per connection, so that
//! `sim:fault:reset` can really drop a connection before any byte of the
//! answer is written.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use hmac::{Hmac, Mac};
use rand::RngExt;
use serde_json::{json, Value};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Calls per minute counted as 100 % in the usage headers.
pub const NOMINAL_CALLS_PER_MINUTE: u64 = 600_000;

/// `mmsend simulate`.
#[derive(clap::Args, Debug, Clone)]
pub(crate) struct SimArgs {
    /// Address to listen on.
    #[arg(long, env = "MMSEND_SIM_LISTEN", default_value = "127.0.0.1:8090")]
    pub(crate) listen: String,
    /// Latency per request: "20ms" or a range "10ms..80ms".
    #[arg(long, env = "MMSEND_SIM_LATENCY", default_value = "0ms")]
    pub(crate) latency: String,
    /// Random error mix, code=probability, e.g. "2300012=0.05,4=0.01".
    #[arg(long, env = "MMSEND_SIM_ERRORS", default_value = "")]
    pub(crate) errors: String,
    /// Window per new message_id answering 2300012 (0s = off).
    #[arg(long, env = "MMSEND_SIM_POPULATING", default_value = "0s")]
    pub(crate) populating: String,
    /// Window per new message_id answering 2300015 (budget reached), like --populating (0s = off).
    #[arg(long, env = "MMSEND_SIM_BUDGET_WINDOW", default_value = "0s")]
    pub(crate) budget_window: String,
    /// Cap each recipient: a second send within --cap-window answers 2300035.
    #[arg(long, env = "MMSEND_SIM_CAP")]
    pub(crate) cap: bool,
    /// How long --cap holds per recipient.
    #[arg(long, env = "MMSEND_SIM_CAP_WINDOW", default_value = "12h")]
    pub(crate) cap_window: String,
    /// Accept only this bearer token (others answer code 190).
    #[arg(long, env = "MMSEND_SIM_ACCESS_TOKEN", hide_env_values = true)]
    pub(crate) access_token: Option<String>,
    /// Require appsecret_proof computed with this app secret.
    #[arg(long, env = "MMSEND_SIM_APP_SECRET", hide_env_values = true)]
    pub(crate) app_secret: Option<String>,
    /// estimated_time_to_regain_access (minutes) sent with throttling errors.
    #[arg(long, env = "MMSEND_SIM_REGAIN_MINUTES", default_value_t = 1)]
    pub(crate) regain_minutes: u32,
    /// Retry-After sent with throttling answers, e.g. 1s (unset: none, and 7 s for sim:fault:429).
    #[arg(long, env = "MMSEND_SIM_THROTTLE_RETRY_AFTER")]
    pub(crate) throttle_retry_after: Option<String>,
    /// Keep a record of every request and send (GET /_sim/record).
    #[arg(long, env = "MMSEND_SIM_RECORD")]
    pub(crate) record: bool,
    /// Threads that serve: 1 = one thread for every connection (the least CPU
    /// per request, so the simulator takes little from a worker on the same
    /// cores), 0 = one per core.
    #[arg(long, env = "MMSEND_SIM_THREADS", default_value_t = 1)]
    pub(crate) threads: usize,
    /// Post signed marketing-message webhooks for each send to this URL (e.g. mmsend webhooks' http://127.0.0.1:9466/webhooks).
    #[arg(long, env = "MMSEND_SIM_WEBHOOK_URL")]
    pub(crate) webhook_url: Option<String>,
    /// The app secret the webhooks are signed with (the receiver's MMSEND_APP_SECRET).
    #[arg(long, env = "MMSEND_SIM_WEBHOOK_SECRET", hide_env_values = true)]
    pub(crate) webhook_secret: Option<String>,
    /// The page id the webhooks name.
    #[arg(long, env = "MMSEND_SIM_WEBHOOK_PAGE", default_value = "9876543210")]
    pub(crate) webhook_page: String,
    /// Probability a delivery follows an echo.
    #[arg(long, default_value_t = 0.9)]
    pub(crate) webhook_delivered: f64,
    /// Probability a read follows a delivery.
    #[arg(long, default_value_t = 0.5)]
    pub(crate) webhook_read: f64,
    /// Probability a click follows a delivery.
    #[arg(long, default_value_t = 0.2)]
    pub(crate) webhook_click: f64,
    /// Probability a send's delivery fails (a delivery_failed event instead of delivery, read and click).
    #[arg(long, default_value_t = 0.02)]
    pub(crate) webhook_failed: f64,
    /// Probability a webhook is posted twice (Meta delivers again).
    #[arg(long, default_value_t = 0.05)]
    pub(crate) webhook_duplicate: f64,
    /// Pages whose GET /{page-id}/subscribed_apps answers no subscription (comma-separated), for `mmsend pages check`.
    #[arg(long, value_delimiter = ',')]
    pub(crate) unsubscribed_pages: Vec<String>,
    /// The longest random delay before a webhook post (they arrive out of order).
    #[arg(long, default_value = "2s")]
    pub(crate) webhook_max_delay: String,
}

impl SimArgs {
    /// Parses the flags (durations, the error mix) into a [`SimConfig`].
    pub(crate) fn to_config(&self) -> anyhow::Result<SimConfig> {
        let dur = |flag: &str, s: &str| {
            humantime::parse_duration(s.trim())
                .map_err(|e| anyhow::anyhow!("--{flag} {s:?}: {e} (write e.g. 50ms, 2s, 1h)"))
        };
        let latency = match self.latency.split_once("..") {
            Some((lo, hi)) => {
                let (lo, hi) = (dur("latency", lo)?, dur("latency", hi)?);
                if hi < lo {
                    anyhow::bail!("--latency {:?}: the range is backwards", self.latency);
                }
                Latency::Range(lo, hi)
            }
            None => Latency::Fixed(dur("latency", &self.latency)?),
        };
        let mut error_mix = Vec::new();
        for part in self
            .errors
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let (code, p) = part.split_once('=').ok_or_else(|| {
                anyhow::anyhow!("--errors {part:?}: write code=probability, e.g. 2300012=0.05")
            })?;
            let code: u64 = code
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--errors {part:?}: {code:?} is not a code"))?;
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("--errors {part:?}: {p:?} is not a probability"))?;
            if !(0.0..=1.0).contains(&p) {
                anyhow::bail!("--errors {part:?}: the probability must be between 0 and 1");
            }
            error_mix.push((code, p));
        }
        Ok(SimConfig {
            latency,
            error_mix,
            populating: dur("populating", &self.populating)?,
            budget_window: dur("budget-window", &self.budget_window)?,
            cap_window: if self.cap {
                Some(dur("cap-window", &self.cap_window)?)
            } else {
                None
            },
            access_token: self.access_token.clone(),
            app_secret: self.app_secret.clone(),
            regain_minutes: self.regain_minutes,
            throttle_retry_after: match &self.throttle_retry_after {
                Some(s) => Some(dur("throttle-retry-after", s)?),
                None => None,
            },
            record: self.record,
            unsubscribed_pages: self.unsubscribed_pages.clone(),
            webhooks: match (&self.webhook_url, &self.webhook_secret) {
                (None, _) => None,
                (Some(_), None) => anyhow::bail!(
                    "--webhook-url needs --webhook-secret (MMSEND_SIM_WEBHOOK_SECRET): the app secret the receiver checks"
                ),
                (Some(url), Some(secret)) => {
                    for (flag, p) in [
                        ("webhook-delivered", self.webhook_delivered),
                        ("webhook-read", self.webhook_read),
                        ("webhook-click", self.webhook_click),
                        ("webhook-failed", self.webhook_failed),
                        ("webhook-duplicate", self.webhook_duplicate),
                    ] {
                        if !(0.0..=1.0).contains(&p) {
                            anyhow::bail!("--{flag} {p}: a probability is between 0 and 1");
                        }
                    }
                    Some(SimWebhooks {
                        url: url.clone(),
                        app_secret: secret.clone(),
                        page_id: self.webhook_page.clone(),
                        page_by_token: Default::default(),
                        delivered: self.webhook_delivered,
                        read: self.webhook_read,
                        click: self.webhook_click,
                        failed: self.webhook_failed,
                        duplicate: self.webhook_duplicate,
                        max_delay: dur("webhook-max-delay", &self.webhook_max_delay)?,
                    })
                }
            },
        })
    }
}

/// Latency added to every request.
#[derive(Debug, Clone, PartialEq)]
pub enum Latency {
    /// Always this long.
    Fixed(Duration),
    /// Uniform between the two.
    Range(Duration, Duration),
}

impl Default for Latency {
    fn default() -> Self {
        Latency::Fixed(Duration::ZERO)
    }
}

impl Latency {
    fn pick(&self) -> Duration {
        match self {
            Latency::Fixed(d) => *d,
            Latency::Range(lo, hi) if hi > lo => rand::rng().random_range(*lo..*hi),
            Latency::Range(lo, _) => *lo,
        }
    }
}

/// How the simulator answers; the default answers every valid send at
/// once, accepts any token and needs no proof.
#[derive(Debug, Clone, Default)]
pub struct SimConfig {
    /// Added before each answer.
    pub latency: Latency,
    /// (code, probability) per request.
    pub error_mix: Vec<(u64, f64)>,
    /// Populating window per new message_id; zero = off.
    pub populating: Duration,
    /// Window per new message_id answering 2300015 (the campaign's budget
    /// is reached until the window ends); zero = off.
    pub budget_window: Duration,
    /// Per-recipient cap window; `None` = off.
    pub cap_window: Option<Duration>,
    /// Accept only this bearer token (others answer code 190); `None`: any.
    pub access_token: Option<String>,
    /// Require `appsecret_proof` made with this app secret; `None`: no proof.
    pub app_secret: Option<String>,
    /// `estimated_time_to_regain_access` (minutes) sent with throttling errors.
    pub regain_minutes: u32,
    /// `Retry-After` on throttling answers (whole seconds, at least 1);
    /// `None`: none, and 7 s for `sim:fault:429`.
    pub throttle_retry_after: Option<Duration>,
    /// Keep a [`SimRecord`] of every request and send.
    pub record: bool,
    /// Post signed marketing-message webhooks for each send, as Meta does.
    pub webhooks: Option<SimWebhooks>,
    /// Pages whose `GET /{page-id}/subscribed_apps` answers no app (every
    /// other page: this app, subscribed to the marketing-message fields).
    pub unsubscribed_pages: Vec<String>,
}

/// The webhooks the simulator posts for each accepted send with a tracking
/// id, like Meta: an echo, then either a delivery failure (`failed`) or a
/// delivery (`delivered`), after which a read (`read`) and a click
/// (`click`, which like the failure carries no tracking id), each post after
/// a random delay of up to `max_delay` (so they arrive out of order across
/// sends and within one), some posted twice (Meta delivers again), each
/// signed with the app secret, each tried up to three times while the
/// receiver answers other than 2xx. What it posted (each event once) is
/// counted in [`SimStats::webhooks`].
#[derive(Debug, Clone)]
pub struct SimWebhooks {
    /// Where to post (`http://…/webhooks`).
    pub url: String,
    /// The key of `X-Hub-Signature-256`.
    pub app_secret: String,
    /// The page the events name (the messages call does not name one)...
    pub page_id: String,
    /// ...unless the call's access token is one of these (a page token:
    /// Meta knows its page): token → page.
    pub page_by_token: std::collections::HashMap<String, String>,
    /// Probability a delivery follows an echo.
    pub delivered: f64,
    /// Probability a read follows a delivery.
    pub read: f64,
    /// Probability a click follows a delivery.
    pub click: f64,
    /// Probability the delivery fails instead.
    pub failed: f64,
    /// Probability a post is sent twice.
    pub duplicate: f64,
    /// The longest random delay before a post.
    pub max_delay: Duration,
}

/// The simulator's own books of what it did ([`SimConfig::record`]).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SimRecord {
    /// Whether the simulator records at all (`--record`).
    pub recording: bool,
    /// Every request to the messages endpoint, in the order answered.
    pub requests: Vec<SimRequest>,
    /// Every accepted send, in the order booked.
    pub sends: Vec<SimSend>,
}

/// One request to the messages endpoint.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SimRequest {
    /// When its answer was ready (a late answer: when it was booked).
    pub at: chrono::DateTime<chrono::Utc>,
    /// The recipient, if the body named one.
    pub token: Option<String>,
    /// The message id, if the body named one.
    pub message_id: Option<String>,
    /// HTTP status of the answer (0: the connection was dropped unanswered).
    pub status: u16,
    /// The Graph code of an error answer (the subcode when there is one).
    pub code: Option<u64>,
    /// Whether the request was a send.
    pub sent: bool,
    /// How long the answer was held back (`sim:latesend`), in ms: a caller
    /// with a shorter request timeout saw a timeout, not this answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub late_ms: Option<u64>,
}

/// One accepted send.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SimSend {
    /// When it was booked.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The recipient (`subscription_token`).
    pub token: String,
    /// The marketing message id.
    pub message_id: String,
    /// The tracking id it was given; `None` when answered without one
    /// (`sim:fault:no_tracking_id`).
    pub tracking_id: Option<String>,
}

/// What the simulator received.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct SimStats {
    /// POSTs to the messages endpoint.
    pub requests: u64,
    /// Successful sends.
    pub sent: u64,
    /// Error answers by Graph code, and faults as `fault_<name>`.
    pub errors: BTreeMap<String, u64>,
    /// Successful sends per recipient (subscription token).
    pub sends_by_recipient: BTreeMap<String, u64>,
    /// Recipients with more than one successful send.
    pub duplicates: u64,
    /// Successful sends per message_id.
    pub by_message_id: BTreeMap<String, u64>,
    /// Successful sends in each second since the first one (index = second).
    pub sends_by_second: Vec<u64>,
    /// Webhook events posted (each once, however many times it was posted),
    /// by message id and status (`echoed`, `delivered`, `read`, `clicked`,
    /// `delivery_failed`).
    #[serde(default)]
    pub webhooks: BTreeMap<String, BTreeMap<String, u64>>,
}

#[derive(Default)]
struct Books {
    stats: SimStats,
    /// When the first send arrived.
    first_send: Option<Instant>,
    /// First request per message_id, for the budget window.
    budget_seen: HashMap<String, Instant>,
    flaky: HashMap<String, u64>,
    first_seen: HashMap<String, Instant>,
    last_sent: HashMap<String, Instant>,
    /// (second, calls) for the last 60 s.
    rate: VecDeque<(u64, u64)>,
    /// The last usage headers written, kept while their inputs stay the same
    /// (the percent moves once every 6,000 calls).
    usage: Option<Usage>,
    /// Requests and sends, with [`SimConfig::record`].
    record: SimRecord,
}

/// The usage headers of one (ad account, percent, regain) answer.
struct Usage {
    account: String,
    percent: u64,
    regain: u32,
    app: HeaderValue,
    buc: HeaderValue,
}

impl Usage {
    fn new(account: &str, percent: u64, regain: u32) -> Usage {
        let app =
            json!({"call_count": percent, "total_cputime": percent / 2, "total_time": percent / 2});
        let buc = json!({ account: [{"type": "ads_management", "call_count": percent,
            "total_cputime": percent / 2, "total_time": percent / 2,
            "estimated_time_to_regain_access": regain}]});
        let value = |v: Value| {
            HeaderValue::from_str(&v.to_string()).unwrap_or(HeaderValue::from_static("{}"))
        };
        Usage {
            account: account.to_string(),
            percent,
            regain,
            app: value(app),
            buc: value(buc),
        }
    }

    fn matches(&self, account: &str, percent: u64, regain: u32) -> bool {
        self.percent == percent && self.regain == regain && self.account == account
    }
}

struct Sim {
    config: SimConfig,
    books: Mutex<Books>,
    started: Instant,
    ids: AtomicU64,
    /// The client that posts webhooks, with [`SimConfig::webhooks`] only.
    http: Option<reqwest::Client>,
}

impl Sim {
    fn books(&self) -> std::sync::MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self) -> SimRecord {
        let books = self.books();
        SimRecord {
            recording: self.config.record,
            requests: books.record.requests.clone(),
            sends: books.record.sends.clone(),
        }
    }

    fn error(&self, books: &mut Books, key: String) {
        *books.stats.errors.entry(key).or_insert(0) += 1;
    }

    /// Counts a call; returns the usage percent of the last 60 s.
    fn count_call(&self, books: &mut Books) -> u64 {
        let sec = self.started.elapsed().as_secs();
        match books.rate.back_mut() {
            Some((s, n)) if *s == sec => *n += 1,
            _ => books.rate.push_back((sec, 1)),
        }
        while books.rate.front().is_some_and(|(s, _)| *s + 60 <= sec) {
            books.rate.pop_front();
        }
        let calls: u64 = books.rate.iter().map(|(_, n)| n).sum();
        (calls * 100 / NOMINAL_CALLS_PER_MINUTE).min(100)
    }
}

/// Starts simulators: [`Simulator::start`] returns the [`SimHandle`] of one.
pub struct Simulator;

impl Simulator {
    /// Binds `addr` (port 0 for a random one) and serves on the current
    /// runtime.
    pub async fn start(addr: &str, config: SimConfig) -> anyhow::Result<SimHandle> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("simulator cannot listen on {addr}: {e}"))?;
        let local = listener.local_addr()?;
        let (router, sim) = app(config);
        let stop = CancellationToken::new();
        let task = tokio::spawn(accept_loop(listener, router, stop.clone()));
        Ok(SimHandle::new(local, sim, stop, task))
    }

    /// Like [`Simulator::start`], but served by a runtime of its own on one
    /// thread of the caller's blocking pool, as `mmsend simulate` serves by
    /// default: a bench's simulator then costs what the command costs, and
    /// does not share the bench's scheduler with the clients it measures.
    pub async fn start_on_own_thread(addr: &str, config: SimConfig) -> anyhow::Result<SimHandle> {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|e| anyhow::anyhow!("simulator cannot listen on {addr}: {e}"))?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (router, sim) = app(config);
        let stop = CancellationToken::new();
        let serve_stop = stop.clone();
        let task = tokio::task::spawn_blocking(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => accept_loop(listener, router, serve_stop).await,
                    Err(e) => tracing::error!("simulator cannot serve: {e}"),
                }
            })
        });
        Ok(SimHandle::new(local, sim, stop, task))
    }

    /// The simulator's routes, for a server of one's own (the HTTP/2
    /// benchmark serves them over TLS). Each request must carry an
    /// `Extension<Arc<Notify>>` of its connection, notified when a fault
    /// asks for the connection to be reset, as [`Simulator::start`]'s
    /// server does.
    pub fn router(config: SimConfig) -> Router {
        app(config).0
    }

    /// The hyper service of one connection to `router`: each request
    /// carries `reset` (see [`Simulator::router`]), which the server of that
    /// connection drops it on.
    pub fn connection_service(
        router: Router,
        reset: Arc<Notify>,
    ) -> impl hyper::service::Service<
        Request<hyper::body::Incoming>,
        Response = Response,
        Error = Infallible,
        Future = impl std::future::Future<Output = Result<Response, Infallible>> + Send,
    > + Clone
           + Send {
        hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(reset.clone());
            let router = router.clone();
            async move {
                use tower::ServiceExt;
                Ok::<_, Infallible>(
                    router
                        .oneshot(req.map(Body::new))
                        .await
                        .unwrap_or_else(|e| match e {}),
                )
            }
        })
    }
}

/// Chooses the webhook events of one send ([`SimWebhooks`]): (field, its
/// status name).
fn webhook_fields(hooks: &SimWebhooks) -> Vec<(&'static str, &'static str)> {
    let mut fields = vec![("marketing_message_echoes", "echoed")];
    let mut rng = rand::rng();
    if rng.random_bool(hooks.failed.clamp(0.0, 1.0)) {
        fields.push(("marketing_message_delivery_failed", "delivery_failed"));
    } else if rng.random_bool(hooks.delivered.clamp(0.0, 1.0)) {
        fields.push(("marketing_message_deliveries", "delivered"));
        if rng.random_bool(hooks.read.clamp(0.0, 1.0)) {
            fields.push(("marketing_message_reads", "read"));
        }
        if rng.random_bool(hooks.click.clamp(0.0, 1.0)) {
            fields.push(("marketing_message_clicks", "clicked"));
        }
    }
    fields
}

/// Posts the webhooks of one send in the background ([`SimWebhooks`]).
fn post_webhooks(
    http: &reqwest::Client,
    hooks: &SimWebhooks,
    page_id: &str,
    fields: Vec<(&'static str, &'static str)>,
    tracking_id: &str,
    token: &str,
    message_id: &str,
) {
    let mut rng = rand::rng();
    for (i, (field, _)) in fields.into_iter().enumerate() {
        let now_ms = chrono::Utc::now().timestamp_millis() + i as i64;
        let mut value = json!({
            "messenger_subscription_token": token,
            "message_id": message_id,
            "page_id": page_id,
            "timestamp": now_ms,
        });
        // clicks and failures carry no tracking id (Meta's payloads)
        if !matches!(
            field,
            "marketing_message_clicks" | "marketing_message_delivery_failed"
        ) {
            value["marketing_message_tracking_id"] = json!(tracking_id);
        }
        if field != "marketing_message_reads" && field != "marketing_message_delivery_failed" {
            value["mid"] = json!(format!("m_{tracking_id}"));
        }
        if field == "marketing_message_delivery_failed" {
            value["error_message"] =
                json!("(#100) The user cannot receive this message (simulated)");
        }
        let body = json!({"object": "page", "entry": [{"id": page_id, "time": now_ms,
            "changes": [{"field": field, "value": value}]}]})
        .to_string();
        let signature = format!(
            "sha256={}",
            crate::graph::auth::hmac_sha256_hex(hooks.app_secret.as_bytes(), body.as_bytes())
        );
        let copies = if rng.random_bool(hooks.duplicate.clamp(0.0, 1.0)) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay = if hooks.max_delay.is_zero() {
                Duration::ZERO
            } else {
                rng.random_range(Duration::ZERO..hooks.max_delay)
            };
            let (http, url, body, signature) = (
                http.clone(),
                hooks.url.clone(),
                body.clone(),
                signature.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                for attempt in 0..3u64 {
                    let sent = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-hub-signature-256", &signature)
                        .body(body.clone())
                        .send()
                        .await;
                    if sent.is_ok_and(|r| r.status().is_success()) {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(200 * (attempt + 1))).await;
                }
                tracing::warn!("simulator: a webhook post was not taken after 3 tries");
            });
        }
    }
}

fn app(config: SimConfig) -> (Router, Arc<Sim>) {
    let posts_webhooks = config.webhooks.is_some();
    let sim = Arc::new(Sim {
        config,
        books: Mutex::new(Books::default()),
        started: Instant::now(),
        ids: AtomicU64::new(1),
        http: posts_webhooks.then(reqwest::Client::new),
    });
    let router = Router::new()
        .route("/{version}/{account}/messages", post(messages))
        .route("/{version}/{account}/subscribed_apps", get(subscribed_apps))
        .route("/_sim/stats", get(stats_handler))
        .route("/_sim/record", get(record_handler))
        .route("/_sim/reset", post(reset_handler))
        .fallback(unknown_path)
        .with_state(sim.clone());
    (router, sim)
}

/// The request's bearer token, trimmed; `None` when absent or empty.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// The fields a subscribed page reports in `subscribed_apps`: Meta's
/// marketing-message fields and `messages`.
pub const SIM_SUBSCRIBED_FIELDS: [&str; 6] = [
    "messages",
    "marketing_message_echoes",
    "marketing_message_deliveries",
    "marketing_message_reads",
    "marketing_message_clicks",
    "marketing_message_delivery_failed",
];

/// `GET /{version}/{page-id}/subscribed_apps`, as Meta answers it: the apps
/// subscribed to the page's webhooks, with their fields (none for a page in
/// [`SimConfig::unsubscribed_pages`]). Needs a bearer token.
async fn subscribed_apps(
    State(sim): State<Arc<Sim>>,
    Path((_version, page)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let token_ok = match (&sim.config.access_token, bearer(&headers)) {
        (_, None) => false,
        (Some(want), Some(got)) => want == got,
        (None, Some(_)) => true,
    };
    if !token_ok {
        return graph_error(
            StatusCode::BAD_REQUEST,
            &ErrorSpec::new(190, None, "Invalid OAuth access token."),
            "OAuthException",
        );
    }
    let data = if sim.config.unsubscribed_pages.contains(&page) {
        json!([])
    } else {
        json!([{"category": "Business", "link": "https://example.com/mmsend-sim", "name": "mmsend simulator", "id": "1234567890", "subscribed_fields": SIM_SUBSCRIBED_FIELDS}])
    };
    Json(json!({ "data": data })).into_response()
}

/// Serves each connection with hyper; a handler that wants the connection
/// reset notifies the connection's [`Notify`].
async fn accept_loop(listener: tokio::net::TcpListener, router: Router, stop: CancellationToken) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        let (stream, _) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(_) => continue,
            },
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let stop = stop.clone();
        conns.spawn(async move {
            let reset = Arc::new(Notify::new());
            let service = Simulator::connection_service(router, reset.clone());
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = reset.notified() => {} // dropping the connection closes the socket
                _ = stop.cancelled() => {}
            }
        });
        while conns.try_join_next().is_some() {}
    }
    conns.abort_all();
}

/// A running simulator.
pub struct SimHandle {
    addr: SocketAddr,
    sim: Arc<Sim>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    /// Dropping the handle stops the server too: a test that panics before
    /// [`SimHandle::shutdown`] must not leave a simulator on a thread of its
    /// own serving, which its runtime would wait for forever.
    _stop_on_drop: tokio_util::sync::DropGuard,
}

impl SimHandle {
    fn new(
        addr: SocketAddr,
        sim: Arc<Sim>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    ) -> SimHandle {
        SimHandle {
            addr,
            sim,
            _stop_on_drop: stop.clone().drop_guard(),
            stop,
            task,
        }
    }

    /// `http://<addr>`, to use as the Graph client's base URL.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A copy of everything received so far.
    pub fn stats(&self) -> SimStats {
        self.sim.books().stats.clone()
    }

    /// Successful sends so far, without copying the books (cheap enough
    /// to poll in a loop, unlike [`SimHandle::stats`]).
    pub fn sent(&self) -> u64 {
        self.sim.books().stats.sent
    }

    /// Requests received so far, failed ones included (cheap, like
    /// [`SimHandle::sent`]).
    pub fn requests(&self) -> u64 {
        self.sim.books().stats.requests
    }

    /// Distinct recipients sent to so far (cheap, like [`SimHandle::sent`]).
    pub fn distinct_sent(&self) -> usize {
        self.sim.books().stats.sends_by_recipient.len()
    }

    /// A copy of the record of every request and send (empty unless
    /// [`SimConfig::record`]).
    pub fn record(&self) -> SimRecord {
        self.sim.record()
    }

    /// Forgets everything received (stats, populating and budget windows,
    /// flaky counters, recipient caps, usage, the record); the configuration stays.
    pub fn reset(&self) {
        *self.sim.books() = Books::default();
    }

    /// Stops serving and waits until the server task has ended.
    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// `mmsend simulate`: serve until Ctrl-C.
pub(crate) async fn serve(args: &SimArgs) -> anyhow::Result<()> {
    let handle = Simulator::start(&args.listen, args.to_config()?).await?;
    println!(
        "simulator listening on {} (POST /v24.0/act_<id>/messages, GET /_sim/stats, GET /_sim/record, POST /_sim/reset)",
        handle.base_url()
    );
    tracing::info!(url = %handle.base_url(), "simulator up");
    tokio::signal::ctrl_c().await?;
    handle.shutdown().await;
    Ok(())
}

async fn stats_handler(State(sim): State<Arc<Sim>>) -> Json<SimStats> {
    Json(sim.books().stats.clone())
}

async fn record_handler(State(sim): State<Arc<Sim>>) -> Json<SimRecord> {
    Json(sim.record())
}

async fn reset_handler(State(sim): State<Arc<Sim>>) -> StatusCode {
    *sim.books() = Books::default();
    StatusCode::NO_CONTENT
}

async fn unknown_path() -> Response {
    graph_error(
        StatusCode::BAD_REQUEST,
        &ErrorSpec::new(
            100,
            None,
            "Unsupported post request. Object does not exist or does not support this operation.",
        ),
        "GraphMethodException",
    )
}

/// One Graph error answer.
struct ErrorSpec {
    code: u64,
    subcode: Option<u64>,
    message: String,
}

impl ErrorSpec {
    fn new(code: u64, subcode: Option<u64>, message: &str) -> Self {
        ErrorSpec {
            code,
            subcode,
            message: message.to_string(),
        }
    }

    fn for_code(code: u64) -> Self {
        ErrorSpec::new(code, None, message_for(code))
    }
}

fn message_for(code: u64) -> &'static str {
    if let Some(m) = i64::try_from(code)
        .ok()
        .and_then(crate::classify::table::reference_message)
    {
        return m;
    }
    match code {
        1 => "An unknown error occurred",
        2 => "An unexpected error has occurred. Please retry your request later.",
        4 => "Application request limit reached",
        17 => "User request limit reached",
        32 => "Page request limit reached",
        613 => "Calls to this api have exceeded the rate limit.",
        10 | 200 => "Permissions error",
        100 => "Invalid parameter",
        190 => "Error validating access token: Session has expired",
        80000..=80014 => "There have been too many calls for this business account",
        _ => "An error occurred",
    }
}

/// Throttling answers carry the BUC regain time; which codes those are is
/// the classification table's business.
fn is_throttle(code: u64) -> bool {
    i64::try_from(code)
        .ok()
        .and_then(|c| crate::classify::CodeTable::default().get(c).copied())
        .is_some_and(|row| row.class == crate::classify::Class::Throttled)
}

fn status_for(code: u64) -> StatusCode {
    match code {
        1 | 2 => StatusCode::INTERNAL_SERVER_ERROR,
        10 | 200 => StatusCode::FORBIDDEN,
        _ => StatusCode::BAD_REQUEST,
    }
}

/// 11 random alphanumeric characters, like Meta's `fbtrace_id`, the digits
/// in base 62 of one random 128-bit number (one draw, not one per character).
fn trace_id_bytes() -> [u8; 11] {
    const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut n: u128 = rand::rng().random();
    let mut id = [0u8; 11];
    for c in &mut id {
        *c = ALPHABET[(n % 62) as usize];
        n /= 62;
    }
    id
}

fn trace_id() -> String {
    trace_id_bytes().iter().map(|&b| char::from(b)).collect()
}

fn trace_id_header() -> HeaderValue {
    HeaderValue::from_bytes(&trace_id_bytes()).unwrap_or(HeaderValue::from_static("AAAAAAAAAAA"))
}

fn graph_error(status: StatusCode, e: &ErrorSpec, kind: &str) -> Response {
    let mut error = json!({
        "message": e.message, "type": kind, "code": e.code,
        "error_user_title": "Message not sent", "error_user_msg": e.message,
        "fbtrace_id": trace_id(),
        "is_transient": matches!(e.code, 1 | 2 | 2300012),
    });
    if let Some(sub) = e.subcode {
        error["error_subcode"] = json!(sub);
    }
    (status, Json(json!({ "error": error }))).into_response()
}

/// The trigger in a recipient token: `sim:<kind>:<arg>[:anything]`.
fn trigger(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("sim:")?;
    let mut parts = rest.splitn(3, ':');
    Some((parts.next()?, parts.next().unwrap_or("")))
}

async fn messages(
    State(sim): State<Arc<Sim>>,
    Extension(reset): Extension<Arc<Notify>>,
    Path((version, account)): Path<(String, String)>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Like Meta, the simulator finishes a request it has received even if
    // the caller goes away (a worker killed mid-call): the send happens and
    // is counted, the answer is lost. So a test can see what a crash
    // mid-call really costs. A request can only be dropped where it waits:
    // the latency, or a trigger (`sim:slow`, faults); one with neither runs
    // to its end in one poll, so it needs no task of its own.
    let delay = sim.config.latency.pick();
    if delay.is_zero() && !body.windows(4).any(|w| w == b"sim:") {
        return handle_message(sim, reset, delay, version, account, query, headers, body).await;
    }
    let request = tokio::spawn(async move {
        handle_message(sim, reset, delay, version, account, query, headers, body).await
    });
    match request.await {
        Ok(response) => response,
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

#[allow(clippy::too_many_arguments)]
async fn handle_message(
    sim: Arc<Sim>,
    reset: Arc<Notify>,
    delay: Duration,
    version: String,
    account: String,
    query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let valid_version = version
        .strip_prefix('v')
        .and_then(|v| v.split_once('.'))
        .is_some_and(|(a, b)| {
            !a.is_empty() && !b.is_empty() && (a.to_owned() + b).bytes().all(|c| c.is_ascii_digit())
        });
    let ad_account = account.strip_prefix("act_").unwrap_or("");
    if !valid_version || ad_account.is_empty() || !ad_account.bytes().all(|b| b.is_ascii_digit()) {
        return unknown_path().await;
    }
    let percent = {
        let mut books = sim.books();
        books.stats.requests += 1;
        sim.count_call(&mut books)
    };
    let proof = query.as_deref().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("appsecret_proof="))
            .map(str::to_owned)
    });
    let mut response = answer(&sim, &reset, &headers, &body, proof.as_deref()).await;
    if sim.config.record {
        sim.record_request(&body, &response);
    }
    let throttled = response.extensions().get::<Throttled>().is_some();
    let regain = match throttled {
        true => sim.config.regain_minutes,
        false => 0,
    };
    // the header values only: they share their bytes, the account is not copied
    let (app, buc) = {
        let mut books = sim.books();
        let usage = match &mut books.usage {
            Some(u) if u.matches(ad_account, percent, regain) => u,
            slot => slot.insert(Usage::new(ad_account, percent, regain)),
        };
        (usage.app.clone(), usage.buc.clone())
    };
    let headers = response.headers_mut();
    headers.insert("x-app-usage", app);
    headers.insert("x-business-use-case-usage", buc);
    headers.insert("x-fb-trace-id", trace_id_header());
    if let (true, Some(after)) = (throttled, sim.config.throttle_retry_after) {
        if !headers.contains_key("retry-after") {
            headers.insert("retry-after", HeaderValue::from(after.as_secs().max(1)));
        }
    }
    // booked already: a caller that gives up before this sees a timeout
    // for a message that went out
    if let Some(Late(after)) = response.extensions().get::<Late>().copied() {
        tokio::time::sleep(after).await;
    }
    response
}

/// Holds a send's answer back this long (`sim:latesend`).
#[derive(Clone, Copy)]
struct Late(Duration);

/// The Graph code of an error answer (the subcode when there is one).
#[derive(Clone, Copy)]
struct ErrorCode(u64);

/// Marks an answer that booked a send.
#[derive(Clone, Copy)]
struct Booked;

impl Sim {
    /// Adds a request to the record: its recipient and message id (read
    /// again from the body: recording is for tests, the hot path does not
    /// pay for it) and what it was answered.
    fn record_request(&self, body: &[u8], response: &Response) {
        let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        let text = |p: &str| v.pointer(p).and_then(Value::as_str).map(str::to_owned);
        let request = SimRequest {
            at: chrono::Utc::now(),
            token: text("/messenger_delivery_data/subscription_token"),
            message_id: text("/message_id"),
            status: response.status().as_u16(),
            code: response.extensions().get::<ErrorCode>().map(|c| c.0),
            sent: response.extensions().get::<Booked>().is_some(),
            late_ms: response
                .extensions()
                .get::<Late>()
                .map(|l| u64::try_from(l.0.as_millis()).unwrap_or(u64::MAX)),
        };
        self.books().record.requests.push(request);
    }
}

/// Marks a throttling answer (its BUC header carries the regain time).
#[derive(Clone)]
struct Throttled;

async fn answer(
    sim: &Sim,
    reset: &Notify,
    headers: &HeaderMap,
    body: &[u8],
    appsecret_proof: Option<&str>,
) -> Response {
    let fail = |books: &mut Books, code: u64, subcode: Option<u64>| {
        sim.error(books, subcode.unwrap_or(code).to_string());
        let spec = match subcode {
            Some(s) => ErrorSpec::new(code, Some(s), message_for(s)),
            None => ErrorSpec::for_code(code),
        };
        let kind = if code == 190 {
            "OAuthException"
        } else {
            "GraphMethodException"
        };
        let mut r = graph_error(status_for(code), &spec, kind);
        if is_throttle(subcode.unwrap_or(code)) {
            r.extensions_mut().insert(Throttled);
        }
        r.extensions_mut()
            .insert(ErrorCode(subcode.unwrap_or(code)));
        r
    };

    // auth
    let Some(token) = bearer(headers) else {
        let mut books = sim.books();
        sim.error(&mut books, "190".into());
        return graph_error(
            StatusCode::BAD_REQUEST,
            &ErrorSpec::new(
                190,
                None,
                "An active access token must be used to query information about the current user.",
            ),
            "OAuthException",
        );
    };
    if sim
        .config
        .access_token
        .as_deref()
        .is_some_and(|t| t != token)
    {
        let mut books = sim.books();
        sim.error(&mut books, "190".into());
        return graph_error(
            StatusCode::BAD_REQUEST,
            &ErrorSpec::new(190, Some(463), message_for(190)),
            "OAuthException",
        );
    }

    // body
    let parsed: Result<Value, _> = serde_json::from_slice(body);
    let bad = |what: &str| {
        let mut books = sim.books();
        sim.error(&mut books, "100".into());
        graph_error(
            StatusCode::BAD_REQUEST,
            &ErrorSpec::new(100, None, what),
            "OAuthException",
        )
    };
    let Ok(v) = parsed else {
        return bad("(#100) The request body is not valid JSON");
    };
    let Some(message_id) = v
        .get("message_id")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    else {
        return bad("(#100) The parameter message_id is required");
    };
    let Some(recipient) = v
        .pointer("/messenger_delivery_data/subscription_token")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
    else {
        return bad("(#100) The parameter messenger_delivery_data.subscription_token is required");
    };
    if v.get("message").is_some_and(|m| !m.is_object()) {
        return bad("(#100) Param message must be an object");
    }
    if v.get("min_conversation_gap_seconds")
        .is_some_and(|g| !g.is_u64())
    {
        return bad("(#100) Param min_conversation_gap_seconds must be a non-negative integer");
    }
    if let Some(secret) = &sim.config.app_secret {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
        mac.update(token.as_bytes());
        let want = hex::encode(mac.finalize().into_bytes());
        // Graph reads appsecret_proof from the query string
        if appsecret_proof != Some(want.as_str()) {
            return bad("Invalid appsecret_proof provided in the API argument");
        }
    }

    // deterministic triggers
    match trigger(recipient) {
        Some(("err", code)) => {
            if let Ok(code) = code.parse::<u64>() {
                let mut books = sim.books();
                return fail(&mut books, code, None);
            }
        }
        Some(("suberr", code)) => {
            if let Ok(code) = code.parse::<u64>() {
                let mut books = sim.books();
                return fail(&mut books, 100, Some(code));
            }
        }
        Some(("errn", code)) => {
            // sim:errn:<code>:<n>[:anything]
            let n: u64 = recipient
                .split(':')
                .nth(3)
                .and_then(|n| n.parse().ok())
                .unwrap_or(1);
            if let Ok(code) = code.parse::<u64>() {
                let mut books = sim.books();
                let seen = books.flaky.entry(recipient.to_string()).or_insert(0);
                *seen += 1;
                if *seen <= n {
                    return fail(&mut books, code, None);
                }
            }
        }
        Some(("flaky", n)) => {
            let n: u64 = n.parse().unwrap_or(0);
            let mut books = sim.books();
            let seen = books.flaky.entry(recipient.to_string()).or_insert(0);
            *seen += 1;
            if *seen <= n {
                return fail(&mut books, 2, None);
            }
        }
        Some(("throttle", n)) => {
            let n: u64 = n.parse().unwrap_or(0);
            let mut books = sim.books();
            let seen = books.flaky.entry(recipient.to_string()).or_insert(0);
            *seen += 1;
            if *seen <= n {
                sim.error(&mut books, "fault_429".into());
                let mut r = too_many_requests(sim.retry_after("7"));
                r.extensions_mut().insert(ErrorCode(4));
                return r;
            }
        }
        Some(("fault", "token190")) => {
            let mut books = sim.books();
            sim.error(&mut books, "190".into());
            let mut r = graph_error(
                StatusCode::BAD_REQUEST,
                &ErrorSpec::new(190, None, &format!("Malformed access token {token}")),
                "OAuthException",
            );
            r.extensions_mut().insert(ErrorCode(190));
            return r;
        }
        // sent, but the answer lacks its tracking id, is long, or late;
        // later calls for the same recipient take the normal path (the cap
        // answers 2300035)
        Some(("fault", "no_tracking_id" | "long2xx")) | Some(("latesend", _)) => {}
        Some(("slow", ms)) => {
            let ms: u64 = ms.parse().unwrap_or(0);
            tokio::time::sleep(Duration::from_millis(ms.min(600_000))).await;
        }
        Some(("fault", name)) => {
            {
                let mut books = sim.books();
                sim.error(&mut books, format!("fault_{name}"));
                // these never answer: booked here, with no status
                if sim.config.record && matches!(name, "reset" | "hang") {
                    books.record.requests.push(SimRequest {
                        at: chrono::Utc::now(),
                        token: Some(recipient.to_string()),
                        message_id: Some(message_id.to_string()),
                        status: 0,
                        code: None,
                        sent: false,
                        late_ms: None,
                    });
                }
            }
            return fault(name, reset, sim.retry_after("7")).await;
        }
        _ => {}
    }

    let mut books = sim.books();
    let now = Instant::now();
    if !sim.config.populating.is_zero() {
        let first = *books
            .first_seen
            .entry(message_id.to_string())
            .or_insert(now);
        if now.duration_since(first) < sim.config.populating {
            return fail(&mut books, 2300012, None);
        }
    }
    if !sim.config.budget_window.is_zero() {
        let first = *books
            .budget_seen
            .entry(message_id.to_string())
            .or_insert(now);
        if now.duration_since(first) < sim.config.budget_window {
            return fail(&mut books, 2300015, None);
        }
    }
    if let Some(window) = sim.config.cap_window {
        if books
            .last_sent
            .get(recipient)
            .is_some_and(|t| now.duration_since(*t) < window)
        {
            return fail(&mut books, 2300035, None);
        }
    }
    for &(code, p) in &sim.config.error_mix {
        if rand::rng().random_bool(p.clamp(0.0, 1.0)) {
            return fail(&mut books, code, None);
        }
    }
    if sim.config.cap_window.is_some() {
        books.last_sent.insert(recipient.to_string(), now);
    }
    let second = now
        .duration_since(*books.first_send.get_or_insert(now))
        .as_secs() as usize;
    let stats = &mut books.stats;
    if stats.sends_by_second.len() <= second {
        stats.sends_by_second.resize(second + 1, 0);
    }
    stats.sends_by_second[second] += 1;
    stats.sent += 1;
    let n = stats
        .sends_by_recipient
        .entry(recipient.to_string())
        .or_insert(0);
    *n += 1;
    let nth = *n;
    if nth == 2 {
        stats.duplicates += 1;
    }
    match stats.by_message_id.get_mut(message_id) {
        Some(n) => *n += 1,
        None => {
            stats.by_message_id.insert(message_id.to_string(), 1);
        }
    }
    let trigger = trigger(recipient);
    let tracking_id = match trigger == Some(("fault", "no_tracking_id")) && nth == 1 {
        true => None,
        false => Some(format!(
            "mm.{:012}",
            sim.ids.fetch_add(1, Ordering::Relaxed)
        )),
    };
    if sim.config.record {
        books.record.sends.push(SimSend {
            at: chrono::Utc::now(),
            token: recipient.to_string(),
            message_id: message_id.to_string(),
            tracking_id: tracking_id.clone(),
        });
    }
    let hooks = match (&sim.config.webhooks, &sim.http, &tracking_id) {
        (Some(hooks), Some(http), Some(id)) => {
            let fields = webhook_fields(hooks);
            let counts = books
                .stats
                .webhooks
                .entry(message_id.to_string())
                .or_default();
            for (_, status) in &fields {
                *counts.entry(status.to_string()).or_default() += 1;
            }
            Some((hooks, http, id, fields))
        }
        _ => None,
    };
    drop(books);
    if let Some((hooks, http, id, fields)) = hooks {
        let page = hooks.page_by_token.get(token).unwrap_or(&hooks.page_id);
        post_webhooks(http, hooks, page, fields, id, recipient, message_id);
    }
    let mut response = match (tracking_id, trigger) {
        (None, _) => (StatusCode::OK, Json(json!({"success": true}))).into_response(),
        (Some(id), Some(("fault", "long2xx"))) => (
            StatusCode::OK,
            Json(json!({"success": true, "marketing_message_tracking_id": id,
                        "padding": "x".repeat(LONG_BODY)})),
        )
            .into_response(),
        (Some(id), _) => (
            [(
                axum::http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            format!(r#"{{"success":true,"marketing_message_tracking_id":"{id}"}}"#),
        )
            .into_response(),
    };
    if let Some(("latesend", ms)) = trigger {
        if nth == 1 {
            let ms: u64 = ms.parse().unwrap_or(0);
            response
                .extensions_mut()
                .insert(Late(Duration::from_millis(ms.min(600_000))));
        }
    }
    response.extensions_mut().insert(Booked);
    response
}

/// Bytes of padding in a `sim:fault:long2xx` answer: past the 16 KiB that
/// error bodies are cut at.
const LONG_BODY: usize = 20 * 1024;

impl Sim {
    /// The `Retry-After` of a 429: `--throttle-retry-after`, else `default`.
    fn retry_after(&self, default: &'static str) -> HeaderValue {
        match self.config.throttle_retry_after {
            Some(d) => HeaderValue::from(d.as_secs().max(1)),
            None => HeaderValue::from_static(default),
        }
    }
}

/// A 429 with Graph code 4 and `Retry-After: <retry_after>` (seconds).
fn too_many_requests(retry_after: HeaderValue) -> Response {
    let mut r = graph_error(
        StatusCode::TOO_MANY_REQUESTS,
        &ErrorSpec::for_code(4),
        "OAuthException",
    );
    r.headers_mut().insert("retry-after", retry_after);
    r.extensions_mut().insert(Throttled);
    r
}

async fn fault(name: &str, reset: &Notify, retry_after: HeaderValue) -> Response {
    match name {
        "html502" => (
            StatusCode::BAD_GATEWAY,
            [("content-type", "text/html")],
            "<html><body><h1>502 Bad Gateway</h1></body></html>",
        )
            .into_response(),
        "empty500" => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        "truncated" => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "application/json")],
            r#"{"error": {"message": "Unexpected"#,
        )
            .into_response(),
        "429" => too_many_requests(retry_after),
        "429huge" => too_many_requests(HeaderValue::from_static("10000000000000")),
        "hang" => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        "reset" => {
            reset.notify_one();
            std::future::pending::<()>().await;
            unreachable!("the connection is dropped")
        }
        "slowbody" => {
            let chunks = [
                "{\"success\": ",
                "true, ",
                "\"marketing_message_tracking_id\": ",
                "\"mm.slow\"}",
            ];
            use futures_util::StreamExt;
            let stream = futures_util::stream::iter(chunks).then(|c| async move {
                tokio::time::sleep(Duration::from_millis(1250)).await;
                Ok::<_, Infallible>(Bytes::from_static(c.as_bytes()))
            });
            (
                StatusCode::OK,
                [("content-type", "application/json")],
                Body::from_stream(stream),
            )
                .into_response()
        }
        "html200" => (
            StatusCode::OK,
            [("content-type", "text/html")],
            "<html><body><h1>Welcome to the guest network</h1><p>Please sign in.</p></body></html>",
        )
            .into_response(),
        "success_false" => (StatusCode::OK, Json(json!({"success": false}))).into_response(),
        other => graph_error(
            StatusCode::BAD_REQUEST,
            &ErrorSpec::new(100, None, &format!("unknown simulator fault {other:?}")),
            "GraphMethodException",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn post(
        client: &reqwest::Client,
        sim: &SimHandle,
        to: &str,
        mid: &str,
    ) -> reqwest::Result<reqwest::Response> {
        client
            .post(format!("{}/v24.0/act_1/messages", sim.base_url()))
            .bearer_auth("EAAtoken123")
            .json(
                &json!({"message_id": mid, "messenger_delivery_data": {"subscription_token": to}}),
            )
            .send()
            .await
    }

    /// Every marketing code answers with Meta's reference text, read from
    /// the classification table (never typed a second time here).
    #[tokio::test]
    async fn errors_carry_metas_reference_text() {
        let sim = Simulator::start("127.0.0.1:0", SimConfig::default())
            .await
            .unwrap();
        let client = reqwest::Client::new();
        for &(code, text) in crate::classify::table::REFERENCE {
            assert_eq!(message_for(code as u64), text, "{code}");
        }
        for (code, text) in [
            (2300030, "The ad account is not in a supported region."),
            (2300052, "This person is not available right now."),
        ] {
            let body: Value = post(&client, &sim, &format!("sim:err:{code}:x"), "m")
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            assert_eq!(body["error"]["message"], text, "{code}: {body}");
        }
    }

    /// The record lists every request and send; the chaos run's triggers
    /// answer as the module's table says.
    #[tokio::test]
    async fn the_record_and_the_chaos_triggers() {
        let sim = Simulator::start(
            "127.0.0.1:0",
            SimConfig {
                cap_window: Some(Duration::from_secs(3600)),
                throttle_retry_after: Some(Duration::from_secs(1)),
                record: true,
                ..SimConfig::default()
            },
        )
        .await
        .unwrap();
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        // a late answer: the caller times out, the send is booked
        let late = post(&client, &sim, "sim:latesend:800:a", "1").await;
        assert!(late.is_err_and(|e| e.is_timeout()));
        assert_eq!(sim.sent(), 1);
        // the next call to that recipient is answered at once (capped)
        let r = post(&client, &sim, "sim:latesend:800:a", "2")
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        // a long success body
        let r = post(&client, &sim, "sim:fault:long2xx:b", "1")
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let body = r.bytes().await.unwrap();
        assert!(body.len() > 16 * 1024);
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(v["marketing_message_tracking_id"].is_string());
        // Meta echoes a malformed token in its message
        let r = post(&client, &sim, "sim:fault:token190:c", "1")
            .await
            .unwrap();
        let v: Value = r.json().await.unwrap();
        assert_eq!(v["error"]["code"], 190);
        assert!(v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("EAAtoken123"));
        // throttled once, with the configured Retry-After, then sent
        let r = post(&client, &sim, "sim:throttle:1:d", "1").await.unwrap();
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "1");
        let r = post(&client, &sim, "sim:throttle:1:d", "1").await.unwrap();
        assert_eq!(r.status(), 200);
        // the late answer's request is booked once it was answered
        tokio::time::sleep(Duration::from_millis(700)).await;
        let record = sim.record();
        assert!(record.recording);
        let sends: Vec<(&str, &str)> = record
            .sends
            .iter()
            .map(|s| (s.token.as_str(), s.message_id.as_str()))
            .collect();
        assert_eq!(
            sends,
            [
                ("sim:latesend:800:a", "1"),
                ("sim:fault:long2xx:b", "1"),
                ("sim:throttle:1:d", "1")
            ]
        );
        assert!(record.sends.iter().all(|s| s.tracking_id.is_some()));
        let answers: Vec<(u16, Option<u64>, bool)> = record
            .requests
            .iter()
            .map(|r| (r.status, r.code, r.sent))
            .collect();
        assert_eq!(
            answers,
            [
                (200, None, true),
                (400, Some(2300035), false),
                (200, None, true),
                (400, Some(190), false),
                (429, Some(4), false),
                (200, None, true)
            ]
        );
        sim.shutdown().await;
    }

    /// Without `record`, nothing is kept.
    #[tokio::test]
    async fn nothing_is_recorded_by_default() {
        let sim = Simulator::start("127.0.0.1:0", SimConfig::default())
            .await
            .unwrap();
        let client = reqwest::Client::new();
        post(&client, &sim, "r", "1").await.unwrap();
        assert_eq!(sim.sent(), 1);
        assert_eq!(sim.record(), SimRecord::default());
        sim.shutdown().await;
    }
}
