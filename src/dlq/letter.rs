//! One dead letter: the job body, its `x-mmsend-*` story, and the views the
//! tools show of it.
//!
//! [`DeadLetter`] is the whole message as read from the queue (body and
//! AMQP properties); it lives only while the scan looks at it. What a caller
//! keeps is a [`LetterSummary`] (a few short fields, bounded in size whatever
//! the body) or the export record. [`LetterKey`] names a letter across scans
//! (job id + a fingerprint of body and story), so a caller that showed a set
//! of letters to a person can act on exactly that set later.
//!
//! A letter without `x-mmsend-dead-reason` was dead-lettered by RabbitMQ
//! itself (the work queue's `x-delivery-limit`): its reason reads as
//! `delivery_limit`, and it died when its `x-death` says
//! ([`DeadLetter::died_at`]), so `--since` and the times of `stats` and
//! `list` cover it too.
//!
//! The job's id, campaign and page are read the way every tool reads them
//! ([`crate::job::JobLabels`]; a field named twice names nothing, and the
//! id falls back to the AMQP `message_id`).
//!
//! The export record (`dlq export`, one JSON line: the job and the
//! `x-mmsend-*` headers) reads back through [`Exported`]: `mmsend enqueue`
//! of an export line sends the job as `dlq replay` would, so its story
//! (the last error, and with it `x-mmsend-ambiguous`) survives the round
//! trip.

use chrono::{DateTime, Utc};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::broker::headers::{self, Story};
use crate::classify::{Class, DeadReason};
use crate::job::JobLabels;

/// Longest text kept in a [`LetterSummary`] field (job id, campaign, error).
const SUMMARY_TEXT_CHARS: usize = 200;

/// One dead letter, decoded as far as it goes.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// The message body as it sits in the queue (normally the job JSON,
    /// but anything a producer sent, e.g. an `invalid_job`).
    pub body: Vec<u8>,
    /// The job fields the tools group and filter by, read as every tool
    /// reads them ([`JobLabels::read`]); the rest of the body is parsed
    /// only for an export.
    fields: JobLabels,
    /// Its `x-mmsend-*` headers, typed.
    pub story: Story,
    /// The AMQP properties (headers, `message_id`, …), kept whole so a
    /// replay copies them.
    pub properties: BasicProperties,
}

/// Names one letter across scans: its job id and a fingerprint of its body
/// and story. Two letters share a key only if they are byte-for-byte the same
/// job with the same story (a duplicate); a set of keys counts such twins.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LetterKey {
    /// The job id (see [`DeadLetter::job_id`]); empty when the letter has none.
    pub job_id: String,
    /// 16 hex digits of SHA-256 over the body and the `x-mmsend-*` headers.
    pub fingerprint: String,
}

impl std::fmt::Display for LetterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.job_id, self.fingerprint)
    }
}

/// What a list shows of a letter: small and bounded whatever the body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LetterSummary {
    /// Names the letter for a later replay or purge of exactly it.
    pub key: LetterKey,
    /// The job's `campaign`, at most 200 characters.
    pub campaign: Option<String>,
    /// The job's `page_id`, at most 200 characters.
    pub page_id: Option<String>,
    /// `x-mmsend-dead-reason`, or `delivery_limit` when RabbitMQ moved it.
    pub reason: String,
    /// The last failure's class (as written; a newer mmsend may know more).
    pub class: Option<String>,
    /// The marketing code when Meta gave one (in `code` or `error_subcode`), else the code.
    pub code: Option<i64>,
    /// Sends tried before it died.
    pub attempts: u32,
    /// Times it was replayed before.
    pub replays: u32,
    /// When it died ([`DeadLetter::died_at`]): when a worker dead-lettered
    /// it, or when RabbitMQ did (its `x-death`).
    pub dead_at: Option<DateTime<Utc>>,
    /// The last error message, at most 200 characters.
    pub error: Option<String>,
}

