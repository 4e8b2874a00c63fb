//! One delivery, from receipt to settlement.
//!
//! The delivery's acker travels with the job inside an [`AckGuard`], and is
//! settled only once the outcome is stored: a classified scan is acked after
//! its result is in Redis, an unreadable one is dead-lettered after its
//! error result is, and anything else goes back to the queue. While Redis
//! refuses the write the job is held and the write retried (and intake
//! pauses, through `redis_ok`); when the grace period after a shutdown ends,
//! the held job is requeued instead.

use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::message::Delivery;
use pleura::fleet::ResultStore;
use pleura::model::InferencePool;
use pleura::wire::{ErrorInfo, JobContext, ScanResult, Timings};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::ack::{AckGuard, Settlement};
use crate::events::{self, Outcome};
use crate::health::Health;
use crate::job::Job;
use crate::policy::{self, Disposition};
use crate::retry::{self, retry};

/// Everything a job task needs; one per worker, shared by all its jobs.
pub(crate) struct Handler {
    /// Named in every result.
    pub(crate) worker_id: String,
    pub(crate) health: Arc<Health>,
    pub(crate) pool: Arc<InferencePool>,
    pub(crate) results: ResultStore,
    /// `false` while result writes fail, so intake takes nothing new.
    pub(crate) redis_ok: watch::Sender<bool>,
    /// Longest pause between two attempts at a result write.
    pub(crate) max_write_backoff: Duration,
    /// Fires when the grace period is over: held jobs give up and requeue.
    pub(crate) hard_stop: CancellationToken,
}

/// How a delivery ended, for the counters and the log.
struct Settled {
    job_id: Option<String>,
    outcome: Outcome,
    model_version: Option<String>,
    stages: events::Stages,
}

impl Settled {
    fn requeued(job_id: String, stages: events::Stages) -> Settled {
        Settled {
            job_id: Some(job_id),
            outcome: Outcome::Retry,
            model_version: None,
            stages,
        }
    }
}

/// Settles the delivery, timing it as the `ack` stage.
async fn settle(guard: AckGuard, settlement: Settlement, stages: &mut events::Stages) {
    let t = Instant::now();
    guard.settle(settlement).await;
    stages.ack_ms = t.elapsed().as_secs_f64() * 1e3;
    events::stage("ack", stages.ack_ms / 1e3);
}

impl Handler {
    /// Handles one delivery to its settlement.
    pub(crate) async fn handle(&self, delivery: Delivery) {
        let received = Instant::now();
        self.health.stats.begin();
        let Delivery {
            properties,
            data,
            acker,
            redelivered,
            ..
        } = delivery;
        let guard = AckGuard::new(acker);
        let job = Job::from_properties(&properties);
        if let Some(ms) = job.queue_ms {
            events::stage("queue", ms / 1e3);
        }
        let settled = match job.job_id {
            Err(reason) => {
                // Without a usable job id nobody can be told: dead-letter only.
                events::scan_rejected(None, "invalid_job_id", &reason.to_string());
                let mut stages = events::Stages::default();
                settle(guard, policy::for_unidentified(), &mut stages).await;
                Settled {
                    job_id: None,
                    outcome: Outcome::Poison,
                    model_version: None,
                    stages,
                }
            }
            Ok(job_id) => {
                if redelivered {
                    tracing::debug!(job_id = %job_id, "redelivered job");
                }
                let context = JobContext {
                    job_id,
                    priority: job.priority,
                    correlation: job.correlation,
                    worker: self.worker_id.clone(),
                };
                self.answer(context, job.queue_ms, data, received, guard)
                    .await
            }
        };
        self.health.stats.finished(
            settled.job_id.as_deref(),
            settled.outcome,
            settled.model_version.as_deref(),
            received.elapsed(),
            &settled.stages,
        );
        self.health.stats.end();
    }

    /// Classifies the scan, stores the answer, then settles the delivery.
    async fn answer(
        &self,
        context: JobContext,
        queue_ms: Option<f64>,
        scan: Vec<u8>,
        received: Instant,
        guard: AckGuard,
    ) -> Settled {
        let job_id = context.job_id.clone();
        let mut timings = Timings {
            queue: queue_ms,
            ..Timings::default()
        };
        let mut stages = events::Stages::default();
        let (mut result, settlement, outcome) =
            match self.pool.analyse(scan, context.priority).await {
                Ok(v) => {
                    events::stage("decode", v.decode_ms / 1e3);
                    events::stage("preprocess", v.preprocess_ms / 1e3);
                    events::stage("infer", v.infer_ms / 1e3);
                    stages.decode_ms = v.decode_ms;
                    stages.preprocess_ms = v.preprocess_ms;
                    stages.infer_ms = v.infer_ms;
                    // The wire contract's `decode` covers both scan stages.
                    timings.decode = v.decode_ms + v.preprocess_ms;
                    timings.infer = v.infer_ms;
                    let result = ScanResult::ok(context, v.classification, timings);
                    (result, Settlement::Ack, Outcome::Ok)
                }
                Err(error) => match policy::for_analysis(&error) {
                    Disposition::Poison(scan) => {
                        events::scan_rejected(Some(&job_id), scan.code(), &scan.to_string());
                        let info = ErrorInfo {
                            code: scan.code().to_string(),
                            message: scan.to_string(),
                        };
                        let result = ScanResult::error(context, info, timings);
                        (result, Settlement::DeadLetter, Outcome::Error)
                    }
                    Disposition::Requeue => {
                        events::job_requeued(&job_id, &error);
                        settle(guard, Settlement::Requeue, &mut stages).await;
                        return Settled::requeued(job_id, stages);
                    }
                },
            };
        result.timings_ms.total = received.elapsed().as_secs_f64() * 1e3;

        // Hold the job until its result is in Redis. Only then settle it.
        let t_write = Instant::now();
        let written = retry(
            || self.results.write_once(&result),
            policy::result_write_backoff(self.max_write_backoff),
            &self.hard_stop,
            |e, attempt| {
                self.redis_ok.send_replace(false);
                events::redis_write_failed(&job_id, attempt, e);
            },
        )
        .await;
        match written {
            Ok(_) => {
                self.redis_ok
                    .send_if_modified(|ok| !std::mem::replace(ok, true));
                stages.write_ms = t_write.elapsed().as_secs_f64() * 1e3;
                events::stage("write", stages.write_ms / 1e3);
                settle(guard, settlement, &mut stages).await;
                Settled {
                    job_id: Some(job_id),
                    outcome,
                    model_version: result.model_version,
                    stages,
                }
            }
            Err(retry::Cancelled) => {
                settle(guard, Settlement::Requeue, &mut stages).await;
                Settled::requeued(job_id, stages)
            }
        }
    }
}
