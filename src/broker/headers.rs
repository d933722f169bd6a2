//! The `x-mmsend-*` headers: a job's whole story travels with it, so a dead
//! letter explains itself (as in NServiceBus's error queue) and mmsend never
//! has to read RabbitMQ's `x-death`.
//!
//! Header names live here and nowhere else. [`Story`] is the typed view:
//! [`Story::read`] accepts whatever integer or string types another AMQP
//! client used, [`Story::write`] emits long strings, `long long` integers
//! and booleans.
//!
//! Copies (retry, dead, replay) are made by [`Story::restamp`], and they
//! carry none of RabbitMQ's own bookkeeping: `x-death`,
//! `x-first-death-*`, `x-last-death-*`, `x-delivery-count` and
//! `x-acquired-count` describe the *original* message's life in the
//! broker. Copied onto a new message they mislead the broker: a copy whose
//! `x-death` names `<prefix>.send` (a job once dead-lettered by the
//! delivery limit, then replayed) is taken by RabbitMQ's dead-letter cycle
//! check for a cycle when its tier's TTL sends it back to `.send`, and with
//! `at-least-once` dead-lettering it is held there forever, invisible. What
//! an operator needs from that history, how often the broker dead-lettered
//! the job by delivery limit, moves into [`DELIVERY_LIMIT_HITS`]. Nor do
//! copies keep the producer's AMQP `expiration` (a dead letter would expire
//! out of the DLQ, a retry would come back before its tier's time; a job's
//! deadline is its `not_after`) or `user_id` (RabbitMQ checks it against
//! the publishing connection's user and closes the channel on a mismatch).

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::classify::{Class, DeadReason};

/// Sends tried so far: 0 before the first call, 1 after it.
pub const ATTEMPT: &str = "x-mmsend-attempt";
/// RFC 3339 instant of the first try; cleared by a replay.
pub const FIRST_ATTEMPT_AT: &str = "x-mmsend-first-attempt-at";
/// RFC 3339 instant the producer published the job (job latency starts here).
pub const ENQUEUED_AT: &str = "x-mmsend-enqueued-at";
/// The [`Class`] name of the last failure.
pub const CLASS: &str = "x-mmsend-class";
/// The Graph API error `code` of the last failure.
pub const ERROR_CODE: &str = "x-mmsend-error-code";
/// The Graph API `error_subcode` of the last failure.
pub const ERROR_SUBCODE: &str = "x-mmsend-error-subcode";
/// The last failure's message, at most 500 characters, tokens redacted.
pub const ERROR_MESSAGE: &str = "x-mmsend-error-message";
/// The HTTP status of the last failure (absent for a network error).
pub const HTTP_STATUS: &str = "x-mmsend-http-status";
/// Meta's `fbtrace_id` of the last failure, for a support ticket.
pub const FBTRACE_ID: &str = "x-mmsend-fbtrace-id";
/// `true` when the last failure may have been a send (a timeout, a 5xx).
pub const AMBIGUOUS: &str = "x-mmsend-ambiguous";
/// Why a job died, a [`DeadReason`] name; absent on a job RabbitMQ dead-lettered itself.
pub const DEAD_REASON: &str = "x-mmsend-dead-reason";
/// RFC 3339 instant a worker dead-lettered the job.
pub const DEAD_AT: &str = "x-mmsend-dead-at";
/// The worker id (`MMSEND_WORKER_ID`) that settled the job last.
pub const WORKER: &str = "x-mmsend-worker";
/// How many times `dlq replay` moved the job back to the work queue.
pub const REPLAYS: &str = "x-mmsend-replays";
/// RFC 3339 instant of the last replay.
pub const REPLAYED_AT: &str = "x-mmsend-replayed-at";
/// How many times RabbitMQ dead-lettered the job by the work queue's
/// delivery limit (carried over from the `x-death` of the message a copy
/// was made from).
pub const DELIVERY_LIMIT_HITS: &str = "x-mmsend-delivery-limit-hits";
/// The id of the job's last call (its send-ledger claim): a claim that
/// outlived its call (the worker could not tell Redis how it ended) is
/// known for that call's, whose answer this story carries, not taken for
/// "maybe sent".
pub const CALL: &str = "x-mmsend-call";

/// Every header mmsend writes, in the order of DESIGN §5 (the call id
/// last).
pub const ALL: [&str; 17] = [
    ATTEMPT,
    FIRST_ATTEMPT_AT,
    ENQUEUED_AT,
    CLASS,
    ERROR_CODE,
    ERROR_SUBCODE,
    ERROR_MESSAGE,
    HTTP_STATUS,
    FBTRACE_ID,
    AMBIGUOUS,
    DEAD_REASON,
    DEAD_AT,
    WORKER,
    REPLAYS,
    REPLAYED_AT,
    DELIVERY_LIMIT_HITS,
    CALL,
];

