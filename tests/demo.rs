//! `mmsend demo`, small: it settles every job and its summary matches what
//! the simulator received.

#[tokio::test]
async fn demo_settles_everything_and_balances_its_books() {
    let report = mmsend::demo::run(mmsend::demo::DemoOptions {
        amqp_url: std::env::var("MMSEND_AMQP_URL")
            .unwrap_or_else(|_| mmsend::broker::DEFAULT_AMQP_URL.to_string()),
        jobs: 400,
        concurrency: 32,
        keep: false,
        redis_url: Some(
            std::env::var("MMSEND_TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/".into()),
        ),
        progress: false,
        timeout: std::time::Duration::from_secs(90),
    })
    .await
    .unwrap();
    assert!(report.balanced(), "{report:?}");
    assert_eq!(report.sent + report.dead, 400);
    assert_eq!(report.sim.sent, report.sent);
    assert_eq!(
        report.redis_up,
        Some(true),
        "the demo ran with the send ledger"
    );
    let dead = |class: &str| {
        report
            .outcomes
            .get(&("dead".to_string(), class.to_string()))
            .copied()
            .unwrap_or(0)
    };
    // the sample mix: 1 % mismatch, 2 % region, 2 % budget (expired)
    assert_eq!(dead("mismatch"), 4);
    assert_eq!(dead("region"), 8);
    assert_eq!(dead("budget"), 8);
    assert!(report
        .outcomes
        .contains_key(&("retried".to_string(), "not_ready".to_string())));
}
