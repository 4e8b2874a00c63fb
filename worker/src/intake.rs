//! Intake: the channels, the consumers, the loop that hands deliveries to
//! job tasks, and the drain at shutdown.
//!
//! Two channels, one per scan queue, each with its own prefetch. The loop
//! prefers STAT whenever both have something, takes nothing new while Redis
//! refuses result writes (the held jobs retry; everything else stays safely
//! on the broker), and rides out connection losses through lapin's
//! recovery. At shutdown it cancels the consumers first, so the broker sends
//! nothing more, then lets the jobs in flight finish within the grace
//! period, then makes the rest requeue.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};
use pleura::fleet::broker::{self, BrokerError};
use pleura::wire::Names;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::delivery::Handler;
use crate::error::WorkerError;
use crate::policy;

/// How this worker consumes.
pub(crate) struct Intake {
    /// The fleet's queues.
    pub(crate) names: Names,
    /// The queues' delivery limit (declared with the topology).
    pub(crate) delivery_limit: u32,
    /// Unacknowledged deliveries per channel.
    pub(crate) prefetch: u16,
    /// Prefix of the consumer tags, unique per run.
    pub(crate) tag: String,
    /// How long jobs in flight may take to finish after the stop.
    pub(crate) grace: Duration,
}

/// One scan queue's channel and consumer.
struct Lane {
    channel: Channel,
    consumer: Consumer,
    tag: String,
}

impl Intake {
    /// Waits for a model, then takes jobs until `stop`, then drains.
    /// `ready` is notified once consuming has begun.
    pub(crate) async fn run(
        &self,
        conn: &Connection,
        handler: Arc<Handler>,
        mut redis_ok: watch::Receiver<bool>,
        ready: &Notify,
        stop: &CancellationToken,
    ) -> Result<(), WorkerError> {
        // A worker without a usable model takes no jobs: they stay on the
        // queue for workers that have one.
        if !wait_for_model(&handler, stop).await {
            return Ok(());
        }
        let (mut stat, mut routine) = self.open(conn).await?;
        handler.health.set_channel(stat.channel.clone());
        tracing::info!(
            threads = handler.pool.size(),
            prefetch = self.prefetch,
            "consuming"
        );
        ready.notify_one();

        let tracker = TaskTracker::new();
        let mut failure: Option<WorkerError> = None;
        loop {
            if !*redis_ok.borrow_and_update() {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = redis_ok.changed() => continue,
                }
            }
            // STAT first whenever both queues have something for us.
            let (next, channel) = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                d = stat.consumer.next() => (d, &stat.channel),
                d = routine.consumer.next() => (d, &routine.channel),
            };
            match next {
                Some(Ok(delivery)) => {
                    let handler = handler.clone();
                    tracker.spawn(async move { handler.handle(delivery).await });
                }
                Some(Err(error)) => {
                    tracing::warn!(%error, "consumer error; waiting for connection recovery");
                    if let Err(error) = channel.wait_for_recovery(error).await {
                        failure = Some(BrokerError::from(error).into());
                        break;
                    }
                    tracing::info!("connection recovered");
                }
                None => {
                    failure = Some(WorkerError::ConsumerCancelled);
                    break;
                }
            }
        }

        handler.health.set_stopping();
        for lane in [&stat, &routine] {
            let _ = lane
                .channel
                .basic_cancel(lane.tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        self.drain(&tracker, &handler.hard_stop).await;
        failure.map_or(Ok(()), Err)
    }

    /// Declares the topology and opens both lanes.
    async fn open(&self, conn: &Connection) -> Result<(Lane, Lane), BrokerError> {
        let stat = conn.create_channel().await?;
        broker::declare_topology(&stat, &self.names, self.delivery_limit).await?;
        let routine = conn.create_channel().await?;
        let stat = self.lane(stat, self.names.stat_queue(), "stat").await?;
        let routine = self
            .lane(routine, self.names.routine_queue(), "routine")
            .await?;
        Ok((stat, routine))
    }

    async fn lane(&self, channel: Channel, queue: String, kind: &str) -> Result<Lane, BrokerError> {
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("{}-{kind}", self.tag);
        let consumer = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Lane {
            channel,
            consumer,
            tag,
        })
    }

    /// Lets the jobs in flight finish within the grace period; after it,
    /// makes the ones still held requeue.
    async fn drain(&self, tracker: &TaskTracker, hard_stop: &CancellationToken) {
        tracker.close();
        tracing::info!(
            in_flight = tracker.len(),
            grace_secs = self.grace.as_secs(),
            "draining jobs in flight"
        );
        if tokio::time::timeout(self.grace, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = tracker.len(),
                "grace period over; requeueing unfinished jobs"
            );
            hard_stop.cancel();
            let _ = tokio::time::timeout(policy::REQUEUE_WAIT, tracker.wait()).await;
        }
    }
}

/// Waits until a model is served; `false` if `stop` came first.
async fn wait_for_model(handler: &Handler, stop: &CancellationToken) -> bool {
    if handler.health.has_model() {
        return true;
    }
    tracing::info!("waiting for a usable model before taking jobs");
    let mut check = tokio::time::interval(Duration::from_millis(100));
    while !handler.health.has_model() {
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = check.tick() => {}
        }
    }
    true
}
