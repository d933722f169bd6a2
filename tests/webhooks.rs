//! `mmsend webhooks` (issue 28, the receiver) against the real broker: the
//! verification handshake as Meta does it; signed posts stored byte for
//! byte, each only once RabbitMQ confirmed it; unsigned, mis-signed,
//! tampered and oversized posts refused and nothing stored; a post RabbitMQ
//! cannot take answered 503 (Meta sends it again) and the next one stored;
//! the binary refusing to start without its secrets.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::{amqp_url, random_prefix, TopologyGuard};
use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use lapin::types::FieldTable;
use mmsend::broker::{self, Topology};
use mmsend::graph::auth::Secret;
use mmsend::metrics::Metrics;
use mmsend::webhooks::{self, WebhookConfig};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-app-secret-0123456789";
const VERIFY: &str = "verify-me-please";

struct Receiver {
    url: String,
    topology: Topology,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), webhooks::WebhookError>>,
    guard: TopologyGuard,
    http: reqwest::Client,
}

async fn start(name: &str, max_body: usize) -> Receiver {
    let topology = Topology::with_prefix(&random_prefix(name)).unwrap();
    let guard = TopologyGuard::new(&topology);
    let config = WebhookConfig {
        amqp_url: amqp_url(),
        topology: topology.clone(),
        listen: "127.0.0.1:0".into(),
        verify_token: Secret::new(VERIFY),
        app_secret: Secret::new(SECRET),
        max_body,
    };
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    let (addr, task) = webhooks::spawn(config, metrics.clone(), stop.clone())
        .await
        .expect("the receiver listens");
    Receiver {
        url: format!("http://{addr}"),
        topology,
        metrics,
        stop,
        task,
        guard,
        http: reqwest::Client::new(),
    }
}

impl Receiver {
    async fn post(&self, body: &[u8], signature: Option<&str>) -> u16 {
        let mut req = self
            .http
            .post(format!("{}/webhooks", self.url))
            .header("content-type", "application/json")
            .body(body.to_vec());
        if let Some(s) = signature {
            req = req.header("x-hub-signature-256", s);
        }
        req.send().await.unwrap().status().as_u16()
    }

