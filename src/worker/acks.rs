//! Acks of one consume channel, batched.
//!
//! A job task settles its delivery here instead of acking it on its own:
//! [`Acks::ack`] queues the delivery tag and returns; a flusher sends the
//! queued tags within [`ACK_WINDOW`], as one `basic.ack` with `multiple`
//! for every tag below the lowest delivery still being worked on, and one
//! plain `basic.ack` for each tag above it (a job that finished while an
//! earlier one still runs). At 0 ms API latency most tags are contiguous, so
//! most acks share a frame.
//!
//! The at-least-once rule does not change: a tag is queued only after the
//! job's outcome is durable (sent; or its retry or dead copy confirmed by
//! the broker), so batching only *delays* an ack by at most the window. A
//! crash inside that window redelivers the job, exactly as a crash just
//! before an unbatched ack would; the redelivered flag marks it as maybe
//! sent (see `classify::route`), and the send ledger, when on, suppresses it.
//!
//! `multiple` acks every unacked tag up to the one named, so a tag must
//! never be covered while its job is still running or before its nack (a
//! requeue) has reached the broker: every delivery is registered as open
//! when it arrives ([`Acks::delivered`]), and it stays open until it is
//! queued for an ack or its nack frame has been written. Frames of one
//! channel reach the broker in the order they were written.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::Channel;
use tokio::sync::Notify;
use tracing::{debug, warn};

/// The longest a settled delivery's ack waits to share a frame.
pub(crate) const ACK_WINDOW: Duration = Duration::from_millis(2);

type Tag = u64;

#[derive(Default)]
struct State {
    /// Delivered and not settled yet: never covered by a `multiple` ack.
    open: BTreeSet<Tag>,
    /// Settled as sent, retried or dead; the ack not written yet.
    queued: BTreeSet<Tag>,
    /// Ack frames written and tags they acked, for the session's summary.
    frames: u64,
    acked: u64,
}

struct Inner {
    channel: Channel,
    state: Mutex<State>,
    wake: Notify,
}

/// How to write the `queued` acks while `open` deliveries are unsettled:
/// one `multiple` ack up to the highest queued tag below the lowest open
/// one (with how many tags it settles), and a plain ack for each of the
/// others.
fn plan(open: &BTreeSet<Tag>, queued: BTreeSet<Tag>) -> (Option<(Tag, u64)>, Vec<Tag>) {
    let (below, above): (Vec<Tag>, Vec<Tag>) = match open.first() {
        Some(&low) => queued.into_iter().partition(|&t| t < low),
        None => (queued.into_iter().collect(), Vec::new()),
    };
    (below.last().map(|&t| (t, below.len() as u64)), above)
}

/// The acks of one consume channel (cheap to clone).
#[derive(Clone)]
pub(crate) struct Acks {
    inner: Arc<Inner>,
}

impl Acks {
    /// Acks for `channel`; `run` must be spawned for queued acks to be sent.
    pub(crate) fn new(channel: Channel) -> Acks {
        Acks {
            inner: Arc::new(Inner {
                channel,
                state: Mutex::new(State::default()),
                wake: Notify::new(),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A delivery arrived; called by the consume loop before its job starts.
    pub(crate) fn delivered(&self, tag: Tag) {
        self.state().open.insert(tag);
    }

    /// The delivery's outcome is durable: ack it within [`ACK_WINDOW`].
    pub(crate) fn ack(&self, tag: Tag) {
        {
            let mut s = self.state();
            s.open.remove(&tag);
            s.queued.insert(tag);
        }
        self.inner.wake.notify_one();
    }

    /// Gives the delivery back to the queue (nack with requeue), now.
    pub(crate) async fn requeue(&self, tag: Tag) {
        let sent = self
            .inner
            .channel
            .basic_nack(
                tag,
                BasicNackOptions {
                    multiple: false,
                    requeue: true,
                },
            )
            .await;
        // written (or the channel is gone): it may be covered from now on
        self.state().open.remove(&tag);
        if let Err(e) = sent {
            warn!(error = %e, "nack failed; RabbitMQ will redeliver when the channel closes");
        }
    }

    /// Sends queued acks, every [`ACK_WINDOW`] while there are any, until
    /// the channel closes. Spawned once per session.
    pub(crate) async fn run(self) {
        loop {
            self.inner.wake.notified().await;
            tokio::time::sleep(ACK_WINDOW).await;
            if !self.flush().await {
                return;
            }
        }
    }

    /// Writes every queued ack now; `false` once the channel is closed.
    pub(crate) async fn flush(&self) -> bool {
        let (multiple, singles) = {
            let mut s = self.state();
            if s.queued.is_empty() {
                return true;
            }
            let queued = std::mem::take(&mut s.queued);
            let (multiple, singles) = plan(&s.open, queued);
            s.frames += u64::from(multiple.is_some()) + singles.len() as u64;
            s.acked += multiple.map_or(0, |(_, n)| n) + singles.len() as u64;
            (multiple.map(|(tag, _)| tag), singles)
        };
        let channel = &self.inner.channel;
        let mut result = Ok(());
        if let Some(tag) = multiple {
            result = channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await;
        }
        for tag in singles {
            if result.is_err() {
                break;
            }
            result = channel.basic_ack(tag, BasicAckOptions::default()).await;
        }
        match result {
            Ok(()) => true,
            Err(e) => {
                warn!(error = %e, "ack failed; RabbitMQ will redeliver the unacked jobs (the send ledger or Meta's cap stops a second send)");
                channel.status().connected()
            }
        }
    }

    /// Logs how many frames carried the session's acks.
    pub(crate) fn summary(&self) {
        let s = self.state();
        debug!(
            acked = s.acked,
            frames = s.frames,
            "acks of this session (batched)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(tags: &[Tag]) -> BTreeSet<Tag> {
        tags.iter().copied().collect()
    }

    #[test]
    fn a_multiple_ack_never_covers_an_open_delivery() {
        // 1-4 settled, 5 still running, 6 and 8 settled, 7 running
        let (multiple, singles) = plan(&set(&[5, 7]), set(&[1, 2, 3, 4, 6, 8]));
        assert_eq!(multiple, Some((4, 4)));
        assert_eq!(singles, vec![6, 8]);
        // nothing open: one frame for everything
        assert_eq!(plan(&set(&[]), set(&[3, 9, 10])), (Some((10, 3)), vec![]));
        // the lowest delivery still runs: no multiple ack at all
        assert_eq!(plan(&set(&[1]), set(&[2, 3])), (None, vec![2, 3]));
    }
}
