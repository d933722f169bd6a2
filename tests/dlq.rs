//! Producers and operators against the real RabbitMQ: `enqueue` counts, and
//! the DLQ toolkit's rules at a few thousand letters — a peek keeps every
//! letter in order, a run is bounded by the depth at its start, replay and
//! purge touch exactly the selected letters, an interrupted replay moves a
//! letter at most once, limits stop early, exact sets, the `.dead` delivery
//! limit (and an old `.dead` without it), and the `mmsend dlq` CLI (JSON,
//! exit codes, a closed pipe). Also: one reader of the DLQ at a time, even
//! when two start at the same instant; job ids that fit the AMQP
//! `message_id`; a field named twice; `--since` on RabbitMQ's own dead
//! letters; `export -o -`; an export re-enqueued as a replay; control
//! characters escaped on a terminal. Large fills (100k, 1M) are in
//! `benches/dlq.rs`.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::process::Stdio;
use std::time::Duration;

use common::{eventually, job, Harness, Opts};
use lapin::options::{BasicConsumeOptions, BasicGetOptions};
use lapin::types::{AMQPValue, FieldTable};
use mmsend::broker::headers::{LastError, Story};
use mmsend::broker::TopologyWarning;
use mmsend::classify::{Class, DeadReason};
use mmsend::dlq::{
    self, Action, DeadLetter, DlqError, Filter, Flow, LetterSet, Observer, ScanOptions, ScanReport,
    Selection, Stop,
};
use mmsend::producer::{self, Producer};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// One dead letter as a worker would have written it.
struct Dead<'a> {
    id: String,
    reason: Option<DeadReason>,
    class: Class,
    code: i64,
    campaign: &'a str,
}

fn dead<'a>(
    id: impl Into<String>,
    reason: Option<DeadReason>,
    class: Class,
    code: i64,
    campaign: &'a str,
) -> Dead<'a> {
    Dead {
        id: id.into(),
        reason,
        class,
        code,
        campaign,
    }
}

/// Puts dead letters straight into the DLQ, confirms pipelined.
async fn fill(h: &Harness, letters: &[Dead<'_>]) {
    let mut letters_out = Vec::new();
    for d in letters {
        let story = Story {
            attempt: 1,
            dead_reason: d.reason.map(|r| r.as_str().to_owned()),
            dead_at: Some(chrono::Utc::now()),
            last_error: LastError {
                class: Some(d.class.as_str().into()),
                code: Some(d.code),
                message: Some(format!("error {}", d.code)),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut headers = FieldTable::default();
        story.write(&mut headers);
        let mut body = job(&d.id, &format!("ok-{}", d.id));
        body["campaign"] = json!(d.campaign);
        letters_out.push((d.id.clone(), body, headers));
    }
    h.fill_dlq(letters_out).await;
}

/// A terminal page mismatch (2300005).
fn mismatch(id: impl Into<String>, campaign: &str) -> Dead<'_> {
    dead(
        id,
        Some(DeadReason::Terminal),
        Class::Mismatch,
        2300005,
        campaign,
    )
}

/// A terminal unsupported region (2300030).
fn region(id: impl Into<String>, campaign: &str) -> Dead<'_> {
    dead(
        id,
        Some(DeadReason::Terminal),
        Class::Region,
        2300030,
        campaign,
    )
}

/// `n` letters `l0…`, every fifth with code 2300005 (mismatch, campaign
/// `cm`), the rest 2300030 (region, campaign `bf`).
fn mixed(n: usize) -> Vec<Dead<'static>> {
    (0..n)
        .map(|i| match i % 5 {
            0 => mismatch(format!("l{i}"), "cm"),
            _ => region(format!("l{i}"), "bf"),
        })
        .collect()
}

/// A harness named `name` without a worker, its DLQ filled with `mixed(n)`.
async fn with_letters(name: &'static str, n: usize) -> (Harness, Vec<Dead<'static>>) {
    let h = Harness::start(Opts::idle(name)).await;
    let letters = mixed(n);
    fill(&h, &letters).await;
    (h, letters)
}

/// One scan of the test's DLQ, telling `observer` about each selected letter.
async fn scan_with(
    h: &Harness,
    selection: impl Into<Selection>,
    options: &ScanOptions,
    observer: &mut dyn Observer,
) -> ScanReport {
    dlq::scan(&h.conn, &h.topology, selection, options, observer)
        .await
        .unwrap()
}

/// One scan of the test's DLQ that only counts.
async fn scan(h: &Harness, selection: impl Into<Selection>, options: &ScanOptions) -> ScanReport {
    scan_with(h, selection, options, &mut |_: &DeadLetter| {}).await
}

/// The letters with error code `code`.
fn by_code(code: i64) -> Filter {
    Filter {
        code: Some(code),
        ..Default::default()
    }
}

/// Takes every message out of `queue`, in order, returning the job ids.
async fn drain_ids(h: &Harness, queue: &str) -> Vec<String> {
    let ch = h.conn.create_channel().await.unwrap();
    let mut out = Vec::new();
    while let Some(msg) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let d = DeadLetter::new(msg.delivery.data.clone(), msg.delivery.properties.clone());
        out.push(d.job_id().unwrap_or_default());
    }
    let _ = ch.close(200, "done".into()).await;
    out
}

/// `got == want`, or a failure that shows where they part.
#[track_caller]
fn assert_order(got: &[String], want: &[String], what: &str) {
    if got == want {
        return;
    }
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let window = |v: &[String]| v[at.saturating_sub(3)..(at + 8).min(v.len())].join(" ");
    panic!(
        "{what}: {} letters, want {}; first difference at {at}: got [{}], want [{}]",
        got.len(),
        want.len(),
        window(got),
        window(want)
    );
}

