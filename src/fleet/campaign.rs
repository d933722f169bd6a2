//! Campaigns as the unit of operation (needs Redis): a campaign's state
//! (`active`, `paused`, `cancelled`, with who, when and why), its live
//! counters, and the audit trail of every control action.
//!
//! A job's campaign is its `campaign` label, else its `message_id`
//! ([`Job::campaign_name`](crate::job::Job::campaign_name)).
//!
//! **Where it lives.** One hash per campaign, `{<prefix>}:campaign:<name>`:
//! `state`, `state_by`, `state_at` (ms), `state_why`; the counters
//! `enqueued` (mmsend's producers), `sent`, `suppressed` (duplicates the
//! ledger acked without a call), `retried`, `held` (parked now), `dead`,
//! `dead:<class>` (`none` when no call classified it) and
//! `dead_reason:<reason>`; `first` and `last` activity (ms); `m:<minute>`,
//! the sends of each minute (the last 15 are kept) for the rate. An index
//! `{<prefix>}:campaigns` (sorted by last activity) lists them; the set
//! `{<prefix>}:campaigns:controlled` holds the paused and cancelled ones,
//! so `before.lua` looks at a campaign's state only while some campaign is
//! stopped (one `SCARD` a round otherwise). Every control action goes to
//! the stream `{<prefix>}:audit` (and the log). A campaign's keys expire
//! `campaign_retention` (default 30 days) after its last activity.
//!
//! **Counters without a round trip per job.** A worker counts in memory
//! ([`Tally`]) and writes its counts once a second in one pipelined round
//! trip, and once more when it stops. The counts are progress figures, not
//! the books: a worker killed with SIGKILL loses up to its last second of
//! counts (the results stream and the DLQ are the books).
//!
//! **Pause and cancel take effect in the claim.** `before.lua` reads the
//! state in the round trip a job makes before its call anyway: a paused
//! campaign's job is parked in `<prefix>.held` (no TTL, its story kept),
//! a cancelled one's is dead-lettered `cancelled`, both without a call. A
//! call already past its claim when the command lands still runs: the
//! command says so by waiting [`SETTLE`] before it reports.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use redis::aio::ConnectionManager;
use serde::Serialize;

use super::track::{DeliveryRecord, LedgerRecord, SilentPage};
use super::{timed, FleetError};
use crate::broker::redact_url;
use crate::classify::{Class, DeadReason};
use crate::metrics::{Metrics, RedisOp};

/// `{<prefix>}` + this + the campaign: the campaign's hash.
pub const CAMPAIGN_KEY: &str = ":campaign:";
/// `{<prefix>}` + this: the set of paused and cancelled campaigns.
pub const CONTROLLED_KEY: &str = ":campaigns:controlled";
/// `{<prefix>}` + this: every campaign, scored by its last activity (ms).
const INDEX_KEY: &str = ":campaigns";
/// `{<prefix>}` + this: the audit trail (a stream).
const AUDIT_KEY: &str = ":audit";
/// Entries the audit stream keeps, about.
const AUDIT_MAX: usize = 100_000;
/// `{<prefix>}` + this: the dead-letter console's actions, a hash of
/// action id → its record (JSON), so a restarted console lists them.
const CONSOLE_ACTIONS_KEY: &str = ":console:actions";
/// `{<prefix>}` + this: the same ids, scored by the time each was
/// requested (ms), to keep the newest and list them in order.
const CONSOLE_ACTIONS_ORDER_KEY: &str = ":console:actions:order";
/// Minutes of per-minute send counts kept for the rate.
const RATE_MINUTES: i64 = 15;
/// Minutes the rate is taken over.
const RATE_WINDOW: i64 = 5;
/// How long a control command waits for calls that were already past their
/// claim when the state changed (a claim's pace wait plus a round trip).
pub const SETTLE: Duration = Duration::from_secs(2);

/// A campaign's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    /// Jobs are sent (the state of a campaign nobody stopped).
    Active,
    /// No call; jobs are parked in the held queue until `resume`.
    Paused,
    /// Final: no call; jobs are dead-lettered `cancelled` as they come by.
    Cancelled,
}

impl CampaignState {
    /// The name in Redis, the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            CampaignState::Active => "active",
            CampaignState::Paused => "paused",
            CampaignState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for CampaignState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CampaignState {
    type Err = crate::classify::UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        crate::classify::by_name(
            "campaign state",
            &[
                CampaignState::Active,
                CampaignState::Paused,
                CampaignState::Cancelled,
            ],
            CampaignState::as_str,
            s,
        )
    }
}

