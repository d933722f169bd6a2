//! `mmsend healthcheck`: asks a worker's own `/readyz` (or `/healthz`) and
//! answers yes or no, for probes that have no shell, curl or wget (a
//! distroless image, Docker's `HEALTHCHECK`, a Kubernetes exec probe).
//!
//! The worker serves its endpoints on `MMSEND_METRICS_ADDR` (the `metrics` module);
//! the probe reads the same variable, so one setting serves both. A wildcard
//! bind (`0.0.0.0`, `::`) is asked on the loopback address of its family. The
//! request is one plain `HTTP/1.0` GET and only the status line decides, so
//! the probe needs no HTTP client, no TLS setup and no proxy settings.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Which endpoint to ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// `/readyz`: connected to RabbitMQ and consuming.
    Ready,
    /// `/healthz`: the process runs and serves HTTP.
    Live,
}

impl Endpoint {
    pub(crate) fn path(self) -> &'static str {
        match self {
            Endpoint::Ready => "/readyz",
            Endpoint::Live => "/healthz",
        }
    }
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum HealthError {
    #[error("MMSEND_METRICS_ADDR {addr:?} is not host:port ({problem}); write e.g. 0.0.0.0:9464")]
    Address { addr: String, problem: String },
    #[error("nothing answers on {target} ({source}); is the worker running, with this MMSEND_METRICS_ADDR?")]
    Connect {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url}: {source}")]
    Io {
        url: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{url} did not answer within {timeout:?}")]
    Timeout { url: String, timeout: Duration },
    #[error("{url} answered {status}: {body}")]
    Unhealthy {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url} sent no HTTP status line (got {line:?}); is something else listening there?")]
    NotHttp { url: String, line: String },
}

/// A passed probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Healthy {
    pub(crate) url: String,
    pub(crate) status: u16,
}

/// The `host:port` to dial for a worker bound to `configured`: a wildcard
/// address becomes the loopback address of its family, anything else is
/// dialled as written.
pub(crate) fn dial_target(configured: &str) -> Result<String, HealthError> {
    let bad = |problem: &str| HealthError::Address {
        addr: configured.to_string(),
        problem: problem.to_string(),
    };
    if let Ok(addr) = configured.parse::<SocketAddr>() {
        let ip = match addr.ip() {
            IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
            ip => ip,
        };
        if addr.port() == 0 {
            return Err(bad(
                "port 0 means any free port; the probe needs the real one",
            ));
        }
        return Ok(SocketAddr::new(ip, addr.port()).to_string());
    }
    let (host, port) = configured.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(0) => Err(bad(
            "port 0 means any free port; the probe needs the real one",
        )),
        Ok(_) if !host.is_empty() => Ok(configured.to_string()),
        Ok(_) => Err(bad("no host")),
        Err(_) => Err(bad("the port is not a number from 1 to 65535")),
    }
}

/// Asks `endpoint` of the worker bound to `configured`; `Ok` only for a
/// 2xx answer within `timeout`.
pub(crate) async fn check(
    configured: &str,
    endpoint: Endpoint,
    timeout: Duration,
) -> Result<Healthy, HealthError> {
    let target = dial_target(configured)?;
    let url = format!("http://{target}{}", endpoint.path());
    match tokio::time::timeout(timeout, ask(&target, &url, endpoint)).await {
        Ok(result) => result,
        Err(_) => Err(HealthError::Timeout { url, timeout }),
    }
}

async fn ask(target: &str, url: &str, endpoint: Endpoint) -> Result<Healthy, HealthError> {
    let mut stream = tokio::net::TcpStream::connect(target)
        .await
        .map_err(|source| HealthError::Connect {
            target: target.to_string(),
            source,
        })?;
    let io = |source| HealthError::Io {
        url: url.to_string(),
        source,
    };
    let request = format!(
        "GET {} HTTP/1.0\r\nHost: {target}\r\nUser-Agent: mmsend-healthcheck\r\nConnection: close\r\n\r\n",
        endpoint.path()
    );
    stream.write_all(request.as_bytes()).await.map_err(io)?;
    // Our endpoints answer a few bytes; read at most 4 KiB of anything else.
    let mut answer = Vec::new();
    (&mut stream)
        .take(4096)
        .read_to_end(&mut answer)
        .await
        .map_err(io)?;
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or("");
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| HealthError::NotHttp {
            url: url.to_string(),
            line: status_line.chars().take(80).collect(),
        })?;
    if (200..300).contains(&status) {
        Ok(Healthy {
            url: url.to_string(),
            status,
        })
    } else {
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.trim())
            .unwrap_or("")
            .chars()
            .take(200)
            .collect();
        Err(HealthError::Unhealthy {
            url: url.to_string(),
            status,
            body,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_binds_are_asked_on_loopback() {
        assert_eq!(dial_target("0.0.0.0:9464").unwrap(), "127.0.0.1:9464");
        assert_eq!(dial_target("[::]:9464").unwrap(), "[::1]:9464");
        assert_eq!(dial_target("127.0.0.1:9000").unwrap(), "127.0.0.1:9000");
        assert_eq!(dial_target("10.1.2.3:9464").unwrap(), "10.1.2.3:9464");
        assert_eq!(dial_target("localhost:9464").unwrap(), "localhost:9464");
    }

    #[test]
    fn bad_addresses_say_what_is_wrong() {
        for (addr, problem) in [
            ("9464", "no port"),
            ("localhost:http", "not a number"),
            (":9464", "no host"),
            ("127.0.0.1:0", "port 0"),
        ] {
            let e = dial_target(addr).unwrap_err().to_string();
            assert!(
                e.contains(problem) && e.contains("MMSEND_METRICS_ADDR"),
                "{addr}: {e}"
            );
        }
    }
}
