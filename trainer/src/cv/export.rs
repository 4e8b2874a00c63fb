//! The servable model of a cross-validation: the K fold models as one ensemble graph,
//! with the fitted calibration and the pooled out-of-fold threshold, through the
//! shared writer and its parity check.
//!
//! The manifest says what the model is and how well it should do:
//!
//! - `metrics.auroc` and `metrics.at_chosen` (what the promotion gate reads) are the
//!   lockbox's, the ensemble on patients no part of the recipe saw; without a lockbox
//!   they are the pooled OOF figures of the first dataset (the one the fleet serves),
//!   and `metrics.measured_on` says which;
//! - `metrics.cv` holds the pooled OOF figures with their intervals, overall and per
//!   dataset, and the fold mean ± SD;
//! - `training` records the settings, the folds, the threshold rule, the lockbox, and
//!   a fingerprint of every image used (file names and labels) per dataset;
//!   `training.data.fingerprint` names the set `metrics` were measured on, so the gate
//!   compares two models only when they were measured on the same images.

use std::path::Path;

use serde_json::json;
use tch::nn;

use super::outcome::CvOutcome;
use super::{lockbox, CvConfig, Figures};
use crate::data::{self, Sample};
use crate::export::{self, EnsembleExportRequest, Exported};
use crate::train::TrainError;

/// Parity inputs when there is no lockbox: this many OOF images.
const PARITY_IMAGES: usize = 8;

