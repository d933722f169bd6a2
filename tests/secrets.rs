//! A recognisable access token and app secret never leave the worker: not in
//! logs at any level, not in metrics, not in DLQ headers or bodies, not in an
//! export. That holds even when the network hands them back: a Graph error
//! that quotes the token it received, an HTML page that quotes the request,
//! a transport error that names the URL with its `appsecret_proof` or the
//! base URL's `user:password@`.

mod common;
mod fake_graph;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{job, Harness, Opts};
use lapin::types::FieldTable;
use mmsend::broker::headers::{LastError, Story};
use mmsend::dlq::{self, Filter};
use mmsend::graph::auth::appsecret_proof;
use mmsend::graph::{Client, ClientConfig, Failure, Outcome, Secret, SendRequest, TokenStore};
use serde_json::json;

const APP_SECRET: &str = "app-secret-5d8e2b9a41";
/// A token of Meta's shape (`EAA` and a long run of letters and digits).
const SHAPED_TOKEN: &str = "EAAGm0PX4ZCpsBAKZBtestShapedToken1234567890abcdefXYZ";
const USER: &str = "proxyuser";
const PASSWORD: &str = "pa55-proxy-secret-41c7";

/// Every log line of every level, kept.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn tokens_never_leak_anywhere() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();

    let mut opts = Opts::new("secrets");
    opts.tokens = TokenStore::new(Some(Secret::new(common::TOKEN)))
        .with_page("111", Secret::new(format!("{}-page", common::TOKEN)));
    opts.sim.access_token = Some(common::TOKEN.to_string());
    opts.sim.app_secret = Some(APP_SECRET.to_string());
    let mut h = Harness::start(opts).await;
    h.stop_worker().await;
    h.config.graph.app_secret = Some(Secret::new(APP_SECRET));
    h.start_worker();

    let mut n = 0;
    for (i, token) in [
        "ok-1",
        "ok-2",
        "sim:err:190:a",
        "sim:err:2300005:b",
        "sim:flaky:1:c",
        "sim:fault:html502:d",
    ]
    .iter()
    .enumerate()
    {
        h.publish_job(&job(&format!("s{i}"), token)).await;
        n += 1;
    }
    let mut other_page = job("p", "sim:err:190:p");
    other_page["page_id"] = serde_json::json!("111");
    h.publish_job(&other_page).await;
    n += 1;
    h.wait_settled(n, Duration::from_secs(30)).await;
    assert!(
        h.sim.stats().sent >= 2,
        "app secret proof accepted: {:?}",
        h.sim.stats()
    );

    let mut export = String::new();
    dlq::scan(
        &h.conn,
        &h.topology,
        Filter::default(),
        &dlq::ScanOptions::peek(),
        &mut |d: &dlq::DeadLetter| {
            export.push_str(&d.to_export().to_string());
            export.push('\n');
        },
    )
    .await
    .unwrap();
    let dead = h.drain_dlq().await;
    assert!(dead.len() >= 3);
    let metrics = h.metrics.render();
    h.finish().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("dead-lettered"), "logs were captured");
    for secret in [common::TOKEN, APP_SECRET] {
        assert!(!logs.contains(secret), "secret in logs");
        assert!(!metrics.contains(secret), "secret in metrics");
        assert!(!export.contains(secret), "secret in export");
        for d in &dead {
            assert!(
                !format!("{:?}", common::headers(d)).contains(secret),
                "secret in DLQ headers"
            );
            assert!(
                !String::from_utf8_lossy(&d.body).contains(secret),
                "secret in DLQ body"
            );
        }
    }
}

fn request<'a>(recipient: &'a str, message: &'a serde_json::Value) -> SendRequest<'a> {
    SendRequest {
        ad_account_id: "1234567890",
        message_id: "120210000000000000",
        subscription_token: recipient,
        message: Some(message),
        min_conversation_gap_seconds: None,
    }
}

fn client(base_url: &str, timeout: Duration) -> Client {
    Client::new(ClientConfig {
        base_url: base_url.to_string(),
        request_timeout: timeout,
        app_secret: Some(Secret::new(APP_SECRET)),
        ..ClientConfig::default()
    })
    .unwrap()
}

