//! The operator's toolkit over the dead-letter queue: `stats`, `list`,
//! `export`, `replay`, `purge`.
//!
//! Every command is one [`scan`]: it reads the queue's length N when it
//! starts, then takes at most N messages with `basic.get` (manual ack), so a
//! run always ends even while workers keep dead-lettering. Messages are held
//! unacknowledged until the end of the run, so no message is read twice in
//! one run; then:
//!
//! - a selected message being **replayed** is published back to
//!   `<prefix>.send` (confirmed) and only then acked; if the publish fails it
//!   stays in the DLQ;
//! - a selected message being **purged** is acked (removed);
//! - every other message (unselected, or only peeked) is returned with one
//!   `basic.nack(multiple, requeue)`. Nothing is lost, nothing duplicated.
//!
//! Returned messages keep their place in the queue as far as RabbitMQ
//! allows (quorum queues return them to the head).
//!
//! A replayed job starts over: `x-mmsend-attempt` and
//! `x-mmsend-first-attempt-at` are cleared, the dead-letter headers removed,
//! `x-mmsend-replays` incremented and `x-mmsend-replayed-at` set. The last
//! error is kept for history until the next attempt overwrites it.
//!
//! A DLQ message without `x-mmsend-dead-reason` was dead-lettered by RabbitMQ
//! itself (the work queue's `x-delivery-limit`): it shows as
//! `delivery_limit`.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde_json::{json, Map, Value};

use crate::broker::headers::{self, Story};
use crate::broker::{Publisher, Topology};

/// One dead letter, decoded as far as it goes.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub body: Vec<u8>,
    /// The body as JSON, if it is JSON.
    pub json: Option<Value>,
    pub story: Story,
    pub properties: BasicProperties,
}

impl DeadLetter {
    fn new(body: Vec<u8>, properties: BasicProperties) -> DeadLetter {
        DeadLetter {
            json: serde_json::from_slice(&body).ok(),
            story: Story::read(properties.headers().as_ref()),
            body,
            properties,
        }
    }

    fn field(&self, name: &str) -> Option<String> {
        let v = self.json.as_ref()?.get(name)?;
        Some(v.as_str().map_or_else(|| v.to_string(), str::to_owned))
    }

    pub fn job_id(&self) -> String {
        self.field("job_id")
            .or_else(|| self.properties.message_id().as_ref().map(|m| m.to_string()))
            .unwrap_or_else(|| "-".into())
    }

    pub fn campaign(&self) -> String {
        self.field("campaign").unwrap_or_else(|| "-".into())
    }

    pub fn page_id(&self) -> String {
        self.field("page_id").unwrap_or_else(|| "-".into())
    }

    pub fn reason(&self) -> String {
        self.story.dead_reason_or_broker()
    }

    pub fn class(&self) -> String {
        self.story
            .last_error
            .class
            .clone()
            .unwrap_or_else(|| "-".into())
    }

    /// The marketing code if Meta gave one in either field, else the code.
    pub fn code(&self) -> String {
        let e = &self.story.last_error;
        e.subcode
            .filter(|c| *c >= 2_300_000)
            .or(e.code)
            .map_or_else(|| "-".into(), |c| c.to_string())
    }

    /// The export record: the job and the mmsend headers.
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
        hdrs.insert(headers::DEAD_REASON.into(), self.reason().into());
        let job = match &self.json {
            Some(v) => v.clone(),
            None => Value::String(String::from_utf8_lossy(&self.body).into_owned()),
        };
        json!({"job": job, "headers": hdrs})
    }
}

/// Which dead letters a command acts on. Empty filter = all.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reason: Option<String>,
    pub class: Option<String>,
    /// Matches the error code or subcode.
    pub code: Option<i64>,
    pub campaign: Option<String>,
    pub page: Option<String>,
    pub job_id: Option<String>,
    /// Dead at or after this instant.
    pub since: Option<DateTime<Utc>>,
    /// At most this many selected.
    pub limit: Option<usize>,
}

impl Filter {
    pub fn matches(&self, d: &DeadLetter) -> bool {
        let e = &d.story.last_error;
        self.reason.as_ref().is_none_or(|r| *r == d.reason())
            && self.class.as_ref().is_none_or(|c| *c == d.class())
            && self
                .code
                .is_none_or(|c| e.code == Some(c) || e.subcode == Some(c))
            && self.campaign.as_ref().is_none_or(|c| *c == d.campaign())
            && self.page.as_ref().is_none_or(|p| *p == d.page_id())
            && self.job_id.as_ref().is_none_or(|j| *j == d.job_id())
            && self
                .since
                .is_none_or(|s| d.story.dead_at.is_some_and(|t| t >= s))
    }
}

