//! The send job, schema v1: what a producer puts on the queue, one JSON
//! object per AMQP message.
//!
//! [`Job::parse`] is the only way in. It checks every field itself (rather
//! than leaning on serde's messages) so an operator reading a dead letter sees
//! exactly which field was wrong and why: `field "page_id": expected a string
//! of digits, got "12ab"`. Unknown fields are kept in [`Job::extra`] and
//! ignored; the worker republishes the original bytes, so nothing a producer
//! wrote is lost on the way through retry tiers or the dead-letter queue.
//!
//! Checks that depend on the clock are separate: [`Job::check_not_after`]
//! (the producer refuses a job whose deadline has passed, the worker dead-
//! letters it as `expired`).
//!
//! Decisions the schema leaves open:
//!
//! - **`job_id` is at most 255 bytes** ([`MAX_JOB_ID_BYTES`]): it is also
//!   the AMQP `message_id`, a short string of at most 255 bytes. Producer
//!   and worker check the same limit, so a job the producer accepts can
//!   always be published; [`amqp_message_id`] builds that property and
//!   never panics, whatever the text.
//! - **A body that names a top-level field twice is invalid** (the error
//!   names the field). JSON leaves duplicates to the reader and readers
//!   differ (serde's `Value` keeps the last, other parsers the first), so
//!   such a job could be sent to one recipient and listed under another's
//!   id. Both paths of [`Job::parse`] refuse it.
//! - **Tools that read any body, valid or not** (the DLQ tools, a results
//!   event) take its id, campaign and page through [`JobLabels::read`]: one
//!   reading for all of them, in which a field named twice names nothing.

