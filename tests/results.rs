//! The results stream: one event per settled job on `<prefix>.results`,
//! read back the way a campaign service would (a stream consumer from the
//! first offset), joined by job id.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::{eventually, job, Harness, Opts};
use futures_util::StreamExt;
use lapin::options::BasicAckOptions;
use mmsend::results::{ResultEvent, ResultOutcome};

#[tokio::test]
async fn every_settled_job_has_one_event_with_its_tracking_id_or_its_reason() {
    let mut opts = Opts::new("results");
    opts.results = true;
    let h = Harness::start(opts).await;
    h.publish_job(&job("ok1", "r1")).await;
    h.publish_job(&job("ok2", "sim:flaky:1:r2")).await;
    h.publish_job(&job("bad", "sim:err:2300005")).await;
    h.wait_settled(3, Duration::from_secs(30)).await;

    // a campaign service reading the stream from the start
    let (ch, mut consumer) = h.results_consumer("results-test", 100).await;
    let mut events = BTreeMap::new();
    eventually!(
        Duration::from_secs(10),
        {
            if let Ok(Some(Ok(d))) =
                tokio::time::timeout(Duration::from_millis(200), consumer.next()).await
            {
                let e: ResultEvent = serde_json::from_slice(&d.data).unwrap();
                d.acker.ack(BasicAckOptions::default()).await.unwrap();
                events.insert(e.job_id.clone(), e);
            }
            events.len() == 3
        },
        "three events: {events:?}"
    );
    let ok1 = &events["ok1"];
    assert_eq!(ok1.outcome, ResultOutcome::Sent);
    assert!(ok1
        .tracking_id
        .as_deref()
        .is_some_and(|t| t.starts_with("mm.")));
    assert_eq!((ok1.attempts, ok1.campaign.as_deref()), (1, Some("test")));
    let ok2 = &events["ok2"];
    assert_eq!((ok2.outcome, ok2.attempts), (ResultOutcome::Sent, 2));
    assert_eq!(ok2.class.as_deref(), Some("transient"), "what it met first");
    let bad = &events["bad"];
    assert_eq!(bad.outcome, ResultOutcome::Dead);
    assert_eq!(bad.reason.as_deref(), Some("terminal"));
    assert_eq!(bad.code, Some(2300005));
    assert_eq!(bad.tracking_id, None);
    // the tracking ids are Meta's (the simulator's), one per send
    assert_eq!(h.sim.stats().sent, 2);
    let _ = ch.close(200, "done".into()).await;
    h.finish().await;
}
