//! What a fleet of workers shares through Redis (`MMSEND_REDIS_URL`): the
//! **send ledger**, **fleet-wide pacing** and **shared gates**.
//!
//! Each job takes part in at most two round trips, each one atomic Lua
//! script; the jobs that ask or tell while the previous round trip is in
//! flight share the next one (group commit, `Batcher`: both scripts'
//! calls pipelined in one write when a round has jobs of both), so under
//! load a round trip carries many jobs:
//!
//! - [`Fleet::before`] (`before.lua`), before a call: is the job already
//!   sent (ack it without a call: a suppressed duplicate)? in flight under
//!   another worker's live lease (wait, look again later)? held by a closed
//!   gate of its app, ad account, page or campaign (no claim, no call; once
//!   a gate's time is up, one worker at a time probes it, under a probe
//!   lock with a lease)? Otherwise it reserves the job's slot in its page's
//!   GCRA (and the fleet's, with global pacing), and claims the job as
//!   `sending` by this worker with a lease covering that wait plus the
//!   request timeout. A claim over an expired lease means the holder died
//!   mid-call: the answer says the earlier call may have been the send.
//! - [`Fleet::after`] (`after.lua`), after the call: `sent` with the tracking
//!   id and time (kept for the ledger retention, 14 days by default,
//!   counted from the claim, which set the key's expiry: the send is
//!   recorded over the claim, keeping it; a lost key, or an earlier
//!   build's claim, is written again with the retention), or the claim
//!   released (a retry or a dead letter, so a retry or a replay can send);
//!   a success opens the job's gates, a failure closes the scope
//!   its verdict holds, for the whole fleet; a page rate limit halves the
//!   page's rate for everyone for a while.
//!
//! A job's record is one string (`sending`, its lease and worker; then
//! `sent`, the time, whether it was suspected, the worker and the tracking
//! id; layout in `prelude.lua`), so the common ledger work is one `SET`
//! per step: the claim is `SET … NX GET PX` (written only if there is no
//! record, and the record read in the same command), the send `SET … XX
//! KEEPTTL`. Builds before 0.2 wrote a hash of the same fields (four
//! commands per job); those records are still read, and replaced by a
//! string when written, but an earlier build cannot read a string record
//! (its script fails, and it falls back to its fail mode): see docs/src/fleet.md
//! on upgrading a fleet.
//!
//! Keys live under the topology prefix with one hash tag, `{<prefix>}`, so
//! every script touches one Redis Cluster slot: the layout is
//! Cluster-safe, at the price that one prefix is served by one shard
//! (`push_scope_keys`). Redis's clock (`TIME`) is the only clock the scripts use, so
//! workers' clocks never disagree about a lease.
//!
//! A claim Redis makes after the worker gave up on it would be an orphan:
//! a Redis paused (`CLIENT PAUSE`), frozen or stalled keeps the worker's
//! `before.lua` queued, the worker times out and sends the job back to
//! wait without a call, and Redis later runs the script and writes a claim
//! nobody holds. Its lease runs out, and the job's next claim is told "an
//! earlier call may have been the send": a 2300035 answer (another
//! campaign's send to the recipient) then settles a never-called job as
//! sent. So each round of `before.lua` carries a deadline in Redis's clock
//! (the worker's own clock plus the offset it measured with `TIME`,
//! [`Fleet::measure_clock`]): half the op timeout after it was sent, so
//! the answer still has the other half to arrive. A round Redis runs later
//! writes nothing and answers `late`. Until the offset is known (the first
//! housekeeping after start) rounds go without a deadline.
//!
//! Redis trouble is handled by the worker (`worker::coordination`), not
//! here: these calls return [`FleetError`] and the worker falls back as
//! configured ([`FailMode`]).

pub mod campaign;
pub mod track;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::aio::ConnectionManager;
use redis::{AsyncCommands, ErrorKind, Script, ServerErrorKind};
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot};

use crate::broker::redact_url;
use crate::classify::{Class, CodeLabel, ScopeKind};
use crate::config::RedisSection;
use crate::job::Job;
use crate::metrics::{Metrics, RedisOp};
use crate::worker::gates::{Held, Scope};

/// What the worker does when Redis cannot be reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FailMode {
    /// Per-process pacing and gates and no ledger, loudly, until Redis is
    /// back (a crash in that time can repeat in-flight sends, as without
    /// Redis).
    Local,
    /// Jobs wait in a delay tier until Redis is back: no send without the
    /// ledger.
    Hold,
}

impl FailMode {
    /// The name in config and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            FailMode::Local => "local",
            FailMode::Hold => "hold",
        }
    }
}

/// How the fleet layer is set up.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// `redis://[:password@]host:port/db` or `rediss://…` (TLS).
    pub url: String,
    /// What to do while Redis is unreachable.
    pub fail_mode: FailMode,
    /// How long a `sent` record is kept: at least as long as a job can live
    /// (its delay tiers and retries) plus a replay window.
    pub ledger_retention: Duration,
    /// Added to the request timeout for a claim's lease.
    pub lease_margin: Duration,
    /// Longest a Redis command may take before it counts as a failure.
    pub op_timeout: Duration,
    /// How long a page's lowered rate (after a page rate limit) lasts.
    pub lowered_rate_for: Duration,
    /// Start even when Redis may evict keys (a memory limit with any
    /// `maxmemory-policy` but `noeviction`): the worker then only warns.
    pub allow_eviction: bool,
    /// How long a campaign's state and counters are kept after its last
    /// activity ([`campaign`]).
    pub campaign_retention: Duration,
    /// How long a maybe-sent job waits for its echo ([`track`]).
    pub echo_window: Duration,
    /// Sends without an echo for this long make a page silent ([`track`]).
    pub silent_page_after: Duration,
    /// Whether sends are indexed for the delivery tracker ([`track`]).
    pub delivery_tracking: crate::config::DeliveryTracking,
}

