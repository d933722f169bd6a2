//! The scan engine: one pass over the dead-letter queue at broker speed,
//! looking at, replaying or purging the selected letters.
//!
//! The rules, and how the engine keeps them:
//!
//! - **A run is bounded by the depth at its start.** The scan reads the
//!   queue's ready count N first and takes at most N deliveries: the last
//!   consumer is given exactly the credit still missing, so the broker sends
//!   nothing beyond N even while workers keep dead-lettering.
//! - **A peek never loses, reorders or duplicates a letter.** Every letter
//!   read is held unacknowledged until the end of the run, so none comes back
//!   twice within a run; then the held letters are returned with
//!   `basic.nack(multiple, requeue)`, in delivery order, and a quorum queue
//!   puts returned messages back at its head in the order they are
//!   returned: the queue ends in its original order.
//! - **At broker speed.** Letters are consumed with a prefetch window
//!   instead of one `basic.get` round trip each. A consumer's prefetch is at
//!   most 65,535 (AMQP's limit) and a run must hold every letter it reads, so
//!   the scan opens consumers one after another, each on a channel of its
//!   own (RabbitMQ walks a channel's unacked list on every ack, see
//!   [`ACTION_WINDOW`]). The engine counts each consumer's credit exactly (its prefetch, minus
//!   deliveries, plus the acks RabbitMQ refills it with) and cancels it only
//!   when that credit is spent, so no delivery can arrive after the cancel
//!   (lapin drops those, and RabbitMQ 3.x would put them back at the head of
//!   the queue when the channel closes). Windows start small and grow, so a
//!   run that stops early (`--limit`) waits for little more than it used.
//!   Peeks keep the next consumer open while reading the current one, so
//!   the broker reads the next window from disk meanwhile. Held letters are
//!   returned run by run in chunks of `RETURN_CHUNK`, paced by what the
//!   queue has applied, which keeps the order on every RabbitMQ version (see
//!   `Engine::return_in_order`).
//! - **Replay acks a letter only after its copy is confirmed.** Copies are
//!   published without waiting (up to `confirm_window` unconfirmed); as
//!   confirms arrive, in order, each confirmed letter is acked. An
//!   unconfirmed copy leaves its letter held, to be returned at the end.
//!   After every publish, and while the scan waits (rate limit, an idle
//!   consumer), the copies at the front whose confirm has already come are
//!   settled without waiting, so progress counts a move when it happens,
//!   not when the window fills or the run ends.
//! - **An interrupted run leaves every letter in the queue or moved exactly
//!   once.** Cancelling ([`ScanOptions::cancel`], e.g. Ctrl-C) stops reading,
//!   waits for the copies in flight and acks the confirmed ones, then returns
//!   the rest. (A killed process or a lost connection cannot ack: up to
//!   `confirm_window` letters whose copies were confirmed may then stay in the
//!   DLQ as well, the at-least-once window every confirmed move has.)
//!
//! The broker keeps every held letter's bookkeeping until the end of the
//! run; the book (docs/src/dlq.md, "Measured") has what that costs
//! at 100,000 and 1,000,000 letters.
//!
//! **One reader at a time, atomically.** Two scans of one queue at once
//! would share its letters, and each would report a count or a purge as
//! complete that was not. A scan first takes the DLQ's reader lock (an
//! exclusive consumer on a lock queue of its own, see `ReaderLock`; the
//! DLQ itself, a quorum queue, does not enforce exclusive consumers), then
//! checks that nothing else consumes the DLQ; a reader that gets neither
//! stops at once with [`DlqError::Busy`], before reading a letter. A run
//! whose queue ran dry before its depth ([`Stop::QueueEmpty`]: something
//! that is not mmsend took or removed letters) does not count as complete.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, Connection};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::filter::{Selection, Selector};
use super::letter::DeadLetter;
use super::DlqError;
use crate::broker::publish::Pending;
use crate::broker::topology::passive_declare;
use crate::broker::{Publisher, Topology, ACK_DRAIN};

/// AMQP's largest prefetch count (a short).
const MAX_PREFETCH: u16 = u16::MAX;

/// Prefetch of a scan's first consumer; each next one gets four times more,
/// up to [`ScanOptions::consumer_window`].
const FIRST_WINDOW: u16 = 256;

/// Largest window of a replay or purge. RabbitMQ finds an acked delivery by
/// walking its channel's unacked list from the oldest, so an ack behind N
/// held letters costs N steps: 20,000 acks behind up to 80,000 held letters
/// on one channel took 187 s of broker CPU (3.10.8). Each window has its own
/// channel, so an ack walks at most this many.
pub const ACTION_WINDOW: u16 = 4096;

/// How long a consumer with credit may see nothing before the scan checks
/// whether the queue still has ready letters.
const IDLE_CHECK: Duration = Duration::from_millis(300);

/// How long the queue must show no ready letter, while a consumer with
/// credit receives nothing, before the scan concludes someone else took the
/// rest. (No ready letter alone is not enough: RabbitMQ counts letters on
/// their way to the consumer as not ready, and a large window of letters
/// read back from disk can take a moment to arrive.)
const DRY_AFTER: Duration = Duration::from_secs(5);

