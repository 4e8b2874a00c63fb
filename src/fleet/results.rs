//! Results in Redis: written once per job, read by submitters.
//!
//! A result lives at `{ns}:result:{job_id}` with a TTL and is appended to the
//! capped stream `{ns}:results`. Both happen in one Lua script, guarded by
//! `SET NX` on the key, so a redelivered job (the broker retries whatever was
//! not acked, for example across a connection recovery) can never produce a
//! second key or a second stream entry.

use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use tokio::time::Instant;

use crate::tls::ClientTls;
use crate::wire::{Names, ScanResult};

/// Results asked for in one `MGET` while waiting.
const WAIT_CHUNK: usize = 500;
/// Pause between two polls while waiting for results.
const WAIT_POLL: Duration = Duration::from_millis(100);

/// Writes the key and the stream entry atomically, only if the key is new.
/// Returns 1 when written, 0 when the job already had a result.
const WRITE_ONCE: &str = r#"
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'job_id', ARGV[4], 'result', ARGV[1])
  return 1
end
return 0
"#;

/// Errors of the result store.
#[derive(Debug, thiserror::Error)]
pub enum ResultsError {
    /// Redis is unreachable or refused the command. Transient: retry.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// A stored document is not a valid result.
    #[error("stored result for {job_id} is not valid JSON: {source}")]
    Corrupt {
        /// The job whose result is unreadable.
        job_id: String,
        /// The parse error.
        source: serde_json::Error,
    },
}

/// Whether a write stored a new result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    /// The result was stored and appended to the stream.
    New,
    /// The job already had a result; nothing changed.
    AlreadyPresent,
}

/// Handle on the result keys and stream of one namespace.
#[derive(Clone)]
pub struct ResultStore {
    conn: ConnectionManager,
    names: Names,
    ttl_secs: u64,
    stream_maxlen: u64,
    script: redis::Script,
}

impl ResultStore {
    /// Connects with a [`ConnectionManager`], which reconnects in the
    /// background after Redis goes away. A `rediss://` URL trusts the system
    /// roots; see [`ResultStore::connect_with_tls`].
    pub async fn connect(
        url: &str,
        names: Names,
        ttl_secs: u64,
        stream_maxlen: u64,
    ) -> Result<ResultStore, ResultsError> {
        Self::connect_with_tls(url, &ClientTls::default(), names, ttl_secs, stream_maxlen).await
    }

    /// Like [`ResultStore::connect`], with `tls` for a `rediss://` URL.
    pub async fn connect_with_tls(
        url: &str,
        tls: &ClientTls,
        names: Names,
        ttl_secs: u64,
        stream_maxlen: u64,
    ) -> Result<ResultStore, ResultsError> {
        let client = tls.redis_client(url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(2)))
            .set_response_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(1));
        let conn = client.get_connection_manager_with_config(cfg).await?;
        Ok(ResultStore {
            conn,
            names,
            ttl_secs,
            stream_maxlen,
            script: redis::Script::new(WRITE_ONCE),
        })
    }

    /// Stores a result unless the job already has one.
    pub async fn write_once(&self, result: &ScanResult) -> Result<Written, ResultsError> {
        let json = serde_json::to_string(result).expect("results serialise");
        let mut conn = self.conn.clone();
        let written: i64 = self
            .script
            .key(self.names.result_key(&result.job_id))
            .key(self.names.results_stream())
            .arg(&json)
            .arg(self.ttl_secs.max(1))
            .arg(self.stream_maxlen.max(1))
            .arg(&result.job_id)
            .invoke_async(&mut conn)
            .await?;
        Ok(if written == 1 {
            Written::New
        } else {
            Written::AlreadyPresent
        })
    }

    /// Reads one job's result, if there is one yet.
    pub async fn get(&self, job_id: &str) -> Result<Option<ScanResult>, ResultsError> {
        let mut conn = self.conn.clone();
        let raw: Option<String> = conn.get(self.names.result_key(job_id)).await?;
        raw.map(|s| parse(job_id, &s)).transpose()
    }

    /// Reads many results in one round trip, in the order asked.
    pub async fn get_many(
        &self,
        job_ids: &[String],
    ) -> Result<Vec<Option<ScanResult>>, ResultsError> {
        if job_ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = job_ids.iter().map(|j| self.names.result_key(j)).collect();
        let mut conn = self.conn.clone();
        let raw: Vec<Option<String>> = redis::cmd("MGET").arg(&keys).query_async(&mut conn).await?;
        raw.into_iter()
            .zip(job_ids)
            .map(|(r, id)| r.map(|s| parse(id, &s)).transpose())
            .collect()
    }

    /// Polls until every job in `ids` has a result or `timeout` passes, and
    /// returns the results in the order of `ids` (`None` for those that never
    /// came). `on_result` is called with each newly found result, for progress.
    /// A Redis blip (a restart, a failover) is waited out until the deadline:
    /// the connection manager reconnects underneath.
    pub async fn wait_all(
        &self,
        ids: &[String],
        timeout: Duration,
        mut on_result: impl FnMut(&ScanResult),
    ) -> Result<Vec<Option<ScanResult>>, ResultsError> {
        let deadline = Instant::now() + timeout;
        let mut results: Vec<Option<ScanResult>> = vec![None; ids.len()];
        loop {
            let pending: Vec<usize> = (0..ids.len()).filter(|&i| results[i].is_none()).collect();
            if pending.is_empty() || Instant::now() >= deadline {
                return Ok(results);
            }
            // MGET in chunks keeps each round trip small for big submissions.
            for chunk in pending.chunks(WAIT_CHUNK) {
                let keys: Vec<String> = chunk.iter().map(|&i| ids[i].clone()).collect();
                match self.get_many(&keys).await {
                    Ok(got) => {
                        for (&i, r) in chunk.iter().zip(got) {
                            if let Some(r) = &r {
                                on_result(r);
                            }
                            results[i] = r;
                        }
                    }
                    Err(e) if Instant::now() < deadline => {
                        tracing::warn!(error = %e, "reading results failed; retrying")
                    }
                    Err(e) => return Err(e),
                }
            }
            if results.iter().any(Option::is_none) {
                tokio::time::sleep(WAIT_POLL).await;
            }
        }
    }

    /// Round trip to Redis, for readiness and for waiting out an outage.
    pub async fn ping(&self) -> Result<(), ResultsError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }

    /// The underlying connection, for callers with their own keys.
    pub fn connection(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// The names this store writes under.
    pub fn names(&self) -> &Names {
        &self.names
    }
}

fn parse(job_id: &str, raw: &str) -> Result<ScanResult, ResultsError> {
    serde_json::from_str(raw).map_err(|source| ResultsError::Corrupt {
        job_id: job_id.to_string(),
        source,
    })
}
