//! HTTP/1.1 or HTTP/2 to the Graph API? The evidence behind pinning
//! `http1_only` in `src/graph/client.rs`: the simulator served over TLS, as
//! production calls Meta, offering `h2` and `http/1.1` by ALPN, called by two
//! clients built like mmsend's (same pool, timeouts, `TCP_NODELAY`, rustls),
//! one that negotiates HTTP/2 and one held to HTTP/1.1. Everything is measured
//! in one run, interleaved, so the ratios mean something on a noisy machine.
//!
//! ```sh
//! cargo bench --bench http2                        # 3 rounds of 20,000 calls per case
//! MMSEND_BENCH_CALLS=5000 cargo bench --bench http2
//! ```
//!
//! Cases, each at concurrency 64 (the worker's default):
//! - `0ms`: the simulator answers at once: the transport's own cost, calls/s
//!   and CPU per call (client and server share the process and its cores);
//! - `50ms`: a realistic API latency: calls/s against the ideal 64/0.05 s,
//!   and latency quantiles.
//!
//! The certificate authority and the server's certificate are made at bench
//! time (rcgen); the clients trust the authority through `SSL_CERT_FILE`,
//! which their certificate verifier reads. Every run checks the protocol it
//! names was negotiated, and that mmsend's own `graph::Client` speaks
//! HTTP/1.1 to a server that offers HTTP/2. `cargo test --all-targets` runs a
//! small smoke round of all of it.

// one part: `want` is not used here
#[allow(dead_code)]
#[path = "common/select.rs"]
mod select;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mmsend::graph::{Client, ClientConfig, Outcome, Secret, SendRequest};
use mmsend::simulator::{Latency, SimConfig, Simulator};
use serde_json::json;
use tokio::sync::Notify;
use tokio_rustls::rustls;

const CONCURRENCY: usize = 64;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Proto {
    H1,
    H2,
}

impl Proto {
    fn name(self) -> &'static str {
        match self {
            Proto::H1 => "HTTP/1.1",
            Proto::H2 => "HTTP/2",
        }
    }
}

/// A TLS server in front of the simulator's routes.
struct Server {
    port: u16,
    /// connections accepted, by negotiated protocol
    h1_conns: Arc<AtomicU64>,
    h2_conns: Arc<AtomicU64>,
    stop: tokio_util::sync::CancellationToken,
}

async fn serve(tls: rustls::ServerConfig, latency: Duration) -> Server {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let router: Router = Simulator::router(SimConfig {
        latency: Latency::Fixed(latency),
        ..SimConfig::default()
    });
    let (h1_conns, h2_conns) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = tokio_util::sync::CancellationToken::new();
    let (h1, h2, s) = (h1_conns.clone(), h2_conns.clone(), stop.clone());
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                _ = s.cancelled() => break,
                a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            };
            let _ = tcp.set_nodelay(true);
            let (acceptor, router, h1, h2, s) = (
                acceptor.clone(),
                router.clone(),
                h1.clone(),
                h2.clone(),
                s.clone(),
            );
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
                    h2.fetch_add(1, Ordering::Relaxed);
                } else {
                    h1.fetch_add(1, Ordering::Relaxed);
                }
                let service = Simulator::connection_service(router, Arc::new(Notify::new()));
                let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                tokio::select! {
                    _ = builder.serve_connection(TokioIo::new(stream), service) => {}
                    _ = s.cancelled() => {}
                }
            });
        }
    });
    Server {
        port,
        h1_conns,
        h2_conns,
        stop,
    }
}

fn tls_config(
    chain: &[rustls::pki_types::CertificateDer<'static>],
    key: &rcgen::KeyPair,
) -> rustls::ServerConfig {
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain.to_vec(), key)
        .expect("valid certificate and key");
    // what a production HTTPS endpoint offers
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    config
}