/// The failure as the worker carries it on: its message, its `Debug`
/// form (what a log line with `?failure` shows) and the `x-mmsend-*`
/// headers a copy of the job would get.
fn everything_said(f: &Failure) -> String {
    let mut story = Story::default();
    story.set_last_error(
        None,
        LastError {
            code: f.graph_error().and_then(|e| e.code),
            message: Some(f.message()),
            http_status: f.status(),
            fbtrace_id: f.graph_error().and_then(|e| e.fbtrace_id.clone()),
            ambiguous: f.ambiguous(),
            ..LastError::default()
        },
    );
    let mut headers = FieldTable::default();
    story.write(&mut headers);
    format!("{}\n{f:?}\n{headers:?}", f.message())
}

/// Graph quotes a malformed token back ("Malformed access token EAA…"), and
/// a proxy's error page may quote the request: whatever the answer says,
/// the token of the call, its proof, the app secret and any token-shaped
/// string are gone from the failure before anything else sees it.
#[tokio::test]
async fn tokens_quoted_by_the_network_are_redacted_where_they_enter() {
    let server = fake_graph::start().await;
    let client = client(&server.base_url, Duration::from_secs(5));
    let msg = json!({"text": "hi"});
    for token in [common::TOKEN, SHAPED_TOKEN] {
        let proof = appsecret_proof(&Secret::new(APP_SECRET), &Secret::new(token));
        for recipient in ["echo", "foreign", "html", "notsend"] {
            let Outcome::Failed(f) = client
                .send(&Secret::new(token), &request(recipient, &msg))
                .await
            else {
                panic!("{recipient}: expected a failure");
            };
            let said = everything_said(&f);
            for secret in [token, &proof, APP_SECRET, fake_graph::FOREIGN_TOKEN] {
                assert!(
                    !said.contains(secret),
                    "{recipient}: a secret got through:\n{said}"
                );
            }
            assert!(
                f.message().contains("[redacted]"),
                "{recipient}: the message says where the token was: {}",
                f.message()
            );
        }
        // what is left stays readable
        let Outcome::Failed(f) = client
            .send(&Secret::new(token), &request("echo", &msg))
            .await
        else {
            panic!("echo: expected a failure");
        };
        let e = f.graph_error().unwrap();
        assert_eq!(e.code, Some(190));
        assert_eq!(
            e.message.as_deref(),
            Some("Malformed access token EAA…[redacted]"),
            "{e:?}"
        );
    }
    let Outcome::Failed(f) = client
        .send(&Secret::new(SHAPED_TOKEN), &request("foreign", &msg))
        .await
    else {
        panic!("foreign: expected a failure");
    };
    assert_eq!(f.message(), "Malformed access token EAA…[redacted]");
    assert_eq!(
        f.graph_error().unwrap().fbtrace_id.as_deref(),
        Some("AfakeTrace01"),
        "text without a token is left alone"
    );
}

/// reqwest names the URL in its errors, and the URL carries
/// `appsecret_proof`; a base URL may carry `user:password@`. A failure
/// built from a transport error keeps the host and path (what an operator
/// needs) and neither of those.
#[tokio::test]
async fn transport_errors_name_no_url_secret() {
    let server = fake_graph::start().await;
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let msg = json!({"text": "hi"});
    let proof = appsecret_proof(&Secret::new(APP_SECRET), &Secret::new(SHAPED_TOKEN));
    let with_userinfo = server.base_url_with_userinfo(USER, PASSWORD);
    let refused = format!("http://{USER}:{PASSWORD}@127.0.0.1:{closed_port}");
    // (base URL, recipient, ambiguous)
    for (base, recipient, ambiguous) in [
        (server.base_url.as_str(), "reset", true),
        (with_userinfo.as_str(), "reset", true),
        (with_userinfo.as_str(), "hang", true),
        (refused.as_str(), "ok", false),
    ] {
        let client = client(base, Duration::from_millis(800));
        let Outcome::Failed(f) = client
            .send(&Secret::new(SHAPED_TOKEN), &request(recipient, &msg))
            .await
        else {
            panic!("{recipient}: expected a failure");
        };
        assert_eq!(f.ambiguous(), ambiguous, "{recipient}: {f:?}");
        assert_eq!(f.status(), None, "{recipient}: {f:?}");
        let said = everything_said(&f);
        for secret in [
            SHAPED_TOKEN,
            &proof,
            APP_SECRET,
            PASSWORD,
            "appsecret_proof",
        ] {
            assert!(
                !said.contains(secret),
                "{recipient} at {base}: a secret got through:\n{said}"
            );
        }
        assert!(
            f.message().contains("/v24.0/act_1234567890/messages"),
            "{recipient}: the message still says where the call went: {}",
            f.message()
        );
    }
    // a bad base URL is refused at start without its password
    let e = Client::new(ClientConfig {
        base_url: format!("ftp://{USER}:{PASSWORD}@graph.example"),
        ..ClientConfig::default()
    })
    .err()
    .expect("not http(s)")
    .to_string();
    assert!(
        !e.contains(PASSWORD) && e.contains("MMSEND_GRAPH_BASE_URL"),
        "{e}"
    );
}

