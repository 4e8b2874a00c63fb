//! What cross-validation produces: the results written to `cv.json` and the report,
//! the out-of-fold predictions, and the fold models.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tch::nn;

use pleura::model::manifest::{CalibrationMethod, CalibrationRecord};
use pleura::model::onnx::ResNetSpec;

use super::stats::{Bootstrap, Estimate, Figures, MeanSd};
use crate::calibration::{PlattFit, ReliabilityBin, Scaling, TemperatureFit};
use crate::model::ResNet;
use crate::report::EpochRecord;

/// Which epoch's weights a fold contributes (its model and its OOF predictions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum FoldEpoch {
    /// The last epoch: a fixed epoch count, chosen by no fold's validation, so the
    /// out-of-fold figures are unbiased estimates for a model trained the same way.
    Last,
    /// Each fold's epoch with the best validation AUROC (as `train` keeps): the fold
    /// picks its epoch on the very images it is then scored on, so its figures are
    /// slightly optimistic.
    Best,
}

impl std::fmt::Display for FoldEpoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FoldEpoch::Last => "last",
            FoldEpoch::Best => "best",
        })
    }
}

/// One image's out-of-fold prediction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OofRow {
    /// Dataset name (see `data::dataset_name`).
    pub dataset: String,
    /// File name of the image.
    pub image: String,
    /// Path of the image.
    pub path: PathBuf,
    /// Patient id (namespaced by dataset when several are combined).
    pub patient: Option<String>,
    /// Ground truth.
    pub effusion: bool,
    /// The fold (1-based) that held it out: its model never trained on this image or on
    /// any image of its patient.
    pub fold: usize,
    /// That fold model's p_effusion (averaged over the views under flip TTA).
    pub p: f32,
    /// p_effusion after temperature scaling.
    pub p_calibrated: f32,
    /// The views' margins `logit_effusion - logit_nofinding` (see `calibration`).
    pub margins: Vec<f32>,
}

/// One fold's results.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FoldResult {
    /// 1-based.
    pub fold: usize,
    /// Validation images (the fold).
    pub images: usize,
    /// Of which effusion.
    pub effusion: usize,
    /// Patients in the fold.
    pub patients: usize,
    /// Training images (the other folds).
    pub train_images: usize,
    /// The epoch (1-based) whose weights and predictions the fold contributes.
    pub epoch_used: usize,
    /// The epoch with the best validation AUROC.
    pub best_epoch: usize,
    /// AUROC of the contributed predictions on the fold.
    pub auroc: Option<f64>,
    /// PR-AUC of them.
    pub pr_auc: Option<f64>,
    /// Recall at the pooled threshold.
    pub recall: f64,
    /// Precision at the pooled threshold.
    pub precision: f64,
    /// Validation AUROC at the last epoch.
    pub auroc_last_epoch: Option<f64>,
    /// Validation AUROC at the best epoch (optimistic: chosen on it).
    pub auroc_best_epoch: Option<f64>,
    /// Wall time of the fold's training.
    pub seconds: f64,
    /// The fold's per-epoch history.
    pub epochs: Vec<EpochRecord>,
}

/// The decision threshold and how it was chosen.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Threshold {
    /// The recall asked for.
    pub target_recall: f64,
    /// The OOF predictions it was chosen on: `all`, or a dataset's name.
    pub chosen_on: String,
    /// How many.
    pub images: usize,
    /// On p_calibrated: what a model with the temperature applied should use.
    pub calibrated: Option<f32>,
    /// The same operating point on the uncalibrated p (a model without temperature).
    pub uncalibrated: Option<f32>,
    /// OOF recall at `calibrated` on those images.
    pub recall: f64,
    /// OOF precision at `calibrated` on those images.
    pub precision: f64,
}

/// Calibration fitted on the OOF margins: a temperature and Platt scaling are both
/// fitted and reported; `method` says which one is applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The method applied (to `p_calibrated`, the threshold, and an exported graph).
    pub method: CalibrationMethod,
    /// The OOF predictions it was fitted on (and the ECEs and reliability below are
    /// of): `all`, or a dataset's name.
    pub fitted_on: String,
    /// How many.
    pub images: usize,
    /// The applied T: divide the margin (both logits) by it; 1 when no fit was possible.
    pub temperature: f64,
    /// The applied bias on the scaled margin (0 for `temperature`).
    pub bias: f64,
    /// The temperature-only fit (NLL before and after), `None` when impossible.
    pub fit: Option<TemperatureFit>,
    /// The Platt fit, `None` when impossible.
    pub platt: Option<PlattFit>,
    /// Pooled OOF ECE with the temperature alone.
    pub ece_temperature: Option<f64>,
    /// Pooled OOF ECE with Platt scaling.
    pub ece_platt: Option<f64>,
    /// Views per image it was fitted on: 1, or 2 under flip TTA (then p is the mean of
    /// the views' temperature-scaled probabilities).
    pub views: usize,
    /// Pooled OOF ECE at T = 1 (10 equal-width bins of p_effusion).
    pub ece_before: Option<f64>,
    /// Pooled OOF ECE with the applied method.
    pub ece_after: Option<f64>,
    /// The reliability diagram's data at T = 1.
    pub reliability_before: Vec<ReliabilityBin>,
    /// At the fitted T.
    pub reliability_after: Vec<ReliabilityBin>,
}

