//! Dataset discovery, patient-aware splits and background image loading.
//!
//! Why this module looks the way it does:
//!
//! - **Layout.** A dataset is a folder with `effusion/` and `nofinding/` subfolders (the
//!   label is the folder, as in the real NIH subset and `pleura::phantom::write_dataset`)
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
//!   `pleura::preprocess::load_scan`, the function the fleet serves with, so training and
//!   serving cannot drift apart.
//! - **Loading keeps the GPU fed and stays reproducible.** Decoding a 1024² PNG costs far
//!   more than a training step on a small batch, so [`Loader`] decodes on background
//!   threads into a bounded prefetch window and caches decoded images for later epochs
//!   ([`ImageCache`]). Work is indexed and batches are reassembled in order, and every
//!   image's augmentation is seeded from (epoch seed, sample index), so a seed gives the
//!   same batches whatever the thread count or timing.
//! - **Bad files fail loudly.** Training data should be clean; an image that does not
//!   decode is an error that names its path and the `ScanError` code, never skipped.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};
use pleura::phantom::Finding;
use pleura::preprocess::{load_scan, Limits, ScanError};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::augment::{self, AugmentConfig};

/// Class index of an effusion, the model's output column 0.
pub const CLASS_EFFUSION: i64 = 0;
/// Class index of a scan with no finding, the model's output column 1.
pub const CLASS_NOFINDING: i64 = 1;
/// File extensions (compared case-insensitively) that count as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "dcm"];
/// Name of the optional per-image metadata file in a dataset root.
pub const LABELS_FILE: &str = "labels.csv";

/// ChaCha stream ids, so that the different uses of one seed draw independent numbers.
/// (Augmentation uses the sample index as its stream, see `augment::image_rng`; these sit
/// at the top of the range, away from any realistic index.)
const STREAM_SPLIT: u64 = u64::MAX;
const STREAM_SUBSAMPLE_EFFUSION: u64 = u64::MAX - 1;
const STREAM_SUBSAMPLE_NOFINDING: u64 = u64::MAX - 2;
const STREAM_EPOCH_ORDER: u64 = u64::MAX - 3;

/// Folder name of a class; taken from the phantom generator so both agree by construction.
fn class_dir(effusion: bool) -> &'static str {
    if effusion {
        Finding::Effusion.label()
    } else {
        Finding::NoFinding.label()
    }
}

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
}

/// One image of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Path of the image file.
    pub path: PathBuf,
    /// Ground truth: `true` for the `effusion/` folder, `false` for `nofinding/`.
    pub effusion: bool,
    /// Patient id from `labels.csv`, if the file lists this image.
    pub patient: Option<String>,
}

impl Sample {
    /// Class index as the model's output columns are ordered: [`CLASS_EFFUSION`] (0) or
    /// [`CLASS_NOFINDING`] (1).
    pub fn class(&self) -> i64 {
        if self.effusion {
            CLASS_EFFUSION
        } else {
            CLASS_NOFINDING
        }
    }
}

/// The images found under a dataset root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// The folder that was scanned.
    pub root: PathBuf,
    /// Every image, sorted by path so that everything downstream is deterministic.
    pub samples: Vec<Sample>,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    /// Whether there are no images (never the case for a dataset from [`scan_dataset`]).
    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Number of effusion images.
    pub fn n_effusion(&self) -> usize {
        self.samples.iter().filter(|s| s.effusion).count()
    }

    /// Whether every image has a patient id, which is what makes [`split`] split by patient.
    pub fn has_patient_ids(&self) -> bool {
        !self.samples.is_empty() && self.samples.iter().all(|s| s.patient.is_some())
    }
}

/// Finds the images of a dataset and attaches patient ids.
///
/// Looks for files ending in `.png`, `.jpg`, `.jpeg` or `.dcm` (any case) under
/// `root/effusion/` and `root/nofinding/`, recursively. Hidden entries (names starting with
/// `.`, such as macOS `._` resource files) are skipped, and so are symbolic links to
/// folders, which could form cycles; links to files are followed.
///
/// If `root/labels.csv` exists, it must have a header row with the columns `image` (the
/// file name, matched against each sample's file name) and `patient_id`, in any order and
/// among any others. Listed images get their patient id; images missing from the file, or
/// with an empty id, keep `None`; rows for files that do not exist are ignored.
///
/// Nothing is decoded here; [`Loader::preload`] does that.
///
/// # Errors
/// A missing root or class folder, an empty class, an unreadable folder, or a malformed
/// `labels.csv` (missing columns, one image listed with two patient ids, or an image name
/// that matches several files so its patient would be ambiguous).
pub fn scan_dataset(root: &Path) -> Result<Dataset, DataError> {
    if !root.is_dir() {
        return Err(DataError::NotADirectory(root.to_path_buf()));
    }
    let mut samples = Vec::new();
    for effusion in [true, false] {
        let class = class_dir(effusion);
        let dir = root.join(class);
        if !dir.is_dir() {
            return Err(DataError::MissingClassDir { path: dir });
        }
        let mut files = Vec::new();
        collect_images(&dir, &mut files)?;
        if files.is_empty() {
            return Err(DataError::EmptyClass { class, path: dir });
        }
        samples.extend(files.into_iter().map(|path| Sample {
            path,
            effusion,
            patient: None,
        }));
    }
    samples.sort_by(|a, b| a.path.cmp(&b.path));

    let labels = root.join(LABELS_FILE);
    if labels.is_file() {
        let patients = read_patient_ids(&labels)?;
        attach_patients(&labels, &patients, &mut samples)?;
    }
    let with_patient = samples.iter().filter(|s| s.patient.is_some()).count();
    tracing::info!(
        root = %root.display(),
        images = samples.len(),
        effusion = samples.iter().filter(|s| s.effusion).count(),
        with_patient,
        "scanned dataset"
    );
    Ok(Dataset {
        root: root.to_path_buf(),
        samples,
    })
}

fn is_hidden(name: &std::ffi::OsStr) -> bool {
    name.to_str().is_some_and(|n| n.starts_with('.'))
}

fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)))
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    let io_err = |error| DataError::Io {
        path: dir.to_path_buf(),
        error,
    };
    for entry in fs::read_dir(dir).map_err(io_err)? {
        let entry = entry.map_err(io_err)?;
        if is_hidden(&entry.file_name()) {
            continue;
        }
        let path = entry.path();
        let file_type = entry.file_type().map_err(|error| DataError::Io {
            path: path.clone(),
            error,
        })?;
        if file_type.is_dir() {
            collect_images(&path, out)?;
        } else if (file_type.is_file() || (file_type.is_symlink() && path.is_file()))
            && has_image_extension(&path)
        {
            out.push(path);
        }
    }
    Ok(())
}

/// Splits one CSV line into fields: commas separate, double quotes protect commas and
/// `""` is a literal quote (RFC 4180 without multi-line fields, which `labels.csv` never
/// needs). Fields are trimmed.
fn parse_csv_line(line: &str) -> Vec<String> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '"' if quoted && chars.peek() == Some(&'"') => {
                field.push('"');
                chars.next();
            }
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut field).trim().to_owned()),
            c => field.push(c),
        }
    }
    fields.push(field.trim().to_owned());
    fields
}