impl DeadLetter {
    /// Decodes a message read from the DLQ; never fails (an odd body or
    /// header just reads as absent).
    pub fn new(body: Vec<u8>, properties: BasicProperties) -> DeadLetter {
        DeadLetter {
            fields: JobLabels::read(&body),
            story: Story::read(properties.headers().as_ref()),
            body,
            properties,
        }
    }

    /// The job id from the body ([`JobLabels`]: none when the body names it
    /// twice), else the AMQP `message_id`.
    pub fn job_id(&self) -> Option<String> {
        self.fields
            .job_id
            .clone()
            .or_else(|| self.properties.message_id().as_ref().map(|m| m.to_string()))
    }

    /// The job's `campaign` label, if the body has one.
    pub fn campaign(&self) -> Option<String> {
        self.fields.campaign.clone()
    }

    /// The job's campaign as campaign control names it: its `campaign`
    /// label, else its `message_id` ([`crate::job::Job::campaign_name`]).
    pub fn campaign_name(&self) -> Option<&str> {
        self.fields
            .campaign
            .as_deref()
            .or(self.fields.message_id.as_deref())
    }

    /// The job's `page_id`, if the body has one.
    pub fn page_id(&self) -> Option<String> {
        self.fields.page_id.clone()
    }

    /// Borrowed views for counting without allocating.
    pub(crate) fn campaign_str(&self) -> Option<&str> {
        self.fields.campaign.as_deref()
    }

    pub(crate) fn page_str(&self) -> Option<&str> {
        self.fields.page_id.as_deref()
    }

    pub(crate) fn reason_str(&self) -> &str {
        self.story
            .dead_reason
            .as_deref()
            .unwrap_or(DeadReason::DeliveryLimit.as_str())
    }

    /// The dead reason, if it is one this build knows.
    pub fn reason(&self) -> Option<DeadReason> {
        self.reason_label().parse().ok()
    }

    /// The dead reason as written; `delivery_limit` when RabbitMQ moved it.
    pub fn reason_label(&self) -> String {
        self.story.dead_reason_or_broker()
    }

    /// The last failure's class, if it is one this build knows.
    pub fn class(&self) -> Option<Class> {
        self.story.last_error.known_class()
    }

    /// The last failure's class as written.
    pub fn class_label(&self) -> Option<&str> {
        self.story.last_error.class.as_deref()
    }

    /// The marketing code if Meta gave one in either field, else the code.
    pub fn code(&self) -> Option<i64> {
        let e = &self.story.last_error;
        e.subcode.filter(|c| *c >= 2_300_000).or(e.code)
    }

    /// Whether `code` is the error code or the subcode.
    pub fn has_code(&self, code: i64) -> bool {
        let e = &self.story.last_error;
        e.code == Some(code) || e.subcode == Some(code)
    }

    /// When the job died: `x-mmsend-dead-at` when a worker dead-lettered
    /// it; for a letter RabbitMQ dead-lettered itself (no such header), the
    /// latest `time` of its `x-death` entries, else its AMQP `timestamp`
    /// (when it was published: it died later, so `--since` never drops a
    /// letter that died after the bound for want of a death time).
    pub fn died_at(&self) -> Option<DateTime<Utc>> {
        self.story.dead_at.or_else(|| {
            let headers = self.properties.headers().as_ref();
            let from_broker =
                headers
                    .and_then(|h| h.inner().get("x-death"))
                    .and_then(|v| match v {
                        AMQPValue::FieldArray(entries) => entries
                            .as_slice()
                            .iter()
                            .filter_map(|e| match e {
                                AMQPValue::FieldTable(t) => {
                                    t.inner().get("time").and_then(headers::as_int)
                                }
                                _ => None,
                            })
                            .max(),
                        _ => None,
                    });
            from_broker
                .or_else(|| {
                    self.properties
                        .timestamp()
                        .and_then(|t| i64::try_from(t).ok())
                })
                .and_then(|secs| DateTime::from_timestamp(secs, 0))
        })
    }