fn ids(letters: &[Dead<'_>]) -> Vec<String> {
    letters.iter().map(|d| d.id.clone()).collect()
}

/// Drains the DLQ and checks it held exactly `want`, in this order.
async fn assert_dlq_holds(h: &Harness, want: &[String]) {
    assert_order(
        &drain_ids(h, &h.topology.dead_queue()).await,
        want,
        "the DLQ afterwards",
    );
}

/// Small consumer windows, so a few thousand letters take several consumers.
fn small(action: Action) -> ScanOptions {
    ScanOptions {
        consumer_window: 700,
        confirm_window: 64,
        ..ScanOptions::new(action)
    }
}

#[tokio::test]
async fn enqueue_publishes_valid_lines_and_reports_invalid_ones_by_number() {
    let h = Harness::start(Opts::idle("enqueue")).await;
    let mut text = String::new();
    let mut invalid_lines = Vec::new();
    for i in 1..=10_000 {
        if i % 1000 == 7 {
            text.push_str("{\"v\": 1, \"job_id\": \"broken\"}\n");
            invalid_lines.push(i);
        } else if i == 5000 {
            text.push_str("not json at all\n");
            invalid_lines.push(i);
        } else {
            text.push_str(
                &serde_json::to_string(&job(&format!("e{i}"), &format!("r{i}"))).unwrap(),
            );
            text.push('\n');
        }
    }
    let producer = Producer::on(&h.conn, &h.topology).await.unwrap();
    let report = producer::enqueue(text.as_bytes(), Some(&producer), |_, _| {})
        .await
        .unwrap();
    assert_eq!(report.lines, 10_000);
    assert_eq!(report.published, 10_000 - invalid_lines.len());
    assert!(report.failed.is_empty());
    let got: Vec<usize> = report.invalid.iter().map(|e| e.line).collect();
    assert_eq!(got, invalid_lines);
    assert!(report.invalid[0]
        .error
        .contains("field \"ad_account_id\" is missing"));
    assert_eq!(
        h.depth(&h.topology.send_queue()).await as usize,
        10_000 - invalid_lines.len()
    );
    // dry run validates and publishes nothing
    let dry = producer::enqueue(text.as_bytes(), None, |_, _| {})
        .await
        .unwrap();
    assert_eq!(dry.published, report.published);
    assert_eq!(dry.invalid.len(), invalid_lines.len());
    assert_eq!(
        h.depth(&h.topology.send_queue()).await as usize,
        10_000 - invalid_lines.len()
    );
    producer.close().await;
    h.finish().await;
}

#[tokio::test]
async fn stats_replay_by_code_and_purge_touch_exactly_the_selected() {
    let h = Harness::start(Opts::idle("dlqops")).await;
    let mut letters: Vec<Dead> = (0..6).map(|i| region(format!("reg{i}"), "bf")).collect();
    letters.extend((0..4).map(|i| mismatch(format!("mis{i}"), "cm")));
    for i in 0..3 {
        letters.push(dead(
            format!("exp{i}"),
            Some(DeadReason::RetriesExhausted),
            Class::Transient,
            2,
            "bf",
        ));
    }
    // dead-lettered by the broker itself: no x-mmsend-dead-reason
    letters.push(dead("poison", None, Class::Transient, 1, "cm"));
    fill(&h, &letters).await;

    let (stats, report) = dlq::stats(&h.conn, &h.topology, Filter::default())
        .await
        .unwrap();
    assert_eq!(report.depth_at_start, 14);
    assert_eq!(stats.total, 14);
    let get = |v: &Vec<dlq::Group>, k: &str| v.iter().find(|g| g.key == k).map(|g| g.count);
    assert_eq!(get(&stats.by_reason, "terminal"), Some(10));
    assert_eq!(get(&stats.by_reason, "retries_exhausted"), Some(3));
    assert_eq!(get(&stats.by_reason, "delivery_limit"), Some(1));
    assert_eq!(get(&stats.by_class, "region"), Some(6));
    assert_eq!(get(&stats.by_code, "2300005"), Some(4));
    assert_eq!(get(&stats.by_campaign, "bf"), Some(9));
    assert!(stats.by_reason[0].newest.is_some());
    assert_eq!(
        stats.by_code[0].latest_error.as_deref(),
        Some("error 2300030")
    );
    // peeking kept everything
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 14);

    // replay only the region ones
    let r = scan(&h, by_code(2300030), &small(Action::Replay { rate: 0 })).await;
    assert_eq!((r.selected, r.replayed, r.failed), (6, 6, 0));
    assert_eq!(h.depth(&h.topology.send_queue()).await, 6);
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 8);

    // the replayed copies start over and count the replay
    let ch = h.conn.create_channel().await.unwrap();
    let msg = ch
        .basic_get(
            h.topology.send_queue().as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    let story = Story::read(msg.delivery.properties.headers().as_ref());
    assert_eq!(story.attempt, 0);
    assert_eq!(story.replays, 1);
    assert!(story.replayed_at.is_some() && story.dead_reason.is_none());

    // purge with a typed filter and a limit removes exactly that many
    let purge = Filter {
        class: Some(Class::Mismatch),
        limit: Some(3),
        ..Default::default()
    };
    let r = scan(&h, purge, &small(Action::Purge)).await;
    assert_eq!(r.purged, 3);
    assert_eq!(r.stop, Stop::Selected);
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 5);
    let broker = Filter {
        reason: Some(DeadReason::DeliveryLimit),
        ..Default::default()
    };
    let (only, _) = dlq::stats(&h.conn, &h.topology, broker).await.unwrap();
    assert_eq!(only.total, 1);
    h.finish().await;
}

#[tokio::test]
async fn a_peek_across_several_consumers_keeps_every_letter_once_and_in_order() {
    let (h, letters) = with_letters("dlqorder", 3_000).await;
    let mut seen = Vec::new();
    let r = scan_with(
        &h,
        Filter::default(),
        &small(Action::Peek),
        &mut |d: &DeadLetter| seen.push(d.job_id().unwrap()),
    )
    .await;
    assert_eq!(
        (r.depth_at_start, r.read, r.selected, r.stop),
        (3_000, 3_000, 3_000, Stop::Depth)
    );
    assert_order(&seen, &ids(&letters), "read once each, in queue order");
    // twice more: a peek puts everything back where it was
    for _ in 0..2 {
        scan(&h, Filter::default(), &small(Action::Peek)).await;
    }
    assert_dlq_holds(&h, &ids(&letters)).await;
    h.finish().await;
}