/// The real binary against a Graph stand-in that quotes the token back,
/// serves an error page quoting the request and drops a connection after
/// the request, with an app secret and a base URL with a password: no
/// secret in the worker's log, in the dead letters' headers, in `dlq list`,
/// `dlq stats` or `dlq export`.
#[tokio::test]
async fn the_worker_binary_passes_on_no_secret_the_network_hands_back() {
    let server = fake_graph::start().await;
    let h = Harness::start(Opts::idle("leakbin")).await;
    let recipients = ["echo", "foreign", "html", "notsend", "reset", "hang"];
    for (i, r) in recipients.iter().enumerate() {
        h.publish_job(&job(&format!("leak{i}"), r)).await;
    }
    let dir = common::tmpdir("leakbin");
    let log_path = dir.join("worker.log");
    let mut child = h
        .worker_command(
            &dir,
            "[retry]\nmax_attempts = 1\n[gates]\nenabled = false\n[graph]\nrequest_timeout = \"1s\"\n",
        )
        .env("MMSEND_GRAPH_BASE_URL", server.base_url_with_userinfo(USER, PASSWORD))
        .env("MMSEND_ACCESS_TOKEN", SHAPED_TOKEN)
        .env("MMSEND_APP_SECRET", APP_SECRET)
        .env("MMSEND_LOG", "debug")
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let dead_queue = h.topology.dead_queue();
    common::eventually!(
        Duration::from_secs(30),
        h.depth(&dead_queue).await as usize == recipients.len(),
        "dead letters: {} of {}",
        h.depth(&dead_queue).await,
        recipients.len()
    );
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let exit = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "worker exit {exit:?}");

    let mut said = std::fs::read_to_string(&log_path).unwrap();
    assert!(
        said.contains("dead-lettered"),
        "the worker logged its failures:\n{said}"
    );
    let export = dir.join("export.jsonl");
    for args in [
        &["dlq", "list"][..],
        &["dlq", "list", "--json"],
        &["dlq", "stats"],
        &["dlq", "export", "-o", export.to_str().unwrap()],
    ] {
        let out = h.mmsend(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {out:?}");
        said.push_str(&String::from_utf8_lossy(&out.stdout));
        said.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    let exported = std::fs::read_to_string(&export).unwrap();
    assert_eq!(exported.lines().count(), recipients.len(), "{exported}");
    said.push_str(&exported);
    for d in h.drain_dlq().await {
        said.push_str(&format!("{:?}\n", common::headers(&d)));
    }
    assert!(
        said.contains("[redacted]"),
        "the echoes were seen and redacted:\n{said}"
    );
    let proof = appsecret_proof(&Secret::new(APP_SECRET), &Secret::new(SHAPED_TOKEN));
    for secret in [
        SHAPED_TOKEN,
        &proof,
        APP_SECRET,
        PASSWORD,
        fake_graph::FOREIGN_TOKEN,
    ] {
        assert!(
            !said.contains(secret),
            "a secret got out of the worker:\n{said}"
        );
    }
    std::fs::remove_dir_all(dir).unwrap();
    h.finish().await;
}
