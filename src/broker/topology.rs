//! The RabbitMQ topology (DESIGN §5): one direct exchange, the quorum work
//! queue, one quorum queue per delay tier, and the quorum dead-letter queue.
//!
//! ```text
//!                     ┌──────────── x-message-ttl expires ───────────┐
//!                     ▼                                              │
//! producer ─▶ [prefix] ─▶ prefix.send ─▶ worker ─▶ prefix.retry.<tier> (no consumers)
//!                              │            └────▶ prefix.dead
//!                              └─ x-delivery-limit exceeded ─▶ prefix.dead
//! ```
//!
//! Every queue is bound to the exchange with its own name as routing key, so
//! "publish to queue Q" is "publish to the exchange with key Q" and a
//! publish with `mandatory` fails loudly if Q is missing. Tiers are
//! per-delay queues rather than per-message TTLs so that a 6 h job never
//! blocks a 5 s one (no head-of-line blocking). Dead-lettering is
//! `at-least-once` (quorum queues, RabbitMQ ≥ 3.10), which needs
//! `x-overflow: reject-publish`.
//!
//! Declaring is idempotent. Declaring over a queue that exists with other
//! arguments fails with [`TopologyError::Inequivalent`], naming the queue and
//! the argument RabbitMQ complained about.
//!
//! ## The dead-letter queue never drops a letter
//!
//! `<prefix>.dead` has no dead-letter route, so whatever RabbitMQ would
//! dead-letter from it is gone. Quorum queues count every return of a message
//! (a `dlq` peek returns every letter it reads) and drop it past the queue's
//! delivery limit. RabbitMQ 3.x has no limit unless one is set; RabbitMQ 4.0
//! sets a default of 20; 4.3 counts only failed deliveries (`basic.reject`,
//! a closed channel) but keeps the default. `x-delivery-limit: -1` means
//! "unlimited" only on 4.x: RabbitMQ 3.x drops a message on its first return
//! when the limit is negative (seen on 3.10.8). So `.dead` is declared with
//! [`DEAD_DELIVERY_LIMIT`], a positive limit no letter can reach, which means
//! the same on every version and needs no version check.
//!
//! A `.dead` declared by an earlier mmsend without the argument cannot be
//! changed by a declare (RabbitMQ refuses inequivalent arguments). Declaring
//! then keeps the queue as it is and reports a [`TopologyWarning`] that says
//! how to fix it with a policy, so a worker on an upgraded broker still starts.

use std::time::Duration;

use lapin::options::{
    ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ExchangeKind};

/// One delay tier: a queue whose messages wait `ttl`, then go back to work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tier {
    /// Short label used in the queue name and the `tier` metric label, e.g. `5s`.
    pub name: String,
    /// How long a message waits in the tier before it goes back to work.
    pub ttl: Duration,
}

impl Tier {
    /// Parses `"5s"`, `"2m"`, `"1h"`, `"500ms"`.
    pub fn parse(s: &str) -> Result<Tier, TopologyConfigError> {
        let ttl = humantime::parse_duration(s.trim()).map_err(|e| TopologyConfigError::Tier {
            tier: s.to_string(),
            problem: e.to_string(),
        })?;
        if ttl.is_zero() {
            return Err(TopologyConfigError::Tier {
                tier: s.to_string(),
                problem: "it must be longer than zero".into(),
            });
        }
        if s.trim().len() > MAX_TIER_NAME_BYTES {
            return Err(TopologyConfigError::Tier {
                tier: s.to_string(),
                problem: format!("a tier name is part of a queue name: write it in at most {MAX_TIER_NAME_BYTES} bytes (e.g. 90s, 2m, 1h)"),
            });
        }
        Ok(Tier {
            name: s.trim().to_string(),
            ttl,
        })
    }
}

/// Longest topology prefix: every queue name (`<prefix>.retry.<tier>`,
/// `<prefix>.dead.reader-lock`, …) must stay an AMQP short string (255
/// bytes).
const MAX_PREFIX_BYTES: usize = 200;
/// Longest tier name, for the same reason.
const MAX_TIER_NAME_BYTES: usize = 32;

