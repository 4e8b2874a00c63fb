//! Training runs on the wire: the flags of a run, the request that asks a
//! trainer service for one, the run's record and its event stream.
//!
//! The flags are one definition for `pleura-trainer train` (run here) and
//! `pleura train submit` (run by a trainer service), so the two take the
//! same flags, parse them the same way, and reject the same impossible
//! settings before any work starts.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A flag value that does not parse, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadFlag(pub String);

/// How the two classes are weighted in the loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum ClassWeights {
    /// Inverse training frequency, normalised so the weights average 1.
    Auto,
    /// Plain, unweighted cross-entropy.
    None,
    /// Explicit weights for (effusion, nofinding).
    Manual(f64, f64),
}

impl std::str::FromStr for ClassWeights {
    type Err = BadFlag;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(ClassWeights::Auto),
            "none" => Ok(ClassWeights::None),
            other => {
                let (a, b) = other.split_once(',').ok_or_else(|| {
                    BadFlag(format!(
                        "class weights {other:?}: expected auto, none or A,B"
                    ))
                })?;
                let parse = |v: &str| {
                    v.trim()
                        .parse::<f64>()
                        .map_err(|e| BadFlag(format!("class weight {v:?}: {e}")))
                };
                let (a, b) = (parse(a)?, parse(b)?);
                if !(a > 0.0 && b > 0.0 && a.is_finite() && b.is_finite()) {
                    return Err(BadFlag("class weights must be positive".into()));
                }
                Ok(ClassWeights::Manual(a, b))
            }
        }
    }
}

impl fmt::Display for ClassWeights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClassWeights::Auto => f.write_str("auto"),
            ClassWeights::None => f.write_str("none"),
            ClassWeights::Manual(a, b) => write!(f, "{a},{b}"),
        }
    }
}

impl From<ClassWeights> for String {
    fn from(w: ClassWeights) -> String {
        w.to_string()
    }
}

impl TryFrom<String> for ClassWeights {
    type Error = BadFlag;
    fn try_from(s: String) -> Result<Self, BadFlag> {
        s.parse()
    }
}

/// Learning-rate schedule over epochs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Schedule {
    /// Constant learning rate.
    Constant,
    /// Cosine decay from the initial rate to zero at the last epoch.
    Cosine,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        /// Epochs between decays.
        every: usize,
        /// Decay factor.
        gamma: f64,
    },
}

impl std::str::FromStr for Schedule {
    type Err = BadFlag;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "constant" | "none" => Ok(Schedule::Constant),
            "cosine" => Ok(Schedule::Cosine),
            other => {
                // step:EVERY:GAMMA, e.g. step:5:0.5
                let parts: Vec<&str> = other.split(':').collect();
                match parts.as_slice() {
                    ["step", every, gamma] => {
                        let every: usize = every
                            .parse()
                            .map_err(|e| BadFlag(format!("step every: {e}")))?;
                        let gamma: f64 = gamma
                            .parse()
                            .map_err(|e| BadFlag(format!("step gamma: {e}")))?;
                        if every == 0 || !(gamma > 0.0 && gamma.is_finite()) {
                            return Err(BadFlag(
                                "step:EVERY:GAMMA needs EVERY >= 1 and GAMMA > 0".into(),
                            ));
                        }
                        Ok(Schedule::Step { every, gamma })
                    }
                    _ => Err(BadFlag(format!(
                        "schedule {other:?}: expected constant, cosine or step:EVERY:GAMMA"
                    ))),
                }
            }
        }
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Constant => f.write_str("constant"),
            Schedule::Cosine => f.write_str("cosine"),
            Schedule::Step { every, gamma } => write!(f, "step:{every}:{gamma}"),
        }
    }
}

impl From<Schedule> for String {
    fn from(s: Schedule) -> String {
        s.to_string()
    }
}

impl TryFrom<String> for Schedule {
    type Error = BadFlag;
    fn try_from(s: String) -> Result<Self, BadFlag> {
        s.parse()
    }
}

