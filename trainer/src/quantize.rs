//! int8 variants of trained models, made and judged where the data is.
//!
//! The graph rewrite and the calibration live in the shared crate
//! (`pleura::model::quantize`); what needs the dataset lives here: the
//! parent's own split is rebuilt from its manifest, the calibration scans
//! come from its training side, and both models are scored on its
//! validation side with the engine that will serve the variant. The gate
//! (`pleura::registry::gate`) later compares the two sets of metrics this
//! writes into the variant's manifest.

use std::path::{Path, PathBuf};

use pleura::model::quantize::{self as q, Calibration};
use pleura::model::{Engine, EngineError, EngineOptions, ManifestError, ModelFiles};
use pleura::scan::Limits;
use serde::Serialize;

use crate::data::{self, DataError, Dataset, Loader, Sample};
use crate::metrics::{self, Summary};

/// What to quantise, and how.
#[derive(Debug, Clone)]
pub struct QuantizeConfig {
    /// The fp32 model directory (`model.json`, `model.onnx`) from `train`.
    pub model: PathBuf,
    /// The dataset it was trained on; `None` uses the path its manifest
    /// records.
    pub data: Option<PathBuf>,
    /// Calibrate on this dataset instead of the parent's training split.
    /// For experiments only: the variant records its fingerprint, and the
    /// gate judges the result on the parent's validation set either way.
    pub calibration_data: Option<PathBuf>,
    /// Calibration scans drawn (stratified, seeded) from the training side.
    pub calibration_images: usize,
    /// Output root; the variant goes to `out/<parent>-int8/`.
    pub out: PathBuf,
    /// The engine that will serve the variant, on which it is measured and
    /// its golden cases are recorded.
    pub engine: EngineOptions,
    /// Decoding threads.
    pub loader_threads: usize,
}

