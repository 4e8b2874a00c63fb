//! The service's side of [`RunControl`]: the training thread asks it whether
//! to stop and hands it progress, which async tasks turn into Redis writes
//! and checkpoint uploads, so training never waits on the network.

use std::path::PathBuf;
use std::sync::Mutex;

use pleura::wire::{CancelRequest, EpochFigures};
use tokio::sync::mpsc;

use crate::control::{BatchProgress, RunControl};
use crate::report::EpochRecord;

/// Why a run is being stopped. The first reason given wins.
#[derive(Debug, Clone, PartialEq)]
pub enum Stop {
    /// Someone cancelled it.
    Cancelled(CancelRequest),
    /// This trainer is shutting down; another resumes the run.
    Shutdown,
    /// The lease is gone; someone else may hold the run now.
    LeaseLost,
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Cancelled(c) => write!(f, "cancelled by {}", c.by),
            Stop::Shutdown => f.write_str("the trainer is shutting down"),
            Stop::LeaseLost => f.write_str("the trainer lost its lease on the run"),
        }
    }
}

/// What the training thread reports.
#[derive(Debug)]
pub enum Progress {
    /// A batch ended.
    Batch(BatchProgress),
    /// An epoch ended, with its checkpoint folder.
    Epoch(EpochFigures, Option<PathBuf>),
}

/// One run's control.
#[derive(Debug)]
pub struct ServiceControl {
    stop: Mutex<Option<Stop>>,
    epochs: usize,
    tx: mpsc::UnboundedSender<Progress>,
}

impl ServiceControl {
    /// A control for a run of `epochs`, reporting to `tx`.
    pub fn new(epochs: usize, tx: mpsc::UnboundedSender<Progress>) -> ServiceControl {
        ServiceControl {
            stop: Mutex::new(None),
            epochs,
            tx,
        }
    }

    /// Asks the run to stop at its next batch, unless it was asked already.
    pub fn request_stop(&self, why: Stop) {
        let mut stop = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        if stop.is_none() {
            *stop = Some(why);
        }
    }

    /// Why the run was asked to stop, if it was.
    pub fn stop_reason(&self) -> Option<Stop> {
        self.stop.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl RunControl for ServiceControl {
    fn stop(&self) -> Option<String> {
        self.stop_reason().map(|s| s.to_string())
    }

    fn batch(&self, progress: BatchProgress) {
        let _ = self.tx.send(Progress::Batch(progress));
    }

    fn epoch(&self, r: &EpochRecord, checkpoint: Option<&std::path::Path>) {
        let figures = EpochFigures {
            epoch: r.epoch,
            epochs: self.epochs,
            train_loss: finite(r.train_loss),
            val_loss: finite(r.val_loss),
            val_auroc: r.val_auroc.and_then(finite),
            val_recall: finite(r.val_recall),
            val_precision: finite(r.val_precision),
            lr: r.lr,
            seconds: r.seconds,
            images_per_second: r.images_per_second,
        };
        let _ = self.tx.send(Progress::Epoch(
            figures,
            checkpoint.map(|p| p.to_path_buf()),
        ));
    }
}

/// JSON has no NaN: a figure that is not a number is absent.
fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}
