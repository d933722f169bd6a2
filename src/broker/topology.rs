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
    pub ttl: Duration,
}

impl Tier {
    /// Parses `"5s"`, `"2m"`, `"1h"`, `"500ms"`.
    pub fn parse(s: &str) -> Result<Tier, String> {
        let ttl = humantime::parse_duration(s.trim())
            .map_err(|e| format!("delay tier {s:?} is not a duration like 5s, 2m, 1h ({e})"))?;
        if ttl.is_zero() {
            return Err(format!("delay tier {s:?} must be longer than zero"));
        }
        Ok(Tier {
            name: s.trim().to_string(),
            ttl,
        })
    }
}

/// The default tiers of DESIGN §5.
pub const DEFAULT_TIERS: [&str; 6] = ["5s", "30s", "2m", "10m", "1h", "6h"];

/// Names and arguments of one mmsend topology.
#[derive(Debug, Clone, PartialEq)]
pub struct Topology {
    pub prefix: String,
    /// Sorted by ttl, shortest first.
    pub tiers: Vec<Tier>,
    /// `x-delivery-limit` of the work queue: deliveries before RabbitMQ
    /// dead-letters a message itself (poison messages that crash workers).
    pub delivery_limit: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("queue {queue} already exists with different arguments ({detail}); mmsend will not change it. Delete the queue (after draining it) or use another --prefix")]
    Inequivalent { queue: String, detail: String },
    #[error("{what} failed: {source}")]
    Amqp {
        what: String,
        #[source]
        source: lapin::Error,
    },
    #[error(
        "queue {0} does not exist; run `mmsend topology declare` (workers declare it on start)"
    )]
    Missing(String),
    #[error("{0}")]
    Config(String),
}

/// One queue's state, as `topology show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueInfo {
    pub name: String,
    pub role: String,
    pub messages: u32,
    pub consumers: u32,
}

impl Topology {
    pub fn new(prefix: &str, tiers: &[&str], delivery_limit: u32) -> Result<Topology, String> {
        let tiers = tiers
            .iter()
            .map(|t| Tier::parse(t))
            .collect::<Result<Vec<_>, _>>()?;
        Topology::from_tiers(prefix, tiers, delivery_limit)
    }

    pub fn from_tiers(
        prefix: &str,
        mut tiers: Vec<Tier>,
        delivery_limit: u32,
    ) -> Result<Topology, String> {
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return Err(format!(
                "prefix {prefix:?} must be non-empty and use only letters, digits, '-', '_' and '.'"
            ));
        }
        if tiers.is_empty() {
            return Err("at least one delay tier is needed".into());
        }
        if delivery_limit == 0 {
            return Err("delivery_limit must be at least 1".into());
        }
        tiers.sort_by_key(|t| t.ttl);
        tiers.dedup_by_key(|t| t.ttl);
        Ok(Topology {
            prefix: prefix.to_string(),
            tiers,
            delivery_limit,
        })
    }

    /// The default topology for `prefix`.
    pub fn with_prefix(prefix: &str) -> Result<Topology, String> {
        Topology::new(prefix, &DEFAULT_TIERS, 10)
    }

    pub fn exchange(&self) -> &str {
        &self.prefix
    }

    pub fn send_queue(&self) -> String {
        format!("{}.send", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.prefix)
    }

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
        let mut dead = FieldTable::default();
        dead.insert("x-queue-type".into(), long_string("quorum"));
        out.push((self.dead_queue(), "dead letters".to_string(), dead));
        out
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

    /// Declares exchange, queues and bindings. Idempotent.
    pub async fn declare(&self, conn: &Connection) -> Result<(), TopologyError> {
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
            let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
            ch.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .map_err(|e| classify_declare_error(&name, e))?;
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
        Ok(())
    }

    /// Depth and consumers of every queue (passive declare: nothing is
    /// created).
    pub async fn show(&self, conn: &Connection) -> Result<Vec<QueueInfo>, TopologyError> {
        let mut out = Vec::new();
        for (name, role, _) in self.queues() {
            let ch = conn.create_channel().await.map_err(amqp("open channel"))?;
            let q = ch
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(|e| match not_found(&e) {
                    true => TopologyError::Missing(name.clone()),
                    false => TopologyError::Amqp {
                        what: format!("inspect {name}"),
                        source: e,
                    },
                })?;
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

fn amqp(what: &str) -> impl FnOnce(lapin::Error) -> TopologyError + '_ {
    move |source| TopologyError::Amqp {
        what: what.to_string(),
        source,
    }
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
            .contains("5 parsecs"));
        assert!(Topology::new("ok", &[], 10).is_err());
        assert!(Topology::new("ok", &["0s"], 10).is_err());
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
        assert_eq!(qs.len(), 8);
    }
}
