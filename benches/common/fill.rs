//! Shared by the dead-letter benches (`dlq`, `console`): filling a DLQ fast.

use std::collections::VecDeque;
use std::time::Instant;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Connection};
use mmsend::broker::Topology;

/// Publishes `n` letters (`letter(i)`) to the DLQ with confirms, 1,024 in
/// flight; the seconds it took.
pub async fn fill(
    conn: &Connection,
    topology: &Topology,
    n: usize,
    letter: impl Fn(usize) -> (Vec<u8>, BasicProperties),
) -> f64 {
    let started = Instant::now();
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let mut pending = VecDeque::new();
    for i in 0..n {
        let (body, props) = letter(i);
        pending.push_back(
            ch.basic_publish(
                topology.exchange().into(),
                topology.dead_queue().as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &body,
                props,
            )
            .await
            .expect("publish"),
        );
        if pending.len() >= 1024 {
            let c = pending
                .pop_front()
                .expect("pending")
                .await
                .expect("confirm");
            assert!(c.is_ack(), "fill not confirmed");
        }
    }
    for c in pending {
        assert!(c.await.expect("confirm").is_ack());
    }
    let _ = ch.close(200, "filled".into()).await;
    started.elapsed().as_secs_f64()
}
