//! `model.json`: the manifest that travels beside every `model.onnx`.
//!
//! A model directory holds exactly two files, [`ONNX_FILE`] and
//! [`MANIFEST_FILE`]. The manifest says what the graph expects (input size,
//! channels, normalisation), what its output columns mean, the decision
//! threshold, and the SHA-256 of the ONNX bytes. Workers load a model only
//! through [`ModelFiles::read_dir`], which refuses a directory whose ONNX does
//! not hash to the manifest's `sha256` ([`ManifestError::HashMismatch`]): a
//! torn copy, a hand-edited file or a reader racing a writer must never turn
//! into silently wrong predictions. Callers branch on that variant (keep the
//! current model, retry later).
//!
//! [`ModelFiles::write_dir`] writes `model.onnx` first and `model.json` last,
//! each through a temp file and a rename, so a reader sees either the old
//! pair, the new pair, or (mid-update) a new ONNX with the old manifest,
//! which the hash check refuses.
//!
//! [`init_model`] lives here (not in [`super::onnx`]) because it assembles a
//! whole model directory: deterministic weights plus a manifest with a fixed
//! timestamp, so `pleura models init` with the same seed gives byte-identical
//! files.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::UNIX_EPOCH;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sha2::{Digest, Sha256};

use super::onnx::{self, OnnxError, ResNetSpec};
use crate::time;

/// File name of the manifest inside a model directory.
pub const MANIFEST_FILE: &str = "model.json";
/// File name of the ONNX graph inside a model directory.
pub const ONNX_FILE: &str = "model.onnx";
/// Output columns, in order: `probabilities[:, i]` is the probability of `LABELS[i]`.
pub const LABELS: [&str; 2] = ["effusion", "nofinding"];
/// The manifest schema this crate reads and writes.
pub const SCHEMA_VERSION: u32 = 1;
/// The only normalisation the preprocessing implements: after resizing, pixel
/// values are min-max scaled to `[0, 1]` per image.
pub const NORMALISATION_MINMAX: &str = "minmax";
/// Decision threshold on `p_effusion` for untrained models.
pub const DEFAULT_THRESHOLD: f32 = 0.5;
pub use crate::wire::MAX_VERSION_LEN;

/// What the model's input looks like.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Side of the square input image in pixels (equals `spec.image_size`).
    pub size: u32,
    /// Channels (1: grayscale).
    pub channels: u32,
    /// Graph input name ([`onnx::INPUT_NAME`]).
    pub name: String,
}

/// A canary: a synthetic input (regenerated from `input_seed`) and the
/// probabilities the model must produce for it, so a worker can prove after
/// loading that it computes what the trainer computed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GoldenCase {
    /// Human-readable name of the case.
    pub name: String,
    /// Seed from which the input image is regenerated.
    pub input_seed: u64,
    /// Expected output row, one probability per label.
    pub expected: Vec<f32>,
}

/// The contents of `model.json`. Unknown fields are refused: a manifest
/// from a newer schema must not be half-understood by an older worker.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Manifest schema, [`SCHEMA_VERSION`].
    pub schema: u32,
    /// Model version, `[A-Za-z0-9._-]{1,64}`; untrained models are `init-<sha12>`.
    pub version: String,
    /// Lowercase hex SHA-256 of `model.onnx`.
    pub sha256: String,
    /// Creation time, RFC 3339 in whole seconds, UTC (`...Z`).
    pub created_at: String,
    /// What the graph input expects.
    pub input: InputSpec,
    /// Graph output name ([`onnx::OUTPUT_NAME`]).
    pub output: String,
    /// Input normalisation, [`NORMALISATION_MINMAX`]: min-max to `[0, 1]` after resize.
    pub normalisation: String,
    /// Output column labels, [`LABELS`]; index = output column.
    pub labels: Vec<String>,
    /// Decision threshold on `p_effusion`, strictly inside (0, 1).
    pub threshold: f32,
    /// False for `init` models, whose predictions are meaningless.
    pub trained: bool,
    /// The network the ONNX was built from.
    pub spec: ResNetSpec,
    /// Evaluation metrics, filled by the trainer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<serde_json::Value>,
    /// The trainer's configuration and data summary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training: Option<serde_json::Value>,
    /// Canary inputs and their expected outputs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub golden: Vec<GoldenCase>,
    /// The arithmetic of the graph: `fp32` (omitted), or `int8` for a
    /// quantised variant, which the onnxruntime engine serves fast.
    #[serde(default, skip_serializing_if = "Precision::is_fp32")]
    pub precision: Precision,
    /// For a variant (int8): the model it was made from, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derived_from: Option<Derivation>,
    /// How `p_effusion` was calibrated, when it was: the temperature the
    /// graph divides its logits by (`spec.temperature`, which must equal
    /// it), what it was fitted on, and the calibration error it removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<CalibrationRecord>,
}