impl FleetConfig {
    /// The defaults around a URL.
    pub fn new(url: &str) -> FleetConfig {
        FleetConfig::from_section(url, FailMode::Local, &RedisSection::default())
    }

    /// A URL, a fail mode and the config file's `[redis]` section.
    pub fn from_section(url: &str, fail_mode: FailMode, r: &RedisSection) -> FleetConfig {
        FleetConfig {
            url: url.to_string(),
            fail_mode,
            ledger_retention: r.ledger_retention,
            lease_margin: r.lease_margin,
            op_timeout: r.op_timeout,
            lowered_rate_for: r.lowered_rate_for,
            allow_eviction: r.allow_eviction,
            campaign_retention: r.campaign_retention,
            echo_window: r.echo_window,
            silent_page_after: r.silent_page_after,
            delivery_tracking: r.delivery_tracking,
        }
    }
}

/// What Redis does when it reaches its memory limit (`INFO memory`).
///
/// Every key of the fleet carries a time to live (ledger records, claims,
/// gates), so every policy but `noeviction` may evict them — `volatile-*`
/// as much as `allkeys-*`: an evicted `sent` record lets a redelivered or
/// republished job be sent again, an evicted claim lets two workers call at
/// once. Managed Redis services often default to an evicting policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Eviction {
    /// `maxmemory-policy`.
    pub policy: String,
    /// `maxmemory` in bytes; 0 = no limit (nothing is ever evicted).
    pub maxmemory: u64,
}

impl Eviction {
    /// Whether Redis may evict the fleet's keys.
    pub fn may_evict(&self) -> bool {
        self.maxmemory > 0 && self.policy != "noeviction"
    }

    /// Reads `maxmemory` and `maxmemory_policy` from an `INFO memory` answer
    /// (`INFO` works where `CONFIG` is renamed or refused, as on managed
    /// services).
    pub fn from_info(info: &str) -> Option<Eviction> {
        let field = |name: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .map(str::trim)
        };
        Some(Eviction {
            policy: field("maxmemory_policy")?.to_string(),
            maxmemory: field("maxmemory")?.parse().ok()?,
        })
    }
}

/// A Redis problem. Its message never contains a password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FleetError {
    /// The URL cannot be used.
    #[error("MMSEND_REDIS_URL {url} is not a usable Redis URL ({reason}); write redis://[:password@]host:6379/0 or rediss:// for TLS")]
    Url {
        /// The URL, password redacted.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The worker id cannot own a ledger claim.
    #[error("worker id {id:?} cannot own send-ledger claims: it is empty or has control characters (the ledger's records split fields at line breaks); set MMSEND_WORKER_ID (--worker-id) to a printable name, such as host:pid")]
    WorkerId {
        /// The id as given.
        id: String,
    },
    /// A command failed or timed out.
    #[error("Redis {op} failed: {message}")]
    Command {
        /// Which call.
        op: &'static str,
        /// Redis's or the client's message.
        message: String,
    },
    /// Redis answered something the scripts never return (another
    /// program's keys under our prefix?).
    #[error("Redis {op} answered {answer:?}, which mmsend does not understand")]
    Answer {
        /// Which call.
        op: &'static str,
        /// The answer.
        answer: String,
    },
}

/// One job's part of a batched script call, written back to back into one
/// buffer (a job's call costs two small allocations, not one per key and
/// argument): first what it may share with other jobs of the call (its 12
/// scope keys, then the script's shared arguments), then its own ledger key
/// and its own arguments. Jobs whose shared items are equal (same app, ad
/// account, page and campaign, same settings) send them once per call: see
/// [`Layout`].
#[derive(Debug, Default)]
struct Part {
    bytes: Vec<u8>,
    /// Where each item ends in `bytes`.
    ends: Vec<usize>,
}

impl Part {
    fn new() -> Part {
        Part {
            bytes: Vec::with_capacity(640),
            ends: Vec::with_capacity(SCOPE_KEYS + 16),
        }
    }

    /// One integer item (milliseconds, flags): written by `itoa`, which is
    /// what `Display` costs most of a part otherwise.
    fn int(&mut self, item: impl itoa::Integer) -> &mut Part {
        self.bytes
            .extend_from_slice(itoa::Buffer::new().format(item).as_bytes());
        self.ends.push(self.bytes.len());
        self
    }

    /// One item written with `Display` (a rate).
    fn push(&mut self, item: impl std::fmt::Display) -> &mut Part {
        use std::io::Write as _;
        // writing into a Vec cannot fail
        let _ = write!(self.bytes, "{item}");
        self.ends.push(self.bytes.len());
        self
    }

    /// One item made of `pieces` back to back (keys, ids): copied, not
    /// formatted, which is most of what building a job's part costs.
    fn concat(&mut self, pieces: &[&str]) -> &mut Part {
        for piece in pieces {
            self.bytes.extend_from_slice(piece.as_bytes());
        }
        self.ends.push(self.bytes.len());
        self
    }

    fn items(&self) -> impl Iterator<Item = &[u8]> {
        let mut start = 0;
        self.ends.iter().map(move |&end| {
            let item = &self.bytes[start..end];
            start = end;
            item
        })
    }

    /// The first `n` items, as bytes and ends: equal for two jobs exactly
    /// when their first `n` items are.
    fn head(&self, n: usize) -> Head<'_> {
        let ends = &self.ends[..n];
        (&self.bytes[..ends.last().copied().unwrap_or(0)], ends)
    }
}

/// Scope keys per group in the scripts' KEYS (see `prelude.lua`).
const SCOPE_KEYS: usize = 14;

/// How a script's arguments split: `shared` are sent once per group of jobs
/// with equal scope keys and shared arguments, up to `own` once per job. A call
/// is laid out as (`prelude.lua`, `each_job`):
///
/// - KEYS: each job's ledger key, then each group's 14 scope keys;
/// - ARGV: the number of jobs, each job's group (from 1), each job's own
///   arguments, each group's shared arguments.
#[derive(Debug, Clone, Copy)]
struct Layout {
    shared: usize,
    own: usize,
}

