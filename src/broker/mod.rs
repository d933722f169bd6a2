//! RabbitMQ: the [`topology`] (queues, tiers, arguments), confirmed
//! [`publish`]ing, the [`headers`] that carry a job's story, and the
//! connection helper every command uses.

pub mod headers;
pub mod publish;
pub mod topology;

pub use publish::{PublishError, Publisher};
pub use topology::{Tier, Topology, TopologyError};

use lapin::{Connection, ConnectionProperties};

/// The default broker URL.
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to RabbitMQ at {url}: {source}. Is it running? Start it with `rabbitmq-server -detached` (or `deploy/local/ensure-rabbitmq.sh`), or point MMSEND_AMQP_URL at your broker")]
pub struct ConnectError {
    /// The URL with any password replaced by `***`.
    pub url: String,
    #[source]
    pub source: lapin::Error,
}

/// Connects with a connection name that shows up in the management UI
/// (`mmsend <role>`).
///
/// `urls` is one AMQP URL or a comma-separated list of the nodes of a
/// cluster: they are tried in order and the first that accepts wins, so a
/// reconnect after a node goes down lands on a node that is still up.
pub async fn connect(urls: &str, role: &str) -> Result<Connection, ConnectError> {
    let props =
        ConnectionProperties::default().with_connection_name(format!("mmsend {role}").into());
    let mut list: Vec<&str> = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect();
    if list.is_empty() {
        list.push(urls);
    }
    let mut last = None;
    for url in &list {
        match Connection::connect(url, props.clone()).await {
            Ok(conn) => return Ok(conn),
            Err(source) => last = Some(source),
        }
    }
    Err(ConnectError {
        url: list
            .iter()
            .map(|u| redact_url(u))
            .collect::<Vec<_>>()
            .join(", "),
        source: last.expect("at least one URL was tried"),
    })
}

/// `amqp://user:pass@host` → `amqp://user:***@host`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let Some(at) = rest.find('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redacts_passwords() {
        assert_eq!(
            super::redact_url("amqp://guest:secret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(super::redact_url("amqp://h:5672"), "amqp://h:5672");
    }
}
