//! Model announcements: the fanout exchange `{ns}.models`, each worker's own
//! queue on it, and the [`Announcer`] that publishers tell the fleet with.
//!
//! An announcement is only a nudge. Workers always read the active version
//! from Redis, and also on a timer, so an announcement that is lost, late
//! or duplicated can delay a switch but never cause a wrong one. That is
//! why announcing is best effort, bounded by a timeout, and reported to the
//! caller rather than failing a publish.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ExchangeKind};

use super::broker::{self, BrokerError};
use crate::tls::ClientTls;
use crate::wire::{Activation, ModelAnnouncement, Names, REGISTRY_SCHEMA_VERSION};

/// How long an announcement may take before the publisher stops waiting.
pub const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an announcement did not go out. Workers still converge on their
/// reconcile timer.
#[derive(Debug, thiserror::Error)]
pub enum AnnounceError {
    /// The broker could not be reached or refused the message.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The broker did not answer in time.
    #[error("announcing timed out after {0:?}")]
    TimedOut(Duration),
}

/// Declares `{ns}.models`, the fanout exchange of model announcements.
pub async fn declare_models_exchange(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    channel
        .exchange_declare(
            names.models_exchange().into(),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

/// Binds a worker's own announcement queue: exclusive and auto-delete, so it
/// vanishes with the worker's connection and never collects messages for a
/// worker that is gone. Returns the queue name.
pub async fn bind_models_queue(
    channel: &Channel,
    names: &Names,
    worker_id: &str,
) -> Result<String, BrokerError> {
    declare_models_exchange(channel, names).await?;
    let queue = names.models_queue(worker_id);
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                exclusive: true,
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            queue.as_str().into(),
            names.models_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(queue)
}

/// Tells every worker a new version is active. Best effort by design:
/// workers also reconcile against Redis on a timer, so an announcement that
/// never arrives only delays the switch.
pub async fn announce_model(
    conn: &Connection,
    names: &Names,
    announcement: &ModelAnnouncement,
) -> Result<(), BrokerError> {
    let channel = conn.create_channel().await?;
    declare_models_exchange(&channel, names).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let body = serde_json::to_vec(announcement).expect("an announcement serialises");
    channel
        .basic_publish(
            names.models_exchange().into(),
            "".into(),
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default().with_content_type("application/json".into()),
        )
        .await?
        .await?;
    let _ = channel.close(200, "announced".into()).await;
    Ok(())
}

/// Tells the fleet about activations, over its own short-lived connection.
#[derive(Debug, Clone)]
pub struct Announcer {
    amqp_url: String,
    tls: ClientTls,
    names: Names,
    timeout: Duration,
}

impl Announcer {
    /// An announcer for the fleet of `names` on the broker at `amqp_url`
    /// (an `amqps://` URL trusts the system roots; see
    /// [`Announcer::with_tls`]).
    pub fn new(amqp_url: &str, names: Names) -> Announcer {
        Announcer {
            amqp_url: amqp_url.to_string(),
            tls: ClientTls::default(),
            names,
            timeout: ANNOUNCE_TIMEOUT,
        }
    }

    /// The same announcer, connecting with `tls` for an `amqps://` URL.
    pub fn with_tls(self, tls: ClientTls) -> Announcer {
        Announcer { tls, ..self }
    }

    /// Announces `activation`, waiting for the broker's confirmation at most
    /// [`ANNOUNCE_TIMEOUT`].
    pub async fn announce(&self, activation: &Activation) -> Result<(), AnnounceError> {
        let announcement = ModelAnnouncement {
            schema: REGISTRY_SCHEMA_VERSION,
            version: activation.version.clone(),
            at: activation.at.clone(),
        };
        let sent = tokio::time::timeout(self.timeout, async {
            let conn =
                broker::connect_with_tls(&self.amqp_url, "pleura-announce", &self.tls).await?;
            let sent = announce_model(&conn, &self.names, &announcement).await;
            let _ = conn.close(200, "announced".into()).await;
            sent
        })
        .await;
        match sent {
            Ok(result) => Ok(result?),
            Err(_) => Err(AnnounceError::TimedOut(self.timeout)),
        }
    }
}
