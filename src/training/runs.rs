//! [`RunStore`]: training runs in Redis: their records, leases, cancel
//! requests and event streams.
//!
//! Ownership of a run is a lease, not an unacked message. A run can outlast
//! RabbitMQ's consumer timeout (30 minutes by default), after which the
//! broker would take an unacked request back and hand it to someone else
//! while the first trainer still trains. So a trainer claims the run here
//! (`SET lease NX PX`), acks the request, and renews the lease while it
//! trains. A trainer that dies stops renewing; once the lease has expired,
//! any trainer may claim the run again and resume it from its checkpoint.
//! Every transition is one Lua script, so a claim, a cancel and a finish
//! never interleave, and a trainer that lost its lease can write nothing.

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::time;
use crate::wire::{
    CancelRequest, Names, RunEvent, RunEventKind, RunRecord, RunState, TRAIN_SCHEMA_VERSION,
};

use super::TrainingError;

/// Events kept per run: far more than a long run's epochs and throttled
/// progress, while a forgotten run cannot grow its stream without bound.
pub const EVENTS_MAXLEN: usize = 10_000;

/// What claiming a run found.
#[derive(Debug, Clone, PartialEq)]
pub enum Claim {
    /// This trainer holds it now; `attempt` counts every claim so far.
    Claimed {
        /// The record as it was.
        record: Box<RunRecord>,
        /// 1-based.
        attempt: u32,
    },
    /// Another trainer holds a live lease on it.
    Held {
        /// That trainer.
        by: String,
    },
    /// It has ended already; nothing to do.
    Ended(RunState),
    /// No such run.
    Missing,
}

/// What a cancel did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelOutcome {
    /// Nobody held it: it is cancelled now.
    Cancelled,
    /// A trainer holds it and stops at its next batch.
    Requested,
    /// It had ended already, in this state.
    AlreadyEnded(RunState),
}

/// Training runs in Redis.
#[derive(Clone)]
pub struct RunStore {
    redis: ConnectionManager,
    names: Names,
}

const CREATE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'queued', 'doc', ARGV[1], 'attempts', 0)
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[3])
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
return 1
"#;

const CLAIM: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return {'missing'} end
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then return {'ended', st} end
if not redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return {'held', redis.call('GET', KEYS[2]) or ''}
end
local n = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('HSET', KEYS[1], 'state', 'running', 'trainer', ARGV[1])
return {'claimed', tostring(n), redis.call('HGET', KEYS[1], 'doc'), redis.call('HGET', KEYS[1], 'cancel') or ''}
"#;

const RENEW: &str = r#"
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return {0, ''} end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return {1, redis.call('HGET', KEYS[2], 'cancel') or ''}
"#;

// KEYS: run, lease, open, events. ARGV: trainer, doc, state, event, maxlen, end, run id.
// `end` is 'finish' (terminal: forget the lease and the open entry),
// 'release' (back to queued for another trainer) or 'update'.
const WRITE: &str = r#"
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'doc', ARGV[2], 'state', ARGV[3])
if ARGV[6] ~= 'update' then
  redis.call('HDEL', KEYS[1], 'trainer')
  redis.call('DEL', KEYS[2])
end
if ARGV[6] == 'finish' then redis.call('SREM', KEYS[3], ARGV[7]) end
if ARGV[4] ~= '' then
  redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[5], '*', 'event', ARGV[4])
end
return 1
"#;

// KEYS: run, lease, open, events. ARGV: cancel json, cancelled doc, run id,
// requested event, finished event, maxlen.
const CANCEL: &str = r#"
local st = redis.call('HGET', KEYS[1], 'state')
if not st then return 'missing' end
if st == 'succeeded' or st == 'failed' or st == 'cancelled' then return st end
redis.call('HSET', KEYS[1], 'cancel', ARGV[1])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[4])
if redis.call('EXISTS', KEYS[2]) == 1 then return 'requested' end
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'doc', ARGV[2])
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[6], '*', 'event', ARGV[5])
return 'cancelled'
"#;

// KEYS: run, lease, open, events. ARGV: doc, event, run id, maxlen.
const FAIL_QUEUED: &str = r#"
if redis.call('HGET', KEYS[1], 'state') ~= 'queued' or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', 'failed', 'doc', ARGV[1])
redis.call('SREM', KEYS[3], ARGV[3])
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[4], '*', 'event', ARGV[2])
return 1
"#;

fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("run documents serialise")
}

