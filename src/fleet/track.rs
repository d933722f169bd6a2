//! Delivery tracking in Redis (DESIGN §14): the joins of Meta's
//! marketing-message webhook events to jobs, each job's delivery record,
//! each campaign's funnel, and the evidence a maybe-sent job looks for.
//!
//! **The join.** A send's tracking id is written by `after.lua` with the
//! send (tracking id → job and campaign, a field of the hash of the send's
//! day, `{p}:tid:<day>`, kept for the ledger retention: one `HSET` per send,
//! the only work delivery tracking adds to a job; a key per send cost twice
//! the Redis time, measured, and far more memory). Echoes, deliveries and reads carry the tracking id and join by
//! it. Every tracking id Meta reports is also indexed by the send's
//! subscription token and message id (`{p}:wh:sends:<send key>`, a sorted
//! set scored by the earliest event seen), and clicks and delivery failures,
//! which carry no tracking id, join the latest send of that index before
//! them (Meta allows one send per token per 12 h, so the latest is the
//! one; [`CLOCK_SKEW_MS`] allows for Meta's and Redis's clocks). The page
//! is not part of the key: a subscription token belongs to one page (as a
//! page-scoped id does), so it adds nothing, and an event that names no
//! page (or a page the send was not made through: a system-user token sends
//! for several) still joins.
//!
//! **Counted once.** A job's delivery record (`{p}:dlv:<job id>`) keeps the
//! first time of each status; an event of a field the record already has
//! (Meta's redelivery, a payload taken twice after a crash, a second
//! click) changes nothing. So each campaign's funnel counters (`echoed`,
//! `delivered`, `read`, `clicked`, `delivery_failed` on the campaign's
//! hash) count sends, each once per field: a read whose delivery event
//! never came counts in `read` only. The status moves forward only (a late
//! delivery never overwrites a read; a failure ends a send only before its
//! delivery).
//!
//! **Unmatched.** An event whose send is not known yet (the webhook can
//! come before the worker recorded the send, or before a maybe-sent job
//! settled on its echo) is tried again for a while by the tracker; on its
//! last try it is counted `unmatched` once (its dedupe key, field + send +
//! timestamp, is kept), under the campaign of its message id when one was
//! seen.
//!
//! **Maybe-sent jobs.** A job whose earlier call may have been the send
//! looks, before calling again, for an echo of its token and message
//! id whose tracking id no job recorded ([`Fleet::echo_evidence`], which
//! renews the job's claim while it waits): that echo is its send.
//!
//! **Silent pages.** Workers write, once per housekeeping, the first send
//! to each page since its last echo (`{p}:wh:page_sent`); the tracker
//! writes each page's last echo (`{p}:wh:page_echo`). A page with a send
//! older than `silent_page_after` and no echo since is silent
//! ([`Fleet::silent_pages`]).

use std::collections::HashMap;

use redis::Script;

use super::{ms, Fleet, FleetError};
use crate::job::Job;
use crate::metrics::RedisOp;
use crate::webhooks::events::{Event, Field};

/// How far an event's timestamp may be ahead of the send it joins
/// (Meta's clock against the time Redis recorded the echo), ms.
pub const CLOCK_SKEW_MS: i64 = 5 * 60 * 1000;

/// The longest error message kept in a delivery record.
const MAX_ERROR: usize = 500;

/// How an event was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Joined {
    /// Joined to its send; the first of its field for that send.
    Matched,
    /// Already counted (Meta delivered it again, or a second click).
    Duplicate,
    /// Its send is not known yet: try again later.
    Defer,
    /// Its send is not known, on the last try: counted once as unmatched.
    Unmatched,
}

impl Joined {
    /// The `result` label of `mmsend_webhook_events_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Joined::Matched => "matched",
            Joined::Duplicate => "duplicate",
            Joined::Defer => "deferred",
            Joined::Unmatched => "unmatched",
        }
    }
}

