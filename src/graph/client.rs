//! One Graph API call: `POST {base}/{version}/act_{ad_account_id}/messages`.
//!
//! One [`Client`] per process wraps one `reqwest::Client` (HTTP/1.1
//! keep-alive pool, rustls, connect and whole-request timeouts). HTTP/1.1
//! is pinned, not negotiated: over TLS at concurrency 64, HTTP/2 to the
//! simulator was no faster (0.96-0.99x the calls/s at 50 ms latency, 4-15 %
//! more CPU per call; `benches/http2.rs`), and it multiplexes
//! in-flight calls over shared connections, so one reset or lost packet
//! stalls or makes ambiguous many calls instead of one. The token goes in
//! `Authorization: Bearer …`, never in the URL. With an app secret
//! configured, `appsecret_proof` (an HMAC of the token, not the token) goes
//! in the query string, where Graph reads it for every request.
//!
//! A send is what Meta says is a send: a 2xx whose JSON body has
//! `"success": true` and a `marketing_message_tracking_id`. Any other 2xx
//! (HTML from a captive proxy or a wrong base URL, an empty body, `success:
//! false`, no tracking id) is a failure of kind [`FailureKind::NotASend`],
//! never acked as sent; `classify` gives it a class.
//!
//! [`Client::send`] never returns a Rust error: every way a call can end is an
//! [`Outcome`]. A transport failure after the connection was established is
//! flagged `ambiguous`, because Meta may have processed the request before
//! the answer was lost.
//!
//! Bodies are read up to a bound that depends on the status. A 2xx is read
//! whole up to [`MAX_SUCCESS_BODY`] (1 MiB): Meta's answer is about 100
//! bytes, but a padded or verbose one is still a send, and it must not be
//! mistaken for "not a Graph API answer" and sent again. A 2xx longer than
//! that, or one whose body broke off, is [`NotASend::CutOff`]: the request
//! was answered, so the send may have happened (ambiguous). The bound keeps
//! a runaway body (a proxy streaming a file) from taking memory: at most
//! 1 MiB per call in flight. Error bodies are read up to 16 KiB, which holds
//! any Graph error; the rest is discarded.
//!
//! Every text a failure carries that came from the network (Graph's error
//! fields, an excerpt of an HTML or garbage body, the HTTP client's error)
//! is scrubbed here, once, when the failure is built, by a
//! [`Redactor`] holding the secrets of the call (the token, its proof, the
//! app secret, the base URL's password) and the token shape; see
//! [`super::auth`]. The HTTP client's errors name the request URL: it is
//! kept (host and path tell an operator where the call went) without its
//! query (`appsecret_proof`) and user info. A success is not scanned.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::auth::{appsecret_proof, Redactor, Secret};
use super::error::{GraphError, UsageHint};
use crate::config::defaults;
use crate::job::Job;

/// Longest error body kept, in bytes; the rest is discarded unread.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// Longest 2xx body read, in bytes; a longer one is
/// [`NotASend::CutOff`] (see the module docs).
pub const MAX_SUCCESS_BODY: usize = 1024 * 1024;

/// How much of a body the excerpt of a failure is taken from: room for the
/// 200 characters shown plus any token that starts among them, so a token
/// is redacted whole before the excerpt is cut.
const SNIPPET_WINDOW: usize = 8 * 1024;

/// How to reach the Graph API. Its `Debug` form shows the base URL
/// without user info (and the app secret as `***`).
#[derive(Clone)]
pub struct ClientConfig {
    /// e.g. `https://graph.facebook.com` (no trailing slash needed).
    pub base_url: String,
    /// e.g. `v24.0`.
    pub version: String,
    /// TCP and TLS handshake, per connection.
    pub connect_timeout: Duration,
    /// Whole request, body included.
    pub request_timeout: Duration,
    /// Idle keep-alive connections kept per host; the worker sets it to its
    /// concurrency so a busy pool never reconnects.
    pub pool_max_idle_per_host: usize,
    /// When set, every call carries `appsecret_proof` (HMAC-SHA256 of the
    /// access token with this secret); `None`: no proof.
    pub app_secret: Option<Secret>,
}

impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &without_userinfo(&self.base_url))
            .field("version", &self.version)
            .field("connect_timeout", &self.connect_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("pool_max_idle_per_host", &self.pool_max_idle_per_host)
            .field("app_secret", &self.app_secret)
            .finish()
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            base_url: defaults::GRAPH_BASE_URL.into(),
            version: defaults::GRAPH_VERSION.into(),
            connect_timeout: defaults::CONNECT_TIMEOUT,
            request_timeout: defaults::REQUEST_TIMEOUT,
            pool_max_idle_per_host: usize::from(defaults::CONCURRENCY),
            app_secret: None,
        }
    }
}

/// The parts of a job the API call needs.
#[derive(Debug, Clone, Copy)]
pub struct SendRequest<'a> {
    /// Digits only, without `act_` (the path is `act_{ad_account_id}/messages`).
    pub ad_account_id: &'a str,
    /// The marketing message (campaign) id.
    pub message_id: &'a str,
    /// The recipient.
    pub subscription_token: &'a str,
    /// The message body; `None` when the campaign carries the creative.
    pub message: Option<&'a Value>,
    /// Sent as is; Meta answers 2300052 while the gap since the last
    /// conversation is shorter.
    pub min_conversation_gap_seconds: Option<u64>,
}

impl<'a> From<&'a Job> for SendRequest<'a> {
    fn from(job: &'a Job) -> Self {
        SendRequest {
            ad_account_id: &job.ad_account_id,
            message_id: &job.message_id,
            subscription_token: &job.subscription_token,
            message: job.message.as_ref(),
            min_conversation_gap_seconds: job.min_conversation_gap_seconds,
        }
    }
}

#[derive(Serialize)]
struct DeliveryData<'a> {
    subscription_token: &'a str,
}

#[derive(Serialize)]
struct Body<'a> {
    message_id: &'a str,
    messenger_delivery_data: DeliveryData<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    min_conversation_gap_seconds: Option<u64>,
}

/// How a call ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Meta sent the message.
    Sent {
        /// `marketing_message_tracking_id`: how Meta's delivery, read and
        /// click webhooks refer to this send.
        tracking_id: String,
        /// The usage headers of the answer.
        hint: UsageHint,
    },
    /// Anything else.
    Failed(Failure),
}

/// Why a 2xx answer was not a send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotASend {
    /// Not JSON (HTML from a proxy, empty, cut off): it did not come from
    /// the Graph API.
    NotJson,
    /// JSON without `"success": true`: Meta did not send it.
    NotSuccess,
    /// `"success": true` without a tracking id: maybe sent.
    NoTrackingId,
    /// The body broke off, or ran past [`MAX_SUCCESS_BODY`], before it
    /// could be read: maybe sent.
    CutOff,
}

/// A failed call: what happened plus whatever throttling hints came with it.
#[derive(Debug, Clone)]
pub struct Failure {
    /// What went wrong.
    pub kind: FailureKind,
    /// The usage headers of the answer (empty without an answer).
    pub hint: UsageHint,
}

/// What went wrong with a call, as [`crate::classify`] reads it.
#[derive(Debug, Clone)]
pub enum FailureKind {
    /// A non-2xx answer with a Graph error object (its texts redacted).
    Graph {
        /// The HTTP status.
        status: u16,
        /// The parsed `error` object.
        error: GraphError,
    },
    /// A non-2xx answer without one (HTML, empty, cut off).
    Http {
        /// The HTTP status.
        status: u16,
        /// The body's first 200 characters, white space folded, secrets
        /// redacted.
        body_snippet: String,
    },
    /// A 2xx answer that is not a send.
    NotASend {
        /// The HTTP status.
        status: u16,
        /// The body's first 200 characters, white space folded, secrets
        /// redacted.
        body_snippet: String,
        /// What was wrong with it.
        why: NotASend,
    },
    /// No HTTP answer at all.
    Transport {
        /// The request timeout ran out (else the connection failed).
        timeout: bool,
        /// The request may have reached Meta (the connection was up).
        ambiguous: bool,
        /// The HTTP client's error with its causes; the URL it names has
        /// no query and no user info, and secrets are redacted.
        message: String,
    },
}