/// Reads `image -> patient_id` from a labels file; see [`scan_dataset`] for the format.
fn read_patient_ids(path: &Path) -> Result<HashMap<String, String>, DataError> {
    let labels_err = |message: String| DataError::Labels {
        path: path.to_path_buf(),
        message,
    };
    let text = fs::read_to_string(path).map_err(|error| DataError::Io {
        path: path.to_path_buf(),
        error,
    })?;
    let mut lines = text
        .lines()
        .enumerate()
        .map(|(i, l)| (i + 1, l))
        .filter(|(_, l)| !l.trim().is_empty());
    let (_, header) = lines
        .next()
        .ok_or_else(|| labels_err("empty file: expected a header row".into()))?;
    // A UTF-8 byte order mark (spreadsheet exports) would otherwise hide the first name.
    let header = parse_csv_line(header.trim_start_matches('\u{feff}'));
    let column = |name: &str| {
        header
            .iter()
            .position(|h| h.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                labels_err(format!(
                    "header has no `{name}` column (found: {})",
                    header.join(", ")
                ))
            })
    };
    let (image_col, patient_col) = (column("image")?, column("patient_id")?);

    let mut patients: HashMap<String, String> = HashMap::new();
    for (line_no, line) in lines {
        let fields = parse_csv_line(line);
        let (Some(image), Some(patient)) = (fields.get(image_col), fields.get(patient_col)) else {
            return Err(labels_err(format!(
                "line {line_no}: {} fields, the header needs at least {}",
                fields.len(),
                image_col.max(patient_col) + 1
            )));
        };
        if image.is_empty() || patient.is_empty() {
            continue;
        }
        if let Some(previous) = patients.insert(image.clone(), patient.clone()) {
            if previous != *patient {
                return Err(labels_err(format!(
                    "line {line_no}: image {image} is listed with two different patient ids"
                )));
            }
        }
    }
    Ok(patients)
}

fn attach_patients(
    labels: &Path,
    patients: &HashMap<String, String>,
    samples: &mut [Sample],
) -> Result<(), DataError> {
    let name_of = |s: &Sample| {
        s.path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
    };
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for s in samples.iter() {
        if let Some(name) = name_of(s) {
            *by_name.entry(name).or_default() += 1;
        }
    }
    for s in samples.iter_mut() {
        let Some(name) = name_of(&*s) else { continue };
        let Some(patient) = patients.get(&name) else {
            continue;
        };
        if by_name.get(&name).copied().unwrap_or(0) > 1 {
            return Err(DataError::Labels {
                path: labels.to_path_buf(),
                message: format!(
                    "image name {name} matches more than one file under the class folders, \
                     so its patient id is ambiguous; rename the files"
                ),
            });
        }
        s.patient = Some(patient.clone());
    }
    Ok(())
}

/// What a split produced, for logs and the training report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SplitSummary {
    /// Whether whole patients were assigned (every image had a patient id).
    pub by_patient: bool,
    /// Training images.
    pub train: usize,
    /// Validation images.
    pub val: usize,
    /// Effusion images in training.
    pub train_effusion: usize,
    /// Effusion images in validation.
    pub val_effusion: usize,
    /// Distinct patients in training, for a patient split.
    pub patients_train: Option<usize>,
    /// Distinct patients in validation, for a patient split.
    pub patients_val: Option<usize>,
}

/// A training/validation split; both lists are in dataset (path) order.
#[derive(Debug, Clone)]
pub struct Split {
    /// Training images.
    pub train: Vec<Sample>,
    /// Validation images.
    pub val: Vec<Sample>,
    /// Counts, for the report.
    pub summary: SplitSummary,
}

/// Splits a dataset into training and validation, deterministically for a seed.
///
/// If every image has a patient id, whole patients are assigned: patients are shuffled
/// with the seed, split into those with any effusion image and those without, and each
/// group fills validation up to about `val_fraction` of its images, so no patient is on
/// both sides and the effusion share is about the same on both. Otherwise each class is
/// split on its own (stratified) with the seed.
///
/// When `0 < val_fraction < 1`, both sides get at least one image of each class whenever
/// the data allows it (for instance two images per class, from two different patients in
/// a patient split), even if that moves the validation share away from `val_fraction`.
/// `val_fraction` is clamped to `[0, 1]` (NaN counts as 0); 0 puts everything in training.
pub fn split(ds: &Dataset, val_fraction: f64, seed: u64) -> Split {
    let fraction = if val_fraction.is_nan() {
        0.0
    } else {
        val_fraction.clamp(0.0, 1.0)
    };
    let by_patient = ds.has_patient_ids();
    // Groups of sample indices that must stay together: patients, or single images.
    let groups: Vec<Vec<usize>> = if by_patient {
        let mut map: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, s) in ds.samples.iter().enumerate() {
            map.entry(s.patient.as_deref().unwrap_or_default())
                .or_default()
                .push(i);
        }
        map.into_values().collect()
    } else {
        (0..ds.samples.len()).map(|i| vec![i]).collect()
    };
    let in_val = assign_groups(&ds.samples, groups, fraction, seed);

    let (mut train, mut val) = (Vec::new(), Vec::new());
    for (s, &v) in ds.samples.iter().zip(&in_val) {
        if v {
            val.push(s.clone());
        } else {
            train.push(s.clone());
        }
    }
    let count_patients = |set: &[Sample]| {
        by_patient.then(|| {
            set.iter()
                .filter_map(|s| s.patient.as_deref())
                .collect::<std::collections::HashSet<_>>()
                .len()
        })
    };
    let summary = SplitSummary {
        by_patient,
        train: train.len(),
        val: val.len(),
        train_effusion: train.iter().filter(|s| s.effusion).count(),
        val_effusion: val.iter().filter(|s| s.effusion).count(),
        patients_train: count_patients(&train),
        patients_val: count_patients(&val),
    };
    tracing::info!(?summary, val_fraction = fraction, seed, "split dataset");
    Split {
        train,
        val,
        summary,
    }
}

/// Decides, per group, whether it goes to validation; returns a flag per sample.
fn assign_groups(
    samples: &[Sample],
    mut groups: Vec<Vec<usize>>,
    fraction: f64,
    seed: u64,
) -> Vec<bool> {
    let mut rng = seeded(seed, STREAM_SPLIT);
    shuffle(&mut groups, &mut rng);
    let has_effusion: Vec<bool> = groups
        .iter()
        .map(|g| g.iter().any(|&i| samples[i].effusion))
        .collect();
    let mut group_in_val = vec![false; groups.len()];

    // Fill each stratum separately, taking a group whenever it brings the stratum's
    // validation count closer to its target; skipping (rather than stopping at) a group
    // that overshoots lets a smaller one later in the order fit instead.
    for stratum in [true, false] {
        let members: Vec<usize> = (0..groups.len())
            .filter(|&g| has_effusion[g] == stratum)
            .collect();
        let total: usize = members.iter().map(|&g| groups[g].len()).sum();
        let target = fraction * total as f64;
        let mut count = 0usize;
        for g in members {
            let with = (count + groups[g].len()) as f64;
            if (with - target).abs() < (count as f64 - target).abs() {
                group_in_val[g] = true;
                count += groups[g].len();
            }
        }
    }
    if fraction > 0.0 && fraction < 1.0 {
        ensure_both_classes_both_sides(samples, &groups, &mut group_in_val);
    }

    let mut in_val = vec![false; samples.len()];
    for (g, members) in groups.iter().enumerate() {
        for &i in members {
            in_val[i] = group_in_val[g];
        }
    }
    in_val
}

/// Moves groups between the sides until each side has both classes, where possible.
///
/// A group is only moved if the side it leaves keeps every class the group has, so fixing
/// one gap never opens another; groups are tried smallest first (ties in shuffled order)
/// to disturb the requested fraction as little as possible.
fn ensure_both_classes_both_sides(
    samples: &[Sample],
    groups: &[Vec<usize>],
    group_in_val: &mut [bool],
) {
    // Per group: (effusion images, nofinding images).
    let counts: Vec<[usize; 2]> = groups
        .iter()
        .map(|g| {
            let e = g.iter().filter(|&&i| samples[i].effusion).count();
            [e, g.len() - e]
        })
        .collect();
    // Each fix fills a (side, class) gap permanently, so four rounds suffice.
    for _ in 0..4 {
        // totals[side][class], side 1 = validation, class 0 = effusion.
        let mut totals = [[0usize; 2]; 2];
        for (g, c) in counts.iter().enumerate() {
            let side = usize::from(group_in_val[g]);
            totals[side][0] += c[0];
            totals[side][1] += c[1];
        }
        let gap = (0..2)
            .flat_map(|side| (0..2).map(move |class| (side, class)))
            .find(|&(side, class)| totals[side][class] == 0);
        let Some((side, class)) = gap else { return };
        let from = 1 - side;
        let candidate = (0..groups.len())
            .filter(|&g| usize::from(group_in_val[g]) == from && counts[g][class] > 0)
            .filter(|&g| (0..2).all(|k| counts[g][k] == 0 || totals[from][k] > counts[g][k]))
            .min_by_key(|&g| groups[g].len());
        match candidate {
            Some(g) => group_in_val[g] = side == 1,
            None => return,
        }
    }
}