use chrono::{DateTime, Utc};
use serde::de::{self, Deserializer as _, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// The only schema version this build understands.
pub const JOB_VERSION: u64 = 1;
/// Largest job body accepted, in bytes. Larger bodies are rejected before
/// they are parsed.
pub const MAX_JOB_BYTES: usize = 256 * 1024;
/// Largest `message` object, serialized, in bytes. Messenger messages are
/// small (text ≤ 2000 chars, templates a few KiB); anything this large is a
/// producer bug.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;
/// Longest id or token accepted.
const MAX_ID_LEN: usize = 1024;
/// Longest `job_id`, in bytes: the id is also the AMQP `message_id`, a short
/// string of at most 255 bytes.
pub const MAX_JOB_ID_BYTES: usize = 255;
/// Longest field name quoted in an error message.
const QUOTED_NAME_CHARS: usize = 100;

/// A validated send job.
#[derive(Clone, PartialEq)]
pub struct Job {
    /// Schema version; always 1 (anything else is rejected).
    pub v: u64,
    /// Unique per send, set by the producer; also the AMQP `message_id` and
    /// the send ledger's key.
    pub job_id: String,
    /// Digits only; a leading `act_` is stripped.
    pub ad_account_id: String,
    /// The Facebook Page that sends; selects the access token.
    pub page_id: String,
    /// The marketing message (campaign) id.
    pub message_id: String,
    /// The recipient. Not an access token, but personal data: it is never
    /// logged above debug level.
    pub subscription_token: String,
    /// The message (Send API style: text, attachment, quick replies);
    /// `None` when the campaign carries the creative.
    pub message: Option<Value>,
    /// Passed to Meta as is: the shortest gap since the recipient's last
    /// conversation (Meta answers 2300052 while it has not passed).
    pub min_conversation_gap_seconds: Option<u64>,
    /// A free label for metrics and `dlq` filters.
    pub campaign: Option<String>,
    /// Never send after this instant: a job past it dies `expired`.
    pub not_after: Option<DateTime<Utc>>,
    /// Fields this version does not know; kept, ignored.
    pub extra: Map<String, Value>,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("job_id", &self.job_id)
            .field("ad_account_id", &self.ad_account_id)
            .field("page_id", &self.page_id)
            .field("message_id", &self.message_id)
            .field("campaign", &self.campaign)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

/// Why a job body is not a valid v1 job. The `Display` text is what lands in
/// `x-mmsend-error-message` of an `invalid_job` dead letter.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The body exceeds [`MAX_JOB_BYTES`].
    #[error("job is {size} bytes, more than the {max}-byte limit; shrink the message or send the creative with the campaign")]
    TooLarge {
        /// The body's size in bytes.
        size: usize,
        /// The limit in bytes.
        max: usize,
    },
    /// Not JSON; the parser's message (line and column) is given.
    #[error("job is not valid JSON: {0}")]
    NotJson(String),
    /// JSON, but not an object; the JSON type found is given.
    #[error("job must be a JSON object, got {0}")]
    NotObject(&'static str),
    /// A required field is absent (its name is given).
    #[error("field \"{0}\" is missing")]
    Missing(&'static str),
    /// A required string field is empty (its name is given).
    #[error("field \"{0}\" is empty")]
    Empty(&'static str),
    /// A field has the wrong JSON type.
    #[error("field \"{field}\": expected {expected}, got {found}")]
    WrongType {
        /// The field's name.
        field: &'static str,
        /// The type it must have, e.g. `a string`.
        expected: &'static str,
        /// The JSON type it has.
        found: String,
    },
    /// `v` is not 1 (the value found is given).
    #[error("field \"v\": version {0} is not supported (this build reads version 1)")]
    UnsupportedVersion(String),
    /// A field has the right type but a bad value (digits expected, a
    /// malformed date).
    #[error("field \"{field}\": {problem}")]
    Invalid {
        /// The field's name.
        field: &'static str,
        /// What is wrong with the value.
        problem: String,
    },
    /// `not_after` (given) has passed.
    #[error("field \"not_after\": {0} has already passed")]
    Expired(DateTime<Utc>),
    /// A top-level field appears more than once (its name is given, cut to
    /// 100 characters).
    #[error("field {0:?} is named twice; JSON readers differ on which copy counts, so write each field once")]
    Duplicate(String),
}

impl Job {
    /// Parses and validates a job body. Never panics, whatever the bytes.
    pub fn parse(body: &[u8]) -> Result<Job, JobError> {
        if body.len() > MAX_JOB_BYTES {
            return Err(JobError::TooLarge {
                size: body.len(),
                max: MAX_JOB_BYTES,
            });
        }
        // a message is never longer, written compactly, than the body it
        // came in: a small body needs no measuring
        let message_fits = body.len() <= MAX_MESSAGE_BYTES;
        if let Some(job) = Typed::parse(body, message_fits) {
            return Ok(job);
        }
        Self::validate(read_body(body)?, message_fits)
    }

    /// Validates an already-decoded JSON value.
    pub fn from_value(value: Value) -> Result<Job, JobError> {
        Self::validate(value, false)
    }

    fn validate(value: Value, message_fits: bool) -> Result<Job, JobError> {
        let mut map = match value {
            Value::Object(map) => map,
            other => return Err(JobError::NotObject(type_name(&other))),
        };
        let v = match map.remove("v") {
            None => return Err(JobError::Missing("v")),
            Some(Value::Number(n)) if n.as_u64() == Some(JOB_VERSION) => JOB_VERSION,
            Some(other) => return Err(JobError::UnsupportedVersion(other.to_string())),
        };
        let job_id = required_string(&mut map, "job_id")?;
        check_job_id(&job_id)?;
        let ad_account_id = {
            let raw = required_string(&mut map, "ad_account_id")?;
            let digits = raw.strip_prefix("act_").unwrap_or(&raw).to_string();
            check_digits("ad_account_id", &digits)?;
            digits
        };
        let page_id = required_string(&mut map, "page_id")?;
        check_digits("page_id", &page_id)?;
        let message_id = required_string(&mut map, "message_id")?;
        let subscription_token = required_string(&mut map, "subscription_token")?;

        let message = match map.remove("message") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => {
                let size = match message_fits {
                    true => 0,
                    false => serde_json::to_vec(&m)
                        .map(|b| b.len())
                        .unwrap_or(usize::MAX),
                };
                if size > MAX_MESSAGE_BYTES {
                    return Err(JobError::Invalid {
                        field: "message",
                        problem: format!(
                            "{size} bytes, more than the {MAX_MESSAGE_BYTES}-byte limit"
                        ),
                    });
                }
                if m.is_empty() {
                    return Err(JobError::Empty("message"));
                }
                Some(Value::Object(m))
            }
            Some(other) => return Err(wrong_type("message", "an object", &other)),
        };
        let min_conversation_gap_seconds = match map.remove("min_conversation_gap_seconds") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(secs) => Some(secs),
                None => {
                    return Err(JobError::Invalid {
                        field: "min_conversation_gap_seconds",
                        problem: format!("expected a whole number of seconds ≥ 0, got {n}"),
                    })
                }
            },
            Some(other) => {
                return Err(wrong_type(
                    "min_conversation_gap_seconds",
                    "an integer",
                    &other,
                ))
            }
        };
        let campaign = optional_string(&mut map, "campaign")?;
        let not_after = match optional_string(&mut map, "not_after")? {
            None => None,
            Some(s) => Some(
                DateTime::parse_from_rfc3339(&s)
                    .map_err(|e| JobError::Invalid {
                        field: "not_after",
                        problem: format!(
                            "{s:?} is not an RFC 3339 timestamp ({e}); write e.g. 2026-11-27T00:00:00Z"
                        ),
                    })?
                    .with_timezone(&Utc),
            ),
        };
        Ok(Job {
            v,
            job_id,
            ad_account_id,
            page_id,
            message_id,
            subscription_token,
            message,
            min_conversation_gap_seconds,
            campaign,
            not_after,
            extra: map,
        })
    }

    /// The campaign the job belongs to for campaign control and counters:
    /// its `campaign` label, else its `message_id` (Meta's campaign).
    pub fn campaign_name(&self) -> &str {
        self.campaign.as_deref().unwrap_or(&self.message_id)
    }

    /// Fails when `not_after` is set and already passed at `now`.
    pub fn check_not_after(&self, now: DateTime<Utc>) -> Result<(), JobError> {
        match self.not_after {
            Some(deadline) if deadline <= now => Err(JobError::Expired(deadline)),
            _ => Ok(()),
        }
    }

    /// The job as JSON again (unknown fields included), e.g. for export.
    pub fn to_value(&self) -> Value {
        let mut map = self.extra.clone();
        map.insert("v".into(), self.v.into());
        map.insert("job_id".into(), self.job_id.clone().into());
        map.insert("ad_account_id".into(), self.ad_account_id.clone().into());
        map.insert("page_id".into(), self.page_id.clone().into());
        map.insert("message_id".into(), self.message_id.clone().into());
        map.insert(
            "subscription_token".into(),
            self.subscription_token.clone().into(),
        );
        if let Some(m) = &self.message {
            map.insert("message".into(), m.clone());
        }
        if let Some(g) = self.min_conversation_gap_seconds {
            map.insert("min_conversation_gap_seconds".into(), g.into());
        }
        if let Some(c) = &self.campaign {
            map.insert("campaign".into(), c.clone().into());
        }
        if let Some(t) = &self.not_after {
            map.insert(
                "not_after".into(),
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
                    .into(),
            );
        }
        Value::Object(map)
    }
}

/// The fast path of [`Job::parse`]: the fields decoded straight into their
/// types (strings borrowed from the body where they have no escapes), no
/// JSON tree and no map of fields to look up and remove. It answers only
/// for a body that is a valid job with no unknown field; for anything else
/// (a wrong type, a missing or duplicate field (serde refuses a field named
/// twice), an unknown field to keep in
/// [`Job::extra`], a bad value) it answers `None` and the `Value` path
/// decides, so every error is worded by one piece of code. Both paths give
/// the same job for the same bytes (`the_fast_path_agrees_with_the_value_path`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Typed<'a> {
    v: u64,
    #[serde(borrow)]
    job_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    ad_account_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    page_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    message_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    subscription_token: std::borrow::Cow<'a, str>,
    #[serde(default)]
    message: Option<Map<String, Value>>,
    #[serde(default)]
    min_conversation_gap_seconds: Option<u64>,
    #[serde(default, borrow)]
    campaign: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    not_after: Option<std::borrow::Cow<'a, str>>,
}

