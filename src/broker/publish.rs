//! Confirmed, mandatory publishing: the only way mmsend puts a message on
//! RabbitMQ.
//!
//! A publish counts as done only when the broker has confirmed it (publisher
//! confirms) *and* routed it (`mandatory`: an unroutable message comes back
//! as a `basic.return` and is an error here, not a silent drop). The worker
//! acks a delivery only after the copy it published for it (retry tier or
//! dead-letter queue) is confirmed; on any error it nacks with requeue, so a
//! job is never lost between two queues, at worst duplicated.
//!
//! Bulk publishers (`Producer::send_batch`, `mmsend enqueue`) keep many
//! confirms in flight through one [`ConfirmWindow`], which bounds them and
//! hands back each verdict, oldest first.

use std::collections::VecDeque;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

/// Why a confirmed publish did not land: the message is not in a queue and
/// the caller still owns it (a worker nacks the original with requeue).
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker nacked the publish, typically a full queue with
    /// `x-overflow: reject-publish`.
    #[error("RabbitMQ refused the message for {routing_key} (publisher nack; the queue may be full — x-overflow reject-publish)")]
    Nacked {
        /// The queue the message was meant for.
        routing_key: String,
    },
    /// The message was `mandatory` and no queue is bound to its routing key.
    #[error("no queue is bound to {routing_key} (message returned: {reply}); run `mmsend topology declare`")]
    Returned {
        /// The queue the message was meant for.
        routing_key: String,
        /// The broker's reply text (`NO_ROUTE`).
        reply: String,
    },
    /// The channel or connection failed before the confirm came.
    #[error("publish to {routing_key} failed: {source}")]
    Amqp {
        /// The queue the message was meant for.
        routing_key: String,
        /// The channel or connection error.
        #[source]
        source: lapin::Error,
    },
}

/// A channel in confirm mode that publishes to one exchange.
#[derive(Clone)]
pub struct Publisher {
    channel: Channel,
    exchange: String,
}

/// A publish sent but not yet confirmed; `wait` for the verdict. Lets a
/// producer keep many confirms in flight.
pub struct Pending {
    confirm: PublisherConfirm,
    routing_key: String,
}

impl Publisher {
    /// Opens a channel on `conn` and puts it in confirm mode.
    pub async fn open(conn: &Connection, exchange: &str) -> Result<Publisher, lapin::Error> {
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher {
            channel,
            exchange: exchange.to_string(),
        })
    }

    /// The confirm-mode channel, for callers that also consume or declare on it.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// Sends without waiting for the confirm.
    pub async fn send(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Pending, PublishError> {
        let confirm = self
            .channel
            .basic_publish(
                self.exchange.as_str().into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                body,
                properties,
            )
            .await
            .map_err(|source| PublishError::Amqp {
                routing_key: routing_key.to_string(),
                source,
            })?;
        Ok(Pending {
            confirm,
            routing_key: routing_key.to_string(),
        })
    }

    /// Publishes a results event on `stream` (JSON, persistent, message id
    /// from its job id) and waits for the confirm: the worker's and the
    /// tracker's events alike ([`crate::results`]).
    pub async fn publish_result(
        &self,
        stream: &str,
        event: &crate::results::ResultEvent,
    ) -> Result<(), PublishError> {
        // a struct of strings, numbers and a time always serializes
        let Ok(bytes) = serde_json::to_vec(event) else {
            return Ok(());
        };
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_message_id(crate::job::amqp_message_id(&event.job_id).into());
        self.publish(stream, &bytes, props).await
    }

    /// Sends and waits until the broker confirmed and routed the message.
    pub async fn publish(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.send(routing_key, body, properties).await?.wait().await
    }
}

impl Pending {
    /// Waits for the broker's verdict: `Ok` once the message is confirmed in
    /// a queue.
    pub async fn wait(self) -> Result<(), PublishError> {
        let confirmation = self.confirm.await;
        verdict(self.routing_key, confirmation)
    }

    /// The broker's verdict if it has already come, without waiting; `None`
    /// while the confirm is outstanding (then [`wait`](Self::wait) or ask
    /// again later).
    pub fn try_wait(&mut self) -> Option<Result<(), PublishError>> {
        use futures_util::FutureExt as _;
        let confirmation = (&mut self.confirm).now_or_never()?;
        Some(verdict(self.routing_key.clone(), confirmation))
    }
}

/// What a confirm (or its failure) means for the message.
fn verdict(
    routing_key: String,
    confirmation: Result<Confirmation, lapin::Error>,
) -> Result<(), PublishError> {
    let confirmation = confirmation.map_err(|source| PublishError::Amqp {
        routing_key: routing_key.clone(),
        source,
    })?;
    match confirmation {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(PublishError::Returned {
                routing_key,
                reply: format!("{} {}", returned.reply_code, returned.reply_text),
            })
        }
        Confirmation::Nack(None) => Err(PublishError::Nacked { routing_key }),
        // The channel is always in confirm mode; treat the impossible as
        // unconfirmed so the caller requeues rather than acks.
        Confirmation::NotRequested => Err(PublishError::Nacked { routing_key }),
    }
}

/// Publishes awaiting their confirms, at most `max` at once, each with a
/// caller's tag (a line number, an index) to report its verdict against.
///
/// Publish, then [`push`](Self::push) the [`Pending`]: once `max` are
/// outstanding, `push` waits for the oldest and returns its verdict, so the
/// broker never holds more than `max` unconfirmed messages of this window.
/// [`next`](Self::next) settles what is left at the end.
pub struct ConfirmWindow<T> {
    pending: VecDeque<(T, Pending)>,
    max: usize,
}

impl<T> ConfirmWindow<T> {
    /// A window of at most `max` (at least 1) outstanding confirms.
    pub fn new(max: usize) -> Self {
        ConfirmWindow {
            pending: VecDeque::new(),
            max: max.max(1),
        }
    }

    /// Adds a publish; when the window is full, waits for the oldest
    /// confirm and returns its tag and verdict.
    pub async fn push(
        &mut self,
        tag: T,
        pending: Pending,
    ) -> Option<(T, Result<(), PublishError>)> {
        self.pending.push_back((tag, pending));
        if self.pending.len() >= self.max {
            self.next().await
        } else {
            None
        }
    }

    /// Waits for the oldest outstanding confirm; `None` when none is left.
    pub async fn next(&mut self) -> Option<(T, Result<(), PublishError>)> {
        let (tag, pending) = self.pending.pop_front()?;
        Some((tag, pending.wait().await))
    }

    /// Confirms outstanding.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// No confirm outstanding.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }
}
