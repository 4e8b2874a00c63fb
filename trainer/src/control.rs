//! How a caller watches and steers a run while it trains.
//!
//! The trainer owns its thread; a training service (or a test) learns what
//! happens and asks it to stop only through [`RunControl`], which the loop
//! calls at fixed points: [`RunControl::stop`] before every training batch
//! and before the export, [`RunControl::batch`] after every batch, and
//! [`RunControl::epoch`] once an epoch's checkpoint is complete on disk. A
//! stop therefore takes effect within one batch and can never interrupt a
//! checkpoint or an export half way.

use std::path::Path;

use crate::report::EpochRecord;

/// Progress within an epoch, after each training batch.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BatchProgress {
    /// Epoch in progress, 1-based.
    pub epoch: usize,
    /// Epochs of the whole run.
    pub epochs: usize,
    /// Batch just trained, 1-based.
    pub batch: usize,
    /// Batches in this epoch.
    pub batches: usize,
    /// Training throughput of this epoch so far.
    pub images_per_second: f64,
}

/// What a caller (the training service) sees and steers of a run.
///
/// Called from the training thread, between batches: implementations must
/// be quick and never block on the network (hand work to another thread).
pub trait RunControl: Send + Sync + std::fmt::Debug {
    /// Checked before every training batch and before the export;
    /// `Some(reason)` stops the run with `TrainError::Stopped`.
    fn stop(&self) -> Option<String>;

    /// After every training batch.
    fn batch(&self, progress: BatchProgress);

    /// After each epoch, once its checkpoint (when checkpointing) is complete
    /// on disk at `checkpoint`. The trainer never writes into that directory
    /// again; it deletes it only once two newer checkpoints exist, so the
    /// caller has at least a whole epoch to copy it away.
    fn epoch(&self, record: &EpochRecord, checkpoint: Option<&Path>);
}