/// Headers RabbitMQ writes about a message's own life in the broker; never
/// copied (see the module docs).
const BROKER_HEADERS: [&str; 3] = ["x-death", "x-delivery-count", "x-acquired-count"];
/// Prefixes of RabbitMQ's dead-letter summary headers (`x-first-death-queue`,
/// `x-last-death-reason`, …).
const BROKER_HEADER_PREFIXES: [&str; 2] = ["x-first-death-", "x-last-death-"];

/// Whether `name` is one of RabbitMQ's own bookkeeping headers.
pub fn is_broker_header(name: &str) -> bool {
    BROKER_HEADERS.contains(&name) || BROKER_HEADER_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// How many times RabbitMQ dead-lettered this message by a quorum queue's
/// delivery limit: what earlier copies recorded in [`DELIVERY_LIMIT_HITS`]
/// plus the `delivery_limit` entries of the `x-death` the message arrived
/// with. Saturates; odd values count as 0.
pub fn delivery_limit_hits(headers: Option<&FieldTable>) -> u32 {
    let Some(h) = headers else {
        return 0;
    };
    let h = h.inner();
    let recorded = h
        .get(&ShortString::from(DELIVERY_LIMIT_HITS))
        .and_then(as_int)
        .map_or(0, saturate_u32);
    let from_broker = match h.get(&ShortString::from("x-death")) {
        Some(AMQPValue::FieldArray(entries)) => entries
            .as_slice()
            .iter()
            .filter_map(|e| match e {
                AMQPValue::FieldTable(t) => Some(t.inner()),
                _ => None,
            })
            .filter(|t| {
                t.get(&ShortString::from("reason"))
                    .and_then(as_text)
                    .as_deref()
                    == Some("delivery_limit")
            })
            .map(|t| {
                t.get(&ShortString::from("count"))
                    .and_then(as_int)
                    .map_or(1, saturate_u32)
            })
            .fold(0u32, u32::saturating_add),
        _ => 0,
    };
    recorded.saturating_add(from_broker)
}

/// A header integer as a `u32` counter: negative is 0, too large is
/// `u32::MAX` (a counter near its limit stays there instead of wrapping to
/// 0 and starting over).
pub fn saturate_u32(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Longest error message kept in a header.
const MAX_MESSAGE_CHARS: usize = 500;

/// The last failure of a job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LastError {
    /// The class name; a string because a dead letter may carry a class
    /// this build does not know (written by another version).
    pub class: Option<String>,
    /// The Graph API error `code`; `None` for an HTTP or network failure
    /// without a Graph error body.
    pub code: Option<i64>,
    /// The Graph API `error_subcode`, when the error had one.
    pub subcode: Option<i64>,
    /// What went wrong, at most 500 characters, access tokens redacted.
    pub message: Option<String>,
    /// The HTTP status; `None` when no response came (timeout, connection).
    pub http_status: Option<u16>,
    /// Meta's `fbtrace_id`, to quote to Meta's support.
    pub fbtrace_id: Option<String>,
    /// The failure may have been a send (timeout, 5xx): the job may have
    /// reached the user even though it is retried or dead.
    pub ambiguous: bool,
}

impl LastError {
    /// The class, when this build knows its name.
    pub fn known_class(&self) -> Option<Class> {
        self.class.as_deref()?.parse().ok()
    }
}

/// The typed view of a message's `x-mmsend-*` headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Story {
    /// Sends tried so far (0 before the first call).
    pub attempt: u32,
    /// When the first try ran; `None` before it and after a replay.
    pub first_attempt_at: Option<DateTime<Utc>>,
    /// When the producer published the job; `None` when it did not say.
    pub enqueued_at: Option<DateTime<Utc>>,
    /// The last failure; all empty on a job that has not failed yet.
    pub last_error: LastError,
    /// `None` on a live job. A dead letter without it was dead-lettered by
    /// the broker (delivery limit): see [`Story::dead_reason_or_broker`].
    pub dead_reason: Option<String>,
    /// When a worker dead-lettered the job; `None` on a live job and on one
    /// the broker dead-lettered.
    pub dead_at: Option<DateTime<Utc>>,
    /// The worker id that settled the job last.
    pub worker: Option<String>,
    /// How many times `dlq replay` moved the job back (0 if never).
    pub replays: u32,
    /// When the last replay happened; `None` if never replayed.
    pub replayed_at: Option<DateTime<Utc>>,
    /// The id of the last call ([`CALL`]); `None` before the first call
    /// with the send ledger.
    pub call: Option<String>,
}