impl Typed<'_> {
    fn parse(body: &[u8], message_fits: bool) -> Option<Job> {
        // a message that must be measured is the Value path's: a body that
        // large is not parsed twice
        if !message_fits {
            return None;
        }
        let t: Typed<'_> = serde_json::from_slice(body).ok()?;
        // the same checks as `validate`; their errors are worded there
        let id = |s: &str| check_id("", s).is_ok();
        let digits = |s: &str| check_digits("", s).is_ok();
        let ad_account_id = t
            .ad_account_id
            .strip_prefix("act_")
            .unwrap_or(&t.ad_account_id);
        let ok = t.v == JOB_VERSION
            && t.job_id.len() <= MAX_JOB_ID_BYTES
            && [
                &t.job_id,
                &t.ad_account_id,
                &t.page_id,
                &t.message_id,
                &t.subscription_token,
            ]
            .iter()
            .all(|s| id(s))
            && t.campaign.as_deref().is_none_or(id)
            && t.not_after.as_deref().is_none_or(id)
            && digits(ad_account_id)
            && digits(&t.page_id)
            && t.message.as_ref().is_none_or(|m| !m.is_empty());
        if !ok {
            return None;
        }
        let not_after = match t.not_after.as_deref() {
            None => None,
            Some(s) => Some(DateTime::parse_from_rfc3339(s).ok()?.with_timezone(&Utc)),
        };
        Some(Job {
            v: JOB_VERSION,
            ad_account_id: ad_account_id.to_string(),
            job_id: t.job_id.into_owned(),
            page_id: t.page_id.into_owned(),
            message_id: t.message_id.into_owned(),
            subscription_token: t.subscription_token.into_owned(),
            message: t.message.map(Value::Object),
            min_conversation_gap_seconds: t.min_conversation_gap_seconds,
            campaign: t.campaign.map(std::borrow::Cow::into_owned),
            not_after,
            extra: Map::new(),
        })
    }
}

