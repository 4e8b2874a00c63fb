//! What a training run is told ([`TrainConfig`]) and why one stops
//! ([`TrainError`]), with the checks a configuration passes before any work.
//! Re-exported by [`crate::train`], where callers find them.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::checkpoint::CheckpointError;
use crate::control::RunControl;
use crate::data::DataError;
use crate::export::ExportError;
use crate::model::NetError;
use crate::optim::OptimError;
use crate::recipe::Recipe;

use pleura::wire::{ClassWeights, Schedule};

/// Everything a training run is told.
#[derive(Debug, Clone, Serialize)]
pub struct TrainConfig {
    /// Dataset root with `effusion/` and `nofinding/` (and optionally `labels.csv`).
    pub data: PathBuf,
    /// Further dataset roots trained on together with `data` (`--data` given more
    /// than once); patient ids are then namespaced by dataset (see
    /// [`crate::data::scan_datasets`]). Empty: `data` alone, as before.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub more_data: Vec<PathBuf>,
    /// Output root; the model goes to `out/<version>/`.
    pub out: PathBuf,
    /// Training epochs.
    pub epochs: usize,
    /// Images per batch.
    pub batch_size: usize,
    /// Width of the first stage (64 = the seed's ResNet-18).
    pub width: i64,
    /// Side of the square input.
    pub image_size: u32,
    /// Adam learning rate.
    pub lr: f64,
    /// Adam weight decay.
    pub weight_decay: f64,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Loss class weights.
    pub class_weights: ClassWeights,
    /// Recall the decision threshold must reach on validation.
    pub target_recall: f64,
    /// Fail-fast overfit check on this many images instead of a real run.
    pub ablation: Option<usize>,
    /// `auto`, `cpu` or `cuda`.
    pub device: String,
    /// Seed of everything random: split, shuffles, augmentation, weights.
    pub seed: u64,
    /// Share of images held out for validation.
    pub val_fraction: f64,
    /// Augment training images (CXR-safe).
    pub augment: bool,
    /// Background decoding threads.
    pub loader_threads: usize,
    /// Model version; generated when absent.
    pub version: Option<String>,
    /// Draw the progress bar (on a terminal).
    pub progress: bool,
    /// Trial settings (label smoothing, mixup, dropout, warm-up, EMA, augmentation
    /// strength, flip TTA); the default is neutral.
    pub recipe: Recipe,
    /// Watches the run and may stop it between batches.
    #[serde(skip)]
    pub control: Option<Arc<dyn RunControl>>,
    /// Write a complete checkpoint after every epoch to
    /// `checkpoint_dir/epoch-NNNN/`, keeping the newest two.
    #[serde(skip)]
    pub checkpoint_dir: Option<PathBuf>,
    /// A checkpoint directory to continue from, written by a run with the
    /// same settings on the same data.
    #[serde(skip)]
    pub resume: Option<PathBuf>,
    /// The training service's id of the run, recorded in the manifest.
    #[serde(skip)]
    pub run_id: Option<String>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            data: PathBuf::new(),
            more_data: Vec::new(),
            out: PathBuf::from("models"),
            epochs: 10,
            batch_size: 16,
            width: 64,
            image_size: 256,
            lr: 1e-3,
            weight_decay: 1e-4,
            schedule: Schedule::Cosine,
            class_weights: ClassWeights::Auto,
            target_recall: 0.90,
            ablation: None,
            device: "auto".into(),
            seed: 0,
            val_fraction: 0.2,
            augment: true,
            loader_threads: 2,
            version: None,
            progress: true,
            recipe: Recipe::default(),
            control: None,
            checkpoint_dir: None,
            resume: None,
            run_id: None,
        }
    }
}

impl TrainConfig {
    /// The run that `flags` describe, on the dataset at `data`, exporting to `out`.
    pub fn from_flags(
        data: PathBuf,
        out: PathBuf,
        flags: &pleura::wire::TrainFlags,
    ) -> TrainConfig {
        TrainConfig {
            data,
            more_data: Vec::new(),
            out,
            epochs: flags.epochs,
            batch_size: flags.batch_size,
            width: flags.width,
            image_size: flags.image_size,
            lr: flags.lr,
            weight_decay: flags.weight_decay,
            schedule: flags.schedule,
            class_weights: flags.class_weights,
            target_recall: flags.target_recall,
            ablation: None,
            device: flags.device.to_string(),
            seed: flags.seed,
            val_fraction: flags.val_fraction,
            augment: !flags.no_augment,
            loader_threads: flags.loader_threads,
            version: flags.version.clone(),
            progress: true,
            recipe: Recipe::default(),
            control: None,
            checkpoint_dir: None,
            resume: None,
            run_id: None,
        }
    }
}