impl Schedule {
    /// Learning rate for `epoch` (0-based) of `epochs`.
    pub fn lr(&self, base: f64, epoch: usize, epochs: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::Cosine => {
                let t = epoch as f64 / epochs.max(1) as f64;
                base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
            Schedule::Step { every, gamma } => base * gamma.powi((epoch / every.max(1)) as i32),
        }
    }
}

/// Where training runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when libtorch finds a GPU, else the CPU.
    Auto,
    /// The CPU, even where a GPU is present.
    Cpu,
    /// The first GPU; fails where there is none.
    Cuda,
}

impl fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceChoice::Auto => "auto",
            DeviceChoice::Cpu => "cpu",
            DeviceChoice::Cuda => "cuda",
        })
    }
}

/// How a model is trained: the flags of `pleura-trainer train` and of
/// `pleura train submit`, and the settings a training request carries.
#[derive(clap::Args, Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainFlags {
    /// Training epochs.
    #[arg(long, default_value_t = default_epochs())]
    #[serde(default = "default_epochs")]
    pub epochs: usize,
    /// Images per batch.
    #[arg(long, default_value_t = default_batch_size())]
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// Width of the first stage; 64 is the seed's ResNet-18, smaller is faster.
    #[arg(long, default_value_t = default_width())]
    #[serde(default = "default_width")]
    pub width: i64,
    /// Side of the square input image.
    #[arg(long, default_value_t = default_image_size())]
    #[serde(default = "default_image_size")]
    pub image_size: u32,
    /// Adam learning rate.
    #[arg(long, default_value_t = default_lr())]
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Adam weight decay.
    #[arg(long, default_value_t = default_weight_decay())]
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    /// Learning-rate schedule: constant, cosine, or step:EVERY:GAMMA.
    #[arg(long, default_value_t = default_schedule())]
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// Loss class weights: auto (inverse training frequency), none, or A,B for
    /// (effusion, nofinding).
    #[arg(long, default_value_t = default_class_weights())]
    #[serde(default = "default_class_weights")]
    pub class_weights: ClassWeights,
    /// Recall on validation that the decision threshold must reach; the highest
    /// such threshold is chosen.
    #[arg(long, default_value_t = default_target_recall())]
    #[serde(default = "default_target_recall")]
    pub target_recall: f64,
    /// Where to train: auto (CUDA when available, else CPU), cpu, or cuda.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    #[serde(default = "default_device")]
    pub device: DeviceChoice,
    /// Seed of the split, shuffles, augmentation and initial weights.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub seed: u64,
    /// Share of images held out for validation.
    #[arg(long, default_value_t = default_val_fraction())]
    #[serde(default = "default_val_fraction")]
    pub val_fraction: f64,
    /// Turn off training augmentation.
    #[arg(long)]
    #[serde(default)]
    pub no_augment: bool,
    /// Background decoding threads.
    #[arg(long, default_value_t = default_loader_threads())]
    #[serde(default = "default_loader_threads")]
    pub loader_threads: usize,
    /// Model version (default: generated from the time and the weights).
    #[arg(long)]
    #[serde(default)]
    pub version: Option<String>,
}

fn default_epochs() -> usize {
    10
}
fn default_batch_size() -> usize {
    16
}
fn default_width() -> i64 {
    64
}
fn default_image_size() -> u32 {
    256
}
fn default_lr() -> f64 {
    1e-3
}
fn default_weight_decay() -> f64 {
    1e-4
}
fn default_schedule() -> Schedule {
    Schedule::Cosine
}
fn default_class_weights() -> ClassWeights {
    ClassWeights::Auto
}
fn default_target_recall() -> f64 {
    0.90
}
fn default_device() -> DeviceChoice {
    DeviceChoice::Auto
}
fn default_val_fraction() -> f64 {
    0.2
}
fn default_loader_threads() -> usize {
    2
}

impl Default for TrainFlags {
    fn default() -> Self {
        TrainFlags {
            epochs: default_epochs(),
            batch_size: default_batch_size(),
            width: default_width(),
            image_size: default_image_size(),
            lr: default_lr(),
            weight_decay: default_weight_decay(),
            schedule: default_schedule(),
            class_weights: default_class_weights(),
            target_recall: default_target_recall(),
            device: default_device(),
            seed: 0,
            val_fraction: default_val_fraction(),
            no_augment: false,
            loader_threads: default_loader_threads(),
            version: None,
        }
    }
}