/// How a model's probabilities were calibrated after training, so that a
/// `p_effusion` of 0.3 means about 3 in 10 such scans have an effusion.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CalibrationRecord {
    /// The method: `temperature`, or `platt` (temperature and bias).
    pub method: CalibrationMethod,
    /// The fitted temperature `T`; the graph computes `softmax(logits / T)`,
    /// so this equals `spec.temperature`.
    pub temperature: f32,
    /// What `T` was fitted on, in words, e.g. `"out-of-fold predictions,
    /// 5 folds, 1200 images"`: out-of-fold, so that no image was scored by a
    /// model that trained on it.
    pub fitted_on: String,
    /// Expected calibration error of those predictions before scaling.
    pub ece_before: f64,
    /// Expected calibration error after scaling by `T`.
    pub ece_after: f64,
    /// Equal-width probability bins the ECEs were measured with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ece_bins: Option<u32>,
    /// With `platt`: the bias `b` of `p = sigmoid(margin / T + b)`, the
    /// margin being `logit_effusion - logit_nofinding`. The graph applies it
    /// through the effusion logit's final-layer bias (raised by `b * T`), so
    /// the ONNX operators are the temperature's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bias: Option<f32>,
}

/// A calibration method.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CalibrationMethod {
    /// One scalar `T` dividing every logit (Guo et al., 2017): it keeps the
    /// ranking, so AUROC and the choice of threshold ordering are unchanged.
    #[default]
    Temperature,
    /// Temperature and a bias on the log-odds (Platt, 1999): also undoes the
    /// shift of the log-odds that class-weighted training builds in, which
    /// no temperature can; the ranking is kept as well.
    Platt,
}

/// The arithmetic of a model's graph.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// float32 throughout.
    #[default]
    Fp32,
    /// int8 weights and uint8 activations (QDQ), float head.
    Int8,
}

impl Precision {
    /// The default, which manifests leave out.
    pub fn is_fp32(&self) -> bool {
        *self == Precision::Fp32
    }

    /// The name in manifests and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Int8 => "int8",
        }
    }
}

/// Where a variant came from.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Derivation {
    /// The fp32 version it was quantised from.
    pub parent: String,
    /// Calibration scans used.
    pub calibration_images: usize,
    /// SHA-256 of the calibration inputs, so the calibration set is on record.
    pub calibration_fingerprint: String,
}

/// Why a model directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading or writing a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `model.json` is not valid JSON for this schema (includes unknown fields).
    #[error("{}: not a valid manifest: {source}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// `model.onnx` does not hash to the manifest's `sha256`: the pair is
    /// torn or tampered with and must not be served.
    #[error("model.onnx has sha256 {found} but the manifest says {expected}")]
    HashMismatch { expected: String, found: String },
    /// The manifest parses but breaks a rule (labels, threshold, version ...).
    #[error("invalid manifest: {0}")]
    Invalid(String),
}

/// Lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

use crate::wire::valid_version;

