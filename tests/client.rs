//! The Graph client against the in-process simulator: every answer shape
//! becomes the right `Outcome`, classified as DESIGN §4 says, and the access
//! token never shows in any error text. Long success bodies, which the
//! simulator does not send, come from the raw stand-in of `fake_graph`.

mod fake_graph;

use std::time::Duration;

use mmsend::classify::{Class, CodeTable};
use mmsend::graph::client::{NotASend, MAX_SUCCESS_BODY};
use mmsend::graph::{Client, ClientConfig, FailureKind, Outcome, Secret, SendRequest};
use mmsend::simulator::{SimConfig, Simulator};
use serde_json::json;

const TOKEN: &str = "EAAB-client-test-token-93ab";

fn req<'a>(recipient: &'a str, message: &'a serde_json::Value) -> SendRequest<'a> {
    SendRequest {
        ad_account_id: "1234567890",
        message_id: "120210000000000000",
        subscription_token: recipient,
        message: Some(message),
        min_conversation_gap_seconds: Some(3600),
    }
}

async fn client_for(base: &str, timeout: Duration) -> Client {
    Client::new(ClientConfig {
        base_url: base.to_string(),
        request_timeout: timeout,
        ..ClientConfig::default()
    })
    .unwrap()
}

#[tokio::test]
async fn every_answer_shape_is_an_outcome_with_the_right_class() {
    let sim = Simulator::start(
        "127.0.0.1:0",
        SimConfig {
            regain_minutes: 3,
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let client = client_for(&sim.base_url(), Duration::from_millis(1500)).await;
    let token = Secret::new(TOKEN);
    let table = CodeTable::default();
    let msg = json!({"text": "hi"});

    match client.send(&token, &req("ok", &msg)).await {
        Outcome::Sent { tracking_id, hint } => {
            assert!(tracking_id.starts_with("mm."));
            assert!(
                hint.app.is_some() && hint.business.is_some(),
                "usage headers read"
            );
        }
        other => panic!("{other:?}"),
    }

    // (token, class, http status, ambiguous)
    let rows: &[(&str, Class, Option<u16>, bool)] = &[
        ("sim:err:2300005", Class::Mismatch, Some(400), false),
        ("sim:suberr:2300014", Class::Mismatch, Some(400), false),
        ("sim:err:2300012", Class::NotReady, Some(400), false),
        ("sim:err:2300015", Class::Budget, Some(400), false),
        ("sim:err:190", Class::Auth, Some(400), false),
        ("sim:err:2", Class::Transient, Some(500), false),
        ("sim:fault:html502", Class::Transient, Some(502), false),
        ("sim:fault:empty500", Class::Transient, Some(500), false),
        ("sim:fault:truncated", Class::Transient, Some(500), false),
        ("sim:fault:429", Class::Throttled, Some(429), false),
        ("sim:fault:reset", Class::Transient, None, true),
        ("sim:fault:hang", Class::Transient, None, true),
    ];
    for &(recipient, class, status, ambiguous) in rows {
        let Outcome::Failed(f) = client.send(&token, &req(recipient, &msg)).await else {
            panic!("{recipient}: expected a failure");
        };
        let v = table.classify(&f);
        assert_eq!(v.class, class, "{recipient}: {f:?}");
        assert_eq!(f.status(), status, "{recipient}");
        assert_eq!(f.ambiguous(), ambiguous, "{recipient}");
        let text = format!("{} {:?}", f.message(), f);
        assert!(!text.contains(TOKEN), "{recipient}: token in error text");
        match recipient {
            "sim:fault:html502" => {
                assert!(f.message().contains("502 Bad Gateway"), "{}", f.message())
            }
            "sim:fault:empty500" => assert_eq!(f.message(), "HTTP 500 with an empty body"),
            "sim:fault:truncated" => assert!(matches!(f.kind, FailureKind::Http { .. })),
            "sim:fault:429" => assert_eq!(f.hint.retry_after, Some(Duration::from_secs(7))),
            "sim:fault:hang" => assert!(matches!(
                f.kind,
                FailureKind::Transport { timeout: true, .. }
            )),
            "sim:err:2300005" => {
                let e = f.graph_error().unwrap();
                assert_eq!(e.code, Some(2300005));
                assert!(e.fbtrace_id.is_some() && e.message.is_some());
            }
            _ => {}
        }
    }

    // a throttling error carries the BUC regain hint
    let Outcome::Failed(f) = client.send(&token, &req("sim:err:80004", &msg)).await else {
        panic!("expected throttling");
    };
    assert_eq!(table.classify(&f).class, Class::Throttled);
    assert_eq!(f.hint.regain_access, Some(Duration::from_secs(180)));
    assert_eq!(f.hint.wait(), Some(Duration::from_secs(180)));

    // a slow body within the timeout is still a success
    let slow = client_for(&sim.base_url(), Duration::from_secs(10)).await;
    assert!(matches!(
        slow.send(&token, &req("sim:fault:slowbody", &msg)).await,
        Outcome::Sent { .. }
    ));
    sim.shutdown().await;
}

#[tokio::test]
async fn connection_refused_is_transient_and_not_ambiguous() {
    // bind then drop, so the port is (almost certainly) closed
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = client_for(&format!("http://127.0.0.1:{port}"), Duration::from_secs(2)).await;
    let msg = json!({"text": "hi"});
    let Outcome::Failed(f) = client.send(&Secret::new(TOKEN), &req("ok", &msg)).await else {
        panic!("nothing listens there");
    };
    assert_eq!(CodeTable::default().classify(&f).class, Class::Transient);
    assert!(!f.ambiguous(), "the request never left: {f:?}");
    assert!(!f.message().contains(TOKEN));
}

#[tokio::test]
async fn the_simulator_checks_auth_and_app_secret_proof() {
    let sim = Simulator::start(
        "127.0.0.1:0",
        SimConfig {
            access_token: Some(TOKEN.into()),
            app_secret: Some("s3cr3t".into()),
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let msg = json!({"text": "hi"});
    let table = CodeTable::default();
    // right token, no proof: rejected
    let plain = client_for(&sim.base_url(), Duration::from_secs(2)).await;
    let Outcome::Failed(f) = plain.send(&Secret::new(TOKEN), &req("ok", &msg)).await else {
        panic!("proof is required");
    };
    assert_eq!(f.graph_error().unwrap().code, Some(100));
    // with the proof: sent
    let proved = Client::new(ClientConfig {
        base_url: sim.base_url(),
        app_secret: Some(Secret::new("s3cr3t")),
        ..ClientConfig::default()
    })
    .unwrap();
    assert!(matches!(
        proved.send(&Secret::new(TOKEN), &req("ok", &msg)).await,
        Outcome::Sent { .. }
    ));
    // wrong token: auth
    let Outcome::Failed(f) = proved
        .send(&Secret::new("EAAB-wrong"), &req("ok", &msg))
        .await
    else {
        panic!("wrong token");
    };
    assert_eq!(table.classify(&f).class, Class::Auth);
    assert_eq!(f.graph_error().unwrap().error_subcode, Some(463));
    assert_eq!(sim.stats().sent, 1);
    sim.shutdown().await;
}

/// The simulator keeps its last usage headers while their inputs are the
/// same: an answer for another ad account still names that account, and
/// every answer has a trace id of its own.
#[tokio::test]
async fn usage_headers_follow_the_ad_account_and_trace_ids_differ() {
    let sim = Simulator::start_on_own_thread("127.0.0.1:0", SimConfig::default())
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let mut traces = Vec::new();
    for account in ["111", "222", "111"] {
        let answer = http
            .post(format!("{}/v24.0/act_{account}/messages", sim.base_url()))
            .bearer_auth("t")
            .json(&json!({"message_id": "1", "message": {"text": "hi"},
                "messenger_delivery_data": {"subscription_token": format!("u-{account}-{}", traces.len())}}))
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success());
        let header = |name: &str| {
            answer
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        let buc: serde_json::Value =
            serde_json::from_str(&header("x-business-use-case-usage")).unwrap();
        assert!(buc.get(account).is_some(), "{buc} names {account}");
        assert_eq!(buc.as_object().unwrap().len(), 1, "{buc}");
        let app: serde_json::Value = serde_json::from_str(&header("x-app-usage")).unwrap();
        assert!(app.get("call_count").is_some(), "{app}");
        let trace = header("x-fb-trace-id");
        assert_eq!(trace.len(), 11, "{trace}");
        assert!(trace.bytes().all(|b| b.is_ascii_alphanumeric()), "{trace}");
        traces.push(trace);
    }
    traces.sort();
    traces.dedup();
    assert_eq!(traces.len(), 3, "a trace id per answer");
    sim.shutdown().await;
}

/// A success whose body is longer than an error body may be (16 KiB) is
/// still a send; one longer than [`MAX_SUCCESS_BODY`] is cut off, and a cut
/// 2xx may have been a send (ambiguous), never "not a Graph API answer".
#[tokio::test]
async fn long_success_bodies_are_read_whole_up_to_the_bound() {
    let server = fake_graph::start().await;
    let client = client_for(&server.base_url, Duration::from_secs(10)).await;
    let token = Secret::new(TOKEN);
    let msg = json!({"text": "hi"});
    for n in [17 * 1024, 200 * 1024, MAX_SUCCESS_BODY] {
        let recipient = format!("long:{n}");
        match client.send(&token, &req(&recipient, &msg)).await {
            Outcome::Sent { tracking_id, .. } => assert_eq!(tracking_id, "mm.long", "{n} bytes"),
            Outcome::Failed(f) => panic!("{n} bytes: {} {f:?}", f.message()),
        }
    }
    let recipient = format!("long:{}", MAX_SUCCESS_BODY + 1);
    let Outcome::Failed(f) = client.send(&token, &req(&recipient, &msg)).await else {
        panic!("a body over the bound cannot be read whole");
    };
    assert!(
        matches!(
            f.kind,
            FailureKind::NotASend {
                status: 200,
                why: NotASend::CutOff,
                ..
            }
        ),
        "{f:?}"
    );
    assert!(f.ambiguous(), "a cut 2xx may have been a send");
    assert!(f.message().contains("maybe sent"), "{}", f.message());
    assert!(f.message().chars().count() < 600, "{}", f.message());
    assert_eq!(CodeTable::default().classify(&f).class, Class::Transient);
    assert_eq!(server.requests.load(std::sync::atomic::Ordering::SeqCst), 4);
}