/// The largest input side the trainer accepts: 1024² is the scans' own size,
/// and beyond it a batch of 16 no longer fits a modest GPU.
pub const MAX_IMAGE_SIZE: u32 = 1024;
/// The smallest: below 32 the ResNet's five down-samplings leave nothing.
pub const MIN_IMAGE_SIZE: u32 = 32;

impl TrainFlags {
    /// Every setting that cannot work, each said in words (empty when all is
    /// well). Checked before a run is queued or started, not after hours of it.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.epochs == 0 {
            out.push("--epochs must be at least 1".into());
        }
        if self.epochs > 10_000 {
            out.push(format!(
                "--epochs {} is not a training run anyone can wait for (at most 10000)",
                self.epochs
            ));
        }
        if self.batch_size < 2 {
            out.push("--batch-size must be at least 2 (batch norm needs two images)".into());
        }
        if self.batch_size > 4096 {
            out.push(format!(
                "--batch-size {} is too large (at most 4096)",
                self.batch_size
            ));
        }
        if !(1..=512).contains(&self.width) {
            out.push(format!("--width {} must be within 1..=512", self.width));
        }
        if !(MIN_IMAGE_SIZE..=MAX_IMAGE_SIZE).contains(&self.image_size) {
            out.push(format!(
                "--image-size {} must be within {MIN_IMAGE_SIZE}..={MAX_IMAGE_SIZE}",
                self.image_size
            ));
        }
        if !(self.lr > 0.0 && self.lr < 10.0) {
            out.push(format!("--lr {} must be positive and below 10", self.lr));
        }
        if !(self.weight_decay >= 0.0 && self.weight_decay < 1.0) {
            out.push(format!(
                "--weight-decay {} must be within [0, 1)",
                self.weight_decay
            ));
        }
        if !(self.target_recall > 0.0 && self.target_recall <= 1.0) {
            out.push(format!(
                "--target-recall {} must be within (0, 1]",
                self.target_recall
            ));
        }
        if !(self.val_fraction > 0.0 && self.val_fraction < 1.0) {
            out.push(format!(
                "--val-fraction {} must be within (0, 1)",
                self.val_fraction
            ));
        }
        if !(1..=64).contains(&self.loader_threads) {
            out.push(format!(
                "--loader-threads {} must be within 1..=64",
                self.loader_threads
            ));
        }
        if let Some(v) = &self.version {
            if !super::valid_version(v) {
                out.push(format!(
                    "--version {v:?} must be 1..={} characters of [A-Za-z0-9._-]",
                    super::MAX_VERSION_LEN
                ));
            }
        }
        out
    }
}

/// Version of [`TrainRequest`], [`RunRecord`] and [`RunEvent`]; fields are
/// only ever added, so a reader of version N reads every N' <= N.
pub const TRAIN_SCHEMA_VERSION: u32 = 1;

/// Longest accepted run id.
pub const MAX_RUN_ID_LEN: usize = 64;

/// Whether `id` is a usable run id: `[A-Za-z0-9._-]{1,64}`, the same
/// alphabet as model versions, since it also names objects in the store.
pub fn valid_run_id(id: &str) -> bool {
    (1..=MAX_RUN_ID_LEN).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// A request for a training run: the body of a message on
/// [`super::Names::train_queue`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainRequest {
    /// [`TRAIN_SCHEMA_VERSION`].
    pub v: u32,
    /// The run's id, chosen by the submitter; see [`valid_run_id`].
    pub run_id: String,
    /// The dataset: `file:///dir` or `s3://bucket/prefix`, holding
    /// `effusion/` and `nofinding/` and optionally `labels.csv`.
    pub data: String,
    /// How to train.
    pub flags: TrainFlags,
    /// Publish the model through the promotion gate and activate it; without
    /// it the model is uploaded unactivated, for someone to inspect.
    #[serde(default)]
    pub publish: bool,
    /// Activate even if the gate refuses (needs `reason`).
    #[serde(default)]
    pub force: bool,
    /// Why; recorded in the registry's history.
    #[serde(default)]
    pub reason: Option<String>,
    /// Who asked (`user@host`).
    pub submitted_by: String,
    /// When, RFC 3339.
    pub submitted_at: String,
}