pub use crate::config::defaults::{DEFAULT_DELIVERY_LIMIT, DEFAULT_PREFIX, DEFAULT_TIERS};

/// A topology setting that cannot work.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopologyConfigError {
    /// A tier that is not a positive duration.
    #[error("delay tier {tier:?} is not a duration like 5s, 2m, 1h: {problem}")]
    Tier {
        /// The tier as written.
        tier: String,
        /// What is wrong with it.
        problem: String,
    },
    /// A prefix RabbitMQ names cannot carry.
    #[error("prefix {0:?} must be 1 to 200 bytes of letters, digits, '-', '_' and '.' (queue names are AMQP short strings, at most 255 bytes with their suffixes)")]
    Prefix(String),
    /// No tiers at all.
    #[error("at least one delay tier is needed")]
    NoTiers,
    /// `delivery_limit = 0`.
    #[error("delivery_limit must be at least 1")]
    DeliveryLimit,
}

/// `x-delivery-limit` of `<prefix>.dead`: a billion returns, i.e. never.
/// Positive on purpose: `-1` means unlimited on RabbitMQ 4.x but "drop on the
/// first return" on 3.x (see the module docs).
pub const DEAD_DELIVERY_LIMIT: i64 = 1_000_000_000;

/// How long webhook events wait in `<prefix>.webhooks.wait` before the
/// tracker tries to join them again.
pub const WEBHOOK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Names and arguments of one mmsend topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    /// The exchange's name and the first part of every queue's name.
    pub prefix: String,
    /// Sorted by ttl, shortest first.
    pub tiers: Vec<Tier>,
    /// `x-delivery-limit` of the work queue: deliveries before RabbitMQ
    /// dead-letters a message itself (poison messages that crash workers).
    pub delivery_limit: u32,
    /// The results stream `<prefix>.results` (one event per settled job),
    /// kept this long; `None`: no results stream.
    pub results: Option<Duration>,
}

/// Declaring, inspecting or deleting the topology failed.
#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    /// A queue exists with other arguments (RabbitMQ's
    /// `PRECONDITION_FAILED`); mmsend never changes or deletes it.
    #[error("queue {queue} already exists with different arguments ({detail}); mmsend will not change it. Delete the queue (after draining it) or use another --prefix")]
    Inequivalent {
        /// The queue's name.
        queue: String,
        /// RabbitMQ's text naming the argument that differs.
        detail: String,
    },
    /// Any other broker error.
    #[error("{what} failed: {source}")]
    Amqp {
        /// The step that failed, e.g. `declare mmsend.send`.
        what: String,
        /// The channel or connection error.
        #[source]
        source: lapin::Error,
    },
    /// A passive declare found no such queue (the name is given).
    #[error(
        "queue {0} does not exist; run `mmsend topology declare` (workers declare it on start)"
    )]
    Missing(String),
    /// The topology's settings are wrong.
    #[error(transparent)]
    Config(#[from] TopologyConfigError),
}

/// Something an operator must fix, found while declaring; the topology works
/// meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopologyWarning {
    /// The DLQ exists with another (or no) `x-delivery-limit` than
    /// [`DEAD_DELIVERY_LIMIT`], so a broker may drop dead letters after a few
    /// peeks. `current` is what RabbitMQ reported (`None`: not set).
    DeadQueueMayDrop {
        /// The DLQ's name.
        queue: String,
        /// Its `x-delivery-limit` as RabbitMQ reported it.
        current: Option<i64>,
    },
}

impl TopologyWarning {
    /// The `rabbitmqctl` command that fixes it without moving a letter.
    pub fn fix(&self) -> String {
        match self {
            TopologyWarning::DeadQueueMayDrop { queue, .. } => format!(
                "rabbitmqctl set_policy --apply-to queues --priority 100 mmsend-dead-no-drop '^{}$' '{{\"delivery-limit\": {DEAD_DELIVERY_LIMIT}}}'",
                queue.replace('.', "\\.")
            ),
        }
    }
}