/// What a scan does with the selected messages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    /// Look only (stats, list, export, dry runs).
    Peek,
    /// Back to the work queue, at most `rate` per second (0 = unlimited).
    Replay { rate: u32 },
    /// Delete.
    Purge,
}

/// What a scan did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScanReport {
    /// Queue length when the scan started (the bound).
    pub depth_at_start: u32,
    pub scanned: usize,
    pub selected: usize,
    pub replayed: usize,
    pub purged: usize,
    /// Replays whose publish failed (the message stays in the DLQ).
    pub failed: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error("dead-letter queue {queue}: {source}")]
    Amqp {
        queue: String,
        #[source]
        source: lapin::Error,
    },
}

/// Scans the DLQ once; calls `on_selected` for every selected message
/// (before the action is applied).
pub async fn scan(
    conn: &Connection,
    topology: &Topology,
    filter: &Filter,
    action: Action,
    mut on_selected: impl FnMut(&DeadLetter),
) -> Result<ScanReport, DlqError> {
    let queue = topology.dead_queue();
    let err = |source| DlqError::Amqp {
        queue: queue.clone(),
        source,
    };
    let channel = conn.create_channel().await.map_err(err)?;
    let depth = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(err)?
        .message_count();
    let publisher = match action {
        Action::Replay { .. } => Some(
            Publisher::open(conn, topology.exchange())
                .await
                .map_err(err)?,
        ),
        _ => None,
    };
    let limiter = match action {
        Action::Replay { rate } => std::num::NonZeroU32::new(rate)
            .map(|r| governor::RateLimiter::direct(governor::Quota::per_second(r))),
        _ => None,
    };
    let mut report = ScanReport {
        depth_at_start: depth,
        ..Default::default()
    };
    let mut last_held: Option<u64> = None;
    let result = async {
        while report.scanned < depth as usize {
            let Some(msg) = channel
                .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
                .await
                .map_err(err)?
            else {
                break;
            };
            report.scanned += 1;
            let delivery = msg.delivery;
            let tag = delivery.delivery_tag;
            let letter = DeadLetter::new(delivery.data, delivery.properties);
            let selected = filter.matches(&letter)
                && filter.limit.is_none_or(|l| report.selected < l);
            if !selected || action == Action::Peek {
                if selected {
                    report.selected += 1;
                    on_selected(&letter);
                }
                last_held = Some(tag);
                continue;
            }
            report.selected += 1;
            on_selected(&letter);
            match action {
                Action::Purge => {
                    delivery
                        .acker
                        .ack(BasicAckOptions::default())
                        .await
                        .map_err(err)?;
                    report.purged += 1;
                }
                Action::Replay { .. } => {
                    if let Some(l) = &limiter {
                        l.until_ready().await;
                    }
                    let props = replay_story(&letter.story).restamp(&letter.properties);
                    let publisher = publisher.as_ref().expect("opened for replay");
                    match publisher
                        .publish(&topology.send_queue(), &letter.body, props)
                        .await
                    {
                        Ok(()) => {
                            delivery
                                .acker
                                .ack(BasicAckOptions::default())
                                .await
                                .map_err(err)?;
                            report.replayed += 1;
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, job_id = %letter.job_id(), "replay failed; the message stays in the DLQ");
                            report.failed += 1;
                            last_held = Some(tag);
                        }
                    }
                }
                Action::Peek => unreachable!("handled above"),
            }
        }
        Ok::<(), DlqError>(())
    }
    .await;
    // Return everything held, in one go; closing the channel would do the
    // same, but an explicit nack says what is meant.
    if let Some(tag) = last_held {
        let _ = channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: true,
                    requeue: true,
                },
            )
            .await;
    }
    if let Some(p) = publisher {
        let _ = p.channel().close(200, "done".into()).await;
    }
    let _ = channel.close(200, "done".into()).await;
    result.map(|_| report)
}