impl Manifest {
    /// Checks every rule a worker relies on. [`ModelFiles::read_dir`] and
    /// [`ModelFiles::write_dir`] both call it, so an invalid manifest can be
    /// neither loaded nor published.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let bad = |msg: String| Err(ManifestError::Invalid(msg));
        if self.schema != SCHEMA_VERSION {
            return bad(format!(
                "schema {} is not supported (expected {SCHEMA_VERSION})",
                self.schema
            ));
        }
        if !valid_version(&self.version) {
            return bad(format!(
                "version {:?} must be 1..={MAX_VERSION_LEN} characters of [A-Za-z0-9._-]",
                self.version
            ));
        }
        if self.sha256.len() != 64
            || !self
                .sha256
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return bad(format!(
                "sha256 {:?} is not 64 lowercase hex digits",
                self.sha256
            ));
        }
        if !time::is_rfc3339(&self.created_at) {
            return bad(format!(
                "created_at {:?} is not RFC 3339 (UTC, Z)",
                self.created_at
            ));
        }
        self.spec
            .validate()
            .map_err(|e| ManifestError::Invalid(e.to_string()))?;
        if self.input.size < onnx::MIN_IMAGE_SIZE {
            return bad(format!(
                "input.size {} is below {}",
                self.input.size,
                onnx::MIN_IMAGE_SIZE
            ));
        }
        if self.input.size != self.spec.image_size {
            return bad(format!(
                "input.size {} differs from spec.image_size {}",
                self.input.size, self.spec.image_size
            ));
        }
        // Preprocessing produces grayscale only.
        if self.input.channels != 1 || self.spec.in_channels != 1 {
            return bad(format!(
                "input.channels {} / spec.in_channels {} must both be 1",
                self.input.channels, self.spec.in_channels
            ));
        }
        if self.input.name != onnx::INPUT_NAME {
            return bad(format!(
                "input.name {:?} must be {:?}",
                self.input.name,
                onnx::INPUT_NAME
            ));
        }
        if self.output != onnx::OUTPUT_NAME {
            return bad(format!(
                "output {:?} must be {:?}",
                self.output,
                onnx::OUTPUT_NAME
            ));
        }
        if self.normalisation != NORMALISATION_MINMAX {
            return bad(format!(
                "normalisation {:?} is not supported (only {NORMALISATION_MINMAX:?})",
                self.normalisation
            ));
        }
        if self.labels != LABELS {
            return bad(format!("labels {:?} must be {LABELS:?}", self.labels));
        }
        if self.spec.num_classes != LABELS.len() as i64 {
            return bad(format!(
                "spec.num_classes {} must equal the {} labels",
                self.spec.num_classes,
                LABELS.len()
            ));
        }
        // `!(x > 0 && x < 1)` also catches NaN.
        if !(self.threshold > 0.0 && self.threshold < 1.0) {
            return bad(format!(
                "threshold {} must lie strictly between 0 and 1",
                self.threshold
            ));
        }
        if (self.precision == Precision::Int8) != self.derived_from.is_some() {
            return bad(
                "an int8 manifest names the model it was derived from, and only it does".into(),
            );
        }
        if let Some(c) = &self.calibration {
            // The record describes the graph; a record whose temperature the
            // graph does not apply would claim a calibration nobody serves.
            if c.temperature != self.spec.temperature {
                return bad(format!(
                    "calibration.temperature {} differs from spec.temperature {}, which the graph applies",
                    c.temperature, self.spec.temperature
                ));
            }
            if c.fitted_on.trim().is_empty() {
                return bad("calibration.fitted_on must say what T was fitted on".into());
            }
            for (name, ece) in [("ece_before", c.ece_before), ("ece_after", c.ece_after)] {
                if !(0.0..=1.0).contains(&ece) {
                    return bad(format!("calibration.{name} {ece} must lie in [0, 1]"));
                }
            }
            if c.ece_bins == Some(0) {
                return bad("calibration.ece_bins must be at least 1".into());
            }
            match (c.method, c.bias) {
                (CalibrationMethod::Temperature, None) => {}
                (CalibrationMethod::Platt, Some(b)) if b.is_finite() => {}
                (CalibrationMethod::Platt, _) => {
                    return bad("calibration.bias must be a finite number with platt".into())
                }
                (CalibrationMethod::Temperature, Some(_)) => {
                    return bad("calibration.bias belongs to platt, not temperature".into())
                }
            }
        }
        for (i, g) in self.golden.iter().enumerate() {
            if g.name.is_empty() {
                return bad(format!("golden[{i}] has an empty name"));
            }
            if self.golden[..i].iter().any(|o| o.name == g.name) {
                return bad(format!("golden case {:?} appears twice", g.name));
            }
            if g.expected.len() != LABELS.len() || !g.expected.iter().all(|p| p.is_finite()) {
                return bad(format!(
                    "golden case {:?} needs {} finite expected values, got {:?}",
                    g.name,
                    LABELS.len(),
                    g.expected
                ));
            }
        }
        Ok(())
    }
}