/// What a worker counts for a campaign ([`Tally::count`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Sent (a success, or settled as sent on evidence).
    Sent,
    /// A duplicate the ledger acked without a call.
    Suppressed,
    /// A copy to a delay tier.
    Retried,
    /// Parked in the held queue (paused campaign).
    Held,
    /// Dead-lettered, with its class (`None`: no call classified it).
    Dead(Option<Class>, DeadReason),
}

/// A worker's counts per campaign since its last write ([`Tally::flush`]).
#[derive(Debug, Default)]
pub struct Tally {
    counts: Mutex<HashMap<String, BTreeMap<String, i64>>>,
}

impl Tally {
    /// Counts one job of `campaign`.
    pub fn count(&self, campaign: &str, what: Counted) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let fields = match counts.get_mut(campaign) {
            Some(fields) => fields,
            None => counts.entry(campaign.to_string()).or_default(),
        };
        let mut add = |field: &str| match fields.get_mut(field) {
            Some(n) => *n += 1,
            None => {
                fields.insert(field.to_string(), 1);
            }
        };
        match what {
            Counted::Sent => add("sent"),
            Counted::Suppressed => add("suppressed"),
            Counted::Retried => add("retried"),
            Counted::Held => add("held"),
            Counted::Dead(class, reason) => {
                add("dead");
                add(&format!("dead:{}", class.map_or("none", Class::as_str)));
                add(&format!("dead_reason:{reason}"));
            }
        }
    }

    /// Adds `n` to `field` of `campaign` (the producer's `enqueued`).
    pub fn add(&self, campaign: &str, field: &str, n: i64) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        *counts
            .entry(campaign.to_string())
            .or_default()
            .entry(field.to_string())
            .or_default() += n;
    }

    fn take(&self) -> HashMap<String, BTreeMap<String, i64>> {
        std::mem::take(&mut *self.counts.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts counts that could not be written back, for the next write.
    fn give_back(&self, taken: HashMap<String, BTreeMap<String, i64>>) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        for (campaign, fields) in taken {
            let mine = counts.entry(campaign).or_default();
            for (field, n) in fields {
                *mine.entry(field).or_default() += n;
            }
        }
    }

    /// Writes the counts so far to Redis in one pipelined round trip; on
    /// failure they are kept for the next write.
    pub async fn flush(&self, campaigns: &Campaigns) -> Result<(), FleetError> {
        let taken = self.take();
        if taken.is_empty() {
            return Ok(());
        }
        let now = Utc::now().timestamp_millis();
        let minute = now / 60_000;
        let mut pipe = redis::pipe();
        for (campaign, fields) in &taken {
            let key = campaigns.key(campaign);
            for (field, n) in fields {
                pipe.hincr(&key, field, *n).ignore();
            }
            if let Some(sent) = fields.get("sent") {
                pipe.hincr(&key, format!("m:{minute}"), *sent).ignore();
                let old: Vec<String> = (RATE_MINUTES..RATE_MINUTES * 2)
                    .map(|back| format!("m:{}", minute - back))
                    .collect();
                pipe.hdel(&key, old).ignore();
            }
            campaigns.touch(&mut pipe, campaign, now);
        }
        match campaigns.run(RedisOp::Campaigns, pipe).await {
            Ok(()) => Ok(()),
            Err(e) => {
                self.give_back(taken);
                Err(e)
            }
        }
    }
}