/// Why training stopped.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The dataset could not be read.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The model or device could not be set up.
    #[error(transparent)]
    Model(#[from] NetError),
    /// Export failed (including a failed parity check).
    #[error(transparent)]
    Export(#[from] ExportError),
    /// The report could not be written.
    #[error("report: {0}")]
    Report(String),
    /// The ablation check failed: the set-up cannot even overfit a handful of images.
    #[error(
        "ABLATION FAILED: after {epochs} epochs the model reaches only {accuracy:.1}% training accuracy on {n} images \
         (needs 100%). A healthy set-up overfits this easily; check the labels, the loss, and the learning rate ({lr})."
    )]
    AblationFailed {
        /// Images trained on.
        n: usize,
        /// Epochs run.
        epochs: usize,
        /// Best training accuracy reached, in percent.
        accuracy: f64,
        /// Learning rate used.
        lr: f64,
    },
    /// A configuration value makes no sense.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// libtorch failed.
    #[error("torch: {0}")]
    Torch(#[from] tch::TchError),
    /// The optimiser failed.
    #[error(transparent)]
    Optimizer(#[from] OptimError),
    /// A checkpoint could not be written.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),
    /// The checkpoint to resume from is unreadable, or was made by another
    /// configuration or dataset.
    #[error("cannot resume: {0}")]
    Resume(String),
    /// [`RunControl::stop`] asked the run to stop; nothing was exported.
    #[error("stopped during epoch {epoch}: {reason}")]
    Stopped {
        /// Why, as the control said.
        reason: String,
        /// The epoch (1-based) running when it stopped; the last one when
        /// it stopped before the export.
        epoch: usize,
    },
}

pub(crate) fn validate(cfg: &TrainConfig) -> Result<(), TrainError> {
    let bad = |m: &str| Err(TrainError::Config(m.to_string()));
    if cfg.epochs == 0 {
        return bad("--epochs must be at least 1");
    }
    if cfg.batch_size == 0 {
        return bad("--batch-size must be at least 1");
    }
    if cfg.width < 1 || cfg.image_size < pleura::model::onnx::MIN_IMAGE_SIZE {
        return bad("--width must be >= 1 and --image-size >= 32");
    }
    if !(0.0..=1.0).contains(&cfg.target_recall) {
        return bad("--target-recall must be within [0, 1]");
    }
    // Written so that NaN fails too.
    if cfg.lr.is_nan() || cfg.lr < 0.0 {
        return bad("--lr must be >= 0");
    }
    if !(0.0 < cfg.val_fraction && cfg.val_fraction < 1.0) {
        return bad("--val-fraction must be within (0, 1)");
    }
    if cfg.ablation.is_some_and(|n| n < 2) {
        return bad("--ablation needs at least 2 images");
    }
    // An ablation is a minute's check, and stops at the first epoch that
    // overfits: nothing worth resuming.
    if cfg.ablation.is_some() && (cfg.checkpoint_dir.is_some() || cfg.resume.is_some()) {
        return bad("--ablation runs are not checkpointed or resumed");
    }
    if let Some(problem) = cfg.recipe.problems().into_iter().next() {
        return Err(TrainError::Config(problem));
    }
    // The average's state is not in a checkpoint, so a resumed run could not continue
    // it; the service, which checkpoints, never sets it.
    if cfg.recipe.ema_decay.is_some() && (cfg.checkpoint_dir.is_some() || cfg.resume.is_some()) {
        return bad("--ema runs are not checkpointed or resumed");
    }
    Ok(())
}

impl TrainConfig {
    /// Every dataset root: `data`, then `more_data`.
    pub fn datasets(&self) -> Vec<PathBuf> {
        std::iter::once(self.data.clone())
            .chain(self.more_data.iter().cloned())
            .collect()
    }
}