impl Story {
    /// Reads the headers of a delivery; missing or odd values are `None`/0.
    pub fn read(headers: Option<&FieldTable>) -> Story {
        let Some(h) = headers else {
            return Story::default();
        };
        let h = h.inner();
        let get = |k: &str| h.get(k);
        let text = |k: &str| get(k).and_then(as_text);
        let int = |k: &str| get(k).and_then(as_int);
        let time = |k: &str| {
            text(k).and_then(|s| {
                DateTime::parse_from_rfc3339(&s)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            })
        };
        Story {
            attempt: int(ATTEMPT).map_or(0, saturate_u32),
            first_attempt_at: time(FIRST_ATTEMPT_AT),
            enqueued_at: time(ENQUEUED_AT),
            last_error: LastError {
                class: text(CLASS),
                code: int(ERROR_CODE),
                subcode: int(ERROR_SUBCODE),
                message: text(ERROR_MESSAGE),
                http_status: int(HTTP_STATUS).and_then(|n| u16::try_from(n).ok()),
                fbtrace_id: text(FBTRACE_ID),
                ambiguous: get(AMBIGUOUS).is_some_and(|v| match v {
                    AMQPValue::Boolean(b) => *b,
                    other => as_text(other).as_deref() == Some("true"),
                }),
            },
            dead_reason: text(DEAD_REASON),
            dead_at: time(DEAD_AT),
            worker: text(WORKER),
            replays: int(REPLAYS).map_or(0, saturate_u32),
            replayed_at: time(REPLAYED_AT),
            call: text(CALL)
                .filter(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_alphanumeric())),
        }
    }

    /// The dead reason as the DLQ tools report it: a message in the DLQ
    /// without `x-mmsend-dead-reason` was dead-lettered by RabbitMQ itself.
    pub fn dead_reason_or_broker(&self) -> String {
        self.dead_reason
            .clone()
            .unwrap_or_else(|| DeadReason::DeliveryLimit.as_str().to_string())
    }

    /// Records a failure as the job's last error.
    pub fn set_last_error(&mut self, class: Option<Class>, error: LastError) {
        self.last_error = LastError {
            class: class.map(|c| c.as_str().to_string()).or(error.class),
            ..error
        };
    }

    /// Writes the story into `headers`, replacing the `x-mmsend-*` entries
    /// and keeping every other header.
    pub fn write(&self, headers: &mut FieldTable) {
        let mut map = std::mem::take(headers).inner().clone();
        for k in ALL {
            map.remove(&ShortString::from(k));
        }
        let mut put = |k: &str, v: AMQPValue| {
            map.insert(ShortString::from(k), v);
        };
        let text = |s: &str| AMQPValue::LongString(LongString::from(s));
        let time = |t: &DateTime<Utc>| text(&t.to_rfc3339_opts(SecondsFormat::Millis, true));
        if self.attempt > 0 {
            put(ATTEMPT, AMQPValue::LongLongInt(i64::from(self.attempt)));
        }
        if let Some(t) = &self.first_attempt_at {
            put(FIRST_ATTEMPT_AT, time(t));
        }
        if let Some(t) = &self.enqueued_at {
            put(ENQUEUED_AT, time(t));
        }
        let e = &self.last_error;
        if let Some(c) = &e.class {
            put(CLASS, text(c));
        }
        if let Some(c) = e.code {
            put(ERROR_CODE, AMQPValue::LongLongInt(c));
        }
        if let Some(c) = e.subcode {
            put(ERROR_SUBCODE, AMQPValue::LongLongInt(c));
        }
        if let Some(m) = &e.message {
            put(ERROR_MESSAGE, text(&truncate(m, MAX_MESSAGE_CHARS)));
        }
        if let Some(s) = e.http_status {
            put(HTTP_STATUS, AMQPValue::LongLongInt(i64::from(s)));
        }
        if let Some(f) = &e.fbtrace_id {
            put(FBTRACE_ID, text(f));
        }
        if e.ambiguous {
            put(AMBIGUOUS, AMQPValue::Boolean(true));
        }
        if let Some(r) = &self.dead_reason {
            put(DEAD_REASON, text(r));
        }
        if let Some(t) = &self.dead_at {
            put(DEAD_AT, time(t));
        }
        if let Some(w) = &self.worker {
            put(WORKER, text(w));
        }
        if self.replays > 0 {
            put(REPLAYS, AMQPValue::LongLongInt(i64::from(self.replays)));
        }
        if let Some(t) = &self.replayed_at {
            put(REPLAYED_AT, time(t));
        }
        if let Some(c) = &self.call {
            put(CALL, text(c));
        }
        *headers = FieldTable::from(map);
    }
}