impl Layout {
    /// Items of a part before its ledger key.
    fn head(self) -> usize {
        SCOPE_KEYS + self.shared
    }
}

const BEFORE: Layout = Layout { shared: 9, own: 1 };
const AFTER: Layout = Layout { shared: 9, own: 9 }; // 3 for a send (after.lua)

/// A page rate limit halves the page's rate at most once per this long: the
/// calls in flight when the limit hit answer it together, and twelve such
/// answers are one burst, not twelve halvings (40/s would become 1/s).
pub const HALVE_AT_MOST_EVERY: Duration = Duration::from_secs(10);

/// The digest of what makes a job's send, kept in its ledger record: the ad
/// account, the page, the message (campaign) id, the recipient and the
/// message, hashed (SHA-256, the first 8 bytes as 16 hex digits). The same
/// `job_id` with another digest is another send under a reused id
/// (`Before::Reused`), never a duplicate of the first. `min_conversation_gap_seconds`,
/// `campaign`, `not_after` and unknown fields are not part of it: the same
/// send published again with another gap or deadline is still a duplicate.
pub fn send_digest(job: &Job) -> SendDigest {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    for field in [
        &job.ad_account_id,
        &job.page_id,
        &job.message_id,
        &job.subscription_token,
    ] {
        hash.update(field.as_bytes());
        hash.update([0]);
    }
    if let Some(message) = &job.message {
        // writing into a hasher cannot fail
        let _ = serde_json::to_writer(&mut hash, message);
    }
    let full = hash.finalize();
    let mut out = [b'0'; 16];
    // cannot fail: 8 bytes are 16 hex digits
    let _ = hex::encode_to_slice(&full[..8], &mut out);
    SendDigest(out)
}

/// [`send_digest`]'s answer: 16 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendDigest([u8; 16]);

impl SendDigest {
    /// The digits.
    pub fn as_str(&self) -> &str {
        // hex digits are ASCII
        std::str::from_utf8(&self.0).unwrap_or("0000000000000000")
    }
}

/// Scope order in the scripts' keys (1..4 gates, 5..8 probes).
const SCOPES: [ScopeKind; 4] = [
    ScopeKind::App,
    ScopeKind::AdAccount,
    ScopeKind::Page,
    ScopeKind::Campaign,
];

/// Writes the scope keys of `job` under the hash tag `tag` (`{<prefix>}`):
/// `{<prefix>}:gate:<scope>:<id>` for the four scopes, `{<prefix>}:probe:…`
/// likewise, `{<prefix>}:pace:page:<page_id>`, `{<prefix>}:pace:global`,
/// `{<prefix>}:rate:page:<page_id>`, the gate index `{<prefix>}:gates`, the
/// campaign's hash `{<prefix>}:campaign:<campaign>` and the set of paused and
/// cancelled campaigns `{<prefix>}:campaigns:controlled`, in the scripts'
/// order. The job's own key, [`push_ledger_key`], comes
/// after the shared arguments.
fn push_scope_keys(part: &mut Part, tag: &str, job: &Job) {
    for what in [":gate:", ":probe:"] {
        for kind in SCOPES {
            let id = Scope::id_of(job, kind).unwrap_or_default();
            part.concat(&[tag, what, kind.as_str(), ":", id]);
        }
    }
    part.concat(&[tag, ":pace:page:", &job.page_id])
        .concat(&[tag, ":pace:global"])
        .concat(&[tag, ":rate:page:", &job.page_id])
        .concat(&[tag, ":gates"])
        .concat(&[tag, campaign::CAMPAIGN_KEY, job.campaign_name()])
        .concat(&[tag, campaign::CONTROLLED_KEY]);
}

/// `{<prefix>}:job:<job_id>`: the job's ledger record.
fn push_ledger_key(part: &mut Part, tag: &str, job: &Job) {
    part.concat(&[tag, ":job:", &job.job_id]);
}

fn gate_index(prefix: &str) -> String {
    format!("{{{prefix}}}:gates")
}

/// What the fleet says before a call.
#[derive(Debug, Clone, PartialEq)]
pub enum Before {
    /// The ledger holds another send under this `job_id` (its digest
    /// differs): the job is not this record's duplicate, and is not called.
    Reused {
        /// The other send was sent (else it is claimed: in flight, or its
        /// holder died).
        sent: bool,
    },
    /// The job was sent already: ack it without a call.
    AlreadySent {
        /// The tracking id of the send.
        tracking_id: String,
    },
    /// Another worker holds a live claim: its call is in flight.
    Busy {
        /// That worker.
        worker: String,
        /// How long its lease still runs.
        remaining: Duration,
    },
    /// A closed gate holds the job: no claim was taken.
    Gated(Held),
    /// The job's campaign is paused or cancelled (`mmsend campaign`): no
    /// claim was taken, no call is made.
    Controlled {
        /// `Paused` or `Cancelled`.
        state: campaign::CampaignState,
        /// A record was there (an expired claim of a worker that died, maybe
        /// mid-call): an earlier call may have been the send.
        maybe_sent: bool,
    },
    /// Claimed: call after `pace_wait`.
    Go {
        /// An earlier claim expired under a worker that died (maybe mid-call).
        maybe_sent: bool,
        /// The job's pacing slot is this far away.
        pace_wait: Duration,
    },
}

/// What the worker asks with [`Fleet::before`].
#[derive(Debug, Clone)]
pub struct Ask {
    /// The Graph request timeout (the lease covers it).
    pub request_timeout: Duration,
    /// The page's rate, messages/s; 0 = off.
    pub page_rate: f64,
    /// The fleet's rate, messages/s; 0 = off.
    pub global_rate: f64,
    /// How long a job waits while its gate's probe is in flight.
    pub probe_wait: Duration,
    /// How long a probe may stay unanswered.
    pub probe_lock: Duration,
    /// Gates on.
    pub gates: bool,
    /// The id of the call this ask claims for (alphanumeric; written into
    /// the claim and, once the call is made, into the job's story).
    pub call: String,
    /// The id of the job's last call as its story says (`""`: none): a
    /// claim of that very call, left behind because its end could not be
    /// told, is not taken for "maybe sent" (the story has its answer).
    pub last_call: String,
}