/// How long a consumer on the DLQ may linger before a scan calls it busy.
const BUSY_GRACE: Duration = Duration::from_secs(2);

/// Letters returned by one `basic.nack(multiple)`. RabbitMQ 3.x quorum
/// queues requeue a multiple return in the iteration order of an Erlang map,
/// which is the key order only for maps of at most 32 keys (seen on 3.10.8:
/// one nack of 3,000 letters shuffled them); 4.x requeues in list order.
/// Chunks of 32 keep the order on both.
const RETURN_CHUNK: usize = 32;

/// Return chunks sent and not yet seen applied by the queue, at most (see
/// `Engine::return_in_order`): well under the 32 pending commands at which
/// RabbitMQ 3.x starts merging returns.
const RETURN_WINDOW: usize = 8;

/// How long the ready count may stand still before the engine stops
/// pacing returns.
const RETURN_STALL: Duration = Duration::from_secs(10);

/// What a scan does with the selected letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Look only (stats, list, export, dry runs).
    Peek,
    /// Back to the work queue as a fresh job (attempts reset, replays
    /// counted); the letter is acked only after its copy is confirmed.
    Replay {
        /// Replays per second at most; 0 = no limit.
        rate: u32,
    },
    /// Delete.
    Purge,
}

/// Which queue a scan reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Source {
    /// The dead-letter queue; a replay copy is a fresh start
    /// ([`DeadLetter::replay_properties`]).
    #[default]
    Dead,
    /// The held queue (jobs of paused campaigns); a "replay" is the resume
    /// of a parked job: back to work with its story as it was (attempts,
    /// class, last error).
    Held,
}

impl Source {
    /// The queue's name.
    pub fn queue(self, topology: &Topology) -> String {
        match self {
            Source::Dead => topology.dead_queue(),
            Source::Held => topology.held_queue(),
        }
    }
}

/// How a scan runs.
#[derive(Debug, Clone)]
pub struct ScanOptions {
    /// What to do with each selected letter.
    pub action: Action,
    /// The queue read.
    pub source: Source,
    /// Largest prefetch of a consumer the scan opens (at most 65,535).
    pub consumer_window: u16,
    /// Replay copies published but not yet confirmed, at most.
    pub confirm_window: usize,
    /// Cancelled = stop reading, settle what is in flight, return the rest.
    pub cancel: Option<CancellationToken>,
    /// How often [`Observer::progress`] hears about a running scan.
    pub progress_every: Duration,
    /// Letters a scan may hold on the broker at once (`None`: no bound).
    /// Every letter read and not moved is held until the end of the run;
    /// measured on 3.10.8, a held letter costs the broker about 300 bytes
    /// (queue and channel bookkeeping; bodies stay on disk), plus the
    /// windows in flight (docs/src/dlq.md, "What a scan promises"). At the
    /// bound the scan stops with [`Stop::HoldLimit`].
    pub max_held: Option<usize>,
}

/// Default [`ScanOptions::max_held`]: about 300 MiB of broker memory
/// while held (measured: +280 MiB for a million letters).
pub const DEFAULT_MAX_HELD: usize = 1_000_000;

impl ScanOptions {
    /// Peeks read in windows of up to 65,535 letters; replay and purge in
    /// windows of up to [`ACTION_WINDOW`], because every ack makes RabbitMQ
    /// walk the channel's unacked deliveries (letters held in front of it).
    pub fn new(action: Action) -> ScanOptions {
        ScanOptions {
            action,
            source: Source::Dead,
            consumer_window: match action {
                Action::Peek => MAX_PREFETCH,
                Action::Replay { .. } | Action::Purge => ACTION_WINDOW,
            },
            confirm_window: 512,
            cancel: None,
            progress_every: Duration::from_millis(100),
            max_held: Some(DEFAULT_MAX_HELD),
        }
    }

    /// A look-only scan with the default windows.
    pub fn peek() -> ScanOptions {
        ScanOptions::new(Action::Peek)
    }

    /// Stops the scan when `cancel` is cancelled (Ctrl-C): letters in
    /// flight are settled, the rest are returned.
    pub fn with_cancel(mut self, cancel: CancellationToken) -> ScanOptions {
        self.cancel = Some(cancel);
        self
    }
}

/// Whether the scan should go on after a selected letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// Go on reading.
    Continue,
    /// Stop reading (e.g. the reader of the output went away).
    Stop,
}

/// Where a scan is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Letters are being read (and replayed or purged).
    Reading,
    /// Reading is over and copies in flight are settled: every letter read
    /// and not moved is held, about to be returned to the queue.
    Holding,
    /// Every held letter is back in the queue; the report is ready.
    Finished,
}

/// A running scan's numbers, for progress bars.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// Where the scan is.
    pub phase: Phase,
    /// Ready letters when the scan started: it reads at most this many.
    pub depth_at_start: u32,
    /// Letters read so far.
    pub read: usize,
    /// Letters selected so far.
    pub selected: usize,
    /// Replayed or purged so far.
    pub moved: usize,
    /// Replays whose copy was not confirmed so far.
    pub failed: usize,
    /// Time since the scan started.
    pub elapsed: Duration,
}

