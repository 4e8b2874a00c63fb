//! The worker's heartbeat in Redis (see [`pleura::fleet::heartbeat`]).
//!
//! Written every `heartbeat_interval_secs`, and at once after a model swap or
//! refusal, so `pleura fleet status` (and the reload tests) see a new version
//! within moments rather than an interval later. Removed on a clean exit.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use pleura::wire::{Heartbeat, Names, REGISTRY_SCHEMA_VERSION};

use crate::health::Health;

fn snapshot(health: &Health, worker: &str, ttl_secs: u64) -> Heartbeat {
    let s = &health.stats;
    Heartbeat {
        schema: REGISTRY_SCHEMA_VERSION,
        worker: worker.to_string(),
        host: gethostname::gethostname().to_string_lossy().into_owned(),
        pid: std::process::id(),
        model_version: health.model_version(),
        model_source: if health.pinned() {
            "pinned"
        } else {
            "registry"
        }
        .into(),
        ready: health.ready(),
        in_flight: s.in_flight(),
        totals: s.totals(),
        reloads: s.reloads(),
        last_refusal: s.last_refusal(),
        started_at: health.started_at().to_string(),
        at: pleura::time::now_rfc3339(),
        ttl_secs,
    }
}

/// Beats until `stop`, then removes the heartbeat.
pub(crate) async fn run(
    mut redis: ConnectionManager,
    names: Names,
    health: Arc<Health>,
    worker: String,
    interval: Duration,
    beat: Arc<Notify>,
    stop: CancellationToken,
) {
    let ttl_secs = (interval.as_secs() * 3).max(3);
    loop {
        let hb = snapshot(&health, &worker, ttl_secs);
        if let Err(error) = pleura::fleet::heartbeat::write_heartbeat(&mut redis, &names, &hb).await
        {
            tracing::warn!(%error, "cannot write the heartbeat");
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
            _ = beat.notified() => {}
        }
    }
    if let Err(error) = pleura::fleet::heartbeat::remove(&mut redis, &names, &worker).await {
        tracing::warn!(%error, "cannot remove the heartbeat");
    }
}
