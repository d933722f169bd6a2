//! `mmsend webhooks`: the receiver of Meta's page webhooks (DESIGN §14).
//!
//! It does one thing and must never lose what it took: each `POST
//! /webhooks` whose `X-Hub-Signature-256` proves it came from Meta is put,
//! byte for byte as received, on the `<prefix>.webhooks` quorum queue with
//! a confirmed, mandatory publish, and only then answered 200. Joining the
//! events to jobs is the tracker's work, not the receiver's: it stays fast
//! (Meta wants a 200 within 5 s) and has no state to lose.
//!
//! - `GET /webhooks` is Meta's verification handshake: `hub.mode=subscribe`
//!   with the configured `hub.verify_token` → 200 with `hub.challenge` as
//!   the body; anything else → 403.
//! - `POST /webhooks`: the signature is HMAC-SHA256 of the raw body keyed
//!   with the app secret, checked in constant time over the bytes as
//!   received (never re-serialised). Missing or wrong → 403, counted, nothing
//!   stored. A body over the bound ([`MAX_BODY`] by default) → 413. The
//!   broker did not confirm the copy (connection down, queue missing, nack)
//!   → 503, so Meta delivers it again; Meta unsubscribes an app from a page
//!   after about an hour of failures, which is why the receiver's own
//!   readiness and `mmsend_webhook_requests_total{result="unavailable"}`
//!   are alerted on.
//! - A payload that is signed but not JSON is still stored: it is Meta's,
//!   and the tracker (not the receiver) decides what to do with it.
//!
//! The stored message carries `content_type: application/json`, a
//! `timestamp` (when it was received) and the header
//! `x-mmsend-received-at` (RFC 3339); the signature is not kept (it proves
//! nothing once the receiver has checked it, and is keyed with a secret).
//!
//! The connection to RabbitMQ is opened at start (a receiver that cannot
//! store anything fails at once, with the broker's reason), and opened again
//! (declaring the topology again) on the next post after it was lost, after
//! a publish came back unroutable (the queue was deleted) or its confirm
//! did not come in time; while RabbitMQ cannot take a payload every post is
//! a 503.

pub mod events;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hmac::{Hmac, Mac};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde::Deserialize;
use sha2::Sha256;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use crate::broker::{self, PublishError, Publisher, Topology};
use crate::graph::auth::Secret;
use crate::metrics::Metrics;

/// Where the receiver listens unless told otherwise.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9466";

/// The largest body taken, bytes. Meta batches events of several pages into
/// one post; each event is a few hundred bytes, so 1 MiB holds thousands.
pub const MAX_BODY: usize = 1024 * 1024;

/// How long a post waits for the broker's confirm before it is a 503 (Meta
/// gives the whole request 5 s).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(4);

/// What the receiver needs.
#[derive(Clone)]
pub struct WebhookConfig {
    /// RabbitMQ URL(s).
    pub amqp_url: String,
    /// The topology (its prefix names the queue).
    pub topology: Topology,
    /// Address to listen on.
    pub listen: String,
    /// The token Meta echoes in the verification handshake.
    pub verify_token: Secret,
    /// The app secret that keys every post's signature.
    pub app_secret: Secret,
    /// The largest body taken, bytes.
    pub max_body: usize,
}

/// The receiver could not start.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    /// A secret is missing or unusable.
    #[error("{0}")]
    Config(String),
    /// RabbitMQ cannot be reached or the queue cannot be declared.
    #[error("cannot reach RabbitMQ to store webhook payloads: {0}")]
    Broker(String),
    /// The address cannot be served.
    #[error(
        "cannot listen on {listen}: {source}; give --listen (MMSEND_WEBHOOK_LISTEN) a free address"
    )]
    Bind {
        /// The address asked for.
        listen: String,
        /// Why.
        source: std::io::Error,
    },
    /// [`spawn`]: the receiver ended (stopped, or its task panicked) before
    /// it listened.
    #[error("the webhook receiver stopped before it listened")]
    Stopped,
}

/// The receiver's state: the secrets, the publisher (opened again after a
/// lost connection), the metrics.
struct Receiver {
    config: WebhookConfig,
    /// The keyed HMAC, cloned per request (no key schedule per post).
    mac: Hmac<Sha256>,
    queue: String,
    publisher: Mutex<Option<Link>>,
    /// Counts the links opened: a failed post closes only the link it used
    /// (not one another post has opened since).
    opened: std::sync::atomic::AtomicU64,
    metrics: Arc<Metrics>,
}

/// An open connection and its confirm-mode publisher.
struct Link {
    id: u64,
    conn: Connection,
    publisher: Publisher,
}