    /// The letter's name across scans.
    pub fn key(&self) -> LetterKey {
        let mut h = Sha256::new();
        h.update((self.body.len() as u64).to_le_bytes());
        h.update(&self.body);
        if let Some(table) = self.properties.headers() {
            // BTreeMap: sorted by name, so the order a client wrote them in
            // does not matter; broker headers (x-delivery-count) are left out.
            for (k, v) in table.inner() {
                if k.as_str().starts_with("x-mmsend-") {
                    h.update(k.as_str().as_bytes());
                    h.update([0]);
                    h.update(headers::as_text(v).unwrap_or_default().as_bytes());
                    h.update([0]);
                }
            }
        }
        let digest = h.finalize();
        // The job id as a summary shows it (bounded, however long the body's
        // is): the fingerprint already covers the whole body, and a key a
        // caller took from a summary must name the same letter.
        LetterKey {
            job_id: key_job_id(&self.job_id().unwrap_or_default()),
            fingerprint: hex::encode(&digest[..8]),
        }
    }

    /// The bounded view a list keeps.
    pub fn summary(&self) -> LetterSummary {
        let s = &self.story;
        let cut = |t: Option<String>| t.map(|t| truncate(&t, SUMMARY_TEXT_CHARS));
        LetterSummary {
            key: self.key(),
            campaign: cut(self.campaign()),
            page_id: cut(self.page_id()),
            reason: truncate(&self.reason_label(), SUMMARY_TEXT_CHARS),
            class: cut(self.class_label().map(str::to_owned)),
            code: self.code(),
            attempts: s.attempt,
            replays: s.replays,
            dead_at: self.died_at(),
            error: cut(s.last_error.message.clone()),
        }
    }

    /// The export record: the job and the mmsend headers. `mmsend enqueue`
    /// reads it back (it takes the `job`).
    pub fn to_export(&self) -> Value {
        let mut hdrs = Map::new();
        if let Some(h) = self.properties.headers() {
            for (k, v) in h.inner() {
                if k.as_str().starts_with("x-mmsend-") {
                    let value = headers::as_int(v)
                        .map(Value::from)
                        .or_else(|| headers::as_text(v).map(Value::from))
                        .unwrap_or(Value::Null);
                    hdrs.insert(k.as_str().to_string(), value);
                }
            }
        }
        hdrs.insert(headers::DEAD_REASON.into(), self.reason_label().into());
        let job = serde_json::from_slice::<Value>(&self.body)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()));
        json!({"job": job, "headers": hdrs})
    }

    /// The properties of the copy that `replay` sends back to work: a fresh
    /// start (attempts and first try cleared, dead-letter headers removed),
    /// one more replay, the last error kept for history.
    pub fn replay_properties(&self, now: DateTime<Utc>) -> BasicProperties {
        replay_story(&self.story, now).restamp(&self.properties)
    }
}

/// A line of `mmsend dlq export` read back (`mmsend enqueue` takes it):
/// the job, and the letter's `x-mmsend-*` headers, so that enqueueing it is
/// the replay `dlq replay` would have made ([`Exported::replay_properties`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    /// The job's JSON.
    pub job: Vec<u8>,
    /// The letter's `x-mmsend-*` headers as exported (numbers as
    /// `long long`, text as long strings).
    pub headers: FieldTable,
}