/// One event's join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracked {
    /// How it was taken.
    pub joined: Joined,
    /// The job (matched and duplicate).
    pub job_id: String,
    /// The job's campaign (or, unmatched, its message id's).
    pub campaign: String,
    /// The job's status after the event.
    pub status: String,
    /// The job's status moved.
    pub changed: bool,
    /// The tracking id of the send it joined (clicks and failures carry
    /// none of their own).
    pub tracking_id: Option<String>,
}

/// The key of a send by what Meta reports of it: the subscription token
/// and the message id, hashed (SHA-256, 16 bytes as hex; module docs).
pub fn send_key(token: &str, message_id: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for part in [token, message_id] {
        hash.update(part.as_bytes());
        hash.update([0]);
    }
    hex::encode(&hash.finalize()[..16])
}

fn event_send_key(e: &Event) -> String {
    match (&e.token, &e.message_id) {
        (Some(t), Some(m)) => send_key(t, m),
        _ => String::new(),
    }
}

fn dedupe_digest(e: &Event) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(e.dedupe_key().as_bytes())[..16])
}

/// What [`Fleet::echo_evidence`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Evidence {
    /// The echo of an earlier call: its tracking id.
    Echo(String),
    /// None yet; the fleet receives echoes (one may still come).
    NotYet,
    /// None, and the fleet never saw an echo of any page: webhooks are not
    /// tracked, so none will come.
    Untracked,
}

/// A job's delivery record: its status and the first time (Meta's, ms) of
/// each status it reached.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeliveryRecord {
    /// `sent` until an event came, then the furthest status.
    pub status: String,
    /// The send's tracking id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tracking_id: Option<String>,
    /// Status → Meta's timestamp (ms) of its first event.
    pub at: std::collections::BTreeMap<String, i64>,
    /// The failure's `error_message`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl DeliveryRecord {
    /// Reads a job's delivery hash (`HGETALL`); `None` when empty.
    pub fn from_hash(hash: &HashMap<String, String>) -> Option<DeliveryRecord> {
        if hash.is_empty() {
            return None;
        }
        let mut record = DeliveryRecord {
            status: hash.get("status").cloned().unwrap_or_else(|| "sent".into()),
            tracking_id: hash.get("tracking").cloned(),
            error: hash.get("error").cloned(),
            ..Default::default()
        };
        for field in Field::ALL {
            let name = field.status().as_str();
            if let Some(at) = hash.get(name).and_then(|v| v.parse().ok()) {
                record.at.insert(name.to_string(), at);
            }
        }
        Some(record)
    }
}

/// What the send ledger holds of a job (`{p}:job:<id>`, prelude.lua).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerRecord {
    /// `sending` (claimed, its call maybe in flight) or `sent`.
    pub state: String,
    /// The claim's lease end, or when it was sent (ms).
    pub at_ms: i64,
    /// The worker that claimed or sent it.
    pub worker: String,
    /// The send's tracking id (`sent`, when Meta gave one).
    pub tracking_id: Option<String>,
    /// Settled as sent on evidence (2300035 after a maybe-sent call).
    pub suspected: bool,
}

impl LedgerRecord {
    /// Reads a ledger record (the string layouts of prelude.lua; a hash of
    /// builds before 0.2 is not read here).
    pub fn parse(value: &str) -> Option<LedgerRecord> {
        let parts: Vec<&str> = value.split('\n').collect();
        match parts.as_slice() {
            ["sent", at, suspected, worker, tracking, ..] => Some(LedgerRecord {
                state: "sent".into(),
                at_ms: at.parse().ok()?,
                worker: worker.to_string(),
                tracking_id: Some(tracking.to_string()).filter(|t| !t.is_empty()),
                suspected: *suspected == "1",
            }),
            ["sending", until, worker, ..] => Some(LedgerRecord {
                state: "sending".into(),
                at_ms: until.parse().ok()?,
                worker: worker.to_string(),
                tracking_id: None,
                suspected: false,
            }),
            _ => None,
        }
    }
}