/// Exports the fold models of `o` as one graph in `out/<version>/` (see the module
/// docs). Fails when no threshold reached the target recall, or no calibration could be
/// fitted, rather than serving a model whose operating point is unknown.
pub fn export_ensemble(
    cfg: &CvConfig,
    o: &CvOutcome,
    out: &Path,
    version: Option<String>,
) -> Result<Exported, TrainError> {
    let r = &o.results;
    let threshold = o.served().1.filter(|t| *t > 0.0 && *t < 1.0).ok_or_else(|| {
        TrainError::Config(format!(
            "no threshold in (0, 1) reaches recall {} on the predictions it is chosen on: nothing to serve",
            r.threshold.target_recall
        ))
    })?;
    let calibration = o.calibration_record().ok_or_else(|| {
        TrainError::Config("no calibration could be fitted on the OOF predictions".into())
    })?;
    let spec = &o
        .models
        .first()
        .ok_or_else(|| TrainError::Config("no fold models to export".into()))?
        .spec;
    let members: Vec<&nn::VarStore> = o.models.iter().map(|m| &m.vs).collect();

    let parity_inputs = if o.lockbox_inputs.is_empty() {
        let first: Vec<Sample> = o
            .oof
            .iter()
            .take(PARITY_IMAGES)
            .map(|row| Sample {
                path: row.path.clone(),
                effusion: row.effusion,
                patient: row.patient.clone(),
                dataset: row.dataset.clone(),
            })
            .collect();
        lockbox::load(&first, cfg.train.image_size, cfg.train.loader_threads)?
    } else {
        o.lockbox_inputs.clone()
    };

    let (measured_on, headline, fingerprint) = match &r.lockbox {
        Some(lb) => {
            let names: Vec<Sample> = lb
                .predictions
                .iter()
                .map(|(image, effusion, _)| Sample {
                    path: image.into(),
                    effusion: *effusion,
                    patient: None,
                    dataset: lb.dataset.clone(),
                })
                .collect();
            (
                format!("lockbox of {}", lb.dataset),
                &lb.ensemble,
                data::fingerprint(&names),
            )
        }
        None => {
            let first = r.per_dataset.first().unwrap_or(&r.overall);
            (
                format!("pooled out-of-fold predictions of {}", first.name),
                first,
                data::fingerprint(&oof_samples(o, Some(&first.name))),
            )
        }
    };
    let metrics = json!({
        "measured_on": measured_on,
        "auroc": headline.auroc.value,
        "pr_auc": headline.pr_auc.value,
        "at_chosen": {
            "threshold": threshold,
            "recall": headline.recall.value,
            "precision": headline.precision.value,
            "specificity": headline.specificity.value,
        },
        "ece": headline.ece_after.value,
        "intervals": figures_json(headline),
        "lockbox": r.lockbox.as_ref().map(|lb| json!({
            "dataset": lb.dataset,
            "fraction": lb.fraction,
            "seed": lb.seed,
            "figures": figures_json(&lb.ensemble),
            "member_auroc": lb.member_auroc,
        })),
        "cv": {
            "k": r.k,
            "fold_epoch": r.fold_epoch,
            "overall": figures_json(&r.overall),
            "per_dataset": r.per_dataset.iter().map(figures_json).collect::<Vec<_>>(),
            "fold_auroc": r.fold_auroc,
            "fold_pr_auc": r.fold_pr_auc,
            "bootstrap": r.bootstrap,
        },
    });
    let datasets: Vec<serde_json::Value> = r
        .data
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "images": d.images,
                "effusion": d.effusion,
                "patients": d.patients,
                "fingerprint": data::fingerprint(&oof_samples(o, Some(&d.name))),
            })
        })
        .collect();
    let training = json!({
        "kind": "cross-validated ensemble",
        "settings": r.settings,
        "folds": r.k,
        "fold_epoch": r.fold_epoch,
        "fold_epochs_used": r.folds.iter().map(|f| f.epoch_used).collect::<Vec<_>>(),
        "threshold_rule": match &r.ensemble_calibration {
            Some(e) => format!(
                "the highest threshold reaching recall {} on the ensemble's calibrated p of its calibration holdout ({} images of {}, {} effusion)",
                r.threshold.target_recall, e.images, e.dataset, e.effusion
            ),
            None => format!(
                "the highest threshold reaching recall {} on the pooled out-of-fold p_calibrated of {} ({} images)",
                r.threshold.target_recall, r.threshold.chosen_on, r.threshold.images
            ),
        },
        "calibration_holdout": r.ensemble_calibration,
        "data": {
            "fingerprint": fingerprint,
            "measured_on": measured_on,
            "datasets": datasets,
            "trained_on_fingerprint": data::fingerprint(&oof_samples(o, None)),
        },
        "lockbox": r.lockbox.as_ref().map(|lb| json!({
            "dataset": lb.dataset,
            "fraction": lb.fraction,
            "seed": lb.seed,
            "images": lb.ensemble.images,
            "effusion": lb.ensemble.effusion,
        })),
        "device": r.device,
        "training_seconds": r.training_seconds,
        "code_revision": export::code_revision(),
    });
    let req = EnsembleExportRequest {
        spec,
        members: &members,
        tta_flip: cfg.train.recipe.tta_flip,
        temperature: calibration.temperature,
        calibration: Some(calibration),
        threshold,
        metrics,
        training,
        parity_inputs: &parity_inputs,
        version,
    };
    Ok(export::export_ensemble(&req, out)?)
}

/// The OOF images (of one dataset, or all) as samples, for fingerprints.
fn oof_samples(o: &CvOutcome, dataset: Option<&str>) -> Vec<Sample> {
    o.oof
        .iter()
        .filter(|row| dataset.is_none_or(|d| row.dataset == d))
        .map(|row| Sample {
            path: row.path.clone(),
            effusion: row.effusion,
            patient: row.patient.clone(),
            dataset: row.dataset.clone(),
        })
        .collect()
}

fn figures_json(f: &Figures) -> serde_json::Value {
    json!({
        "name": f.name,
        "images": f.images,
        "effusion": f.effusion,
        "patients": f.patients,
        "auroc": f.auroc,
        "pr_auc": f.pr_auc,
        "recall": f.recall,
        "precision": f.precision,
        "specificity": f.specificity,
        "ece": f.ece_after,
        "ece_unscaled": f.ece_before,
    })
}