/// A new event of `run_id`, stamped now.
pub fn event(run_id: &str, kind: RunEventKind) -> RunEvent {
    RunEvent {
        v: TRAIN_SCHEMA_VERSION,
        run_id: run_id.to_string(),
        at_ms: time::now_ms(),
        kind,
    }
}

impl RunStore {
    /// Runs under `names`, through `redis`.
    pub fn new(redis: ConnectionManager, names: Names) -> RunStore {
        RunStore { redis, names }
    }

    /// Connects with a [`ConnectionManager`] (it reconnects by itself);
    /// `tls` applies to a `rediss://` URL.
    pub async fn connect(
        url: &str,
        tls: &crate::tls::ClientTls,
        names: Names,
    ) -> Result<RunStore, TrainingError> {
        let client = tls.redis_client(url)?;
        let cfg = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(Some(std::time::Duration::from_secs(2)))
            .set_response_timeout(Some(std::time::Duration::from_secs(5)))
            .set_number_of_retries(2)
            .set_max_delay(std::time::Duration::from_secs(1));
        let redis = client.get_connection_manager_with_config(cfg).await?;
        Ok(RunStore::new(redis, names))
    }

    /// The key names in use.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// Records a new run as queued, with its first event. Fails with
    /// [`TrainingError::Exists`] if the run id is taken.
    pub async fn create(&self, record: &RunRecord) -> Result<(), TrainingError> {
        let id = record.run_id();
        let ev = event(
            id,
            RunEventKind::Queued {
                by: record.request.submitted_by.clone(),
            },
        );
        let created: i64 = redis::Script::new(CREATE)
            .key(self.names.train_run_key(id))
            .key(self.names.train_runs_index())
            .key(self.names.train_open_runs())
            .key(self.names.train_events(id))
            .arg(to_json(record))
            .arg(time::now_ms())
            .arg(id)
            .arg(to_json(&ev))
            .arg(EVENTS_MAXLEN)
            .invoke_async(&mut self.redis.clone())
            .await?;
        if created == 0 {
            return Err(TrainingError::Exists(id.to_string()));
        }
        Ok(())
    }

    /// Takes `run_id` for `trainer` for `lease_ms`, unless it has ended or
    /// someone else's lease on it is alive.
    pub async fn claim(
        &self,
        run_id: &str,
        trainer: &str,
        lease_ms: u64,
    ) -> Result<Claim, TrainingError> {
        let reply: Vec<String> = redis::Script::new(CLAIM)
            .key(self.names.train_run_key(run_id))
            .key(self.names.train_lease_key(run_id))
            .arg(trainer)
            .arg(lease_ms)
            .invoke_async(&mut self.redis.clone())
            .await?;
        let corrupt = || TrainingError::Corrupt(format!("claim of {run_id}: {reply:?}"));
        match reply.first().map(String::as_str) {
            Some("missing") => Ok(Claim::Missing),
            Some("ended") => Ok(Claim::Ended(
                reply
                    .get(1)
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(corrupt)?,
            )),
            Some("held") => Ok(Claim::Held {
                by: reply.get(1).cloned().unwrap_or_default(),
            }),
            Some("claimed") if reply.len() == 4 => {
                let attempt = reply[1].parse().map_err(|_| corrupt())?;
                let mut record: RunRecord = serde_json::from_str(&reply[2])
                    .map_err(|e| TrainingError::Corrupt(format!("run {run_id}: {e}")))?;
                record.state = RunState::Running;
                record.trainer = Some(trainer.to_string());
                if !reply[3].is_empty() {
                    record.cancel = serde_json::from_str(&reply[3]).ok();
                }
                Ok(Claim::Claimed {
                    record: Box::new(record),
                    attempt,
                })
            }
            _ => Err(corrupt()),
        }
    }

    /// Extends `trainer`'s lease on `run_id`. `Ok(None)` means the lease is
    /// no longer this trainer's (it expired and someone else took the run):
    /// the trainer must stop without writing anything. Otherwise, the cancel
    /// request on the run, if any.
    pub async fn renew(
        &self,
        run_id: &str,
        trainer: &str,
        lease_ms: u64,
    ) -> Result<Option<Option<CancelRequest>>, TrainingError> {
        let (held, cancel): (i64, String) = redis::Script::new(RENEW)
            .key(self.names.train_lease_key(run_id))
            .key(self.names.train_run_key(run_id))
            .arg(trainer)
            .arg(lease_ms)
            .invoke_async(&mut self.redis.clone())
            .await?;
        if held == 0 {
            return Ok(None);
        }
        Ok(Some(if cancel.is_empty() {
            None
        } else {
            serde_json::from_str(&cancel).ok()
        }))
    }

