//! One Graph API call: `POST {base}/{version}/act_{ad_account_id}/messages`.
//!
//! One [`Client`] per process wraps one `reqwest::Client` (HTTP/1.1
//! keep-alive pool, rustls, connect and whole-request timeouts). The token
//! goes in `Authorization: Bearer …`, never in the URL; with an app secret
//! configured, `appsecret_proof` goes in the JSON body, so URLs (which show up
//! in transport errors) carry nothing secret.
//!
//! [`Client::send`] never returns a Rust error: every way a call can end is an
//! [`Outcome`]. A transport failure after the connection was established is
//! flagged `ambiguous`, because Meta may have processed the request before
//! the answer was lost.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use super::auth::{appsecret_proof, Secret};
use super::error::{GraphError, UsageHint};
use crate::job::Job;

/// Longest error body kept, in bytes; the rest is discarded unread.
const MAX_ERROR_BODY: usize = 16 * 1024;

/// How to reach the Graph API.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// e.g. `https://graph.facebook.com` (no trailing slash needed).
    pub base_url: String,
    /// e.g. `v24.0`.
    pub version: String,
    pub connect_timeout: Duration,
    /// Whole request, body included.
    pub request_timeout: Duration,
    /// Idle keep-alive connections kept per host; the worker sets it to its
    /// concurrency so a busy pool never reconnects.
    pub pool_max_idle_per_host: usize,
    pub app_secret: Option<Secret>,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            base_url: "https://graph.facebook.com".into(),
            version: "v24.0".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            pool_max_idle_per_host: 64,
            app_secret: None,
        }
    }
}

/// The parts of a job the API call needs.
#[derive(Debug, Clone, Copy)]
pub struct SendRequest<'a> {
    pub ad_account_id: &'a str,
    pub message_id: &'a str,
    pub subscription_token: &'a str,
    pub message: Option<&'a Value>,
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
    #[serde(skip_serializing_if = "Option::is_none")]
    appsecret_proof: Option<String>,
}

/// How a call ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    Sent {
        /// `marketing_message_tracking_id`, when Meta sent one.
        tracking_id: Option<String>,
        hint: UsageHint,
    },
    Failed(Failure),
}

/// A failed call: what happened plus whatever throttling hints came with it.
#[derive(Debug, Clone)]
pub struct Failure {
    pub kind: FailureKind,
    pub hint: UsageHint,
}

#[derive(Debug, Clone)]
pub enum FailureKind {
    /// A non-2xx answer with a Graph error object.
    Graph { status: u16, error: GraphError },
    /// A non-2xx answer without one (HTML, empty, cut off).
    Http { status: u16, body_snippet: String },
    /// No HTTP answer at all.
    Transport {
        timeout: bool,
        /// The request may have reached Meta (the connection was up).
        ambiguous: bool,
        message: String,
    },
}

impl Failure {
    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            FailureKind::Graph { status, .. } | FailureKind::Http { status, .. } => Some(*status),
            FailureKind::Transport { .. } => None,
        }
    }

    pub fn graph_error(&self) -> Option<&GraphError> {
        match &self.kind {
            FailureKind::Graph { error, .. } => Some(error),
            _ => None,
        }
    }

    pub fn ambiguous(&self) -> bool {
        matches!(
            self.kind,
            FailureKind::Transport {
                ambiguous: true,
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
}

/// Why a [`Client`] could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error(
        "the Graph API base URL {0:?} is not a valid http(s) URL; check MMSEND_GRAPH_BASE_URL"
    )]
    BaseUrl(String),
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, ClientError> {
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .timeout(config.request_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
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
            .ok_or_else(|| ClientError::BaseUrl(config.base_url.clone()))?;
        Ok(Client {
            http,
            base,
            app_secret: config.app_secret,
        })
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

    /// Sends one marketing message.
    pub async fn send(&self, token: &Secret, req: &SendRequest<'_>) -> Outcome {
        let body = Body {
            message_id: req.message_id,
            messenger_delivery_data: DeliveryData {
                subscription_token: req.subscription_token,
            },
            message: req.message,
            min_conversation_gap_seconds: req.min_conversation_gap_seconds,
            appsecret_proof: self.app_secret.as_ref().map(|s| appsecret_proof(s, token)),
        };
        let response = self
            .http
            .post(self.url(req.ad_account_id))
            .bearer_auth(token.expose())
            .json(&body)
            .send()
            .await;
        let mut response = match response {
            Ok(r) => r,
            Err(e) => return Outcome::Failed(transport_failure(&e)),
        };
        let status = response.status().as_u16();
        let hint = UsageHint::from_headers(response.headers());
        if response.status().is_success() {
            // A 2xx means Meta accepted the send; the tracking id is
            // welcome but never required.
            let tracking_id = match response.bytes().await {
                Ok(b) => serde_json::from_slice::<Value>(&b).ok().and_then(|v| {
                    v.get("marketing_message_tracking_id")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                }),
                Err(_) => None,
            };
            return Outcome::Sent { tracking_id, hint };
        }
        let mut body = Vec::new();
        let mut read_error = None;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = MAX_ERROR_BODY - body.len();
                    body.extend_from_slice(&chunk[..chunk.len().min(room)]);
                    if body.len() >= MAX_ERROR_BODY {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    read_error = Some(e);
                    break;
                }
            }
        }
        let kind = match GraphError::parse(&body) {
            Some(error) => FailureKind::Graph { status, error },
            None => FailureKind::Http {
                status,
                body_snippet: snippet(&body, read_error.as_ref()),
            },
        };
        Outcome::Failed(Failure { kind, hint })
    }
}

fn transport_failure(e: &reqwest::Error) -> Failure {
    let mut message = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Failure {
        kind: FailureKind::Transport {
            timeout: e.is_timeout(),
            ambiguous: !e.is_connect() && !e.is_builder(),
            message,
        },
        hint: UsageHint::default(),
    }
}

/// A short, single-line, printable excerpt of a non-JSON error body.
fn snippet(body: &[u8], read_error: Option<&reqwest::Error>) -> String {
    let text = String::from_utf8_lossy(body);
    let mut out: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.chars().count() > 200 {
        out = out.chars().take(200).collect::<String>() + "…";
    }
    if let Some(e) = read_error {
        let sep = if out.is_empty() { "" } else { " " };
        out = format!("{out}{sep}(body cut off: {e})");
    }
    out
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
    fn a_bad_base_url_is_refused_with_the_setting_to_fix() {
        for base in ["graph.facebook.com", "ftp://x", ""] {
            let e = client(base).err().expect(base).to_string();
            assert!(e.contains("MMSEND_GRAPH_BASE_URL"), "{e}");
        }
    }
}