/// A stratified random subset of `n` images (all of them if `n >= ds.len()`).
///
/// Classes keep their share of `ds` (rounded), with at least one image of each class when
/// `n >= 2` and both exist, so a small ablation run still sees positives. Images are picked
/// individually, so a patient may keep only some of its images; [`split`] afterwards still
/// keeps each patient on one side. Deterministic for a seed; the result is in path order.
pub fn subsample(ds: &Dataset, n: usize, seed: u64) -> Dataset {
    if n >= ds.len() {
        return ds.clone();
    }
    let (effusion, nofinding) = class_indices(ds);
    let share = effusion.len() as f64 / ds.len() as f64;
    let mut n_effusion = (n as f64 * share).round() as usize;
    if n >= 2 && !effusion.is_empty() && !nofinding.is_empty() {
        n_effusion = n_effusion.clamp(1, n - 1);
    }
    n_effusion = n_effusion.min(effusion.len());
    let n_nofinding = (n - n_effusion).min(nofinding.len());
    // If no-finding images ran short, make up the count with effusions.
    let n_effusion = (n - n_nofinding).min(effusion.len());
    pick(ds, effusion, n_effusion, nofinding, n_nofinding, seed)
}

/// The largest random subset of `ds` whose effusion share is `prevalence` (e.g. 0.1 to
/// mimic production's 1 in 10), dropping images of the over-represented class only.
///
/// Keeps at least one image of each class when `0 < prevalence < 1` and both exist.
/// Deterministic for a seed; the result is in path order.
pub fn subsample_prevalence(ds: &Dataset, prevalence: f64, seed: u64) -> Dataset {
    let p = if prevalence.is_nan() {
        0.0
    } else {
        prevalence.clamp(0.0, 1.0)
    };
    let (effusion, nofinding) = class_indices(ds);
    let (e, f) = (effusion.len() as f64, nofinding.len() as f64);
    let (mut n_effusion, mut n_nofinding) = if p <= 0.0 {
        (0, nofinding.len())
    } else if p >= 1.0 {
        (effusion.len(), 0)
    } else if e / (e + f) > p {
        // Too many effusions: keep every no-finding image.
        (((p * f) / (1.0 - p)).round() as usize, nofinding.len())
    } else {
        (effusion.len(), ((e * (1.0 - p)) / p).round() as usize)
    };
    if p > 0.0 && p < 1.0 {
        n_effusion = n_effusion.max(usize::from(!effusion.is_empty()));
        n_nofinding = n_nofinding.max(usize::from(!nofinding.is_empty()));
    }
    let n_effusion = n_effusion.min(effusion.len());
    let n_nofinding = n_nofinding.min(nofinding.len());
    pick(ds, effusion, n_effusion, nofinding, n_nofinding, seed)
}

fn class_indices(ds: &Dataset) -> (Vec<usize>, Vec<usize>) {
    (0..ds.len()).partition(|&i| ds.samples[i].effusion)
}

/// Takes a seeded random `n_e` of `effusion` and `n_f` of `nofinding` (index lists).
fn pick(
    ds: &Dataset,
    mut effusion: Vec<usize>,
    n_e: usize,
    mut nofinding: Vec<usize>,
    n_f: usize,
    seed: u64,
) -> Dataset {
    shuffle(&mut effusion, &mut seeded(seed, STREAM_SUBSAMPLE_EFFUSION));
    shuffle(
        &mut nofinding,
        &mut seeded(seed, STREAM_SUBSAMPLE_NOFINDING),
    );
    let mut chosen: Vec<usize> = effusion[..n_e]
        .iter()
        .chain(&nofinding[..n_f])
        .copied()
        .collect();
    // Indices into a path-sorted list: sorting them restores path order.
    chosen.sort_unstable();
    Dataset {
        root: ds.root.clone(),
        samples: chosen.into_iter().map(|i| ds.samples[i].clone()).collect(),
    }
}

fn seeded(seed: u64, stream: u64) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    rng
}

/// Fisher–Yates, written out so the order depends only on the ChaCha stream.
fn shuffle<T>(items: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
}

// ---------------------------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------------------------

/// Decoded, preprocessed images by sample index, filled lazily and kept for later epochs.
///
/// Holds the output of `load_scan` (`size`×`size` `f32`, before augmentation), so each file
/// is decoded once per training run rather than once per epoch: at 256² that is 256 KiB an
/// image, about 250 MiB per thousand images. Slots are write-once; shared between the loader
/// and its worker threads through an `Arc`.
pub struct ImageCache {
    slots: Vec<OnceLock<Arc<[f32]>>>,
    decodes: AtomicUsize,
}

impl ImageCache {
    fn new(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| OnceLock::new()).collect(),
            decodes: AtomicUsize::new(0),
        }
    }

    /// Number of slots, one per sample.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether there are no slots (a loader without samples).
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The cached image of sample `index`, if it has been decoded.
    pub fn get(&self, index: usize) -> Option<Arc<[f32]>> {
        self.slots.get(index)?.get().cloned()
    }

    /// How many samples are cached.
    pub fn cached(&self) -> usize {
        self.slots.iter().filter(|s| s.get().is_some()).count()
    }

    /// How many decodes have run in total. Equal to [`ImageCache::cached`] unless two
    /// threads raced on one image; a later epoch that adds nothing here was served
    /// entirely from the cache.
    pub fn decoded_count(&self) -> usize {
        self.decodes.load(Ordering::Relaxed)
    }

    /// Memory held by cached pixels, in bytes.
    pub fn bytes(&self) -> usize {
        self.slots
            .iter()
            .filter_map(|s| s.get())
            .map(|img| std::mem::size_of_val(&**img))
            .sum()
    }
}

impl std::fmt::Debug for ImageCache {
    // Summarised: the derived form would print every cached pixel.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageCache")
            .field("slots", &self.len())
            .field("cached", &self.cached())
            .field("decoded", &self.decoded_count())
            .finish()
    }
}

/// One batch of model input.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// `B * size * size` values, row-major, one channel per image, image after image.
    pub images: Vec<f32>,
    /// Class per image ([`Sample::class`]).
    pub labels: Vec<i64>,
    /// Index of each image in the loader's sample list.
    pub indices: Vec<usize>,
}

impl Batch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the batch holds no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
}

/// What the loader and its workers share.
#[derive(Debug)]
struct Shared {
    samples: Vec<Sample>,
    size: u32,
    limits: Limits,
    cache: ImageCache,
}

impl Shared {
    /// The preprocessed image of sample `index`, from the cache or decoded now.
    fn image(&self, index: usize) -> Result<Arc<[f32]>, DataError> {
        let slot = &self.cache.slots[index];
        if let Some(img) = slot.get() {
            return Ok(img.clone());
        }
        let path = &self.samples[index].path;
        let bytes = fs::read(path).map_err(|error| DataError::Io {
            path: path.clone(),
            error,
        })?;
        let img: Arc<[f32]> = load_scan(&bytes, &self.limits, self.size)
            .map_err(|error| DataError::Decode {
                path: path.clone(),
                code: error.code(),
                error,
            })?
            .into();
        self.cache.decodes.fetch_add(1, Ordering::Relaxed);
        // If another thread won a race to fill the slot, its copy is identical; keep one.
        Ok(slot.get_or_init(|| img).clone())
    }

