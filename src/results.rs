//! Results for producers: one event per settled job on the RabbitMQ stream
//! `<prefix>.results` (opt-in: `[topology] results = true`).
//!
//! A campaign service reads the stream (any AMQP 0-9-1 client: `basic.qos`,
//! then `basic.consume` with `x-stream-offset`, e.g. `first`, `next` or a
//! timestamp) and joins the events to its own records by `job_id`, and to
//! Meta's delivery, read and click webhooks by `tracking_id`.
//!
//! An event is published, confirmed, before its job's delivery is acked, so
//! no settled job misses its event; a crash between the two repeats the
//! event (consumers dedupe on `job_id`). A job is *settled* when it is sent
//! (`sent`) or dead-lettered (`dead`); retries are not events, and a replayed
//! dead letter that is later sent gets a second event, `sent`. If the
//! stream cannot take an event, the job is settled anyway and the failure
//! is counted (`mmsend_publish_failures_total`) and logged: a results stream
//! never holds up sending.
//!
//! The delivery tracker adds `delivery` events: what Meta's webhooks said
//! of a sent job (`status`: echoed, delivered, read, clicked or
//! delivery_failed), at least once per job and status: a webhook Meta
//! delivers again, or a payload taken again after a crash, repeats its
//! event (consumers dedupe on `job_id` and `status`; [`crate::tracker`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// How a job was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResultOutcome {
    /// Sent (Meta's answer, or its 2300035 evidence: see `suspected`).
    Sent,
    /// In the dead-letter queue.
    Dead,
    /// A copy of a job the send ledger knows as sent, acked without a call
    /// (a producer that published it twice, a redelivery after the send):
    /// not a new end; `tracking_id` names the send it duplicates.
    Duplicate,
    /// What Meta reported of a sent job through its webhooks (the delivery
    /// tracker): `status` says what (`echoed`, `delivered`, `read`,
    /// `clicked`, `delivery_failed`), `at` when by Meta's clock; each
    /// status once per job.
    Delivery,
}

/// One settled job: an event on the stream `<prefix>.results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[schemars(title = "mmsend results event v1")]
pub struct ResultEvent {
    /// Schema version: 1.
    #[schemars(extend("const" = 1))]
    pub v: u32,
    /// The job.
    pub job_id: String,
    /// The job's campaign label, if it had one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub campaign: Option<String>,
    /// `sent`, `dead`, `duplicate` or `delivery`.
    pub outcome: ResultOutcome,
    /// The class of the last failure (for `dead`, why; for `sent`, what it
    /// met before it went through).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// The dead reason (`terminal`, `expired`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Meta's code of the last failure (the marketing subcode if any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i64>,
    /// `marketing_message_tracking_id` of the send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_id: Option<String>,
    /// Settled as sent on evidence (2300035 after a maybe-sent call), with
    /// no tracking id of its own.
    #[serde(default)]
    pub suspected: bool,
    /// API calls made for the job so far (0 on `delivery` events: the
    /// tracker does not know).
    #[serde(default)]
    pub attempts: u32,
    /// `delivery` events: what Meta reported (`echoed`, `delivered`,
    /// `read`, `clicked`, `delivery_failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// When it was settled; on `delivery` events, when Meta says the
    /// status was reached (its webhook's timestamp).
    pub at: DateTime<Utc>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_a_stable_shape() {
        let e = ResultEvent {
            v: 1,
            job_id: "cmp42-000017".into(),
            campaign: Some("black-friday".into()),
            outcome: ResultOutcome::Sent,
            class: None,
            reason: None,
            code: None,
            tracking_id: Some("mm.1".into()),
            suspected: false,
            attempts: 1,
            status: None,
            at: "2026-11-26T10:00:00Z".parse().unwrap(),
        };
        let text = serde_json::to_string(&e).unwrap();
        assert_eq!(
            text,
            r#"{"v":1,"job_id":"cmp42-000017","campaign":"black-friday","outcome":"sent","tracking_id":"mm.1","suspected":false,"attempts":1,"at":"2026-11-26T10:00:00Z"}"#
        );
        assert_eq!(serde_json::from_str::<ResultEvent>(&text).unwrap(), e);
    }
}
