//! The Pleura trainer: retrains the effusion ResNet with tch (libtorch),
//! evaluates it on what matters for a 1-in-10 finding (recall, precision,
//! AUROC, a threshold chosen for recall), and exports ONNX that the fleet
//! serves, after checking tract agrees with tch.
//!
//! It reuses the shared contract and copies none of it: decoding and
//! preprocessing (`pleura::scan::load_scan`), the network shape
//! (`pleura::model::onnx::ResNetSpec`), the ONNX writer and the model manifest.
//!
//! # Layout
//!
//! - [`data`]: dataset discovery, patient-aware splits, background loading
//!   with a bounded prefetch queue and a decoded-image cache.
//! - [`augment`]: CXR-safe augmentation (no vertical flips, no centre crops).
//! - [`model`]: the ResNet in tch, built from `ResNetSpec` with the writer's names.
//! - [`train`]: the training loop, class weights, schedules, ablation check;
//!   [`train::train_fold`], one cross-validation fold.
//! - [`train_config`]: [`train::TrainConfig`] and [`train::TrainError`].
//! - [`recipe`]: trial settings (label smoothing, mixup, dropout, warm-up, EMA,
//!   augmentation strength, flip TTA), neutral by default.
//! - [`cv`]: cross-validation: patient-grouped folds, out-of-fold predictions,
//!   pooled threshold, temperature scaling, bootstrap intervals, its report.
//! - [`calibration`]: temperature scaling, ECE, reliability diagrams.
//! - [`optim`]: Adam with state that can be saved and restored.
//! - [`checkpoint`]: per-epoch checkpoints and what a resume checks.
//! - [`control`]: [`control::RunControl`], how a caller watches and stops a run.
//! - [`metrics`]: AUROC, PR-AUC, threshold for a target recall, confusion matrix.
//! - [`export`]: parity check (tract vs tch) and the model directory.
//! - [`report`]: `report.json`, plots and `report.md`.
//! - [`serve`]: `pleura-trainer serve`, the training service: requests from
//!   the queue, leases, progress and cancel in Redis, checkpoints, publish.
//! - [`quantize`]: int8 variants, calibrated on the training split and
//!   measured against their parent on its validation split.

pub mod augment;
pub mod calibration;
pub mod checkpoint;
pub mod control;
pub mod cv;
pub mod data;
pub mod export;
pub mod metrics;
pub mod model;
pub mod optim;
pub mod quantize;
pub mod recipe;
pub mod report;
pub mod serve;
pub mod train;
pub mod train_config;