    /// The image as it goes into a batch: cached, then augmented if asked.
    fn batch_image(
        &self,
        index: usize,
        augment: Option<&(AugmentConfig, u64)>,
    ) -> Result<Pixels, DataError> {
        let img = self.image(index)?;
        Ok(match augment {
            None => Pixels::Shared(img),
            Some((cfg, seed)) => {
                let mut rng = augment::image_rng(*seed, index);
                Pixels::Owned(augment::augment(&img, self.size as usize, cfg, &mut rng))
            }
        })
    }
}

/// An image on its way into a batch; un-augmented images are not copied until assembly.
enum Pixels {
    Shared(Arc<[f32]>),
    Owned(Vec<f32>),
}

impl Pixels {
    fn as_slice(&self) -> &[f32] {
        match self {
            Pixels::Shared(a) => a,
            Pixels::Owned(v) => v,
        }
    }
}

/// Loads samples into batches on background threads, with a decoded-image cache.
///
/// Cheap to keep for a whole run: threads exist only while an [`Epoch`] (or
/// [`Loader::preload`]) runs, and the cache persists across epochs.
#[derive(Debug)]
pub struct Loader {
    shared: Arc<Shared>,
    threads: usize,
    prefetch_batches: usize,
}

impl Loader {
    /// A loader for `samples`, producing `size`×`size` images via `load_scan` with
    /// `limits`, decoding on `threads` background threads (at least 1) and keeping up to
    /// `prefetch_batches` batches (at least 1) in flight ahead of the consumer.
    pub fn new(
        samples: Vec<Sample>,
        size: u32,
        limits: Limits,
        threads: usize,
        prefetch_batches: usize,
    ) -> Loader {
        let cache = ImageCache::new(samples.len());
        Loader {
            shared: Arc::new(Shared {
                samples,
                size,
                limits,
                cache,
            }),
            threads: threads.max(1),
            prefetch_batches: prefetch_batches.max(1),
        }
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.shared.samples.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.shared.samples.is_empty()
    }

    /// The samples, in the order that [`Batch::indices`] refers to.
    pub fn samples(&self) -> &[Sample] {
        &self.shared.samples
    }

    /// Side length of the produced images.
    pub fn size(&self) -> u32 {
        self.shared.size
    }

    /// Number of batches an epoch yields for `batch_size` (the last one may be short).
    pub fn num_batches(&self, batch_size: usize) -> usize {
        self.len().div_ceil(batch_size.max(1))
    }

    /// The decoded-image cache.
    pub fn cache(&self) -> &ImageCache {
        &self.shared.cache
    }

    /// Total decodes so far (see [`ImageCache::decoded_count`]).
    pub fn decoded_count(&self) -> usize {
        self.shared.cache.decoded_count()
    }

    /// Iterates over one epoch of batches of `batch_size` (the last may be smaller; every
    /// sample appears exactly once).
    ///
    /// The order is a shuffle seeded by `shuffle_seed` (training) or the sample order when
    /// `None` (validation). With `augment` set, each image is augmented with a generator
    /// seeded from the given seed and its sample index (`augment::image_rng`). Background
    /// threads decode (or take from the cache) and augment; batches are reassembled in
    /// order, so the batches are the same for a seed whatever the thread timing.
    ///
    /// Bounded prefetch: work is handed to the threads one batch at a time, and at most
    /// `prefetch_batches` batches are queued, in progress or finished ahead of the one the
    /// caller holds, which bounds memory however slow the consumer is.
    ///
    /// The first failure (an undecodable file, in batch order) is yielded as an error and
    /// ends the epoch. Dropping the iterator stops and joins its threads.
    pub fn epoch(
        &self,
        batch_size: usize,
        shuffle_seed: Option<u64>,
        augment: Option<(AugmentConfig, u64)>,
    ) -> Epoch {
        let mut order: Vec<usize> = (0..self.len()).collect();
        if let Some(seed) = shuffle_seed {
            shuffle(&mut order, &mut seeded(seed, STREAM_EPOCH_ORDER));
        }
        let invalid = if batch_size == 0 {
            Some(DataError::InvalidArgument(
                "batch size must be at least 1".into(),
            ))
        } else if let Some(Err(e)) = augment.as_ref().map(|(cfg, _)| cfg.validate()) {
            Some(DataError::InvalidArgument(e.to_string()))
        } else {
            None
        };
        Epoch::start(self, order, batch_size.max(1), augment, invalid)
    }

    /// Decodes every sample not yet cached, on the loader's threads.
    ///
    /// Use it to fail fast on a bad file before training starts, and to take decoding out
    /// of the first epoch's timing.
    ///
    /// # Errors
    /// The first failure by sample index among those found; decoding stops soon after the
    /// first failure.
    pub fn preload(&self) -> Result<(), DataError> {
        let n = self.len();
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let errors: Mutex<Vec<(usize, DataError)>> = Mutex::new(Vec::new());
        let started = std::time::Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..self.threads.min(n) {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || failed.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(e) = self.shared.image(i) {
                        failed.store(true, Ordering::Relaxed);
                        errors
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .push((i, e));
                        break;
                    }
                });
            }
        });
        let errors = errors.into_inner().unwrap_or_else(|p| p.into_inner());
        if let Some((_, e)) = errors.into_iter().min_by_key(|(i, _)| *i) {
            return Err(e);
        }
        tracing::info!(
            images = n,
            cached_mib = self.cache().bytes() / (1024 * 1024),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "preloaded images"
        );
        Ok(())
    }
}

/// One unit of work: the image at `position` of batch `batch`, which is sample `index`.
struct Job {
    batch: usize,
    position: usize,
    index: usize,
}

struct JobResult {
    batch: usize,
    position: usize,
    result: Result<Pixels, DataError>,
}

/// A batch being assembled from out-of-order results.
struct Pending {
    slots: Vec<Option<Result<Pixels, DataError>>>,
    filled: usize,
}

/// The iterator returned by [`Loader::epoch`]; owns the epoch's worker threads.
pub struct Epoch {
    shared: Arc<Shared>,
    order: Vec<usize>,
    batch_size: usize,
    n_batches: usize,
    /// Next batch to yield.
    next_batch: usize,
    /// Next batch to hand to the workers.
    next_enqueue: usize,
    prefetch_batches: usize,
    jobs: Option<Sender<Job>>,
    results: Receiver<JobResult>,
    pending: HashMap<usize, Pending>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
    /// An argument error to report on the first call.
    invalid: Option<DataError>,
    done: bool,
}

impl Epoch {
    fn start(
        loader: &Loader,
        order: Vec<usize>,
        batch_size: usize,
        augment: Option<(AugmentConfig, u64)>,
        invalid: Option<DataError>,
    ) -> Epoch {
        let n_batches = if invalid.is_some() {
            0
        } else {
            order.len().div_ceil(batch_size)
        };
        let (job_tx, job_rx) = crossbeam_channel::unbounded::<Job>();
        // Never blocks in practice: outstanding jobs are bounded by the prefetch window.
        let (result_tx, result_rx) = crossbeam_channel::unbounded::<JobResult>();
        let stop = Arc::new(AtomicBool::new(false));
        let n_threads = if n_batches == 0 {
            0
        } else {
            loader.threads.min(order.len())
        };
        let mut workers = Vec::with_capacity(n_threads);
        for t in 0..n_threads {
            let (shared, jobs, results, stop) = (
                loader.shared.clone(),
                job_rx.clone(),
                result_tx.clone(),
                stop.clone(),
            );
            let spawned = std::thread::Builder::new()
                .name(format!("pleura-loader-{t}"))
                .spawn(move || worker(&shared, &jobs, &results, &stop, augment.as_ref()));
            match spawned {
                Ok(handle) => workers.push(handle),
                // Fewer threads only slow the epoch down; none at all is reported below.
                Err(e) => tracing::warn!(error = %e, "could not start a loader thread"),
            }
        }
        let invalid = match invalid {
            None if n_batches > 0 && workers.is_empty() => Some(DataError::Worker(
                "could not start any loader thread".into(),
            )),
            other => other,
        };
        let mut epoch = Epoch {
            shared: loader.shared.clone(),
            order,
            batch_size,
            n_batches,
            next_batch: 0,
            next_enqueue: 0,
            prefetch_batches: loader.prefetch_batches,
            jobs: Some(job_tx),
            results: result_rx,
            pending: HashMap::new(),
            stop,
            workers,
            invalid,
            done: false,
        };
        while epoch.next_enqueue < epoch.n_batches.min(epoch.prefetch_batches) {
            epoch.enqueue_next();
        }
        epoch
    }