/// How the ledger records a call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Record<'a> {
    /// Sent, with Meta's tracking id.
    Sent(&'a str),
    /// Settled as sent on evidence (2300035 after a maybe-sent call).
    Suspected,
    /// Not sent: release the claim (retry or dead letter).
    Release,
}

/// What the worker tells with [`Fleet::after`].
#[derive(Debug, Clone)]
pub struct Tell<'a> {
    /// The ledger record.
    pub record: Record<'a>,
    /// The call was a send (opens the job's gates).
    pub success: bool,
    /// The scope the verdict holds, its class and code, and for how long.
    pub close: Option<(ScopeKind, Class, CodeLabel, Duration)>,
    /// A page rate limit: halve the page's rate for a while.
    pub lower_page_rate: bool,
    /// The page's configured rate (the start of the halving).
    pub page_rate: f64,
    /// Gates on.
    pub gates: bool,
    /// Extra life of a gate key after its time: the probe lock plus the
    /// probe wait, so a gate nobody probes expires by itself.
    pub gate_grace: Duration,
}

/// The offset of Redis's clock from this host's (ms), for the deadline of
/// `before.lua` rounds (module docs): measured with `TIME` by
/// [`Fleet::measure_clock`]; `i64::MIN` until then.
#[derive(Debug)]
struct RedisClock {
    offset_ms: std::sync::atomic::AtomicI64,
}

impl RedisClock {
    const UNKNOWN: i64 = i64::MIN;

    fn new() -> RedisClock {
        RedisClock {
            offset_ms: std::sync::atomic::AtomicI64::new(Self::UNKNOWN),
        }
    }

    /// Redis's time `after` from now, in its clock (ms), if the offset is
    /// known.
    fn redis_ms_in(&self, after: Duration) -> Option<u64> {
        let offset = self.offset_ms.load(std::sync::atomic::Ordering::Relaxed);
        (offset != Self::UNKNOWN).then(|| {
            let local = i64::try_from(now_ms_approx()).unwrap_or(i64::MAX);
            let at = local
                .saturating_add(offset)
                .saturating_add(ms(after) as i64);
            u64::try_from(at).unwrap_or(0)
        })
    }
}

/// The Redis side of a fleet of workers. Cheap to share (`Arc`).
pub struct Fleet {
    conn: ConnectionManager,
    clock: Arc<RedisClock>,
    prefix: String,
    /// `{<prefix>}`: the hash tag of every key.
    tag: String,
    worker: String,
    config: FleetConfig,
    batcher: Batcher,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet")
            .field("url", &redact_url(&self.config.url))
            .field("prefix", &self.prefix)
            .field("worker", &self.worker)
            .finish()
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs one Redis call under the op timeout and counts it.
async fn timed<T>(
    metrics: &Metrics,
    op: RedisOp,
    op_timeout: Duration,
    call: impl std::future::Future<Output = redis::RedisResult<T>>,
) -> Result<T, FleetError> {
    let started = Instant::now();
    // the client's own response timeout covers a command; this one also
    // covers waiting for a reconnect
    let result = tokio::time::timeout(op_timeout * 2, call).await;
    metrics.redis_call(op, started.elapsed(), matches!(result, Ok(Ok(_))));
    match result {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(FleetError::Command {
            op: op.as_str(),
            message: redact_url(&e.to_string()),
        }),
        Err(_) => Err(FleetError::Command {
            op: op.as_str(),
            message: format!("no answer within {:?}", op_timeout * 2),
        }),
    }
}

/// A client for `config.url`; a bad URL is a [`FleetError::Url`] (the
/// client's message may quote the URL: only its kind is kept).
pub(crate) fn client(config: &FleetConfig) -> Result<redis::Client, FleetError> {
    redis::Client::open(config.url.as_str()).map_err(|e| url_error(config, &e))
}

fn url_error(config: &FleetConfig, e: &redis::RedisError) -> FleetError {
    FleetError::Url {
        url: redact_url(&config.url),
        reason: format!("{:?}", e.kind()),
    }
}

/// A connection made on first use and again after a failure.
pub(crate) fn lazy_connection(
    config: &FleetConfig,
    manager: redis::aio::ConnectionManagerConfig,
) -> Result<ConnectionManager, FleetError> {
    ConnectionManager::new_lazy_with_config(client(config)?, manager)
        .map_err(|e| url_error(config, &e))
}

/// The most jobs one script call carries.
const MAX_BATCH: usize = 128;

/// Which script a job's part is for; the index of its batch in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Before = 0,
    After = 1,
}

impl Kind {
    fn layout(self) -> Layout {
        match self {
            Kind::Before => BEFORE,
            Kind::After => AFTER,
        }
    }

    fn op(self) -> RedisOp {
        match self {
            Kind::Before => RedisOp::Before,
            Kind::After => RedisOp::After,
        }
    }
}

/// Group commit for both scripts: the jobs that ask or tell while a round
/// trip is in flight go together in the next one, each script's jobs in
/// one `EVALSHA` with each job's keys and arguments in turn (the scripts
/// take the jobs in order, each as if alone), and both `EVALSHA`s in one
/// pipelined write, `after` first (so a send recorded or a gate opened in
/// a round is seen by the claims of the same round). Nothing waits for a
/// batch to fill: a lone job goes at once, and under load a round holds
/// what arrived during one round trip, so round trips, Redis's wake-ups,
/// its per-script work and the client's per-command work are paid per
/// round, not per job. One round is in flight at a time; a job waits at
/// most one round trip more for its turn.
///
/// The rounds run in a task of their own, started on first use (and again
/// if it ended with the runtime that ran it).
struct Batcher {
    /// `before.lua` and `after.lua`, in [`Kind`] order.
    scripts: Arc<[Script; 2]>,
    queue: std::sync::Mutex<Option<mpsc::UnboundedSender<Queued>>>,
}

