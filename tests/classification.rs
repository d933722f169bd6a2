//! Classification through the real pipeline: the simulator answers codes
//! from Meta's current reference, a worker classifies each answer once and
//! settles it, and the queues, the DLQ and the simulator's books show where
//! each job went.

mod common;

use std::time::Duration;

use common::{eventually, job, Harness, Opts};
use mmsend::classify::{table::reference_message, Class, DeadReason, ScopeKind};
use mmsend::metrics::Settled;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn on(id: &str, token: &str, page: &str, ad_account: &str) -> Value {
    let mut j = job(id, token);
    j["page_id"] = json!(page);
    j["ad_account_id"] = json!(ad_account);
    j
}

#[tokio::test]
async fn a_spend_limit_holds_its_ad_account_without_calls() {
    let mut opts = Opts::new("spend");
    opts.tiers = vec!["200ms", "500ms", "2s"];
    opts.policy.budget_max_age = Duration::from_secs(20);
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    h.config.gate_times.budget = Duration::from_secs(1);
    h.start_worker();
    // 2300056: the ad account reached its total spending limit; the third
    // call finds it raised
    h.publish_job(&on("a", "sim:errn:2300056:2", "1", "111"))
        .await;
    eventually!(
        T,
        h.metrics.gates_open(ScopeKind::AdAccount, Class::Budget) == 1,
        "the ad account is held: {:?}",
        h.sim.stats()
    );
    for i in 0..5 {
        h.publish_job(&on(&format!("b{i}"), &format!("held-{i}"), "1", "111"))
            .await;
        h.publish_job(&on(&format!("c{i}"), &format!("free-{i}"), "1", "222"))
            .await;
    }
    // the other ad account is not held
    eventually!(
        T,
        h.sim.distinct_sent() >= 5,
        "ad account 222 sends: {:?}",
        h.sim.stats()
    );
    // while the gate is closed, ad account 111's jobs wait without calls
    assert_eq!(h.sim.stats().requests, 1 + 5, "only a's call and the c's");
    eventually!(
        T,
        h.metrics
            .settled_count(Settled::Retried, Some(Class::Budget))
            >= 5,
        "the b's were held in a tier"
    );
    assert_eq!(h.sim.stats().requests, 1 + 5, "still no call for the b's");
    // each time the gate's time is up one job probes; once the limit is
    // raised the probe succeeds and the b's flow
    h.wait_settled(11, T).await;
    let stats = h.sim.stats();
    assert_eq!((stats.sent, stats.duplicates), (11, 0), "{stats:?}");
    assert_eq!(
        stats.errors.get("2300056"),
        Some(&2),
        "one failed probe per gate interval"
    );
    assert_eq!(
        stats.requests,
        2 + 11,
        "no job but the probes called while held"
    );
    assert!(h.drain_dlq().await.is_empty());
    h.finish().await;
}

#[tokio::test]
async fn thirty_minute_codes_wait_thirty_minutes_and_try_later_codes_do_not() {
    let mut opts = Opts::new("thirty");
    opts.tiers = vec!["200ms", "500ms", "30m"];
    let h = Harness::start(opts).await;
    // "try again in about 30 minutes"
    for code in [2300055, 2300061, 2300062] {
        h.publish_job(&job(&format!("w{code}"), &format!("sim:err:{code}")))
            .await;
    }
    // "try again later": the transient schedule
    h.publish_job(&job("later", "sim:err:2300057")).await;
    let thirty = format!("{}.retry.30m", h.topology.prefix);
    eventually!(
        T,
        h.depth(&thirty).await == 3,
        "three jobs wait in the 30m tier"
    );
    eventually!(
        T,
        h.metrics
            .settled_count(Settled::Dead, Some(Class::Transient))
            == 1,
        "the try-later job exhausts its short retries"
    );
    assert_eq!(h.metrics.retried_to_count("30m"), 3);
    assert_eq!(
        h.metrics.retried_to_count("200ms"),
        3,
        "later: 3 retries of 4 attempts"
    );
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].job_id().as_deref(), Some("later"));
    assert_eq!(dead[0].reason(), Some(DeadReason::RetriesExhausted));
    h.finish().await;
}

#[tokio::test]
async fn onboarding_holds_its_page_and_the_answer_dies_with_metas_message() {
    let mut opts = Opts::new("onboarding");
    opts.tiers = vec!["200ms", "500ms", "2s"];
    opts.start_worker = false;
    let mut h = Harness::start(opts).await;
    h.config.gate_times.auth = Duration::from_secs(2);
    h.start_worker();
    // 2300066: the page has not signed the terms
    h.publish_job(&on("a", "sim:err:2300066", "7001", "1"))
        .await;
    eventually!(
        T,
        h.metrics
            .settled_count(Settled::Dead, Some(Class::Onboarding))
            == 1,
        "the answering job dies at once"
    );
    for i in 0..5 {
        h.publish_job(&on(&format!("b{i}"), &format!("held-{i}"), "7001", "1"))
            .await;
        h.publish_job(&on(&format!("c{i}"), &format!("free-{i}"), "7002", "1"))
            .await;
    }
    eventually!(
        T,
        h.metrics
            .settled_count(Settled::Retried, Some(Class::Onboarding))
            >= 5,
        "page 7001's jobs are held"
    );
    eventually!(T, h.sim.distinct_sent() >= 5, "page 7002 is not held");
    assert_eq!(
        h.sim.stats().requests,
        1 + 5,
        "no call for page 7001 while held"
    );
    // the operator fixes the onboarding; after the hold one probe succeeds
    h.wait_settled(11, T).await;
    let stats = h.sim.stats();
    assert_eq!((stats.sent, stats.duplicates), (10, 0));
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    let s = &dead[0].story;
    assert_eq!(s.last_error.class.as_deref(), Some("onboarding"));
    assert_eq!(s.dead_reason.as_deref(), Some("terminal"));
    assert_eq!(
        s.last_error.message.as_deref(),
        reference_message(2300066),
        "the dead letter keeps Meta's own words"
    );
    h.finish().await;
}

