//! Settling deliveries: every delivery ends in exactly one ack, nack or reject.
//!
//! The acker travels with the job. The happy path settles it explicitly after
//! the result is in Redis; if a job is dropped on any other path (a panic, a
//! cancelled task, a bug) the guard's `Drop` nacks it back onto the queue, so
//! a delivery can never be silently held until the connection dies.

use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use lapin::Acker;

/// How a delivery was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// Done: the broker forgets the message.
    Ack,
    /// Transient failure: the broker redelivers (up to the delivery limit).
    Requeue,
    /// Poison: the broker dead-letters the message.
    DeadLetter,
}

/// Owns a delivery's acker until it is settled.
pub struct AckGuard {
    acker: Option<Acker>,
}

impl AckGuard {
    /// Takes ownership of a delivery's acker.
    pub fn new(acker: Acker) -> AckGuard {
        AckGuard { acker: Some(acker) }
    }

    /// Settles the delivery. Returns whether the broker got the settlement; a
    /// `false` means the channel was lost (for example during a connection
    /// recovery), in which case the broker redelivers the message and the
    /// write-once result store makes the retry harmless.
    pub async fn settle(mut self, how: Settlement) -> bool {
        let acker = self.acker.take().expect("a guard settles once");
        settle(&acker, how).await
    }
}

async fn settle(acker: &Acker, how: Settlement) -> bool {
    let outcome = match how {
        Settlement::Ack => acker.ack(BasicAckOptions::default()).await,
        Settlement::Requeue => {
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
        Settlement::DeadLetter => acker.reject(BasicRejectOptions { requeue: false }).await,
    };
    match outcome {
        Ok(true) => true,
        Ok(false) => {
            tracing::warn!(settlement = ?how, "delivery no longer settleable; the broker will redeliver it");
            false
        }
        Err(error) => {
            tracing::warn!(settlement = ?how, %error, "could not settle delivery; the broker will redeliver it");
            false
        }
    }
}

impl Drop for AckGuard {
    fn drop(&mut self) {
        if let Some(acker) = self.acker.take() {
            tracing::warn!("job dropped unsettled; requeueing its delivery");
            metrics::counter!("pleura_unsettled_drops_total").increment(1);
            // Drop cannot await; hand the nack to the runtime if there is one.
            // Without a runtime the process is ending and the broker requeues
            // the delivery when the connection closes anyway.
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move {
                    settle(&acker, Settlement::Requeue).await;
                });
            }
        }
    }
}