/// A certificate authority, written to a PEM file the client will trust,
/// and a `localhost` certificate it signed.
fn certificates() -> (
    Vec<rustls::pki_types::CertificateDer<'static>>,
    rcgen::KeyPair,
    std::path::PathBuf,
) {
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "mmsend bench CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let ca_file = std::env::temp_dir().join(format!("mmsend-bench-ca-{}.pem", std::process::id()));
    std::fs::write(&ca_file, ca.pem()).unwrap();
    (vec![leaf.der().clone(), ca.der().clone()], key, ca_file)
}

/// This process's CPU time (user + system), from /proc (Linux; clock ticks
/// of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(") ")
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // after the command name: state is field 0, utime 11, stime 12
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}

struct Run {
    calls_per_s: f64,
    cpu_us_per_call: f64,
    p50_ms: f64,
    p99_ms: f64,
    connections: (u64, u64),
}

/// A client built like `graph::Client`'s (src/graph/client.rs), but for
/// the protocol: `H1` pins HTTP/1.1 as mmsend does, `H2` lets ALPN pick.
fn raw_client(proto: Proto) -> reqwest::Client {
    let builder = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(CONCURRENCY)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true)
        .user_agent("mmsend-bench");
    match proto {
        Proto::H1 => builder.http1_only(),
        Proto::H2 => builder,
    }
    .build()
    .expect("client")
}

async fn run(proto: Proto, latency: Duration, calls: usize, certs: &Certs) -> Run {
    let server = serve(tls_config(&certs.chain, &certs.key), latency).await;
    let client = raw_client(proto);
    let url = format!(
        "https://localhost:{}/v24.0/act_1234567890/messages",
        server.port
    );
    let next = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_time();
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..CONCURRENCY {
        let (client, url, next) = (client.clone(), url.clone(), next.clone());
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= calls {
                    break latencies;
                }
                // the body graph::Client sends
                let body = json!({"message_id": "120210000000000000",
                    "messenger_delivery_data": {"subscription_token": format!("r{i}")},
                    "message": {"text": "Hi, new deals are in!"}});
                let t = Instant::now();
                let answer = client
                    .post(&url)
                    .bearer_auth("bench-token")
                    .json(&body)
                    .send()
                    .await
                    .unwrap_or_else(|e| panic!("call {i}: {e}"));
                let status = answer.status();
                let bytes = answer.bytes().await.unwrap_or_default();
                assert!(status.is_success(), "call {i}: {status} {bytes:?}");
                latencies.push(t.elapsed());
            }
        });
    }
    let mut latencies: Vec<Duration> = Vec::with_capacity(calls);
    while let Some(done) = tasks.join_next().await {
        latencies.extend(done.expect("caller task"));
    }
    let wall = started.elapsed();
    let cpu = cpu_time().saturating_sub(cpu0);
    server.stop.cancel();
    latencies.sort();
    let q = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e3;
    Run {
        calls_per_s: calls as f64 / wall.as_secs_f64(),
        cpu_us_per_call: cpu.as_secs_f64() * 1e6 / calls as f64,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        connections: (
            server.h1_conns.load(Ordering::Relaxed),
            server.h2_conns.load(Ordering::Relaxed),
        ),
    }
}

/// mmsend's own client, against a server that offers HTTP/2, negotiates
/// HTTP/1.1 and sends.
async fn production_client_speaks_http1(certs: &Certs) {
    let server = serve(tls_config(&certs.chain, &certs.key), Duration::ZERO).await;
    let client = Client::new(ClientConfig {
        base_url: format!("https://localhost:{}", server.port),
        pool_max_idle_per_host: CONCURRENCY,
        ..ClientConfig::default()
    })
    .expect("client");
    let message = json!({"text": "Hi"});
    for i in 0..8 {
        let recipient = format!("pin{i}");
        let req = SendRequest {
            ad_account_id: "1234567890",
            message_id: "120210000000000000",
            subscription_token: &recipient,
            message: Some(&message),
            min_conversation_gap_seconds: None,
        };
        match client.send(&Secret::new("bench-token"), &req).await {
            Outcome::Sent { .. } => {}
            Outcome::Failed(f) => panic!("mmsend's client over TLS: {:?}", f.kind),
        }
    }
    let (h1, h2) = (
        server.h1_conns.load(Ordering::Relaxed),
        server.h2_conns.load(Ordering::Relaxed),
    );
    server.stop.cancel();
    assert!(
        h1 >= 1 && h2 == 0,
        "graph::Client negotiated HTTP/2 ({h2} connections) though it pins HTTP/1.1"
    );
    println!(
        "graph::Client over TLS, offered h2 and http/1.1: {h1} HTTP/1.1 connection(s), 0 HTTP/2"
    );
}