/// A campaign as `mmsend campaign show` and the console show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CampaignView {
    /// Its name.
    pub campaign: String,
    /// Its state.
    pub state: CampaignState,
    /// Who set the state (`cli:<user>`, `console:<identity>`).
    pub state_by: Option<String>,
    /// When the state was set.
    pub state_at: Option<DateTime<Utc>>,
    /// Why (`--reason`).
    pub state_why: Option<String>,
    /// Jobs published by mmsend's producers (`None`: another producer).
    pub enqueued: Option<u64>,
    /// Jobs sent (a success, or settled as sent on evidence).
    pub sent: u64,
    /// Duplicates the ledger acked without a call.
    pub suppressed: u64,
    /// Copies sent to a delay tier (one job may retry many times).
    pub retried: u64,
    /// Parked now (paused).
    pub held: u64,
    /// Jobs dead-lettered.
    pub dead: u64,
    /// Dead letters by class (`none`: no call classified them).
    pub dead_by_class: BTreeMap<String, u64>,
    /// Dead letters by reason.
    pub dead_by_reason: BTreeMap<String, u64>,
    /// Sends per minute over the last five minutes (or since the first
    /// activity, if later).
    pub rate_per_min: f64,
    /// Seconds until `enqueued` jobs are settled at that rate (`None`
    /// without `enqueued`, a rate, or while stopped).
    pub eta_seconds: Option<u64>,
    /// When a worker or producer first counted a job of it.
    pub first_activity: Option<DateTime<Utc>>,
    /// When one last did (or its state last changed).
    pub last_activity: Option<DateTime<Utc>>,
    /// What Meta's webhooks said of its sends (the delivery tracker).
    #[serde(flatten)]
    pub funnel: Funnel,
}

/// A campaign's delivery funnel, from Meta's webhooks ([`super::track`]):
/// sends counted once per status each (a read whose delivery event never
/// came counts in `read` only), and the events that matched no send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Funnel {
    /// Sends Meta echoed (sent).
    pub echoed: u64,
    /// Sends delivered.
    pub delivered: u64,
    /// Sends read.
    pub read: u64,
    /// Sends clicked (once each, however many clicks).
    pub clicked: u64,
    /// Sends whose delivery failed.
    pub delivery_failed: u64,
    /// Events of this campaign's message ids that matched no send.
    pub unmatched: u64,
}

impl Funnel {
    /// Its stages as (name, count), in funnel order (`unmatched` last).
    pub fn stages(&self) -> [(&'static str, u64); 6] {
        [
            ("echoed", self.echoed),
            ("delivered", self.delivered),
            ("read", self.read),
            ("clicked", self.clicked),
            ("delivery_failed", self.delivery_failed),
            ("unmatched", self.unmatched),
        ]
    }

    /// Table rows: stage, count, share of `sent` (`-` for unmatched events,
    /// which are not sends, and without sends).
    pub fn rows(&self, sent: u64) -> Vec<Vec<String>> {
        self.stages()
            .into_iter()
            .map(|(name, n)| {
                let share = match (name, sent) {
                    ("unmatched", _) | (_, 0) => "-".to_string(),
                    _ => format!("{:.1} %", n as f64 * 100.0 / sent as f64),
                };
                vec![name.to_string(), n.to_string(), share]
            })
            .collect()
    }

    /// Whether any event was counted.
    pub fn any(&self) -> bool {
        *self != Funnel::default()
    }
}

impl CampaignView {
    /// Reads a campaign's hash (`HGETALL`) as of `now`.
    pub fn from_hash(campaign: &str, hash: &HashMap<String, String>, now: DateTime<Utc>) -> Self {
        let num = |f: &str| {
            hash.get(f)
                .and_then(|v| v.parse::<i64>().ok())
                .map_or(0, |n| n.max(0) as u64)
        };
        let time = |f: &str| {
            hash.get(f)
                .and_then(|v| v.parse::<i64>().ok())
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        };
        let by_prefix = |prefix: &str| {
            hash.keys()
                .filter_map(|k| {
                    k.strip_prefix(prefix)
                        .map(|rest| (rest.to_string(), num(k)))
                })
                .filter(|(_, n)| *n > 0)
                .collect::<BTreeMap<_, _>>()
        };
        let state = hash
            .get("state")
            .and_then(|s| s.parse().ok())
            .unwrap_or(CampaignState::Active);
        let first_activity = time("first");
        let now_ms = now.timestamp_millis();
        let minute = now_ms / 60_000;
        let recent: u64 = (0..=RATE_WINDOW)
            .map(|back| num(&format!("m:{}", minute - back)))
            .sum();
        // the window: five whole minutes and the part of this one, or less
        // since the campaign's first activity
        let window_min = {
            let full = RATE_WINDOW as f64 + (now_ms % 60_000) as f64 / 60_000.0;
            let since =
                first_activity.map_or(full, |f| (now - f).num_milliseconds() as f64 / 60_000.0);
            // at least a minute: a campaign's first second is no rate
            full.min(since).max(1.0)
        };
        let rate_per_min = recent as f64 / window_min;
        let enqueued = hash.contains_key("enqueued").then(|| num("enqueued"));
        let (sent, dead) = (num("sent"), num("dead"));
        let eta_seconds = match (state, enqueued) {
            (CampaignState::Active, Some(total)) if rate_per_min > 0.0 => {
                let left = total.saturating_sub(sent + dead);
                Some((left as f64 * 60.0 / rate_per_min).round() as u64)
            }
            _ => None,
        };
        CampaignView {
            campaign: campaign.to_string(),
            state,
            state_by: hash.get("state_by").cloned(),
            state_at: time("state_at"),
            state_why: hash.get("state_why").cloned().filter(|w| !w.is_empty()),
            enqueued,
            sent,
            suppressed: num("suppressed"),
            retried: num("retried"),
            held: num("held"),
            dead,
            dead_by_class: by_prefix("dead:"),
            dead_by_reason: by_prefix("dead_reason:"),
            rate_per_min: (rate_per_min * 10.0).round() / 10.0,
            eta_seconds,
            first_activity,
            last_activity: time("last"),
            funnel: Funnel {
                echoed: num("echoed"),
                delivered: num("delivered"),
                read: num("read"),
                clicked: num("clicked"),
                delivery_failed: num("delivery_failed"),
                unmatched: num("unmatched"),
            },
        }
    }

