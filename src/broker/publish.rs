//! Confirmed, mandatory publishing: the only way mmsend puts a message on
//! RabbitMQ.
//!
//! A publish counts as done only when the broker has confirmed it (publisher
//! confirms) *and* routed it (`mandatory`: an unroutable message comes back
//! as a `basic.return` and is an error here, not a silent drop). The worker
//! acks a delivery only after the copy it published for it (retry tier or
//! dead-letter queue) is confirmed; on any error it nacks with requeue, so a
//! job is never lost between two queues, at worst duplicated.

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("RabbitMQ refused the message for {routing_key} (publisher nack; the queue may be full — x-overflow reject-publish)")]
    Nacked { routing_key: String },
    #[error("no queue is bound to {routing_key} (message returned: {reply}); run `mmsend topology declare`")]
    Returned { routing_key: String, reply: String },
    #[error("publish to {routing_key} failed: {source}")]
    Amqp {
        routing_key: String,
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
    pub async fn wait(self) -> Result<(), PublishError> {
        let routing_key = self.routing_key;
        let confirmation = self.confirm.await.map_err(|source| PublishError::Amqp {
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
}