/// A model directory's contents: the manifest and the ONNX bytes it describes.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelFiles {
    /// The parsed `model.json`.
    pub manifest: Manifest,
    /// The raw `model.onnx`.
    pub onnx: Vec<u8>,
}

impl ModelFiles {
    /// Validates the manifest and checks the ONNX bytes hash to its `sha256`.
    pub fn verify(&self) -> Result<(), ManifestError> {
        self.manifest.validate()?;
        let found = sha256_hex(&self.onnx);
        if found != self.manifest.sha256 {
            return Err(ManifestError::HashMismatch {
                expected: self.manifest.sha256.clone(),
                found,
            });
        }
        Ok(())
    }

    /// Reads `dir/model.json` and `dir/model.onnx` and [`verify`](Self::verify)s
    /// them. A hash mismatch is [`ManifestError::HashMismatch`]; callers
    /// should keep serving what they had.
    pub fn read_dir(dir: &Path) -> Result<ModelFiles, ManifestError> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let json = read(&manifest_path)?;
        let manifest: Manifest =
            serde_json::from_slice(&json).map_err(|source| ManifestError::Parse {
                path: manifest_path,
                source,
            })?;
        let onnx = read(&dir.join(ONNX_FILE))?;
        let files = ModelFiles { manifest, onnx };
        files.verify()?;
        Ok(files)
    }

    /// Writes the pair into `dir` (created if needed), refusing anything
    /// [`read_dir`](Self::read_dir) would refuse. `model.onnx` goes first and
    /// `model.json` last, each via a temp file in `dir` and a rename, so a
    /// reader never sees a partial file and never sees the new manifest
    /// before the ONNX it describes.
    pub fn write_dir(&self, dir: &Path) -> Result<(), ManifestError> {
        self.verify()?;
        let mut json = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| ManifestError::Invalid(format!("cannot encode the manifest: {e}")))?;
        json.push(b'\n');
        fs::create_dir_all(dir).map_err(|source| io_err(dir, source))?;
        write_atomic(dir, ONNX_FILE, &self.onnx)?;
        write_atomic(dir, MANIFEST_FILE, &json)?;
        sync_dir(dir);
        Ok(())
    }
}

fn io_err(path: &Path, source: io::Error) -> ManifestError {
    ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, ManifestError> {
    fs::read(path).map_err(|source| io_err(path, source))
}

/// Writes `bytes` to `dir/name` through a uniquely named temp file in the
/// same directory (so the rename stays on one filesystem and is atomic).
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), ManifestError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let target = dir.join(name);
    let tmp = dir.join(format!(
        ".{name}.tmp-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        // Flush to disk before the rename makes the file visible, so a crash
        // cannot leave a renamed but empty file behind.
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, &target)
    })();
    result.map_err(|source| {
        let _ = fs::remove_file(&tmp);
        io_err(&target, source)
    })
}

