//! RabbitMQ: connecting, the fleet's topology, and publishing scans.
//!
//! The topology is declared by everyone who touches it (workers and
//! submitters alike) with identical arguments, so whoever comes first creates
//! it and nobody depends on start-up order.
//!
//! ```text
//!  publish ──► {ns}.scans (headers) ──x-pleura-priority=stat──► {ns}.scans.stat    (quorum)
//!                   │ alternate exchange
//!                   └──► {ns}.scans.routine (fanout) ─────────► {ns}.scans.routine (quorum)
//!  reject / over delivery-limit ──► {ns}.dlx (fanout) ────────► {ns}.dead          (quorum)
//! ```
//!
//! Why two queues rather than one priority queue: quorum queues (needed for
//! the delivery limit and for surviving a broker node) only honour message
//! priorities from RabbitMQ 4.0, and Debian ships 3.10. Workers drain the STAT
//! queue first instead.

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};

use crate::time;
use crate::tls::ClientTls;
use crate::wire::{Names, Priority, HEADER_PRIORITY, HEADER_SUBMITTED_MS};

/// Deliveries of one scan before the broker dead-letters it (the quorum
/// queues' `x-delivery-limit`). This is what stops a scan that keeps
/// failing, or keeps killing its worker, from circling forever. Every
/// declarer of the topology must pass the same value, since RabbitMQ refuses
/// to redeclare a queue with other arguments; `delivery_limit` in the
/// settings defaults to this.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

/// Errors talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Connection, channel or protocol failure; usually transient.
    #[error("broker: {0}")]
    Amqp(#[from] lapin::Error),
    /// The broker refused (nacked) a publish.
    #[error("broker refused the message for job {job_id}")]
    Nacked {
        /// Job id of the refused message.
        job_id: String,
    },
}

/// Opens a connection that recovers by itself (connection, channels,
/// topology and consumers) after a network failure. An `amqps://` URL
/// trusts the system roots and presents no client certificate; see
/// [`connect_with_tls`] for a CA bundle or a client certificate.
pub async fn connect(url: &str, connection_name: &str) -> Result<Connection, BrokerError> {
    connect_with_tls(url, connection_name, &ClientTls::default()).await
}

/// Like [`connect`], with `tls` for an `amqps://` URL (ignored for
/// `amqp://`). A refused certificate is an [`BrokerError::Amqp`] whose
/// message says why (for example `invalid peer certificate: UnknownIssuer`).
pub async fn connect_with_tls(
    url: &str,
    connection_name: &str,
    tls: &ClientTls,
) -> Result<Connection, BrokerError> {
    let config = tls.amqp_config(url);
    let runtime = lapin::runtime::default_runtime()?;
    if crate::tls::scheme(url) == "amqps" {
        // With auto-recovery on, lapin retries a failed first connection
        // itself (16 attempts, backing off to a minute) whatever the error,
        // so a certificate the broker or we refuse would surface only after
        // many minutes. A refusal does not pass by retrying: one attempt
        // without recovery surfaces it at once, then closes.
        // Named apart, so the broker's log shows what the short connection was.
        let probe = ConnectionProperties::default()
            .with_connection_name(format!("{connection_name} (tls check)").into());
        let checked =
            Connection::connect_with_config(url, probe, config.clone(), runtime.clone()).await?;
        let _ = checked.close(200, "tls checked".into()).await;
    }
    let props = ConnectionProperties::default()
        .with_connection_name(connection_name.into())
        .enable_auto_recover();
    Ok(Connection::connect_with_config(url, props, config, runtime).await?)
}