/// Hears about a scan as it goes: every selected letter, and progress.
pub trait Observer {
    /// A selected letter, before its action is applied.
    fn selected(&mut self, letter: &DeadLetter) -> Flow;
    /// Called every [`ScanOptions::progress_every`], and at each phase change.
    fn progress(&mut self, _progress: &Progress) {}
}

impl<F: FnMut(&DeadLetter)> Observer for F {
    fn selected(&mut self, letter: &DeadLetter) -> Flow {
        self(letter);
        Flow::Continue
    }
}

/// Why reading stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// Read as many letters as the queue held at the start.
    Depth,
    /// The queue had no more ready letters before the depth at the start
    /// was read: something else took or removed some (a consumer that is
    /// not mmsend's, an expiry, a purge). Not a complete run.
    QueueEmpty,
    /// The limit was reached or every wanted letter was found.
    Selected,
    /// The observer asked to stop.
    Observer,
    /// Cancelled.
    Interrupted,
    /// [`ScanOptions::max_held`] letters were held.
    HoldLimit,
}

/// What a scan did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanReport {
    /// The DLQ's name.
    pub queue: String,
    /// Ready letters when the scan started (the bound).
    pub depth_at_start: u32,
    /// Letters read (at most `depth_at_start`).
    pub read: usize,
    /// Letters the selection took.
    pub selected: usize,
    /// Letters whose replay copy was confirmed, then acked.
    pub replayed: usize,
    /// Letters deleted.
    pub purged: usize,
    /// Replays whose copy was not confirmed (the letter stays in the DLQ).
    pub failed: usize,
    /// Letters of an exact set that were not found (already gone).
    pub missing: usize,
    /// Why reading stopped.
    pub stop: Stop,
    /// Wall time of the scan.
    pub seconds: f64,
}

impl ScanReport {
    /// Whether every letter that was in the queue at the start was looked
    /// at, so `selected` counts every match. A run that found the queue
    /// dry early ([`Stop::QueueEmpty`]) did not: letters it never saw may
    /// come back (another consumer's, returned).
    pub fn counted_all(&self) -> bool {
        self.stop == Stop::Depth
    }
}

/// One consumer of the scan and the delivery tags it received.
struct Run {
    /// Its own channel: RabbitMQ walks a channel's list of unacked
    /// deliveries on every ack, so the letters a run holds must not sit in
    /// front of another run's acks.
    channel: Channel,
    tag: String,
    /// `None` once cancelled.
    consumer: Option<lapin::Consumer>,
    /// The prefetch it was opened with.
    window: u16,
    delivered: u64,
    /// Acks of its letters sent while it was open: each gives it one more
    /// credit (a quorum queue refills a consumer's credit on settle).
    refilled: u64,
    /// Delivery tags of this run that are held (to be returned).
    held: Vec<u64>,
}

impl Run {
    /// Deliveries RabbitMQ may still send it.
    fn credit(&self) -> u64 {
        (u64::from(self.window) + self.refilled).saturating_sub(self.delivered)
    }
}

/// A replay copy awaiting its confirm.
struct InFlight {
    delivery_tag: u64,
    run: usize,
    job_id: Option<String>,
    confirm: Pending,
}

/// The scan's mutable state, so that clean-up can run on every path.
struct Engine<'a> {
    queue: String,
    conn: &'a Connection,
    /// For the queue's counts; each run reads on a channel of its own.
    channel: Channel,
    runs: Vec<Run>,
    in_flight: VecDeque<InFlight>,
    /// Letters held so far.
    held: usize,
    report: ScanReport,
    started: Instant,
    last_progress: Instant,
    /// When the last letter was acked ([`ACK_DRAIN`]).
    last_ack: Option<Instant>,
    options: &'a ScanOptions,
}

/// Scans the DLQ once: reads at most the letters it held at the start,
/// tells `observer` about every selected one and applies `options.action`
/// to it. See the module docs for the rules it keeps.
///
/// The future is `Send` when the observer is, so a server can run scans on
/// its runtime's worker threads (`tokio::spawn`); a `&mut dyn Observer`
/// works too.
pub async fn scan<O: Observer + ?Sized>(
    conn: &Connection,
    topology: &Topology,
    selection: impl Into<Selection>,
    options: &ScanOptions,
    observer: &mut O,
) -> Result<ScanReport, DlqError> {
    let queue = options.source.queue(topology);
    let amqp = amqp_error(&queue);
    let channel = conn.create_channel().await.map_err(amqp)?;
    let Some(state) = passive_declare(&channel, &queue).await.map_err(amqp)? else {
        return Err(DlqError::Missing { queue });
    };
    let lock = match ReaderLock::take(conn, &queue).await {
        Ok(Some(lock)) => lock,
        Ok(None) => {
            let _ = channel.close(200, "busy".into()).await;
            return Err(DlqError::Busy {
                queue,
                // the holder may not have opened its consumers yet
                consumers: state.consumer_count().max(1),
            });
        }
        Err(e) => {
            let _ = channel.close(200, "no lock".into()).await;
            return Err(amqp(e));
        }
    };
    let result = scan_locked(conn, topology, channel, selection.into(), options, observer).await;
    lock.release().await;
    result
}