    /// Number of batches this epoch yields when nothing fails.
    pub fn num_batches(&self) -> usize {
        self.n_batches
    }

    fn batch_range(&self, batch: usize) -> std::ops::Range<usize> {
        let start = batch * self.batch_size;
        start..(start + self.batch_size).min(self.order.len())
    }

    /// Hands the next batch's images to the workers.
    fn enqueue_next(&mut self) {
        let batch = self.next_enqueue;
        if batch >= self.n_batches {
            return;
        }
        self.next_enqueue += 1;
        let range = self.batch_range(batch);
        self.pending.insert(
            batch,
            Pending {
                slots: (0..range.len()).map(|_| None).collect(),
                filled: 0,
            },
        );
        if let Some(jobs) = &self.jobs {
            for (position, &index) in self.order[range].iter().enumerate() {
                // Cannot fail: this side holds a receiver clone via the workers until
                // `finish`, and if they all died `next` reports it.
                let _ = jobs.send(Job {
                    batch,
                    position,
                    index,
                });
            }
        }
    }

    /// Stops the workers and waits for them; idempotent.
    fn finish(&mut self) {
        self.done = true;
        self.stop.store(true, Ordering::Relaxed);
        // Closing the job channel wakes idle workers; busy ones see `stop` after their
        // current image.
        self.jobs = None;
        for handle in self.workers.drain(..) {
            // A worker that panicked outside its guarded section has nothing left to say.
            let _ = handle.join();
        }
        self.pending.clear();
    }

    fn assemble(&self, batch: usize, pending: Pending) -> Result<Batch, DataError> {
        let indices: Vec<usize> = self.order[self.batch_range(batch)].to_vec();
        let pixels = (self.shared.size as usize).pow(2);
        let mut images = Vec::with_capacity(indices.len() * pixels);
        for slot in pending.slots {
            // All slots are filled when this is called.
            let px = slot.ok_or_else(|| DataError::Worker("batch assembled early".into()))??;
            images.extend_from_slice(px.as_slice());
        }
        let labels = indices
            .iter()
            .map(|&i| self.shared.samples[i].class())
            .collect();
        Ok(Batch {
            images,
            labels,
            indices,
        })
    }
}

impl Iterator for Epoch {
    type Item = Result<Batch, DataError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        if let Some(e) = self.invalid.take() {
            self.finish();
            return Some(Err(e));
        }
        if self.next_batch >= self.n_batches {
            self.finish();
            return None;
        }
        loop {
            let complete = self
                .pending
                .get(&self.next_batch)
                .is_some_and(|p| p.filled == p.slots.len());
            if complete {
                let batch = self.next_batch;
                let pending = self.pending.remove(&batch)?;
                self.next_batch += 1;
                let result = self.assemble(batch, pending);
                if result.is_err() {
                    self.finish();
                } else {
                    // The caller now holds `batch`; keep the window full behind it.
                    self.enqueue_next();
                }
                return Some(result);
            }
            match self.results.recv() {
                Ok(r) => {
                    if let Some(p) = self.pending.get_mut(&r.batch) {
                        if p.slots[r.position].replace(r.result).is_none() {
                            p.filled += 1;
                        }
                    }
                }
                Err(_) => {
                    self.finish();
                    return Some(Err(DataError::Worker(
                        "loader threads stopped before the epoch was complete".into(),
                    )));
                }
            }
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        if self.done {
            (0, Some(0))
        } else {
            let left = self.n_batches - self.next_batch + usize::from(self.invalid.is_some());
            (0, Some(left))
        }
    }
}

impl Drop for Epoch {
    fn drop(&mut self) {
        self.finish();
    }
}

impl std::fmt::Debug for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Epoch")
            .field("batch_size", &self.batch_size)
            .field("n_batches", &self.n_batches)
            .field("next_batch", &self.next_batch)
            .field("threads", &self.workers.len())
            .finish_non_exhaustive()
    }
}

