//! Delivery tracking (issue 28) end to end, against the real broker and
//! Redis: the simulator posts signed webhooks for each send (echo, then
//! delivery or failure, read, click; shuffled by random delays, some posted
//! twice) to the real receiver, which stores them in RabbitMQ; the tracker
//! joins them to the jobs through the send ledger.
//!
//! - 1,000 sends in two campaigns: each campaign's funnel equals what the
//!   simulator posted, each event counted once; a mis-signed post changes
//!   nothing; every event has its `delivery` event on the results stream.
//! - The tracker stopped while events arrive loses none: they are counted
//!   when it comes back.
//! - A maybe-sent job (its call timed out after the send went out; no cap
//!   in the simulator to answer 2300035) is settled as sent on its echo,
//!   without a second call.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use common::{amqp_url, job_for, redis_url, Harness, Opts};
use mmsend::fleet::{Fleet, FleetConfig};
use mmsend::metrics::Metrics;
use mmsend::simulator::{SimConfig, SimWebhooks};
use mmsend::webhooks::{self, WebhookConfig};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "tracking-app-secret-0123456789";
const PAGE: &str = "9876543210";

fn sim_posting_to(port: u16, failed: f64, duplicate: f64) -> SimConfig {
    SimConfig {
        record: true,
        webhooks: Some(SimWebhooks {
            url: format!("http://127.0.0.1:{port}/webhooks"),
            app_secret: SECRET.into(),
            page_id: PAGE.into(),
            page_by_token: Default::default(),
            delivered: 0.9,
            read: 0.5,
            click: 0.3,
            failed,
            duplicate,
            max_delay: Duration::from_millis(800),
        }),
        ..SimConfig::default()
    }
}

/// An idle harness (its worker not started) whose simulator posts signed
/// webhooks to a receiver on its topology, every send indexed for the
/// tracker; `tweak` adjusts the options first.
async fn tracked(
    name: &'static str,
    failed: f64,
    duplicate: f64,
    tweak: impl FnOnce(&mut Opts),
) -> (Harness, Receiver) {
    let port = common::free_port();
    let mut opts = Opts::idle(name);
    opts.sim = sim_posting_to(port, failed, duplicate);
    opts.redis = Some(redis_url());
    tweak(&mut opts);
    let mut h = Harness::start(opts).await;
    tracking_on(&mut h);
    let r = receiver(&h, port).await;
    (h, r)
}

struct Receiver {
    url: String,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), webhooks::WebhookError>>,
}

async fn receiver(h: &Harness, port: u16) -> Receiver {
    let config = WebhookConfig {
        amqp_url: amqp_url(),
        topology: h.topology.clone(),
        listen: format!("127.0.0.1:{port}"),
        verify_token: mmsend::graph::auth::Secret::new("verify"),
        app_secret: mmsend::graph::auth::Secret::new(SECRET),
        max_body: webhooks::MAX_BODY,
    };
    let stop = CancellationToken::new();
    let (addr, task) = webhooks::spawn(config, Metrics::new(), stop.clone())
        .await
        .expect("the receiver listens");
    Receiver {
        url: format!("http://{addr}/webhooks"),
        stop,
        task,
    }
}

