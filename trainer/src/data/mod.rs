//! Dataset discovery, patient-aware splits and background image loading.
//!
//! Why this module looks the way it does:
//!
//! - **Layout.** A dataset is a folder with `effusion/` and `nofinding/` subfolders (the
//!   label is the folder, as in the real NIH subset and `pleura_phantom::write_dataset`)
//!   and an optional `labels.csv` that carries patient ids.
//! - **Patients, not images, are the unit of a split.** The same patient's follow-up films
//!   look alike; one film in training and another in validation lets the model recognise
//!   the patient and inflates every validation metric. When every image has a patient id,
//!   [`split`] therefore assigns whole patients to one side.
//! - **Stratified and never degenerate.** Effusion is the minority class (about 1 in 10 in
//!   production), so a plain random split can leave a validation set without a single
//!   positive, and recall is then undefined. Splits and subsamples are stratified and keep
//!   both classes on both sides whenever the data allows it.
//! - **One preprocessing.** Images are turned into model input only by
//!   `pleura::scan::load_scan`, the function the fleet serves with, so training and
//!   serving cannot drift apart.
//! - **Loading keeps the GPU fed and stays reproducible.** Decoding a 1024² PNG costs far
//!   more than a training step on a small batch, so [`Loader`] decodes on background
//!   threads into a bounded prefetch window and caches decoded images for later epochs
//!   ([`ImageCache`]). Work is indexed and batches are reassembled in order, and every
//!   image's augmentation is seeded from (epoch seed, sample index), so a seed gives the
//!   same batches whatever the thread count or timing.
//! - **Bad files fail loudly.** Training data should be clean; an image that does not
//!   decode is an error that names its path and the `ScanError` code, never skipped.
//!
//! # Layout
//!
//! - `dataset`: [`scan_dataset`], [`scan_datasets`] (several folders as one, patient ids
//!   namespaced by dataset), [`Dataset`], [`Sample`], `labels.csv`.
//! - `split`: [`split`] by patient or stratified, [`subsample`],
//!   [`subsample_prevalence`].
//! - `folds`: [`kfold`], K folds for cross-validation, by patient and stratified.
//! - `loader`: [`Loader`], [`Epoch`], [`Batch`], [`ImageCache`]: background
//!   decoding and augmentation.
//! - `seeds`: the seeded random streams all of them draw from.
//! - `error`: [`DataError`].

mod dataset;
mod error;
mod folds;
mod loader;
mod seeds;
mod split;
#[cfg(test)]
mod tests;

pub use dataset::{
    dataset_name, scan_dataset, scan_datasets, Dataset, Sample, CLASS_EFFUSION, CLASS_NOFINDING,
    IMAGE_EXTENSIONS, LABELS_FILE,
};
pub use error::DataError;
pub use folds::{kfold, FoldSummary, Folds};
pub use loader::{Batch, Epoch, ImageCache, Loader};
pub use split::{fingerprint, split, subsample, subsample_prevalence, Split, SplitSummary};