#[tokio::test]
async fn a_run_is_bounded_by_the_depth_at_its_start_while_letters_keep_arriving() {
    let (h, first) = with_letters("dlqbound", 2_000).await;
    let late: Vec<Dead> = (0..1_000)
        .map(|i| {
            dead(
                format!("late{i}"),
                Some(DeadReason::Expired),
                Class::Budget,
                2300015,
                "late",
            )
        })
        .collect();
    let mut late_seen = 0;
    let started = std::sync::Arc::new(tokio::sync::Notify::new());
    let options = small(Action::Peek);
    let mut observer = |d: &DeadLetter| {
        started.notify_one();
        if d.campaign().as_deref() == Some("late") {
            late_seen += 1;
        }
    };
    let late_fill = async {
        // once the run has read its depth and is reading
        started.notified().await;
        fill(&h, &late).await
    };
    let (r, ()) = tokio::join!(
        scan_with(&h, Filter::default(), &options, &mut observer),
        late_fill
    );
    assert_eq!(r.depth_at_start, 2_000);
    assert_eq!(r.read, 2_000, "never more than the depth at the start");
    assert_eq!(
        late_seen, 0,
        "letters that arrived during the run come after the ones it read"
    );
    let mut all = ids(&first);
    all.extend(ids(&late));
    assert_dlq_holds(&h, &all).await;
    h.finish().await;
}

#[tokio::test]
async fn replay_moves_exactly_the_selected_letters_once_and_keeps_the_rest_in_order() {
    let (h, letters) = with_letters("dlqreplay", 3_000).await;
    let r = scan(&h, by_code(2300005), &small(Action::Replay { rate: 0 })).await;
    assert_eq!(
        (r.read, r.selected, r.replayed, r.failed),
        (3_000, 600, 600, 0)
    );
    let sent = drain_ids(&h, &h.topology.send_queue()).await;
    let (want, kept): (Vec<Dead>, Vec<Dead>) = letters.into_iter().partition(|d| d.code == 2300005);
    assert_order(
        &sent,
        &ids(&want),
        "exactly the selected, each once, in order",
    );
    assert_order(
        &drain_ids(&h, &h.topology.dead_queue()).await,
        &ids(&kept),
        "the rest",
    );
    h.finish().await;
}

#[tokio::test]
async fn list_with_a_limit_stops_early_and_says_the_rest_was_not_counted() {
    let (h, letters) = with_letters("dlqlimit", 3_000).await;
    let limited = Filter {
        class: Some(Class::Mismatch),
        limit: Some(5),
        ..Default::default()
    };
    let mut shown = Vec::new();
    let r = scan_with(&h, limited, &small(Action::Peek), &mut |d: &DeadLetter| {
        shown.push(d.job_id().unwrap())
    })
    .await;
    assert_eq!(shown, ["l0", "l5", "l10", "l15", "l20"]);
    assert_eq!((r.selected, r.read, r.stop), (5, 21, Stop::Selected));
    assert!(!r.counted_all());
    assert_dlq_holds(&h, &ids(&letters)).await;
    h.finish().await;
}

/// Cancels the scan after `after` selected letters.
struct CancelAfter {
    after: usize,
    seen: usize,
    token: CancellationToken,
}

impl Observer for CancelAfter {
    fn selected(&mut self, _: &DeadLetter) -> Flow {
        self.seen += 1;
        if self.seen == self.after {
            self.token.cancel();
        }
        Flow::Continue
    }
}

#[tokio::test]
async fn an_interrupted_replay_moves_every_letter_at_most_once_and_keeps_the_rest() {
    let (h, letters) = with_letters("dlqcancel", 2_000).await;
    let token = CancellationToken::new();
    let mut obs = CancelAfter {
        after: 700,
        seen: 0,
        token: token.clone(),
    };
    let r = scan_with(
        &h,
        Filter::default(),
        &small(Action::Replay { rate: 0 }).with_cancel(token),
        &mut obs,
    )
    .await;
    assert_eq!(r.stop, Stop::Interrupted);
    assert!(r.replayed >= 1 && r.replayed <= 700, "{r:?}");
    let sent = drain_ids(&h, &h.topology.send_queue()).await;
    let kept = drain_ids(&h, &h.topology.dead_queue()).await;
    assert_eq!(sent.len(), r.replayed);
    assert_eq!(
        sent.len() + kept.len(),
        2_000,
        "nothing lost, nothing doubled"
    );
    let sent_set: HashSet<&String> = sent.iter().collect();
    assert_eq!(sent_set.len(), sent.len());
    assert!(
        kept.iter().all(|k| !sent_set.contains(k)),
        "no letter both moved and kept"
    );
    let mut order = sent.clone();
    order.extend(kept);
    assert_order(
        &order,
        &ids(&letters),
        "moved the first ones, kept the rest in order",
    );
    h.finish().await;
}

#[tokio::test]
async fn an_exact_set_replays_only_the_confirmed_letters_and_counts_missing_ones() {
    let (h, _) = with_letters("dlqexact", 1_500).await;
    // what a console showed a person: every third letter
    let mut shown = LetterSet::new();
    let mut shown_ids = BTreeSet::new();
    let mut i = 0;
    scan_with(
        &h,
        Filter::default(),
        &small(Action::Peek),
        &mut |d: &DeadLetter| {
            if i % 3 == 0 {
                shown.insert(d.key());
                shown_ids.insert(d.job_id().unwrap());
            }
            i += 1;
        },
    )
    .await;
    assert_eq!(shown.len(), 500);
    // meanwhile someone purges the first letter
    let first = Filter {
        job_id: Some("l0".into()),
        ..Default::default()
    };
    scan(&h, first, &small(Action::Purge)).await;
    let r = scan(&h, shown, &small(Action::Replay { rate: 0 })).await;
    assert_eq!((r.replayed, r.missing), (499, 1));
    let sent: BTreeSet<String> = drain_ids(&h, &h.topology.send_queue())
        .await
        .into_iter()
        .collect();
    shown_ids.remove("l0");
    assert_eq!(sent, shown_ids);
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 1_000);
    h.finish().await;
}