impl std::fmt::Display for TopologyWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologyWarning::DeadQueueMayDrop { queue, current } => {
                let risk = match current {
                    None => "it has no x-delivery-limit: RabbitMQ 4.0 and later apply their default of 20 and then DROP a dead letter (every dlq peek counts one)".to_string(),
                    Some(n) if *n < 0 => format!("it has x-delivery-limit {n}: unlimited on RabbitMQ 4.x, but RabbitMQ 3.x DROPS a dead letter the first time it is returned (every dlq peek returns it)"),
                    Some(n) => format!("it has x-delivery-limit {n}: RabbitMQ DROPS a dead letter after {n} returns (every dlq peek returns it)"),
                };
                write!(
                    f,
                    "dead-letter queue {queue} was declared without mmsend's delivery limit; {risk}. Fix it without moving a letter: {} (a policy replaces any other policy on that queue: merge their keys if you have one; RabbitMQ applies the smaller of policy and argument). Also keep any blanket delivery-limit policy away from {queue}",
                    self.fix()
                )
            }
        }
    }
}

/// What [`Topology::declare`] found that needs an operator.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclareReport {
    /// Problems to fix by hand (empty when all is well).
    pub warnings: Vec<TopologyWarning>,
}

/// One queue's state, as `topology show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct QueueInfo {
    /// The queue's name, e.g. `mmsend.retry.5s`.
    pub name: String,
    /// What it is for: `work`, `delay <tier>`, `dead letters` or `results stream`.
    pub role: String,
    /// Messages ready in it (unacked deliveries not counted).
    pub messages: u32,
    /// Consumers attached to it.
    pub consumers: u32,
}

impl Topology {
    /// A topology from tier names like `"5s"`.
    pub fn new(
        prefix: &str,
        tiers: &[&str],
        delivery_limit: u32,
    ) -> Result<Topology, TopologyConfigError> {
        let tiers = tiers
            .iter()
            .map(|t| Tier::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        Topology::from_tiers(prefix, tiers, delivery_limit)
    }

    /// A topology from parsed tiers (sorted and deduplicated here).
    pub fn from_tiers(
        prefix: &str,
        mut tiers: Vec<Tier>,
        delivery_limit: u32,
    ) -> Result<Topology, TopologyConfigError> {
        if prefix.is_empty()
            || prefix.len() > MAX_PREFIX_BYTES
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(TopologyConfigError::Prefix(prefix.to_string()));
        }
        if tiers.is_empty() {
            return Err(TopologyConfigError::NoTiers);
        }
        if delivery_limit == 0 {
            return Err(TopologyConfigError::DeliveryLimit);
        }
        tiers.sort_by_key(|t| t.ttl);
        tiers.dedup_by_key(|t| t.ttl);
        Ok(Topology {
            prefix: prefix.to_string(),
            tiers,
            delivery_limit,
            results: None,
        })
    }

    /// The default topology for `prefix`.
    pub fn with_prefix(prefix: &str) -> Result<Topology, TopologyConfigError> {
        Topology::new(prefix, &DEFAULT_TIERS, DEFAULT_DELIVERY_LIMIT)
    }

    /// The direct exchange every queue is bound to (by its own name).
    pub fn exchange(&self) -> &str {
        &self.prefix
    }

    /// The work queue `<prefix>.send`, where producers publish jobs.
    pub fn send_queue(&self) -> String {
        format!("{}.send", self.prefix)
    }

    /// The dead-letter queue `<prefix>.dead`.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

    /// The held queue `<prefix>.held`: jobs of paused campaigns, parked
    /// without a TTL until `mmsend campaign resume` (or `cancel`) moves them
    /// back to work. Quorum, declared like the DLQ.
    pub fn held_queue(&self) -> String {
        format!("{}.held", self.prefix)
    }

    /// The webhook queue `<prefix>.webhooks`: Meta's page webhook payloads
    /// as `mmsend webhooks` received them, for the tracker. Quorum,
    /// declared like the DLQ.
    pub fn webhook_queue(&self) -> String {
        format!("{}.webhooks", self.prefix)
    }