fn scripts() -> &'static (Script, Script) {
    static SCRIPTS: std::sync::OnceLock<(Script, Script)> = std::sync::OnceLock::new();
    SCRIPTS.get_or_init(|| {
        (
            Script::new(include_str!("track.lua")),
            Script::new(concat!(
                include_str!("prelude.lua"),
                include_str!("echo.lua")
            )),
        )
    })
}

impl Fleet {
    /// Joins the events of one payload (one script call, atomic per event).
    /// `last_try`: events whose send is not known are counted unmatched
    /// instead of deferred.
    pub async fn track(
        &self,
        events: &[Event],
        last_try: bool,
    ) -> Result<Vec<Tracked>, FleetError> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let mut inv = scripts().0.key(&self.tag);
        inv.arg(events.len())
            .arg(ms(self.config.ledger_retention))
            .arg(ms(self.config.campaign_retention))
            .arg(u8::from(last_try))
            .arg(CLOCK_SKEW_MS);
        for e in events {
            let error = e.error_message.as_deref().map(|m| {
                // Meta's text, which may quote a token (the token shape is
                // taken out, as from every error text that came from Meta)
                let m = crate::graph::auth::Redactor::default().redact(m);
                truncate(&m, MAX_ERROR).to_string()
            });
            inv.arg(e.field.status().as_str())
                .arg(if e.field.has_tracking_id() {
                    e.tracking_id.as_deref().unwrap_or("")
                } else {
                    ""
                })
                .arg(event_send_key(e))
                .arg(e.timestamp)
                .arg(dedupe_digest(e))
                .arg(e.message_id.as_deref().unwrap_or(""))
                .arg(error.unwrap_or_default());
        }
        let mut conn = self.conn.clone();
        type Row = (String, String, String, String, i64, i64, String);
        let rows: Vec<Row> = self
            .timed(RedisOp::Tracking, inv.invoke_async(&mut conn))
            .await?;
        // the tracker also notes each page's last echo (silent pages)
        let mut echoes: HashMap<&str, i64> = HashMap::new();
        for e in events.iter().filter(|e| e.field == Field::Echo) {
            if let Some(page) = &e.page_id {
                let at = echoes.entry(page).or_insert(e.timestamp);
                *at = (*at).max(e.timestamp);
            }
        }
        if !echoes.is_empty() {
            let script = Script::new(PAGE_ECHO);
            let mut inv = script.key(format!("{}:wh:page_echo", self.tag));
            for (page, at) in &echoes {
                inv.arg(*page).arg(*at);
            }
            let _: i64 = self
                .timed(RedisOp::Tracking, inv.invoke_async(&mut conn))
                .await?;
        }
        Ok(rows
            .into_iter()
            .map(
                |(joined, job_id, campaign, status, _first, changed, tracking)| Tracked {
                    joined: match joined.as_str() {
                        "matched" => Joined::Matched,
                        "defer" => Joined::Defer,
                        "unmatched" => Joined::Unmatched,
                        _ => Joined::Duplicate,
                    },
                    job_id,
                    campaign,
                    status,
                    changed: changed == 1,
                    tracking_id: Some(tracking).filter(|t| !t.is_empty()),
                },
            )
            .collect())
    }

    /// An echo of `job`'s token and message id at or after
    /// `since_ms` (Meta's clock) whose tracking id no job recorded: the
    /// evidence that an earlier call of this job was its send. Renews the
    /// job's claim (this worker's) for another `lease` in the same call.
    pub async fn echo_evidence(
        &self,
        job: &Job,
        since_ms: i64,
        lease: std::time::Duration,
    ) -> Result<Evidence, FleetError> {
        let mut inv = scripts().1.key(format!("{}:job:{}", self.tag, job.job_id));
        inv.key(format!(
            "{}:wh:sends:{}",
            self.tag,
            send_key(&job.subscription_token, &job.message_id)
        ))
        .key(format!("{}:wh:page_echo", self.tag))
        .arg(since_ms)
        .arg(&self.worker)
        .arg(ms(lease + self.config.lease_margin))
        .arg(CLOCK_SKEW_MS);
        let mut conn = self.conn.clone();
        let (t, tracked): (String, i64) = self
            .timed(RedisOp::Tracking, inv.invoke_async(&mut conn))
            .await?;
        Ok(match (t.is_empty(), tracked) {
            (false, _) => Evidence::Echo(t),
            (true, 0) => Evidence::Untracked,
            (true, _) => Evidence::NotYet,
        })
    }

    /// Notes, for each page, the first send since its last echo (`pages`:
    /// page → the first send this worker made to it since it last wrote).
    /// One script call.
    pub async fn note_page_sends(&self, pages: &HashMap<String, i64>) -> Result<(), FleetError> {
        if pages.is_empty() {
            return Ok(());
        }
        let script = Script::new(PAGE_SENT);
        let mut inv = script.key(format!("{}:wh:page_sent", self.tag));
        inv.key(format!("{}:wh:page_echo", self.tag));
        for (page, first) in pages {
            inv.arg(page).arg(*first);
        }
        let mut conn = self.conn.clone();
        let _: i64 = self
            .timed(RedisOp::Tracking, inv.invoke_async(&mut conn))
            .await?;
        Ok(())
    }

    /// Pages with a send older than `silent_page_after` at `now_ms` and no
    /// echo since ([`super::campaign::Campaigns::silent_pages`]).
    pub async fn silent_pages(&self, now_ms: i64) -> Result<Vec<SilentPage>, FleetError> {
        self.campaigns().silent_pages(now_ms).await
    }
}

