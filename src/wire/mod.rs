//! The wire contract between integrators, the CLI and the fleet.
//!
//! Everything an ingestion system must agree with Pleura on lives in this one
//! module: queue and key names, message headers, and the versioned result
//! document. A change here is a change to the public contract, so the result
//! carries [`SCHEMA_VERSION`] and fields are only ever added.
//!
//! A job is one AMQP message whose body is the raw scan (PNG, JPEG or DICOM),
//! whose `message_id` is the job id, and whose urgency is marked by AMQP
//! priority >= 5 or the header `x-pleura-priority: stat`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Version of the [`ScanResult`] document. Bumped only on a breaking change.
pub const SCHEMA_VERSION: u32 = 1;

/// Header that marks a STAT scan (`stat`) or a routine one (`routine`).
pub const HEADER_PRIORITY: &str = "x-pleura-priority";
/// Header carrying the submitter's clock in milliseconds since the Unix epoch,
/// so the result can report time spent queued. Optional.
pub const HEADER_SUBMITTED_MS: &str = "x-pleura-submitted-ms";
/// Headers with this prefix (other than the reserved ones above) are
/// correlation headers and are echoed back in the result.
pub const CORRELATION_PREFIX: &str = "x-pleura-";
/// AMQP priorities at or above this mark a STAT scan.
pub const STAT_MIN_PRIORITY: u8 = 5;
/// Correlation headers beyond this many are dropped, so a submitter cannot
/// inflate every stored result.
pub const MAX_CORRELATION_HEADERS: usize = 16;
/// Correlation values longer than this are dropped.
pub const MAX_CORRELATION_VALUE: usize = 256;
/// Longest accepted job id.
pub const MAX_JOB_ID_LEN: usize = 128;
/// Longest accepted model version string.
pub const MAX_VERSION_LEN: usize = 64;

pub mod train;
pub use train::{
    valid_run_id, Attempt, BadFlag, CancelRequest, ClassWeights, DeviceChoice, EpochFigures,
    RunEvent, RunEventKind, RunRecord, RunState, Schedule, TrainFlags, TrainRequest,
    TRAIN_SCHEMA_VERSION,
};

/// Whether `v` is a usable model version: `[A-Za-z0-9._-]{1,64}`.
pub fn valid_version(v: &str) -> bool {
    (1..=MAX_VERSION_LEN).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Urgency of a scan. STAT scans overtake any routine backlog.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    /// Urgent: read before anything routine.
    Stat,
    /// Everything else.
    Routine,
}

impl Priority {
    /// Classifies a message from its AMQP priority and its priority header.
    /// Either marker is enough to make a scan STAT.
    pub fn from_markers(amqp_priority: Option<u8>, header: Option<&str>) -> Priority {
        let by_header = header.is_some_and(|h| h.trim().eq_ignore_ascii_case("stat"));
        let by_priority = amqp_priority.is_some_and(|p| p >= STAT_MIN_PRIORITY);
        if by_header || by_priority {
            Priority::Stat
        } else {
            Priority::Routine
        }
    }

    /// The value used for the `x-pleura-priority` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Stat => "stat",
            Priority::Routine => "routine",
        }
    }

    /// The AMQP priority a submitter should set alongside the header.
    pub fn amqp_priority(self) -> u8 {
        match self {
            Priority::Stat => 9,
            Priority::Routine => 0,
        }
    }
}

/// A priority name that is neither `stat` nor `routine`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown priority {0:?} (expected stat or routine)")]
pub struct UnknownPriority(pub String);

impl std::str::FromStr for Priority {
    type Err = UnknownPriority;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "stat" => Ok(Priority::Stat),
            "routine" => Ok(Priority::Routine),
            other => Err(UnknownPriority(other.to_string())),
        }
    }
}

/// Checks that a job id is usable as part of a Redis key and a log field.
///
/// Ids are chosen by integrators; restricting the alphabet keeps them from
/// smuggling key separators, control characters or PHI-sized payloads in.
pub fn validate_job_id(id: &str) -> Result<(), JobIdError> {
    if id.is_empty() {
        return Err(JobIdError::Empty);
    }
    if id.len() > MAX_JOB_ID_LEN {
        return Err(JobIdError::TooLong);
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(JobIdError::BadCharacter(c));
    }
    Ok(())
}