/// Where a run is in its life. Terminal states never change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunState {
    /// On the queue, or released by a trainer that stopped and waiting for
    /// another.
    Queued,
    /// Held by a trainer (see [`RunRecord::trainer`]).
    Running,
    /// Finished; the model is in the registry.
    Succeeded,
    /// Ended with an error (see [`RunRecord::error`]).
    Failed,
    /// Stopped by someone (see [`RunRecord::cancel`]).
    Cancelled,
}

impl RunState {
    /// The lowercase name, as stored and printed.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Queued => "queued",
            RunState::Running => "running",
            RunState::Succeeded => "succeeded",
            RunState::Failed => "failed",
            RunState::Cancelled => "cancelled",
        }
    }

    /// Whether the run has ended.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RunState::Succeeded | RunState::Failed | RunState::Cancelled
        )
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for RunState {
    type Err = BadFlag;
    fn from_str(s: &str) -> Result<Self, BadFlag> {
        Ok(match s {
            "queued" => RunState::Queued,
            "running" => RunState::Running,
            "succeeded" => RunState::Succeeded,
            "failed" => RunState::Failed,
            "cancelled" => RunState::Cancelled,
            other => return Err(BadFlag(format!("run state {other:?}"))),
        })
    }
}

/// One epoch's figures, as the trainer reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochFigures {
    /// 1-based.
    pub epoch: usize,
    /// Of how many.
    pub epochs: usize,
    /// Mean training loss (`None` when not finite).
    pub train_loss: Option<f64>,
    /// Validation loss.
    pub val_loss: Option<f64>,
    /// Validation AUROC (`None` when validation lacks a class).
    pub val_auroc: Option<f64>,
    /// Validation recall at 0.5.
    pub val_recall: Option<f64>,
    /// Validation precision at 0.5.
    pub val_precision: Option<f64>,
    /// Learning rate of the epoch.
    pub lr: f64,
    /// Wall time of the epoch, seconds.
    pub seconds: f64,
    /// Training images per second.
    pub images_per_second: f64,
}

/// One trainer's turn at a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Attempt {
    /// 1-based, in claim order.
    pub attempt: u32,
    /// The trainer that held the run.
    pub trainer: String,
    /// When it claimed it, RFC 3339.
    pub started_at: String,
    /// The checkpoint it resumed from (epochs completed), if any.
    #[serde(default)]
    pub resumed_from_epoch: Option<usize>,
    /// `cpu` or `cuda:N (name)`, once known.
    #[serde(default)]
    pub device: Option<String>,
    /// How the turn ended (`succeeded`, `failed: ...`, `interrupted: ...`);
    /// `None` while running, or when the trainer died holding it.
    #[serde(default)]
    pub ended: Option<String>,
}

/// Who stopped a run, and when.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CancelRequest {
    /// `user@host`.
    pub by: String,
    /// RFC 3339.
    pub at: String,
}