    /// Whether the counts say every enqueued job is settled.
    pub fn done(&self) -> bool {
        self.enqueued
            .is_some_and(|n| n > 0 && self.sent + self.dead >= n && self.held == 0)
    }
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    /// When (the stream entry's time).
    pub at: DateTime<Utc>,
    /// `cli:<user>` or `console:<identity>`.
    pub who: String,
    /// `pause`, `resume`, `cancel`, `replay`, `purge`.
    pub action: String,
    /// The campaign acted on, if the action names one.
    pub campaign: Option<String>,
    /// What was done, in words (the filter, the reason).
    pub what: String,
    /// How many jobs or letters the action moved.
    pub count: Option<u64>,
}

/// A page whose token Meta rejected: its auth gate holds its jobs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RejectedPage {
    /// The page.
    pub page_id: String,
    /// The error code that closed the gate (e.g. `190`).
    pub code: String,
    /// When Meta rejected the token (the gate closed).
    pub rejected_at: Option<DateTime<Utc>>,
    /// When its probe may try the token again.
    pub held_until: Option<DateTime<Utc>>,
}

/// Who runs a command line: `cli:<user>` from `USER` or `LOGNAME`, else
/// `cli:uid-<uid>` (a container often sets neither).
pub fn cli_user() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.trim().is_empty());
    match user {
        Some(u) => format!("cli:{u}"),
        None => {
            #[cfg(unix)]
            let uid = {
                use std::os::unix::fs::MetadataExt as _;
                std::fs::metadata("/proc/self")
                    .map(|m| m.uid().to_string())
                    .ok()
            };
            #[cfg(not(unix))]
            let uid: Option<String> = None;
            format!("cli:uid-{}", uid.unwrap_or_else(|| "unknown".into()))
        }
    }
}

/// The campaign side of Redis, for the CLI, the console and the workers'
/// counter writes.
#[derive(Clone)]
pub struct Campaigns {
    conn: ConnectionManager,
    tag: String,
    retention: Duration,
    op_timeout: Duration,
    /// `silent_page_after` ([`Campaigns::silent_pages`]).
    silent_after: Duration,
    metrics: std::sync::Arc<Metrics>,
}

impl std::fmt::Debug for Campaigns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Campaigns").field("tag", &self.tag).finish()
    }
}

impl Campaigns {
    /// Over an existing connection (a worker's fleet).
    pub(crate) fn over(
        conn: ConnectionManager,
        prefix: &str,
        config: &super::FleetConfig,
        metrics: std::sync::Arc<Metrics>,
    ) -> Campaigns {
        Campaigns {
            conn,
            tag: format!("{{{prefix}}}"),
            retention: config.campaign_retention,
            op_timeout: config.op_timeout.max(Duration::from_secs(2)),
            silent_after: config.silent_page_after,
            metrics,
        }
    }