    fn count(&self, result: &str) -> u64 {
        let text = self.metrics.render();
        let line = format!("mmsend_webhook_requests_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&line))
            .map_or(0, |n| n.trim().parse().unwrap())
    }

    /// Every payload in the webhook queue (consumed and acked).
    async fn drain(&self, expect: usize) -> Vec<Vec<u8>> {
        let conn = broker::connect(&amqp_url(), "webhooks test").await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let mut consumer = ch
            .basic_consume(
                self.topology.webhook_queue().as_str().into(),
                "webhooks-test".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        loop {
            let wait = if out.len() < expect {
                Duration::from_secs(10)
            } else {
                // anything beyond what was expected would be a defect
                Duration::from_millis(500)
            };
            match tokio::time::timeout(wait, consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    let headers = d.properties.headers().clone().unwrap_or_default();
                    assert!(
                        headers.inner().contains_key("x-mmsend-received-at"),
                        "a stored payload says when it was received"
                    );
                    assert!(
                        !headers
                            .inner()
                            .keys()
                            .any(|k| k.as_str().contains("signature")),
                        "the signature is not kept"
                    );
                    out.push(d.data.clone());
                    d.ack(BasicAckOptions::default()).await.unwrap();
                }
                _ => break,
            }
        }
        let _ = ch.close(200, "done".into()).await;
        let _ = conn.close(200, "done".into()).await;
        out
    }

    async fn finish(mut self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
        let conn = broker::connect(&amqp_url(), "webhooks test").await.unwrap();
        self.topology.delete(&conn).await.unwrap();
        self.guard.disarm();
        let _ = conn.close(200, "done".into()).await;
    }
}

#[tokio::test]
async fn the_verification_handshake_answers_as_meta_expects() {
    let r = start("wh-verify", webhooks::MAX_BODY).await;
    let get = |q: &str| {
        let url = format!("{}/webhooks?{q}", r.url);
        let http = r.http.clone();
        async move {
            let res = http.get(url).send().await.unwrap();
            (res.status().as_u16(), res.text().await.unwrap())
        }
    };
    assert_eq!(
        get(&format!(
            "hub.mode=subscribe&hub.verify_token={VERIFY}&hub.challenge=1158201444"
        ))
        .await,
        (200, "1158201444".to_string()),
        "the challenge comes back as the whole body"
    );
    for q in [
        "hub.mode=subscribe&hub.verify_token=wrong-token-here&hub.challenge=1".to_string(),
        format!("hub.mode=unsubscribe&hub.verify_token={VERIFY}&hub.challenge=1"),
        format!("hub.verify_token={VERIFY}&hub.challenge=1"),
        "hub.mode=subscribe&hub.challenge=1".to_string(),
    ] {
        assert_eq!(get(&q).await.0, 403, "refused: {q}");
    }
    assert_eq!(r.count("verified"), 1);
    assert_eq!(r.count("verify_refused"), 4);
    r.finish().await;
}

#[tokio::test]
async fn signed_posts_are_stored_byte_for_byte_and_refused_ones_change_nothing() {
    let r = start("wh-store", 4096).await;
    // bodies as Meta might send them: odd spacing and key order, which a
    // re-serialisation would change (and so break the signature)
    let bodies: Vec<Vec<u8>> = (0..60)
        .map(|i| {
            format!(
                "{{\"object\":\"page\",  \"entry\":[{{\"id\":\"9876543210\",\"time\":{i},\"changes\":[{{\"field\":\"marketing_message_deliveries\",\"value\":{{\"marketing_message_tracking_id\":\"t{i}\",\"page_id\":\"9876543210\" }}}}]}}]}}\n"
            )
            .into_bytes()
        })
        .collect();
    let posts = bodies.iter().map(|b| {
        let sig = webhooks::signature(SECRET, b);
        let r = &r;
        async move { r.post(b, Some(&sig)).await }
    });
    let statuses = futures_util::future::join_all(posts).await;
    assert!(
        statuses.iter().all(|&s| s == 200),
        "every signed post answered 200: {statuses:?}"
    );

    // refused: no signature, another key's, a tampered body, a bad header,
    // a signed body over the bound
    let good = &bodies[0];
    let mut tampered = good.clone();
    tampered[10] = b'P';
    let big = vec![b' '; 5000];
    let refused = [
        (r.post(good, None).await, 403),
        (
            r.post(good, Some(&webhooks::signature("another-secret", good)))
                .await,
            403,
        ),
        (
            r.post(&tampered, Some(&webhooks::signature(SECRET, good)))
                .await,
            403,
        ),
        (r.post(good, Some("sha256=not-hex")).await, 403),
        (
            r.post(&big, Some(&webhooks::signature(SECRET, &big))).await,
            413,
        ),
    ];
    for (i, (got, want)) in refused.iter().enumerate() {
        assert_eq!(got, want, "refused post {i}");
    }

    let stored = r.drain(bodies.len()).await;
    let want: BTreeSet<&[u8]> = bodies.iter().map(Vec::as_slice).collect();
    let got: BTreeSet<&[u8]> = stored.iter().map(Vec::as_slice).collect();
    assert_eq!(stored.len(), bodies.len(), "each stored once, nothing else");
    assert_eq!(got, want, "stored byte for byte");
    assert_eq!(r.count("stored"), 60);
    // the receiver's own scrape carries its series
    let scrape = r
        .http
        .get(format!("{}/metrics", r.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for name in mmsend::metrics::WEBHOOK_SERIES {
        assert!(scrape.contains(name), "{name} in the receiver's /metrics");
    }
    assert!(scrape.contains("mmsend_webhook_requests_total{result=\"stored\"} 60"));
    assert_eq!(r.count("bad_signature"), 4);
    assert_eq!(r.count("too_large"), 1);
    r.finish().await;
}

#[tokio::test]
async fn a_post_rabbitmq_cannot_take_is_a_503_and_the_next_is_stored() {
    let r = start("wh-down", webhooks::MAX_BODY).await;
    let body = br#"{"object":"page","entry":[]}"#;
    let sig = webhooks::signature(SECRET, body);
    // the queue deleted under the receiver: the publish comes back unroutable
    let conn = broker::connect(&amqp_url(), "webhooks test").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_delete(
        r.topology.webhook_queue().as_str().into(),
        Default::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        r.post(body, Some(&sig)).await,
        503,
        "not stored: Meta retries"
    );
    assert_eq!(r.count("unavailable"), 1);
    // the next post opens again, declares the topology again, and is stored
    assert_eq!(r.post(body, Some(&sig)).await, 200);
    let _ = conn.close(200, "done".into()).await;
    let stored = r.drain(1).await;
    assert_eq!(
        stored,
        vec![body.to_vec()],
        "only the post answered 200 is stored"
    );
    r.finish().await;
}

#[tokio::test]
async fn the_simulators_webhooks_are_stored_and_read_back_as_its_sends() {
    use mmsend::graph::{Client, ClientConfig, Outcome, SendRequest};
    use mmsend::simulator::{SimConfig, SimWebhooks, Simulator};
    use mmsend::webhooks::events::{self, Field};
    use std::collections::BTreeMap;

    let r = start("wh-sim", webhooks::MAX_BODY).await;
    let sim = Simulator::start(
        "127.0.0.1:0",
        SimConfig {
            record: true,
            webhooks: Some(SimWebhooks {
                url: format!("{}/webhooks", r.url),
                app_secret: SECRET.into(),
                page_id: "9876543210".into(),
                page_by_token: Default::default(),
                delivered: 1.0,
                read: 0.5,
                click: 0.0,
                failed: 0.0,
                duplicate: 0.3,
                max_delay: Duration::from_millis(300),
            }),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let client = Client::new(ClientConfig {
        base_url: sim.base_url(),
        ..ClientConfig::default()
    })
    .unwrap();
    let message = serde_json::json!({"text": "Hi"});
    const SENDS: usize = 100;
    for i in 0..SENDS {
        let token = format!("sub-{i}");
        let req = SendRequest {
            ad_account_id: "1234567890",
            message_id: "120210000000000000",
            subscription_token: &token,
            message: Some(&message),
            min_conversation_gap_seconds: None,
        };
        let outcome = client.send(&Secret::new("test-token"), &req).await;
        assert!(matches!(outcome, Outcome::Sent { .. }), "send {i}");
    }
    let sends: BTreeMap<String, String> = sim
        .record()
        .sends
        .into_iter()
        .map(|s| (s.tracking_id.unwrap(), s.token))
        .collect();
    assert_eq!(sends.len(), SENDS);

    // every post reaches the queue (duplicates included); read them back
    let mut unique = BTreeMap::new();
    let mut posts = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while unique.values().filter(|f| **f == Field::Echo).count() < SENDS
        || unique.values().filter(|f| **f == Field::Delivery).count() < SENDS
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} events of {SENDS} sends",
            unique.len()
        );
        for body in r.drain(0).await {
            posts += 1;
            let parsed = events::parse(&body).unwrap();
            assert_eq!((parsed.malformed, parsed.other_fields), (0, 0));
            for e in parsed.events {
                let tid = e
                    .tracking_id
                    .clone()
                    .expect("echo, delivery, read carry it");
                assert_eq!(
                    sends.get(&tid),
                    e.token.as_ref(),
                    "an event names a send the simulator made, and its recipient"
                );
                unique.insert(e.dedupe_key(), e.field);
            }
        }
    }
    let reads = unique.values().filter(|f| **f == Field::Read).count();
    println!(
        "{SENDS} sends: {posts} posts stored, {} distinct events ({reads} reads)",
        unique.len()
    );
    assert!(
        posts > unique.len(),
        "some posts came twice (duplicate 0.3)"
    );
    assert!(reads > 0 && reads < SENDS, "reads at 0.5: {reads}");
    sim.shutdown().await;
    r.finish().await;
}

#[test]
fn the_binary_refuses_to_start_without_its_secrets() {
    // without the verify token; then with it but without the app secret
    for (given, missing) in [
        (None, "MMSEND_WEBHOOK_VERIFY_TOKEN"),
        (Some(VERIFY), "MMSEND_APP_SECRET"),
    ] {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mmsend"));
        cmd.args(["webhooks", "--listen", "127.0.0.1:0"])
            .env_remove("MMSEND_WEBHOOK_VERIFY_TOKEN")
            .env_remove("MMSEND_APP_SECRET");
        if let Some(token) = given {
            cmd.env("MMSEND_WEBHOOK_VERIFY_TOKEN", token);
        }
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "refused without {missing}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(missing), "names {missing}: {err}");
    }
}
