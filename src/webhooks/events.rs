//! Meta's marketing-message webhook events, read from a stored payload
//! (DESIGN §14): what the tracker joins to jobs.
//!
//! A payload is a page webhook, `{"object": "page", "entry": [{"id", "time",
//! "changes": [{"field", "value"}]}]}`, each `value` one event of its
//! `field`. The flat forms are taken too: one `{"field", "value"}` object,
//! or an array of them. A change of another field (Meta sends every field
//! the app subscribed to) is skipped and counted, not an error; an event of
//! a known field that lacks what identifies it (a timestamp; a tracking id,
//! or a token and a message id) is counted as malformed.
//!
//! | field | status | identifies its send by |
//! |---|---|---|
//! | `marketing_message_echoes` | echoed | tracking id |
//! | `marketing_message_deliveries` | delivered | tracking id |
//! | `marketing_message_reads` | read | tracking id |
//! | `marketing_message_clicks` | clicked | (token, message id): no tracking id |
//! | `marketing_message_delivery_failed` | failed | (token, message id): no tracking id |
//!
//! A job's status only moves forward, `sent < echoed < delivered < read <
//! clicked` ([`Status::rank`]); `failed` is an end of its own. Meta gives no
//! event id and delivers again, so each event has a [`dedupe
//! key`](Event::dedupe_key) of its field, what identifies its send, and its
//! timestamp. Timestamps are kept as Meta wrote them (an integer, or a
//! string of digits).

use serde_json::Value;

/// The webhook fields mmsend tracks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    /// `marketing_message_echoes`: Meta sent the message.
    Echo,
    /// `marketing_message_deliveries`.
    Delivery,
    /// `marketing_message_reads`.
    Read,
    /// `marketing_message_clicks`.
    Click,
    /// `marketing_message_delivery_failed`.
    DeliveryFailed,
}

impl Field {
    /// Every tracked field.
    pub const ALL: [Field; 5] = [
        Field::Echo,
        Field::Delivery,
        Field::Read,
        Field::Click,
        Field::DeliveryFailed,
    ];

    /// Meta's name of the field.
    pub fn as_str(self) -> &'static str {
        match self {
            Field::Echo => "marketing_message_echoes",
            Field::Delivery => "marketing_message_deliveries",
            Field::Read => "marketing_message_reads",
            Field::Click => "marketing_message_clicks",
            Field::DeliveryFailed => "marketing_message_delivery_failed",
        }
    }

    /// The field named `name`, if tracked.
    pub fn parse(name: &str) -> Option<Field> {
        Field::ALL.into_iter().find(|f| f.as_str() == name)
    }

    /// The status an event of this field gives its send.
    pub fn status(self) -> Status {
        match self {
            Field::Echo => Status::Echoed,
            Field::Delivery => Status::Delivered,
            Field::Read => Status::Read,
            Field::Click => Status::Clicked,
            Field::DeliveryFailed => Status::Failed,
        }
    }

    /// Whether its events carry the tracking id (else they are joined by
    /// page, token and message id).
    pub fn has_tracking_id(self) -> bool {
        matches!(self, Field::Echo | Field::Delivery | Field::Read)
    }
}

/// A send's delivery status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Status {
    /// Meta accepted the call (no event yet).
    Sent,
    /// Echoed.
    Echoed,
    /// Delivered.
    Delivered,
    /// Read.
    Read,
    /// Clicked.
    Clicked,
    /// Delivery failed: an end of its own.
    Failed,
}

impl Status {
    /// The order of the forward path; `Failed` is outside it (`None`).
    pub fn rank(self) -> Option<u8> {
        match self {
            Status::Sent => Some(0),
            Status::Echoed => Some(1),
            Status::Delivered => Some(2),
            Status::Read => Some(3),
            Status::Clicked => Some(4),
            Status::Failed => None,
        }
    }

    /// Whether a send at `self` moves to `next`: forward only; a failure
    /// ends a send nothing was heard of past its echo, and nothing moves a
    /// failed send.
    pub fn moves_to(self, next: Status) -> bool {
        match (self.rank(), next.rank()) {
            (Some(now), Some(then)) => then > now,
            (Some(now), None) => now <= 1,
            (None, _) => false,
        }
    }

