//! Publish a few jobs with the library producer.
//!
//! ```sh
//! cargo run --example produce            # uses MMSEND_AMQP_URL / MMSEND_PREFIX if set
//! ```
//!
//! The topology is declared first (idempotent), so this runs on a fresh broker.

use mmsend::broker::{self, Topology, DEFAULT_AMQP_URL};
use mmsend::producer::Producer;
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("MMSEND_AMQP_URL").unwrap_or_else(|_| DEFAULT_AMQP_URL.into());
    let prefix = std::env::var("MMSEND_PREFIX").unwrap_or_else(|_| "mmsend".into());
    let topology = Topology::with_prefix(&prefix).map_err(anyhow::Error::msg)?;

    let conn = broker::connect(&url, "example").await?;
    topology.declare(&conn).await?;
    let producer = Producer::on(&conn, &topology).await?;

    // One job, confirmed.
    let job = json!({"v": 1, "job_id": "example-0001", "ad_account_id": "1234567890",
                     "page_id": "9876543210", "message_id": "120210000000000000",
                     "subscription_token": "<recipient>", "message": {"text": "Hi!"},
                     "campaign": "example"});
    producer.send(&serde_json::to_vec(&job)?).await?;

    // A batch, with up to 256 confirms in flight; one result per job.
    let bodies: Vec<Vec<u8>> = (2..=100)
        .map(|i| {
            let mut j = job.clone();
            j["job_id"] = json!(format!("example-{i:04}"));
            serde_json::to_vec(&j).expect("json")
        })
        .collect();
    let results = producer
        .send_batch(bodies.iter().map(|b| b.as_slice()))
        .await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    println!(
        "published {} jobs to {} ({failed} failed)",
        results.len() + 1,
        topology.send_queue()
    );
    producer.close().await;
    conn.close(200, "bye".into()).await?;
    Ok(())
}