impl Story {
    /// `original` (message id, content type, foreign headers, …) made
    /// persistent, with this story written into the headers: the properties
    /// of a copy headed for a delay tier, the DLQ or back to work.
    ///
    /// Left behind (see the module docs): RabbitMQ's own headers
    /// ([`is_broker_header`]), whose delivery-limit history is carried on
    /// in [`DELIVERY_LIMIT_HITS`], and the `expiration` and `user_id`
    /// properties.
    pub fn restamp(&self, original: &BasicProperties) -> BasicProperties {
        let hits = delivery_limit_hits(original.headers().as_ref());
        let mut map = original
            .headers()
            .as_ref()
            .map(|h| h.inner().clone())
            .unwrap_or_default();
        map.retain(|k, _| !is_broker_header(k.as_str()));
        let mut headers = FieldTable::from(map);
        self.write(&mut headers);
        if hits > 0 {
            headers.insert(
                DELIVERY_LIMIT_HITS.into(),
                AMQPValue::LongLongInt(i64::from(hits)),
            );
        }
        let mut copy = BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(headers);
        let o = original;
        if let Some(v) = o.content_type() {
            copy = copy.with_content_type(v.clone());
        }
        if let Some(v) = o.content_encoding() {
            copy = copy.with_content_encoding(v.clone());
        }
        if let Some(v) = o.priority() {
            copy = copy.with_priority(*v);
        }
        if let Some(v) = o.correlation_id() {
            copy = copy.with_correlation_id(v.clone());
        }
        if let Some(v) = o.reply_to() {
            copy = copy.with_reply_to(v.clone());
        }
        if let Some(v) = o.message_id() {
            copy = copy.with_message_id(v.clone());
        }
        if let Some(v) = o.timestamp() {
            copy = copy.with_timestamp(*v);
        }
        if let Some(v) = o.kind() {
            copy = copy.with_type(v.clone());
        }
        if let Some(v) = o.app_id() {
            copy = copy.with_app_id(v.clone());
        }
        if let Some(v) = o.cluster_id() {
            copy = copy.with_cluster_id(v.clone());
        }
        copy
    }
}

fn truncate(s: &str, max_chars: usize) -> String {
    match s.char_indices().nth(max_chars) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// A header value as text (strings, and numbers/bools rendered).
pub fn as_text(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        AMQPValue::Boolean(b) => Some(b.to_string()),
        other => as_int(other).map(|n| n.to_string()),
    }
}