/// Why a message has no usable job id. Such a message can only be
/// dead-lettered: without an id, no result can be written for anyone to find.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobIdError {
    /// The message has no `message_id`.
    #[error("message has no message_id (the job id)")]
    Missing,
    /// The `message_id` is empty.
    #[error("job id is empty")]
    Empty,
    /// Longer than [`MAX_JOB_ID_LEN`].
    #[error("job id longer than {MAX_JOB_ID_LEN} bytes")]
    TooLong,
    /// A character outside `A-Z a-z 0-9 - _ . :`.
    #[error("job id contains {0:?}; allowed are A-Z a-z 0-9 - _ . :")]
    BadCharacter(char),
}

/// Names of every queue, exchange and key of one fleet.
///
/// Everything derives from a namespace so several fleets, and parallel tests,
/// can share one broker and one Redis.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    ns: String,
}

impl Names {
    /// Names for namespace `ns` (for example `pleura`).
    pub fn new(ns: impl Into<String>) -> Self {
        Names { ns: ns.into() }
    }

    /// The namespace itself.
    pub fn namespace(&self) -> &str {
        &self.ns
    }

    /// Headers exchange where integrators publish scans. STAT-marked messages
    /// are routed to [`Names::stat_queue`]; everything else falls through its
    /// alternate exchange to [`Names::routine_queue`].
    pub fn scans_exchange(&self) -> String {
        format!("{}.scans", self.ns)
    }

    /// Fanout exchange that receives whatever the scans exchange could not route.
    pub fn routine_exchange(&self) -> String {
        format!("{}.scans.routine", self.ns)
    }

    /// Quorum queue of STAT scans; workers always drain it first.
    pub fn stat_queue(&self) -> String {
        format!("{}.scans.stat", self.ns)
    }

    /// Quorum queue of routine scans.
    pub fn routine_queue(&self) -> String {
        format!("{}.scans.routine", self.ns)
    }

    /// Fanout exchange receiving rejected and over-delivered scans.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.ns)
    }

    /// Queue holding dead-lettered scans for inspection.
    pub fn dead_queue(&self) -> String {
        format!("{}.dead", self.ns)
    }

    /// Redis key of one job's result.
    pub fn result_key(&self, job_id: &str) -> String {
        format!("{}:result:{}", self.ns, job_id)
    }

    /// Redis stream every result is appended to, once.
    pub fn results_stream(&self) -> String {
        format!("{}:results", self.ns)
    }

    /// Fanout exchange carrying [`ModelAnnouncement`]s to every worker.
    pub fn models_exchange(&self) -> String {
        format!("{}.models", self.ns)
    }

    /// A worker's own exclusive, auto-delete queue bound to
    /// [`Names::models_exchange`].
    pub fn models_queue(&self, worker_id: &str) -> String {
        format!("{}.models.{}", self.ns, worker_id)
    }

    /// Quorum queue of [`TrainRequest`]s, which trainer services take one at
    /// a time.
    pub fn train_queue(&self) -> String {
        format!("{}.train", self.ns)
    }

    /// Redis hash of one training run: `state`, `doc` (the [`RunRecord`]
    /// JSON), `cancel`, `attempts`.
    pub fn train_run_key(&self, run_id: &str) -> String {
        format!("{}:train:run:{}", self.ns, run_id)
    }

    /// Redis key holding the id of the trainer that holds a run, expiring
    /// unless renewed: the run's lease.
    pub fn train_lease_key(&self, run_id: &str) -> String {
        format!("{}:train:lease:{}", self.ns, run_id)
    }

    /// Redis stream of one run's [`RunEvent`]s.
    pub fn train_events(&self, run_id: &str) -> String {
        format!("{}:train:events:{}", self.ns, run_id)
    }

    /// Redis sorted set of run ids, scored by submission time (ms).
    pub fn train_runs_index(&self) -> String {
        format!("{}:train:runs", self.ns)
    }

    /// Redis set of runs that are queued or running: where trainers look
    /// for runs whose lease expired.
    pub fn train_open_runs(&self) -> String {
        format!("{}:train:open", self.ns)
    }

    /// Redis key of one published version's [`RegistryEntry`].
    pub fn model_key(&self, version: &str) -> String {
        format!("{}:model:{}", self.ns, version)
    }

    /// Redis sorted set of published versions, scored by publish time (ms).
    pub fn models_index(&self) -> String {
        format!("{}:models", self.ns)
    }

    /// Redis key holding the active version's name.
    pub fn active_model_key(&self) -> String {
        format!("{}:models:active", self.ns)
    }

    /// Redis list of [`Activation`]s, newest first.
    pub fn activations_key(&self) -> String {
        format!("{}:models:history", self.ns)
    }

    /// Redis hash of the workers that refused `version`: worker id to
    /// [`ReloadFailure`].
    pub fn refusals_key(&self, version: &str) -> String {
        format!("{}:model:{}:refusals", self.ns, version)
    }

    /// Redis key of one worker's [`Heartbeat`], with a TTL.
    pub fn worker_key(&self, worker_id: &str) -> String {
        format!("{}:worker:{}", self.ns, worker_id)
    }

    /// Redis sorted set of worker ids, scored by their last heartbeat (ms).
    pub fn workers_index(&self) -> String {
        format!("{}:workers", self.ns)
    }
}