/// Everything known about a run: what `pleura train show` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// [`TRAIN_SCHEMA_VERSION`].
    pub v: u32,
    /// The request, as submitted.
    pub request: TrainRequest,
    /// Where the run is.
    pub state: RunState,
    /// When it was queued, started (first claim) and ended, RFC 3339.
    pub created_at: String,
    /// First claim.
    #[serde(default)]
    pub started_at: Option<String>,
    /// Reaching a terminal state.
    #[serde(default)]
    pub finished_at: Option<String>,
    /// Last change.
    pub updated_at: String,
    /// The trainer holding the run now.
    #[serde(default)]
    pub trainer: Option<String>,
    /// Every trainer that held it, in order.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// The device of the current (or last) attempt.
    #[serde(default)]
    pub device: Option<String>,
    /// Epochs completed.
    #[serde(default)]
    pub epoch: usize,
    /// The last epoch's figures.
    #[serde(default)]
    pub last_epoch: Option<EpochFigures>,
    /// Training images per second over the run's epochs so far.
    #[serde(default)]
    pub images_per_second: Option<f64>,
    /// The newest checkpoint in the runs store (epochs completed), if any.
    #[serde(default)]
    pub checkpoint_epoch: Option<usize>,
    /// The model the run made.
    #[serde(default)]
    pub model_version: Option<String>,
    /// Where the model is (its registry URL).
    #[serde(default)]
    pub model_url: Option<String>,
    /// With `publish`: whether it became active.
    #[serde(default)]
    pub activated: Option<bool>,
    /// Why the promotion gate refused it, when it did (then it is not active).
    #[serde(default)]
    pub gate_refusals: Vec<String>,
    /// Validation figures of the model (AUROC, recall, precision, threshold).
    #[serde(default)]
    pub validation: Option<serde_json::Value>,
    /// Why it failed.
    #[serde(default)]
    pub error: Option<String>,
    /// Who cancelled it.
    #[serde(default)]
    pub cancel: Option<CancelRequest>,
}

impl RunRecord {
    /// A new run, queued.
    pub fn queued(request: TrainRequest, now: String) -> RunRecord {
        RunRecord {
            v: TRAIN_SCHEMA_VERSION,
            request,
            state: RunState::Queued,
            created_at: now.clone(),
            started_at: None,
            finished_at: None,
            updated_at: now,
            trainer: None,
            attempts: Vec::new(),
            device: None,
            epoch: 0,
            last_epoch: None,
            images_per_second: None,
            checkpoint_epoch: None,
            model_version: None,
            model_url: None,
            activated: None,
            gate_refusals: Vec::new(),
            validation: None,
            error: None,
            cancel: None,
        }
    }

    /// The run's id.
    pub fn run_id(&self) -> &str {
        &self.request.run_id
    }
}

/// An entry of a run's event stream ([`super::Names::train_events`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunEvent {
    /// [`TRAIN_SCHEMA_VERSION`].
    pub v: u32,
    /// The run.
    pub run_id: String,
    /// When, epoch milliseconds.
    pub at_ms: u64,
    /// What happened.
    #[serde(flatten)]
    pub kind: RunEventKind,
}

/// What happened to a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEventKind {
    /// Queued by someone.
    Queued {
        /// Who.
        by: String,
    },
    /// A trainer claimed it (the first time, or to resume it).
    Started {
        /// The trainer.
        trainer: String,
        /// 1-based.
        attempt: u32,
        /// Epochs already done, from the checkpoint it resumed.
        resumed_from_epoch: Option<usize>,
    },
    /// The device the trainer picked.
    Device {
        /// `cpu` or `cuda:N`.
        device: String,
    },
    /// Progress within an epoch (throttled).
    Progress {
        /// 1-based.
        epoch: usize,
        /// Of how many.
        epochs: usize,
        /// Batches done in this epoch.
        batch: usize,
        /// Batches in the epoch.
        batches: usize,
        /// Images per second in this epoch so far.
        images_per_second: f64,
    },
    /// An epoch ended.
    Epoch(EpochFigures),
    /// A checkpoint reached the runs store.
    Checkpoint {
        /// Epochs completed.
        epoch: usize,
    },
    /// Someone asked to stop it.
    CancelRequested {
        /// Who.
        by: String,
    },
    /// A trainer let go of it without finishing (shutdown, lost lease);
    /// another picks it up.
    Interrupted {
        /// The trainer.
        trainer: String,
        /// Why.
        reason: String,
    },
    /// The run ended.
    Finished {
        /// `succeeded`, `failed` or `cancelled`.
        state: RunState,
        /// The model, when one was made.
        model_version: Option<String>,
        /// Whether it is active now.
        activated: Option<bool>,
        /// Why it failed.
        error: Option<String>,
    },
}