    /// A client that connects on first use and again after a failure
    /// (for a server: the console starts while Redis is down). Only a
    /// malformed URL fails here.
    pub fn lazy(config: &super::FleetConfig, prefix: &str) -> Result<Campaigns, FleetError> {
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(Duration::from_secs(2)))
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_number_of_retries(1);
        let conn = super::lazy_connection(config, manager)?;
        Ok(Campaigns::over(conn, prefix, config, Metrics::new()))
    }

    /// Connects for a command: fails with a clear error when Redis does not
    /// answer.
    pub async fn connect(
        config: &super::FleetConfig,
        prefix: &str,
    ) -> Result<Campaigns, FleetError> {
        let client = super::client(config)?;
        let conn = tokio::time::timeout(Duration::from_secs(5), ConnectionManager::new(client))
            .await
            .map_err(|_| FleetError::Command {
                op: "connect",
                message: format!(
                    "Redis at {} did not answer within 5 s; is it running?",
                    redact_url(&config.url)
                ),
            })?
            .map_err(|e| FleetError::Command {
                op: "connect",
                message: redact_url(&e.to_string()),
            })?;
        Ok(Campaigns::over(conn, prefix, config, Metrics::new()))
    }

    fn key(&self, campaign: &str) -> String {
        format!("{}{CAMPAIGN_KEY}{campaign}", self.tag)
    }

    /// What Redis holds of one job: its send-ledger record and its delivery
    /// record (the tracker's), each `None` when there is none.
    pub async fn job(
        &self,
        job_id: &str,
    ) -> Result<(Option<LedgerRecord>, Option<DeliveryRecord>), FleetError> {
        let mut conn = self.conn.clone();
        let (ledger, delivery): (Option<String>, HashMap<String, String>) = timed(
            &self.metrics,
            RedisOp::Tracking,
            self.op_timeout,
            redis::pipe()
                .get(format!("{}:job:{job_id}", self.tag))
                .hgetall(format!("{}:dlv:{job_id}", self.tag))
                .query_async(&mut conn),
        )
        .await?;
        Ok((
            ledger.as_deref().and_then(LedgerRecord::parse),
            DeliveryRecord::from_hash(&delivery),
        ))
    }

    /// Pages with a send older than `silent_page_after` at `now_ms` and no
    /// echo since (their webhook subscription was probably dropped; see
    /// [`super::track`]), by page id; none while the fleet never saw an
    /// echo of any page (webhooks not set up).
    pub async fn silent_pages(&self, now_ms: i64) -> Result<Vec<SilentPage>, FleetError> {
        let mut conn = self.conn.clone();
        let (sent, echo): (HashMap<String, i64>, HashMap<String, i64>) = timed(
            &self.metrics,
            RedisOp::Tracking,
            self.op_timeout,
            redis::pipe()
                .hgetall(format!("{}:wh:page_sent", self.tag))
                .hgetall(format!("{}:wh:page_echo", self.tag))
                .query_async(&mut conn),
        )
        .await?;
        // a fleet that never saw an echo does not track webhooks (no
        // receiver subscribed): its pages are not silent, just untracked
        if echo.is_empty() {
            return Ok(Vec::new());
        }
        let after = i64::try_from(self.silent_after.as_millis()).unwrap_or(i64::MAX);
        let mut out: Vec<SilentPage> = sent
            .into_iter()
            .filter_map(|(page, since)| {
                let last_echo = echo.get(&page).copied().unwrap_or(0);
                (since > last_echo && now_ms.saturating_sub(since) > after).then_some(SilentPage {
                    page_id: page,
                    unechoed_since_ms: since,
                    last_echo_ms: last_echo,
                })
            })
            .collect();
        out.sort_by(|a, b| a.page_id.cmp(&b.page_id));
        Ok(out)
    }

    fn index(&self) -> String {
        format!("{}{INDEX_KEY}", self.tag)
    }

    fn controlled(&self) -> String {
        format!("{}{CONTROLLED_KEY}", self.tag)
    }

    fn audit_key(&self) -> String {
        format!("{}{AUDIT_KEY}", self.tag)
    }

    /// Marks activity on `campaign` at `now_ms` in `pipe`: last and first
    /// activity, the index, the retention.
    fn touch(&self, pipe: &mut redis::Pipeline, campaign: &str, now_ms: i64) {
        let key = self.key(campaign);
        pipe.hset(&key, "last", now_ms)
            .ignore()
            .hset_nx(&key, "first", now_ms)
            .ignore()
            .pexpire(&key, self.retention.as_millis() as i64)
            .ignore()
            .zadd(self.index(), campaign, now_ms)
            .ignore()
            .zrembyscore(
                self.index(),
                "-inf",
                now_ms - self.retention.as_millis() as i64,
            )
            .ignore();
    }

    async fn run(&self, op: RedisOp, pipe: redis::Pipeline) -> Result<(), FleetError> {
        let mut conn = self.conn.clone();
        timed(&self.metrics, op, self.op_timeout, async move {
            pipe.query_async::<()>(&mut conn).await
        })
        .await
    }

    /// Every member of the sorted set `key`, in the order of `range`
    /// (`ZRANGE` or `ZREVRANGE`).
    async fn members(&self, range: &str, key: &str) -> Result<Vec<String>, FleetError> {
        self.range(range, key, 0, -1).await
    }

    /// `range` (`ZRANGE`, `ZREVRANGE`) of `key` from `start` to `stop`.
    async fn range(
        &self,
        range: &str,
        key: &str,
        start: i64,
        stop: i64,
    ) -> Result<Vec<String>, FleetError> {
        let mut conn = self.conn.clone();
        timed(&self.metrics, RedisOp::Campaigns, self.op_timeout, async {
            redis::cmd(range)
                .arg(key)
                .arg(start)
                .arg(stop)
                .query_async(&mut conn)
                .await
        })
        .await
    }

    /// Adds published jobs to campaigns' `enqueued` (mmsend's producers).
    pub async fn count_enqueued(&self, counts: &BTreeMap<String, u64>) -> Result<(), FleetError> {
        let tally = Tally::default();
        for (campaign, n) in counts {
            tally.add(campaign, "enqueued", i64::try_from(*n).unwrap_or(i64::MAX));
        }
        tally.flush(self).await
    }

    /// Adds `n` (may be negative) to `campaign`'s held count.
    pub async fn add_held(&self, campaign: &str, n: i64) -> Result<(), FleetError> {
        let tally = Tally::default();
        tally.add(campaign, "held", n);
        tally.flush(self).await
    }

    /// Every campaign with activity within the retention, most recent
    /// first.
    pub async fn list(&self) -> Result<Vec<CampaignView>, FleetError> {
        let mut conn = self.conn.clone();
        let now = Utc::now();
        let names = self.members("ZREVRANGE", &self.index()).await?;
        let mut pipe = redis::pipe();
        for name in &names {
            pipe.hgetall(self.key(name));
        }
        let hashes: Vec<HashMap<String, String>> = if names.is_empty() {
            Vec::new()
        } else {
            timed(&self.metrics, RedisOp::Campaigns, self.op_timeout, async {
                pipe.query_async(&mut conn).await
            })
            .await?
        };
        Ok(names
            .iter()
            .zip(hashes)
            .filter(|(_, h)| !h.is_empty())
            .map(|(name, h)| CampaignView::from_hash(name, &h, now))
            .collect())
    }

    /// One campaign; `None` when Redis knows nothing of it.
    pub async fn show(&self, campaign: &str) -> Result<Option<CampaignView>, FleetError> {
        let mut conn = self.conn.clone();
        let key = self.key(campaign);
        let hash: HashMap<String, String> =
            timed(&self.metrics, RedisOp::Campaigns, self.op_timeout, async {
                redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await
            })
            .await?;
        Ok((!hash.is_empty()).then(|| CampaignView::from_hash(campaign, &hash, Utc::now())))
    }

    /// Sets `campaign`'s state; answers the state it had. `cancelled` is
    /// final: a later pause is refused by the caller, a resume is allowed
    /// (the undo of a mistaken cancel).
    pub async fn set_state(
        &self,
        campaign: &str,
        state: CampaignState,
        who: &str,
        why: &str,
    ) -> Result<CampaignState, FleetError> {
        let before = self
            .show(campaign)
            .await?
            .map_or(CampaignState::Active, |v| v.state);
        let now = Utc::now().timestamp_millis();
        let key = self.key(campaign);
        let mut pipe = redis::pipe();
        pipe.atomic()
            .hset_multiple(
                &key,
                &[
                    ("state", state.as_str().to_string()),
                    ("state_by", who.to_string()),
                    ("state_at", now.to_string()),
                    ("state_why", why.to_string()),
                ],
            )
            .ignore();
        match state {
            CampaignState::Active => pipe.srem(self.controlled(), &key).ignore(),
            _ => pipe.sadd(self.controlled(), &key).ignore(),
        };
        self.touch(&mut pipe, campaign, now);
        self.run(RedisOp::Campaigns, pipe).await?;
        Ok(before)
    }

    /// The pages whose token Meta rejected (an open `auth` gate of page
    /// scope), newest first.
    pub async fn rejected_pages(&self) -> Result<Vec<RejectedPage>, FleetError> {
        let mut conn = self.conn.clone();
        let keys = self
            .members("ZRANGE", &format!("{}:gates", self.tag))
            .await?;
        let marker = format!("{}:gate:page:", self.tag);
        let pages: Vec<&String> = keys.iter().filter(|k| k.starts_with(&marker)).collect();
        if pages.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for key in &pages {
            pipe.cmd("HMGET")
                .arg(key.as_str())
                .arg("class")
                .arg("code")
                .arg("until")
                .arg("at");
        }
        let fields: Vec<Vec<Option<String>>> =
            timed(&self.metrics, RedisOp::Campaigns, self.op_timeout, async {
                pipe.query_async(&mut conn).await
            })
            .await?;
        let time = |v: &Option<String>| {
            v.as_deref()
                .and_then(|ms| ms.parse::<i64>().ok())
                .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
        };
        let mut out: Vec<RejectedPage> = pages
            .iter()
            .zip(fields)
            .filter(|(_, f)| f.first().and_then(|c| c.as_deref()) == Some(Class::Auth.as_str()))
            .map(|(key, f)| RejectedPage {
                page_id: key[marker.len()..].to_string(),
                code: f.get(1).cloned().flatten().unwrap_or_default(),
                held_until: f.get(2).and_then(time),
                rejected_at: f.get(3).and_then(time),
            })
            .collect();
        out.sort_by_key(|p| std::cmp::Reverse(p.rejected_at));
        Ok(out)
    }

    /// Records a control action in the audit stream (and the log).
    pub async fn audit(
        &self,
        who: &str,
        action: &str,
        campaign: Option<&str>,
        what: &str,
        count: Option<u64>,
    ) -> Result<(), FleetError> {
        tracing::info!(
            who,
            action,
            campaign = campaign.unwrap_or(""),
            what,
            count = count.map_or(-1, |c| c as i64),
            "audit"
        );
        let mut fields = vec![
            ("who", who.to_string()),
            ("action", action.to_string()),
            ("what", what.to_string()),
        ];
        if let Some(c) = campaign {
            fields.push(("campaign", c.to_string()));
        }
        if let Some(n) = count {
            fields.push(("count", n.to_string()));
        }
        let mut pipe = redis::pipe();
        pipe.xadd_maxlen(
            self.audit_key(),
            redis::streams::StreamMaxlen::Approx(AUDIT_MAX),
            "*",
            &fields,
        )
        .ignore();
        self.run(RedisOp::Campaigns, pipe).await
    }

    /// The audit trail, newest first, at most `limit` entries (of
    /// `campaign` only, when given).
    pub async fn trail(
        &self,
        campaign: Option<&str>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, FleetError> {
        let mut conn = self.conn.clone();
        let key = self.audit_key();
        let reply: redis::streams::StreamRangeReply =
            timed(&self.metrics, RedisOp::Campaigns, self.op_timeout, async {
                redis::cmd("XREVRANGE")
                    .arg(&key)
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(AUDIT_MAX)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        let text = |id: &redis::streams::StreamId, f: &str| -> Option<String> {
            id.map
                .get(f)
                .and_then(|v| redis::from_redis_value::<String>(v.clone()).ok())
        };
        Ok(reply
            .ids
            .iter()
            .filter(|id| campaign.is_none() || text(id, "campaign").as_deref() == campaign)
            .take(limit)
            .map(|id| AuditEntry {
                at: id
                    .id
                    .split('-')
                    .next()
                    .and_then(|ms| ms.parse::<i64>().ok())
                    .and_then(|ms| Utc.timestamp_millis_opt(ms).single())
                    .unwrap_or_default(),
                who: text(id, "who").unwrap_or_default(),
                action: text(id, "action").unwrap_or_default(),
                campaign: text(id, "campaign"),
                what: text(id, "what").unwrap_or_default(),
                count: text(id, "count").and_then(|c| c.parse().ok()),
            })
            .collect())
    }
}

/// The dead-letter console's action records (`mmsend console`): kept so
/// that a restarted console lists its earlier actions.
impl Campaigns {
    /// Keeps the record of console action `id` (requested at `at_ms`),
    /// replacing an older record of it; only the newest `keep` are kept.
    /// The keys expire `campaign_retention` after the last write.
    pub async fn save_console_action(
        &self,
        id: &str,
        at_ms: i64,
        record: &str,
        keep: usize,
    ) -> Result<(), FleetError> {
        let records = format!("{}{CONSOLE_ACTIONS_KEY}", self.tag);
        let order = format!("{}{CONSOLE_ACTIONS_ORDER_KEY}", self.tag);
        let ttl = self.retention.as_secs().max(1) as i64;
        let mut pipe = redis::pipe();
        pipe.hset(&records, id, record)
            .ignore()
            .zadd(&order, id, at_ms)
            .ignore()
            .expire(&records, ttl)
            .ignore()
            .expire(&order, ttl)
            .ignore();
        self.run(RedisOp::Campaigns, pipe).await?;
        // the oldest beyond `keep`
        let old = self.range("ZRANGE", &order, 0, -(keep as i64) - 1).await?;
        if old.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        pipe.zrem(&order, &old)
            .ignore()
            .hdel(&records, &old)
            .ignore();
        self.run(RedisOp::Campaigns, pipe).await
    }

    /// The console's action records, newest first, at most `limit`.
    pub async fn console_actions(&self, limit: usize) -> Result<Vec<String>, FleetError> {
        let records = format!("{}{CONSOLE_ACTIONS_KEY}", self.tag);
        let order = format!("{}{CONSOLE_ACTIONS_ORDER_KEY}", self.tag);
        let Some(last) = limit.checked_sub(1) else {
            return Ok(Vec::new());
        };
        let ids = self.range("ZREVRANGE", &order, 0, last as i64).await?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut conn = self.conn.clone();
        let found: Vec<Option<String>> =
            timed(&self.metrics, RedisOp::Campaigns, self.op_timeout, async {
                redis::cmd("HMGET")
                    .arg(&records)
                    .arg(&ids)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(found.into_iter().flatten().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_campaigns_rate_and_eta_come_from_its_minutes() {
        let now = Utc
            .timestamp_millis_opt(600 * 60_000 + 30_000)
            .single()
            .unwrap();
        let mut h = HashMap::new();
        for (k, v) in [
            ("enqueued", "1000"),
            ("sent", "400"),
            ("dead", "100"),
            ("dead:terminal", "60"),
            ("dead:none", "40"),
            ("dead_reason:terminal", "60"),
            ("dead_reason:cancelled", "40"),
            ("m:600", "30"),
            ("m:599", "60"),
            ("m:598", "60"),
            ("m:597", "60"),
            ("m:596", "60"),
            ("m:595", "60"),
            ("m:580", "999"),
            ("first", &(590 * 60_000i64).to_string()),
        ] {
            h.insert(k.to_string(), v.to_string());
        }
        let v = CampaignView::from_hash("bf", &h, now);
        // 330 sends over 5.5 minutes
        assert_eq!(v.rate_per_min, 60.0);
        // 500 left at 60/min
        assert_eq!(v.eta_seconds, Some(500));
        assert_eq!(v.state, CampaignState::Active);
        assert_eq!(v.dead_by_class.get("terminal"), Some(&60));
        assert_eq!(v.dead_by_reason.get("cancelled"), Some(&40));
        assert!(!v.done());

        h.insert("state".into(), "paused".into());
        let paused = CampaignView::from_hash("bf", &h, now);
        assert_eq!(paused.eta_seconds, None, "no ETA while stopped");
        assert!(h.remove("enqueued").is_some());
        assert_eq!(CampaignView::from_hash("bf", &h, now).enqueued, None);
    }

    #[test]
    fn a_tally_counts_per_campaign_and_class() {
        let t = Tally::default();
        t.count("a", Counted::Sent);
        t.count("a", Counted::Sent);
        t.count(
            "a",
            Counted::Dead(Some(Class::Region), DeadReason::Terminal),
        );
        t.count("b", Counted::Dead(None, DeadReason::Cancelled));
        let taken = t.take();
        assert_eq!(taken["a"]["sent"], 2);
        assert_eq!(taken["a"]["dead:region"], 1);
        assert_eq!(taken["b"]["dead:none"], 1);
        assert_eq!(taken["b"]["dead_reason:cancelled"], 1);
        t.give_back(taken);
        t.count("a", Counted::Sent);
        assert_eq!(t.take()["a"]["sent"], 3, "counts given back add up");
    }
}
