//! [`DataError`]: why a dataset could not be read or loaded.

use std::path::PathBuf;

use pleura::scan::ScanError;

/// Why a dataset could not be read or loaded.
///
/// Messages name file paths (which the operator chose) but never file content or patient
/// attributes.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// The dataset root does not exist or is not a folder.
    #[error("dataset root {0} is not a directory")]
    NotADirectory(PathBuf),
    /// One of the two class folders is missing.
    #[error(
        "class folder {path} is missing: a dataset needs both effusion/ and nofinding/ \
         subfolders"
    )]
    MissingClassDir {
        /// The folder that was expected.
        path: PathBuf,
    },
    /// A class folder holds no image files.
    #[error(
        "class folder {path} has no images (.png, .jpg, .jpeg or .dcm): training needs \
         examples of both classes"
    )]
    EmptyClass {
        /// `effusion` or `nofinding`.
        class: &'static str,
        /// The empty folder.
        path: PathBuf,
    },
    /// A file or folder could not be read.
    #[error("cannot read {path}: {error}")]
    Io {
        /// What was being read.
        path: PathBuf,
        /// The operating system's reason.
        error: std::io::Error,
    },
    /// `labels.csv` is malformed or contradicts the image folders.
    #[error("{path}: {message}")]
    Labels {
        /// The labels file.
        path: PathBuf,
        /// What is wrong, with the line number where there is one.
        message: String,
    },
    /// An image file did not decode or preprocess.
    #[error("cannot use image {path}: {code} ({error})")]
    Decode {
        /// The offending file.
        path: PathBuf,
        /// The stable [`ScanError::code`], e.g. `corrupt_image`.
        code: &'static str,
        /// The full error.
        error: ScanError,
    },
    /// A loader was asked for something impossible (zero batch size, bad augmentation).
    #[error("invalid loader argument: {0}")]
    InvalidArgument(String),
    /// A background worker died; a bug, not a data problem.
    #[error("loader worker failed: {0}")]
    Worker(String),
    /// Two dataset folders given together share a name (or are the same folder); the
    /// name namespaces patient ids, so it must tell the datasets apart.
    #[error(
        "datasets {first} and {second} are both named {name:?}: combined datasets need \
         distinct folder names (their names prefix the patient ids)"
    )]
    DuplicateDataset {
        /// The shared folder name.
        name: String,
        /// The first folder with it.
        first: PathBuf,
        /// The second.
        second: PathBuf,
    },
    /// A fold split is impossible: too few patients (or images) with or without
    /// effusion for every fold to hold both classes.
    #[error(
        "{k} folds need every fold to hold both classes, but the data has {positive_groups} \
         patients with effusion and {negative_groups} without (images without a patient id \
         count one each){detail}"
    )]
    TooFewForFolds {
        /// Folds asked for.
        k: usize,
        /// Groups (patients) with at least one effusion image.
        positive_groups: usize,
        /// Groups with at least one no-finding image.
        negative_groups: usize,
        /// What went wrong beyond the counts, if anything (starts with "; ").
        detail: String,
    },
}