impl Failure {
    /// The HTTP status; `None` when no answer came.
    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            FailureKind::Graph { status, .. }
            | FailureKind::Http { status, .. }
            | FailureKind::NotASend { status, .. } => Some(*status),
            FailureKind::Transport { .. } => None,
        }
    }

    /// The Graph error object, when the answer had one.
    pub fn graph_error(&self) -> Option<&GraphError> {
        match &self.kind {
            FailureKind::Graph { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The call may have been a send.
    pub fn ambiguous(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Transport {
                ambiguous: true,
                ..
            } | FailureKind::NotASend {
                why: NotASend::NoTrackingId | NotASend::CutOff,
                ..
            }
        )
    }

    /// One line for headers and logs.
    pub fn message(&self) -> String {
        match &self.kind {
            FailureKind::Graph { error, .. } => error
                .best_message()
                .unwrap_or("Graph API error without a message")
                .to_string(),
            FailureKind::Http {
                status,
                body_snippet,
            } if body_snippet.is_empty() => format!("HTTP {status} with an empty body"),
            FailureKind::Http {
                status,
                body_snippet,
            } => format!("HTTP {status}: {body_snippet}"),
            FailureKind::NotASend {
                status,
                body_snippet,
                why,
            } => {
                let what = match why {
                    NotASend::NotJson => {
                        "not a Graph API answer (check MMSEND_GRAPH_BASE_URL and any proxy)"
                    }
                    NotASend::NotSuccess => "Meta did not report success",
                    NotASend::NoTrackingId => {
                        "success without a marketing_message_tracking_id; maybe sent"
                    }
                    NotASend::CutOff => "the answer was cut off; maybe sent",
                };
                if body_snippet.is_empty() {
                    format!("HTTP {status} with an empty body: {what}")
                } else {
                    format!("HTTP {status} {body_snippet}: {what}")
                }
            }
            FailureKind::Transport { message, .. } => message.clone(),
        }
    }
}

/// The Graph API client. Clone it freely (it shares one connection pool).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// `<base_url>/<version>`, parsed once: cloning it and pushing two path
    /// segments is much cheaper than parsing a URL string (host, IDNA) per
    /// request.
    base: reqwest::Url,
    app_secret: Option<Secret>,
    /// The base URL's password, as written and percent-decoded, for the
    /// [`Redactor`]; empty without one.
    url_password: Vec<String>,
}

/// One app subscribed to a page's webhooks (`GET /{page-id}/subscribed_apps`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct SubscribedApp {
    /// The app's name.
    #[serde(default)]
    pub name: String,
    /// The app's id.
    #[serde(default)]
    pub id: String,
    /// The webhook fields it is subscribed to.
    #[serde(default)]
    pub subscribed_fields: Vec<String>,
}

/// Why a [`Client`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// reqwest could not build a client (TLS backend, settings).
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    /// `base_url` is not an absolute `http` or `https` URL (shown without
    /// its user info).
    #[error(
        "the Graph API base URL {0:?} is not a valid http(s) URL; check MMSEND_GRAPH_BASE_URL"
    )]
    BaseUrl(String),
}