/// Why no variant was made.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// The parent model could not be read.
    #[error("parent model: {0}")]
    Parent(#[from] ManifestError),
    /// The parent cannot be quantised by this command (and why).
    #[error("{0}")]
    Unsuitable(String),
    /// The dataset could not be read, or is not the parent's.
    #[error(transparent)]
    Data(#[from] DataError),
    /// The graph rewrite or calibration failed.
    #[error(transparent)]
    Quantize(#[from] q::QuantizeError),
    /// An engine could not run a model.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// The variant's directory exists already.
    #[error("{} exists; remove it or quantise into another --out", .0.display())]
    Exists(PathBuf),
}

/// One model's validation metrics at the parent's threshold.
#[derive(Debug, Clone, Serialize)]
pub struct Measured {
    /// The model measured.
    pub version: String,
    /// Validation AUROC.
    pub auroc: Option<f64>,
    /// Validation PR-AUC.
    pub pr_auc: Option<f64>,
    /// At the (shared) threshold.
    pub at_chosen: Summary,
}

/// What a quantisation produced.
#[derive(Debug)]
pub struct QuantizeOutcome {
    /// `out/<parent>-int8`.
    pub dir: PathBuf,
    /// The variant as written.
    pub files: ModelFiles,
    /// The variant on the validation set.
    pub int8: Measured,
    /// The parent on the same images, on the same engine.
    pub parent: Measured,
    /// Largest |p_int8 − p_fp32| over the validation scans.
    pub max_abs_diff: f32,
    /// Validation scans whose verdict at the threshold changed.
    pub verdicts_changed: usize,
    /// What the ranges came from.
    pub calibration: Calibration,
}

/// The parent's training facts the split is rebuilt from.
struct Provenance {
    data: PathBuf,
    seed: u64,
    val_fraction: f64,
    fingerprint: String,
}

fn provenance(files: &ModelFiles) -> Result<Provenance, QuantizeError> {
    let m = &files.manifest;
    let unsuitable = |why: &str| QuantizeError::Unsuitable(format!("{}: {why}", m.version));
    if !m.precision.is_fp32() {
        return Err(unsuitable("only an fp32 model can be quantised"));
    }
    if !m.trained {
        return Err(unsuitable(
            "an untrained model has no training data to calibrate on",
        ));
    }
    let training = m
        .training
        .as_ref()
        .ok_or_else(|| unsuitable("the manifest does not record its training run"))?;
    let config = training.get("config");
    let field = |key: &str| config.and_then(|c| c.get(key));
    if field("ablation").is_some_and(|a| !a.is_null()) {
        return Err(unsuitable("an ablation run has no validation set"));
    }
    let missing = |what: &str| unsuitable(&format!("the manifest does not record {what}"));
    Ok(Provenance {
        data: field("data")
            .and_then(|d| d.as_str())
            .map(PathBuf::from)
            .ok_or_else(|| missing("its training data"))?,
        seed: field("seed")
            .and_then(|s| s.as_u64())
            .ok_or_else(|| missing("its seed"))?,
        val_fraction: field("val_fraction")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| missing("its validation share"))?,
        fingerprint: training
            .get("data")
            .and_then(|d| d.get("fingerprint"))
            .and_then(|f| f.as_str())
            .ok_or_else(|| missing("its validation fingerprint"))?
            .to_string(),
    })
}

/// Decodes and preprocesses `samples` exactly as training and serving do.
fn load(samples: Vec<Sample>, size: u32, threads: usize) -> Result<Vec<Vec<f32>>, DataError> {
    let loader = Loader::new(samples, size, Limits::default(), threads, 1);
    loader.preload()?;
    Ok((0..loader.len())
        .map(|i| loader.cache().get(i).expect("preloaded").to_vec())
        .collect())
}

fn scores(engine: &Engine, inputs: &[Vec<f32>]) -> Result<Vec<f32>, EngineError> {
    let mut scorer = engine.scorer()?;
    inputs
        .iter()
        .map(|x| scorer.probabilities(x).map(|p| p[0]))
        .collect()
}

fn measured(version: &str, scores: &[f32], positives: &[bool], threshold: f32) -> Measured {
    Measured {
        version: version.to_string(),
        auroc: metrics::auroc(scores, positives),
        pr_auc: metrics::pr_auc(scores, positives),
        at_chosen: Summary::at(scores, positives, threshold),
    }
}

/// Makes the int8 variant of `cfg.model`: rebuilds its split, calibrates
/// on its training side, measures variant and parent on its validation
/// side, and writes `out/<parent>-int8/` with both sets of metrics in the
/// manifest. It does not judge: the promotion gate does, at publish time.
pub fn quantize(cfg: &QuantizeConfig) -> Result<QuantizeOutcome, QuantizeError> {
    let parent = ModelFiles::read_dir(&cfg.model)?;
    let prov = provenance(&parent)?;
    if cfg.calibration_images == 0 {
        return Err(QuantizeError::Unsuitable(
            "at least one calibration image is needed".into(),
        ));
    }
    let root = cfg.data.clone().unwrap_or(prov.data);
    let dataset = data::scan_dataset(&root)?;
    let split = data::split(&dataset, prov.val_fraction, prov.seed);
    // The variant is judged against numbers measured on the parent's
    // validation set; a different folder (files added, relabelled) would
    // make that comparison, and the calibration's independence, a guess.
    let found = data::fingerprint(&split.val);
    if found != prov.fingerprint {
        return Err(QuantizeError::Unsuitable(format!(
            "the validation split of {} is not the one {} was measured on (fingerprint {} != {}); \
             pass the dataset it was trained on with --data",
            root.display(),
            parent.manifest.version,
            &found[..12],
            &prov.fingerprint[..12.min(prov.fingerprint.len())]
        )));
    }
    let pool = match &cfg.calibration_data {
        Some(dir) => data::scan_dataset(dir)?,
        None => Dataset {
            root: root.clone(),
            samples: split.train.clone(),
        },
    };
    let calibration_samples = data::subsample(&pool, cfg.calibration_images, prov.seed).samples;
    let size = parent.manifest.input.size;
    let threads = cfg.loader_threads.max(1);
    let calibration_inputs = load(calibration_samples, size, threads)?;
    tracing::info!(
        parent = %parent.manifest.version,
        images = calibration_inputs.len(),
        "calibrating"
    );

    let dir = cfg.out.join(format!("{}-int8", parent.manifest.version));
    if dir.symlink_metadata().is_ok() {
        return Err(QuantizeError::Exists(dir));
    }
    let (mut files, calibration) = q::int8_variant(&parent, &calibration_inputs, &cfg.engine)?;

    let positives: Vec<bool> = split.val.iter().map(|s| s.effusion).collect();
    let val_inputs = load(split.val, size, threads)?;
    let threshold = parent.manifest.threshold;
    let parent_engine = Engine::from_files_with(
        ModelFiles {
            manifest: parent.manifest.clone(),
            onnx: parent.onnx.clone(),
        },
        &cfg.engine,
    )?;
    let parent_scores = scores(&parent_engine, &val_inputs)?;
    drop(parent_engine);
    let int8_engine = Engine::from_files_with(
        ModelFiles {
            manifest: files.manifest.clone(),
            onnx: files.onnx.clone(),
        },
        &cfg.engine,
    )?;
    let int8_scores = scores(&int8_engine, &val_inputs)?;
    drop(int8_engine);

    let parent_m = measured(
        &parent.manifest.version,
        &parent_scores,
        &positives,
        threshold,
    );
    let int8_m = measured(&files.manifest.version, &int8_scores, &positives, threshold);
    let max_abs_diff = parent_scores
        .iter()
        .zip(&int8_scores)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    let verdicts_changed = parent_scores
        .iter()
        .zip(&int8_scores)
        .filter(|(a, b)| (**a >= threshold) != (**b >= threshold))
        .count();
    let engine = cfg.engine.kind.as_str();
    files.manifest.metrics = Some(serde_json::json!({
        "n": positives.len(),
        "n_positive": positives.iter().filter(|&&p| p).count(),
        "auroc": int8_m.auroc,
        "pr_auc": int8_m.pr_auc,
        "at_chosen": int8_m.at_chosen,
        "engine": engine,
        "max_abs_diff_vs_parent": max_abs_diff,
        "verdicts_changed": verdicts_changed,
        "parent": parent_m,
    }));
    let mut training = parent.manifest.training.clone().unwrap_or_default();
    training["quantisation"] = serde_json::json!({
        "calibration_data": cfg
            .calibration_data
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_else(|| format!("training split of {}", root.display())),
        "calibration_images": calibration.images,
        "calibration_fingerprint": calibration.fingerprint,
        "engine": engine,
        "code_revision": crate::export::code_revision(),
    });
    files.manifest.training = Some(training);
    write_new_dir(&files, &dir)?;
    tracing::info!(
        version = %files.manifest.version,
        dir = %dir.display(),
        auroc = int8_m.auroc,
        parent_auroc = parent_m.auroc,
        verdicts_changed,
        "wrote int8 variant"
    );
    Ok(QuantizeOutcome {
        dir,
        files,
        int8: int8_m,
        parent: parent_m,
        max_abs_diff,
        verdicts_changed,
        calibration,
    })
}

/// Claims `dir` atomically (a concurrent run of the same parent loses
/// cleanly) and fills it; a failed write removes what it made.
fn write_new_dir(files: &ModelFiles, dir: &Path) -> Result<(), QuantizeError> {
    files.verify()?;
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|source| {
            QuantizeError::Parent(ManifestError::Io {
                path: parent.to_path_buf(),
                source,
            })
        })?;
    }
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            return Err(QuantizeError::Exists(dir.to_path_buf()))
        }
        Err(source) => {
            return Err(QuantizeError::Parent(ManifestError::Io {
                path: dir.to_path_buf(),
                source,
            }))
        }
    }
    if let Err(e) = files.write_dir(dir) {
        let _ = std::fs::remove_dir_all(dir);
        return Err(e.into());
    }
    Ok(())
}
