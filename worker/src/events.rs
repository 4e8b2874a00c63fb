//! Worker telemetry in one place: each function writes the log line and the
//! metric together, so the two cannot drift apart.
//!
//! Metric names: `*_total` counters, `*_seconds` histograms, label values from
//! small fixed sets. Log fields are key-value (`job_id`, `model_version`);
//! no patient data is ever logged, and the scan itself never is.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Outcome of one delivery, the `outcome` label of `pleura_jobs_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Classified and stored.
    Ok,
    /// Unusable scan with a known job id: error result stored, dead-lettered.
    Error,
    /// Unusable message without a usable job id: dead-lettered only.
    Poison,
    /// Temporary failure: requeued.
    Retry,
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Poison => "poison",
            Outcome::Retry => "retry",
        }
    }
}

/// Installs the Prometheus recorder once per process and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("_seconds".into()),
                    &[
                        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                    ],
                )
                .expect("valid buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (tests embedding
            // several workers share one); our handle then renders nothing new,
            // which only matters to those tests.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Milliseconds a settled job spent in each stage of the pipeline; 0 for a
/// stage it never reached (a rejected scan is never inferred).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Stages {
    /// Bytes to gray pixels.
    pub decode_ms: f64,
    /// Resize and normalisation.
    pub preprocess_ms: f64,
    /// Model inference (on the inference pool).
    pub infer_ms: f64,
    /// The result write to Redis, retries included.
    pub write_ms: f64,
    /// Settling the delivery with the broker.
    pub ack_ms: f64,
}

/// A delivery has been settled. One line per job with its stage times, so
/// a log pipeline (or `make bench`) can see where each job's time went.
pub fn job_finished(
    job_id: Option<&str>,
    outcome: Outcome,
    model_version: Option<&str>,
    total: Duration,
    stages: &Stages,
) {
    metrics::counter!("pleura_jobs_total", "outcome" => outcome.as_str()).increment(1);
    metrics::histogram!("pleura_stage_seconds", "stage" => "total").record(total.as_secs_f64());
    tracing::info!(
        job_id = job_id.unwrap_or("-"),
        outcome = outcome.as_str(),
        model_version = model_version.unwrap_or("-"),
        total_ms = total.as_secs_f64() * 1e3,
        decode_ms = stages.decode_ms,
        preprocess_ms = stages.preprocess_ms,
        infer_ms = stages.infer_ms,
        write_ms = stages.write_ms,
        ack_ms = stages.ack_ms,
        "job settled"
    );
}

/// Time spent in one stage of the pipeline.
pub fn stage(stage: &'static str, seconds: f64) {
    metrics::histogram!("pleura_stage_seconds", "stage" => stage).record(seconds);
}

/// A scan could not be used.
pub fn scan_rejected(job_id: Option<&str>, code: &str, message: &str) {
    metrics::counter!("pleura_rejected_total", "code" => code.to_string()).increment(1);
    tracing::warn!(
        job_id = job_id.unwrap_or("-"),
        code,
        reason = message,
        "scan rejected to the dead-letter queue"
    );
}

/// A job failed for a reason that may pass; it goes back on the queue.
pub fn job_requeued(job_id: &str, error: &dyn std::fmt::Display) {
    tracing::warn!(job_id, %error, "transient failure; requeueing");
}

/// A result write failed; the job is held and the write retried.
pub fn redis_write_failed(job_id: &str, attempt: u32, error: &dyn std::fmt::Display) {
    metrics::counter!("pleura_redis_write_failures_total").increment(1);
    if attempt == 1 || attempt.is_power_of_two() {
        tracing::warn!(job_id, attempt, %error, "result write failed; holding the job and retrying");
    }
}

/// Number of jobs currently held by this worker.
pub fn in_flight(delta: f64) {
    metrics::gauge!("pleura_jobs_in_flight").increment(delta);
}

/// A model is now being served (the first, or one swapped in for `previous`).
pub fn model_loaded(version: &str, previous: Option<&str>, load: Duration) {
    if let Some(previous) = previous {
        metrics::gauge!("pleura_model_info", "version" => previous.to_string()).set(0.0);
        metrics::counter!("pleura_model_reloads_total", "result" => "ok").increment(1);
    }
    metrics::gauge!("pleura_model_info", "version" => version.to_string()).set(1.0);
    metrics::histogram!("pleura_model_load_seconds").record(load.as_secs_f64());
    tracing::info!(
        model_version = version,
        previous_version = previous.unwrap_or("-"),
        load_ms = load.as_millis() as u64,
        "model loaded, verified and warmed; serving it"
    );
}

/// A model version was refused; the worker keeps serving what it had.
pub fn model_refused(version: &str, serving: Option<&str>, code: &str, reason: &str) {
    metrics::counter!("pleura_model_reloads_total", "result" => code.to_string()).increment(1);
    tracing::error!(
        model_version = version,
        serving_version = serving.unwrap_or("-"),
        code,
        reason,
        "model refused; keeping the current one"
    );
}

/// A model could not be fetched for now; the next reconcile tries again.
pub fn model_fetch_failed(version: &str, error: &dyn std::fmt::Display) {
    metrics::counter!("pleura_model_reloads_total", "result" => "fetch_failed").increment(1);
    tracing::warn!(model_version = version, %error, "cannot fetch the active model yet; will retry");
}
