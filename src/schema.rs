//! JSON Schemas for producers and consumers in any language: the job
//! (`schemas/job.v1.json`) and the results event (`schemas/result.v1.json`),
//! generated from the Rust types with `schemars`.
//!
//! [`crate::job::Job::parse`] is hand-written (it words every error itself), so the
//! job's schema comes from [`JobV1`], a type that exists only to describe
//! what `Job::parse` accepts; the results event derives its schema on
//! [`crate::results::ResultEvent`] itself. `tests/schemas.rs` regenerates both files
//! and fails when the committed ones differ, and checks that every job
//! fixture in the repository is valid against the schema and accepted by
//! `Job::parse` (and that invalid ones are refused by both).
//!
//! What a schema cannot say, `Job::parse` still checks: a body of at most
//! 256 KiB, a `message` of at most 64 KiB, `job_id` at most 255 *bytes*
//! (the schema counts characters), and no top-level field named twice. Each
//! is named in the field's or the schema's description.

use chrono::{DateTime, Utc};
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde_json::{Map, Value};

use crate::results::ResultEvent;

/// A non-blank string: `Job::parse` refuses one that is only white space.
const NOT_BLANK: &str = r"\S";

/// One send job, schema version 1: one JSON object per AMQP message
/// (`content_type: application/json`) on the exchange `<prefix>` with the
/// routing key `<prefix>.send`. Unknown fields are kept and ignored. A top-level
/// field named twice is invalid, and the whole body is at most 256 KiB.
#[derive(JsonSchema)]
#[schemars(title = "mmsend job v1", inline)]
#[allow(dead_code)] // only its schema is used
pub struct JobV1 {
    /// Schema version: 1.
    #[schemars(extend("const" = 1))]
    v: u64,
    /// Unique per send, set by the producer; also the AMQP `message_id` and
    /// the send ledger's key (the idempotency key). At most 255 bytes of UTF-8.
    #[schemars(length(min = 1, max = 255), regex(pattern = NOT_BLANK))]
    job_id: String,
    /// The ad account, digits; a leading `act_` is accepted and stripped.
    #[schemars(length(max = 1024), regex(pattern = r"^(act_)?[0-9]+$"))]
    ad_account_id: String,
    /// The Facebook Page that sends, digits; selects the access token.
    #[schemars(length(max = 1024), regex(pattern = r"^[0-9]+$"))]
    page_id: String,
    /// The marketing message (campaign) id.
    #[schemars(length(min = 1, max = 1024), regex(pattern = NOT_BLANK))]
    message_id: String,
    /// The recipient's subscription token (personal data, not an access token).
    #[schemars(length(min = 1, max = 1024), regex(pattern = NOT_BLANK))]
    subscription_token: String,
    /// The message, Send API style (text, attachment, quick replies), at most
    /// 64 KiB written compactly; absent or null when the campaign carries the
    /// creative.
    #[schemars(extend("minProperties" = 1))]
    message: Option<Map<String, Value>>,
    /// Passed to Meta as is: the shortest gap, in whole seconds, since the
    /// recipient's last conversation.
    #[schemars(range(min = 0))]
    min_conversation_gap_seconds: Option<u64>,
    /// A free label for metrics, campaign control and the DLQ tools.
    #[schemars(length(min = 1, max = 1024), regex(pattern = NOT_BLANK))]
    campaign: Option<String>,
    /// Never send after this instant (RFC 3339): a job past it dies `expired`.
    not_after: Option<DateTime<Utc>>,
}

/// The JSON Schema of a job, as committed in `schemas/job.v1.json`.
pub fn job_v1() -> Schema {
    root::<JobV1>()
}

/// The JSON Schema of a results event, as committed in `schemas/result.v1.json`.
pub fn result_v1() -> Schema {
    root::<ResultEvent>()
}

/// The text of a schema file: pretty JSON and a final newline.
pub fn to_file_text(schema: &Schema) -> String {
    let mut text = serde_json::to_string_pretty(schema).expect("a schema is JSON");
    text.push('\n');
    text
}

fn root<T: JsonSchema>() -> Schema {
    // the shape a reader (a producer's validator, a consumer of events) gets
    SchemaGenerator::new(schemars::generate::SchemaSettings::draft2020_12().for_deserialize())
        .into_root_schema_for::<T>()
}