impl Exported {
    /// Reads an export line: an object with a `job` object (its
    /// `headers`, if any, an object). `None` for any other line, e.g. a
    /// plain job.
    pub fn parse(line: &[u8]) -> Option<Exported> {
        if !line.starts_with(br#"{"job""#) {
            return None;
        }
        let v: Value = serde_json::from_slice(line).ok()?;
        let job = v.get("job").filter(|j| j.is_object())?;
        let mut table = FieldTable::default();
        if let Some(Value::Object(h)) = v.get("headers") {
            for (k, v) in h.iter().filter(|(k, _)| k.starts_with("x-mmsend-")) {
                let value = match v {
                    Value::Number(n) => match n.as_i64() {
                        Some(n) => AMQPValue::LongLongInt(n),
                        None => continue,
                    },
                    Value::String(s) => AMQPValue::LongString(LongString::from(s.as_str())),
                    Value::Bool(b) => AMQPValue::Boolean(*b),
                    _ => continue,
                };
                // header names are short strings: a longer one is not ours
                if let Ok(name) = lapin::types::ShortString::try_new(k.as_str()) {
                    table.insert(name, value);
                }
            }
        }
        Some(Exported {
            job: serde_json::to_vec(job).ok()?,
            headers: table,
        })
    }

    /// The properties of the job sent back to work: `base` (a new job's
    /// properties) with the letter's story as a replay writes it (a fresh
    /// start, one more replay, the last error, its ambiguity included,
    /// kept; see [`replay_story`]); an exported `x-mmsend-enqueued-at`
    /// stays the job's.
    pub fn replay_properties(&self, base: &BasicProperties, now: DateTime<Utc>) -> BasicProperties {
        let mut merged = base.headers().clone().unwrap_or_default();
        for (k, v) in self.headers.inner() {
            merged.insert(k.clone(), v.clone());
        }
        let story = replay_story(&Story::read(Some(&merged)), now);
        story.restamp(&base.clone().with_headers(merged))
    }
}

/// The story of a replayed job: a fresh start, one more replay.
pub(crate) fn replay_story(old: &Story, now: DateTime<Utc>) -> Story {
    Story {
        attempt: 0,
        first_attempt_at: None,
        enqueued_at: old.enqueued_at,
        last_error: old.last_error.clone(),
        dead_reason: None,
        dead_at: None,
        worker: None,
        replays: old.replays.saturating_add(1),
        replayed_at: Some(now),
        // the last call's answer stays known (its claim, if left behind,
        // is not "maybe sent"), like the last error
        call: old.call.clone(),
    }
}

