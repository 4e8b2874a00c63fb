//! Taking a fleet down: every queue and exchange of its namespace, and every
//! Redis key under it. For tests and for decommissioning a fleet; workers
//! never call it.

use lapin::Channel;
use redis::AsyncCommands;

use super::broker::{self, BrokerError};
use crate::tls::ClientTls;
use crate::wire::Names;

/// Keys deleted per `DEL` while sweeping a namespace.
const DELETE_BATCH: usize = 500;

/// Why a teardown stopped.
#[derive(Debug, thiserror::Error)]
pub enum TeardownError {
    /// The broker could not be reached or refused a delete.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Redis could not be reached or refused a delete.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Deletes every queue and exchange of a namespace. For tests and for
/// decommissioning a fleet; never called by the worker.
pub async fn delete_topology(channel: &Channel, names: &Names) -> Result<(), BrokerError> {
    for q in [
        names.stat_queue(),
        names.routine_queue(),
        names.dead_queue(),
        names.train_queue(),
    ] {
        channel.queue_delete(q.into(), Default::default()).await?;
    }
    for x in [
        names.scans_exchange(),
        names.routine_exchange(),
        names.dead_letter_exchange(),
        names.models_exchange(),
    ] {
        channel
            .exchange_delete(x.into(), Default::default())
            .await?;
    }
    Ok(())
}

/// Deletes every Redis key of the namespace (`{ns}:*`), walking them with
/// `SCAN` rather than `KEYS`, so a big Redis is never blocked.
pub async fn delete_keys(
    redis: &mut redis::aio::MultiplexedConnection,
    names: &Names,
) -> Result<usize, redis::RedisError> {
    let pattern = format!("{}:*", names.namespace());
    let keys: Vec<String> = {
        let mut iter: redis::AsyncIter<String> = redis.scan_match(&pattern).await?;
        let mut keys = Vec::new();
        while let Some(key) = iter.next_item().await {
            keys.push(key?);
        }
        keys
    };
    for batch in keys.chunks(DELETE_BATCH) {
        let _: () = redis.del(batch).await?;
    }
    Ok(keys.len())
}

/// Deletes a whole fleet: its broker topology and its Redis keys. Both are
/// attempted whatever becomes of the other; the first error is returned.
/// TLS URLs trust the system roots; see [`delete_namespace_with_tls`].
pub async fn delete_namespace(
    amqp_url: &str,
    redis_url: &str,
    names: &Names,
) -> Result<(), TeardownError> {
    let none = ClientTls::default();
    delete_namespace_with_tls(amqp_url, &none, redis_url, &none, names).await
}

/// Like [`delete_namespace`], with each service's URL and TLS material.
pub async fn delete_namespace_with_tls(
    amqp_url: &str,
    amqp_tls: &ClientTls,
    redis_url: &str,
    redis_tls: &ClientTls,
    names: &Names,
) -> Result<(), TeardownError> {
    let topology = async {
        let conn = broker::connect_with_tls(amqp_url, "pleura-teardown", amqp_tls).await?;
        let channel = conn.create_channel().await.map_err(BrokerError::from)?;
        let deleted = delete_topology(&channel, names).await;
        let _ = conn.close(200, "torn down".into()).await;
        deleted
    }
    .await;
    let keys = async {
        let client = redis_tls.redis_client(redis_url)?;
        let mut redis = client.get_multiplexed_async_connection().await?;
        delete_keys(&mut redis, names).await
    }
    .await;
    topology?;
    keys?;
    Ok(())
}