fn worker(
    shared: &Shared,
    jobs: &Receiver<Job>,
    results: &Sender<JobResult>,
    stop: &AtomicBool,
    augment: Option<&(AugmentConfig, u64)>,
) {
    while let Ok(job) = jobs.recv() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // A panic (a bug in augmentation, say) becomes this image's error instead of a
        // batch that never completes.
        let result = catch_unwind(AssertUnwindSafe(|| shared.batch_image(job.index, augment)))
            .unwrap_or_else(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".into());
                Err(DataError::Worker(format!(
                    "panic while loading {}: {what}",
                    shared.samples[job.index].path.display()
                )))
            });
        let sent = results.send(JobResult {
            batch: job.batch,
            position: job.position,
            result,
        });
        if sent.is_err() {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pleura::phantom::write_dataset;
    use std::collections::HashSet;

    /// A phantom dataset of `n` 64² images with 30% effusions (one patient per image).
    fn phantom_dataset(n: usize) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        write_dataset(dir.path(), n, 0.3, 64, 11).unwrap();
        dir
    }

    /// A dataset of placeholder files (never decoded) with the given (name, effusion) list.
    fn fake_dataset(files: &[(&str, bool)], labels: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for class in ["effusion", "nofinding"] {
            fs::create_dir_all(dir.path().join(class)).unwrap();
        }
        for (name, effusion) in files {
            fs::write(dir.path().join(class_dir(*effusion)).join(name), b"x").unwrap();
        }
        if let Some(csv) = labels {
            fs::write(dir.path().join(LABELS_FILE), csv).unwrap();
        }
        dir
    }

    fn names(samples: &[Sample]) -> Vec<String> {
        samples
            .iter()
            .map(|s| s.path.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    fn patients(samples: &[Sample]) -> HashSet<String> {
        samples.iter().filter_map(|s| s.patient.clone()).collect()
    }

    fn has_both_classes(samples: &[Sample]) -> bool {
        samples.iter().any(|s| s.effusion) && samples.iter().any(|s| !s.effusion)
    }

    // --- scan_dataset ------------------------------------------------------------------

    #[test]
    fn scans_a_phantom_dataset() {
        let dir = phantom_dataset(20);
        let ds = scan_dataset(dir.path()).unwrap();
        assert_eq!(ds.len(), 20);
        assert_eq!(ds.n_effusion(), 6);
        assert!(ds.has_patient_ids());
        assert_eq!(patients(&ds.samples).len(), 20);
        let mut sorted = ds.samples.clone();
        sorted.sort_by(|a, b| a.path.cmp(&b.path));
        assert_eq!(sorted, ds.samples);
        for s in &ds.samples {
            let folder = s.path.parent().unwrap().file_name().unwrap();
            assert_eq!(folder == "effusion", s.effusion);
            assert_eq!(s.class(), if s.effusion { 0 } else { 1 });
        }
        // The label of phantom_00000 in labels.csv gives its patient id, P00000.
        let first = ds
            .samples
            .iter()
            .find(|s| s.path.ends_with("phantom_00000.png"))
            .unwrap();
        assert_eq!(first.patient.as_deref(), Some("P00000"));
    }

    #[test]
    fn scan_is_recursive_and_filters_extensions() {
        let dir = fake_dataset(&[("a.png", true), ("b.txt", true), ("c.JPG", false)], None);
        let nested = dir.path().join("nofinding/site2/2024");
        fs::create_dir_all(&nested).unwrap();
        fs::write(nested.join("d.dcm"), b"x").unwrap();
        fs::write(nested.join("e.jpeg"), b"x").unwrap();
        fs::write(dir.path().join("effusion/._a.png"), b"x").unwrap();
        fs::write(dir.path().join("effusion/notes"), b"x").unwrap();
        let ds = scan_dataset(dir.path()).unwrap();
        assert_eq!(names(&ds.samples), ["a.png", "c.JPG", "d.dcm", "e.jpeg"]);
        assert_eq!(ds.n_effusion(), 1);
        assert!(ds.samples.iter().all(|s| s.patient.is_none()));
        assert!(!ds.has_patient_ids());
    }

    #[test]
    fn scan_errors_are_typed_and_clear() {
        let missing = tempfile::tempdir().unwrap();
        let err = scan_dataset(&missing.path().join("nope")).unwrap_err();
        assert!(matches!(err, DataError::NotADirectory(_)), "{err}");

        fs::create_dir(missing.path().join("effusion")).unwrap();
        fs::write(missing.path().join("effusion/a.png"), b"x").unwrap();
        let err = scan_dataset(missing.path()).unwrap_err();
        assert!(matches!(err, DataError::MissingClassDir { .. }), "{err}");
        assert!(err.to_string().contains("nofinding"), "{err}");

        let empty = fake_dataset(&[("a.png", true), ("readme.txt", false)], None);
        let err = scan_dataset(empty.path()).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::EmptyClass {
                    class: "nofinding",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("no images"), "{err}");
    }

    #[test]
    fn labels_columns_in_any_order() {
        let files = [
            ("a.png", true),
            ("b.png", false),
            ("c.png", false),
            ("d.png", true),
        ];
        // patient_id first, extra columns, a quoted field with a comma, CRLF, a BOM, an
        // empty id, a row for a file that does not exist, and d.png not listed at all.
        let csv = "\u{feff}patient_id,age,image,finding_labels\r\n\
                   17,50,a.png,\"Effusion,Mass\"\r\n\
                   18,61,b.png,No Finding\r\n\
                   ,70,c.png,No Finding\r\n\
                   99,1,ghost.png,x\r\n";
        let dir = fake_dataset(&files, Some(csv));
        let ds = scan_dataset(dir.path()).unwrap();
        let by_name: HashMap<String, Option<String>> = names(&ds.samples)
            .into_iter()
            .zip(ds.samples.iter().map(|s| s.patient.clone()))
            .collect();
        assert_eq!(by_name["a.png"].as_deref(), Some("17"));
        assert_eq!(by_name["b.png"].as_deref(), Some("18"));
        assert_eq!(by_name["c.png"], None);
        assert_eq!(by_name["d.png"], None);
        assert!(!ds.has_patient_ids());

        // The real data's order, with a column after patient_id.
        let csv = "image,label,finding_labels,view_position,patient_id,age,sex\n\
                   a.png,effusion,Effusion,PA,1,60,M\n\
                   b.png,nofinding,No Finding,AP,2,61,F\n\
                   c.png,nofinding,No Finding,PA,2,61,F\n\
                   d.png,effusion,Effusion,PA,3,62,M\n";
        let dir = fake_dataset(&files, Some(csv));
        let ds = scan_dataset(dir.path()).unwrap();
        assert!(ds.has_patient_ids());
        let ids: Vec<_> = ds
            .samples
            .iter()
            .map(|s| s.patient.clone().unwrap())
            .collect();
        // Path order: effusion/a, effusion/d, nofinding/b, nofinding/c.
        assert_eq!(ids, ["1", "3", "2", "2"]);
    }

    #[test]
    fn malformed_labels_are_errors() {
        let files = [("a.png", true), ("b.png", false)];
        for (csv, expect) in [
            ("image,label\na.png,effusion\n", "patient_id"),
            ("patient_id,label\n1,effusion\n", "`image`"),
            (
                "image,patient_id\na.png,1\na.png,2\n",
                "two different patient ids",
            ),
            ("image,x,patient_id\na.png\n", "line 2"),
            ("", "empty"),
        ] {
            let dir = fake_dataset(&files, Some(csv));
            let err = scan_dataset(dir.path()).unwrap_err();
            assert!(matches!(err, DataError::Labels { .. }), "{err}");
            assert!(err.to_string().contains(expect), "{csv:?}: {err}");
        }
        // The same file name in both classes cannot be matched to one patient.
        let dir = fake_dataset(
            &[("a.png", true), ("b.png", false)],
            Some("image,patient_id\na.png,1\n"),
        );
        fs::write(dir.path().join("nofinding/a.png"), b"x").unwrap();
        let err = scan_dataset(dir.path()).unwrap_err();
        assert!(err.to_string().contains("ambiguous"), "{err}");
    }

    // --- split -------------------------------------------------------------------------

    /// 10 effusion and 14 no-finding images, 22 patients: P1 has two images (one of each
    /// class), P2 has two no-finding images.
    fn patient_dataset() -> (tempfile::TempDir, Dataset) {
        let mut files = Vec::new();
        let mut csv = String::from("view_position,image,patient_id\n");
        let mut add = |name: String, effusion: bool, patient: String| {
            csv.push_str(&format!("PA,{name},{patient}\n"));
            files.push((name, effusion));
        };
        add("p1_a.png".into(), true, "P1".into());
        add("p1_b.png".into(), false, "P1".into());
        add("p2_a.png".into(), false, "P2".into());
        add("p2_b.png".into(), false, "P2".into());
        for i in 0..9 {
            add(format!("e{i}.png"), true, format!("E{i}"));
        }
        for i in 0..11 {
            add(format!("n{i}.png"), false, format!("N{i}"));
        }
        let refs: Vec<(&str, bool)> = files.iter().map(|(n, e)| (n.as_str(), *e)).collect();
        let dir = fake_dataset(&refs, Some(csv.as_str()));
        let ds = scan_dataset(dir.path()).unwrap();
        (dir, ds)
    }

    #[test]
    fn patient_split_keeps_patients_whole() {
        let (_dir, ds) = patient_dataset();
        assert_eq!(ds.len(), 24);
        assert!(ds.has_patient_ids());
        let mut p1_in_val = 0;
        for seed in 0..40 {
            let sp = split(&ds, 0.25, seed);
            assert!(sp.summary.by_patient);
            let (train_p, val_p) = (patients(&sp.train), patients(&sp.val));
            assert!(
                train_p.is_disjoint(&val_p),
                "seed {seed}: a patient on both sides"
            );
            assert_eq!(sp.train.len() + sp.val.len(), ds.len());
            for pair in [["p1_a.png", "p1_b.png"], ["p2_a.png", "p2_b.png"]] {
                let val_names = names(&sp.val);
                let sides: Vec<bool> = pair
                    .iter()
                    .map(|n| val_names.iter().any(|v| v == n))
                    .collect();
                assert_eq!(sides[0], sides[1], "seed {seed}: {pair:?} split apart");
            }
            if names(&sp.val).iter().any(|n| n == "p1_a.png") {
                p1_in_val += 1;
            }
            assert!(
                has_both_classes(&sp.train) && has_both_classes(&sp.val),
                "seed {seed}"
            );
            // About a quarter in validation, stratified.
            assert!(
                (4..=8).contains(&sp.val.len()),
                "seed {seed}: {:?}",
                sp.summary
            );
            assert!(
                (2..=4).contains(&sp.summary.val_effusion),
                "seed {seed}: {:?}",
                sp.summary
            );
            assert_eq!(sp.summary.patients_train, Some(train_p.len()));
            assert_eq!(sp.summary.patients_val, Some(val_p.len()));
            assert_eq!(
                sp.summary.patients_train.unwrap() + sp.summary.patients_val.unwrap(),
                22
            );
        }
        // The two-image patient is not parked on one side by construction.
        assert!(
            (1..40).contains(&p1_in_val),
            "P1 in validation {p1_in_val}/40 times"
        );
        // Deterministic under the seed.
        assert_eq!(split(&ds, 0.25, 3).val, split(&ds, 0.25, 3).val);
    }

    #[test]
    fn stratified_split_without_patients() {
        let dir = phantom_dataset(20);
        fs::remove_file(dir.path().join(LABELS_FILE)).unwrap();
        let ds = scan_dataset(dir.path()).unwrap();
        assert!(!ds.has_patient_ids());
        let a = split(&ds, 0.3, 5);
        assert!(!a.summary.by_patient);
        assert_eq!(a.summary.patients_train, None);
        assert!(has_both_classes(&a.train) && has_both_classes(&a.val));
        // 6 effusions and 14 no-finding, 30% of each.
        assert_eq!((a.summary.val, a.summary.val_effusion), (6, 2));
        assert_eq!(a.summary.train, 14);
        let mut all: Vec<Sample> = a.train.iter().chain(&a.val).cloned().collect();
        all.sort_by(|x, y| x.path.cmp(&y.path));
        assert_eq!(all, ds.samples);
        // Deterministic under a seed, and the seed matters.
        let b = split(&ds, 0.3, 5);
        assert_eq!((a.train.clone(), a.val.clone()), (b.train, b.val));
        assert!((6..12).any(|s| split(&ds, 0.3, s).val != a.val));
    }

    #[test]
    fn tiny_splits_keep_both_classes_on_both_sides() {
        let ds = scan_dataset(
            fake_dataset(
                &[
                    ("a.png", true),
                    ("b.png", true),
                    ("c.png", false),
                    ("d.png", false),
                ],
                None,
            )
            .path(),
        )
        .unwrap();
        for (fraction, seed) in [(0.01, 1), (0.99, 2), (0.5, 3)] {
            let sp = split(&ds, fraction, seed);
            assert!(has_both_classes(&sp.train), "{fraction}: {:?}", sp.summary);
            assert!(has_both_classes(&sp.val), "{fraction}: {:?}", sp.summary);
        }
        // Fraction 0 is an explicit "no validation".
        assert!(split(&ds, 0.0, 1).val.is_empty());
        assert!(split(&ds, f64::NAN, 1).val.is_empty());
    }

    // --- subsample ---------------------------------------------------------------------

    #[test]
    fn subsample_is_stratified_and_deterministic() {
        let dir = phantom_dataset(20);
        let ds = scan_dataset(dir.path()).unwrap();
        let sub = subsample(&ds, 10, 1);
        assert_eq!((sub.len(), sub.n_effusion()), (10, 3));
        assert!(sub.samples.iter().all(|s| ds.samples.contains(s)));
        assert!(sub.samples.windows(2).all(|w| w[0].path < w[1].path));
        assert_eq!(sub, subsample(&ds, 10, 1));
        assert!((2..8).any(|s| subsample(&ds, 10, s) != sub));
        // Rounding would give 0 effusions of 2; both classes are kept.
        let two = subsample(&ds, 2, 1);
        assert_eq!((two.len(), two.n_effusion()), (2, 1));
        assert_eq!(subsample(&ds, 100, 1), ds);
        assert!(subsample(&ds, 0, 1).is_empty());
    }

    #[test]
    fn subsample_to_a_prevalence() {
        let dir = phantom_dataset(20); // 6 effusion, 14 no finding
        let ds = scan_dataset(dir.path()).unwrap();
        let p = subsample_prevalence(&ds, 0.125, 4);
        assert_eq!((p.len(), p.n_effusion()), (16, 2));
        let p = subsample_prevalence(&ds, 0.5, 4);
        assert_eq!((p.len(), p.n_effusion()), (12, 6));
        let p = subsample_prevalence(&ds, 0.01, 4);
        assert_eq!(p.n_effusion(), 1, "keeps one positive");
        assert_eq!(
            subsample_prevalence(&ds, 0.125, 4),
            subsample_prevalence(&ds, 0.125, 4)
        );
    }

    // --- Loader ------------------------------------------------------------------------

    const SIZE: u32 = 32;

    fn phantom_loader(n: usize, threads: usize) -> (tempfile::TempDir, Loader) {
        let dir = phantom_dataset(n);
        let ds = scan_dataset(dir.path()).unwrap();
        let loader = Loader::new(ds.samples, SIZE, Limits::default(), threads, 2);
        (dir, loader)
    }

    fn collect(epoch: Epoch) -> Vec<Batch> {
        epoch.map(|b| b.unwrap()).collect()
    }

    #[test]
    fn epoch_yields_every_sample_once_with_right_labels() {
        let (_dir, loader) = phantom_loader(20, 3);
        let batches = collect(loader.epoch(6, Some(1), None));
        assert_eq!(
            batches.iter().map(Batch::len).collect::<Vec<_>>(),
            [6, 6, 6, 2]
        );
        assert_eq!(loader.num_batches(6), 4);
        let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
        assert_ne!(
            seen,
            (0..20).collect::<Vec<_>>(),
            "training order is shuffled"
        );
        seen.sort_unstable();
        assert_eq!(seen, (0..20).collect::<Vec<_>>());
        let pixels = (SIZE * SIZE) as usize;
        for b in &batches {
            assert_eq!(b.images.len(), b.len() * pixels);
            for (k, &i) in b.indices.iter().enumerate() {
                assert_eq!(b.labels[k], loader.samples()[i].class());
                // The loader's pixels are exactly the shared preprocessing of the file.
                let bytes = fs::read(&loader.samples()[i].path).unwrap();
                let expected = load_scan(&bytes, &Limits::default(), SIZE).unwrap();
                assert_eq!(&b.images[k * pixels..(k + 1) * pixels], &expected[..]);
            }
        }
        // Validation order is the sample order.
        let val: Vec<usize> = collect(loader.epoch(7, None, None))
            .iter()
            .flat_map(|b| b.indices.clone())
            .collect();
        assert_eq!(val, (0..20).collect::<Vec<_>>());
    }

    #[test]
    fn batches_are_deterministic_for_a_seed() {
        let (_dir, loader) = phantom_loader(20, 4);
        let aug = Some((AugmentConfig::default(), 99));
        let a = collect(loader.epoch(5, Some(7), aug));
        let b = collect(loader.epoch(5, Some(7), aug));
        assert_eq!(a, b);
        // The same on a single thread, i.e. independent of scheduling.
        let (_dir1, single) = phantom_loader(20, 1);
        assert_eq!(collect(single.epoch(5, Some(7), aug)), a);
        // Another shuffle seed changes the order; another augmentation seed the pixels.
        let other_order = collect(loader.epoch(5, Some(8), aug));
        assert_ne!(other_order[0].indices, a[0].indices);
        let other_aug = collect(loader.epoch(5, Some(7), Some((AugmentConfig::default(), 100))));
        assert_eq!(other_aug[0].indices, a[0].indices);
        assert_ne!(other_aug[0].images, a[0].images);
        // Augmentation changes the images but not the range.
        let plain = collect(loader.epoch(5, Some(7), None));
        assert_ne!(plain[0].images, a[0].images);
        assert!(a
            .iter()
            .flat_map(|b| &b.images)
            .all(|v| (0.0..=1.0).contains(v)));
    }

    #[test]
    fn second_epoch_is_served_from_the_cache() {
        let (_dir, loader) = phantom_loader(12, 2);
        assert_eq!((loader.decoded_count(), loader.cache().cached()), (0, 0));
        let first = collect(loader.epoch(4, Some(1), None));
        assert_eq!(loader.decoded_count(), 12);
        assert_eq!(loader.cache().cached(), 12);
        assert_eq!(loader.cache().bytes(), 12 * (SIZE * SIZE) as usize * 4);
        let second = collect(loader.epoch(4, Some(1), None));
        assert_eq!(loader.decoded_count(), 12, "second epoch decoded again");
        assert_eq!(first, second);

        let (_dir2, fresh) = phantom_loader(12, 3);
        fresh.preload().unwrap();
        assert_eq!(fresh.decoded_count(), 12);
        collect(fresh.epoch(5, None, None));
        assert_eq!(fresh.decoded_count(), 12);
    }

    #[test]
    fn corrupt_image_is_an_error_naming_the_path() {
        let dir = phantom_dataset(10);
        let truncated = dir.path().join("effusion/truncated.png");
        let good = fs::read(
            dir.path()
                .join("nofinding")
                .read_dir()
                .unwrap()
                .next()
                .unwrap()
                .unwrap()
                .path(),
        )
        .unwrap();
        fs::write(&truncated, &good[..good.len() / 3]).unwrap();
        let ds = scan_dataset(dir.path()).unwrap();
        let loader = Loader::new(ds.samples, SIZE, Limits::default(), 2, 2);

        let results: Vec<_> = loader.epoch(4, Some(3), None).collect();
        let err = results
            .iter()
            .find_map(|r| r.as_ref().err())
            .expect("an error");
        assert!(
            matches!(
                err,
                DataError::Decode {
                    code: "corrupt_image",
                    ..
                }
            ),
            "{err}"
        );
        let msg = err.to_string();
        assert!(msg.contains(&truncated.display().to_string()), "{msg}");
        assert!(msg.contains("corrupt_image"), "{msg}");
        // The epoch ends at the error.
        assert!(results.last().unwrap().is_err());

        let err = loader.preload().unwrap_err();
        assert!(err.to_string().contains("truncated.png"), "{err}");

        // Not an image at all.
        let garbage = dir.path().join("nofinding/garbage.jpg");
        fs::write(&garbage, b"not a scan").unwrap();
        let ds = scan_dataset(dir.path()).unwrap();
        let loader = Loader::new(ds.samples, SIZE, Limits::default(), 1, 1);
        let err = loader.preload().unwrap_err();
        let msg = err.to_string();
        // Lowest index first: garbage.jpg (nofinding/) sorts after effusion/truncated.png.
        assert!(
            msg.contains("truncated.png") || msg.contains("garbage.jpg"),
            "{msg}"
        );
        let shared = loader.shared.clone();
        let err = shared.image(
            shared
                .samples
                .iter()
                .position(|s| s.path == garbage)
                .unwrap(),
        );
        let err = err.unwrap_err();
        assert!(
            matches!(
                err,
                DataError::Decode {
                    code: "unsupported_format",
                    ..
                }
            ),
            "{err}"
        );
        assert!(err.to_string().contains("garbage.jpg"), "{err}");
    }

    #[test]
    fn dropping_an_epoch_stops_its_threads() {
        let (_dir, loader) = phantom_loader(20, 3);
        let mut epoch = loader.epoch(2, Some(1), None);
        assert!(epoch.next().unwrap().is_ok());
        // Workers hold clones of the shared state while they run.
        assert!(Arc::strong_count(&loader.shared) > 2);
        drop(epoch);
        assert_eq!(
            Arc::strong_count(&loader.shared),
            1,
            "a worker outlived its epoch"
        );
        // Exhausting an epoch also releases them, before the iterator is dropped.
        let mut epoch = loader.epoch(8, None, None);
        while epoch.next().is_some() {}
        assert_eq!(Arc::strong_count(&loader.shared), 2);
    }

    #[test]
    fn invalid_arguments_and_empty_loaders() {
        let (_dir, loader) = phantom_loader(4, 1);
        let r: Vec<_> = loader.epoch(0, None, None).collect();
        assert_eq!(r.len(), 1);
        assert!(matches!(r[0], Err(DataError::InvalidArgument(_))));
        let bad = AugmentConfig {
            hflip_p: 2.0,
            ..AugmentConfig::default()
        };
        let r: Vec<_> = loader.epoch(2, None, Some((bad, 1))).collect();
        assert!(matches!(r.as_slice(), [Err(DataError::InvalidArgument(_))]));

        let empty = Loader::new(Vec::new(), SIZE, Limits::default(), 2, 2);
        assert!(empty.is_empty());
        assert_eq!(empty.epoch(4, Some(1), None).count(), 0);
        empty.preload().unwrap();
    }

    // --- real data ---------------------------------------------------------------------

    /// The shared real-data folder, or `None` (with a visible message) when it is absent.
    fn real_data(sub: &str) -> Option<PathBuf> {
        let base = std::env::var_os("PLEURA_DATA")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data"))
            });
        let dir = base.join(sub);
        if dir.is_dir() {
            Some(dir)
        } else {
            eprintln!(
                "SKIP real-data test: {} not found (set PLEURA_DATA)",
                dir.display()
            );
            None
        }
    }

    #[test]
    fn real_cxr_scan_and_patient_split() {
        let Some(root) = real_data("cxr") else { return };
        let ds = scan_dataset(&root).unwrap();
        assert_eq!((ds.n_effusion(), ds.len() - ds.n_effusion()), (50, 60));
        assert!(ds.has_patient_ids());
        let sp = split(&ds, 0.2, 42);
        assert!(sp.summary.by_patient);
        assert!(patients(&sp.train).is_disjoint(&patients(&sp.val)));
        assert_eq!((sp.summary.val, sp.summary.val_effusion), (22, 10));
        eprintln!("cxr split: {}", serde_json::to_string(&sp.summary).unwrap());

        // Both RGBA files and a few others go through the shared preprocessing.
        let is_rgba = |s: &Sample| {
            let p = s.path.to_string_lossy();
            p.ends_with("00000100_000.png") || p.ends_with("00004934_000.png")
        };
        let mut few: Vec<Sample> = ds.samples.iter().filter(|s| is_rgba(s)).cloned().collect();
        assert_eq!(few.len(), 2);
        few.extend(
            subsample(&ds, 6, 1)
                .samples
                .into_iter()
                .filter(|s| !is_rgba(s))
                .take(4),
        );
        let n = few.len();
        let loader = Loader::new(few, 64, Limits::default(), 2, 1);
        loader.preload().unwrap();
        let batches = collect(loader.epoch(4, Some(1), Some((AugmentConfig::default(), 1))));
        assert_eq!(batches.iter().map(Batch::len).sum::<usize>(), n);
    }

    #[test]
    fn real_thumbnails_split_by_patient() {
        let Some(root) = real_data("cxr-thumbs-64") else {
            return;
        };
        let ds = scan_dataset(&root).unwrap();
        assert_eq!((ds.n_effusion(), ds.len()), (170, 667));
        assert!(ds.has_patient_ids());
        let unique = patients(&ds.samples).len();
        assert!(unique < ds.len(), "patients repeat in this set");
        for seed in [1, 2, 3] {
            let sp = split(&ds, 0.2, seed);
            assert!(sp.summary.by_patient);
            assert!(
                patients(&sp.train).is_disjoint(&patients(&sp.val)),
                "seed {seed}"
            );
            let share = sp.val.len() as f64 / ds.len() as f64;
            assert!((0.15..0.25).contains(&share), "seed {seed}: {share}");
            let eff_share = sp.summary.val_effusion as f64 / sp.val.len() as f64;
            assert!(
                (0.18..0.34).contains(&eff_share),
                "seed {seed}: {eff_share}"
            );
        }
        // Every thumbnail (RGB, RGBA) decodes.
        let loader = Loader::new(ds.samples, 64, Limits::default(), 2, 2);
        loader.preload().unwrap();
        assert_eq!(loader.cache().cached(), 667);
    }
}