struct Certs {
    chain: Vec<rustls::pki_types::CertificateDer<'static>>,
    key: rcgen::KeyPair,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let select = select::Select::from_args(&[]);
    let smoke = select.smoke;
    let (chain, key, ca_file) = certificates();
    // Before any thread starts: the client's verifier reads the roots from
    // here when the client is built.
    std::env::set_var("SSL_CERT_FILE", &ca_file);
    let certs = Certs { chain, key };
    let calls = select.count("MMSEND_BENCH_CALLS", 400, 20_000);
    let rounds = if smoke { 1 } else { 3 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "mmsend HTTP/1.1 vs HTTP/2 over TLS: {calls} calls per run, concurrency {CONCURRENCY}, {rounds} rounds, {} cores{}",
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        if smoke { " (smoke run; `cargo bench --bench http2` measures)" } else { "" }
    );
    rt.block_on(production_client_speaks_http1(&certs));
    for latency_ms in [0u64, 50] {
        let latency = Duration::from_millis(latency_ms);
        let mut by: Vec<(Proto, Vec<Run>)> = vec![(Proto::H1, vec![]), (Proto::H2, vec![])];
        for _ in 0..rounds {
            for (proto, runs) in by.iter_mut() {
                let r = rt.block_on(run(*proto, latency, calls, &certs));
                // the case is what it says: the protocol was negotiated
                match proto {
                    Proto::H1 => assert!(r.connections.1 == 0 && r.connections.0 >= 1),
                    Proto::H2 => assert!(r.connections.0 == 0 && r.connections.1 >= 1),
                }
                runs.push(r);
            }
        }
        println!("\nsimulator latency {latency_ms} ms (medians of {rounds}):");
        println!(
            "  {:<9} {:>10} {:>14} {:>9} {:>9} {:>12}",
            "protocol", "calls/s", "CPU µs/call", "p50 ms", "p99 ms", "connections"
        );
        let mut rate = [0.0; 2];
        let mut cpu = [0.0; 2];
        for (k, (proto, runs)) in by.iter().enumerate() {
            rate[k] = median(runs.iter().map(|r| r.calls_per_s).collect());
            cpu[k] = median(runs.iter().map(|r| r.cpu_us_per_call).collect());
            let conns = runs.iter().map(|r| r.connections.0 + r.connections.1).max();
            println!(
                "  {:<9} {:>10.0} {:>14.0} {:>9.1} {:>9.1} {:>12}",
                proto.name(),
                rate[k],
                cpu[k],
                median(runs.iter().map(|r| r.p50_ms).collect()),
                median(runs.iter().map(|r| r.p99_ms).collect()),
                conns.unwrap_or(0)
            );
        }
        println!(
            "  HTTP/2 / HTTP/1.1: calls/s {:.2}, CPU per call {:.2}{}",
            rate[1] / rate[0],
            cpu[1] / cpu[0],
            if latency_ms > 0 {
                format!(
                    "; ideal {:.0}/s, HTTP/1.1 at {:.0} %, HTTP/2 at {:.0} %",
                    CONCURRENCY as f64 / latency.as_secs_f64(),
                    rate[0] * latency.as_secs_f64() / CONCURRENCY as f64 * 100.0,
                    rate[1] * latency.as_secs_f64() / CONCURRENCY as f64 * 100.0
                )
            } else {
                String::new()
            }
        );
    }
    let _ = std::fs::remove_file(&ca_file);
}