#[tokio::test]
async fn a_2xx_that_is_not_a_send_is_never_acked_as_sent() {
    let h = Harness::start(Opts::new("notasend")).await;
    // a captive proxy's HTML page: never reached Meta, retried, then dead
    h.publish_job(&job("html", "sim:fault:html200")).await;
    // Meta said it did not send: dead at once
    h.publish_job(&job("nope", "sim:fault:success_false")).await;
    h.wait_settled(2, T).await;
    assert_eq!(h.metrics.settled_counts().sent, 0, "nothing acked as sent");
    assert_eq!(h.sim.stats().sent, 0);
    let mut dead = h.drain_dlq().await;
    dead.sort_by_key(|d| d.job_id());
    let (html, nope) = (&dead[0].story, &dead[1].story);
    assert_eq!(dead[0].job_id().as_deref(), Some("html"));
    assert_eq!(html.dead_reason.as_deref(), Some("retries_exhausted"));
    assert_eq!(html.last_error.class.as_deref(), Some("transient"));
    assert_eq!(html.last_error.http_status, Some(200));
    assert!(
        html.last_error
            .message
            .as_deref()
            .is_some_and(|m| m.contains("not a Graph API answer")),
        "{:?}",
        html.last_error.message
    );
    assert!(!html.last_error.ambiguous);
    assert_eq!(nope.dead_reason.as_deref(), Some("terminal"));
    assert_eq!(nope.last_error.class.as_deref(), Some("unknown"));
    assert_eq!(nope.attempt, 1);
    h.finish().await;
}

#[tokio::test]
async fn a_2300035_after_a_maybe_sent_call_settles_the_job_as_sent() {
    let mut opts = Opts::new("maybesent");
    opts.sim.cap_window = Some(Duration::from_secs(3600));
    let h = Harness::start(opts).await;
    // the first call is a send whose answer lacks the tracking id: maybe
    // sent, retried; the retry meets the recipient's 12 h cap (2300035),
    // which proves the first call was the send
    h.publish_job(&job("m1", "sim:fault:no_tracking_id:m1"))
        .await;
    // a 2300035 without an earlier maybe-sent call is an ordinary cap
    h.publish_job(&job("m2", "sim:err:2300035:m2")).await;
    eventually!(
        T,
        h.metrics.settled_counts().sent == 1,
        "m1 settled as sent"
    );
    let stats = h.sim.stats();
    assert_eq!(
        stats.sends_by_recipient.get("sim:fault:no_tracking_id:m1"),
        Some(&1)
    );
    assert_eq!(stats.duplicates, 0, "never sent twice");
    assert_eq!(
        h.metrics
            .settled_count(Settled::Sent, Some(Class::RecipientCapped)),
        1,
        "counted as sent on the cap's evidence"
    );
    eventually!(
        T,
        h.metrics
            .settled_count(Settled::Retried, Some(Class::RecipientCapped))
            >= 1,
        "m2 waits like any capped job"
    );
    h.finish().await;
}

#[tokio::test]
async fn a_redirect_is_an_answer_never_a_second_request() {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use axum::routing::{any, post};
    use mmsend::graph::{Client, ClientConfig, Outcome, Secret, SendRequest};

    // a proxy or a wrong base URL that redirects: the client must not
    // follow it (reqwest would turn the POST into a GET, or send it again)
    let followed = Arc::new(AtomicU64::new(0));
    let hits = followed.clone();
    let app = axum::Router::new()
        .route(
            "/v24.0/act_1234567890/messages",
            post(|| async {
                (
                    axum::http::StatusCode::TEMPORARY_REDIRECT,
                    [("location", "/elsewhere")],
                )
            }),
        )
        .route(
            "/elsewhere",
            any(move || async move {
                hits.fetch_add(1, Ordering::SeqCst);
                axum::Json(json!({"success": true, "marketing_message_tracking_id": "x"}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = Client::new(ClientConfig {
        base_url: format!("http://{addr}"),
        ..ClientConfig::default()
    })
    .unwrap();
    let outcome = client
        .send(
            &Secret::new("test-token"),
            &SendRequest {
                ad_account_id: "1234567890",
                message_id: "120210000000000000",
                subscription_token: "r1",
                message: None,
                min_conversation_gap_seconds: None,
            },
        )
        .await;
    let Outcome::Failed(failure) = outcome else {
        panic!("a 307 must not be a send: {outcome:?}");
    };
    assert_eq!(failure.status(), Some(307));
    assert_eq!(
        followed.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    server.abort();
}