/// The story of a replayed job: a fresh start, one more replay.
fn replay_story(old: &Story) -> Story {
    Story {
        attempt: 0,
        first_attempt_at: None,
        enqueued_at: old.enqueued_at,
        last_error: old.last_error.clone(),
        dead_reason: None,
        dead_at: None,
        worker: None,
        replays: old.replays + 1,
        replayed_at: Some(Utc::now()),
    }
}

/// Counts by one dimension, largest first.
pub type Counts = Vec<(String, usize)>;

/// `dlq stats`: counts by reason, class, code, campaign and page.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Stats {
    pub total: usize,
    pub by_reason: Counts,
    pub by_class: Counts,
    pub by_code: Counts,
    pub by_campaign: Counts,
    pub by_page: Counts,
}

/// Accumulates [`Stats`] over a scan.
#[derive(Default)]
pub struct StatsBuilder {
    total: usize,
    maps: [BTreeMap<String, usize>; 5],
}

impl StatsBuilder {
    pub fn add(&mut self, d: &DeadLetter) {
        self.total += 1;
        let keys = [d.reason(), d.class(), d.code(), d.campaign(), d.page_id()];
        for (map, key) in self.maps.iter_mut().zip(keys) {
            *map.entry(key).or_insert(0) += 1;
        }
    }

