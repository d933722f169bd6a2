//! The dead-letter console: `mmsend console` serves one topology's DLQ in
//! a browser — an overview grouped by reason, class, code, campaign and
//! page; a group's letters, paged; one letter's story; and confirmed
//! actions (replay a group or a letter, purge a group) with their progress.
//!
//! How it fits: it is a caller of the dead-letter library ([`crate::dlq`]),
//! like `mmsend dlq`, and prints nothing.
//!
//! - [`snapshot`]: one shared snapshot, never a scan per page view;
//! - [`actions`]: exact confirmed sets, acted on once;
//! - [`access`]: the connection and the DLQ lane (one scan at a time);
//! - [`auth`]: token, sessions, CSRF, loopback-only without a token;
//! - [`limit`]: who a client is, and how often it may send a wrong token;
//! - [`mask`]: what of a letter may reach a page;
//! - [`routes`] and [`views`]: the pages (askama templates in
//!   `templates/`, CSS and a little optional JavaScript in `static/`, all
//!   compiled into the binary: no CDN, no external fetch, usable without
//!   JavaScript).
//!
//! [`serve`] is the one entry point: it checks the configuration (a
//! non-loopback address needs a token), connects, takes the first snapshot
//! in the background and serves until `shutdown`, then stops a running
//! action cleanly (copies in flight settled, the rest returned).

mod access;
mod actions;
mod auth;
mod campaigns;
mod letters;
mod limit;
mod mask;
mod routes;
mod select;
mod snapshot;
mod views;

/// A percent-encoded query string (`?k=v&…`) or form body, as the console's
/// own links and forms write them (tests post forms with it).
pub use views::query;

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::broker::{ConnectError, Topology};
use crate::graph::Secret;

/// The default `--listen`.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9465";
/// What one letter costs a snapshot at most, in bytes, whatever headers and
/// body it carries (see the `snapshot` module).
pub const LETTER_BYTES_MAX: usize = snapshot::LETTER_BYTES_MAX;

/// The default `--refresh`: automatic snapshots at most this often.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(10);
/// The default `--max-letters`: a snapshot costs about 2.5 KiB of memory
/// per letter (resident set, measured at 100,000, docs/src/console.md), so about 600 MiB, and at most
/// [`LETTER_BYTES_MAX`] (6 KiB) per letter whatever the letters carry, so
/// at most about 1.5 GiB.
pub const DEFAULT_MAX_LETTERS: usize = 250_000;

/// How the console runs.
#[derive(Debug, Clone)]
pub struct ConsoleConfig {
    /// `host:port`; a host that is not loopback needs `token`.
    pub listen: String,
    /// RabbitMQ, as `MMSEND_AMQP_URL`.
    pub amqp_url: String,
    /// The topology whose DLQ the console shows.
    pub topology: Topology,
    /// `MMSEND_CONSOLE_TOKEN`: required on every request when set.
    pub token: Option<Secret>,
    /// Show the DLQ, change nothing.
    pub read_only: bool,
    /// Automatic snapshots at most this often.
    pub refresh: Duration,
    /// Letters a snapshot holds at most (the scan's hold bound); each costs
    /// at most [`LETTER_BYTES_MAX`] bytes.
    pub max_letters: usize,
    /// The replay rate a confirmation page offers (letters/s, 0 = no limit).
    pub replay_rate: u32,
    /// Reverse proxies whose `X-Forwarded-For` names the client that
    /// wrong-token limits count (see the `limit` module); empty: the peer
    /// address is the client.
    pub trusted_proxies: Vec<IpAddr>,
    /// The workers' Redis, for the Campaigns pages and the audit trail
    /// (`None`: the pages say they need it).
    pub redis: Option<crate::fleet::FleetConfig>,
    /// Grafana's address (`https://grafana.example`): each campaign links
    /// to the mmsend dashboard over the time its letters died.
    pub grafana_url: Option<String>,
}

impl ConsoleConfig {
    /// The defaults around a broker and a topology.
    pub fn new(amqp_url: &str, topology: Topology) -> ConsoleConfig {
        ConsoleConfig {
            listen: DEFAULT_LISTEN.into(),
            amqp_url: amqp_url.into(),
            topology,
            token: None,
            read_only: false,
            refresh: DEFAULT_REFRESH,
            max_letters: DEFAULT_MAX_LETTERS,
            replay_rate: 0,
            trusted_proxies: Vec::new(),
            redis: None,
            grafana_url: None,
        }
    }
}