impl Receiver {
    /// The confirm-mode publisher and its link's id, opened (and the
    /// topology declared) if there is none or its connection was lost.
    async fn publisher(&self) -> Result<(u64, Publisher), String> {
        let mut slot = self.publisher.lock().await;
        if let Some(l) = slot.as_ref() {
            if l.conn.status().connected() && l.publisher.channel().status().connected() {
                return Ok((l.id, l.publisher.clone()));
            }
        }
        if let Some(old) = slot.take() {
            close(old);
        }
        self.metrics.set_ready(false);
        let role = format!("webhooks {}", self.config.topology.prefix);
        let conn = broker::connect(&self.config.amqp_url, &role)
            .await
            .map_err(|e| e.to_string())?;
        self.config
            .topology
            .declare(&conn)
            .await
            .map_err(|e| e.to_string())?;
        let publisher = Publisher::open(&conn, self.config.topology.exchange())
            .await
            .map_err(|e| e.to_string())?;
        let id = self
            .opened
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *slot = Some(Link {
            id,
            conn,
            publisher: publisher.clone(),
        });
        self.metrics.set_ready(true);
        Ok((id, publisher))
    }

    /// Closes link `id` if it is still the open one: the next post opens
    /// and declares again.
    async fn drop_link(&self, id: u64) {
        let mut slot = self.publisher.lock().await;
        if slot.as_ref().is_some_and(|l| l.id == id) {
            if let Some(old) = slot.take() {
                close(old);
            }
            self.metrics.set_ready(false);
        }
    }

    /// Stores `body` and says so only once the broker confirmed it.
    async fn store(&self, body: &[u8]) -> Result<(), String> {
        let (link, publisher) = self.publisher().await?;
        let now = chrono::Utc::now();
        let mut headers = FieldTable::default();
        headers.insert(
            "x-mmsend-received-at".into(),
            AMQPValue::LongString(now.to_rfc3339().into()),
        );
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_timestamp(u64::try_from(now.timestamp()).unwrap_or(0))
            .with_headers(headers);
        let outcome = tokio::time::timeout(
            CONFIRM_TIMEOUT,
            publisher.publish(&self.queue, body, properties),
        )
        .await;
        let why = match outcome {
            Ok(Ok(())) => return Ok(()),
            // a full queue said no: the connection is fine
            Ok(Err(e @ PublishError::Nacked { .. })) => return Err(e.to_string()),
            // the queue is gone (deleted under us) or the channel failed:
            // the next post opens and declares again
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "no confirm from RabbitMQ within {}s",
                CONFIRM_TIMEOUT.as_secs()
            ),
        };
        self.drop_link(link).await;
        Err(why)
    }
}

/// Closes a link in the background (a post does not wait for it).
fn close(link: Link) {
    tokio::spawn(async move {
        let _ = link
            .conn
            .close(200, "webhook receiver: opening a new connection".into())
            .await;
    });
}

/// Whether `header` (`sha256=<hex>`) is the HMAC-SHA256 of `body` under the
/// receiver's key; the comparison takes the same time wherever it differs.
fn signed(mac: &Hmac<Sha256>, header: Option<&str>, body: &[u8]) -> bool {
    let Some(hex_sig) = header.and_then(|h| h.trim().strip_prefix("sha256=")) else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = mac.clone();
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

/// The signature header Meta sends for `body` under `app_secret`: what the
/// simulator and the tests sign with.
pub fn signature(app_secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        crate::graph::auth::hmac_sha256_hex(app_secret.as_bytes(), body)
    )
}

#[derive(Deserialize)]
struct Handshake {
    #[serde(rename = "hub.mode")]
    mode: Option<String>,
    #[serde(rename = "hub.verify_token")]
    verify_token: Option<String>,
    #[serde(rename = "hub.challenge")]
    challenge: Option<String>,
}

async fn verify(State(r): State<Arc<Receiver>>, Query(q): Query<Handshake>) -> Response {
    // constant time: the token is a secret too
    let token_ok = q.verify_token.as_deref().is_some_and(|t| {
        crate::graph::auth::constant_time_eq(
            t.as_bytes(),
            r.config.verify_token.expose().as_bytes(),
        )
    });
    match (q.mode.as_deref(), token_ok, q.challenge) {
        (Some("subscribe"), true, Some(challenge)) => {
            r.metrics.webhook_request("verified");
            tracing::info!("webhook subscription verified");
            (StatusCode::OK, challenge).into_response()
        }
        _ => {
            r.metrics.webhook_request("verify_refused");
            tracing::warn!(
                "webhook verification refused: wrong or missing hub.verify_token or hub.mode"
            );
            (StatusCode::FORBIDDEN, "verification refused\n").into_response()
        }
    }
}