#[tokio::test]
async fn dead_letters_survive_more_peeks_than_any_default_delivery_limit() {
    let (h, letters) = with_letters("dlqpeeks", 20).await;
    // RabbitMQ 4.0+ would drop them after 20 returns without mmsend's limit
    for _ in 0..25 {
        let r = scan(&h, Filter::default(), &ScanOptions::peek()).await;
        assert_eq!(r.read, 20);
    }
    assert_eq!(h.topology.check_dead_queue(&h.conn).await.unwrap(), None);
    assert_dlq_holds(&h, &ids(&letters)).await;
    h.finish().await;
}

#[tokio::test]
async fn a_dead_queue_from_an_earlier_version_is_kept_and_the_fix_is_reported() {
    let topology =
        mmsend::broker::Topology::new(&common::random_prefix("dlqlegacy"), &["200ms"], 5).unwrap();
    let mut guard = common::TopologyGuard::new(&topology);
    let conn = mmsend::broker::connect(&common::amqp_url(), "test")
        .await
        .unwrap();
    // `.dead` as mmsend declared it before: quorum, no delivery limit
    let ch = conn.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    ch.queue_declare(
        topology.dead_queue().as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .unwrap();
    let report = topology
        .declare(&conn)
        .await
        .expect("declare must not fail on an old .dead");
    let want = TopologyWarning::DeadQueueMayDrop {
        queue: topology.dead_queue(),
        current: None,
    };
    assert_eq!(report.warnings, std::slice::from_ref(&want));
    assert!(want.to_string().contains("rabbitmqctl set_policy"));
    assert_eq!(topology.check_dead_queue(&conn).await.unwrap(), Some(want));
    // the rest of the topology is there and routes to the old queue
    let h_depth = topology.show(&conn).await.unwrap();
    // work, one tier, dead letters, held, webhooks, webhook wait
    assert_eq!(h_depth.len(), 1 + 1 + 1 + 1 + 1 + 1);
    // a fresh topology has nothing to report
    let fresh =
        mmsend::broker::Topology::new(&common::random_prefix("dlqfresh"), &["200ms"], 5).unwrap();
    let mut fresh_guard = common::TopologyGuard::new(&fresh);
    assert!(fresh.declare(&conn).await.unwrap().warnings.is_empty());
    assert_eq!(fresh.check_dead_queue(&conn).await.unwrap(), None);
    fresh.delete(&conn).await.unwrap();
    fresh_guard.disarm();
    topology.delete(&conn).await.unwrap();
    guard.disarm();
    let _ = conn.close(200, "done".into()).await;
}

#[tokio::test]
async fn a_second_reader_of_the_dlq_is_refused_rather_than_given_half_the_letters() {
    let (h, _) = with_letters("dlqbusy", 10).await;
    let ch = h.conn.create_channel().await.unwrap();
    let _other = ch
        .basic_consume(
            h.topology.dead_queue().as_str().into(),
            "other".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let e = dlq::stats(&h.conn, &h.topology, Filter::default())
        .await
        .unwrap_err();
    assert!(matches!(e, DlqError::Busy { consumers: 1, .. }), "{e}");
    let _ = ch.close(200, "done".into()).await;
    // the other reader's unacked letters go back to the quorum queue after
    // its channel closes, not always by the time the close is confirmed
    let dead = h.topology.dead_queue();
    eventually!(
        std::time::Duration::from_secs(10),
        h.depth(&dead).await == 10,
        "the 10 letters back in the DLQ: {}",
        h.depth(&dead).await
    );
    h.finish().await;
}

#[tokio::test]
async fn replay_racing_a_dead_lettering_worker_neither_loses_nor_doubles() {
    let h = Harness::start(Opts::new("race")).await;
    // 200 old dead letters whose cause is fixed: they will send on replay
    let old: Vec<Dead> = (0..200).map(|i| region(format!("old{i}"), "old")).collect();
    fill(&h, &old).await;
    // meanwhile 300 new jobs die with a mismatch
    for i in 0..300 {
        h.publish_job(&job(&format!("new{i}"), &format!("sim:err:2300005:{i}")))
            .await;
    }
    let r = scan(
        &h,
        by_code(2300030),
        &ScanOptions::new(Action::Replay { rate: 0 }),
    )
    .await;
    assert_eq!(r.replayed, 200);
    h.wait_settled(500, Duration::from_secs(60)).await;
    let stats = h.sim.stats();
    assert_eq!(stats.sent, 200, "every replayed job sent");
    assert_eq!(stats.duplicates, 0, "no job replayed twice");
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 300);
    assert!(dead
        .iter()
        .all(|d| d.story.last_error.code == Some(2300005)));
    assert!(dead.iter().all(|d| d.story.replays == 0));
    h.finish().await;
}

fn run(h: &Harness, args: &[&str]) -> (i32, String, String) {
    let out = h.mmsend(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn the_dlq_cli_speaks_json_uses_exit_codes_and_round_trips_an_export() {
    let (h, _) = with_letters("dlqcli", 50).await;

    let (code, out, _) = run(&h, &["dlq", "stats", "--json"]);
    assert_eq!(code, 0);
    let stats: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(stats["depth_at_start"], 50);
    assert_eq!(stats["total"], 50);
    assert_eq!(stats["counted_all"], true);
    assert_eq!(
        stats["by_code"][0],
        json!({"key": "2300030", "count": 40, "oldest": stats["by_code"][0]["oldest"], "newest": stats["by_code"][0]["newest"], "latest_error": "error 2300030"})
    );

    let (code, out, _) = run(
        &h,
        &[
            "dlq", "list", "--class", "mismatch", "--limit", "2", "--json",
        ],
    );
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    let shown: Vec<&str> = list["letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["key"]["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(shown, ["l0", "l5"]);
    assert_eq!(list["counted_all"], false);
    assert_eq!(list["stop"], "selected");

    let (code, out, _) = run(&h, &["dlq", "list", "--class", "mismatch", "--limit", "2"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("stopped at --limit 2") && out.contains("not counted"),
        "{out}"
    );

    // bad input: exit 2 with a readable message, never a panic
    let (code, _, err) = run(&h, &["dlq", "list", "--reason", "bogus"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("retries_exhausted") && err.contains("delivery_limit"),
        "{err}"
    );
    let (code, _, err) = run(&h, &["dlq", "list", "--since", "300000years"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--since") && !err.contains("panicked"),
        "{err}"
    );
    let (_, help, _) = run(&h, &["dlq", "list", "--help"]);
    assert!(
        help.contains("campaign_config") && help.contains("no_token"),
        "{help}"
    );

    // export → enqueue round trip
    let dir = common::tmpdir("export");
    let path = dir.join("dead.jsonl");
    let (code, _, err) = run(
        &h,
        &[
            "dlq",
            "export",
            "--code",
            "2300005",
            "-o",
            path.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("10 of 50 dead letters exported"), "{err}");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 10);
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["headers"]["x-mmsend-class"], "mismatch");
    assert!(!text.contains(common::TOKEN));
    let producer = Producer::on(&h.conn, &h.topology).await.unwrap();
    let report = producer::enqueue(text.as_bytes(), Some(&producer), |_, _| {})
        .await
        .unwrap();
    assert_eq!((report.published, report.invalid.len()), (10, 0));
    producer.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
    assert_eq!(
        h.depth(&h.topology.dead_queue()).await,
        50,
        "export is a peek"
    );

    // purge without --yes is a preview
    let (code, out, _) = run(&h, &["dlq", "purge", "--campaign", "cm"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("10 of 50 dead letters would be purged"),
        "{out}"
    );
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 50);

    // a replay whose copies cannot be routed: exit 1, every letter stays
    let ch = h.conn.create_channel().await.unwrap();
    ch.queue_unbind(
        h.topology.send_queue().as_str().into(),
        h.topology.exchange().into(),
        h.topology.send_queue().as_str().into(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let (code, out, _) = run(&h, &["dlq", "replay", "--code", "2300005", "--json"]);
    assert_eq!(code, 1, "partly failed");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (r["replayed"].as_u64(), r["failed"].as_u64()),
        (Some(0), Some(10))
    );
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 50);
    h.finish().await;
}

#[tokio::test]
async fn a_closed_pipe_ends_the_list_quietly_and_keeps_every_letter() {
    let (h, letters) = with_letters("dlqpipe", 2_000).await;
    let mut child = h
        .mmsend(&["dlq", "list", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Read;
        let mut stdout = child.stdout.take().unwrap();
        let mut first = [0u8; 64];
        stdout.read_exact(&mut first).unwrap();
        // `| head` goes away here
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("panicked") && !err.contains("error"), "{err}");
    assert_dlq_holds(&h, &ids(&letters)).await;
    h.finish().await;
}

#[tokio::test]
async fn a_scan_stops_at_the_hold_bound_and_keeps_every_letter() {
    let (h, letters) = with_letters("dlqbound2", 1_000).await;
    let options = ScanOptions {
        max_held: Some(300),
        ..small(Action::Peek)
    };
    let r = scan(&h, Filter::default(), &options).await;
    assert_eq!((r.read, r.stop), (300, Stop::HoldLimit));
    assert!(!r.counted_all());
    // the CLI says so and exits 1 (partly done)
    let (code, _, err) = run(&h, &["dlq", "stats", "--max-held", "300"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--max-held"), "{err}");
    assert_dlq_holds(&h, &ids(&letters)).await;
    h.finish().await;
}

/// `mmsend enqueue <path> <args>` on the harness's topology (its config
/// file in `dir`): exit code, stdout, stderr.
fn enqueue_file(
    h: &Harness,
    dir: &std::path::Path,
    path: &std::path::Path,
    args: &[&str],
) -> (i32, String, String) {
    let out = h
        .mmsend(&[&["enqueue", path.to_str().unwrap()][..], args].concat())
        .env("MMSEND_CONFIG", h.write_config(dir, ""))
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A JSONL file of `lines` in a directory of its own (the caller removes it).
fn jsonl(name: &str, lines: &[String]) -> (std::path::PathBuf, std::path::PathBuf) {
    let dir = common::tmpdir(name);
    let path = dir.join("jobs.jsonl");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    (dir, path)
}

#[tokio::test]
async fn enqueue_refuses_a_job_id_longer_than_an_amqp_message_id_and_sends_every_other_line() {
    let h = Harness::start(Opts::idle("longid")).await;
    let mut lines: Vec<String> = (1..=60)
        .map(|i| serde_json::to_string(&job(&format!("ok{i}"), &format!("r{i}"))).unwrap())
        .collect();
    // line 30: an id of 300 bytes, more than the AMQP message_id can hold
    lines[29] = serde_json::to_string(&job(&"x".repeat(300), "r30")).unwrap();
    // line 40: exactly 255 bytes, the most there is room for
    lines[39] = serde_json::to_string(&job(&"y".repeat(255), "r40")).unwrap();
    let (dir, path) = jsonl("longid", &lines);
    let (code, out, err) = enqueue_file(&h, &dir, &path, &["--json"]);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(code, 1, "one line invalid: {err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["lines"], 60);
    assert_eq!(r["published"], 59);
    assert_eq!(r["failed"], json!([]));
    let invalid = r["invalid"].as_array().unwrap();
    assert_eq!(invalid.len(), 1, "{invalid:?}");
    assert_eq!(invalid[0]["line"], 30);
    let why = invalid[0]["error"].as_str().unwrap();
    assert!(
        why.contains("job_id") && why.contains("255") && why.contains("message_id"),
        "{why}"
    );
    assert_eq!(
        r["published"].as_u64().unwrap() as usize
            + invalid.len()
            + r["failed"].as_array().unwrap().len(),
        r["lines"].as_u64().unwrap() as usize,
        "every line is accounted for"
    );
    let sent = drain_ids(&h, &h.topology.send_queue()).await;
    assert_eq!(sent.len(), 59);
    assert!(sent.contains(&"y".repeat(255)) && sent.contains(&"ok60".to_string()));
    // the library refuses it too, without a panic
    let producer = Producer::on(&h.conn, &h.topology).await.unwrap();
    let e = producer
        .send(lines[29].as_bytes())
        .await
        .expect_err("a 300-byte job id is invalid");
    assert!(matches!(e, producer::ProducerError::Invalid(_)), "{e}");
    producer.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
    h.finish().await;
}

/// Two DLQ readers started at the same instant: exactly one completes and
/// the other is refused as busy, or both complete with the same total;
/// never a "complete" count that is not (the check-then-consume race).
#[tokio::test]
async fn two_readers_started_together_never_report_a_wrong_complete_count() {
    let (h, _) = with_letters("dlqrace", 300).await;
    let other = mmsend::broker::connect(&common::amqp_url(), "test-other")
        .await
        .unwrap();
    let dead = h.topology.dead_queue();
    let (mut completed, mut busy) = (0, 0);
    for round in 0..12 {
        // even rounds: two scans on one connection; odd: two connections
        let second = if round % 2 == 0 { &h.conn } else { &other };
        let (a, b) = tokio::join!(
            dlq::stats(&h.conn, &h.topology, Filter::default()),
            dlq::stats(second, &h.topology, Filter::default()),
        );
        let mut totals = Vec::new();
        for r in [a, b] {
            match r {
                Ok((stats, report)) => {
                    assert!(report.counted_all(), "round {round}: {report:?}");
                    assert_eq!(stats.total, 300, "round {round}: a complete count of 300");
                    totals.push(stats.total);
                }
                Err(DlqError::Busy { .. }) => busy += 1,
                Err(e) => panic!("round {round}: {e}"),
            }
        }
        assert!(!totals.is_empty(), "round {round}: one of them completes");
        completed += totals.len();
        eventually!(
            Duration::from_secs(10),
            h.depth(&dead).await == 300,
            "round {round}: every letter back: {}",
            h.depth(&dead).await
        );
    }
    assert_eq!(completed + busy, 24);
    // the readers did meet: the race was run, not avoided
    assert!(busy > 0, "{completed} completed, none refused");
    let _ = other.close(200, "done".into()).await;
    h.finish().await;
}

/// `dlq purge --yes` next to `dlq stats`, both processes started at once:
/// a purge that exits 0 left none of its letters, a stats that exits 0
/// counted every letter there was.
#[tokio::test]
async fn a_purge_beside_a_stats_never_reports_success_it_did_not_have() {
    let h = Harness::start(Opts::idle("dlqrace2")).await;
    for round in 0..3 {
        let mut letters: Vec<Dead> = (0..300)
            .map(|i| region(format!("x{round}-{i}"), "x"))
            .collect();
        letters.extend((0..100).map(|i| mismatch(format!("y{round}-{i}"), "y")));
        fill(&h, &letters).await;
        let spawn = |args: &[&str]| {
            h.mmsend(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let purge = spawn(&["dlq", "purge", "--campaign", "x", "--yes", "--json"]);
        let stats = spawn(&["dlq", "stats", "--json"]);
        let (purge, stats) = tokio::task::spawn_blocking(move || {
            (
                purge.wait_with_output().unwrap(),
                stats.wait_with_output().unwrap(),
            )
        })
        .await
        .unwrap();
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        eprintln!(
            "round {round}: purge exit {:?}, stats exit {:?}",
            purge.status.code(),
            stats.status.code()
        );
        match purge.status.code() {
            Some(0) => {
                let r: Value = serde_json::from_slice(&purge.stdout).unwrap();
                assert_eq!(r["counted_all"], true, "{r}");
                assert_eq!(r["purged"], 300, "{r}");
                assert_eq!(
                    campaign_count(&h, "x").await,
                    0,
                    "round {round}: a purge that succeeded"
                );
            }
            Some(2) => {
                assert!(
                    text(&purge.stderr).contains("busy"),
                    "{}",
                    text(&purge.stderr)
                );
                assert_eq!(
                    campaign_count(&h, "x").await,
                    300,
                    "round {round}: a refused purge moved nothing"
                );
            }
            other => panic!(
                "round {round}: purge exit {other:?}: {}",
                text(&purge.stderr)
            ),
        }
        match stats.status.code() {
            Some(0) => {
                let s: Value = serde_json::from_slice(&stats.stdout).unwrap();
                assert_eq!(s["counted_all"], true, "{s}");
                let total = s["total"].as_u64().unwrap();
                assert!(total == 400 || total == 100, "round {round}: total {total}");
                assert_eq!(s["depth_at_start"].as_u64(), Some(total));
            }
            Some(2) => assert!(
                text(&stats.stderr).contains("busy"),
                "{}",
                text(&stats.stderr)
            ),
            other => panic!(
                "round {round}: stats exit {other:?}: {}",
                text(&stats.stderr)
            ),
        }
        h.drain_dlq().await;
    }
    h.finish().await;
}

/// Letters of `campaign` in the DLQ (a peek).
async fn campaign_count(h: &Harness, campaign: &str) -> usize {
    let mut n = 0;
    let filter = Filter {
        campaign: Some(campaign.into()),
        ..Default::default()
    };
    scan_with(h, filter, &ScanOptions::peek(), &mut |_: &DeadLetter| {
        n += 1
    })
    .await;
    n
}

/// Text an attacker put in a job or an error: an OSC 52 clipboard write, a
/// screen clear, a bell, a carriage return, DEL, a C1 CSI and a
/// right-to-left override.
const NASTY: &str = "a\u{1b}]52;c;aGVsbG8=\u{7}b\u{1b}[2Jc\u{7}d\re\u{7f}f\u{9b}g\u{202e}h";

fn assert_no_control_characters(out: &str, what: &str) {
    let bad: Vec<String> = out
        .chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .map(|c| format!("{:?}", c))
        .collect();
    assert!(bad.is_empty(), "{what} printed raw {bad:?}:\n{out}");
}

#[tokio::test]
async fn dlq_tables_escape_control_characters_from_letters() {
    let h = Harness::start(Opts::idle("dlqesc")).await;
    let story = Story {
        dead_reason: Some("terminal".into()),
        dead_at: Some(chrono::Utc::now()),
        last_error: LastError {
            class: Some(format!("cls{NASTY}")),
            code: Some(100),
            message: Some(format!("error {NASTY}")),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut headers = FieldTable::default();
    story.write(&mut headers);
    let mut body = job(&format!("id{NASTY}"), "r1");
    body["campaign"] = json!(format!("cmp{NASTY}"));
    body["page_id"] = json!(format!("page{NASTY}"));
    h.fill_dlq([("m1".to_string(), body, headers)]).await;
    for args in [
        &["dlq", "list"][..],
        &["dlq", "stats"],
        &["dlq", "purge", "--campaign", &format!("cmp{NASTY}")],
    ] {
        let (code, out, err) = run(&h, args);
        assert_eq!(code, 0, "{args:?}: {err}");
        assert!(
            out.contains("\\x1b]52") || out.contains("\\e]52"),
            "{args:?} shows the escape:\n{out}"
        );
        assert_no_control_characters(&out, &format!("{args:?}"));
        assert_no_control_characters(&err, &format!("{args:?} (stderr)"));
    }
    // JSON stays exact: the same text comes back when parsed
    let (code, out, _) = run(&h, &["dlq", "list", "--json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["letters"][0]["key"]["job_id"], format!("id{NASTY}"));
    assert_eq!(list["letters"][0]["campaign"], format!("cmp{NASTY}"));
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 1);
    h.finish().await;
}

#[tokio::test]
async fn enqueue_errors_escape_control_characters_from_the_input() {
    let h = Harness::start(Opts::idle("enqesc")).await;
    let mut bad = job("j1", "r1");
    bad["page_id"] = json!(format!("12{NASTY}"));
    let lines = vec![
        serde_json::to_string(&bad).unwrap(),
        format!("not json {NASTY}"),
    ];
    let (dir, path) = jsonl("enqesc", &lines);
    let (code, out, err) = enqueue_file(&h, &dir, &path, &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("line 1") && err.contains("line 2"), "{err}");
    assert_no_control_characters(&out, "enqueue (stdout)");
    assert_no_control_characters(&err, "enqueue (stderr)");
    std::fs::remove_dir_all(&dir).unwrap();
    h.finish().await;
}

#[tokio::test]
async fn export_to_dash_writes_to_standard_output() {
    let (h, _) = with_letters("dlqdash", 20).await;
    let dir = common::tmpdir("dash");
    let out = h
        .mmsend(&["dlq", "export", "-o", "-"])
        .current_dir(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout.lines().count(), 20, "{stdout}");
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(v["job"]["job_id"].is_string(), "{line}");
    }
    assert!(!dir.join("-").exists(), "no file named '-'");
    std::fs::remove_dir_all(&dir).unwrap();
    h.finish().await;
}

/// RabbitMQ's own dead-lettering (`x-death`, no `x-mmsend-dead-at`).
fn broker_death(queue: &str, at: chrono::DateTime<chrono::Utc>) -> FieldTable {
    let mut entry = FieldTable::default();
    entry.insert("queue".into(), AMQPValue::LongString(queue.into()));
    entry.insert(
        "reason".into(),
        AMQPValue::LongString("delivery_limit".into()),
    );
    entry.insert("count".into(), AMQPValue::LongLongInt(1));
    entry.insert("time".into(), AMQPValue::Timestamp(at.timestamp() as u64));
    entry.insert("exchange".into(), AMQPValue::LongString("".into()));
    let mut headers = FieldTable::default();
    headers.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(entry)].into()),
    );
    headers.insert(
        "x-first-death-reason".into(),
        AMQPValue::LongString("delivery_limit".into()),
    );
    headers
}

#[tokio::test]
async fn since_matches_letters_rabbitmq_dead_lettered_by_their_x_death_time() {
    let h = Harness::start(Opts::idle("dlqsince")).await;
    let now = chrono::Utc::now();
    let send = h.topology.send_queue();
    h.fill_dlq([
        (
            "recent".to_string(),
            job("recent", "r1"),
            broker_death(&send, now - chrono::Duration::minutes(10)),
        ),
        (
            "old".to_string(),
            job("old", "r2"),
            broker_death(&send, now - chrono::Duration::days(3)),
        ),
    ])
    .await;
    fill(&h, &[region("worker", "bf")]).await;
    let (code, out, err) = run(&h, &["dlq", "list", "--since", "1h", "--json"]);
    assert_eq!(code, 0, "{err}");
    let list: Value = serde_json::from_str(&out).unwrap();
    let shown: BTreeSet<&str> = list["letters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["key"]["job_id"].as_str().unwrap())
        .collect();
    assert_eq!(shown, BTreeSet::from(["recent", "worker"]), "{out}");
    let recent = list["letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["key"]["job_id"] == "recent")
        .unwrap();
    assert_eq!(recent["reason"], "delivery_limit");
    assert!(
        recent["dead_at"].is_string(),
        "the broker's death time is shown: {recent}"
    );
    h.finish().await;
}

#[tokio::test]
async fn an_export_enqueued_again_keeps_the_ambiguous_flag_and_counts_a_replay() {
    let h = Harness::start(Opts::idle("dlqambig")).await;
    let story = Story {
        attempt: 3,
        dead_reason: Some("retries_exhausted".into()),
        dead_at: Some(chrono::Utc::now()),
        enqueued_at: Some("2026-11-24T10:00:00Z".parse().unwrap()),
        last_error: LastError {
            class: Some("transient".into()),
            message: Some("timed out after the request was sent".into()),
            ambiguous: true,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut headers = FieldTable::default();
    story.write(&mut headers);
    h.fill_dlq([("amb".to_string(), job("amb", "r1"), headers)])
        .await;
    fill(&h, &[region("plain", "bf")]).await;
    let dir = common::tmpdir("ambig");
    let path = dir.join("dead.jsonl");
    let (code, _, err) = run(&h, &["dlq", "export", "-o", path.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let (code, out, err) = enqueue_file(&h, &dir, &path, &["--json"]);
    assert_eq!(code, 0, "{err}");
    let r: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["published"], 2, "{r}");
    let ch = h.conn.create_channel().await.unwrap();
    let mut stories = std::collections::BTreeMap::new();
    while let Some(m) = ch
        .basic_get(
            h.topology.send_queue().as_str().into(),
            BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
    {
        let d = DeadLetter::new(m.delivery.data.clone(), m.delivery.properties.clone());
        stories.insert(d.job_id().unwrap(), d.story.clone());
    }
    let amb = &stories["amb"];
    assert!(amb.last_error.ambiguous, "still maybe sent: {amb:?}");
    assert_eq!(amb.replays, 1, "{amb:?}");
    assert_eq!(
        (amb.attempt, amb.dead_reason.as_deref()),
        (0, None),
        "a fresh start: {amb:?}"
    );
    assert_eq!(amb.enqueued_at, story.enqueued_at);
    assert!(!stories["plain"].last_error.ambiguous);
    std::fs::remove_dir_all(&dir).unwrap();
    h.finish().await;
}

#[tokio::test]
async fn a_job_naming_a_field_twice_is_invalid_and_the_dlq_tools_agree_on_its_id() {
    let h = Harness::start(Opts::new("dupkey")).await;
    let body = br#"{"v":1,"job_id":"first","ad_account_id":"1","page_id":"2","message_id":"3","subscription_token":"s","message":{"text":"hi"},"job_id":"second"}"#;
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("amqp-id".into());
    h.publish_with(body, props).await;
    h.wait_settled(1, Duration::from_secs(20)).await;
    assert_eq!(h.sim.stats().sent, 0, "never sent");
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.reason(), Some(DeadReason::InvalidJob));
    let why = d.story.last_error.message.clone().unwrap_or_default();
    assert!(why.contains("job_id") && why.contains("twice"), "{why}");
    // one reading: an id named twice is no id; the AMQP message_id names it
    assert_eq!(d.job_id().as_deref(), Some("amqp-id"));
    assert_eq!(mmsend::job::JobLabels::read(body).job_id, None);
    h.finish().await;
}

/// A scan on `conn` in a task of its own whose observer takes 20 ms a
/// letter; `read` counts the letters it saw.
fn slow_scan(
    conn: std::sync::Arc<lapin::Connection>,
    topology: mmsend::broker::Topology,
    read: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> tokio::task::JoinHandle<Result<ScanReport, DlqError>> {
    tokio::spawn(async move {
        let mut slow = move |_: &DeadLetter| {
            read.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(20));
        };
        dlq::scan(
            &conn,
            &topology,
            Filter::default(),
            &ScanOptions::peek(),
            &mut slow,
        )
        .await
    })
}

/// A reader that dies (its connection gone) or whose scan is dropped
/// half-way does not leave the DLQ busy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_goes_away_does_not_leave_the_dlq_busy() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let (h, letters) = with_letters("dlqgone", 200).await;
    let url = common::amqp_url();
    for case in ["connection closed", "scan dropped"] {
        let conn = Arc::new(mmsend::broker::connect(&url, "test-reader").await.unwrap());
        let read = Arc::new(AtomicUsize::new(0));
        let task = slow_scan(conn.clone(), h.topology.clone(), read.clone());
        eventually!(
            Duration::from_secs(10),
            read.load(Ordering::SeqCst) > 0,
            "{case}: the scan started"
        );
        let e = dlq::stats(&h.conn, &h.topology, Filter::default())
            .await
            .unwrap_err();
        assert!(matches!(e, DlqError::Busy { .. }), "{case}: {e}");
        task.abort();
        let _ = task.await;
        let next = match case {
            // RabbitMQ deletes the lock with its connection
            "connection closed" => {
                let _ = conn.close(200, "gone".into()).await;
                &h.conn
            }
            // the lock stays on that connection without a consumer: the
            // next scan there takes it
            _ => &*conn,
        };
        let mut last;
        eventually!(
            Duration::from_secs(15),
            {
                last = dlq::stats(next, &h.topology, Filter::default()).await;
                matches!(&last, Ok((s, r)) if s.total == 200 && r.counted_all())
            },
            "{case}: a complete count again: {last:?}"
        );
        if case == "scan dropped" {
            let _ = conn.close(200, "done".into()).await;
        }
    }
    assert_dlq_holds(&h, &ids(&letters)).await;
    h.finish().await;
}

/// A job whose id is longer than an AMQP `message_id` (from any AMQP
/// client: it never passed `mmsend enqueue`) dies `invalid_job`, and its
/// results event is published: the worker never panics on the id.
#[tokio::test]
async fn a_job_id_too_long_for_a_message_id_dies_invalid_and_gets_its_results_event() {
    use futures_util::StreamExt;
    let mut opts = Opts::new("longidres");
    opts.results = true;
    let h = Harness::start(opts).await;
    let long = "z".repeat(300);
    h.publish_job(&job(&long, "r1")).await;
    h.wait_settled(1, Duration::from_secs(20)).await;
    assert_eq!(h.sim.stats().sent, 0);
    let dead = h.drain_dlq().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason(), Some(DeadReason::InvalidJob));
    let why = dead[0].story.last_error.message.clone().unwrap_or_default();
    assert!(why.contains("255"), "{why}");
    let (ch, mut consumer) = h.results_consumer("results-test", 10).await;
    let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
        .await
        .expect("an event")
        .unwrap()
        .unwrap();
    let event: Value = serde_json::from_slice(&d.data).unwrap();
    assert_eq!(event["job_id"], long.as_str(), "the whole id in the body");
    assert_eq!(
        d.properties.message_id().as_ref().map(|m| m.as_str().len()),
        Some(255),
        "the message_id cut to what AMQP holds"
    );
    let _ = ch.close(200, "done".into()).await;
    h.finish().await;
}
