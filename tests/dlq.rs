//! Producers and operators against the real RabbitMQ: `enqueue` counts, the
//! DLQ toolkit (stats, replay, purge, export → enqueue), and a replay racing
//! a worker that keeps dead-lettering.

mod common;

use std::time::Duration;

use common::{job, Harness, Opts};
use lapin::options::BasicPublishOptions;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use mmsend::broker::headers::{LastError, Story};
use mmsend::dlq::{self, Action, Filter, StatsBuilder};
use mmsend::producer::{self, Producer};
use serde_json::json;

/// Puts a dead letter straight into the DLQ, as a worker would have.
async fn dead_letter(
    h: &Harness,
    id: &str,
    reason: Option<&str>,
    class: &str,
    code: i64,
    campaign: &str,
) {
    let story = Story {
        attempt: 1,
        dead_reason: reason.map(str::to_owned),
        dead_at: Some(chrono::Utc::now()),
        last_error: LastError {
            class: Some(class.into()),
            code: Some(code),
            message: Some(format!("error {code}")),
            ..Default::default()
        },
        ..Default::default()
    };
    let mut headers = FieldTable::default();
    story.write(&mut headers);
    let mut body = job(id, &format!("ok-{id}"));
    body["campaign"] = json!(campaign);
    let ch = h.conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    ch.basic_publish(
        h.topology.exchange().into(),
        h.topology.dead_queue().as_str().into(),
        BasicPublishOptions::default(),
        &serde_json::to_vec(&body).unwrap(),
        BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(headers),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = ch.close(200, "ok".into()).await;
}

fn no_worker(name: &'static str) -> Opts {
    let mut o = Opts::new(name);
    o.start_worker = false;
    o
}

#[tokio::test]
async fn enqueue_publishes_valid_lines_and_reports_invalid_ones_by_number() {
    let h = Harness::start(no_worker("enqueue")).await;
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
    let h = Harness::start(no_worker("dlqops")).await;
    for i in 0..6 {
        dead_letter(
            &h,
            &format!("reg{i}"),
            Some("terminal"),
            "region",
            2300018,
            "bf",
        )
        .await;
    }
    for i in 0..4 {
        dead_letter(
            &h,
            &format!("mis{i}"),
            Some("terminal"),
            "mismatch",
            2300005,
            "cm",
        )
        .await;
    }
    for i in 0..3 {
        dead_letter(
            &h,
            &format!("exp{i}"),
            Some("retries_exhausted"),
            "transient",
            2,
            "bf",
        )
        .await;
    }
    // dead-lettered by the broker itself: no x-mmsend-dead-reason
    dead_letter(&h, "poison", None, "transient", 1, "cm").await;

    let mut sb = StatsBuilder::default();
    let report = dlq::scan(
        &h.conn,
        &h.topology,
        &Filter::default(),
        Action::Peek,
        |d| sb.add(d),
    )
    .await
    .unwrap();
    let stats = sb.build();
    assert_eq!(report.depth_at_start, 14);
    assert_eq!(stats.total, 14);
    let get = |v: &Vec<(String, usize)>, k: &str| v.iter().find(|(x, _)| x == k).map(|(_, n)| *n);
    assert_eq!(get(&stats.by_reason, "terminal"), Some(10));
    assert_eq!(get(&stats.by_reason, "retries_exhausted"), Some(3));
    assert_eq!(get(&stats.by_reason, "delivery_limit"), Some(1));
    assert_eq!(get(&stats.by_class, "region"), Some(6));
    assert_eq!(get(&stats.by_code, "2300005"), Some(4));
    assert_eq!(get(&stats.by_campaign, "bf"), Some(9));
    // peeking kept everything
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 14);

    // replay only the region ones
    let by_code = Filter {
        code: Some(2300018),
        ..Default::default()
    };
    let r = dlq::scan(
        &h.conn,
        &h.topology,
        &by_code,
        Action::Replay { rate: 0 },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!((r.selected, r.replayed, r.failed), (6, 6, 0));
    assert_eq!(h.depth(&h.topology.send_queue()).await, 6);
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 8);

    // the replayed copies start over and count the replay
    let ch = h.conn.create_channel().await.unwrap();
    let msg = ch
        .basic_get(
            h.topology.send_queue().as_str().into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .unwrap()
        .unwrap();
    let story = Story::read(msg.delivery.properties.headers().as_ref());
    assert_eq!(story.attempt, 0);
    assert_eq!(story.replays, 1);
    assert!(story.replayed_at.is_some() && story.dead_reason.is_none());

    // purge with a filter and a limit removes exactly that many
    let purge = Filter {
        class: Some("mismatch".into()),
        limit: Some(3),
        ..Default::default()
    };
    let r = dlq::scan(&h.conn, &h.topology, &purge, Action::Purge, |_| {})
        .await
        .unwrap();
    assert_eq!(r.purged, 3);
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 5);
    // "purge" without --yes is a preview
    dlq::command(
        &h.conn,
        &h.topology,
        &Filter::default(),
        dlq::Op::Purge { yes: false },
    )
    .await
    .unwrap();
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 5);
    h.finish().await;
}

#[tokio::test]
async fn export_then_enqueue_round_trips_the_jobs() {
    let h = Harness::start(no_worker("export")).await;
    for i in 0..5 {
        dead_letter(
            &h,
            &format!("x{i}"),
            Some("terminal"),
            "region",
            2300030,
            "bf",
        )
        .await;
    }
    let dir = std::env::temp_dir().join(format!("mmsend-export-{}", rand::random::<u32>()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dead.jsonl");
    dlq::command(
        &h.conn,
        &h.topology,
        &Filter::default(),
        dlq::Op::Export {
            output: Some(path.clone()),
        },
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 5);
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["headers"]["x-mmsend-class"], "region");
    assert_eq!(first["headers"]["x-mmsend-error-code"], 2300030);
    assert!(!text.contains(common::TOKEN));
    // export is a peek
    assert_eq!(h.depth(&h.topology.dead_queue()).await, 5);
    let producer = Producer::on(&h.conn, &h.topology).await.unwrap();
    let report = producer::enqueue(text.as_bytes(), Some(&producer), |_, _| {})
        .await
        .unwrap();
    assert_eq!((report.published, report.invalid.len()), (5, 0));
    assert_eq!(h.depth(&h.topology.send_queue()).await, 5);
    producer.close().await;
    std::fs::remove_dir_all(&dir).unwrap();
    h.finish().await;
}

#[tokio::test]
async fn replay_racing_a_dead_lettering_worker_neither_loses_nor_doubles() {
    let h = Harness::start(Opts::new("race")).await;
    // 200 old dead letters whose cause is fixed: they will send on replay
    for i in 0..200 {
        dead_letter(
            &h,
            &format!("old{i}"),
            Some("terminal"),
            "region",
            2300018,
            "old",
        )
        .await;
    }
    // meanwhile 300 new jobs die with a mismatch
    for i in 0..300 {
        h.publish_job(&job(&format!("new{i}"), &format!("sim:err:2300005:{i}")))
            .await;
    }
    let by_code = Filter {
        code: Some(2300018),
        ..Default::default()
    };
    let r = dlq::scan(
        &h.conn,
        &h.topology,
        &by_code,
        Action::Replay { rate: 0 },
        |_| {},
    )
    .await
    .unwrap();
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