/// The body as JSON, refusing an object that names a top-level field twice
/// ([`JobError::Duplicate`]); serde's `Value` alone would keep the last copy.
fn read_body(body: &[u8]) -> Result<Value, JobError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let top = de
        .deserialize_any(TopLevel)
        .and_then(|top| de.end().map(|()| top))
        .map_err(|e| JobError::NotJson(e.to_string()))?;
    match top {
        Top::Value(v) => Ok(v),
        Top::Duplicate(name) => Err(JobError::Duplicate(cut(&name, QUOTED_NAME_CHARS))),
    }
}

/// A body's top level: the value, or the first field named twice.
enum Top {
    Value(Value),
    Duplicate(String),
}

/// Reads a top-level JSON value into a [`Value`], remembering a repeated
/// field name instead of letting the last copy win.
struct TopLevel;

impl<'de> Visitor<'de> for TopLevel {
    type Value = Top;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Top, A::Error> {
        let mut map = Map::new();
        let mut duplicate = None;
        // every entry is read, so the parser checks the rest of the body too
        while let Some(name) = access.next_key::<String>()? {
            let value: Value = access.next_value()?;
            if map.contains_key(&name) {
                duplicate.get_or_insert(name);
            } else {
                map.insert(name, value);
            }
        }
        Ok(match duplicate {
            Some(name) => Top::Duplicate(name),
            None => Top::Value(Value::Object(map)),
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut access: A) -> Result<Top, A::Error> {
        let mut items = Vec::new();
        while let Some(v) = access.next_element::<Value>()? {
            items.push(v);
        }
        Ok(Top::Value(Value::Array(items)))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Top, E> {
        Ok(Top::Value(v.into()))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Top, E> {
        Ok(Top::Value(v.into()))
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Top, E> {
        Ok(Top::Value(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Top, E> {
        Ok(Top::Value(v.into()))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Top, E> {
        Ok(Top::Value(v.into()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Top, E> {
        Ok(Top::Value(Value::Null))
    }
}

/// The labels of a job body read without validating it: what the DLQ
/// tools show and filter by, for any body (an `invalid_job` too).
///
/// One reading, shared by every tool that needs it: the body must be a
/// JSON object; a label is its field's string, or any other value rendered
/// (`17`, `true`); `null`, an absent field and **a field named twice** give
/// `None` (such a job is `invalid_job`, see [`JobError::Duplicate`], and no
/// tool picks one of its two values). A caller falls back to the AMQP
/// `message_id` for the id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobLabels {
    /// `job_id`.
    pub job_id: Option<String>,
    /// `campaign`.
    pub campaign: Option<String>,
    /// `page_id`.
    pub page_id: Option<String>,
    /// `message_id` (the campaign of a job without a `campaign` label).
    pub message_id: Option<String>,
}

impl JobLabels {
    /// Reads the labels of `body`; anything but a JSON object has none.
    /// Parses only these three fields (the rest is skipped), so it is cheap
    /// per letter.
    pub fn read(body: &[u8]) -> JobLabels {
        let mut de = serde_json::Deserializer::from_slice(body);
        de.deserialize_map(LabelsVisitor)
            .and_then(|labels| de.end().map(|()| labels))
            .unwrap_or_default()
    }
}

/// The labelled fields, by position in [`LabelsVisitor`]'s arrays.
const LABELS: [&str; 4] = ["job_id", "campaign", "page_id", "message_id"];

struct LabelsVisitor;

impl<'de> Visitor<'de> for LabelsVisitor {
    type Value = JobLabels;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<JobLabels, A::Error> {
        let mut values: [Option<String>; 4] = Default::default();
        let mut seen = [0u32; 4];
        while let Some(LabelKey(which)) = access.next_key()? {
            match which {
                Some(i) => {
                    seen[i] += 1;
                    values[i] = match access.next_value::<Value>()? {
                        Value::Null => None,
                        Value::String(s) => Some(s),
                        other => Some(other.to_string()),
                    };
                }
                None => {
                    access.next_value::<IgnoredAny>()?;
                }
            }
        }
        let [job_id, campaign, page_id, message_id] = std::array::from_fn(|i| match seen[i] {
            1 => values[i].take(),
            _ => None,
        });
        Ok(JobLabels {
            job_id,
            campaign,
            page_id,
            message_id,
        })
    }
}

/// A field name: the index of a label, or `None` for any other field
/// (read without allocating when it has no escapes).
struct LabelKey(Option<usize>);

impl<'de> serde::Deserialize<'de> for LabelKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<LabelKey, D::Error> {
        struct Name;
        impl Visitor<'_> for Name {
            type Value = LabelKey;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<LabelKey, E> {
                Ok(LabelKey(LABELS.iter().position(|l| *l == v)))
            }
        }
        d.deserialize_identifier(Name)
    }
}

/// `job_id` as the AMQP `message_id` of a message that carries the job.
/// A valid job's id always fits ([`MAX_JOB_ID_BYTES`]); a longer one (only
/// an invalid job has one, e.g. on its way to the dead-letter queue) is
/// cut to 255 bytes at a character boundary instead of panicking: the body
/// keeps the whole id.
/// (Plain text here, so that the fuzz targets build this file without
/// the AMQP client: `ShortString::from` of it never fails.)
pub fn amqp_message_id(job_id: &str) -> &str {
    let mut end = job_id.len().min(MAX_JOB_ID_BYTES);
    while !job_id.is_char_boundary(end) {
        end -= 1;
    }
    &job_id[..end]
}

fn cut(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn wrong_type(field: &'static str, expected: &'static str, found: &Value) -> JobError {
    JobError::WrongType {
        field,
        expected,
        found: type_name(found).to_string(),
    }
}

fn optional_string(
    map: &mut Map<String, Value>,
    field: &'static str,
) -> Result<Option<String>, JobError> {
    match map.remove(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => check_id(field, &s).map(|()| Some(s)),
        Some(other) => Err(wrong_type(field, "a string", &other)),
    }
}

fn required_string(map: &mut Map<String, Value>, field: &'static str) -> Result<String, JobError> {
    optional_string(map, field)?.ok_or(JobError::Missing(field))
}

/// A string field's own checks: not blank, at most [`MAX_ID_LEN`] bytes.
fn check_id(field: &'static str, value: &str) -> Result<(), JobError> {
    if value.trim().is_empty() {
        return Err(JobError::Empty(field));
    }
    if value.len() > MAX_ID_LEN {
        return Err(JobError::Invalid {
            field,
            problem: format!("{} bytes, more than {MAX_ID_LEN}", value.len()),
        });
    }
    Ok(())
}

/// `job_id`'s own limit beyond [`check_id`]'s: it must fit the AMQP
/// `message_id`.
fn check_job_id(value: &str) -> Result<(), JobError> {
    if value.len() > MAX_JOB_ID_BYTES {
        return Err(JobError::Invalid {
            field: "job_id",
            problem: format!(
                "{} bytes, more than {MAX_JOB_ID_BYTES}: the job id is also the AMQP message_id, which holds at most {MAX_JOB_ID_BYTES} bytes; use a shorter id (e.g. a hash of a longer key)",
                value.len()
            ),
        });
    }
    Ok(())
}

fn check_digits(field: &'static str, value: &str) -> Result<(), JobError> {
    if value.is_empty() {
        return Err(JobError::Empty(field));
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(JobError::Invalid {
            field,
            problem: format!("expected a string of digits, got {value:?}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn valid() -> Value {
        json!({"v": 1, "job_id": "cmp42-000017", "ad_account_id": "act_1234567890",
               "page_id": "9876543210", "message_id": "120210000000000000",
               "subscription_token": "sub-abc", "message": {"text": "Hi"},
               "min_conversation_gap_seconds": 3600, "campaign": "black-friday",
               "not_after": "2026-11-27T00:00:00+01:00", "x_custom": [1, 2]})
    }

    fn parse(v: Value) -> Result<Job, JobError> {
        Job::parse(&serde_json::to_vec(&v).unwrap())
    }

    fn with(field: &str, value: Value) -> Value {
        let mut v = valid();
        v[field] = value;
        v
    }

    fn without(field: &str) -> Value {
        let mut v = valid();
        v.as_object_mut().unwrap().remove(field);
        v
    }

    #[test]
    fn parses_a_full_job_strips_act_and_keeps_unknown_fields() {
        let job = parse(valid()).unwrap();
        assert_eq!(job.ad_account_id, "1234567890");
        assert_eq!(job.job_id, "cmp42-000017");
        assert_eq!(job.min_conversation_gap_seconds, Some(3600));
        assert_eq!(
            job.not_after.unwrap().to_rfc3339(),
            "2026-11-26T23:00:00+00:00"
        );
        assert_eq!(job.extra.get("x_custom"), Some(&json!([1, 2])));
        let again = Job::from_value(job.to_value()).unwrap();
        assert_eq!(again, job);
    }

    #[test]
    fn optional_fields_may_be_absent_or_null() {
        let mut v = valid();
        for f in [
            "message",
            "min_conversation_gap_seconds",
            "campaign",
            "not_after",
        ] {
            v[f] = Value::Null;
        }
        let job = parse(v).unwrap();
        assert!(job.message.is_none() && job.campaign.is_none() && job.not_after.is_none());
    }

    #[test]
    fn rejects_with_precise_errors() {
        let cases: Vec<(Value, &str)> = vec![
            (without("job_id"), "field \"job_id\" is missing"),
            (with("job_id", json!("  ")), "field \"job_id\" is empty"),
            (
                with("page_id", json!(98765)),
                "field \"page_id\": expected a string, got a number",
            ),
            (
                with("ad_account_id", json!("act_12ab")),
                "field \"ad_account_id\": expected a string of digits, got \"12ab\"",
            ),
            (
                with("v", json!(2)),
                "field \"v\": version 2 is not supported",
            ),
            (without("v"), "field \"v\" is missing"),
            (
                with("not_after", json!("tomorrow")),
                "field \"not_after\": \"tomorrow\" is not an RFC 3339 timestamp",
            ),
            (
                with("message", json!("hi")),
                "field \"message\": expected an object, got a string",
            ),
            (
                with("min_conversation_gap_seconds", json!(-5)),
                "field \"min_conversation_gap_seconds\": expected a whole number",
            ),
            (
                with("message", json!({"text": "x".repeat(MAX_MESSAGE_BYTES)})),
                "field \"message\": 65547 bytes, more than the 65536-byte limit",
            ),
            (json!([1, 2]), "job must be a JSON object, got an array"),
        ];
        for (input, want) in cases {
            let err = parse(input).unwrap_err().to_string();
            assert!(err.starts_with(want), "got {err:?}, want {want:?}");
        }
    }

    #[test]
    fn rejects_non_json_and_oversize_bodies_without_panicking() {
        assert!(matches!(
            Job::parse(b"{\"v\":1,"),
            Err(JobError::NotJson(_))
        ));
        assert!(matches!(Job::parse(b""), Err(JobError::NotJson(_))));
        assert!(matches!(
            Job::parse(&[0xff, 0xfe]),
            Err(JobError::NotJson(_))
        ));
        let big = vec![b' '; MAX_JOB_BYTES + 1];
        assert_eq!(
            Job::parse(&big),
            Err(JobError::TooLarge {
                size: MAX_JOB_BYTES + 1,
                max: MAX_JOB_BYTES
            })
        );
    }

    #[test]
    fn not_after_in_the_past_is_expired() {
        let job = parse(valid()).unwrap();
        let before = "2026-11-26T00:00:00Z".parse().unwrap();
        let after = "2026-11-28T00:00:00Z".parse().unwrap();
        assert!(job.check_not_after(before).is_ok());
        assert!(matches!(
            job.check_not_after(after),
            Err(JobError::Expired(_))
        ));
    }

    #[test]
    fn a_job_id_must_fit_the_amqp_message_id() {
        for extra in [None, Some(json!([1]))] {
            let mut v = with("job_id", json!("é".repeat(127) + "j"));
            if let Some(x) = &extra {
                // an unknown field: the Value path decides
                v["x_custom"] = x.clone();
            } else {
                v.as_object_mut().unwrap().remove("x_custom");
            }
            assert_eq!(parse(v.clone()).unwrap().job_id.len(), MAX_JOB_ID_BYTES);
            v["job_id"] = json!("j".repeat(MAX_JOB_ID_BYTES + 1));
            let err = parse(v).unwrap_err().to_string();
            assert!(
                err.starts_with("field \"job_id\": 256 bytes, more than 255")
                    && err.contains("AMQP message_id"),
                "{err}"
            );
        }
    }

    #[test]
    fn a_field_named_twice_is_refused_on_both_paths() {
        let base = r#""v":1,"job_id":"a","ad_account_id":"1","page_id":"2","message_id":"3","subscription_token":"s""#;
        for (more, field) in [
            (r#","job_id":"b""#, "job_id"),
            (r#","subscription_token":"t""#, "subscription_token"),
            (
                r#","message":{"text":"x"},"message":{"text":"y"}"#,
                "message",
            ),
            (r#","x":1,"x":2"#, "x"),
            (r#","campaign":null,"campaign":"c""#, "campaign"),
        ] {
            let body = format!("{{{base}{more}}}");
            assert_eq!(
                Job::parse(body.as_bytes()),
                Err(JobError::Duplicate(field.into())),
                "{body}"
            );
        }
        let err = Job::parse(format!("{{{base},\"job_id\":\"b\"}}").as_bytes())
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("field \"job_id\" is named twice"), "{err}");
        // names are quoted escaped and bounded
        let long = "k".repeat(5000);
        let body = format!(r#"{{{base},"{long}":1,"{long}":2}}"#);
        let err = Job::parse(body.as_bytes()).unwrap_err().to_string();
        assert!(err.len() < 300, "{err}");
        // nested objects may repeat names (only the top level is the job)
        let nested = format!(r#"{{{base},"message":{{"text":"x","text":"y"}}}}"#);
        assert!(Job::parse(nested.as_bytes()).is_ok());
        // not JSON stays "not JSON", whatever else is wrong
        assert!(matches!(
            Job::parse(format!("{{{base},\"job_id\":\"b\"").as_bytes()),
            Err(JobError::NotJson(_))
        ));
    }

    #[test]
    fn labels_are_read_one_way_for_every_tool() {
        let labels = JobLabels::read(
            br#"{"job_id": 17, "campaign": null, "page_id": "42", "message": {"job_id": "nested"}}"#,
        );
        assert_eq!(
            labels,
            JobLabels {
                job_id: Some("17".into()),
                campaign: None,
                page_id: Some("42".into()),
                message_id: None,
            }
        );
        let twice = JobLabels::read(br#"{"job_id":"a","campaign":"c","job_id":"b"}"#);
        assert_eq!(twice.job_id, None, "a field named twice names nothing");
        assert_eq!(twice.campaign.as_deref(), Some("c"));
        for not_a_job in [
            &b"[1,2]"[..],
            b"\"j\"",
            b"not json",
            b"{\"job_id\":\"a\"} x",
            b"",
        ] {
            assert_eq!(JobLabels::read(not_a_job), JobLabels::default());
        }
        // escaped names are still the field
        let escaped = JobLabels::read(br#"{"job\u005fid":"e"}"#);
        assert_eq!(escaped.job_id.as_deref(), Some("e"));
    }

    #[test]
    fn the_amqp_message_id_never_panics_and_keeps_a_valid_id_whole() {
        assert_eq!(amqp_message_id("cmp42-000017"), "cmp42-000017");
        let long = "é".repeat(300);
        let id = amqp_message_id(&long);
        assert!(id.len() <= MAX_JOB_ID_BYTES && long.starts_with(id));
        assert_eq!(id.len(), 254, "cut on a character boundary");
        assert!(lapin::types::ShortString::try_new(id).is_ok());
    }

    #[test]
    fn debug_does_not_print_the_recipient() {
        let job = parse(valid()).unwrap();
        assert!(!format!("{job:?}").contains("sub-abc"));
    }
}

/// Robustness on arbitrary bytes: a cheap, deterministic stand-in for the
/// cargo-fuzz targets in `fuzz/` (which need a nightly toolchain).
#[cfg(test)]
mod robustness {
    use super::*;
    use rand::{RngExt, SeedableRng};

    #[test]
    fn parse_never_panics_on_mutated_jobs() {
        let seed = br#"{"v":1,"job_id":"j","ad_account_id":"act_1","page_id":"2","message_id":"3","subscription_token":"s","message":{"text":"hi"},"not_after":"2026-11-27T00:00:00Z","min_conversation_gap_seconds":5}"#;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut ok = 0;
        for _ in 0..20_000 {
            let mut input = seed.to_vec();
            for _ in 0..rng.random_range(1..8) {
                let i = rng.random_range(0..input.len());
                match rng.random_range(0..3) {
                    0 => input[i] = rng.random(),
                    1 => {
                        input.remove(i);
                    }
                    _ => {
                        const BYTES: &[u8] = b"{}[]\":,0\\\xff";
                        input.insert(i, BYTES[rng.random_range(0..BYTES.len())])
                    }
                }
                if input.is_empty() {
                    break;
                }
            }
            if Job::parse(&input).is_ok() {
                ok += 1;
            }
            agree(&input);
            let _ = crate::graph::GraphError::parse(&input);
        }
        // some mutations keep the job valid, most do not; none panics
        assert!(ok > 0 && ok < 20_000, "{ok}");
    }

    /// The typed fast path answers only where the `Value` path accepts, and
    /// then with the same job; returns whether it answered.
    fn agree(body: &[u8]) -> bool {
        let slow = read_body(body).and_then(|v| Job::validate(v, body.len() <= MAX_MESSAGE_BYTES));
        match Typed::parse(body, body.len() <= MAX_MESSAGE_BYTES) {
            Some(fast) => {
                assert_eq!(
                    Ok(&fast),
                    slow.as_ref(),
                    "{}",
                    String::from_utf8_lossy(body)
                );
                true
            }
            None => false,
        }
    }

    #[test]
    fn the_fast_path_agrees_with_the_value_path() {
        let base = r#""v":1,"job_id":"j","ad_account_id":"act_1","page_id":"2","message_id":"3","subscription_token":"s""#;
        // (extra fields, the fast path answers)
        let cases: &[(&str, bool)] = &[
            ("", true),
            (
                r#","message":{"text":"hi","quick_replies":[{"a":1}]},"campaign":"c","not_after":"2026-11-27T00:00:00+01:00","min_conversation_gap_seconds":5"#,
                true,
            ),
            (
                r#","message":null,"campaign":null,"not_after":null,"min_conversation_gap_seconds":null"#,
                true,
            ),
            (r#","campaign":"a\"b\u00e9""#, true),
            // the Value path decides all of these
            (r#","x_custom":[1]"#, false),
            (r#","message":{}"#, false),
            (r#","message":"hi""#, false),
            (r#","campaign":"  ""#, false),
            (r#","not_after":"tomorrow""#, false),
            (r#","min_conversation_gap_seconds":-5"#, false),
            (r#","min_conversation_gap_seconds":5.0"#, false),
            (r#","job_id":"again""#, false),
            (r#","page_id":"12ab""#, false),
        ];
        for (more, answers) in cases {
            let body = format!("{{{base}{more}}}");
            assert_eq!(agree(body.as_bytes()), *answers, "{body}");
        }
        for body in [
            r#"{"v":2,"job_id":"j","ad_account_id":"1","page_id":"2","message_id":"3","subscription_token":"s"}"#,
            r#"{"v":1.0,"job_id":"j","ad_account_id":"1","page_id":"2","message_id":"3","subscription_token":"s"}"#,
            r#"{"v":1,"job_id":"j","ad_account_id":"act_","page_id":"2","message_id":"3","subscription_token":"s"}"#,
            r#"{"v":1,"job_id":"j","ad_account_id":"1","page_id":"2","message_id":"3"}"#,
        ] {
            assert!(!agree(body.as_bytes()), "{body}");
        }
        let long = format!(r#"{{{base},"campaign":"{}"}}"#, "c".repeat(MAX_ID_LEN + 1));
        assert!(!agree(long.as_bytes()));
        let long_id = base.replace(
            r#""job_id":"j""#,
            &format!(r#""job_id":"{}""#, "j".repeat(256)),
        );
        assert!(!agree(format!("{{{long_id}}}").as_bytes()));
    }
}