/// Why the console did not start or stopped.
#[derive(Debug, thiserror::Error)]
#[allow(missing_docs)] // each variant's message says what it is
pub enum ConsoleError {
    #[error("--listen {listen:?}: {reason}; give host:port, e.g. 127.0.0.1:9465")]
    Address { listen: String, reason: String },
    #[error("refusing to listen on {listen} without MMSEND_CONSOLE_TOKEN: that address is reachable from other machines, and the console can replay and purge dead letters. Set MMSEND_CONSOLE_TOKEN (at least {} characters), or listen on 127.0.0.1 and reach it through an SSH tunnel", auth::MIN_TOKEN_CHARS)]
    NeedsToken { listen: String },
    #[error("MMSEND_CONSOLE_TOKEN {0}")]
    BadToken(String),
    #[error("--max-letters must be at least 1")]
    MaxLetters,
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        listen: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Redis(#[from] crate::fleet::FleetError),
    #[error("the console's HTTP server failed: {0}")]
    Serve(#[source] std::io::Error),
}

/// What every request handler shares.
pub(crate) struct Shared {
    /// The broker connection and the console's DLQ lane.
    pub(crate) access: Arc<access::Access>,
    /// The one shared snapshot.
    pub(crate) snapshots: Arc<snapshot::Snapshots>,
    /// Confirmed actions, once each.
    pub(crate) actions: Arc<actions::Actions>,
    /// Token, sessions and CSRF.
    pub(crate) auth: auth::Auth,
    /// Wrong-token limits per client.
    pub(crate) limits: limit::Limits,
    /// Actions hidden and refused.
    pub(crate) read_only: bool,
    /// The replay rate a confirmation page offers.
    pub(crate) replay_rate: u32,
    /// The port listened on (for messages).
    pub(crate) port: u16,
    /// Campaign state, counters and audit (with `MMSEND_REDIS_URL`).
    pub(crate) campaigns: Option<crate::fleet::campaign::Campaigns>,
    /// Queue depths read live, shared by views for a moment.
    pub(crate) depths: Arc<letters::Depths>,
    /// Grafana's address, to link campaigns to the dashboard.
    pub(crate) grafana: Option<String>,
}

/// Resolves `listen` and checks that it may be served as configured:
/// a non-loopback address needs a token, a token must be long enough.
/// Returns the address to bind.
pub async fn check(config: &ConsoleConfig) -> Result<SocketAddr, ConsoleError> {
    let bad = |reason: String| ConsoleError::Address {
        listen: config.listen.clone(),
        reason,
    };
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(config.listen.as_str())
        .await
        .map_err(|e| bad(e.to_string()))?
        .collect();
    let first = *addrs
        .first()
        .ok_or_else(|| bad("resolves to no address".into()))?;
    match &config.token {
        Some(t) if t.expose().chars().count() < auth::MIN_TOKEN_CHARS => {
            return Err(ConsoleError::BadToken(format!(
                "is too short: use at least {} characters (e.g. `openssl rand -hex 24`)",
                auth::MIN_TOKEN_CHARS
            )))
        }
        Some(t)
            if t.expose()
                .chars()
                .any(|c| c.is_whitespace() || c.is_control()) =>
        {
            return Err(ConsoleError::BadToken(
                "has whitespace in it; give the token alone".into(),
            ))
        }
        Some(_) => {}
        None if addrs.iter().all(|a| a.ip().is_loopback()) => {}
        None => {
            return Err(ConsoleError::NeedsToken {
                listen: config.listen.clone(),
            })
        }
    }
    if config.max_letters == 0 {
        return Err(ConsoleError::MaxLetters);
    }
    Ok(first)
}

/// Serves the console until `shutdown`; `ready` hears the address it
/// listens on (the port, when `--listen` asked for port 0) once it does.
pub async fn serve(
    config: ConsoleConfig,
    shutdown: CancellationToken,
    ready: impl FnOnce(SocketAddr),
) -> Result<(), ConsoleError> {
    let addr = check(&config).await?;
    let access = Arc::new(access::Access::new(
        &config.amqp_url,
        config.topology.clone(),
    ));
    // fail at start, with the broker's reason, rather than on the first page
    access.connection().await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ConsoleError::Bind {
            listen: config.listen.clone(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| ConsoleError::Bind {
        listen: config.listen.clone(),
        source,
    })?;
    let stopping = CancellationToken::new();
    let campaigns = match &config.redis {
        Some(redis) => Some(crate::fleet::campaign::Campaigns::lazy(
            redis,
            &config.topology.prefix,
        )?),
        None => None,
    };
    let actions =
        actions::Actions::new(config.max_letters, stopping.clone()).with_store(campaigns.clone());
    // the Actions page lists the earlier runs' actions (with Redis)
    actions.restore().await;
    let shared = Arc::new(Shared {
        snapshots: Arc::new(snapshot::Snapshots::new(
            config.refresh,
            config.max_letters,
            stopping.clone(),
        )),
        actions: Arc::new(actions),
        auth: auth::Auth::new(config.token.clone()),
        limits: limit::Limits::new(config.trusted_proxies.clone()),
        read_only: config.read_only,
        replay_rate: config.replay_rate,
        port: bound.port(),
        access: access.clone(),
        campaigns,
        depths: Arc::new(letters::Depths::new()),
        grafana: config
            .grafana_url
            .as_deref()
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty()),
    });
    shared.snapshots.refresh(&access, true);
    tracing::info!(%bound, prefix = %config.topology.prefix, read_only = config.read_only, "dead-letter console listening");
    ready(bound);
    let app = routes::router(shared.clone());
    let served = axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await;
    // stop a running scan (snapshot or action) cleanly: copies in flight
    // settled, held letters returned in order; wait until it let go
    stopping.cancel();
    let _lane = tokio::time::timeout(Duration::from_secs(60), access.lane()).await;
    // and let the actions record how they ended (audit trail, Redis)
    shared.actions.settle().await;
    access.close().await;
    served.map_err(ConsoleError::Serve)
}