/// A header value as an integer, whichever width or sign the writer used
/// (strings of digits too).
pub fn as_int(v: &AMQPValue) -> Option<i64> {
    match v {
        AMQPValue::ShortShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortInt(n) => Some(i64::from(*n)),
        AMQPValue::ShortUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongInt(n) => Some(i64::from(*n)),
        AMQPValue::LongUInt(n) => Some(i64::from(*n)),
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::Timestamp(n) => i64::try_from(*n).ok(),
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok()?.trim().parse().ok(),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_keeps_foreign_headers() {
        let now: DateTime<Utc> = "2026-11-24T10:00:00.123Z".parse().unwrap();
        let story = Story {
            attempt: 3,
            first_attempt_at: Some(now),
            enqueued_at: Some(now),
            last_error: LastError {
                class: Some("region".into()),
                code: Some(100),
                subcode: Some(2300030),
                message: Some("not supported".into()),
                http_status: Some(400),
                fbtrace_id: Some("Ab1".into()),
                ambiguous: true,
            },
            dead_reason: Some("terminal".into()),
            dead_at: Some(now),
            worker: Some("w1".into()),
            replays: 2,
            replayed_at: Some(now),
            call: Some("0f1e2d3c4b5a6978".into()),
        };
        let mut h = FieldTable::default();
        h.insert("traceparent".into(), AMQPValue::LongString("00-abc".into()));
        h.insert(ATTEMPT.into(), AMQPValue::LongInt(99));
        story.write(&mut h);
        assert_eq!(Story::read(Some(&h)), story);
        assert!(h.inner().contains_key(&ShortString::from("traceparent")));
        assert_eq!(
            h.inner().get(&ShortString::from(ATTEMPT)),
            Some(&AMQPValue::LongLongInt(3))
        );
    }

    #[test]
    fn reads_what_other_clients_write() {
        let mut h = FieldTable::default();
        h.insert(ATTEMPT.into(), AMQPValue::ShortUInt(4));
        h.insert(ERROR_CODE.into(), AMQPValue::LongString("2300012".into()));
        h.insert(AMBIGUOUS.into(), AMQPValue::LongString("true".into()));
        h.insert(
            FIRST_ATTEMPT_AT.into(),
            AMQPValue::LongString("garbage".into()),
        );
        let s = Story::read(Some(&h));
        assert_eq!(s.attempt, 4);
        assert_eq!(s.last_error.code, Some(2300012));
        assert!(s.last_error.ambiguous);
        assert_eq!(s.first_attempt_at, None);
        assert_eq!(s.dead_reason_or_broker(), "delivery_limit");
        assert_eq!(Story::read(None), Story::default());
    }

    #[test]
    fn restamp_leaves_the_brokers_bookkeeping_expiration_and_user_id_behind() {
        let mut entry = FieldTable::default();
        entry.insert(
            "reason".into(),
            AMQPValue::LongString("delivery_limit".into()),
        );
        entry.insert("count".into(), AMQPValue::LongLongInt(2));
        entry.insert("queue".into(), AMQPValue::LongString("p.send".into()));
        let mut expired = FieldTable::default();
        expired.insert("reason".into(), AMQPValue::LongString("expired".into()));
        expired.insert("count".into(), AMQPValue::LongLongInt(9));
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![AMQPValue::FieldTable(entry), AMQPValue::FieldTable(expired)].into(),
            ),
        );
        for k in [
            "x-first-death-queue",
            "x-first-death-reason",
            "x-last-death-queue",
            "x-last-death-exchange",
            "x-delivery-count",
            "x-acquired-count",
        ] {
            h.insert(k.into(), AMQPValue::LongString("v".into()));
        }
        h.insert(DELIVERY_LIMIT_HITS.into(), AMQPValue::LongLongInt(1));
        h.insert("traceparent".into(), AMQPValue::LongString("00-abc".into()));
        let original = BasicProperties::default()
            .with_headers(h)
            .with_expiration("3000".into())
            .with_user_id("guest".into())
            .with_message_id("job-1".into())
            .with_content_type("application/json".into())
            .with_app_id("crm".into());
        let copy = Story {
            attempt: 2,
            ..Default::default()
        }
        .restamp(&original);
        assert_eq!(copy.expiration(), &None);
        assert_eq!(copy.user_id(), &None);
        assert_eq!(copy.delivery_mode(), &Some(2));
        assert_eq!(
            copy.message_id().as_ref().map(|m| m.as_str()),
            Some("job-1")
        );
        assert_eq!(copy.app_id().as_ref().map(|m| m.as_str()), Some("crm"));
        let headers = copy.headers().clone().unwrap();
        let keys: Vec<&str> = headers.inner().keys().map(|k| k.as_str()).collect();
        assert!(keys.iter().all(|k| !is_broker_header(k)), "{keys:?}");
        assert!(keys.contains(&"traceparent"));
        // 1 recorded by an earlier copy + 2 from this x-death
        assert_eq!(delivery_limit_hits(Some(&headers)), 3);
        assert_eq!(Story::read(Some(&headers)).attempt, 2);
        // a copy of the copy keeps the count, and adds nothing new
        let again = Story::default().restamp(&copy);
        assert_eq!(delivery_limit_hits(again.headers().as_ref()), 3);
        // no history, no header
        let plain = Story::default().restamp(&BasicProperties::default());
        assert_eq!(plain.headers().as_ref().map(|h| h.inner().len()), Some(0));
    }

    #[test]
    fn counters_near_their_limit_saturate() {
        let mut h = FieldTable::default();
        h.insert(ATTEMPT.into(), AMQPValue::LongLongInt(i64::from(u32::MAX)));
        h.insert(REPLAYS.into(), AMQPValue::LongLongInt(1 << 40));
        h.insert(DELIVERY_LIMIT_HITS.into(), AMQPValue::LongLongInt(i64::MAX));
        let s = Story::read(Some(&h));
        assert_eq!((s.attempt, s.replays), (u32::MAX, u32::MAX));
        assert_eq!(delivery_limit_hits(Some(&h)), u32::MAX);
        let mut h = FieldTable::default();
        h.insert(ATTEMPT.into(), AMQPValue::LongLongInt(-5));
        assert_eq!(Story::read(Some(&h)).attempt, 0);
    }

    #[test]
    fn long_messages_are_cut() {
        let mut s = Story::default();
        s.last_error.message = Some("é".repeat(2000));
        let mut h = FieldTable::default();
        s.write(&mut h);
        let back = Story::read(Some(&h));
        assert_eq!(back.last_error.message.unwrap().chars().count(), 501);
    }
}