/// Declares exchanges, queues and bindings of the fleet. Idempotent.
pub async fn declare_topology(
    channel: &Channel,
    names: &Names,
    delivery_limit: u32,
) -> Result<(), BrokerError> {
    let durable_exchange = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_queue = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };

    channel
        .exchange_declare(
            names.dead_letter_exchange().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    let mut dead_args = FieldTable::default();
    dead_args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    channel
        .queue_declare(names.dead_queue().into(), durable_queue, dead_args)
        .await?;
    channel
        .queue_bind(
            names.dead_queue().into(),
            names.dead_letter_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    channel
        .exchange_declare(
            names.routine_exchange().into(),
            ExchangeKind::Fanout,
            durable_exchange,
            FieldTable::default(),
        )
        .await?;
    let mut scans_args = FieldTable::default();
    scans_args.insert(
        "alternate-exchange".into(),
        AMQPValue::LongString(names.routine_exchange().into()),
    );
    channel
        .exchange_declare(
            names.scans_exchange().into(),
            ExchangeKind::Headers,
            durable_exchange,
            scans_args,
        )
        .await?;

    for queue in [names.stat_queue(), names.routine_queue()] {
        channel
            .queue_declare(
                queue.into(),
                durable_queue,
                scan_queue_args(names, delivery_limit),
            )
            .await?;
    }
    let mut stat_binding = FieldTable::default();
    // Plain `any` ignores `x-` headers when matching; `any-with-x` (RabbitMQ
    // 3.10+) is what lets our `x-pleura-priority` header route.
    stat_binding.insert("x-match".into(), AMQPValue::LongString("any-with-x".into()));
    stat_binding.insert(HEADER_PRIORITY.into(), AMQPValue::LongString("stat".into()));
    channel
        .queue_bind(
            names.stat_queue().into(),
            names.scans_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            stat_binding,
        )
        .await?;
    channel
        .queue_bind(
            names.routine_queue().into(),
            names.routine_exchange().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    Ok(())
}

fn scan_queue_args(names: &Names, delivery_limit: u32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-delivery-limit".into(),
        AMQPValue::LongInt(delivery_limit as i32),
    );
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(names.dead_letter_exchange().into()),
    );
    args
}

/// One scan to submit.
#[derive(Debug, Clone)]
pub struct Submission<'a> {
    /// Job id; becomes the AMQP `message_id`.
    pub job_id: &'a str,
    /// Raw image bytes (PNG, JPEG or DICOM).
    pub body: &'a [u8],
    /// Urgency.
    pub priority: Priority,
    /// Extra `x-pleura-*` correlation headers to echo back.
    pub correlation: &'a [(&'a str, &'a str)],
}

/// A channel in publisher-confirm mode for submitting scans.
pub struct Publisher {
    channel: Channel,
    names: Names,
}

impl Publisher {
    /// Opens a confirm-mode channel and makes sure the topology exists.
    pub async fn new(
        conn: &Connection,
        names: Names,
        delivery_limit: u32,
    ) -> Result<Publisher, BrokerError> {
        let channel = conn.create_channel().await?;
        declare_topology(&channel, &names, delivery_limit).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Publisher { channel, names })
    }

    /// Publishes a scan and waits for the broker's confirmation, so a
    /// returned `Ok` means the broker has taken responsibility for the job.
    pub async fn submit(&self, s: &Submission<'_>) -> Result<(), BrokerError> {
        let confirm = self
            .channel
            .basic_publish(
                self.names.scans_exchange().into(),
                "".into(),
                BasicPublishOptions::default(),
                s.body,
                scan_properties(s),
            )
            .await?
            .await?;
        if confirm.is_nack() {
            return Err(BrokerError::Nacked {
                job_id: s.job_id.to_string(),
            });
        }
        Ok(())
    }

    /// The underlying channel.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }
}

/// AMQP properties of a scan message: persistent, with job id, priority
/// markers and submission time.
pub fn scan_properties(s: &Submission<'_>) -> BasicProperties {
    let now_ms = time::now_ms();
    let mut headers = FieldTable::default();
    headers.insert(
        HEADER_PRIORITY.into(),
        AMQPValue::LongString(s.priority.as_str().into()),
    );
    headers.insert(
        HEADER_SUBMITTED_MS.into(),
        AMQPValue::LongLongInt(now_ms as i64),
    );
    for (k, v) in s.correlation {
        headers.insert(
            ShortString::from(k.to_string()),
            AMQPValue::LongString(LongString::from(*v)),
        );
    }
    BasicProperties::default()
        .with_message_id(s.job_id.into())
        .with_delivery_mode(2)
        .with_priority(s.priority.amqp_priority())
        .with_timestamp(now_ms / 1000)
        .with_headers(headers)
}
