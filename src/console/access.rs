//! The console's way to the broker: one AMQP connection (reopened when it
//! is lost) and the DLQ lane. A scan of the DLQ refuses to start while
//! anything else consumes it ([`DlqError::Busy`](crate::dlq::DlqError)),
//! so the console never runs two of its own at once: the snapshot's peek
//! and every action take the lane first and queue behind each other.

use std::sync::Arc;

use lapin::Connection;
use tokio::sync::{Mutex, MutexGuard};

use crate::broker::{self, ConnectError, Topology};

/// The connection and the lane.
pub(crate) struct Access {
    amqp_url: String,
    pub(crate) topology: Topology,
    conn: Mutex<Option<Arc<Connection>>>,
    lane: Mutex<()>,
}

impl Access {
    pub(crate) fn new(amqp_url: &str, topology: Topology) -> Access {
        Access {
            amqp_url: amqp_url.to_string(),
            topology,
            conn: Mutex::new(None),
            lane: Mutex::new(()),
        }
    }

    /// The open connection, or a new one if there is none or it was lost.
    pub(crate) async fn connection(&self) -> Result<Arc<Connection>, ConnectError> {
        let mut conn = self.conn.lock().await;
        if let Some(c) = conn.as_ref() {
            if c.status().connected() {
                return Ok(c.clone());
            }
        }
        let fresh = Arc::new(broker::connect(&self.amqp_url, "console").await?);
        *conn = Some(fresh.clone());
        Ok(fresh)
    }

    /// Waits for the DLQ lane: held for the whole of one scan.
    pub(crate) async fn lane(&self) -> MutexGuard<'_, ()> {
        self.lane.lock().await
    }

    /// Closes the connection (at shutdown).
    pub(crate) async fn close(&self) {
        if let Some(c) = self.conn.lock().await.take() {
            let _ = c.close(200, "console stopped".into()).await;
        }
    }
}