impl RunEvent {
    /// Whether this is the run's last event.
    pub fn is_final(&self) -> bool {
        matches!(self.kind, RunEventKind::Finished { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_round_trip_through_json_as_their_flag_spelling() {
        let flags = TrainFlags {
            schedule: "step:5:0.5".parse().unwrap(),
            class_weights: "3,1".parse().unwrap(),
            device: DeviceChoice::Cpu,
            ..TrainFlags::default()
        };
        let json = serde_json::to_value(&flags).unwrap();
        assert_eq!(json["schedule"], "step:5:0.5");
        assert_eq!(json["class_weights"], "3,1");
        assert_eq!(json["device"], "cpu");
        let back: TrainFlags = serde_json::from_value(json).unwrap();
        assert_eq!(back, flags);
    }

    #[test]
    fn missing_fields_take_the_flag_defaults_and_unknown_ones_are_refused() {
        let f: TrainFlags = serde_json::from_str(r#"{"epochs": 3}"#).unwrap();
        assert_eq!(
            f,
            TrainFlags {
                epochs: 3,
                ..TrainFlags::default()
            }
        );
        let e = serde_json::from_str::<TrainFlags>(r#"{"epochs": 3, "epoch": 4}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `epoch`"), "{e}");
        let e = serde_json::from_str::<TrainFlags>(r#"{"schedule": "linear"}"#).unwrap_err();
        assert!(e.to_string().contains("constant, cosine or step"), "{e}");
    }

    #[test]
    fn impossible_settings_are_each_named() {
        assert!(TrainFlags::default().problems().is_empty());
        let bad = TrainFlags {
            epochs: 0,
            batch_size: 1,
            image_size: 8,
            val_fraction: 1.0,
            lr: -1.0,
            version: Some("../x".into()),
            ..TrainFlags::default()
        };
        let p = bad.problems().join("\n");
        for needle in [
            "--epochs",
            "--batch-size",
            "--image-size",
            "--val-fraction",
            "--lr",
            "--version",
        ] {
            assert!(p.contains(needle), "{needle} missing from:\n{p}");
        }
    }

    #[test]
    fn run_documents_round_trip_and_name_their_kind() {
        let request = TrainRequest {
            v: TRAIN_SCHEMA_VERSION,
            run_id: "run-1".into(),
            data: "file:///data".into(),
            flags: TrainFlags::default(),
            publish: true,
            force: false,
            reason: None,
            submitted_by: "a@b".into(),
            submitted_at: "2026-01-01T00:00:00Z".into(),
        };
        let record = RunRecord::queued(request.clone(), "2026-01-01T00:00:00Z".into());
        let json = serde_json::to_string(&record).unwrap();
        assert!(json.contains(r#""state":"queued""#), "{json}");
        assert_eq!(serde_json::from_str::<RunRecord>(&json).unwrap(), record);
        let event = RunEvent {
            v: TRAIN_SCHEMA_VERSION,
            run_id: "run-1".into(),
            at_ms: 1,
            kind: RunEventKind::Checkpoint { epoch: 2 },
        };
        let json = serde_json::to_string(&event).unwrap();
        assert!(json.contains(r#""event":"checkpoint""#), "{json}");
        assert_eq!(serde_json::from_str::<RunEvent>(&json).unwrap(), event);
        assert!(!event.is_final());
        let bad = r#"{"v":1,"run_id":"x","data":"file:///d","flags":{"epochz":1},"submitted_by":"a","submitted_at":"t"}"#;
        assert!(serde_json::from_str::<TrainRequest>(bad).is_err());
    }

    #[test]
    fn run_ids_use_the_version_alphabet() {
        assert!(valid_run_id("run-20261205-ab12"));
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(!valid_run_id(bad), "{bad}");
        }
    }

    #[test]
    fn bad_schedules_and_weights_are_refused() {
        for s in ["step:0:0.5", "step:2:-1", "step:x:1", "linear"] {
            assert!(s.parse::<Schedule>().is_err(), "{s}");
        }
        for s in ["0,1", "a,b", "1"] {
            assert!(s.parse::<ClassWeights>().is_err(), "{s}");
        }
    }
}