struct Queued {
    kind: Kind,
    part: Part,
    reply: oneshot::Sender<Result<redis::Value, FleetError>>,
    /// Must run after every ask queued before it (a claim given back,
    /// [`Fleet::after_detached`]): a round runs `after.lua` first, so such
    /// a part never joins a round that already holds asks.
    after_asks: bool,
}

impl Batcher {
    fn new() -> Batcher {
        Batcher {
            scripts: Arc::new([
                Script::new(concat!(
                    include_str!("prelude.lua"),
                    include_str!("before.lua")
                )),
                Script::new(concat!(
                    include_str!("prelude.lua"),
                    include_str!("after.lua")
                )),
            ]),
            queue: std::sync::Mutex::new(None),
        }
    }

    /// One job's call: its part joins the next round; its answer is
    /// decoded here, in the job's task.
    async fn call<T: redis::FromRedisValue>(
        &self,
        link: &Link,
        kind: Kind,
        part: Part,
    ) -> Result<T, FleetError> {
        let value = self
            .enqueue(link, kind, part, false)
            .await
            .unwrap_or_else(|_| {
                Err(FleetError::Command {
                    op: kind.op().as_str(),
                    message: "the worker stopped before Redis answered".into(),
                })
            })?;
        T::from_redis_value(value).map_err(|e| FleetError::Answer {
            op: kind.op().as_str(),
            answer: e.to_string(),
        })
    }

