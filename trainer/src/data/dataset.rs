//! Finding a dataset's images and their patients.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use pleura_phantom::Finding;

use super::error::DataError;

/// Class index of an effusion, the model's output column 0.
pub const CLASS_EFFUSION: i64 = 0;
/// Class index of a scan with no finding, the model's output column 1.
pub const CLASS_NOFINDING: i64 = 1;
/// File extensions (compared case-insensitively) that count as images.
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "dcm"];
/// Name of the optional per-image metadata file in a dataset root.
pub const LABELS_FILE: &str = "labels.csv";

/// Folder name of a class; taken from the phantom generator so both agree by construction.
pub(super) fn class_dir(effusion: bool) -> &'static str {
    if effusion {
        Finding::Effusion.label()
    } else {
        Finding::NoFinding.label()
    }
}

/// One image of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Path of the image file.
    pub path: PathBuf,
    /// Ground truth: `true` for the `effusion/` folder, `false` for `nofinding/`.
    pub effusion: bool,
    /// Patient id from `labels.csv`, if the file lists this image. When several datasets
    /// are combined ([`scan_datasets`]) it is prefixed with the dataset's name
    /// (`cxr:100`), since each dataset numbers its patients on its own.
    pub patient: Option<String>,
    /// Name of the dataset the image came from: its root folder's name (see
    /// [`dataset_name`]). Lets evaluation report each source on its own (full-size
    /// scans apart from thumbnails, say).
    pub dataset: String,
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
    let name = dataset_name(root);
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
            dataset: name.clone(),
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

/// The name a dataset goes by: its root folder's name (after resolving `.`, `..` and
/// links, so `--data .` is named after the folder), or `dataset` for a root without one.
pub fn dataset_name(root: &Path) -> String {
    let named = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
    named(root)
        .or_else(|| fs::canonicalize(root).ok().as_deref().and_then(named))
        .unwrap_or_else(|| "dataset".to_owned())
}

/// Several datasets as one: every image of every root (see [`scan_dataset`]), with patient
/// ids namespaced by dataset name (`cxr:100`, `cxr-thumbs-64:100`) so that patients of
/// different datasets never merge, while one patient's images within a dataset stay
/// together in any split. One root gives exactly [`scan_dataset`]'s result, ids unprefixed.
///
/// Images keep their own sizes: every one is resized by the same `load_scan` when loaded.
/// The combined dataset's `root` is the first root; samples are ordered dataset by
/// dataset, in the order given, each in path order.
///
/// # Errors
/// Whatever [`scan_dataset`] returns for any root, and [`DataError::DuplicateDataset`]
/// when two roots share a name (or are the same folder).
pub fn scan_datasets(roots: &[PathBuf]) -> Result<Dataset, DataError> {
    let Some(first) = roots.first() else {
        return Err(DataError::InvalidArgument("no dataset folder given".into()));
    };
    if roots.len() == 1 {
        return scan_dataset(first);
    }
    let mut seen: HashMap<String, &PathBuf> = HashMap::new();
    let mut samples = Vec::new();
    for root in roots {
        let name = dataset_name(root);
        if let Some(previous) = seen.insert(name.clone(), root) {
            return Err(DataError::DuplicateDataset {
                name,
                first: previous.clone(),
                second: root.clone(),
            });
        }
        let ds = scan_dataset(root)?;
        samples.extend(ds.samples.into_iter().map(|mut s| {
            s.patient = s.patient.map(|p| format!("{name}:{p}"));
            s
        }));
    }
    Ok(Dataset {
        root: first.clone(),
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