    /// The name used in counters and events.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Sent => "sent",
            Status::Echoed => "echoed",
            Status::Delivered => "delivered",
            Status::Read => "read",
            Status::Clicked => "clicked",
            Status::Failed => "delivery_failed",
        }
    }
}

/// One event of a tracked field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Its field.
    pub field: Field,
    /// `marketing_message_tracking_id` (echoes, deliveries, reads).
    pub tracking_id: Option<String>,
    /// `messenger_subscription_token`: the recipient.
    pub token: Option<String>,
    /// `message_id`: the campaign's message.
    pub message_id: Option<String>,
    /// `page_id` (else the entry's `id`).
    pub page_id: Option<String>,
    /// `timestamp`, as Meta wrote it.
    pub timestamp: i64,
    /// `mid` (absent for subscribers from the Custom Audience API).
    pub mid: Option<String>,
    /// `recipient_id` (absent likewise).
    pub recipient_id: Option<String>,
    /// `error_message` (failures).
    pub error_message: Option<String>,
}

impl Event {
    /// The key that is the same for every delivery of this event by Meta
    /// and differs between events: field, what identifies the send (the
    /// tracking id, else page, token and message id), timestamp.
    pub fn dedupe_key(&self) -> String {
        let send = match &self.tracking_id {
            Some(t) => format!("t:{t}"),
            None => format!(
                "p:{}|{}|{}",
                self.page_id.as_deref().unwrap_or(""),
                self.token.as_deref().unwrap_or(""),
                self.message_id.as_deref().unwrap_or("")
            ),
        };
        format!("{}|{send}|{}", self.field.as_str(), self.timestamp)
    }
}

impl Event {
    /// The event in the flat form (`{"field", "value"}`), which [`parse`]
    /// reads back as this event: how the tracker puts an event aside to try
    /// it again.
    pub fn to_flat(&self) -> Value {
        let mut value = serde_json::Map::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                value.insert(k.to_string(), Value::from(v.as_str()));
            }
        };
        put("marketing_message_tracking_id", &self.tracking_id);
        put("messenger_subscription_token", &self.token);
        put("message_id", &self.message_id);
        put("page_id", &self.page_id);
        put("mid", &self.mid);
        put("recipient_id", &self.recipient_id);
        put("error_message", &self.error_message);
        value.insert("timestamp".into(), Value::from(self.timestamp));
        serde_json::json!({"field": self.field.as_str(), "value": value})
    }
}

/// What one payload held.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Parsed {
    /// The events of tracked fields, in the payload's order.
    pub events: Vec<Event>,
    /// Changes of fields mmsend does not track.
    pub other_fields: usize,
    /// Events of tracked fields without what identifies them.
    pub malformed: usize,
}

/// The payload is not a webhook at all.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PayloadError {
    /// Not JSON.
    #[error("not JSON: {0}")]
    NotJson(String),
    /// JSON of another shape.
    #[error("not a page webhook (no entry[].changes[], no field and value): {0}")]
    Shape(&'static str),
}

/// Reads a stored payload.
pub fn parse(body: &[u8]) -> Result<Parsed, PayloadError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| PayloadError::NotJson(e.to_string()))?;
    let mut out = Parsed::default();
    match &v {
        Value::Object(o) if o.contains_key("entry") => {
            let entries = o["entry"]
                .as_array()
                .ok_or(PayloadError::Shape("entry is not an array"))?;
            for entry in entries {
                let page = text(entry.get("id"));
                let changes = entry
                    .get("changes")
                    .and_then(Value::as_array)
                    .ok_or(PayloadError::Shape("an entry has no changes array"))?;
                for change in changes {
                    change_into(change, page.as_deref(), &mut out);
                }
            }
        }
        Value::Object(o) if o.contains_key("field") => change_into(&v, None, &mut out),
        Value::Array(changes) if changes.iter().all(|c| c.get("field").is_some()) => {
            for change in changes {
                change_into(change, None, &mut out);
            }
        }
        _ => {
            return Err(PayloadError::Shape(
                "neither an entry list nor field and value",
            ))
        }
    }
    Ok(out)
}