    /// Queues one job's part for the next round, now; the receiver gets its
    /// answer.
    fn enqueue(
        &self,
        link: &Link,
        kind: Kind,
        part: Part,
        after_asks: bool,
    ) -> oneshot::Receiver<Result<redis::Value, FleetError>> {
        let (reply, answer) = oneshot::channel();
        let mut queued = Queued {
            kind,
            part,
            reply,
            after_asks,
        };
        for _ in 0..2 {
            let sender = {
                let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
                queue
                    .get_or_insert_with(|| {
                        let (tx, rx) = mpsc::unbounded_channel();
                        tokio::spawn(rounds(self.scripts.clone(), link.clone(), rx));
                        tx
                    })
                    .clone()
            };
            match sender.send(queued) {
                Ok(()) => break,
                Err(mpsc::error::SendError(back)) => {
                    // the task ended with the runtime that ran it: start another
                    queued = back;
                    *self.queue.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
            }
        }
        answer
    }
}

/// What a round's task needs of the fleet.
#[derive(Clone)]
struct Link {
    conn: ConnectionManager,
    metrics: Arc<Metrics>,
    op_timeout: Duration,
    clock: Arc<RedisClock>,
}

/// The task of the [`Batcher`]: takes every job queued, calls each script
/// once for its jobs (both in one round trip), hands each job its answer.
async fn rounds(
    scripts: Arc<[Script; 2]>,
    mut link: Link,
    mut queue: mpsc::UnboundedReceiver<Queued>,
) {
    let mut batches: [Vec<Queued>; 2] = [Vec::new(), Vec::new()];
    // a part held back for the next round (it must follow this round's asks)
    let mut carried: Option<Queued> = None;
    loop {
        let first = match carried.take() {
            Some(q) => q,
            None => match queue.recv().await {
                Some(q) => q,
                None => break,
            },
        };
        batches[first.kind as usize].push(first);
        while batches.iter().all(|b| b.len() < MAX_BATCH) {
            match queue.try_recv() {
                // a claim given back after its ask was queued: in this
                // round `after.lua` would run first and find no claim to
                // delete, and the ask would then write it, an orphan
                Ok(next) if next.after_asks && !batches[Kind::Before as usize].is_empty() => {
                    carried = Some(next);
                    break;
                }
                Ok(next) => batches[next.kind as usize].push(next),
                Err(_) => break,
            }
        }
        let kinds: Vec<Kind> = [Kind::After, Kind::Before]
            .into_iter()
            .filter(|k| !batches[*k as usize].is_empty())
            .collect();
        // one call alone or both pipelined, each call's error its own (the
        // outer error is the connection's)
        let mut pipe = redis::pipe();
        for &k in &kinds {
            let mut cmd = command(&scripts[k as usize], k.layout(), &batches[k as usize]);
            if k == Kind::Before {
                // the last argument: the round's deadline (module docs; 0:
                // none)
                cmd.arg(link.clock.redis_ms_in(link.op_timeout / 2).unwrap_or(0));
            }
            pipe.add_command(cmd);
        }
        pipe.ignore_errors();
        let op = match kinds.as_slice() {
            [one] => one.op(),
            _ => RedisOp::BeforeAfter,
        };
        let round: Result<Vec<redis::RedisResult<redis::Value>>, FleetError> = timed(
            &link.metrics,
            op,
            link.op_timeout,
            pipe.query_async(&mut link.conn),
        )
        .await;
        let results: Vec<Result<redis::Value, FleetError>> = match round {
            Err(e) => vec![Err(e); kinds.len()],
            Ok(raw) => {
                let mut out = Vec::with_capacity(raw.len());
                let mut loaded = false;
                for ((result, cmd), &kind) in raw.into_iter().zip(pipe.cmd_iter()).zip(&kinds) {
                    out.push(match result {
                        // Redis lost its scripts (a restart, SCRIPT FLUSH):
                        // both are loaded, so the next rounds keep `after`
                        // first, and this call alone is made again (in this
                        // round after the other's); a call that ran keeps
                        // its answer whatever happens here
                        Err(e) if e.kind() == ErrorKind::Server(ServerErrorKind::NoScript) => {
                            let conn = &mut link.conn;
                            let load = !std::mem::replace(&mut loaded, true);
                            timed(&link.metrics, kind.op(), link.op_timeout, async {
                                if load {
                                    for script in scripts.iter() {
                                        script.load_async(conn).await?;
                                    }
                                }
                                cmd.query_async(conn).await
                            })
                            .await
                        }
                        Ok(value) => Ok(value),
                        Err(e) => {
                            link.metrics.redis_error(kind.op());
                            Err(FleetError::Command {
                                op: kind.op().as_str(),
                                message: redact_url(&e.to_string()),
                            })
                        }
                    });
                }
                out
            }
        };
        for (kind, result) in kinds.iter().zip(results) {
            let batch = &mut batches[*kind as usize];
            let answers = match result {
                Ok(redis::Value::Array(answers)) if answers.len() == batch.len() => Ok(answers),
                Ok(other) => Err(FleetError::Answer {
                    op: kind.op().as_str(),
                    answer: format!("{other:?} for {} jobs", batch.len()),
                }),
                Err(e) => Err(e),
            };
            match answers {
                Ok(answers) => {
                    for (q, answer) in batch.drain(..).zip(answers) {
                        let _ = q.reply.send(Ok(answer));
                    }
                }
                Err(error) => {
                    for q in batch.drain(..) {
                        let _ = q.reply.send(Err(error.clone()));
                    }
                }
            }
        }
    }
}

/// A part's shared items as bytes and ends ([`Part::head`]).
type Head<'a> = (&'a [u8], &'a [usize]);

/// One `EVALSHA` for a batch, laid out as [`Layout`] says: the jobs with
/// equal shared items form a group whose items are written once.
fn command(script: &Script, layout: Layout, batch: &[Queued]) -> redis::Cmd {
    let head = layout.head();
    let mut groups: HashMap<Head<'_>, usize> = HashMap::new();
    // each job's group, and each group's first job
    let mut group_of = Vec::with_capacity(batch.len());
    let mut firsts = Vec::new();
    // jobs of one campaign come in runs: the previous job's group is
    // compared first, and only a new head is hashed
    let mut last: Option<(Head<'_>, usize)> = None;
    for (j, q) in batch.iter().enumerate() {
        let key = q.part.head(head);
        let g = match last {
            Some((k, g)) if k == key => g,
            _ => {
                let next = firsts.len();
                let g = *groups.entry(key).or_insert(next);
                if g == next {
                    firsts.push(j);
                }
                last = Some((key, g));
                g
            }
        };
        group_of.push(g + 1);
    }
    let bytes: usize = batch.iter().map(|q| q.part.bytes.len()).sum();
    let items = batch.len() * (2 + layout.own) + firsts.len() * head;
    let mut cmd = redis::Cmd::with_capacity(items + 4, bytes + 64);
    cmd.arg("EVALSHA")
        .arg(script.get_hash())
        .arg(batch.len() + firsts.len() * SCOPE_KEYS);
    for q in batch {
        cmd.arg(q.part.items().nth(head).unwrap_or_default());
    }
    for &j in &firsts {
        for key in batch[j].part.items().take(SCOPE_KEYS) {
            cmd.arg(key);
        }
    }
    cmd.arg(batch.len());
    for g in group_of {
        cmd.arg(g);
    }
    for q in batch {
        for arg in q.part.items().skip(head + 1) {
            cmd.arg(arg);
        }
    }
    for &j in &firsts {
        for arg in batch[j].part.items().skip(SCOPE_KEYS).take(layout.shared) {
            cmd.arg(arg);
        }
    }
    cmd
}

impl Fleet {
    /// Sets up the client. The connection is made lazily on the first call
    /// and remade by itself after a failure, so a worker starts while Redis
    /// is down (and falls back as configured). Only a malformed URL, or a
    /// worker id that is empty or has control characters, fails.
    pub fn new(
        config: FleetConfig,
        prefix: &str,
        worker: &str,
        metrics: Arc<Metrics>,
    ) -> Result<Fleet, FleetError> {
        // the ledger's records end fields with a line break (prelude.lua),
        // and an empty id would match a record of no known shape
        if worker.is_empty() || worker.chars().any(char::is_control) {
            return Err(FleetError::WorkerId {
                id: worker.to_string(),
            });
        }
        let manager = redis::aio::ConnectionManagerConfig::new()
            .set_response_timeout(Some(config.op_timeout))
            .set_connection_timeout(Some(config.op_timeout.max(Duration::from_secs(1))))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(2));
        let conn = lazy_connection(&config, manager)?;
        Ok(Fleet {
            conn,
            clock: Arc::new(RedisClock::new()),
            prefix: prefix.to_string(),
            tag: format!("{{{prefix}}}"),
            worker: worker.to_string(),
            config,
            batcher: Batcher::new(),
            metrics,
        })
    }

    /// The campaign side of the same Redis ([`campaign::Campaigns`]).
    pub fn campaigns(&self) -> campaign::Campaigns {
        campaign::Campaigns::over(
            self.conn.clone(),
            &self.prefix,
            &self.config,
            self.metrics.clone(),
        )
    }

    /// The configuration.
    pub fn config(&self) -> &FleetConfig {
        &self.config
    }

    fn link(&self) -> Link {
        Link {
            conn: self.conn.clone(),
            metrics: self.metrics.clone(),
            op_timeout: self.config.op_timeout,
            clock: self.clock.clone(),
        }
    }

    async fn timed<T>(
        &self,
        op: RedisOp,
        call: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, FleetError> {
        timed(&self.metrics, op, self.config.op_timeout, call).await
    }

    /// What the fleet says before a call (one script call, shared with the
    /// jobs that ask at the same time).
    pub async fn before(&self, job: &Job, ask: &Ask) -> Result<Before, FleetError> {
        let mut part = Part::new();
        push_scope_keys(&mut part, &self.tag, job);
        part.concat(&[&self.worker])
            .int(ms(ask.request_timeout + self.config.lease_margin))
            .push(ask.page_rate)
            .push(ask.global_rate)
            .int(ms(ask.probe_wait))
            .int(ms(ask.probe_lock))
            .int(u8::from(ask.gates))
            .int(1u8)
            .int(ms(self.config.ledger_retention));
        push_ledger_key(&mut part, &self.tag, job);
        part.concat(&[send_digest(job).as_str()])
            .concat(&[&ask.call])
            .concat(&[&ask.last_call]);
        let answer: BeforeAnswer = self.batcher.call(&self.link(), Kind::Before, part).await?;
        parse_before(job, &answer)
    }

    /// Tells the fleet how a call ended (one script call, shared with the
    /// jobs that tell at the same time).
    pub async fn after(&self, job: &Job, tell: &Tell<'_>) -> Result<(), FleetError> {
        let part = self.after_part(job, tell);
        let _: i64 = self.batcher.call(&self.link(), Kind::After, part).await?;
        Ok(())
    }

    /// [`Fleet::after`] without waiting for its answer: queued for the next
    /// round before this returns (so a later ask of this worker is run
    /// after it), its answer dropped. For a `Drop`, which cannot wait: a
    /// claim given back by a job that ended before its call.
    pub fn after_detached(&self, job: &Job, tell: &Tell<'_>) {
        let part = self.after_part(job, tell);
        drop(self.batcher.enqueue(&self.link(), Kind::After, part, true));
    }

    fn after_part(&self, job: &Job, tell: &Tell<'_>) -> Part {
        let (outcome, tracking) = match tell.record {
            Record::Sent(id) => ("sent", id),
            Record::Suspected => ("suspected", ""),
            Record::Release => ("release", ""),
        };
        let (index, class, code, wait) = match tell.close {
            Some((kind, class, label, wait)) => (
                SCOPES.iter().position(|k| *k == kind).map_or(0, |i| i + 1),
                class.as_str(),
                label.to_string(),
                wait,
            ),
            None => (0, "", String::new(), Duration::ZERO),
        };
        let mut part = Part::new();
        push_scope_keys(&mut part, &self.tag, job);
        part.int(ms(self.config.ledger_retention))
            .concat(&[&self.worker])
            .int(1u8)
            .int(u8::from(tell.gates))
            .int(ms(tell.gate_grace))
            .push(tell.page_rate)
            .int(ms(self.config.lowered_rate_for))
            .int(ms(HALVE_AT_MOST_EVERY))
            .int(self.config.delivery_tracking.script_arg());
        push_ledger_key(&mut part, &self.tag, job);
        let digest = send_digest(job);
        let digest = digest.as_str();
        match tell.record {
            // the common answer in three arguments (after.lua)
            Record::Sent(id) if tell.success && index == 0 && !tell.lower_page_rate => {
                part.concat(&["ok"]).concat(&[id]).concat(&[digest]);
            }
            _ => {
                part.concat(&[outcome])
                    .concat(&[tracking])
                    .int(u8::from(tell.success))
                    .int(index)
                    .concat(&[class])
                    .concat(&[&code])
                    .int(ms(wait))
                    .int(u8::from(tell.lower_page_rate))
                    .concat(&[digest]);
            }
        }
        part
    }

    /// The gates open in the whole fleet now: (scope kind, class) each.
    pub async fn gate_census(&self) -> Result<Vec<(ScopeKind, Class)>, FleetError> {
        let index = gate_index(&self.prefix);
        let mut conn = self.conn.clone();
        let keys: Vec<String> = self
            .timed(RedisOp::Census, async {
                // drop the index entries of gates that expired by themselves
                let _: i64 = conn.zrembyscore(&index, "-inf", now_ms_approx()).await?;
                conn.zrange(&index, 0, -1).await
            })
            .await?;
        let mut out = Vec::new();
        for key in keys {
            let class: Option<String> = self
                .timed(RedisOp::Census, conn.hget(&key, "class"))
                .await?;
            let kind = key
                .split(':')
                .nth(2)
                .and_then(|k| k.parse::<ScopeKind>().ok());
            if let (Some(kind), Some(class)) = (kind, class.and_then(|c| c.parse().ok())) {
                out.push((kind, class));
            }
        }
        Ok(out)
    }

    /// Deletes every key of this prefix (a throw-away topology's, after a
    /// demo or a test): SCAN in batches, never KEYS. Returns how many.
    pub async fn delete_all(&self) -> Result<u64, FleetError> {
        let mut conn = self.conn.clone();
        let pattern = format!("{{{}}}*", self.prefix);
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = self
                .timed(
                    RedisOp::Ping,
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(&pattern)
                        .arg("COUNT")
                        .arg(1000)
                        .query_async(&mut conn),
                )
                .await?;
            if !keys.is_empty() {
                let n: u64 = self
                    .timed(
                        RedisOp::Ping,
                        redis::cmd("DEL").arg(&keys).query_async(&mut conn),
                    )
                    .await?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    /// Redis's memory limit and eviction policy ([`Eviction`]).
    pub async fn eviction(&self) -> Result<Eviction, FleetError> {
        let mut conn = self.conn.clone();
        let info: String = self
            .timed(
                RedisOp::Ping,
                redis::cmd("INFO").arg("memory").query_async(&mut conn),
            )
            .await?;
        Eviction::from_info(&info).ok_or_else(|| FleetError::Answer {
            op: "info memory",
            answer: "no maxmemory / maxmemory_policy fields".into(),
        })
    }

    /// Measures the offset of Redis's clock from this host's with `TIME`
    /// (to a round trip's half), for the deadline of `before.lua` rounds
    /// (module docs). The worker does it in its housekeeping; the offset
    /// is kept between measurements (and through an outage: clocks drift
    /// by far less than the op timeout).
    pub async fn measure_clock(&self) -> Result<(), FleetError> {
        let mut conn = self.conn.clone();
        let sent = now_ms_approx();
        let (secs, micros): (u64, u64) = self
            .timed(RedisOp::Ping, redis::cmd("TIME").query_async(&mut conn))
            .await?;
        let back = now_ms_approx();
        let redis_ms = secs.saturating_mul(1000) + micros / 1000;
        let local_mid = sent / 2 + back / 2;
        let offset = redis_ms as i64 - local_mid as i64;
        self.clock
            .offset_ms
            .store(offset, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Whether Redis answers.
    pub async fn ping(&self) -> Result<(), FleetError> {
        let mut conn = self.conn.clone();
        let _: String = self
            .timed(RedisOp::Ping, redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }
}

/// Milliseconds since the epoch by this host's clock: to prune the gate
/// index (a little skew does not matter), and for a round's deadline,
/// where [`RedisClock`] adds the offset to Redis's clock.
fn now_ms_approx() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(ms)
        .unwrap_or(0)
}

/// One job's answer of `before.lua`: the claim as one integer (the common
/// answer), anything else as strings.
#[derive(Debug)]
enum BeforeAnswer {
    /// `pace_wait_ms * 2 + maybe_sent`.
    Go(i64),
    Other(Vec<String>),
}

impl redis::FromRedisValue for BeforeAnswer {
    fn from_redis_value(v: redis::Value) -> Result<Self, redis::ParsingError> {
        match v {
            redis::Value::Int(n) => Ok(BeforeAnswer::Go(n)),
            other => Ok(BeforeAnswer::Other(Vec::from_redis_value(other)?)),
        }
    }
}

fn parse_before(job: &Job, answer: &BeforeAnswer) -> Result<Before, FleetError> {
    let answer = match answer {
        BeforeAnswer::Go(n) => {
            return u64::try_from(*n)
                .map(|n| Before::Go {
                    maybe_sent: n & 1 == 1,
                    pace_wait: Duration::from_millis(n >> 1),
                })
                .map_err(|_| FleetError::Answer {
                    op: RedisOp::Before.as_str(),
                    answer: n.to_string(),
                })
        }
        BeforeAnswer::Other(strings) => strings.as_slice(),
    };
    let bad = || FleetError::Answer {
        op: RedisOp::Before.as_str(),
        answer: answer.join(" "),
    };
    let millis = |s: &String| {
        s.parse::<u64>()
            .map(Duration::from_millis)
            .map_err(|_| bad())
    };
    match answer {
        [kind, state, _worker] if kind == "reused" => Ok(Before::Reused {
            sent: state == "sent",
        }),
        [kind, tracking, _at] if kind == "sent" => Ok(Before::AlreadySent {
            tracking_id: tracking.clone(),
        }),
        [kind, by] if kind == "late" => Err(FleetError::Command {
            op: RedisOp::Before.as_str(),
            message: format!(
                "Redis ran the claim {by} ms after its deadline (paused, frozen or overloaded?); it wrote nothing"
            ),
        }),
        [kind, worker, remaining] if kind == "busy" => Ok(Before::Busy {
            worker: worker.clone(),
            remaining: millis(remaining)?,
        }),
        [kind, previous] if kind == "paused" || kind == "cancelled" => Ok(Before::Controlled {
            state: kind.parse().map_err(|_| bad())?,
            maybe_sent: previous == "1",
        }),
        [kind, index, class, code, wait] if kind == "gated" => {
            let kind = index
                .parse::<usize>()
                .ok()
                .and_then(|i| SCOPES.get(i.checked_sub(1)?))
                .ok_or_else(bad)?;
            Ok(Before::Gated(Held {
                scope: Scope::of(job, *kind).ok_or_else(bad)?,
                class: class.parse().map_err(|_| bad())?,
                label: code.parse().unwrap_or(CodeLabel::Other),
                wait: millis(wait)?,
            }))
        }
        _ => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job() -> Job {
        Job::parse(
            br#"{"v":1,"job_id":"j1","ad_account_id":"1","page_id":"2","message_id":"3","subscription_token":"s"}"#,
        )
        .unwrap()
    }

    #[test]
    fn every_policy_but_noeviction_may_evict_the_ledger_under_a_memory_limit() {
        let info = |policy: &str, max: u64| {
            Eviction::from_info(&format!(
                "# Memory\r\nused_memory:1000\r\nmaxmemory:{max}\r\nmaxmemory_human:x\r\nmaxmemory_policy:{policy}\r\n"
            ))
            .unwrap()
        };
        assert!(!info("noeviction", 1 << 30).may_evict());
        for policy in [
            "allkeys-lru",
            "volatile-lru",
            "volatile-ttl",
            "allkeys-random",
        ] {
            assert!(info(policy, 1 << 30).may_evict(), "{policy}");
            assert!(!info(policy, 0).may_evict(), "{policy} without a limit");
        }
        assert_eq!(Eviction::from_info("# Memory\r\n"), None);
    }

    fn decode(v: redis::Value) -> Result<Before, FleetError> {
        let answer: BeforeAnswer = redis::FromRedisValue::from_redis_value(v).unwrap();
        parse_before(&job(), &answer)
    }

    #[test]
    fn a_claim_is_one_integer_of_wait_and_maybe_sent() {
        assert_eq!(
            decode(redis::Value::Int(0)).unwrap(),
            Before::Go {
                maybe_sent: false,
                pace_wait: Duration::ZERO
            }
        );
        assert_eq!(
            decode(redis::Value::Int(2 * 1500 + 1)).unwrap(),
            Before::Go {
                maybe_sent: true,
                pace_wait: Duration::from_millis(1500)
            }
        );
        let err = decode(redis::Value::Int(-3)).unwrap_err().to_string();
        assert!(err.contains("-3"), "{err}");
    }

    #[test]
    fn the_other_answers_stay_strings() {
        let strings = |items: &[&str]| {
            redis::Value::Array(
                items
                    .iter()
                    .map(|s| redis::Value::BulkString(s.as_bytes().to_vec()))
                    .collect(),
            )
        };
        assert_eq!(
            decode(strings(&["busy", "w2", "4000"])).unwrap(),
            Before::Busy {
                worker: "w2".into(),
                remaining: Duration::from_millis(4000)
            }
        );
        assert_eq!(
            decode(strings(&["sent", "mm.1", "17"])).unwrap(),
            Before::AlreadySent {
                tracking_id: "mm.1".into()
            }
        );
        // the old claim's shape is no longer an answer
        assert!(decode(strings(&["go", "0", "0"])).is_err());
    }
}