/// Outcome of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// The scan was read and classified.
    Ok,
    /// The scan could not be classified; see [`ScanResult::error`].
    Error,
}

/// The model's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    /// `p_effusion >= threshold`.
    Effusion,
    /// `p_effusion < threshold`.
    Nofinding,
}

impl Label {
    /// Applies a decision threshold to a probability of effusion.
    pub fn from_probability(p_effusion: f32, threshold: f32) -> Label {
        if p_effusion >= threshold {
            Label::Effusion
        } else {
            Label::Nofinding
        }
    }

    /// The label as written in results and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Label::Effusion => "effusion",
            Label::Nofinding => "nofinding",
        }
    }
}

/// Where the time went, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From submission to the worker picking the job up; `null` when the
    /// submitter sent no timestamp.
    pub queue: Option<f64>,
    /// Decoding and preprocessing.
    pub decode: f64,
    /// Model inference.
    pub infer: f64,
    /// From the worker picking the job up to the result being ready.
    pub total: f64,
}

/// Why a job failed, with a stable machine-readable code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorInfo {
    /// Stable code, for example `corrupt_image` or `too_large`.
    pub code: String,
    /// Human-readable detail. Never contains PHI.
    pub message: String,
}

/// The result document stored at `{ns}:result:{job_id}` and appended to
/// `{ns}:results`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScanResult {
    /// Always [`SCHEMA_VERSION`] for documents written by this code.
    pub schema: u32,
    /// The job id, the AMQP `message_id` of the submission.
    pub job_id: String,
    /// `ok` or `error`.
    pub status: Status,
    /// The verdict; `null` on error.
    pub label: Option<Label>,
    /// Probability of effusion in [0, 1]; `null` on error.
    pub p_effusion: Option<f32>,
    /// Decision threshold the label was drawn with; `null` on error.
    pub threshold: Option<f32>,
    /// Version of the model that produced the verdict; `null` when no model ran.
    pub model_version: Option<String>,
    /// Urgency the scan was handled with.
    pub priority: Priority,
    /// Where the time went.
    pub timings_ms: Timings,
    /// Id of the worker that wrote this result.
    pub worker: String,
    /// When the result was produced, RFC 3339 UTC.
    pub completed_at: String,
    /// Why the job failed, only when `status` is `error`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    /// Correlation headers of the submission, echoed verbatim.
    #[serde(default)]
    pub correlation: BTreeMap<String, String>,
}

/// The part of a result that is the same whatever the outcome: which job,
/// how urgent, what to echo back, and which worker answered.
#[derive(Debug, Clone, PartialEq)]
pub struct JobContext {
    /// The job id.
    pub job_id: String,
    /// Urgency the scan was handled with.
    pub priority: Priority,
    /// Correlation headers to echo.
    pub correlation: BTreeMap<String, String>,
    /// The worker writing the result.
    pub worker: String,
}

/// A model's answer on one scan.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    /// The verdict at `threshold`.
    pub label: Label,
    /// Probability of effusion in [0, 1].
    pub p_effusion: f32,
    /// The model's decision threshold.
    pub threshold: f32,
    /// Version of the model that answered.
    pub model_version: String,
}

