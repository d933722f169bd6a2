//! The `x-mmsend-*` headers: a job's whole story travels with it, so a dead
//! letter explains itself (as in NServiceBus's error queue) and mmsend never
//! has to read RabbitMQ's `x-death`.
//!
//! Header names live here and nowhere else. [`Story`] is the typed view:
//! [`Story::read`] accepts whatever integer or string types another AMQP
//! client used, [`Story::write`] emits long strings, `long long` integers
//! and booleans.

use chrono::{DateTime, SecondsFormat, Utc};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;

use crate::classify::{Class, DeadReason};

pub const ATTEMPT: &str = "x-mmsend-attempt";
pub const FIRST_ATTEMPT_AT: &str = "x-mmsend-first-attempt-at";
pub const ENQUEUED_AT: &str = "x-mmsend-enqueued-at";
pub const CLASS: &str = "x-mmsend-class";
pub const ERROR_CODE: &str = "x-mmsend-error-code";
pub const ERROR_SUBCODE: &str = "x-mmsend-error-subcode";
pub const ERROR_MESSAGE: &str = "x-mmsend-error-message";
pub const HTTP_STATUS: &str = "x-mmsend-http-status";
pub const FBTRACE_ID: &str = "x-mmsend-fbtrace-id";
pub const AMBIGUOUS: &str = "x-mmsend-ambiguous";
pub const DEAD_REASON: &str = "x-mmsend-dead-reason";
pub const DEAD_AT: &str = "x-mmsend-dead-at";
pub const WORKER: &str = "x-mmsend-worker";
pub const REPLAYS: &str = "x-mmsend-replays";
pub const REPLAYED_AT: &str = "x-mmsend-replayed-at";

/// Every header mmsend writes, in the order of DESIGN §5.
pub const ALL: [&str; 15] = [
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
];

/// Longest error message kept in a header.
const MAX_MESSAGE_CHARS: usize = 500;

/// The last failure of a job.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LastError {
    /// The class name; a string because a dead letter may carry a class
    /// this build does not know (written by another version).
    pub class: Option<String>,
    pub code: Option<i64>,
    pub subcode: Option<i64>,
    pub message: Option<String>,
    pub http_status: Option<u16>,
    pub fbtrace_id: Option<String>,
    pub ambiguous: bool,
}

/// The typed view of a message's `x-mmsend-*` headers.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Story {
    pub attempt: u32,
    pub first_attempt_at: Option<DateTime<Utc>>,
    pub enqueued_at: Option<DateTime<Utc>>,
    pub last_error: LastError,
    /// `None` on a live job. A dead letter without it was dead-lettered by
    /// the broker (delivery limit): see [`Story::dead_reason_or_broker`].
    pub dead_reason: Option<String>,
    pub dead_at: Option<DateTime<Utc>>,
    pub worker: Option<String>,
    pub replays: u32,
    pub replayed_at: Option<DateTime<Utc>>,
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
            attempt: int(ATTEMPT)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
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
            replays: int(REPLAYS)
                .and_then(|n| u32::try_from(n).ok())
                .unwrap_or(0),
            replayed_at: time(REPLAYED_AT),
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
        *headers = FieldTable::from(map);
    }
}

impl Story {
    /// `original` (message id, content type, foreign headers, …) made
    /// persistent, with this story written into the headers: the properties
    /// of a copy headed for a delay tier, the DLQ or back to work. The
    /// broker's own `x-delivery-count` is dropped.
    pub fn restamp(&self, original: &BasicProperties) -> BasicProperties {
        let mut headers = original.headers().clone().unwrap_or_default();
        let mut inner = std::mem::take(&mut headers).inner().clone();
        inner.remove(&ShortString::from("x-delivery-count"));
        headers = FieldTable::from(inner);
        self.write(&mut headers);
        original.clone().with_delivery_mode(2).with_headers(headers)
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
                subcode: Some(2300018),
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
    fn long_messages_are_cut() {
        let mut s = Story::default();
        s.last_error.message = Some("é".repeat(2000));
        let mut h = FieldTable::default();
        s.write(&mut h);
        let back = Story::read(Some(&h));
        assert_eq!(back.last_error.message.unwrap().chars().count(), 501);
    }
}