impl Receiver {
    async fn finish(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The funnel of `campaign` as `mmsend campaign show --json` has it:
/// status → count (unmatched included).
async fn funnel(h: &Harness, campaign: &str) -> BTreeMap<String, u64> {
    let campaigns = mmsend::fleet::campaign::Campaigns::connect(
        &FleetConfig::new(&redis_url()),
        &h.topology.prefix,
    )
    .await
    .unwrap();
    let v = campaigns.show(campaign).await.unwrap().unwrap_or_else(|| {
        panic!("campaign {campaign} is known");
    });
    v.funnel
        .stages()
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(s, n)| (s.to_string(), n))
        .collect()
}

/// What the simulator posted for `message_id`: status → events.
async fn posted(h: &Harness, message_id: &str) -> BTreeMap<String, u64> {
    h.sim
        .stats()
        .webhooks
        .get(message_id)
        .cloned()
        .unwrap_or_default()
}

/// Waits until each campaign's funnel equals what was posted for its
/// message id, or fails with both.
async fn wait_funnels(h: &Harness, campaigns: &[(&str, &str)], timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut all = true;
        let mut seen = Vec::new();
        for (campaign, message_id) in campaigns {
            let (got, want) = (funnel(h, campaign).await, posted(h, message_id).await);
            all &= got == want;
            seen.push((campaign.to_string(), got, want));
        }
        if all {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "funnels (campaign, counted, posted): {seen:#?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Every send indexed for the tracker from the first (the tests' first
/// sends come before any echo; `auto` would start at the first echo).
fn tracking_on(h: &mut Harness) {
    if let Some(fleet) = h.config.fleet.as_mut() {
        fleet.delivery_tracking = mmsend::config::DeliveryTracking::On;
    }
}

/// The calls the simulator got for `token`.
fn calls_to(h: &Harness, token: &str) -> usize {
    h.sim
        .record()
        .requests
        .iter()
        .filter(|q| q.token.as_deref() == Some(token))
        .count()
}

/// A connection to the shared Redis.
async fn redis_conn() -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A worker process, killed if the test ends without stopping it (a failed
/// assertion must not leave it consuming).
struct Worker(std::process::Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether today's tracking-id hash of `prefix` holds `tracking`.
async fn indexed(prefix: &str, tracking: &str) -> bool {
    let mut conn = redis_conn().await;
    let day = chrono::Utc::now().timestamp_millis() / 86_400_000;
    redis::cmd("HEXISTS")
        .arg(format!("{{{prefix}}}:tid:{day}"))
        .arg(tracking)
        .query_async::<i64>(&mut conn)
        .await
        .unwrap()
        == 1
}

async fn redis_exists(key: &str) -> bool {
    let mut conn = redis_conn().await;
    redis::cmd("EXISTS")
        .arg(key)
        .query_async::<i64>(&mut conn)
        .await
        .unwrap()
        == 1
}

/// Whether the send ledger records `job` as sent.
async fn ledger_sent(h: &Harness, job: &str) -> bool {
    let mut conn = redis_conn().await;
    let record: Option<String> = redis::cmd("GET")
        .arg(format!("{{{}}}:job:{job}", h.topology.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    record.is_some_and(|r| r.starts_with("sent\n"))
}

fn metric(metrics: &Metrics, prefix: &str) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[tokio::test]
async fn signed_events_for_a_thousand_sends_give_each_campaign_the_funnel_that_was_posted() {
    let (mut h, r) = tracked("track-funnel", 0.05, 0.3, |o| {
        o.results = true;
        o.concurrency = 64;
    })
    .await;
    h.start_worker();
    let (_results_channel, mut results) = h.results_consumer("track-results", 500).await;

    const SENDS: usize = 1000;
    let campaigns = [
        ("track-a", "120210000000000001"),
        ("track-b", "120210000000000002"),
    ];
    for i in 0..SENDS {
        let (campaign, message_id) = campaigns[i % 2];
        let mut job = job_for(&format!("tr-{i}"), &format!("sub-{i}"), message_id);
        job["campaign"] = serde_json::json!(campaign);
        h.publish_job(&job).await;
    }
    h.wait_settled(SENDS as u64, Duration::from_secs(60)).await;
    wait_funnels(&h, &campaigns, Duration::from_secs(60)).await;

    let posted_total: u64 = {
        let mut n = 0;
        for (_, m) in campaigns {
            n += posted(&h, m).await.values().sum::<u64>();
        }
        n
    };
    let matched = metric(&h.metrics, "mmsend_webhook_events_total{field=");
    println!(
        "{SENDS} sends, {posted_total} distinct events posted; tracker: {}",
        {
            h.metrics
                .render()
                .lines()
                .filter(|l| l.starts_with("mmsend_webhook_events_total{") && !l.ends_with(" 0"))
                .collect::<Vec<_>>()
                .join("; ")
        }
    );
    assert!(matched >= posted_total, "every event was taken");
    let scrape = h.metrics.render();
    for name in mmsend::metrics::TRACKER_SERIES {
        assert!(
            scrape.contains(name),
            "{name} in a worker's scrape with its tracker"
        );
    }
    for (c, m) in campaigns {
        let f = funnel(&h, c).await;
        assert_eq!(
            f.get("echoed"),
            Some(&(SENDS as u64 / 2)),
            "{c}: one echo per send"
        );
        assert!(
            f.contains_key("read") && f.contains_key("clicked"),
            "{c}: {f:?}"
        );
        assert_eq!(f.get("unmatched"), None, "{c}: every event joined a send");
        assert_eq!(f, posted(&h, m).await);
    }

    // the console shows each campaign's funnel, and a job's history
    {
        let mut config = mmsend::console::ConsoleConfig::new(&amqp_url(), h.topology.clone());
        config.listen = "127.0.0.1:0".into();
        config.redis = Some(FleetConfig::new(&redis_url()));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(mmsend::console::serve(config, stop.clone(), move |a| {
            let _ = tx.send(a);
        }));
        let base = format!("http://{}", rx.await.unwrap());
        let get = |path: String| {
            let url = format!("{base}{path}");
            async move {
                let r = reqwest::get(url).await.unwrap();
                (r.status().as_u16(), r.text().await.unwrap())
            }
        };
        let f = funnel(&h, "track-a").await;
        let (status, page) = get("/campaign?c=track-a".into()).await;
        assert_eq!(status, 200);
        assert!(
            page.contains("class=\"funnel\""),
            "the campaign page has its funnel"
        );
        for (stage, n) in &f {
            let row = format!("<td data-label=\"status\">{stage}</td><td class=\"n\" data-label=\"sends\">{n}</td>");
            assert!(page.contains(&row), "{stage} {n} on the campaign page");
        }
        let record = h.sim.record();
        let sent = record.sends.iter().find(|s| s.token == "sub-1").unwrap();
        let (status, page) = get("/job?id=tr-1".into()).await;
        assert_eq!(status, 200);
        assert!(
            page.contains(sent.tracking_id.as_deref().unwrap()),
            "the job page names its send"
        );
        assert!(
            page.contains("<td data-label=\"status\">echoed</td>"),
            "and its echo"
        );
        let (status, page) = get("/job?id=never-seen".into()).await;
        assert_eq!(status, 200);
        assert!(page.contains("No record"));
        stop.cancel();
        task.await.unwrap().unwrap();
    }

    // a mis-signed post of a new event for a known send changes nothing
    let record = h.sim.record();
    let send = record
        .sends
        .iter()
        .find(|s| s.tracking_id.is_some())
        .unwrap();
    let body = serde_json::json!({"object": "page", "entry": [{"id": PAGE, "time": 1, "changes": [
        {"field": "marketing_message_clicks", "value": {"messenger_subscription_token": send.token,
         "message_id": send.message_id, "page_id": PAGE, "timestamp": chrono::Utc::now().timestamp_millis()}}]}]})
    .to_string();
    let http = reqwest::Client::new();
    for signature in [
        None,
        Some(format!("sha256={}", "0".repeat(64))),
        Some(webhooks::signature("another-secret", body.as_bytes())),
    ] {
        let mut req = http.post(&r.url).body(body.clone());
        if let Some(s) = signature {
            req = req.header("x-hub-signature-256", s);
        }
        assert_eq!(req.send().await.unwrap().status().as_u16(), 403);
    }
    let before: Vec<_> = {
        let mut v = Vec::new();
        for (c, _) in campaigns {
            v.push(funnel(&h, c).await);
        }
        v
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (i, (c, _)) in campaigns.iter().enumerate() {
        assert_eq!(
            funnel(&h, c).await,
            before[i],
            "refused posts count nothing"
        );
    }

    // each counted status of each job has its delivery event on the results
    // stream (at least once: Meta's redeliveries repeat theirs), naming the
    // send's tracking id, clicks and failures included
    let want: u64 = before
        .iter()
        .flat_map(|f| f.iter().filter(|(k, _)| *k != "unmatched").map(|(_, n)| *n))
        .sum();
    let tracking: BTreeMap<String, String> = record
        .sends
        .iter()
        .filter_map(|s| Some((s.token.clone(), s.tracking_id.clone()?)))
        .collect();
    let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while (seen.len() as u64) < want {
        use futures_util::StreamExt;
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Ok(Some(Ok(d))) = tokio::time::timeout(left, results.next()).await else {
            panic!("delivery events for {} statuses of {want}", seen.len());
        };
        d.ack(lapin::options::BasicAckOptions::default())
            .await
            .unwrap();
        let e: mmsend::results::ResultEvent = serde_json::from_slice(&d.data).unwrap();
        if e.outcome != mmsend::results::ResultOutcome::Delivery {
            continue;
        }
        let token = format!("sub-{}", e.job_id.trim_start_matches("tr-"));
        assert_eq!(e.tracking_id.as_ref(), tracking.get(&token), "{e:?}");
        *seen
            .entry((e.job_id.clone(), e.status.clone().unwrap()))
            .or_default() += 1;
    }
    let repeated = seen.values().filter(|n| **n > 1).count();
    println!("{want} statuses, each with its delivery event ({repeated} repeated by Meta's redeliveries)");

    r.finish().await;
    h.finish().await;
}

#[tokio::test]
async fn a_tracker_stopped_while_events_arrive_loses_none() {
    let (mut h, r) = tracked("track-stop", 0.05, 0.2, |_| {}).await;
    // the worker runs without a tracker: a tracker of its own comes and goes
    h.config.tracker = false;
    h.start_worker();
    let fleet = Arc::new(
        Fleet::new(
            FleetConfig::new(&redis_url()),
            &h.topology.prefix,
            "tracker-test",
            Metrics::new(),
        )
        .unwrap(),
    );
    let start_tracker = |metrics: Arc<Metrics>| {
        let stop = CancellationToken::new();
        let task = tokio::spawn(mmsend::tracker::run(
            mmsend::tracker::TrackerConfig {
                amqp_url: amqp_url(),
                topology: h.topology.clone(),
            },
            fleet.clone(),
            metrics,
            stop.clone(),
        ));
        (stop, task)
    };

    const SENDS: usize = 300;
    let campaign = [("track-stop", "120210000000000003")];
    let tracker_metrics = Metrics::new();
    let (stop, task) = start_tracker(tracker_metrics.clone());
    let mut task = Some(task);
    for i in 0..SENDS {
        let mut job = job_for(&format!("ts-{i}"), &format!("sub-{i}"), campaign[0].1);
        job["campaign"] = serde_json::json!(campaign[0].0);
        h.publish_job(&job).await;
        if i == SENDS / 3 {
            // stopped while sends (and their webhooks) go on
            stop.cancel();
            task.take().unwrap().await.unwrap().unwrap();
        }
    }
    h.wait_settled(SENDS as u64, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let waiting = h.depth(&h.topology.webhook_queue()).await;
    let counted_while_stopped = funnel(&h, campaign[0].0).await;
    println!("stopped: {waiting} payloads waiting, counted so far {counted_while_stopped:?}");
    assert!(waiting > 0, "events arrived while the tracker was stopped");
    assert_ne!(counted_while_stopped, posted(&h, campaign[0].1).await);

    // it comes back: everything is counted, once
    let (stop, task) = start_tracker(tracker_metrics.clone());
    wait_funnels(&h, &campaign, Duration::from_secs(60)).await;
    // the rest of the queue is Meta's second copies: taken, counting nothing
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while h.depth(&h.topology.webhook_queue()).await > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the queue empties");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_funnels(&h, &campaign, Duration::from_secs(1)).await;
    stop.cancel();
    task.await.unwrap().unwrap();

    r.finish().await;
    h.finish().await;
}

#[tokio::test]
async fn a_maybe_sent_job_is_settled_as_sent_on_its_echo_without_a_second_call() {
    // no cap in the simulator: a second call would be a second send
    let (mut h, r) = tracked("track-echo", 0.0, 0.0, |_| {}).await;
    // the call times out after the send went out (the answer is 3 s late)
    h.config.graph.request_timeout = Duration::from_secs(1);
    h.start_worker();

    // the page's webhooks are tracked (an echo of it was seen)
    h.publish_job(&job_for("echo-warm", "sub-warm", "120210000000000004"))
        .await;
    h.wait_settled(1, Duration::from_secs(20)).await;
    let token = "sim:latesend:3000:maybe";
    h.publish_job(&job_for("echo-1", token, "120210000000000004"))
        .await;
    h.wait_settled(2, Duration::from_secs(30)).await;

    let calls = calls_to(&h, token);
    assert_eq!(calls, 1, "one call: the second was settled on the echo");
    assert_eq!(h.sim.stats().sent, 2);
    assert_eq!(
        metric(&h.metrics, "mmsend_maybe_sent_total{settled_by=\"echo\"}"),
        1
    );
    assert_eq!(
        metric(&h.metrics, "mmsend_maybe_sent_total{settled_by=\"call\"}"),
        0
    );
    assert!(h.dead_reasons().await.is_empty());
    // the ledger holds the send with the echo's tracking id
    let tracking = h
        .sim
        .record()
        .sends
        .iter()
        .find(|s| s.token == token)
        .unwrap()
        .tracking_id
        .clone()
        .unwrap();
    let mut conn = redis_conn().await;
    let record: String = redis::cmd("GET")
        .arg(format!("{{{}}}:job:echo-1", h.topology.prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(
        record.starts_with("sent\n") && record.contains(&tracking),
        "{record:?}"
    );

    r.finish().await;
    h.finish().await;
}

// the binary runs while the test thread waits for it: the simulator needs
// a thread of its own
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pages_check_names_the_fields_each_page_is_subscribed_to() {
    let sim = mmsend::simulator::Simulator::start(
        "127.0.0.1:0",
        SimConfig {
            access_token: Some(common::TOKEN.into()),
            unsubscribed_pages: vec!["1110000000".into()],
            ..SimConfig::default()
        },
    )
    .await
    .unwrap();
    let dir = common::tmpdir("pages-check");
    let tokens = dir.join("tokens.json");
    std::fs::write(
        &tokens,
        serde_json::json!({PAGE: common::TOKEN, "1110000000": common::TOKEN}).to_string(),
    )
    .unwrap();
    let base = sim.base_url();
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_mmsend"));
        c.args(["pages", "check"])
            .args(args)
            .env("MMSEND_GRAPH_BASE_URL", &base)
            .env_remove("MMSEND_ACCESS_TOKEN")
            .env_remove("MMSEND_PAGE_TOKENS_FILE")
            .env_remove("MMSEND_APP_SECRET");
        for (k, v) in envs {
            c.env(k, v);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let file = tokens.to_str().unwrap();

    // one page subscribed to every field, one to none: exit 1, both named
    let (code, out, _) = run(&["--json"], &[("MMSEND_PAGE_TOKENS_FILE", file)]);
    assert_eq!(code, Some(1), "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let pages = v["pages"].as_array().unwrap();
    assert_eq!(pages.len(), 2);
    let by_id = |id: &str| pages.iter().find(|p| p["page_id"] == id).unwrap().clone();
    assert_eq!(by_id(PAGE)["missing"], serde_json::json!([]), "{out}");
    assert_eq!(by_id(PAGE)["subscribed"].as_array().unwrap().len(), 5);
    assert_eq!(by_id("1110000000")["missing"].as_array().unwrap().len(), 5);
    assert_eq!(v["ok"], false);
    let (code, table, _) = run(&[], &[("MMSEND_PAGE_TOKENS_FILE", file)]);
    assert_eq!(code, Some(1));
    assert!(
        table.contains("no app") && table.contains("subscribed_fields="),
        "{table}"
    );

    // the subscribed page alone, with the default token: exit 0
    let (code, out, err) = run(&["--page", PAGE], &[("MMSEND_ACCESS_TOKEN", common::TOKEN)]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("echoes, deliveries, reads, clicks, delivery_failed"),
        "{out}"
    );

    // a token Meta refuses: said, exit 1, and the token is not printed
    let wrong = "EAAB-wrong-token-0000000000";
    let (code, out, err) = run(&["--page", PAGE], &[("MMSEND_ACCESS_TOKEN", wrong)]);
    assert_eq!(code, Some(1));
    assert!(out.contains("Meta did not answer"), "{out}");
    assert!(!out.contains(wrong) && !err.contains(wrong));

    // nothing to check: a usage error that says what to do
    let (code, _, err) = run(&[], &[("MMSEND_ACCESS_TOKEN", common::TOKEN)]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--page"), "{err}");
    sim.shutdown().await;
}

#[tokio::test]
async fn silent_pages_are_those_with_sends_and_no_echo_since() {
    let prefix = common::random_prefix("track-silent");
    let mut config = FleetConfig::new(&redis_url());
    config.silent_page_after = Duration::from_secs(60);
    let fleet = Fleet::new(config, &prefix, "silent-test", Metrics::new()).unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let minutes_ago = |m: i64| now - m * 60_000;
    let echo = |page: &str, at: i64| mmsend::webhooks::events::Event {
        field: mmsend::webhooks::events::Field::Echo,
        tracking_id: Some(format!("mm.silent.{page}.{at}")),
        token: Some("tok".into()),
        message_id: Some("m".into()),
        page_id: Some(page.into()),
        timestamp: at,
        mid: None,
        recipient_id: None,
        error_message: None,
    };
    let pages = |list: &[(&str, i64)]| {
        list.iter()
            .map(|(p, at)| (p.to_string(), *at))
            .collect::<std::collections::HashMap<_, _>>()
    };
    async fn silent(fleet: &Fleet, at: i64) -> Vec<String> {
        let pages = fleet.silent_pages(at).await.unwrap();
        pages.into_iter().map(|p| p.page_id).collect()
    }

    // before the fleet ever saw an echo, no page is silent: webhooks are
    // not set up (every page would be, else)
    fleet
        .note_page_sends(&pages(&[("A", minutes_ago(5))]))
        .await
        .unwrap();
    assert!(silent(&fleet, now).await.is_empty());

    // A and B sent to 5 minutes ago; B was echoed since, A was not
    fleet
        .note_page_sends(&pages(&[("A", minutes_ago(5)), ("B", minutes_ago(5))]))
        .await
        .unwrap();
    fleet
        .track(&[echo("B", minutes_ago(4))], false)
        .await
        .unwrap();
    assert_eq!(silent(&fleet, now).await, ["A"]);
    // a send younger than silent_page_after is not silence yet
    fleet
        .note_page_sends(&pages(&[("C", now - 10_000)]))
        .await
        .unwrap();
    assert_eq!(silent(&fleet, now).await, ["A"]);
    assert_eq!(silent(&fleet, now + 120_000).await, ["A", "C"]);
    // A is echoed again: no longer silent; B's next send starts a new wait
    fleet
        .track(&[echo("A", minutes_ago(1))], false)
        .await
        .unwrap();
    fleet
        .note_page_sends(&pages(&[("B", minutes_ago(3))]))
        .await
        .unwrap();
    assert_eq!(silent(&fleet, now).await, ["B"]);
    // a later first send of A while its echo stands keeps it quiet until
    // that send is older than silent_page_after without an echo
    fleet.note_page_sends(&pages(&[("A", now)])).await.unwrap();
    assert_eq!(silent(&fleet, now).await, ["B"]);
    assert_eq!(silent(&fleet, now + 120_000).await, ["A", "B", "C"]);
    common::delete_redis_keys(&redis_url(), &prefix).await;
}

// the worker binary runs while the test thread waits on it
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_call_leaves_a_job_its_echo_settles_without_a_second_call() {
    // no cap in the simulator: a second call would be a second send; a job
    // behind the dead worker's lease waits in a short tier
    let (h, r) = tracked("track-crash", 0.0, 0.0, |o| {
        o.tiers = vec!["250ms", "1s", "3s"]
    })
    .await;
    let dir = common::tmpdir("track-crash");
    // a short lease, so the dead worker's claim runs out soon
    // delivery_tracking is `auto`: sends are indexed once the fleet saw an
    // echo
    let extra = "[graph]\nrequest_timeout = \"2s\"\n[redis]\nlease_margin = \"500ms\"\n";
    let start = |name: &str| {
        let mut cmd = h.worker_command(&dir, extra);
        cmd.env("MMSEND_REDIS_URL", redis_url())
            .env("MMSEND_WORKER_ID", format!("{name}-{}", h.topology.prefix))
            .env("MMSEND_LOG", "info")
            .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap());
        Worker(cmd.spawn().unwrap())
    };
    let mut first = start("first");
    // the page's webhooks flow (the fleet saw an echo)
    h.publish_job(&job_for("crash-warm", "sub-warm", "120210000000000005"))
        .await;
    common::eventually!(
        Duration::from_secs(20),
        redis_exists(&format!("{{{}}}:wh:page_echo", h.topology.prefix)).await,
        "the warm-up send is echoed"
    );
    // Meta sends at once and answers 1.5 s later; the worker dies meanwhile
    let token = "sim:latesend:1500:crash";
    h.publish_job(&job_for("crash-1", token, "120210000000000005"))
        .await;
    common::eventually!(
        Duration::from_secs(20),
        h.sim.record().sends.iter().any(|s| s.token == token),
        "the call reached Meta"
    );
    common::signal(&first.0, "-KILL");
    let _ = first.0.wait();

    // another worker takes the job once the dead one's lease ran out: an
    // earlier call may have been the send, and its echo says it was
    let mut second = start("second");
    common::eventually!(
        Duration::from_secs(30),
        ledger_sent(&h, "crash-1").await,
        "the job is settled"
    );
    common::signal(&second.0, "-TERM");
    let _ = second.0.wait();
    let calls = calls_to(&h, token);
    assert_eq!(calls, 1, "no second call");
    assert_eq!(h.sim.stats().duplicates, 0);
    let log = std::fs::read_to_string(dir.join("second.log")).unwrap();
    assert!(log.contains("Meta's echo says it was"), "{log}");
    // `auto`: the warm-up, sent before the fleet saw an echo, was not
    // indexed; the settled job was, and its echo joins it
    let record = h.sim.record();
    let tracking = record.sends.iter().find(|s| s.token == token).unwrap();
    let prefix = &h.topology.prefix;
    assert!(indexed(prefix, tracking.tracking_id.as_deref().unwrap()).await);
    let warm = record.sends.iter().find(|s| s.token == "sub-warm").unwrap();
    assert!(!indexed(prefix, warm.tracking_id.as_deref().unwrap()).await);
    r.finish().await;
    h.finish().await;
}
