//! The Pleura fleet worker: scans from RabbitMQ, verdicts to Redis.
//!
//! A worker is stateless. It takes scans from the STAT and routine queues,
//! decodes and classifies them on a blocking inference pool, writes the
//! result to Redis, and only then acks. Anything it cannot finish goes back
//! to the broker; anything that can never succeed is dead-lettered with an
//! error result so the submitter learns at once.
//!
//! # Layout
//!
//! - [`run`] / [`run_with_listener`]: the whole worker, given settings and a
//!   shutdown future (mini-redis style; `main.rs` only wires it).
//! - `service`: [`Service`](service::Service), built once from the
//!   settings: the start-up order, the connections, the pool, the stores,
//!   the background tasks, and the shutdown order.
//! - `intake`: the channels, consumers and the consume loop (STAT first,
//!   paused while Redis refuses writes), and the drain.
//! - `delivery`: one delivery from receipt to settlement.
//! - `job`: a delivery's properties as a job (id, priority, correlation).
//! - `ack`: the guard that makes every delivery end in ack, nack or reject.
//! - `policy`: every retry, requeue and give-up decision, in one table.
//! - `retry`: the retry-with-backoff mechanism.
//! - `reload`: following the registry's active model: fetch, verify, load,
//!   canary, atomic swap; the old model stays on any failure.
//! - `health`: readiness and counters; `heartbeat`: the worker's heartbeat
//!   in Redis; `http`: `/healthz`, `/readyz`, `/metrics`.
//! - `events`: log lines and metrics, emitted together.
//! - `shutdown`: the signals, and the token every task watches.
//! - `error`: [`WorkerError`].
//! - `live` (tests only): tests of delivery handling and intake against the
//!   real RabbitMQ and Redis, and their rig.

mod ack;
mod delivery;
mod error;
mod events;
mod health;
mod heartbeat;
mod http;
mod intake;
mod job;
#[cfg(test)]
mod live;
mod policy;
mod reload;
mod retry;
mod service;
mod shutdown;

use std::future::Future;
use std::sync::Arc;

use pleura::config::Settings;
use pleura::telemetry::redact_url;
use tokio::net::TcpListener;

pub use error::WorkerError;
pub use shutdown::signal as shutdown_signal;

/// Runs a worker until `shutdown` resolves, then finishes the jobs in flight.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let listener = TcpListener::bind(&settings.http_addr).await?;
    run_with_listener(settings, listener, shutdown).await
}

/// Like [`run`], with the HTTP endpoints on an already bound listener (tests
/// bind port 0 and read the address back).
pub async fn run_with_listener(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let stop = shutdown::token(shutdown);
    let health = Arc::new(health::Health::new(settings.model_dir.is_some()));
    let http_addr = listener.local_addr()?;
    let endpoints = http::Endpoints::spawn(listener, health.clone());
    tracing::info!(
        worker = %settings.resolved_worker_id(),
        namespace = settings.namespace.as_str(),
        amqp = %redact_url(&settings.amqp_url),
        redis = %redact_url(&settings.redis_url),
        http = %http_addr,
        "worker starting"
    );
    let outcome = match service::Service::start(settings, health.clone(), stop).await {
        Ok(Some(service)) => service.run().await,
        Ok(None) => Ok(()),
        Err(e) => Err(e),
    };
    health.set_stopping();
    endpoints.stop().await;
    match &outcome {
        Ok(()) => tracing::info!("worker stopped"),
        Err(error) => tracing::error!(%error, "worker stopped on error"),
    }
    outcome
}