/// One dataset of the combined data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DatasetSummary {
    /// Its name.
    pub name: String,
    /// Images.
    pub images: usize,
    /// Effusion images.
    pub effusion: usize,
    /// Distinct patients (images without a patient id count one each).
    pub patients: usize,
    /// Images without a patient id.
    pub without_patient: usize,
}

/// Pooled OOF AUROC after each epoch (all folds' predictions of that epoch).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EpochPoint {
    /// 1-based.
    pub epoch: usize,
    /// Pooled over the folds.
    pub pooled_auroc: Option<f64>,
    /// Mean of the folds' AUROCs.
    pub mean_fold_auroc: Option<f64>,
}

/// Everything cross-validation measured (`cv.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CvResults {
    /// When it finished (RFC 3339).
    pub created_at: String,
    /// The training settings every fold used.
    pub settings: serde_json::Value,
    /// Folds.
    pub k: usize,
    /// Which epoch each fold contributes.
    pub fold_epoch: FoldEpoch,
    /// The resampling behind every interval.
    pub bootstrap: Bootstrap,
    /// Per dataset.
    pub data: Vec<DatasetSummary>,
    /// Per fold.
    pub folds: Vec<FoldResult>,
    /// Mean and SD of the folds' AUROCs.
    pub fold_auroc: MeanSd,
    /// Of their PR-AUCs.
    pub fold_pr_auc: MeanSd,
    /// Of their recalls at the pooled threshold.
    pub fold_recall: MeanSd,
    /// Of their precisions at the pooled threshold.
    pub fold_precision: MeanSd,
    /// The threshold, chosen on the pooled OOF predictions.
    pub threshold: Threshold,
    /// Pooled OOF figures over all images.
    pub overall: Figures,
    /// The same per dataset.
    pub per_dataset: Vec<Figures>,
    /// Temperature scaling.
    pub calibration: Calibration,
    /// Pooled OOF AUROC with every fold's last epoch.
    pub oof_auroc_last_epoch: Option<f64>,
    /// Pooled OOF AUROC with every fold's best epoch (optimistic).
    pub oof_auroc_best_epoch: Option<f64>,
    /// Pooled OOF AUROC after each epoch.
    pub epoch_curve: Vec<EpochPoint>,
    /// OOF ROC curve (all images, p_calibrated), `(fpr, tpr)`.
    pub roc: Vec<(f64, f64)>,
    /// OOF precision-recall curve, `(recall, precision)`.
    pub pr: Vec<(f64, f64)>,
    /// Per dataset: `(name, ROC curve)`.
    pub roc_per_dataset: Vec<(String, Vec<(f64, f64)>)>,
    /// Sum of the folds' training times.
    pub training_seconds: f64,
    /// Wall time of the whole cross-validation.
    pub wall_seconds: f64,
    /// Where it trained.
    pub device: String,
    /// Caveats.
    pub notes: Vec<String>,
    /// The lockbox's figures, when patients were held out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lockbox: Option<LockboxResults>,
    /// The served ensemble's own calibration and threshold, when a calibration
    /// holdout was set aside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ensemble_calibration: Option<EnsembleCalibration>,
}

/// One fold's trained model.
pub struct FoldModel {
    /// 1-based.
    pub fold: usize,
    /// The epoch (1-based) its weights are from.
    pub epoch: usize,
    /// The weights (batch-norm statistics recomputed on its training images).
    pub vs: nn::VarStore,
    /// The network on them.
    pub net: ResNet,
    /// Its shape.
    pub spec: ResNetSpec,
    /// `folds/fold-K.ot` in the output directory, when saved.
    pub path: Option<PathBuf>,
}

impl std::fmt::Debug for FoldModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FoldModel")
            .field("fold", &self.fold)
            .field("epoch", &self.epoch)
            .field("spec", &self.spec)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// What [`super::cross_validate`] returns.
#[derive(Debug)]
pub struct CvOutcome {
    /// Everything measured (also in `cv.json`).
    pub results: CvResults,
    /// Every image's OOF prediction, in dataset order (also `oof.csv`).
    pub oof: Vec<OofRow>,
    /// The K fold models, fold 1 first.
    pub models: Vec<FoldModel>,
    /// The lockbox scans, preprocessed (empty without a lockbox): an export can check
    /// its graph on exactly them.
    pub lockbox_inputs: Vec<Vec<f32>>,
    /// The output directory (`report.md`, `cv.json`, `oof.csv`, plots, `folds/`).
    pub dir: PathBuf,
    /// `dir/report.md`.
    pub report: PathBuf,
}

impl CvOutcome {
    /// The applied temperature (1 when none could be fitted).
    pub fn temperature(&self) -> f64 {
        self.results.calibration.temperature
    }