impl ScanResult {
    /// The result of a classified scan, stamped now.
    pub fn ok(job: JobContext, answer: Classification, timings_ms: Timings) -> ScanResult {
        ScanResult {
            status: Status::Ok,
            label: Some(answer.label),
            p_effusion: Some(answer.p_effusion),
            threshold: Some(answer.threshold),
            model_version: Some(answer.model_version),
            error: None,
            ..ScanResult::blank(job, timings_ms)
        }
    }

    /// The result of a scan that cannot be classified, stamped now.
    pub fn error(job: JobContext, error: ErrorInfo, timings_ms: Timings) -> ScanResult {
        ScanResult {
            error: Some(error),
            ..ScanResult::blank(job, timings_ms)
        }
    }

    fn blank(job: JobContext, timings_ms: Timings) -> ScanResult {
        ScanResult {
            schema: SCHEMA_VERSION,
            job_id: job.job_id,
            status: Status::Error,
            label: None,
            p_effusion: None,
            threshold: None,
            model_version: None,
            priority: job.priority,
            timings_ms,
            worker: job.worker,
            completed_at: crate::time::now_rfc3339(),
            error: None,
            correlation: job.correlation,
        }
    }

    /// Whether the job succeeded.
    pub fn is_ok(&self) -> bool {
        self.status == Status::Ok
    }
}

/// Longest accepted correlation header name, prefix included.
pub const MAX_CORRELATION_NAME: usize = 64;

/// Picks the correlation headers out of a message's string headers.
///
/// Headers come from any publisher, so each is bounded before it reaches a
/// result or a log line: names are `x-pleura-` plus ASCII letters, digits
/// and `-`/`_`, at most [`MAX_CORRELATION_NAME`] bytes; values are at most
/// [`MAX_CORRELATION_VALUE`] bytes with no control characters (a newline or
/// an escape sequence in a value could forge a log line); at most
/// [`MAX_CORRELATION_HEADERS`] are kept. Anything else is dropped.
pub fn correlation_headers<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> BTreeMap<String, String> {
    headers
        .into_iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v))
        .filter(|(k, _)| {
            k.starts_with(CORRELATION_PREFIX)
                && k.len() > CORRELATION_PREFIX.len()
                && k.len() <= MAX_CORRELATION_NAME
                && k.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
                && k != HEADER_PRIORITY
                && k != HEADER_SUBMITTED_MS
        })
        .filter(|(_, v)| v.len() <= MAX_CORRELATION_VALUE && !v.chars().any(char::is_control))
        .take(MAX_CORRELATION_HEADERS)
        .map(|(k, v)| (k, v.to_string()))
        .collect()
}

/// Version of the registry and fleet documents below ([`RegistryEntry`],
/// [`Activation`], [`ModelAnnouncement`], [`Heartbeat`]).
pub const REGISTRY_SCHEMA_VERSION: u32 = 1;

/// A published model version, stored at `{ns}:model:{version}`. Written
/// once: versions are immutable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegistryEntry {
    /// Always [`REGISTRY_SCHEMA_VERSION`] for documents written by this code.
    pub schema: u32,
    /// The version, equal to `manifest.version`.
    pub version: String,
    /// The manifest, as published.
    pub manifest: crate::model::manifest::Manifest,
    /// SHA-256 of the exact `model.json` bytes in the artifact store.
    pub manifest_sha256: String,
    /// Where the artifact lives (`file://...` or `s3://...`), without credentials.
    pub artifact_url: String,
    /// Id of the key that signed it; `null` for an unsigned model.
    pub key_id: Option<String>,
    /// When it was published, RFC 3339 UTC.
    pub published_at: String,
    /// Who published it (user and host).
    pub published_by: String,
    /// Whether the promotion gate passed, or was overridden with `--force`.
    pub gate: GateOutcome,
}

/// What the promotion gate said about a version when it was published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum GateOutcome {
    /// Every rule held.
    Passed,
    /// Some rules failed and the publisher overrode them.
    Forced {
        /// The rules that failed.
        failures: Vec<String>,
        /// Why the publisher overrode them.
        reason: String,
    },
}