    pub fn build(self) -> Stats {
        let [r, c, k, cp, p] = self.maps.map(|m| {
            let mut v: Vec<_> = m.into_iter().collect();
            v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            v
        });
        Stats {
            total: self.total,
            by_reason: r,
            by_class: c,
            by_code: k,
            by_campaign: cp,
            by_page: p,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::headers::LastError;

    fn letter(reason: Option<&str>, class: &str, code: i64, campaign: &str) -> DeadLetter {
        let story = Story {
            dead_reason: reason.map(str::to_owned),
            dead_at: Some("2026-11-24T10:00:00Z".parse().unwrap()),
            last_error: LastError {
                class: Some(class.into()),
                code: Some(100),
                subcode: Some(code),
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
    fn filters_combine() {
        let d = letter(Some("terminal"), "region", 2300018, "bf");
        assert!(Filter::default().matches(&d));
        let f = Filter {
            reason: Some("terminal".into()),
            class: Some("region".into()),
            code: Some(2300018),
            campaign: Some("bf".into()),
            page: Some("42".into()),
            job_id: Some("j".into()),
            since: Some("2026-11-24T09:00:00Z".parse().unwrap()),
            limit: None,
        };
        assert!(f.matches(&d));
        assert!(!Filter {
            code: Some(2300005),
            ..f.clone()
        }
        .matches(&d));
        assert!(!Filter {
            since: Some("2026-11-24T11:00:00Z".parse().unwrap()),
            ..f.clone()
        }
        .matches(&d));
        assert!(Filter {
            code: Some(100),
            ..Default::default()
        }
        .matches(&d));
    }

    #[test]
    fn broker_dead_letters_show_as_delivery_limit_and_stats_group() {
        let mut s = StatsBuilder::default();
        s.add(&letter(None, "-", 1, "a"));
        s.add(&letter(Some("terminal"), "region", 2300018, "a"));
        s.add(&letter(Some("terminal"), "region", 2300030, "b"));
        let st = s.build();
        assert_eq!(st.total, 3);
        assert_eq!(
            st.by_reason,
            vec![
                ("terminal".to_string(), 2),
                ("delivery_limit".to_string(), 1)
            ]
        );
        assert_eq!(st.by_campaign[0], ("a".to_string(), 2));
    }

    #[test]
    fn replay_resets_attempts_and_counts_replays() {
        let old = Story {
            attempt: 7,
            first_attempt_at: Some(Utc::now()),
            dead_reason: Some("retries_exhausted".into()),
            replays: 1,
            ..Default::default()
        };
        let new = replay_story(&old);
        assert_eq!(new.attempt, 0);
        assert_eq!(new.first_attempt_at, None);
        assert_eq!(new.dead_reason, None);
        assert_eq!(new.replays, 2);
        assert!(new.replayed_at.is_some());
    }

    #[test]
    fn export_keeps_invalid_bodies_as_text() {
        let d = DeadLetter::new(b"not json".to_vec(), BasicProperties::default());
        let e = d.to_export();
        assert_eq!(e["job"], "not json");
        assert_eq!(e["headers"]["x-mmsend-dead-reason"], "delivery_limit");
    }
}

/// A `mmsend dlq` command.
#[derive(Debug, Clone)]
pub enum Op {
    Stats { json: bool },
    List,
    Export { output: Option<std::path::PathBuf> },
    Replay { dry_run: bool, rate: u32 },
    Purge { yes: bool },
}

/// Runs one `mmsend dlq` command and prints its result.
pub async fn command(
    conn: &Connection,
    topology: &Topology,
    filter: &Filter,
    op: Op,
) -> anyhow::Result<()> {
    use std::io::Write;
    match op {
        Op::Stats { json } => {
            let mut stats = StatsBuilder::default();
            let report = scan(conn, topology, filter, Action::Peek, |d| stats.add(d)).await?;
            let stats = stats.build();
            if json {
                println!("{}", serde_json::to_string_pretty(&stats)?);
            } else {
                println!(
                    "{} dead letters in {} ({} selected)",
                    report.depth_at_start,
                    topology.dead_queue(),
                    stats.total
                );
                for (title, counts) in [
                    ("reason", &stats.by_reason),
                    ("class", &stats.by_class),
                    ("code", &stats.by_code),
                    ("campaign", &stats.by_campaign),
                    ("page", &stats.by_page),
                ] {
                    let rows = counts
                        .iter()
                        .map(|(k, n)| vec![k.clone(), n.to_string()])
                        .collect();
                    println!("{}", crate::report::table(&[title, "count"], &[1], rows));
                }
            }
        }
        Op::List | Op::Replay { dry_run: true, .. } | Op::Purge { yes: false } => {
            let mut rows = Vec::new();
            let report = scan(conn, topology, filter, Action::Peek, |d| {
                rows.push(list_row(d))
            })
            .await?;
            println!("{}", list_table(rows));
            let what = match op {
                Op::Replay { .. } => "would be replayed (dry run; nothing moved)",
                Op::Purge { .. } => "would be purged; add --yes to delete them",
                _ => "selected",
            };
            println!(
                "{} of {} dead letters {what}",
                report.selected, report.depth_at_start
            );
        }
        Op::Export { output } => {
            let mut out: Box<dyn Write> = match &output {
                Some(path) => Box::new(std::io::BufWriter::new(
                    std::fs::File::create(path)
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?,
                )),
                None => Box::new(std::io::stdout().lock()),
            };
            let mut write_error = None;
            let report = scan(conn, topology, filter, Action::Peek, |d| {
                if write_error.is_none() {
                    if let Err(e) = writeln!(out, "{}", d.to_export()) {
                        write_error = Some(e);
                    }
                }
            })
            .await?;
            out.flush()?;
            if let Some(e) = write_error {
                return Err(e.into());
            }
            eprintln!(
                "exported {} of {} dead letters",
                report.selected, report.depth_at_start
            );
        }
        Op::Replay {
            dry_run: false,
            rate,
        } => {
            let report = scan(conn, topology, filter, Action::Replay { rate }, |_| {}).await?;
            println!(
                "replayed {} of {} dead letters to {}{}",
                report.replayed,
                report.depth_at_start,
                topology.send_queue(),
                if report.failed > 0 {
                    format!("; {} failed and stay in the DLQ", report.failed)
                } else {
                    String::new()
                }
            );
            if report.failed > 0 {
                anyhow::bail!("{} replays were not confirmed", report.failed);
            }
        }
        Op::Purge { yes: true } => {
            let mut rows = Vec::new();
            let report = scan(conn, topology, filter, Action::Purge, |d| {
                rows.push(list_row(d))
            })
            .await?;
            println!("{}", list_table(rows));
            println!(
                "purged {} of {} dead letters",
                report.purged, report.depth_at_start
            );
        }
    }
    Ok(())
}

fn list_row(d: &DeadLetter) -> Vec<String> {
    let s = &d.story;
    let mut error = s.last_error.message.clone().unwrap_or_default();
    if error.chars().count() > 60 {
        error = error.chars().take(59).collect::<String>() + "…";
    }
    vec![
        d.job_id(),
        d.campaign(),
        d.reason(),
        d.class(),
        d.code(),
        s.attempt.to_string(),
        s.dead_at
            .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
            .unwrap_or_else(|| "-".into()),
        error,
    ]
}

fn list_table(rows: Vec<Vec<String>>) -> comfy_table::Table {
    crate::report::table(
        &[
            "job_id",
            "campaign",
            "reason",
            "class",
            "code",
            "attempts",
            "dead_at (UTC)",
            "last error",
        ],
        &[5],
        rows,
    )
}