    /// The applied scaling of the OOF predictions (temperature and, with Platt, bias).
    pub fn scaling(&self) -> Scaling {
        Scaling {
            temperature: self.results.calibration.temperature,
            bias: self.results.calibration.bias,
        }
    }

    /// The scaling and threshold an exported ensemble serves with: the ensemble's own
    /// (from the calibration holdout) when there is one, else the OOF ones.
    pub fn served(&self) -> (Scaling, Option<f32>) {
        match &self.results.ensemble_calibration {
            Some(e) => (e.scaling, e.threshold),
            None => (self.scaling(), self.results.threshold.calibrated),
        }
    }

    /// Pooled OOF figures for one dataset, by name.
    pub fn dataset(&self, name: &str) -> Option<&Figures> {
        self.results.per_dataset.iter().find(|f| f.name == name)
    }

    /// Pooled OOF AUROC over all images, with its interval.
    pub fn auroc(&self) -> Estimate {
        self.results.overall.auroc
    }

    /// The manifest's record of the temperature (for an export that bakes it into
    /// the graph); `None` when no temperature could be fitted.
    pub fn calibration_record(&self) -> Option<CalibrationRecord> {
        if let Some(e) = &self.results.ensemble_calibration {
            match e.method {
                CalibrationMethod::Temperature => e.fit.map(|_| ())?,
                CalibrationMethod::Platt => e.platt.map(|_| ())?,
            }
            return Some(CalibrationRecord {
                method: e.method,
                bias: (e.method == CalibrationMethod::Platt).then_some(e.scaling.bias as f32),
                temperature: e.scaling.temperature as f32,
                fitted_on: format!(
                    "the ensemble's own predictions of a calibration holdout: {} images of {} ({} effusion) that no fold trained on",
                    e.images, e.dataset, e.effusion
                ),
                ece_before: e.ece_before?,
                ece_after: e.ece_after?,
                ece_bins: Some(crate::calibration::ECE_BINS as u32),
            });
        }
        let c = &self.results.calibration;
        match c.method {
            CalibrationMethod::Temperature => c.fit.map(|_| ())?,
            CalibrationMethod::Platt => c.platt.map(|_| ())?,
        }
        let names: Vec<&str> = self.results.data.iter().map(|d| d.name.as_str()).collect();
        Some(CalibrationRecord {
            method: c.method,
            bias: (c.method == CalibrationMethod::Platt).then_some(c.bias as f32),
            temperature: c.temperature as f32,
            fitted_on: format!(
                "out-of-fold predictions, {} folds, {} images ({}), {} epoch of each fold{}",
                self.results.k,
                c.images,
                if c.fitted_on == "all" {
                    names.join(", ")
                } else {
                    c.fitted_on.clone()
                },
                self.results.fold_epoch,
                if c.views > 1 { ", flip TTA" } else { "" }
            ),
            ece_before: c.ece_before?,
            ece_after: c.ece_after?,
            ece_bins: Some(crate::calibration::ECE_BINS as u32),
        })
    }
}

/// What the served ensemble is calibrated and thresholded with, when a calibration
/// holdout was set aside: fitted on the ensemble's own predictions of images none of
/// its members trained on, since averaging members pulls probabilities towards the
/// middle and a threshold chosen on one model's OOF predictions does not carry over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnsembleCalibration {
    /// The dataset the holdout was drawn from.
    pub dataset: String,
    /// Images in it.
    pub images: usize,
    /// Of which effusion.
    pub effusion: usize,
    /// The method applied.
    pub method: CalibrationMethod,
    /// The applied scaling.
    pub scaling: Scaling,
    /// The temperature-only fit.
    pub fit: Option<TemperatureFit>,
    /// The Platt fit.
    pub platt: Option<PlattFit>,
    /// ECE of the ensemble's unscaled p on the holdout.
    pub ece_before: Option<f64>,
    /// After scaling.
    pub ece_after: Option<f64>,
    /// The threshold on the scaled p reaching the target recall on the holdout.
    pub threshold: Option<f32>,
    /// Recall there.
    pub recall: f64,
    /// Precision there.
    pub precision: f64,
}

/// The lockbox's figures.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockboxResults {
    /// The dataset it was drawn from.
    pub dataset: String,
    /// The share asked for.
    pub fraction: f64,
    /// Seed of the split (`lockbox::LOCKBOX_SEED`).
    pub seed: u64,
    /// The ensemble (all fold models, views, scaling) at the pooled OOF threshold, with
    /// patient-level bootstrap intervals; `ece_before` is unscaled.
    pub ensemble: Figures,
    /// AUROC of each fold model alone (scaled, its views averaged): the ensemble's gain
    /// is the difference from their mean.
    pub member_auroc: Vec<Option<f64>>,
    /// Mean and SD of `member_auroc`.
    pub member_auroc_mean: MeanSd,
    /// Every lockbox image: `(file name, effusion, ensemble p_effusion)`.
    pub predictions: Vec<(String, bool, f32)>,
}