async fn receive(
    State(r): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(e) => {
            let too_large = e.status() == StatusCode::PAYLOAD_TOO_LARGE;
            r.metrics.webhook_request(if too_large {
                "too_large"
            } else {
                "bad_request"
            });
            tracing::warn!(error = %e.body_text(), "webhook post refused");
            return (e.status(), e.body_text()).into_response();
        }
    };
    let header = headers
        .get("x-hub-signature-256")
        .and_then(|v| v.to_str().ok());
    if !signed(&r.mac, header, &body) {
        let why = if header.is_none() {
            "missing"
        } else {
            "does not match the body"
        };
        r.metrics.webhook_request("bad_signature");
        tracing::warn!(
            bytes = body.len(),
            "webhook post refused: X-Hub-Signature-256 {why} (is MMSEND_APP_SECRET the app's secret?)"
        );
        return (StatusCode::FORBIDDEN, "bad signature\n").into_response();
    }
    match r.store(&body).await {
        Ok(()) => {
            r.metrics.webhook_request("stored");
            tracing::debug!(bytes = body.len(), "webhook payload stored");
            (StatusCode::OK, "ok\n").into_response()
        }
        Err(e) => {
            r.metrics.webhook_request("unavailable");
            tracing::error!(error = %e, "webhook payload NOT stored; answered 503 so Meta sends it again");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot store the payload now; send it again\n",
            )
                .into_response()
        }
    }
}

/// The receiver's routes: `/webhooks` (GET, POST) beside `/metrics`,
/// `/healthz` and `/readyz` (ready while connected to RabbitMQ).
fn router(r: Arc<Receiver>) -> Router {
    Router::new()
        .route("/webhooks", get(verify).post(receive))
        .layer(DefaultBodyLimit::max(r.config.max_body))
        .with_state(r.clone())
        .merge(crate::metrics::router(r.metrics.clone()))
}

/// Checks the secrets (present, no whitespace: the token rules) and the
/// body bound.
fn check(config: &WebhookConfig) -> Result<(), WebhookError> {
    for (var, s) in [
        ("MMSEND_WEBHOOK_VERIFY_TOKEN", &config.verify_token),
        ("MMSEND_APP_SECRET", &config.app_secret),
    ] {
        crate::graph::auth::clean_token(s.expose(), var)
            .map_err(|e| WebhookError::Config(e.to_string()))?;
    }
    if config.max_body == 0 {
        return Err(WebhookError::Config(
            "--max-body must be at least 1 byte".into(),
        ));
    }
    Ok(())
}

/// [`serve`] on a task of its own, once it listens: its address and the
/// task (it runs until `shutdown`). A receiver that cannot start answers
/// its error here.
pub async fn spawn(
    config: WebhookConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) -> Result<
    (
        SocketAddr,
        tokio::task::JoinHandle<Result<(), WebhookError>>,
    ),
    WebhookError,
> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(serve(config, metrics, shutdown, move |addr| {
        let _ = tx.send(addr);
    }));
    match rx.await {
        Ok(addr) => Ok((addr, task)),
        Err(_) => match task.await {
            Ok(Err(e)) => Err(e),
            _ => Err(WebhookError::Stopped),
        },
    }
}

/// Serves the receiver until `shutdown`; `ready` hears the bound address.
pub async fn serve(
    config: WebhookConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), WebhookError> {
    check(&config)?;
    metrics.webhook_receiver_started();
    let mac = Hmac::<Sha256>::new_from_slice(config.app_secret.expose().as_bytes())
        .map_err(|e| WebhookError::Config(e.to_string()))?;
    let receiver = Arc::new(Receiver {
        queue: config.topology.webhook_queue(),
        config: config.clone(),
        mac,
        publisher: Mutex::new(None),
        opened: std::sync::atomic::AtomicU64::new(0),
        metrics,
    });
    // a receiver that cannot store anything fails at start, saying why
    receiver.publisher().await.map_err(WebhookError::Broker)?;
    let listener = tokio::net::TcpListener::bind(&config.listen)
        .await
        .map_err(|source| WebhookError::Bind {
            listen: config.listen.clone(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| WebhookError::Bind {
        listen: config.listen.clone(),
        source,
    })?;
    tracing::info!(%bound, queue = %receiver.queue, "webhook receiver listening");
    ready(bound);
    axum::serve(listener, router(receiver.clone()))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(|source| WebhookError::Bind {
            listen: config.listen.clone(),
            source,
        })?;
    if let Some(link) = receiver.publisher.lock().await.take() {
        let _ = link
            .conn
            .close(200, "webhook receiver stopping".into())
            .await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_checked_over_the_raw_bytes() {
        let body = br#"{"object":"page","entry":[]}"#;
        let mac = Hmac::<Sha256>::new_from_slice(b"app-secret").unwrap();
        let good = signature("app-secret", body);
        assert!(signed(&mac, Some(&good), body));
        // the same JSON with other spacing is another body
        assert!(!signed(
            &mac,
            Some(&good),
            br#"{"object": "page","entry":[]}"#
        ));
        assert!(!signed(&mac, Some(&signature("other", body)), body));
        assert!(!signed(&mac, None, body));
        assert!(!signed(&mac, Some("sha1=00"), body));
        assert!(!signed(&mac, Some("sha256=zz"), body));
        assert!(!signed(&mac, Some(&good[..good.len() - 2]), body));
    }
}