    async fn write(
        &self,
        trainer: &str,
        record: &RunRecord,
        event: Option<&RunEvent>,
        end: &str,
    ) -> Result<(), TrainingError> {
        let id = record.run_id();
        let mut record = record.clone();
        record.updated_at = time::now_rfc3339_seconds();
        let written: i64 = redis::Script::new(WRITE)
            .key(self.names.train_run_key(id))
            .key(self.names.train_lease_key(id))
            .key(self.names.train_open_runs())
            .key(self.names.train_events(id))
            .arg(trainer)
            .arg(to_json(&record))
            .arg(record.state.as_str())
            .arg(event.map(to_json).unwrap_or_default())
            .arg(EVENTS_MAXLEN)
            .arg(end)
            .arg(id)
            .invoke_async(&mut self.redis.clone())
            .await?;
        if written == 0 {
            return Err(TrainingError::LeaseLost(id.to_string()));
        }
        Ok(())
    }

    /// Saves `record` (and appends `event`) while `trainer` holds the run.
    pub async fn update(
        &self,
        trainer: &str,
        record: &RunRecord,
        event: Option<&RunEvent>,
    ) -> Result<(), TrainingError> {
        self.write(trainer, record, event, "update").await
    }

    /// Saves the ended `record` with its final event, and lets go of the run.
    pub async fn finish(
        &self,
        trainer: &str,
        record: &RunRecord,
        event: &RunEvent,
    ) -> Result<(), TrainingError> {
        debug_assert!(record.state.is_terminal());
        self.write(trainer, record, Some(event), "finish").await
    }

    /// Puts the run back for another trainer (this one is shutting down):
    /// state `queued`, no lease, so the next trainer that looks claims it at
    /// once instead of waiting for the lease to expire.
    pub async fn release(
        &self,
        trainer: &str,
        record: &RunRecord,
        event: &RunEvent,
    ) -> Result<(), TrainingError> {
        let mut record = record.clone();
        record.state = RunState::Queued;
        record.trainer = None;
        self.write(trainer, &record, Some(event), "release").await
    }

    /// Ends a run that nobody holds and that is still queued (its request
    /// could not be queued, or cannot be read) as failed. Returns whether it
    /// did; a run someone holds or that has ended is left alone.
    pub async fn fail_unqueued(
        &self,
        record: &RunRecord,
        event: &RunEvent,
    ) -> Result<bool, TrainingError> {
        let id = record.run_id();
        let mut record = record.clone();
        record.state = RunState::Failed;
        let now = time::now_rfc3339_seconds();
        record.finished_at = Some(now.clone());
        record.updated_at = now;
        let done: i64 = redis::Script::new(FAIL_QUEUED)
            .key(self.names.train_run_key(id))
            .key(self.names.train_lease_key(id))
            .key(self.names.train_open_runs())
            .key(self.names.train_events(id))
            .arg(to_json(&record))
            .arg(to_json(event))
            .arg(id)
            .arg(EVENTS_MAXLEN)
            .invoke_async(&mut self.redis.clone())
            .await?;
        Ok(done == 1)
    }

    /// Appends an event without touching the record (throttled progress).
    pub async fn append(&self, event: &RunEvent) -> Result<(), TrainingError> {
        let _: String = self
            .redis
            .clone()
            .xadd_maxlen(
                self.names.train_events(&event.run_id),
                redis::streams::StreamMaxlen::Approx(EVENTS_MAXLEN),
                "*",
                &[("event", to_json(event))],
            )
            .await?;
        Ok(())
    }

