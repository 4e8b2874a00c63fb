//! Worker heartbeats in Redis: written by each worker, read by
//! `pleura fleet status` and by tests.
//!
//! Each worker rewrites `{ns}:worker:{id}` (a [`Heartbeat`]) every few
//! seconds with a TTL of three intervals, and scores its id in the
//! `{ns}:workers` index with the time. A worker that dies stops renewing and
//! its heartbeat expires; the index remembers it was there, so the status
//! shows it as gone instead of silently forgetting it, until it is pruned
//! an hour later.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::time::now_ms;
use crate::wire::{Heartbeat, Names};

/// How long a worker that stopped heartbeating stays listed as gone.
pub const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Writes a heartbeat with its TTL and touches the index, atomically.
pub async fn write_heartbeat(
    redis: &mut ConnectionManager,
    names: &Names,
    heartbeat: &Heartbeat,
) -> Result<(), redis::RedisError> {
    let json = serde_json::to_string(heartbeat).expect("a heartbeat serialises");
    redis::pipe()
        .atomic()
        .set_ex(
            names.worker_key(&heartbeat.worker),
            json,
            heartbeat.ttl_secs.max(1),
        )
        .ignore()
        .zadd(names.workers_index(), &heartbeat.worker, now_ms())
        .ignore()
        .query_async::<()>(redis)
        .await
}

/// Removes a worker's heartbeat on a clean shutdown.
pub async fn remove(
    redis: &mut ConnectionManager,
    names: &Names,
    worker: &str,
) -> Result<(), redis::RedisError> {
    redis::pipe()
        .atomic()
        .del(names.worker_key(worker))
        .ignore()
        .zrem(names.workers_index(), worker)
        .ignore()
        .query_async::<()>(redis)
        .await
}

/// One worker as the fleet status shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct WorkerStatus {
    /// The worker id.
    pub worker: String,
    /// Its live heartbeat; `None` when it expired (the worker is gone).
    pub heartbeat: Option<Heartbeat>,
    /// Milliseconds since its last heartbeat.
    pub last_seen_ms_ago: u64,
}

/// Every worker seen in the last [`FORGET_AFTER`], ordered by id.
pub async fn status(
    redis: &mut ConnectionManager,
    names: &Names,
) -> Result<Vec<WorkerStatus>, redis::RedisError> {
    let now = now_ms();
    let cutoff = now.saturating_sub(FORGET_AFTER.as_millis() as u64);
    let _: () = redis.zrembyscore(names.workers_index(), 0, cutoff).await?;
    let ids: Vec<(String, u64)> = redis
        .zrange_withscores(names.workers_index(), 0, -1)
        .await?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<String> = ids.iter().map(|(id, _)| names.worker_key(id)).collect();
    let docs: Vec<Option<String>> = redis.mget(&keys).await?;
    let mut out: Vec<WorkerStatus> = ids
        .into_iter()
        .zip(docs)
        .map(|((worker, seen), doc)| WorkerStatus {
            heartbeat: doc.and_then(|d| serde_json::from_str(&d).ok()),
            last_seen_ms_ago: now.saturating_sub(seen),
            worker,
        })
        .collect();
    out.sort_by(|a, b| a.worker.cmp(&b.worker));
    Ok(out)
}
