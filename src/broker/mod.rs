//! RabbitMQ: the [`topology`] (queues, tiers, arguments), confirmed
//! [`publish`]ing, the [`headers`] that carry a job's story, and the
//! connection helper every command uses.

pub mod headers;
pub mod publish;
pub mod topology;

pub use publish::{PublishError, Publisher};
pub use topology::{
    DeclareReport, Tier, Topology, TopologyConfigError, TopologyError, TopologyWarning,
};

use std::time::Duration;

use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

pub use crate::config::defaults::DEFAULT_AMQP_URL;

/// How long one node may take to accept a connection (TCP, TLS and the
/// AMQP handshake) before the next URL of the list is tried.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a channel stays open after its last ack before it is closed. A
/// quorum queue applies acks asynchronously, and RabbitMQ 3.x drops those
/// still pending when their channel closes (rabbitmq-server#10327, seen on
/// 3.10.8): the messages come back to the queue although they were
/// settled — a DLQ scan's replayed or purged letters, a resume's parked
/// jobs, a worker's jobs whose copies were confirmed. AMQP does not say
/// when an ack is applied, so the closer waits.
pub const ACK_DRAIN: Duration = Duration::from_secs(1);

/// A bad `MMSEND_AMQP_URL`. Found at start, before any connection attempt;
/// retrying cannot fix it. The message shows the URL with its password
/// replaced by `***`, never the password.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// No URL at all (unset, or only commas and spaces).
    #[error("MMSEND_AMQP_URL is empty; set it to a RabbitMQ URL like amqp://user:password@host:5672/%2f")]
    Empty,
    /// One entry is not a complete `amqp://` or `amqps://` URL with a host.
    #[error("MMSEND_AMQP_URL: {shown} is not a RabbitMQ URL ({problem}); write it as amqp://user:password@host:5672/%2f (amqps:// for TLS), several separated by commas{hint}")]
    Invalid {
        /// The offending entry, password replaced by `***`.
        shown: String,
        /// What is wrong with it.
        problem: String,
        /// A likely cause, or empty.
        hint: &'static str,
    },
}

/// One broker URL, parsed and checked.
#[derive(Clone)]
pub struct AmqpUrl {
    uri: AMQPUri,
    /// The URL with any password replaced by `***`.
    shown: String,
}

impl std::fmt::Debug for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for AmqpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// Parses `MMSEND_AMQP_URL`: one URL or a comma-separated list of the nodes
/// of a cluster. Every entry must be a complete `amqp://` or `amqps://`
/// URL with a host; anything else is an error that names the entry
/// (password hidden) and what is wrong with it.
pub fn parse_urls(list: &str) -> Result<Vec<AmqpUrl>, UrlError> {
    let entries: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if entries.is_empty() {
        return Err(UrlError::Empty);
    }
    entries.into_iter().map(parse_url).collect()
}