    /// Asks `run_id` to stop. A queued run is cancelled at once; a running
    /// one at its trainer's next batch.
    pub async fn cancel(&self, run_id: &str, by: &str) -> Result<CancelOutcome, TrainingError> {
        let Some(mut record) = self.get(run_id).await? else {
            return Err(TrainingError::NotFound(run_id.to_string()));
        };
        let now = time::now_rfc3339_seconds();
        let request = CancelRequest {
            by: by.to_string(),
            at: now.clone(),
        };
        record.state = RunState::Cancelled;
        record.cancel = Some(request.clone());
        record.finished_at = Some(now.clone());
        record.updated_at = now;
        let requested = event(run_id, RunEventKind::CancelRequested { by: by.to_string() });
        let finished = event(
            run_id,
            RunEventKind::Finished {
                state: RunState::Cancelled,
                model_version: None,
                activated: None,
                error: None,
            },
        );
        let reply: String = redis::Script::new(CANCEL)
            .key(self.names.train_run_key(run_id))
            .key(self.names.train_lease_key(run_id))
            .key(self.names.train_open_runs())
            .key(self.names.train_events(run_id))
            .arg(to_json(&request))
            .arg(to_json(&record))
            .arg(run_id)
            .arg(to_json(&requested))
            .arg(to_json(&finished))
            .arg(EVENTS_MAXLEN)
            .invoke_async(&mut self.redis.clone())
            .await?;
        match reply.as_str() {
            "cancelled" => Ok(CancelOutcome::Cancelled),
            "requested" => Ok(CancelOutcome::Requested),
            "missing" => Err(TrainingError::NotFound(run_id.to_string())),
            other => Ok(CancelOutcome::AlreadyEnded(other.parse().map_err(
                |_| TrainingError::Corrupt(format!("cancel of {run_id}: {other:?}")),
            )?)),
        }
    }

    /// The run's record, with its live state, holder and cancel request.
    pub async fn get(&self, run_id: &str) -> Result<Option<RunRecord>, TrainingError> {
        let fields: std::collections::HashMap<String, String> = self
            .redis
            .clone()
            .hgetall(self.names.train_run_key(run_id))
            .await?;
        assemble(run_id, fields)
    }

    /// The newest `limit` runs, newest first.
    pub async fn list(&self, limit: usize) -> Result<Vec<RunRecord>, TrainingError> {
        let ids: Vec<String> = self
            .redis
            .clone()
            .zrevrange(self.names.train_runs_index(), 0, limit.max(1) as isize - 1)
            .await?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            if let Some(r) = self.get(&id).await? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Runs that are queued or running: those a trainer may have to pick up
    /// when their lease is gone.
    pub async fn open_runs(&self) -> Result<Vec<String>, TrainingError> {
        Ok(self
            .redis
            .clone()
            .smembers(self.names.train_open_runs())
            .await?)
    }

    /// Whether someone holds a live lease on `run_id`.
    pub async fn leased(&self, run_id: &str) -> Result<bool, TrainingError> {
        Ok(self
            .redis
            .clone()
            .exists(self.names.train_lease_key(run_id))
            .await?)
    }

    /// Events of `run_id` after stream id `after` (`"-"` for all), at most
    /// `count`, with the id of each.
    pub async fn events(
        &self,
        run_id: &str,
        after: &str,
        count: usize,
    ) -> Result<Vec<(String, RunEvent)>, TrainingError> {
        let start = if after == "-" {
            "-".to_string()
        } else {
            format!("({after}")
        };
        let reply: redis::streams::StreamRangeReply = self
            .redis
            .clone()
            .xrange_count(self.names.train_events(run_id), start, "+", count)
            .await?;
        let mut out = Vec::with_capacity(reply.ids.len());
        for entry in reply.ids {
            let Some(redis::Value::BulkString(bytes)) = entry.map.get("event") else {
                continue;
            };
            let event: RunEvent = serde_json::from_slice(bytes)
                .map_err(|e| TrainingError::Corrupt(format!("event of {run_id}: {e}")))?;
            out.push((entry.id, event));
        }
        Ok(out)
    }
}

/// A record from its hash fields: the stored document, with the state, the
/// holder and the cancel request that scripts keep beside it.
fn assemble(
    run_id: &str,
    mut fields: std::collections::HashMap<String, String>,
) -> Result<Option<RunRecord>, TrainingError> {
    let Some(doc) = fields.remove("doc") else {
        return Ok(None);
    };
    let corrupt = |e: String| TrainingError::Corrupt(format!("run {run_id}: {e}"));
    let mut record: RunRecord = serde_json::from_str(&doc).map_err(|e| corrupt(e.to_string()))?;
    if let Some(state) = fields.get("state") {
        record.state = state
            .parse()
            .map_err(|e: crate::wire::BadFlag| corrupt(e.0))?;
    }
    if record.state == RunState::Running {
        record.trainer = fields.remove("trainer");
    } else if !record.state.is_terminal() {
        record.trainer = None;
    }
    if let Some(cancel) = fields.get("cancel") {
        record.cancel = serde_json::from_str(cancel).ok();
    }
    Ok(Some(record))
}