impl Client {
    /// A client with its own connection pool; fails on a bad base URL.
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .http1_only()
            // a paid POST is never sent again by the client itself: mmsend
            // owns retries, and a redirect (a proxy, a wrong base URL) is an
            // answer to classify, not a new request (reqwest would turn the
            // POST into a GET); both also save work per call
            .redirect(reqwest::redirect::Policy::none())
            .retry(reqwest::retry::never())
            .user_agent(concat!("mmsend/", env!("CARGO_PKG_VERSION")))
            .build()?;
        let url_prefix = format!(
            "{}/{}",
            config.base_url.trim_end_matches('/'),
            config.version.trim_matches('/')
        );
        let base = reqwest::Url::parse(&url_prefix)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| ClientError::BaseUrl(without_userinfo(&config.base_url)))?;
        let url_password = base
            .password()
            .map(|p| vec![p.to_string(), percent_decoded(p)])
            .unwrap_or_default();
        Ok(Client {
            http,
            base,
            app_secret: config.app_secret,
            url_password,
        })
    }

    /// A redactor for what the network says about one call.
    fn redactor<'a>(&'a self, token: &'a Secret, proof: Option<&'a str>) -> Redactor<'a> {
        Redactor::new(
            [
                Some(token.expose()),
                proof,
                self.app_secret.as_ref().map(Secret::expose),
            ]
            .into_iter()
            .flatten()
            .chain(self.url_password.iter().map(String::as_str)),
        )
    }

    /// With an app secret: `appsecret_proof` for `token` added to `url`'s
    /// query, and returned (for the redactor).
    fn prove(&self, url: &mut reqwest::Url, token: &Secret) -> Option<String> {
        let proof = self
            .app_secret
            .as_ref()
            .map(|secret| appsecret_proof(secret, token))?;
        url.query_pairs_mut().append_pair("appsecret_proof", &proof);
        Some(proof)
    }

    /// The endpoint for an ad account (digits, no `act_`).
    pub fn url(&self, ad_account_id: &str) -> reqwest::Url {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http(s) URLs are base URLs")
            .pop_if_empty()
            .push(&format!("act_{ad_account_id}"))
            .push("messages");
        url
    }

    /// `GET /{page-id}/subscribed_apps`: the apps subscribed to the page's
    /// webhooks and their fields (for `mmsend pages check`). The error is
    /// one line, secrets redacted.
    pub async fn subscribed_apps(
        &self,
        token: &Secret,
        page_id: &str,
    ) -> Result<Vec<SubscribedApp>, String> {
        let mut url = self.base.clone();
        url.path_segments_mut()
            .expect("http(s) URLs are base URLs")
            .pop_if_empty()
            .push(page_id)
            .push("subscribed_apps");
        let proof = self.prove(&mut url, token);
        let redactor = self.redactor(token, proof.as_deref());
        let mut response = self
            .http
            .get(url)
            .bearer_auth(token.expose())
            .send()
            .await
            .map_err(|e| error_text(e, &redactor))?;
        let status = response.status();
        let (body, end) = read_body(&mut response, MAX_SUCCESS_BODY).await;
        if !status.is_success() {
            return Err(match GraphError::parse(&body) {
                Some(mut error) => {
                    error.redact(&redactor);
                    format!(
                        "HTTP {}: {}",
                        status.as_u16(),
                        error.message.unwrap_or_default()
                    )
                }
                None => format!(
                    "HTTP {}: {}",
                    status.as_u16(),
                    snippet(&body, end, &redactor)
                ),
            });
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            data: Vec<SubscribedApp>,
        }
        serde_json::from_slice::<Answer>(&body)
            .map(|a| a.data)
            .map_err(|e| {
                format!(
                    "not a subscribed_apps answer ({e}): {}",
                    snippet(&body, end, &redactor)
                )
            })
    }

    /// Sends one marketing message.
    pub async fn send(&self, token: &Secret, req: &SendRequest<'_>) -> Outcome {
        let body = Body {
            message_id: req.message_id,
            messenger_delivery_data: DeliveryData {
                subscription_token: req.subscription_token,
            },
            message: req.message,
            min_conversation_gap_seconds: req.min_conversation_gap_seconds,
        };
        let mut url = self.url(req.ad_account_id);
        let proof = self.prove(&mut url, token);
        let response = self
            .http
            .post(url)
            .bearer_auth(token.expose())
            .json(&body)
            .send()
            .await;
        let redactor = || self.redactor(token, proof.as_deref());
        let mut response = match response {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(transport_failure(e, &redactor())),
        };
        let status = response.status().as_u16();
        let hint = UsageHint::from_headers(response.headers());
        let is_success = response.status().is_success();
        let limit = if is_success {
            MAX_SUCCESS_BODY
        } else {
            MAX_ERROR_BODY
        };
        let (body, end) = read_body(&mut response, limit).await;
        if is_success {
            let verdict = match success(&body) {
                Err(_) if !matches!(end, BodyEnd::Whole) => Err(NotASend::CutOff),
                other => other,
            };
            return match verdict {
                Ok(tracking_id) => Outcome::Sent { tracking_id, hint },
                Err(why) => Outcome::Failed(Failure {
                    kind: FailureKind::NotASend {
                        status,
                        body_snippet: snippet(&body, end, &redactor()),
                        why,
                    },
                    hint,
                }),
            };
        }
        let redactor = redactor();
        let kind = match GraphError::parse(&body) {
            Some(mut error) => {
                error.redact(&redactor);
                FailureKind::Graph { status, error }
            }
            None => FailureKind::Http {
                status,
                // an error body past its bound is an excerpt anyway
                body_snippet: match end {
                    BodyEnd::OverLimit => snippet(&body, BodyEnd::Whole, &redactor),
                    end => snippet(&body, end, &redactor),
                },
            },
        };
        Outcome::Failed(Failure { kind, hint })
    }
}