fn parse_url(entry: &str) -> Result<AmqpUrl, UrlError> {
    let invalid = |problem: &str| UrlError::Invalid {
        shown: redact_invalid(entry),
        problem: problem.to_string(),
        hint: if entry.contains("://") {
            ""
        } else {
            " (a comma inside a password must be written %2C)"
        },
    };
    let Some((scheme, _)) = entry.split_once("://") else {
        return Err(invalid(match entry.split_once(':') {
            Some((s, _)) if s.eq_ignore_ascii_case("amqp") || s.eq_ignore_ascii_case("amqps") => {
                "the scheme must be followed by //"
            }
            _ => "it does not start with amqp:// or amqps://",
        }));
    };
    if !(scheme.eq_ignore_ascii_case("amqp") || scheme.eq_ignore_ascii_case("amqps")) {
        return Err(invalid("the scheme must be amqp or amqps"));
    }
    // The URL parser's messages name the problem, never the input; the AMQP
    // URI parser's can quote the whole URL, so the checks it would fail on
    // come first.
    let url = reqwest::Url::parse(entry).map_err(|e| invalid(&e.to_string()))?;
    if url.cannot_be_a_base() || url.host_str().is_none_or(str::is_empty) {
        return Err(invalid("it names no host"));
    }
    let uri: AMQPUri = entry.parse().map_err(|e: String| {
        // only query parameter errors are left: "invalid digit found in string"
        invalid(&format!(
            "a query parameter is not valid: {}",
            first_line(&e)
        ))
    })?;
    if !matches!(uri.scheme, AMQPScheme::AMQP | AMQPScheme::AMQPS) {
        return Err(invalid("the scheme must be amqp or amqps"));
    }
    Ok(AmqpUrl {
        shown: redact_url(entry),
        uri,
    })
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

/// A broker could not be reached (or the URL list is invalid).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The URL list is wrong; retrying cannot help.
    #[error(transparent)]
    InvalidUrl(#[from] UrlError),
    /// No node of the list accepted a connection.
    #[error("cannot connect to RabbitMQ at {url}: {reason}. Is it running? Start it with `rabbitmq-server -detached` (or `deploy/local/ensure-rabbitmq.sh`), or point MMSEND_AMQP_URL at your broker")]
    Unreachable {
        /// Every URL tried, passwords replaced by `***`.
        url: String,
        /// What went wrong with the last one.
        reason: String,
    },
}

impl ConnectError {
    /// Whether trying again later can help (the URL list is fine).
    pub fn is_retryable(&self) -> bool {
        matches!(self, ConnectError::Unreachable { .. })
    }
}

/// Connects with a connection name that shows up in the management UI
/// (`mmsend <role>`).
///
/// `urls` is one AMQP URL or a comma-separated list of the nodes of a
/// cluster ([`parse_urls`]; an invalid list fails at once): they are tried
/// in order, each for at most [`CONNECT_TIMEOUT`], and the first that
/// accepts wins, so a reconnect after a node goes down lands on a node that
/// is still up.
pub async fn connect(urls: &str, role: &str) -> Result<Connection, ConnectError> {
    let list = parse_urls(urls)?;
    connect_to(&list, role).await
}

/// [`connect`] with a list already parsed.
pub async fn connect_to(list: &[AmqpUrl], role: &str) -> Result<Connection, ConnectError> {
    let props =
        ConnectionProperties::default().with_connection_name(format!("mmsend {role}").into());
    let mut last = String::from("no URL given");
    for url in list {
        match tokio::time::timeout(
            CONNECT_TIMEOUT,
            Connection::connect_uri(url.uri.clone(), props.clone()),
        )
        .await
        {
            Ok(Ok(conn)) => return Ok(conn),
            Ok(Err(e)) => last = e.to_string(),
            Err(_) => {
                last = format!(
                    "{} did not complete the AMQP handshake within {} s",
                    url.shown,
                    CONNECT_TIMEOUT.as_secs()
                )
            }
        }
    }
    Err(ConnectError::Unreachable {
        url: list
            .iter()
            .map(|u| u.shown.clone())
            .collect::<Vec<_>>()
            .join(", "),
        reason: last,
    })
}

/// `amqp://user:pass@host` → `amqp://user:***@host`. The password ends at
/// the last `@`, so a password with an `@` in it is hidden whole.
pub fn redact_url(url: &str) -> String {
    let Some(at) = url.rfind('@') else {
        return url.to_string();
    };
    let (head, tail) = url.split_at(at);
    match head.find("://") {
        Some(scheme_end) => {
            let userinfo = &head[scheme_end + 3..];
            match userinfo.find(':') {
                Some(colon) => format!(
                    "{}{}:***{tail}",
                    &head[..scheme_end + 3],
                    &userinfo[..colon]
                ),
                None => url.to_string(),
            }
        }
        // `amqp:user:pass@host`: keep the scheme, hide the rest of the userinfo
        None => match head.split_once(':') {
            Some((scheme, _)) => format!("{scheme}:***{tail}"),
            None => format!("***{tail}"),
        },
    }
}

/// How an entry that failed to parse is shown: [`redact_url`], and without
/// an `@`, anything after a `:` that is not a port number is hidden too (a
/// comma inside a password splits it into two invalid entries).
fn redact_invalid(entry: &str) -> String {
    if entry.contains('@') {
        return redact_url(entry);
    }
    let (prefix, rest) = match entry.find("://") {
        Some(i) => entry.split_at(i + 3),
        None => ("", entry),
    };
    match rest.split_once(':') {
        Some((before, after))
            if !after
                .split(['/', '?'])
                .next()
                .unwrap_or("")
                .bytes()
                .all(|b| b.is_ascii_digit()) =>
        {
            format!("{prefix}{before}:***")
        }
        _ => entry.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
        assert_eq!(redact_url("amqp://u:p@ss@h"), "amqp://u:***@h");
        assert_eq!(redact_url("amqp:guest:PW@host:5672"), "amqp:***@host:5672");
        assert_eq!(
            redact_url("redis//:hunter2@host:6379"),
            "redis//:***@host:6379"
        );
        assert_eq!(redact_url("redis://:p@ss@host/0"), "redis://:***@host/0");
    }

    #[test]
    fn a_valid_list_parses() {
        let list = parse_urls(
            "amqp://guest:pw@127.0.0.1:5672/%2f, amqps://u:p@rabbit.example:5671/vh?heartbeat=10,amqp://h",
        )
        .unwrap();
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].to_string(), "amqp://guest:***@127.0.0.1:5672/%2f");
        assert_eq!(list[1].uri.query.heartbeat, Some(10));
    }

    #[test]
    fn malformed_urls_are_refused_without_their_password() {
        for (url, problem) in [
            ("amqp:guest:PW1@host:5672", "followed by //"),
            ("guest:PW1@host:5672", "does not start with amqp://"),
            ("http://guest:PW1@host:5672", "must be amqp or amqps"),
            ("amqp://guest:PW1@:5672", "host"),
            ("amqp://guest:PW1@host:notaport", "port"),
            (
                "amqp://guest:PW1@host:5672/%2f?heartbeat=soon",
                "query parameter",
            ),
            ("amqp://guest:PW1", "port"),
            ("amqp://guest:PW1,PW2@host", "port"),
        ] {
            let e = parse_urls(url).unwrap_err().to_string();
            assert!(e.contains(problem), "{url}: {e}");
            assert!(!e.contains("PW"), "{url}: {e}");
            assert!(e.contains("MMSEND_AMQP_URL"), "{url}: {e}");
        }
        assert!(matches!(parse_urls(" , "), Err(UrlError::Empty)));
    }
}