/// One change of the active version, in `{ns}:models:history`, newest first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Activation {
    /// Always [`REGISTRY_SCHEMA_VERSION`] for documents written by this code.
    pub schema: u32,
    /// The version made active.
    pub version: String,
    /// The version active before; `null` for the first activation.
    pub previous: Option<String>,
    /// When, RFC 3339 UTC.
    pub at: String,
    /// Who (user and host).
    pub by: String,
    /// Why, in the operator's words.
    pub reason: String,
}

/// The message on `{ns}.models` after each activation. Workers treat it only
/// as a nudge: they always read the active version from Redis, so a late or
/// reordered announcement cannot roll a worker back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelAnnouncement {
    /// Always [`REGISTRY_SCHEMA_VERSION`] for documents written by this code.
    pub schema: u32,
    /// The version just activated.
    pub version: String,
    /// When, RFC 3339 UTC.
    pub at: String,
}

/// A worker's refusal of a model version, stored per worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadFailure {
    /// The version refused.
    pub version: String,
    /// Stable reason code, for example `signature` or `canary`.
    pub code: String,
    /// Human-readable detail.
    pub message: String,
    /// When, RFC 3339 UTC.
    pub at: String,
}

/// Jobs a worker has finished since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobTotals {
    /// Results written with status `ok`.
    pub ok: u64,
    /// Results written with status `error` (unreadable scans).
    pub error: u64,
    /// Deliveries handed back to the broker to be retried.
    pub retried: u64,
}