/// How reading a body ended.
enum BodyEnd {
    /// All of it was read.
    Whole,
    /// It ran past the bound; the rest was left unread.
    OverLimit,
    /// It broke off.
    Broken(reqwest::Error),
}

/// Reads at most `limit` bytes of the body.
async fn read_body(response: &mut reqwest::Response, limit: usize) -> (Vec<u8>, BodyEnd) {
    let expected = response.content_length().unwrap_or(0);
    let mut body = Vec::with_capacity(usize::try_from(expected).unwrap_or(limit).min(limit));
    loop {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = limit - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    return (body, BodyEnd::OverLimit);
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => return (body, BodyEnd::Whole),
            Err(e) => return (body, BodyEnd::Broken(e)),
        }
    }
}

/// The tracking id of a 2xx body that is a send, or why it is not one.
fn success(body: &[u8]) -> Result<String, NotASend> {
    let value: Value = serde_json::from_slice(body).map_err(|_| NotASend::NotJson)?;
    if value.get("success").and_then(Value::as_bool) != Some(true) {
        return Err(NotASend::NotSuccess);
    }
    value
        .get("marketing_message_tracking_id")
        .and_then(|v| match v {
            Value::String(s) if !s.is_empty() => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
        .ok_or(NotASend::NoTrackingId)
}

fn transport_failure(e: reqwest::Error, redactor: &Redactor<'_>) -> Failure {
    let (timeout, ambiguous) = (e.is_timeout(), !e.is_connect() && !e.is_builder());
    Failure {
        kind: FailureKind::Transport {
            timeout,
            ambiguous,
            message: error_text(e, redactor),
        },
        hint: UsageHint::default(),
    }
}

/// The HTTP client's error and its causes in one line: the URL it names
/// without query (`appsecret_proof`) and user info, then secrets redacted.
fn error_text(mut e: reqwest::Error, redactor: &Redactor<'_>) -> String {
    if let Some(url) = e.url_mut() {
        url.set_query(None);
        url.set_fragment(None);
        // both fail only on URLs that cannot have user info
        let _ = url.set_username("");
        let _ = url.set_password(None);
    }
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    redactor.redact(&message).into_owned()
}

/// A short, single-line, printable excerpt of a body that is not a Graph
/// answer, secrets redacted, and how the body ended if not whole.
fn snippet(body: &[u8], end: BodyEnd, redactor: &Redactor<'_>) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(SNIPPET_WINDOW)]);
    let folded = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = redactor.redact(&folded).into_owned();
    if out.chars().count() > 200 {
        out = out.chars().take(200).collect::<String>() + "…";
    }
    let note = match end {
        BodyEnd::Whole => return out,
        BodyEnd::OverLimit => format!(
            "(body cut off: longer than {} KiB)",
            MAX_SUCCESS_BODY / 1024
        ),
        BodyEnd::Broken(e) => format!("(body cut off: {})", error_text(e, redactor)),
    };
    let sep = if out.is_empty() { "" } else { " " };
    format!("{out}{sep}{note}")
}

/// A percent-encoded URL part, decoded (invalid escapes kept as written).
fn percent_decoded(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = (bytes[i] == b'%')
            .then(|| s.get(i + 1..i + 3))
            .flatten()
            .filter(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A base URL as the operator wrote it, with any `user:password@` replaced
/// by `***@`, for error messages about a URL that may not even parse.
fn without_userinfo(raw: &str) -> String {
    let start = raw.find("://").map_or(0, |i| i + 3);
    let authority_end = raw[start..]
        .find(['/', '?', '#'])
        .map_or(raw.len(), |i| start + i);
    match raw[start..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &raw[..start], &raw[start + at..]),
        None => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(base: &str) -> Result<Client, ClientError> {
        Client::new(ClientConfig {
            base_url: base.into(),
            ..ClientConfig::default()
        })
    }

    #[test]
    fn the_request_url_is_the_documented_path_under_any_base() {
        for (base, want) in [
            (
                "https://graph.facebook.com",
                "https://graph.facebook.com/v24.0/act_123/messages",
            ),
            (
                "http://127.0.0.1:8090/",
                "http://127.0.0.1:8090/v24.0/act_123/messages",
            ),
            (
                "http://proxy.local/graph",
                "http://proxy.local/graph/v24.0/act_123/messages",
            ),
        ] {
            assert_eq!(client(base).unwrap().url("123").as_str(), want, "{base}");
        }
    }

    #[test]
    fn only_success_with_a_tracking_id_is_a_send() {
        assert_eq!(
            success(br#"{"success":true,"marketing_message_tracking_id":"mm.1"}"#),
            Ok("mm.1".to_string())
        );
        assert_eq!(
            success(br#"{"success":true,"marketing_message_tracking_id":42}"#),
            Ok("42".to_string())
        );
        for (body, want) in [
            (&b"<html>captive portal</html>"[..], NotASend::NotJson),
            (b"", NotASend::NotJson),
            (br#"{"success":tru"#, NotASend::NotJson),
            (br#"{"success":false}"#, NotASend::NotSuccess),
            (br#"{"data":[]}"#, NotASend::NotSuccess),
            (
                br#"{"success":"true","marketing_message_tracking_id":"x"}"#,
                NotASend::NotSuccess,
            ),
            (br#"{"success":true}"#, NotASend::NoTrackingId),
            (
                br#"{"success":true,"marketing_message_tracking_id":""}"#,
                NotASend::NoTrackingId,
            ),
        ] {
            assert_eq!(
                success(body),
                Err(want),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn user_info_is_kept_out_of_messages_about_a_base_url() {
        for (raw, want) in [
            ("ftp://user:pw@host/x", "ftp://***@host/x"),
            ("user:pw@host", "***@host"),
            ("https://host/a@b", "https://host/a@b"),
            ("https://a:b@c@host?x=@", "https://***@host?x=@"),
            ("graph.facebook.com", "graph.facebook.com"),
            ("", ""),
        ] {
            assert_eq!(without_userinfo(raw), want, "{raw}");
        }
        let config = ClientConfig {
            base_url: "https://me:hunter2-secret@proxy.example".into(),
            app_secret: Some(Secret::new("app-secret-value")),
            ..ClientConfig::default()
        };
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("hunter2") && !shown.contains("app-secret-value"),
            "{shown}"
        );
        assert!(shown.contains("https://***@proxy.example"), "{shown}");
        let e = client("ftp://me:hunter2-secret@graph.example")
            .err()
            .expect("not http(s)")
            .to_string();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn the_base_url_password_is_redacted_as_written_and_decoded() {
        assert_eq!(percent_decoded("p%40ss%2Fw%zz%4"), "p@ss/w%zz%4");
        assert_eq!(percent_decoded("%+1%E2%9C%93"), "%+1✓");
        let c = client("http://u:p%40ssword-1@127.0.0.1:1").unwrap();
        let token = Secret::new("EAAB-unit-token");
        let text = c
            .redactor(&token, Some("proof-0123"))
            .redact("p@ssword-1 p%40ssword-1 EAAB-unit-token proof-0123")
            .into_owned();
        assert_eq!(
            text, "[redacted] [redacted] EAA…[redacted] [redacted]",
            "{text}"
        );
    }

    #[test]
    fn a_bad_base_url_is_refused_with_the_setting_to_fix() {
        for base in ["graph.facebook.com", "ftp://x", ""] {
            let e = client(base).err().expect(base).to_string();
            assert!(e.contains("MMSEND_GRAPH_BASE_URL"), "{e}");
        }
    }
}
