//! How fast does `mmsend webhooks` take Meta's posts? Signed posts of a
//! realistic payload (one delivery event, ~420 bytes) at concurrency 64,
//! against two servers in the same run, alternated:
//!
//! - `bare`: an axum handler that takes the body and answers 200: the HTTP
//!   stack's own ceiling on this machine;
//! - `receiver`: mmsend's receiver, checking each signature and answering
//!   only after RabbitMQ confirmed the payload in its quorum queue.
//!
//! ```sh
//! cargo bench --bench webhooks                      # 3 rounds of 20,000 posts each
//! MMSEND_BENCH_POSTS=5000 cargo bench --bench webhooks
//! ```
//!
//! Target: the receiver ≥ 5,000 posts/s (issue 28), each confirmed by the
//! broker; its ratio to `bare` says what checking and storing cost. Every
//! stored payload is counted in the queue afterwards (no post answered 200
//! without its copy). `cargo test --all-targets` runs a small smoke round.

// one part: `want` is not used here
#[allow(dead_code)]
#[path = "common/select.rs"]
mod select;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::post;
use axum::Router;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use mmsend::broker::{self, Topology};
use mmsend::graph::Secret;
use mmsend::metrics::Metrics;
use mmsend::webhooks::{self, WebhookConfig};
use tokio_util::sync::CancellationToken;

const CONCURRENCY: usize = 64;
const SECRET: &str = "bench-app-secret-0123456789";

fn amqp_url() -> String {
    std::env::var("MMSEND_AMQP_URL").unwrap_or_else(|_| broker::DEFAULT_AMQP_URL.to_string())
}

fn payload(i: usize) -> Vec<u8> {
    format!(
        r#"{{"object":"page","entry":[{{"id":"9876543210","time":1733300000,"changes":[{{"field":"marketing_message_deliveries","value":{{"marketing_message_tracking_id":"mmtid.{i:012}","messenger_subscription_token":"sub-token-{i}","message_id":"120210000000000000","page_id":"9876543210","timestamp":1733300000{},"mid":"m_{i:020}","recipient_id":"2{i:015}"}}}}]}}]}}"#,
        i % 1000
    )
    .into_bytes()
}

/// `posts` signed posts to `url` at [`CONCURRENCY`]; posts/s, and how many
/// were not answered 200.
async fn fire(url: &str, posts: usize) -> (f64, usize) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(CONCURRENCY)
        .build()
        .unwrap();
    let bodies: Arc<Vec<(Vec<u8>, String)>> = Arc::new(
        (0..256)
            .map(|i| {
                let b = payload(i);
                let s = webhooks::signature(SECRET, &b);
                (b, s)
            })
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let tasks: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (http, bodies, next, failed, url) = (
                http.clone(),
                bodies.clone(),
                next.clone(),
                failed.clone(),
                url.to_string(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= posts {
                        break;
                    }
                    let (body, sig) = &bodies[i % bodies.len()];
                    let ok = http
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("x-hub-signature-256", sig)
                        .body(body.clone())
                        .send()
                        .await
                        .is_ok_and(|r| r.status().is_success());
                    if !ok {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    (posts as f64 / secs, failed.load(Ordering::Relaxed))
}

async fn bare() -> SocketAddr {
    let app = Router::new().route(
        "/webhooks",
        post(|body: axum::body::Bytes| async move {
            std::hint::black_box(body);
            "ok\n"
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

fn main() {
    let select = select::Select::from_args(&[]);
    let smoke = select.smoke;
    let posts = select.count("MMSEND_BENCH_POSTS", 500, 20_000);
    let rounds = if smoke { 1 } else { 3 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!(
            "mmsend webhook receiver: {posts} signed posts per run, concurrency {CONCURRENCY}, {rounds} rounds, {} cores{}",
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            if smoke { " (smoke run; `cargo bench --bench webhooks` measures)" } else { "" }
        );
        let prefix = format!("bench-wh-{:08x}", rand::random::<u32>());
        let topology = Topology::with_prefix(&prefix).unwrap();
        let stop = CancellationToken::new();
        let config = WebhookConfig {
            amqp_url: amqp_url(),
            topology: topology.clone(),
            listen: "127.0.0.1:0".into(),
            verify_token: Secret::new("bench-verify-token"),
            app_secret: Secret::new(SECRET),
            max_body: webhooks::MAX_BODY,
        };
        let (receiver, server) = webhooks::spawn(config, Metrics::new(), stop.clone())
            .await
            .expect("the receiver listens");
        let bare = bare().await;
        let (mut best_bare, mut best_recv) = (0f64, 0f64);
        let mut rows = Vec::new();
        let mut not_ok = 0;
        for round in 0..rounds {
            // alternate which goes first, so drift over seconds cancels
            let order = if round % 2 == 0 { [true, false] } else { [false, true] };
            for is_bare in order {
                let url = format!("http://{}/webhooks", if is_bare { bare } else { receiver });
                let (rate, failed) = fire(&url, posts).await;
                not_ok += failed;
                if is_bare {
                    best_bare = best_bare.max(rate);
                } else {
                    best_recv = best_recv.max(rate);
                }
                rows.push(vec![
                    format!("{}", round + 1),
                    if is_bare { "bare axum handler" } else { "mmsend webhooks (signature + confirmed publish)" }.to_string(),
                    format!("{rate:.0}"),
                    failed.to_string(),
                ]);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let conn = broker::connect(&amqp_url(), "webhooks bench").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let stored = ch
            .queue_declare(
                topology.webhook_queue().as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count();
        stop.cancel();
        let _ = server.await;
        topology.delete(&conn).await.unwrap();
        let _ = conn.close(200, "done".into()).await;
        println!(
            "{}",
            mmsend::report::table(&["round", "server", "posts/s", "not 200"], &[0, 2, 3], rows)
        );
        let ratio = best_recv / best_bare;
        let want_stored = (posts * rounds) as u32;
        println!(
            "receiver: best {best_recv:.0} posts/s = {ratio:.2} × bare ({best_bare:.0}) [target ≥ 5000 posts/s {}]; {stored} payloads in the queue for {want_stored} posts answered 200",
            if best_recv >= 5000.0 { "✔" } else if smoke { "- (smoke)" } else { "✘" }
        );
        assert_eq!(not_ok, 0, "every post answered 200");
        assert_eq!(stored, want_stored, "each post answered 200 has its copy in the queue");
    });
}