/// A job id as a [`LetterKey`] names it: its first 200 characters, and `…`
/// when it is longer.
pub(crate) fn key_job_id(id: &str) -> String {
    truncate(id, SUMMARY_TEXT_CHARS)
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::broker::headers::LastError;
    use lapin::types::{AMQPValue, FieldTable};

    /// A dead letter as a worker writes it.
    pub(crate) fn letter(
        reason: Option<&str>,
        class: &str,
        code: i64,
        campaign: &str,
    ) -> DeadLetter {
        let story = Story {
            dead_reason: reason.map(str::to_owned),
            dead_at: Some("2026-11-24T10:00:00Z".parse().unwrap()),
            last_error: LastError {
                class: Some(class.into()),
                code: Some(100),
                subcode: Some(code),
                message: Some(format!("error {code}")),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut h = FieldTable::default();
        story.write(&mut h);
        let body = json!({"v":1,"job_id":"j","campaign":campaign,"page_id":"42"});
        DeadLetter::new(
            serde_json::to_vec(&body).unwrap(),
            BasicProperties::default().with_headers(h),
        )
    }

    #[test]
    fn replay_resets_attempts_and_counts_replays() {
        let old = Story {
            attempt: 7,
            first_attempt_at: Some(Utc::now()),
            dead_reason: Some("retries_exhausted".into()),
            replays: u32::MAX,
            ..Default::default()
        };
        let new = replay_story(&old, Utc::now());
        assert_eq!(new.attempt, 0);
        assert_eq!(new.first_attempt_at, None);
        assert_eq!(new.dead_reason, None);
        assert_eq!(new.replays, u32::MAX, "saturates, never wraps");
        assert!(new.replayed_at.is_some());
    }

    #[test]
    fn export_keeps_invalid_bodies_as_text() {
        let d = DeadLetter::new(b"not json".to_vec(), BasicProperties::default());
        let e = d.to_export();
        assert_eq!(e["job"], "not json");
        assert_eq!(e["headers"]["x-mmsend-dead-reason"], "delivery_limit");
        assert_eq!(d.reason(), Some(DeadReason::DeliveryLimit));
        assert_eq!(d.job_id(), None);
    }

    #[test]
    fn keys_ignore_the_broker_counter_and_tell_different_stories_apart() {
        let a = letter(Some("terminal"), "region", 2300030, "bf");
        let mut counted = a.properties.headers().clone().unwrap();
        counted.insert("x-delivery-count".into(), AMQPValue::LongLongInt(3));
        let b = DeadLetter::new(a.body.clone(), a.properties.clone().with_headers(counted));
        assert_eq!(a.key(), b.key(), "a peek does not change the key");
        let c = letter(Some("terminal"), "region", 2300031, "bf");
        assert_ne!(a.key(), c.key());
        assert_eq!(a.key().job_id, "j");
        assert_eq!(a.key().fingerprint.len(), 16);
    }

    #[test]
    fn job_fields_take_strings_and_render_other_scalars() {
        let d = DeadLetter::new(
            br#"{"job_id": 17, "campaign": null, "page_id": "42", "message": {"text": "x"}}"#
                .to_vec(),
            BasicProperties::default().with_message_id("m-1".into()),
        );
        assert_eq!(d.job_id().as_deref(), Some("17"));
        assert_eq!(d.campaign(), None);
        assert_eq!(d.page_id().as_deref(), Some("42"));
        let not_an_object = DeadLetter::new(
            b"[1,2]".to_vec(),
            BasicProperties::default().with_message_id("m-1".into()),
        );
        assert_eq!(not_an_object.job_id().as_deref(), Some("m-1"));
        assert_eq!(not_an_object.to_export()["job"], serde_json::json!([1, 2]));
    }

    #[test]
    fn a_summary_names_its_letter_even_with_a_huge_job_id() {
        let body = json!({"v": 1, "job_id": "j".repeat(10_000)});
        let d = DeadLetter::new(
            serde_json::to_vec(&body).unwrap(),
            BasicProperties::default(),
        );
        let s = d.summary();
        assert_eq!(
            s.key,
            d.key(),
            "a key taken from a summary selects the letter"
        );
        assert_eq!(s.key.job_id.chars().count(), SUMMARY_TEXT_CHARS + 1);
        let mut set: crate::dlq::LetterSet = [s.key.clone()].into_iter().collect();
        assert_eq!(set.len(), 1);
        let mut selector = crate::dlq::filter::Selector::new(std::mem::take(&mut set).into());
        assert!(selector.take(&d));
    }

    #[test]
    fn a_body_naming_its_job_id_twice_is_named_by_its_message_id() {
        let d = DeadLetter::new(
            br#"{"job_id":"a","campaign":"c","job_id":"b"}"#.to_vec(),
            BasicProperties::default().with_message_id("m-1".into()),
        );
        assert_eq!(d.job_id().as_deref(), Some("m-1"));
        assert_eq!(d.campaign().as_deref(), Some("c"));
    }

    /// RabbitMQ's `x-death`: one entry per queue and reason, `time` a
    /// timestamp.
    fn x_death(times: &[i64]) -> FieldTable {
        let entries: Vec<AMQPValue> = times
            .iter()
            .map(|t| {
                let mut e = FieldTable::default();
                e.insert("reason".into(), AMQPValue::LongString("expired".into()));
                e.insert("time".into(), AMQPValue::Timestamp(*t as u64));
                AMQPValue::FieldTable(e)
            })
            .collect();
        let mut h = FieldTable::default();
        h.insert("x-death".into(), AMQPValue::FieldArray(entries.into()));
        h
    }

    #[test]
    fn a_letter_dies_when_a_worker_or_rabbitmq_says() {
        let worker = letter(Some("terminal"), "region", 2300030, "bf");
        assert_eq!(worker.died_at(), worker.story.dead_at);
        let t = |s: i64| DateTime::from_timestamp(s, 0);
        let broker = DeadLetter::new(
            b"{}".to_vec(),
            BasicProperties::default()
                .with_headers(x_death(&[1_800_000_000, 1_800_000_600]))
                .with_timestamp(1_700_000_000),
        );
        assert_eq!(broker.died_at(), t(1_800_000_600), "the latest death");
        assert_eq!(broker.summary().dead_at, broker.died_at());
        let published = DeadLetter::new(
            b"{}".to_vec(),
            BasicProperties::default().with_timestamp(1_700_000_000),
        );
        assert_eq!(published.died_at(), t(1_700_000_000));
        assert_eq!(
            DeadLetter::new(b"{}".to_vec(), BasicProperties::default()).died_at(),
            None
        );
    }

    #[test]
    fn an_export_line_reads_back_as_a_replay_of_its_letter() {
        let mut d = letter(Some("retries_exhausted"), "transient", 2, "bf");
        d.story.attempt = 7;
        d.story.replays = 2;
        d.story.last_error.ambiguous = true;
        d.story.enqueued_at = Some("2026-11-24T09:00:00Z".parse().unwrap());
        let mut h = FieldTable::default();
        d.story.write(&mut h);
        h.insert(
            headers::DELIVERY_LIMIT_HITS.into(),
            AMQPValue::LongLongInt(1),
        );
        let d = DeadLetter::new(d.body.clone(), d.properties.clone().with_headers(h));
        let line = d.to_export().to_string();
        let e = Exported::parse(line.as_bytes()).expect("an export line");
        assert_eq!(
            serde_json::from_slice::<Value>(&e.job).unwrap()["campaign"],
            "bf"
        );
        let now: DateTime<Utc> = "2026-11-25T10:00:00Z".parse().unwrap();
        let base = crate::producer::properties("j");
        let props = e.replay_properties(&base, now);
        let story = Story::read(props.headers().as_ref());
        assert_eq!(
            story,
            replay_story(&d.story, now),
            "what `dlq replay` sends"
        );
        assert!(story.last_error.ambiguous && story.replays == 3);
        assert_eq!(story.enqueued_at, d.story.enqueued_at);
        assert_eq!(headers::delivery_limit_hits(props.headers().as_ref()), 1);
        assert_eq!(props.message_id().as_ref().map(|m| m.as_str()), Some("j"));
        // anything else is not an export line
        for other in [
            &br#"{"v":1,"job_id":"j"}"#[..],
            br#"{"job":"text"}"#,
            b"{\"job\": nope",
        ] {
            assert_eq!(Exported::parse(other), None);
        }
        // a plain export without headers starts a fresh story, one replay
        let bare = Exported::parse(br#"{"job":{"job_id":"j"}}"#).unwrap();
        let story = Story::read(bare.replay_properties(&base, now).headers().as_ref());
        assert_eq!((story.replays, story.last_error.ambiguous), (1, false));
    }

    #[test]
    fn summaries_are_bounded_and_typed_views_parse() {
        let mut d = letter(Some("terminal"), "region", 2300030, &"c".repeat(10_000));
        d.story.last_error.message = Some("é".repeat(5_000));
        let s = d.summary();
        assert_eq!(s.campaign.unwrap().chars().count(), SUMMARY_TEXT_CHARS + 1);
        assert_eq!(s.error.unwrap().chars().count(), SUMMARY_TEXT_CHARS + 1);
        assert_eq!(d.class(), Some(Class::Region));
        assert_eq!(d.reason(), Some(DeadReason::Terminal));
        assert_eq!(d.code(), Some(2300030));
        assert!(d.has_code(100) && d.has_code(2300030));
    }
}