/// A broker error on `queue`, as a [`DlqError`].
fn amqp_error(queue: &str) -> impl Fn(lapin::Error) -> DlqError + Copy + '_ {
    move |source| DlqError::Amqp {
        queue: queue.to_string(),
        source,
    }
}

/// [`scan`] once it holds the [`ReaderLock`].
async fn scan_locked<O: Observer + ?Sized>(
    conn: &Connection,
    topology: &Topology,
    channel: Channel,
    selection: Selection,
    options: &ScanOptions,
    observer: &mut O,
) -> Result<ScanReport, DlqError> {
    let queue = options.source.queue(topology);
    let amqp = amqp_error(&queue);
    let mut waited = Duration::ZERO;
    let state = loop {
        let Some(state) = passive_declare(&channel, &queue).await.map_err(amqp)? else {
            return Err(DlqError::Missing { queue });
        };
        // No other mmsend reader can start now; a consumer still on the DLQ
        // is one that is not mmsend's (it would take letters from under the
        // scan), or a scan that just ended, whose consumers stay for a
        // moment until the queue has processed its channel's close.
        if state.consumer_count() == 0 {
            break state;
        }
        if waited >= BUSY_GRACE {
            let _ = channel.close(200, "busy".into()).await;
            return Err(DlqError::Busy {
                queue,
                consumers: state.consumer_count(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    };
    let publisher = match options.action {
        Action::Replay { .. } => Some(
            Publisher::open(conn, topology.exchange())
                .await
                .map_err(amqp)?,
        ),
        _ => None,
    };
    let started = Instant::now();
    let mut engine = Engine {
        report: ScanReport {
            queue: queue.clone(),
            depth_at_start: state.message_count(),
            read: 0,
            selected: 0,
            replayed: 0,
            purged: 0,
            failed: 0,
            missing: 0,
            stop: Stop::Depth,
            seconds: 0.0,
        },
        queue,
        conn,
        channel,
        runs: Vec::new(),
        in_flight: VecDeque::new(),
        held: 0,
        started,
        last_progress: started,
        last_ack: None,
        options,
    };
    let mut selector = Selector::new(selection);
    let read = engine
        .read(
            &mut selector,
            publisher.as_ref(),
            &topology.send_queue(),
            observer,
        )
        .await;
    // Whatever happened, settle the copies in flight, take what the open
    // consumer is still owed, and return what is held: the queue keeps every
    // letter that was not moved.
    let settled = engine.settle_in_flight(0).await;
    let closed = engine.close_run().await;
    observer.progress(&engine.progress(Phase::Holding));
    let returned = engine.return_in_order().await;
    if let Some(acked) = engine.last_ack {
        tokio::time::sleep(ACK_DRAIN.saturating_sub(acked.elapsed())).await;
    }
    if let Some(p) = publisher {
        let _ = p.channel().close(200, "done".into()).await;
    }
    for run in &engine.runs {
        let _ = run.channel.close(200, "done".into()).await;
    }
    let _ = engine.channel.close(200, "done".into()).await;
    engine.report.missing = selector.missing();
    engine.report.seconds = engine.started.elapsed().as_secs_f64();
    observer.progress(&engine.progress(Phase::Finished));
    let report = engine.report;
    let failure = match (read, settled, closed, returned) {
        (Ok(stop), Ok(()), Ok(()), Ok(())) => return Ok(ScanReport { stop, ..report }),
        (Err(e), ..) | (_, Err(e), ..) | (_, _, Err(e), _) | (.., Err(e)) => e,
    };
    Err(DlqError::Aborted {
        queue: report.queue.clone(),
        replayed: report.replayed,
        purged: report.purged,
        source: Box::new(failure),
    })
}

impl Engine<'_> {
    fn progress(&self, phase: Phase) -> Progress {
        Progress {
            phase,
            depth_at_start: self.report.depth_at_start,
            read: self.report.read,
            selected: self.report.selected,
            moved: self.report.replayed + self.report.purged,
            failed: self.report.failed,
            elapsed: self.started.elapsed(),
        }
    }

    fn amqp(&self, source: lapin::Error) -> DlqError {
        DlqError::Amqp {
            queue: self.queue.clone(),
            source,
        }
    }

    /// Marks a delivery as held (returned at the end).
    fn hold(&mut self, run: usize, tag: u64) {
        self.runs[run].held.push(tag);
        self.held += 1;
    }

    /// Letters the scan may still take on: the depth left, and room under
    /// the hold bound.
    fn budget(&self) -> u64 {
        let depth_left = (self.report.depth_at_start as usize).saturating_sub(self.report.read);
        let room = self
            .options
            .max_held
            .map_or(usize::MAX, |m| m.saturating_sub(self.held));
        depth_left.min(room) as u64
    }

    fn open_runs(&self) -> usize {
        self.runs.iter().filter(|r| r.consumer.is_some()).count()
    }

    /// Acks one delivery of `run`; an open consumer gets the credit back.
    async fn ack(&mut self, run: usize, tag: u64) -> Result<(), DlqError> {
        self.runs[run]
            .channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(|e| self.amqp(e))?;
        self.last_ack = Some(Instant::now());
        let r = &mut self.runs[run];
        if r.consumer.is_some() {
            r.refilled += 1;
        }
        Ok(())
    }

    /// Opens the next consumer with credit for at most `want` letters.
    async fn open_run(&mut self, want: usize) -> Result<(), DlqError> {
        let grown = self
            .runs
            .last()
            .map_or(FIRST_WINDOW, |r| r.window.saturating_mul(4));
        let window = u16::try_from(want)
            .unwrap_or(MAX_PREFETCH)
            .min(grown)
            .min(self.options.consumer_window)
            .max(1);
        let channel = self.conn.create_channel().await.map_err(|e| self.amqp(e))?;
        channel
            .basic_qos(window, BasicQosOptions { global: false })
            .await
            .map_err(|e| self.amqp(e))?;
        let tag = format!(
            "mmsend-dlq-{:05}-{:08x}",
            self.runs.len(),
            rand::random::<u32>()
        );
        let consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.amqp(e))?;
        self.runs.push(Run {
            channel,
            tag,
            consumer: Some(consumer),
            window,
            delivered: 0,
            refilled: 0,
            held: Vec::new(),
        });
        Ok(())
    }

    /// Cancels the open consumer once its credit is spent: RabbitMQ then has
    /// nothing more to send it, so nothing can arrive after the cancel.
    async fn cancel_run(&mut self, run: usize) -> Result<(), DlqError> {
        if self.runs[run].consumer.take().is_none() {
            return Ok(());
        }
        let tag = self.runs[run].tag.clone();
        self.runs[run]
            .channel
            .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
            .await
            .map_err(|e| self.amqp(e))
    }

    /// The next delivery of the open consumer; `Ok(None)` when it stayed
    /// idle for [`IDLE_CHECK`].
    async fn next_delivery(
        &mut self,
        run: usize,
        cancel: Option<&CancellationToken>,
    ) -> Result<Option<lapin::message::Delivery>, NextError> {
        let Some(consumer) = self.runs[run].consumer.as_mut() else {
            return Ok(None);
        };
        let never = CancellationToken::new();
        let cancel = cancel.unwrap_or(&never);
        let next = tokio::select! {
            biased;
            _ = cancel.cancelled() => return Err(NextError::Interrupted),
            d = consumer.next() => d,
            _ = tokio::time::sleep(IDLE_CHECK) => return Ok(None),
        };
        match next {
            Some(Ok(d)) => {
                self.runs[run].delivered += 1;
                Ok(Some(d))
            }
            Some(Err(e)) => Err(NextError::Failed(self.amqp(e))),
            // RabbitMQ cancelled it (the queue was deleted)
            None => {
                self.runs[run].consumer = None;
                Err(NextError::Failed(DlqError::Cancelled {
                    queue: self.queue.clone(),
                }))
            }
        }
    }

    /// Reads until the depth, the selection, the observer or a cancel stops it.
    async fn read<O: Observer + ?Sized>(
        &mut self,
        selector: &mut Selector,
        publisher: Option<&Publisher>,
        send_queue: &str,
        observer: &mut O,
    ) -> Result<Stop, DlqError> {
        let depth = self.report.depth_at_start as usize;
        let cancel = self.options.cancel.clone();
        let limiter = match self.options.action {
            Action::Replay { rate } => std::num::NonZeroU32::new(rate)
                .map(|r| governor::RateLimiter::direct(governor::Quota::per_second(r))),
            _ => None,
        };
        // since when the queue showed no ready letter while a consumer with
        // credit got nothing
        let mut idle_since: Option<Instant> = None;
        loop {
            // copies confirmed meanwhile count now, not at the end
            if !self.in_flight.is_empty() {
                self.settle_confirmed().await?;
                if self.last_progress.elapsed() >= self.options.progress_every {
                    self.last_progress = Instant::now();
                    observer.progress(&self.progress(Phase::Reading));
                }
            }
            if self.report.read >= depth {
                return Ok(Stop::Depth);
            }
            if selector.done() {
                return Ok(Stop::Selected);
            }
            if cancel.as_ref().is_some_and(|c| c.is_cancelled()) {
                return Ok(Stop::Interrupted);
            }
            if self.options.max_held.is_some_and(|m| self.held >= m) {
                return Ok(Stop::HoldLimit);
            }
            // Peeks keep one more consumer open than they read from, so the
            // broker reads the next window from disk while this one is
            // processed. Replay and purge ack as they go, which refills the
            // open consumer: they open one at a time, or its refills would
            // come after the next consumer's letters.
            let lookahead = if self.options.action == Action::Peek {
                2
            } else {
                1
            };
            while self.open_runs() < lookahead {
                let promised: u64 = self
                    .runs
                    .iter()
                    .filter(|r| r.consumer.is_some())
                    .map(Run::credit)
                    .sum();
                let budget = self.budget();
                if promised >= budget {
                    break;
                }
                self.open_run((budget - promised) as usize).await?;
            }
            let Some(run) = self.runs.iter().position(|r| r.consumer.is_some()) else {
                return Err(DlqError::Cancelled {
                    queue: self.queue.clone(),
                });
            };
            let delivery = match self.next_delivery(run, cancel.as_ref()).await {
                Ok(Some(d)) => {
                    idle_since = None;
                    d
                }
                // Idle with credit: nothing is ready (someone else took the
                // rest), or the broker is slow.
                Ok(None) => {
                    if self.dry(run, &mut idle_since).await? {
                        return Ok(Stop::QueueEmpty);
                    }
                    continue;
                }
                Err(NextError::Interrupted) => return Ok(Stop::Interrupted),
                Err(NextError::Failed(e)) => return Err(e),
            };
            self.report.read += 1;
            let tag = delivery.delivery_tag;
            let letter = DeadLetter::new(delivery.data, delivery.properties);
            if self.last_progress.elapsed() >= self.options.progress_every {
                self.last_progress = Instant::now();
                observer.progress(&self.progress(Phase::Reading));
            }
            let stop = if !selector.take(&letter) {
                self.hold(run, tag);
                None
            } else {
                self.report.selected += 1;
                if observer.selected(&letter) == Flow::Stop {
                    self.hold(run, tag);
                    Some(Stop::Observer)
                } else {
                    self.act(run, tag, &letter, publisher, send_queue, limiter.as_ref())
                        .await?;
                    None
                }
            };
            // A consumer whose credit is spent gets nothing more: stop it
            // (replay acks may have refilled it meanwhile; then read on).
            if self.runs[run].consumer.is_some() && self.runs[run].credit() == 0 {
                self.cancel_run(run).await?;
            }
            if let Some(stop) = stop {
                return Ok(stop);
            }
        }
    }

    /// Applies the action to one selected letter.
    async fn act(
        &mut self,
        run: usize,
        tag: u64,
        letter: &DeadLetter,
        publisher: Option<&Publisher>,
        send_queue: &str,
        limiter: Option<&governor::DefaultDirectRateLimiter>,
    ) -> Result<(), DlqError> {
        match self.options.action {
            Action::Peek => self.hold(run, tag),
            Action::Purge => {
                self.ack(run, tag).await?;
                self.report.purged += 1;
            }
            Action::Replay { .. } => {
                let Some(publisher) = publisher else {
                    self.hold(run, tag);
                    return Ok(());
                };
                if let Some(l) = limiter {
                    self.settle_confirmed().await?;
                    l.until_ready().await;
                    self.settle_confirmed().await?;
                }
                let props = match self.options.source {
                    Source::Dead => letter.replay_properties(chrono::Utc::now()),
                    Source::Held => letter.story.restamp(&letter.properties),
                };
                match publisher.send(send_queue, &letter.body, props).await {
                    Ok(confirm) => self.in_flight.push_back(InFlight {
                        delivery_tag: tag,
                        run,
                        job_id: letter.job_id(),
                        confirm,
                    }),
                    Err(e) => {
                        tracing::warn!(error = %e, job_id = ?letter.job_id(), "replay copy not sent; the letter stays in the DLQ");
                        self.report.failed += 1;
                        self.hold(run, tag);
                    }
                }
                self.settle_confirmed().await?;
                self.settle_in_flight(self.options.confirm_window.max(1) - 1)
                    .await?;
            }
        }
        Ok(())
    }

    /// Settles, without waiting, the copies at the front of the window whose
    /// confirm has already come (in order: it stops at the first one still
    /// outstanding).
    async fn settle_confirmed(&mut self) -> Result<(), DlqError> {
        while let Some(front) = self.in_flight.front_mut() {
            let Some(verdict) = front.confirm.try_wait() else {
                break;
            };
            let Some(f) = self.in_flight.pop_front() else {
                break;
            };
            self.settle(f.run, f.delivery_tag, f.job_id, verdict)
                .await?;
        }
        Ok(())
    }

    /// Acks the letter of a confirmed copy, holds the letter of one that
    /// was not confirmed.
    async fn settle(
        &mut self,
        run: usize,
        delivery_tag: u64,
        job_id: Option<String>,
        verdict: Result<(), crate::broker::PublishError>,
    ) -> Result<(), DlqError> {
        match verdict {
            Ok(()) => {
                self.ack(run, delivery_tag).await?;
                self.report.replayed += 1;
            }
            Err(e) => {
                tracing::warn!(error = %e, job_id = ?job_id, "replay copy not confirmed; the letter stays in the DLQ");
                self.report.failed += 1;
                self.hold(run, delivery_tag);
            }
        }
        Ok(())
    }

    /// Waits for confirms until at most `keep` copies are in flight; acks the
    /// letter of every confirmed copy, holds the others.
    async fn settle_in_flight(&mut self, keep: usize) -> Result<(), DlqError> {
        while self.in_flight.len() > keep {
            let Some(f) = self.in_flight.pop_front() else {
                break;
            };
            let verdict = f.confirm.wait().await;
            self.settle(f.run, f.delivery_tag, f.job_id, verdict)
                .await?;
        }
        Ok(())
    }

    /// After reading: takes (and holds, unread) what the open consumer is
    /// still owed, then cancels it. Its credit can only be left when the scan
    /// stopped early or the queue ran dry.
    async fn close_run(&mut self) -> Result<(), DlqError> {
        while let Some(run) = self.runs.iter().position(|r| r.consumer.is_some()) {
            let mut idle_since: Option<Instant> = None;
            while self.runs[run].credit() > 0 {
                match self.next_delivery(run, None).await {
                    Ok(Some(d)) => {
                        idle_since = None;
                        self.hold(run, d.delivery_tag);
                    }
                    Ok(None) => {
                        if self.dry(run, &mut idle_since).await? {
                            // A letter arriving during the cancel may still
                            // be sent; the final sweep returns it.
                            break;
                        }
                    }
                    Err(NextError::Interrupted) => break,
                    Err(NextError::Failed(e)) => return Err(e),
                }
            }
            self.cancel_run(run).await?;
        }
        Ok(())
    }

    /// Whether `run`, idle with credit, can expect nothing more: the queue
    /// shows no ready letter and the run has received its whole window (what
    /// it still has is credit refilled by acks, used only by new letters).
    /// While part of the window is missing, RabbitMQ may have assigned it
    /// and still be reading it from disk (those letters count as not
    /// ready), so only [`DRY_AFTER`] without ready letters decides.
    async fn dry(&self, run: usize, idle_since: &mut Option<Instant>) -> Result<bool, DlqError> {
        if self.ready().await? > 0 {
            *idle_since = None;
            return Ok(false);
        }
        let r = &self.runs[run];
        Ok(r.delivered >= u64::from(r.window)
            || idle_since.get_or_insert_with(Instant::now).elapsed() >= DRY_AFTER)
    }

    /// Ready letters in the queue now.
    async fn ready(&self) -> Result<u32, DlqError> {
        let q = self
            .channel
            .queue_declare(
                self.queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(|e| self.amqp(e))?;
        Ok(q.message_count())
    }

    /// Returns every held letter with `basic.nack(multiple)` in chunks of
    /// [`RETURN_CHUNK`] consecutive tags of one run, run after run, keeping
    /// at most [`RETURN_WINDOW`] chunks unapplied (and none of the previous
    /// run's when a run starts: each run has its own channel, and channels do
    /// not order each other's commands), then sweeps up anything else the
    /// channels still hold.
    ///
    /// Why the window: a RabbitMQ 3.x channel with 32 or more commands
    /// pending on a quorum queue stashes further returns and later sends
    /// them merged into one, which 3.x requeues in hash order (seen on
    /// 3.10.8: the order broke after the 33rd chunk). The queue's ready count
    /// says how many returns it has applied, so the engine waits for it; the
    /// first chunk goes alone, so the acks of a replay or purge are applied
    /// (commands apply in order) before returns can pile up behind them.
    async fn return_in_order(&mut self) -> Result<(), DlqError> {
        // (run, last tag, letters) per chunk: each run has its own channel,
        // so a chunk's `nack(multiple)` returns only that run's letters.
        let mut chunks: Vec<(usize, u64, u64)> = Vec::new();
        for (i, run) in self.runs.iter_mut().enumerate() {
            let mut held = std::mem::take(&mut run.held);
            // unconfirmed replays were held after later letters
            held.sort_unstable();
            chunks.extend(
                held.chunks(RETURN_CHUNK)
                    .filter_map(|c| Some((i, *c.last()?, c.len() as u64))),
            );
        }
        if !chunks.is_empty() {
            let base = u64::from(self.ready().await?);
            let mut sent = 0u64;
            // cumulative letter counts of chunks sent but not yet seen applied
            let mut unapplied: VecDeque<u64> = VecDeque::new();
            let mut window = 1;
            let mut stalled_since = Instant::now();
            let mut next = chunks.into_iter().peekable();
            let mut last_run = None;
            while next.peek().is_some() || !unapplied.is_empty() {
                // Channels do not order each other's commands: the first
                // chunk of the next run waits until the last one's applied.
                let may_send = match next.peek() {
                    Some((run, ..)) => {
                        unapplied.len() < window
                            && (last_run.is_none_or(|r| r == *run) || unapplied.is_empty())
                    }
                    None => false,
                };
                if may_send {
                    if let Some((run, tag, len)) = next.next() {
                        self.nack(run, tag, true).await?;
                        last_run = Some(run);
                        sent += len;
                        unapplied.push_back(sent);
                        continue;
                    }
                }
                let applied = u64::from(self.ready().await?).saturating_sub(base);
                let before = unapplied.len();
                while unapplied.front().is_some_and(|&n| n <= applied) {
                    unapplied.pop_front();
                }
                if unapplied.len() < before {
                    window = RETURN_WINDOW;
                    stalled_since = Instant::now();
                } else if stalled_since.elapsed() > RETURN_STALL {
                    // The letters are returned (the broker has the nacks);
                    // only their order is no longer watched.
                    tracing::warn!(
                        queue = %self.queue,
                        "the queue did not show returned letters for {RETURN_STALL:?}; returning the rest without waiting"
                    );
                    window = usize::MAX;
                    unapplied.clear();
                } else {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
        }
        // Anything else a channel holds (a letter that reached a drained
        // queue while its consumer was being cancelled): after the others,
        // where it belongs.
        for run in 0..self.runs.len() {
            self.nack(run, 0, true).await?;
        }
        Ok(())
    }

    async fn nack(&self, run: usize, tag: u64, multiple: bool) -> Result<(), DlqError> {
        self.runs[run]
            .channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple,
                    requeue: true,
                },
            )
            .await
            .map_err(|e| self.amqp(e))
    }
}

/// The single-reader rule, taken atomically: one scan of a DLQ at a time,
/// across processes and within one connection.
///
/// Reading the DLQ's consumer count and then consuming is a race (two
/// readers both see 0, then share the letters). RabbitMQ's own exclusive
/// consumers cannot close it on the DLQ: quorum queues accept the flag but
/// do not enforce it (rabbitmq-website#1973; RabbitMQ 3.10 to 4.x hand a
/// second "exclusive" consumer its share), and a scan opens several
/// consumers anyway. So the lock is a queue of its own,
/// `<prefix>.dead.reader-lock`, classic and connection-exclusive, held by
/// an exclusive consumer:
///
/// - a reader on **another connection** cannot declare it while it exists
///   (405 RESOURCE_LOCKED);
/// - a reader on **the same connection** (the console runs its scans on one)
///   cannot consume from it while the holder does (403 ACCESS_REFUSED: a
///   classic queue enforces exclusive consumers);
/// - the holder **deletes** it when its scan is over (its letters back in
///   the DLQ). A reader that declared it just before the delete finds it
///   gone when it consumes (404) and declares it again.
///
/// A holder that dies frees it: RabbitMQ deletes an exclusive queue with
/// its connection. A scan future dropped half-way (its channels close, its
/// letters go back) leaves the queue on its connection without a consumer:
/// readers on that connection take it at once, readers on others once
/// `x-expires` ([`LOCK_EXPIRES`]) has removed it.
struct ReaderLock {
    channel: Channel,
    name: String,
    /// Held for the lock's lifetime (a dropped consumer is cancelled).
    _consumer: lapin::Consumer,
}

/// How long an abandoned reader lock (no consumer, connection still open)
/// stays before RabbitMQ deletes it.
const LOCK_EXPIRES: Duration = Duration::from_secs(30);

impl ReaderLock {
    /// Takes the lock of `dead_queue`; `None` when another reader holds it.
    async fn take(conn: &Connection, dead_queue: &str) -> Result<Option<ReaderLock>, lapin::Error> {
        let name = format!("{dead_queue}.reader-lock");
        let mut args = FieldTable::default();
        // classic whatever the vhost's default queue type: only a classic
        // queue can be exclusive and enforces exclusive consumers
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("classic".into()),
        );
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(LOCK_EXPIRES.as_millis() as i64),
        );
        // a few tries: each 404 means a holder on this connection has just
        // let go
        for _ in 0..5 {
            // each refusal closes the channel it came on
            let channel = conn.create_channel().await?;
            let declared = channel
                .queue_declare(
                    name.as_str().into(),
                    QueueDeclareOptions {
                        exclusive: true,
                        ..Default::default()
                    },
                    args.clone(),
                )
                .await;
            match declared {
                Ok(_) => {}
                Err(e) if reply_code(&e) == Some(RESOURCE_LOCKED) => return Ok(None),
                Err(e) => return Err(e),
            }
            let tag = format!("mmsend-dlq-lock-{:08x}", rand::random::<u32>());
            let consumed = channel
                .basic_consume(
                    name.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions {
                        exclusive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            match consumed {
                Ok(consumer) => {
                    return Ok(Some(ReaderLock {
                        channel,
                        name,
                        _consumer: consumer,
                    }))
                }
                Err(e) if reply_code(&e) == Some(ACCESS_REFUSED) => return Ok(None),
                Err(e) if reply_code(&e) == Some(NOT_FOUND) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// Lets go: deletes the lock queue while still its only consumer (so
    /// it cannot be taken from under another reader), then closes the
    /// channel. A failure leaves it to the connection's close or to
    /// `x-expires`.
    async fn release(self) {
        if let Err(e) = self
            .channel
            .queue_delete(self.name.as_str().into(), QueueDeleteOptions::default())
            .await
        {
            tracing::debug!(error = %e, lock = %self.name, "the DLQ reader lock was not deleted; it goes with the connection or expires");
        }
        let _ = self.channel.close(200, "done".into()).await;
    }
}

/// AMQP reply codes the lock tells apart.
const ACCESS_REFUSED: u16 = 403;
const NOT_FOUND: u16 = 404;
const RESOURCE_LOCKED: u16 = 405;

/// The broker's reply code of a channel error, if `e` is one.
fn reply_code(e: &lapin::Error) -> Option<u16> {
    match e.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// Why no delivery came.
enum NextError {
    Interrupted,
    Failed(DlqError),
}

/// Compile-time check: a scan whose observer is `Send` is a `Send` future
/// (the dead-letter console runs its scans with `tokio::spawn`).
#[cfg(test)]
#[allow(dead_code)]
fn a_scan_with_a_send_observer_is_send(conn: &Connection, topology: &Topology) {
    fn send<T: Send>(_: T) {}
    let mut count = 0usize;
    let mut observer = |_: &DeadLetter| count += 1;
    send(scan(
        conn,
        topology,
        super::Filter::default(),
        &ScanOptions::peek(),
        &mut observer,
    ));
}