/// Persists the renames. Best effort: not every platform can open a directory.
fn sync_dir(dir: &Path) {
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

/// The golden-case input for `seed`: a `size * size` grayscale image, a few
/// soft blobs over a gentle gradient, min-max scaled to [0, 1] as the
/// preprocessing scales real scans (so the minimum is 0 and the maximum 1).
///
/// This is the one definition; a canary that regenerates the input must call
/// it (or reproduce it exactly). It is deterministic on every platform: the
/// parameters come from ChaCha8 (`seed_from_u64`) via `next_u64` turned into
/// a 53-bit fraction, and the image uses only `+ - * /` in f64, no
/// transcendental functions whose last bit could vary between libms.
pub fn golden_input(seed: u64, size: u32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut unit = || (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    let (gx, gy) = (unit() * 2.0 - 1.0, unit() * 2.0 - 1.0);
    // (centre x, centre y, radius, amplitude)
    let blobs: Vec<(f64, f64, f64, f64)> = (0..4)
        .map(|_| (unit(), unit(), 0.15 + 0.35 * unit(), unit() * 4.0 - 2.0))
        .collect();
    let s = size as usize;
    let mut raw = Vec::with_capacity(s * s);
    for iy in 0..s {
        let y = (iy as f64 + 0.5) / s as f64;
        for ix in 0..s {
            let x = (ix as f64 + 0.5) / s as f64;
            let mut v = gx * x + gy * y;
            for &(cx, cy, r, a) in &blobs {
                let t = ((x - cx) * (x - cx) + (y - cy) * (y - cy)) / (r * r);
                if t < 1.0 {
                    // (1 - t)^2: smooth (C1) bump of radius r.
                    v += a * (1.0 - t) * (1.0 - t);
                }
            }
            raw.push(v);
        }
    }
    let lo = raw.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = raw.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = hi - lo;
    raw.into_iter()
        .map(|v| {
            if range > 0.0 {
                ((v - lo) / range) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// The deterministic untrained model for `spec` and `seed`: [`onnx::init_weights`]
/// written by [`onnx::write_onnx`], with version `init-<first 12 hex of sha>`,
/// threshold 0.5, `trained: false` and `created_at` fixed at the Unix epoch so
/// the same inputs give byte-identical files. Backs `pleura models init`; the
/// caller writes it with [`ModelFiles::write_dir`].
///
/// A spec the manifest cannot describe (not 1 input channel, not 2 classes,
/// image smaller than 32) is [`OnnxError::InvalidSpec`].
pub fn init_model(spec: &ResNetSpec, seed: u64) -> Result<ModelFiles, OnnxError> {
    spec.validate()?;
    let onnx = onnx::write_onnx(spec, &onnx::init_weights(spec, seed))?;
    let sha256 = sha256_hex(&onnx);
    let channels = u32::try_from(spec.in_channels).map_err(|_| {
        OnnxError::InvalidSpec(format!("in_channels {} is out of range", spec.in_channels))
    })?;
    let manifest = Manifest {
        schema: SCHEMA_VERSION,
        version: format!("init-{}", &sha256[..12]),
        sha256,
        created_at: time::rfc3339_seconds(UNIX_EPOCH),
        input: InputSpec {
            size: spec.image_size,
            channels,
            name: onnx::INPUT_NAME.into(),
        },
        output: onnx::OUTPUT_NAME.into(),
        normalisation: NORMALISATION_MINMAX.into(),
        labels: LABELS.iter().map(|s| s.to_string()).collect(),
        threshold: DEFAULT_THRESHOLD,
        trained: false,
        spec: spec.clone(),
        metrics: None,
        training: None,
        golden: Vec::new(),
        precision: Precision::Fp32,
        derived_from: None,
        calibration: None,
    };
    let files = ModelFiles { manifest, onnx };
    files.verify().map_err(|e| match e {
        ManifestError::Invalid(msg) => OnnxError::InvalidSpec(msg),
        other => OnnxError::InvalidSpec(other.to_string()),
    })?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    /// Writes `manifest` as JSON beside `onnx` without any validation, to
    /// hand read_dir files that write_dir would refuse to produce.
    fn write_raw(dir: &Path, manifest: &serde_json::Value, onnx: &[u8]) {
        fs::write(
            dir.join(MANIFEST_FILE),
            serde_json::to_vec(manifest).unwrap(),
        )
        .unwrap();
        fs::write(dir.join(ONNX_FILE), onnx).unwrap();
    }

    #[test]
    fn init_model_is_deterministic_and_well_formed() {
        let a = init_model(&ResNetSpec::tiny(), 3).unwrap();
        let b = init_model(&ResNetSpec::tiny(), 3).unwrap();
        let c = init_model(&ResNetSpec::tiny(), 4).unwrap();
        assert_eq!(a, b);
        assert_ne!(a.onnx, c.onnx);
        let m = &a.manifest;
        assert_eq!(m.version, format!("init-{}", &sha256_hex(&a.onnx)[..12]));
        assert_eq!(m.created_at, "1970-01-01T00:00:00Z");
        assert_eq!((m.threshold, m.trained, m.schema), (0.5, false, 1));
        assert_eq!(m.labels, ["effusion", "nofinding"]);
        assert_eq!(
            m.input,
            InputSpec {
                size: 32,
                channels: 1,
                name: "input".into()
            }
        );

        let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        a.write_dir(d1.path()).unwrap();
        b.write_dir(d2.path()).unwrap();
        for f in [MANIFEST_FILE, ONNX_FILE] {
            assert_eq!(
                fs::read(d1.path().join(f)).unwrap(),
                fs::read(d2.path().join(f)).unwrap()
            );
        }
    }

    #[test]
    fn init_model_refuses_specs_the_manifest_cannot_describe() {
        for spec in [
            ResNetSpec {
                num_classes: 3,
                ..ResNetSpec::tiny()
            },
            ResNetSpec {
                in_channels: 3,
                ..ResNetSpec::tiny()
            },
            ResNetSpec {
                image_size: 16,
                ..ResNetSpec::tiny()
            },
        ] {
            assert!(
                matches!(init_model(&spec, 0), Err(OnnxError::InvalidSpec(_))),
                "{spec:?}"
            );
        }
    }

    #[test]
    fn round_trip_through_a_directory() {
        let mut files = init_model(&ResNetSpec::tiny(), 0).unwrap();
        files.manifest.metrics = Some(serde_json::json!({"auc": 0.91}));
        files.manifest.golden = vec![GoldenCase {
            name: "phantom-0".into(),
            input_seed: 9,
            expected: vec![0.25, 0.75],
        }];
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("models/m1");
        files.write_dir(&dir).unwrap();
        assert_eq!(ModelFiles::read_dir(&dir).unwrap(), files);
        // Optional fields are omitted when empty, and come back as empty.
        let bare = init_model(&ResNetSpec::tiny(), 0).unwrap();
        bare.write_dir(&dir).unwrap();
        let json = fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
        assert!(
            !json.contains("metrics") && !json.contains("golden"),
            "{json}"
        );
        assert_eq!(ModelFiles::read_dir(&dir).unwrap(), bare);
    }

    #[test]
    fn read_dir_refuses_a_tampered_onnx() {
        let files = init_model(&ResNetSpec::tiny(), 0).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        files.write_dir(tmp.path()).unwrap();
        let path = tmp.path().join(ONNX_FILE);
        let mut onnx = fs::read(&path).unwrap();
        let mid = onnx.len() / 2;
        onnx[mid] ^= 0x01;
        fs::write(&path, &onnx).unwrap();
        match ModelFiles::read_dir(tmp.path()) {
            Err(ManifestError::HashMismatch { expected, found }) => {
                assert_eq!(expected, files.manifest.sha256);
                assert_eq!(found, sha256_hex(&onnx));
            }
            other => panic!("{other:?}"),
        }
        // write_dir refuses a mismatched pair too.
        let torn = ModelFiles { onnx, ..files };
        assert!(matches!(
            torn.write_dir(tmp.path()),
            Err(ManifestError::HashMismatch { .. })
        ));
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let files = init_model(&ResNetSpec::tiny(), 0).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let good = serde_json::to_value(&files.manifest).unwrap();

        let mut top = good.clone();
        top["platt_scaling"] = serde_json::json!(true);
        write_raw(tmp.path(), &top, &files.onnx);
        match ModelFiles::read_dir(tmp.path()) {
            Err(ManifestError::Parse { source, .. }) => {
                assert!(source.to_string().contains("platt_scaling"), "{source}")
            }
            other => panic!("{other:?}"),
        }

        let mut nested = good.clone();
        nested["spec"]["groups"] = serde_json::json!(2);
        write_raw(tmp.path(), &nested, &files.onnx);
        assert!(matches!(
            ModelFiles::read_dir(tmp.path()),
            Err(ManifestError::Parse { .. })
        ));

        write_raw(tmp.path(), &good, &files.onnx);
        assert!(ModelFiles::read_dir(tmp.path()).is_ok());
    }

    #[test]
    fn invalid_manifests_are_refused() {
        let files = init_model(&ResNetSpec::tiny(), 0).unwrap();
        type Mutation = fn(&mut Manifest);
        let cases: [(&str, Mutation); 15] = [
            ("threshold 0", |m| m.threshold = 0.0),
            ("threshold 1", |m| m.threshold = 1.0),
            ("threshold NaN", |m| m.threshold = f32::NAN),
            ("schema 2", |m| m.schema = 2),
            ("version slash", |m| m.version = "a/b".into()),
            ("version empty", |m| m.version = String::new()),
            ("version long", |m| m.version = "v".repeat(65)),
            ("labels swapped", |m| m.labels.reverse()),
            ("size 16", |m| {
                m.input.size = 16;
                m.spec.image_size = 16;
            }),
            ("size differs", |m| m.input.size = 64),
            ("channels", |m| m.input.channels = 3),
            ("output", |m| m.output = "logits".into()),
            ("normalisation", |m| m.normalisation = "zscore".into()),
            ("created_at", |m| m.created_at = "yesterday".into()),
            ("golden", |m| {
                m.golden = vec![GoldenCase {
                    name: "g".into(),
                    input_seed: 0,
                    expected: vec![1.0],
                }]
            }),
        ];
        for (what, mutate) in cases {
            let mut bad = files.clone();
            mutate(&mut bad.manifest);
            assert!(
                matches!(bad.verify(), Err(ManifestError::Invalid(_))),
                "{what}"
            );
            let tmp = tempfile::tempdir().unwrap();
            assert!(
                bad.write_dir(tmp.path()).is_err(),
                "{what}: write_dir must refuse"
            );
            assert!(entries(tmp.path()).is_empty(), "{what}: nothing written");
        }
        let mut ok = files.clone();
        ok.manifest.version = "2024-06-01_run.3-final".into();
        ok.manifest.threshold = 0.37;
        assert!(ok.verify().is_ok());
    }

    fn calibrated(temperature: f32) -> ModelFiles {
        let spec = ResNetSpec {
            members: 3,
            tta_flip: true,
            temperature,
            ..ResNetSpec::tiny()
        };
        let mut files = init_model(&spec, 0).unwrap();
        files.manifest.calibration = Some(CalibrationRecord {
            method: CalibrationMethod::Temperature,
            temperature,
            fitted_on: "out-of-fold predictions, 5 folds, 1200 images".into(),
            ece_before: 0.081,
            ece_after: 0.019,
            ece_bins: Some(15),
            bias: None,
        });
        files
    }

    /// The calibration record and the graph fields of the spec travel
    /// through a directory and back, and say what they are in the JSON.
    #[test]
    fn calibration_and_ensemble_round_trip() {
        let files = calibrated(1.7);
        files.verify().unwrap();
        let tmp = tempfile::tempdir().unwrap();
        files.write_dir(tmp.path()).unwrap();
        assert_eq!(ModelFiles::read_dir(tmp.path()).unwrap(), files);
        let json: serde_json::Value =
            serde_json::from_slice(&fs::read(tmp.path().join(MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(
            json["calibration"],
            serde_json::json!({
                "method": "temperature",
                "temperature": 1.7,
                "fitted_on": "out-of-fold predictions, 5 folds, 1200 images",
                "ece_before": 0.081,
                "ece_after": 0.019,
                "ece_bins": 15
            })
        );
        assert_eq!(json["spec"]["members"], 3);
        assert_eq!(json["spec"]["tta_flip"], true);
        assert_eq!(json["spec"]["temperature"], 1.7);

        // Unknown fields inside the record are refused like anywhere else.
        let mut odd = json.clone();
        odd["calibration"]["bins"] = serde_json::json!(10);
        write_raw(tmp.path(), &odd, &files.onnx);
        assert!(matches!(
            ModelFiles::read_dir(tmp.path()),
            Err(ManifestError::Parse { .. })
        ));
    }

    /// A plain model's manifest says nothing of ensembles or calibration:
    /// exactly the fields manifests had before them, so manifests written
    /// before parse and manifests written now read the same.
    #[test]
    fn plain_manifest_is_unchanged_and_old_manifests_parse() {
        let files = init_model(&ResNetSpec::tiny(), 0).unwrap();
        let json = serde_json::to_value(&files.manifest).unwrap();
        let keys = |v: &serde_json::Value| -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        };
        assert_eq!(
            keys(&json["spec"]),
            [
                "blocks",
                "image_size",
                "in_channels",
                "num_classes",
                "stem_width",
                "widths"
            ]
        );
        assert!(json.get("calibration").is_none(), "{json}");
        // A manifest as the previous release wrote it.
        let old = r#"{"schema":1,"version":"v1","sha256":"SHA","created_at":"1970-01-01T00:00:00Z",
            "input":{"size":32,"channels":1,"name":"input"},"output":"probabilities",
            "normalisation":"minmax","labels":["effusion","nofinding"],"threshold":0.5,
            "trained":false,"spec":{"in_channels":1,"image_size":32,"stem_width":4,
            "widths":[4,8,16,32],"blocks":[2,2,2,2],"num_classes":2}}"#
            .replace("SHA", &files.manifest.sha256);
        let m: Manifest = serde_json::from_str(&old).unwrap();
        assert_eq!(m.spec, ResNetSpec::tiny());
        assert!(m.spec.is_plain());
        assert_eq!(m.calibration, None);
        m.validate().unwrap();
    }

    #[test]
    fn calibration_must_describe_the_graph() {
        type Mutation = fn(&mut Manifest);
        let cases: [(&str, Mutation); 10] = [
            ("T differs from the graph's", |m| {
                m.calibration.as_mut().unwrap().temperature = 1.5
            }),
            ("record without the graph's T", |m| m.spec.temperature = 1.0),
            ("empty fitted_on", |m| {
                m.calibration.as_mut().unwrap().fitted_on = " ".into()
            }),
            ("ece_before NaN", |m| {
                m.calibration.as_mut().unwrap().ece_before = f64::NAN
            }),
            ("ece_after > 1", |m| {
                m.calibration.as_mut().unwrap().ece_after = 1.5
            }),
            ("ece_bins 0", |m| {
                m.calibration.as_mut().unwrap().ece_bins = Some(0)
            }),
            ("members 17", |m| m.spec.members = 17),
            ("platt without a bias", |m| {
                m.calibration.as_mut().unwrap().method = CalibrationMethod::Platt
            }),
            ("temperature with a bias", |m| {
                m.calibration.as_mut().unwrap().bias = Some(-0.5)
            }),
            ("platt with a NaN bias", |m| {
                let c = m.calibration.as_mut().unwrap();
                c.method = CalibrationMethod::Platt;
                c.bias = Some(f32::NAN);
            }),
        ];
        for (what, mutate) in cases {
            let mut bad = calibrated(1.7);
            mutate(&mut bad.manifest);
            assert!(
                matches!(bad.manifest.validate(), Err(ManifestError::Invalid(_))),
                "{what}"
            );
        }
        // A temperature of 1 fitted and recorded (already calibrated) is fine.
        calibrated(1.0).verify().unwrap();
        let mut platt = calibrated(1.7);
        let c = platt.manifest.calibration.as_mut().unwrap();
        c.method = CalibrationMethod::Platt;
        c.bias = Some(-1.2);
        platt.manifest.validate().unwrap();
    }

    #[test]
    fn write_dir_leaves_no_temp_files_and_replaces_atomically() {
        let tmp = tempfile::tempdir().unwrap();
        let first = init_model(&ResNetSpec::tiny(), 0).unwrap();
        first.write_dir(tmp.path()).unwrap();
        assert_eq!(entries(tmp.path()), [MANIFEST_FILE, ONNX_FILE]);
        let second = init_model(&ResNetSpec::tiny(), 1).unwrap();
        second.write_dir(tmp.path()).unwrap();
        assert_eq!(entries(tmp.path()), [MANIFEST_FILE, ONNX_FILE]);
        assert_eq!(ModelFiles::read_dir(tmp.path()).unwrap(), second);
    }

    #[test]
    fn missing_files_are_io_errors() {
        let tmp = tempfile::tempdir().unwrap();
        match ModelFiles::read_dir(&tmp.path().join("nope")) {
            Err(ManifestError::Io { path, source }) => {
                assert!(path.ends_with(MANIFEST_FILE));
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sha256_hex_is_lowercase_hex() {
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