    /// The webhook wait queue `<prefix>.webhooks.wait`: events the tracker
    /// could not join yet (their send not recorded yet), back on
    /// `<prefix>.webhooks` after [`WEBHOOK_WAIT`]. Quorum, a delay queue
    /// like the tiers.
    pub fn webhook_wait_queue(&self) -> String {
        format!("{}.webhooks.wait", self.prefix)
    }

    /// The results stream: one event per settled job, for producers.
    pub fn results_stream(&self) -> String {
        format!("{}.results", self.prefix)
    }

    /// The delay queue of one tier, `<prefix>.retry.<tier>`.
    pub fn tier_queue(&self, tier: &Tier) -> String {
        format!("{}.retry.{}", self.prefix, tier.name)
    }

    /// The smallest tier whose delay is ≥ `wanted`, else the longest tier
    /// (a job that wants more than the longest tier comes back early and is
    /// routed again).
    pub fn tier_for(&self, wanted: Duration) -> &Tier {
        self.tiers
            .iter()
            .find(|t| t.ttl >= wanted)
            .unwrap_or_else(|| self.tiers.last().expect("tiers is never empty"))
    }

    /// Every queue with its role and declare arguments.
    fn queues(&self) -> Vec<(String, String, FieldTable)> {
        let mut out = Vec::new();
        let mut send = base_args(self.exchange(), &self.dead_queue());
        send.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(self.delivery_limit)),
        );
        out.push((self.send_queue(), "work".to_string(), send));
        for tier in &self.tiers {
            let mut args = base_args(self.exchange(), &self.send_queue());
            args.insert(
                "x-message-ttl".into(),
                AMQPValue::LongLongInt(tier.ttl.as_millis().min(i64::MAX as u128) as i64),
            );
            out.push((self.tier_queue(tier), format!("delay {}", tier.name), args));
        }
        out.push((
            self.dead_queue(),
            "dead letters".to_string(),
            self.dead_args(),
        ));
        out.push((
            self.held_queue(),
            "held (paused campaigns)".to_string(),
            self.dead_args(),
        ));
        out.push((
            self.webhook_queue(),
            "webhooks (received, for the tracker)".to_string(),
            self.dead_args(),
        ));
        let mut wait = base_args(self.exchange(), &self.webhook_queue());
        wait.insert(
            "x-message-ttl".into(),
            AMQPValue::LongLongInt(WEBHOOK_WAIT.as_millis() as i64),
        );
        out.push((
            self.webhook_wait_queue(),
            "webhook events waiting for their send".to_string(),
            wait,
        ));
        if let Some(max_age) = self.results {
            let mut results = FieldTable::default();
            results.insert("x-queue-type".into(), long_string("stream"));
            // RabbitMQ's stream retention unit: seconds ("86400s")
            results.insert(
                "x-max-age".into(),
                long_string(&format!("{}s", max_age.as_secs().max(1))),
            );
            out.push((self.results_stream(), "results stream".to_string(), results));
        }
        out
    }

    /// Quorum, and a delivery limit no letter reaches (module docs).
    fn dead_args(&self) -> FieldTable {
        let mut dead = FieldTable::default();
        dead.insert("x-queue-type".into(), long_string("quorum"));
        dead.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(DEAD_DELIVERY_LIMIT),
        );
        dead
    }

    /// The topology as RabbitMQ definitions (`rabbitmqctl import_definitions`),
    /// for brokers provisioned ahead of the workers. `deploy/rabbitmq/
    /// definitions.json` is this for the default prefix; a test keeps them equal.
    pub fn definitions(&self, vhost: &str) -> serde_json::Value {
        use serde_json::{json, Map, Value};
        let to_json = |v: &AMQPValue| match v {
            AMQPValue::LongString(s) => {
                Value::from(String::from_utf8_lossy(s.as_bytes()).into_owned())
            }
            AMQPValue::LongLongInt(n) => Value::from(*n),
            other => Value::from(format!("{other:?}")),
        };
        let queues: Vec<Value> = self
            .queues()
            .into_iter()
            .map(|(name, _, args)| {
                let arguments: Map<String, Value> = args
                    .inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), to_json(v)))
                    .collect();
                json!({"name": name, "vhost": vhost, "durable": true, "auto_delete": false, "arguments": arguments})
            })
            .collect();
        let bindings: Vec<Value> = self
            .queues()
            .into_iter()
            .map(|(name, _, _)| {
                json!({"source": self.exchange(), "vhost": vhost, "destination": name,
                       "destination_type": "queue", "routing_key": name, "arguments": {}})
            })
            .collect();
        json!({
            "exchanges": [{"name": self.exchange(), "vhost": vhost, "type": "direct", "durable": true,
                           "auto_delete": false, "internal": false, "arguments": {}}],
            "queues": queues,
            "bindings": bindings,
        })
    }

    /// Declares exchange, queues and bindings. Idempotent. A DLQ left by an
    /// earlier version without the delivery limit is kept and reported (and
    /// logged) as a warning rather than failing: see the module docs.
    pub async fn declare(&self, conn: &Connection) -> Result<DeclareReport, TopologyError> {
        let mut report = DeclareReport::default();
        // A failed declare closes its channel; use a fresh one per step so
        // the error that matters is the one reported.
        let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
        ch.exchange_declare(
            self.exchange().into(),
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(|e| classify_declare_error(self.exchange(), e))?;
        for (name, _, args) in self.queues() {
            let mut ch = conn.create_channel().await.map_err(amqp("open channel"))?;
            let declared = ch
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..Default::default()
                    },
                    args,
                )
                .await;
            if let Err(e) = declared {
                match self.dead_queue_mismatch(&name, &e) {
                    // Keep the old DLQ (it holds the letters) and say how to
                    // fix it; its channel was closed by the refusal.
                    Some(warning) => {
                        tracing::warn!("{warning}");
                        report.warnings.push(warning);
                        ch = conn.create_channel().await.map_err(amqp("open channel"))?;
                    }
                    None => return Err(classify_declare_error(&name, e)),
                }
            }
            ch.queue_bind(
                name.as_str().into(),
                self.exchange().into(),
                name.as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(amqp(&format!("bind {name}")))?;
            let _ = ch.close(200, "declared".into()).await;
        }
        Ok(report)
    }

    /// Checks, without changing anything, that the DLQ exists and has
    /// mmsend's delivery limit. `Ok(Some(_))`: it exists but may drop
    /// letters (what to do is in the warning).
    pub async fn check_dead_queue(
        &self,
        conn: &Connection,
    ) -> Result<Option<TopologyWarning>, TopologyError> {
        let name = self.dead_queue();
        let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
        inspect(&ch, &name).await?;
        // The queue exists, so an active declare with the same arguments
        // creates nothing; RabbitMQ refuses it if the arguments differ.
        let result = ch
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                self.dead_args(),
            )
            .await;
        match result {
            Ok(_) => {
                let _ = ch.close(200, "checked".into()).await;
                Ok(None)
            }
            Err(e) => match self.dead_queue_mismatch(&name, &e) {
                Some(w) => Ok(Some(w)),
                None => Err(classify_declare_error(&name, e)),
            },
        }
    }

    /// A refused declare of the DLQ because of its `x-delivery-limit`.
    fn dead_queue_mismatch(&self, queue: &str, e: &lapin::Error) -> Option<TopologyWarning> {
        if queue != self.dead_queue() {
            return None;
        }
        let text = e.to_string();
        if !(text.contains("inequivalent arg 'x-delivery-limit'")) {
            return None;
        }
        Some(TopologyWarning::DeadQueueMayDrop {
            queue: queue.to_string(),
            current: current_value(&text),
        })
    }

    /// Depth and consumers of every queue (passive declare: nothing is
    /// created).
    pub async fn show(&self, conn: &Connection) -> Result<Vec<QueueInfo>, TopologyError> {
        let mut out = Vec::new();
        for (name, role, _) in self.queues() {
            let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
            let q = inspect(&ch, &name).await?;
            out.push(QueueInfo {
                name,
                role,
                messages: q.message_count(),
                consumers: q.consumer_count(),
            });
            let _ = ch.close(200, "shown".into()).await;
        }
        Ok(out)
    }

    /// Deletes every queue and the exchange (tests, `demo` clean-up).
    pub async fn delete(&self, conn: &Connection) -> Result<(), TopologyError> {
        let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
        for (name, _, _) in self.queues() {
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(amqp(&format!("delete {name}")))?;
        }
        ch.exchange_delete(self.exchange().into(), Default::default())
            .await
            .map_err(amqp("delete exchange"))?;
        let _ = ch.close(200, "deleted".into()).await;
        Ok(())
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

/// Quorum, at-least-once dead-lettering to `dlx`/`dlk`, reject-publish.
fn base_args(dlx: &str, dlk: &str) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), long_string("quorum"));
    args.insert("x-dead-letter-exchange".into(), long_string(dlx));
    args.insert("x-dead-letter-routing-key".into(), long_string(dlk));
    args.insert(
        "x-dead-letter-strategy".into(),
        long_string("at-least-once"),
    );
    args.insert("x-overflow".into(), long_string("reject-publish"));
    args
}

