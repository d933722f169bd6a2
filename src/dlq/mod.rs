//! The dead-letter library: look at, count, export, replay and purge the
//! letters in `<prefix>.dead`. It prints nothing; the CLI (`mmsend dlq …`)
//! and the dead-letter console are its callers.
//!
//! - [`letter`]: one dead letter, its bounded [`LetterSummary`] and its
//!   [`LetterKey`] (how a caller names a letter it showed to a person);
//! - [`filter`]: what to act on, a typed [`Filter`] or an exact [`LetterSet`];
//! - [`scan`](mod@scan): the engine, one pass at broker speed that keeps the DLQ's
//!   rules (bounded by the depth at the start, a peek never loses, reorders or
//!   duplicates, replay acks only confirmed copies);
//! - [`stats`](mod@stats): letters grouped by reason, class, code, campaign and page.
//!
//! ```no_run
//! # async fn f(conn: &lapin::Connection, topology: &mmsend::broker::Topology) -> Result<(), mmsend::dlq::DlqError> {
//! use mmsend::dlq::{self, Action, Filter, ScanOptions};
//! // counts by every dimension
//! let (stats, report) = dlq::stats(conn, topology, Filter::default()).await?;
//! // replay one code, 50 per second
//! let by_code = Filter { code: Some(2300005), ..Filter::default() };
//! let moved = dlq::scan(conn, topology, by_code, &ScanOptions::new(Action::Replay { rate: 50 }),
//!                       &mut |_: &dlq::DeadLetter| {}).await?;
//! # Ok(()) }
//! ```

pub mod filter;
pub mod letter;
pub mod scan;
pub mod stats;

pub use filter::{parse_since, Filter, LetterSet, Selection, SinceError};
pub use letter::{DeadLetter, LetterKey, LetterSummary};
pub use scan::{
    scan, Action, Flow, Observer, Phase, Progress, ScanOptions, ScanReport, Stop, DEFAULT_MAX_HELD,
};
pub use stats::{Dimension, Group, Stats, StatsBuilder};

use lapin::Connection;

use crate::broker::Topology;

/// Why a DLQ operation failed. Letters are never lost on any of these: what
/// was not moved stays in the queue.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    /// There is no `<prefix>.dead` (a wrong prefix, or never declared).
    #[error("dead-letter queue {queue} does not exist; check --prefix, or run `mmsend topology declare` (workers declare it on start)")]
    Missing {
        /// The DLQ's name.
        queue: String,
    },
    /// Another reader holds the DLQ (its reader lock, or a consumer on
    /// it); a scan would see only part of it, so none starts and nothing is
    /// read or moved.
    #[error("{queue} is busy: {consumers} other reader(s) hold it (another `mmsend dlq` run, the dead-letter console, or a consumer that is not mmsend's); a scan now would see only part of the letters, so nothing was read or moved. Try again when it is done")]
    Busy {
        /// The DLQ's name.
        queue: String,
        /// Consumers RabbitMQ reported on it; at least 1 when another mmsend
        /// reader holds the lock.
        consumers: u32,
    },
    /// A broker error before anything was moved.
    #[error("dead-letter queue {queue}: {source}")]
    Amqp {
        /// The DLQ's name.
        queue: String,
        /// The channel or connection error.
        #[source]
        source: lapin::Error,
    },
    /// RabbitMQ ended the scan's consumer (the queue was deleted?).
    #[error("RabbitMQ cancelled the scan of {queue} (was the queue deleted?)")]
    Cancelled {
        /// The DLQ's name.
        queue: String,
    },
    /// An error after some letters were replayed or purged; those stay
    /// done, every other letter is still in the DLQ.
    #[error("the scan of {queue} stopped on an error after {replayed} replayed and {purged} purged (those are done; every other letter is still in the DLQ): {source}")]
    Aborted {
        /// The DLQ's name.
        queue: String,
        /// Letters whose replay copy was confirmed and which were acked.
        replayed: usize,
        /// Letters deleted.
        purged: usize,
        /// What stopped the scan.
        #[source]
        source: Box<DlqError>,
    },
}

/// Counts every dead letter matching `filter` (a peek).
pub async fn stats(
    conn: &Connection,
    topology: &Topology,
    filter: Filter,
) -> Result<(Stats, ScanReport), DlqError> {
    let mut builder = StatsBuilder::default();
    let report = scan(
        conn,
        topology,
        filter,
        &ScanOptions::peek(),
        &mut |d: &DeadLetter| builder.add(d),
    )
    .await?;
    Ok((builder.build(), report))
}