fn change_into(change: &Value, entry_page: Option<&str>, out: &mut Parsed) {
    let Some(field) = change
        .get("field")
        .and_then(Value::as_str)
        .and_then(Field::parse)
    else {
        out.other_fields += 1;
        return;
    };
    match change
        .get("value")
        .and_then(|v| event(field, v, entry_page))
    {
        Some(e) => out.events.push(e),
        None => out.malformed += 1,
    }
}

fn event(field: Field, v: &Value, entry_page: Option<&str>) -> Option<Event> {
    let timestamp = match v.get("timestamp")? {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) => s.parse().ok()?,
        _ => return None,
    };
    let e = Event {
        field,
        tracking_id: text(v.get("marketing_message_tracking_id")),
        token: text(v.get("messenger_subscription_token")),
        message_id: text(v.get("message_id")),
        page_id: text(v.get("page_id")).or_else(|| entry_page.map(str::to_string)),
        timestamp,
        mid: text(v.get("mid")),
        recipient_id: text(v.get("recipient_id")),
        error_message: text(v.get("error_message")),
    };
    let joinable = e.tracking_id.is_some() || (e.token.is_some() && e.message_id.is_some());
    joinable.then_some(e)
}

/// A string, or a number written as one (Meta writes ids both ways).
fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_event_put_aside_reads_back_as_itself() {
        let body = page(json!([
            {"field": "marketing_message_clicks", "value": {"messenger_subscription_token": "tok", "message_id": "m1", "page_id": "9876543210", "timestamp": 1733300001000u64, "mid": "m.x"}},
            {"field": "marketing_message_delivery_failed", "value": {"messenger_subscription_token": "tok", "message_id": "m1", "timestamp": "1733300002000", "error_message": "blocked"}},
            {"field": "marketing_message_reads", "value": {"marketing_message_tracking_id": "mm.1", "messenger_subscription_token": "tok", "message_id": "m1", "page_id": "9876543210", "timestamp": 1733300003000u64}}
        ]));
        let events = parse(&body).unwrap().events;
        assert_eq!(events.len(), 3);
        let flat = Value::Array(events.iter().map(Event::to_flat).collect());
        let again = parse(flat.to_string().as_bytes()).unwrap();
        assert_eq!(again.events, events);
        assert_eq!(again.malformed, 0);
    }

    fn page(changes: Value) -> Vec<u8> {
        json!({"object": "page", "entry": [{"id": "9876543210", "time": 1733300000000u64, "changes": changes}]})
            .to_string()
            .into_bytes()
    }

    #[test]
    fn every_tracked_field_is_read_from_a_page_webhook() {
        let body = page(json!([
            {"field": "marketing_message_echoes", "value": {"marketing_message_tracking_id": "t1",
              "messenger_subscription_token": "tok", "message_id": "120", "page_id": "9876543210",
              "timestamp": 1733300000001u64, "mid": "m_1", "recipient_id": "42"}},
            {"field": "marketing_message_deliveries", "value": {"marketing_message_tracking_id": "t1",
              "messenger_subscription_token": "tok", "message_id": "120", "page_id": "9876543210",
              "timestamp": "1733300000002"}},
            {"field": "marketing_message_reads", "value": {"marketing_message_tracking_id": "t1",
              "messenger_subscription_token": "tok", "message_id": 120, "timestamp": 1733300000003u64}},
            {"field": "marketing_message_clicks", "value": {"messenger_subscription_token": "tok",
              "message_id": "120", "page_id": "9876543210", "timestamp": 1733300000004u64, "mid": "m_1"}},
            {"field": "marketing_message_delivery_failed", "value": {"messenger_subscription_token": "tok2",
              "message_id": "120", "page_id": "9876543210", "timestamp": 1733300000005u64,
              "error_message": "The user could not be reached"}},
            {"field": "messages", "value": {"text": "hello"}},
        ]));
        let p = parse(&body).unwrap();
        assert_eq!(p.other_fields, 1);
        assert_eq!(p.malformed, 0);
        let fields: Vec<Field> = p.events.iter().map(|e| e.field).collect();
        assert_eq!(fields, Field::ALL.to_vec());
        let read = &p.events[2];
        assert_eq!(
            read.message_id.as_deref(),
            Some("120"),
            "a number id as text"
        );
        assert_eq!(
            read.page_id.as_deref(),
            Some("9876543210"),
            "the entry's page"
        );
        assert_eq!(p.events[1].timestamp, 1733300000002, "a string timestamp");
        assert_eq!(p.events[0].mid.as_deref(), Some("m_1"));
        assert_eq!(
            p.events[4].error_message.as_deref(),
            Some("The user could not be reached")
        );
        assert!(p.events[3].tracking_id.is_none());
    }

    #[test]
    fn flat_forms_are_taken_and_other_shapes_refused() {
        let one = json!({"field": "marketing_message_reads", "value": {
            "marketing_message_tracking_id": "t9", "timestamp": 5}});
        let p = parse(one.to_string().as_bytes()).unwrap();
        assert_eq!(p.events.len(), 1);
        let many = json!([one, {"field": "feed", "value": {}}]);
        let p = parse(many.to_string().as_bytes()).unwrap();
        assert_eq!((p.events.len(), p.other_fields), (1, 1));
        assert!(matches!(parse(b"not json"), Err(PayloadError::NotJson(_))));
        assert!(matches!(
            parse(b"{\"object\":\"page\",\"entry\":7}"),
            Err(PayloadError::Shape(_))
        ));
        assert!(matches!(parse(b"[1,2]"), Err(PayloadError::Shape(_))));
    }

    #[test]
    fn an_event_without_what_joins_it_is_malformed() {
        let body = page(json!([
            // no timestamp
            {"field": "marketing_message_echoes", "value": {"marketing_message_tracking_id": "t1"}},
            // a click without a token
            {"field": "marketing_message_clicks", "value": {"message_id": "1", "timestamp": 1}},
            // no value at all
            {"field": "marketing_message_reads"},
        ]));
        let p = parse(&body).unwrap();
        assert_eq!((p.events.len(), p.malformed), (0, 3));
    }

    #[test]
    fn a_redelivered_event_has_the_same_key_and_another_event_another() {
        let e = |field, tracking: Option<&str>, ts| Event {
            field,
            tracking_id: tracking.map(str::to_string),
            token: Some("tok".into()),
            message_id: Some("120".into()),
            page_id: Some("1".into()),
            timestamp: ts,
            mid: None,
            recipient_id: None,
            error_message: None,
        };
        let a = e(Field::Delivery, Some("t1"), 10);
        assert_eq!(a.dedupe_key(), a.clone().dedupe_key());
        assert_ne!(a.dedupe_key(), e(Field::Read, Some("t1"), 10).dedupe_key());
        assert_ne!(
            a.dedupe_key(),
            e(Field::Delivery, Some("t2"), 10).dedupe_key()
        );
        assert_ne!(
            a.dedupe_key(),
            e(Field::Delivery, Some("t1"), 11).dedupe_key()
        );
        let click = e(Field::Click, None, 10);
        assert!(click.dedupe_key().contains("p:1|tok|120"));
    }

    #[test]
    fn status_only_moves_forward_and_failure_is_an_end_of_its_own() {
        use Status::*;
        assert!(Sent.moves_to(Echoed));
        assert!(Echoed.moves_to(Read), "a lost delivery event skips a step");
        assert!(
            !Read.moves_to(Delivered),
            "a late delivery never overwrites a read"
        );
        assert!(!Delivered.moves_to(Delivered));
        assert!(Sent.moves_to(Failed) && Echoed.moves_to(Failed));
        assert!(
            !Delivered.moves_to(Failed),
            "delivered, then failed: keep what was seen"
        );
        assert!(!Failed.moves_to(Read) && !Failed.moves_to(Failed));
        for f in Field::ALL {
            assert_eq!(Field::parse(f.as_str()), Some(f));
        }
    }
}