/// A passive declare: the queue's depth and consumers, or `Missing`.
async fn inspect(ch: &lapin::Channel, name: &str) -> Result<lapin::Queue, TopologyError> {
    passive_declare(ch, name)
        .await
        .map_err(|source| TopologyError::Amqp {
            what: format!("inspect {name}"),
            source,
        })?
        .ok_or_else(|| TopologyError::Missing(name.to_string()))
}

/// A passive declare of `name` (nothing is created): its depth and
/// consumers, `None` when there is no such queue (RabbitMQ then closes the
/// channel). The one place that reads a queue's state; the DLQ scan uses it
/// too.
pub(crate) async fn passive_declare(
    ch: &lapin::Channel,
    name: &str,
) -> Result<Option<lapin::Queue>, lapin::Error> {
    let declared = ch
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    match declared {
        Ok(queue) => Ok(Some(queue)),
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

fn amqp(what: &str) -> impl FnOnce(lapin::Error) -> TopologyError + '_ {
    move |source| TopologyError::Amqp {
        what: what.to_string(),
        source,
    }
}

/// The existing value from RabbitMQ's "inequivalent arg" reply: `… but
/// current is '-1'` → `Some(-1)`, `… but current is none` → `None`.
fn current_value(text: &str) -> Option<i64> {
    let rest = &text[text.find("current is ")? + "current is ".len()..];
    rest.trim_start_matches('\'')
        .split(|c: char| !(c == '-' || c.is_ascii_digit()))
        .next()?
        .parse()
        .ok()
}

fn not_found(e: &lapin::Error) -> bool {
    e.to_string().contains("NOT_FOUND")
}

fn classify_declare_error(name: &str, e: lapin::Error) -> TopologyError {
    let text = e.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent") {
        // RabbitMQ's reply text names the argument, e.g. "inequivalent arg
        // 'x-message-ttl' for queue 'q' in vhost '/': received … but current is …".
        let detail = text
            .find("inequivalent")
            .map(|i| text[i..].to_string())
            .unwrap_or(text);
        TopologyError::Inequivalent {
            queue: name.to_string(),
            detail,
        }
    } else {
        TopologyError::Amqp {
            what: format!("declare {name}"),
            source: e,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_tier_choice() {
        let t = Topology::with_prefix("mm").unwrap();
        assert_eq!(t.send_queue(), "mm.send");
        assert_eq!(t.dead_queue(), "mm.dead");
        assert_eq!(t.tier_queue(&t.tiers[0]), "mm.retry.5s");
        let s = Duration::from_secs;
        assert_eq!(t.tier_for(s(0)).name, "5s");
        assert_eq!(t.tier_for(s(5)).name, "5s");
        assert_eq!(t.tier_for(s(6)).name, "30s");
        assert_eq!(t.tier_for(s(180)).name, "10m");
        assert_eq!(t.tier_for(s(7 * 3600)).name, "6h");
    }

    #[test]
    fn rejects_bad_settings() {
        assert!(Topology::new("bad prefix", &DEFAULT_TIERS, 10).is_err());
        assert!(Topology::new("ok", &["5 parsecs"], 10)
            .unwrap_err()
            .to_string()
            .contains("5 parsecs"));
        assert!(Topology::new("ok", &[], 10).is_err());
        assert!(Topology::new("ok", &["0s"], 10).is_err());
        // every queue name must stay an AMQP short string (lapin panics on a
        // longer one): a long prefix or tier name is refused up front
        assert!(Topology::with_prefix(&"p".repeat(200)).is_ok());
        let e = Topology::with_prefix(&"p".repeat(201)).unwrap_err();
        assert!(e.to_string().contains("200 bytes"), "{e}");
        let long_tier = format!("{}5s", "0".repeat(40));
        assert!(Topology::new("ok", &[long_tier.as_str()], 10).is_err());
        let t = Topology::new("ok", &["1h", "200ms", "1s"], 3).unwrap();
        let names: Vec<_> = t.tiers.iter().map(|t| t.name.as_str()).collect();
        assert_eq!(names, ["200ms", "1s", "1h"]);
    }

    #[test]
    fn queue_arguments_follow_the_design() {
        let t = Topology::with_prefix("mm").unwrap();
        let qs = t.queues();
        let send = qs[0].2.inner();
        assert_eq!(
            send.get("x-dead-letter-routing-key"),
            Some(&long_string("mm.dead"))
        );
        assert_eq!(
            send.get("x-dead-letter-strategy"),
            Some(&long_string("at-least-once"))
        );
        assert_eq!(send.get("x-overflow"), Some(&long_string("reject-publish")));
        assert_eq!(
            send.get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(10))
        );
        let six_h = qs[6].2.inner();
        assert_eq!(
            six_h.get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(21_600_000))
        );
        assert_eq!(
            six_h.get("x-dead-letter-routing-key"),
            Some(&long_string("mm.send"))
        );
        assert_eq!(qs.len(), 11);
        assert_eq!(qs[8].0, "mm.held");
        assert_eq!(qs[8].2, qs[7].2, "the held queue is declared like the DLQ");
        assert_eq!(qs[9].0, "mm.webhooks");
        assert_eq!(
            qs[9].2, qs[7].2,
            "the webhook queue is declared like the DLQ"
        );
        // events the tracker could not join yet wait 5 s, then come back
        let wait = qs[10].2.inner();
        assert_eq!(qs[10].0, "mm.webhooks.wait");
        assert_eq!(
            wait.get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(5_000))
        );
        assert_eq!(
            wait.get("x-dead-letter-routing-key"),
            Some(&long_string("mm.webhooks"))
        );
        let dead = qs[7].2.inner();
        assert_eq!(qs[7].0, "mm.dead");
        assert_eq!(
            dead.get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(DEAD_DELIVERY_LIMIT))
        );
        assert!(dead.get("x-dead-letter-exchange").is_none());
    }

    #[test]
    fn reads_the_current_limit_from_rabbitmqs_refusal() {
        let none = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q.dead' in vhost '/': received the value '1000000000' of type 'long' but current is none";
        let neg = "PRECONDITION_FAILED - inequivalent arg 'x-delivery-limit' for queue 'q.dead' in vhost '/': received '1000000000' but current is '-1'";
        let twenty = "… but current is '20'";
        assert_eq!(current_value(none), None);
        assert_eq!(current_value(neg), Some(-1));
        assert_eq!(current_value(twenty), Some(20));
        let w = TopologyWarning::DeadQueueMayDrop {
            queue: "mm.dead".into(),
            current: None,
        };
        assert!(w.to_string().contains("RabbitMQ 4.0"));
        assert_eq!(
            w.fix(),
            r#"rabbitmqctl set_policy --apply-to queues --priority 100 mmsend-dead-no-drop '^mm\.dead$' '{"delivery-limit": 1000000000}'"#
        );
    }
}