/// A page with sends and no echo since.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SilentPage {
    /// The page.
    pub page_id: String,
    /// Its first send after its last echo (ms).
    pub unechoed_since_ms: i64,
    /// Its last echo (ms; 0: never).
    pub last_echo_ms: i64,
}

/// page → last echo: keeps the later of the two (KEYS[1] the hash; ARGV
/// page, ms pairs).
const PAGE_ECHO: &str = r"
for i = 1, #ARGV, 2 do
  local was = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '0') or 0
  if tonumber(ARGV[i + 1]) > was then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
";

/// page → first send since its last echo (KEYS[1] that hash, KEYS[2] the
/// last echoes; ARGV page, first send ms pairs): written when the page has
/// none, or its send was echoed since.
const PAGE_SENT: &str = r"
for i = 1, #ARGV, 2 do
  local since = tonumber(redis.call('HGET', KEYS[1], ARGV[i]) or '')
  local echo = tonumber(redis.call('HGET', KEYS[2], ARGV[i]) or '0') or 0
  if not since or since <= echo then redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
end
return 1
";

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_keys_differ_by_each_part_and_do_not_run_together() {
        let k = send_key("tok", "m");
        assert_eq!(k.len(), 32);
        assert_ne!(k, send_key("tok", "n"));
        assert_ne!(k, send_key("tok2", "m"));
        // the separator keeps "to" + "km" apart from "t" + "okm"
        assert_ne!(send_key("to", "km"), send_key("t", "okm"));
    }

    #[test]
    fn ledger_records_read_as_prelude_lua_writes_them() {
        let sent = LedgerRecord::parse("sent\n1733300000000\n0\nw-1\nmm.7\n00ff").unwrap();
        assert_eq!(
            (
                sent.state.as_str(),
                sent.at_ms,
                sent.worker.as_str(),
                sent.tracking_id.as_deref(),
                sent.suspected
            ),
            ("sent", 1733300000000, "w-1", Some("mm.7"), false)
        );
        let suspected = LedgerRecord::parse("sent\n1\n1\nw\n\n00ff").unwrap();
        assert!(suspected.suspected && suspected.tracking_id.is_none());
        let claim = LedgerRecord::parse("sending\n99\nw-2\n00ff\nc1").unwrap();
        assert_eq!((claim.state.as_str(), claim.at_ms), ("sending", 99));
        assert_eq!(LedgerRecord::parse("garbage"), None);
    }

    #[test]
    fn long_error_messages_are_cut_on_a_character_boundary() {
        let s = "é".repeat(400);
        let t = truncate(&s, 501);
        assert!(t.len() <= 501 && t.chars().all(|c| c == 'é'));
    }
}