/// A worker's heartbeat at `{ns}:worker:{id}`, rewritten every few seconds
/// with a TTL, so a worker that dies simply disappears.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// Always [`REGISTRY_SCHEMA_VERSION`] for documents written by this code.
    pub schema: u32,
    /// The worker id.
    pub worker: String,
    /// Host name.
    pub host: String,
    /// Process id.
    pub pid: u32,
    /// The model being served; `null` before one is loaded.
    pub model_version: Option<String>,
    /// `registry` (follows the active version) or `pinned` (a local model_dir).
    pub model_source: String,
    /// Whether the worker takes jobs (it has a model and is not stopping).
    pub ready: bool,
    /// Jobs being processed now.
    pub in_flight: u64,
    /// Jobs finished since start.
    pub totals: JobTotals,
    /// Model reloads that succeeded since start.
    pub reloads: u64,
    /// The last refused model, if any.
    pub last_refusal: Option<ReloadFailure>,
    /// When the worker started, RFC 3339 UTC.
    pub started_at: String,
    /// When this heartbeat was written, RFC 3339 UTC.
    pub at: String,
    /// Seconds until this heartbeat expires if not renewed.
    pub ttl_secs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn either_marker_makes_a_scan_stat() {
        assert_eq!(Priority::from_markers(Some(5), None), Priority::Stat);
        assert_eq!(
            Priority::from_markers(Some(9), Some("routine")),
            Priority::Stat
        );
        assert_eq!(Priority::from_markers(None, Some("STAT")), Priority::Stat);
        assert_eq!(Priority::from_markers(Some(4), None), Priority::Routine);
        assert_eq!(Priority::from_markers(None, None), Priority::Routine);
    }

    #[test]
    fn job_ids_are_restricted() {
        assert!(validate_job_id("3f2b-11:acc.9_x").is_ok());
        assert!(validate_job_id("").is_err());
        assert!(validate_job_id("a b").is_err());
        assert!(validate_job_id("a\nb").is_err());
        assert!(validate_job_id(&"x".repeat(MAX_JOB_ID_LEN + 1)).is_err());
    }

    #[test]
    fn names_derive_from_the_namespace() {
        let n = Names::new("t1");
        assert_eq!(n.stat_queue(), "t1.scans.stat");
        assert_eq!(n.routine_queue(), "t1.scans.routine");
        assert_eq!(n.dead_queue(), "t1.dead");
        assert_eq!(n.result_key("j"), "t1:result:j");
        assert_eq!(n.results_stream(), "t1:results");
    }

    #[test]
    fn only_correlation_headers_are_echoed() {
        let long = "v".repeat(MAX_CORRELATION_VALUE + 1);
        let echoed = correlation_headers([
            ("x-pleura-accession", "ACC1"),
            ("X-Pleura-Site", "north"),
            ("x-pleura-priority", "stat"),
            ("x-pleura-submitted-ms", "1"),
            ("x-other", "no"),
            ("x-pleura-long", long.as_str()),
            ("x-pleura-forged", "ok\n2026-12-04 INFO forged line"),
            ("x-pleura-escape", "\u{1b}[31mred"),
            ("x-pleura-sp ace", "v"),
            ("x-pleura-", "empty name"),
            (
                &*format!("x-pleura-{}", "n".repeat(MAX_CORRELATION_NAME)),
                "long name",
            ),
        ]);
        assert_eq!(echoed.len(), 2, "{echoed:?}");
        assert_eq!(echoed["x-pleura-accession"], "ACC1");
        assert_eq!(echoed["x-pleura-site"], "north");
    }

    #[test]
    fn result_round_trips_with_schema_and_nulls() {
        let r = ScanResult {
            schema: SCHEMA_VERSION,
            job_id: "j1".into(),
            status: Status::Error,
            label: None,
            p_effusion: None,
            threshold: None,
            model_version: None,
            priority: Priority::Routine,
            timings_ms: Timings::default(),
            worker: "w".into(),
            completed_at: "2026-01-01T00:00:00Z".into(),
            error: Some(ErrorInfo {
                code: "corrupt_image".into(),
                message: "bad".into(),
            }),
            correlation: BTreeMap::new(),
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["schema"], 1);
        assert_eq!(json["status"], "error");
        assert!(json["label"].is_null());
        assert_eq!(json["error"]["code"], "corrupt_image");
        let back: ScanResult = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    fn context() -> JobContext {
        JobContext {
            job_id: "j2".into(),
            priority: Priority::Stat,
            correlation: BTreeMap::from([("x-pleura-accession".into(), "A1".into())]),
            worker: "w1".into(),
        }
    }

    #[test]
    fn constructors_fill_every_field_for_their_outcome() {
        let timings = Timings {
            queue: Some(3.0),
            decode: 2.0,
            infer: 50.0,
            total: 55.0,
        };
        let ok = ScanResult::ok(
            context(),
            Classification {
                label: Label::Effusion,
                p_effusion: 0.75,
                threshold: 0.5,
                model_version: "v1".into(),
            },
            timings,
        );
        assert!(ok.is_ok());
        assert_eq!(ok.schema, SCHEMA_VERSION);
        assert_eq!(
            (ok.label, ok.p_effusion, ok.threshold),
            (Some(Label::Effusion), Some(0.75), Some(0.5))
        );
        assert_eq!(ok.model_version.as_deref(), Some("v1"));
        assert_eq!((ok.priority, ok.worker.as_str()), (Priority::Stat, "w1"));
        assert_eq!(ok.correlation["x-pleura-accession"], "A1");
        assert_eq!(ok.timings_ms, timings);
        assert!(ok.error.is_none());
        assert!(crate::time::is_rfc3339(&ok.completed_at));

        let err = ScanResult::error(
            context(),
            ErrorInfo {
                code: "corrupt_image".into(),
                message: "bad".into(),
            },
            timings,
        );
        assert!(!err.is_ok());
        assert_eq!(
            (err.label, err.p_effusion, err.threshold),
            (None, None, None)
        );
        assert_eq!(err.model_version, None);
        assert_eq!(
            err.error.as_ref().map(|e| e.code.as_str()),
            Some("corrupt_image")
        );
        let json = serde_json::to_value(&err).unwrap();
        assert!(json["label"].is_null() && json["p_effusion"].is_null());
        assert_eq!(json["status"], "error");
    }

    #[test]
    fn job_id_errors_say_what_is_wrong() {
        assert_eq!(validate_job_id(""), Err(JobIdError::Empty));
        assert_eq!(validate_job_id("a b"), Err(JobIdError::BadCharacter(' ')));
        assert_eq!(
            validate_job_id(&"x".repeat(MAX_JOB_ID_LEN + 1)),
            Err(JobIdError::TooLong)
        );
        assert!("urgent".parse::<Priority>().is_err());
        assert_eq!("STAT".parse::<Priority>(), Ok(Priority::Stat));
    }
}
