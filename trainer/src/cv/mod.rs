//! Cross-validation: an honest estimate of how the training recipe does on patients it
//! has not seen, using every image for both training and measurement.
//!
//! `cross_validate` splits the (possibly combined) data into K patient-grouped,
//! stratified folds (`data::kfold`), trains K models with the settings of a normal run
//! (fold k validates on fold k and trains on the rest), and pools the out-of-fold (OOF)
//! predictions: each image scored once, by the one model that never saw its patient.
//! From the pooled predictions, never from one fold:
//!
//! - the **threshold** for the target recall (the same rule as `train`);
//! - **temperature scaling**, one T fitted on the OOF margins, with the ECE before and
//!   after;
//! - **figures with patient-level bootstrap intervals** over all images and per dataset
//!   (the fleet serves full-size scans, so a thumbnail-heavy pool must not speak for
//!   them).
//!
//! Which epoch a fold contributes is [`FoldEpoch`]: by default the last one (a fixed
//! epoch count, unbiased), or each fold's best by validation AUROC (what `train` keeps,
//! slightly optimistic since the fold scores the epoch it chose); both pooled AUROCs are
//! reported, and the pooled AUROC after every epoch shows whether fewer epochs would do.
//!
//! The K fold models are kept (in memory and as `folds/fold-K.ot`) so that an ensemble
//! of them can be exported with the fitted temperature and threshold.
//!
//! # Layout
//!
//! - `mod.rs`: [`CvConfig`], [`cross_validate`].
//! - `lockbox`: patients held out of every fold and scored once by the ensemble.
//! - `export`: the fold models as one servable ensemble graph.
//! - `outcome`: what it returns ([`CvOutcome`], [`CvResults`], [`OofRow`], ...).
//! - `stats`: figures with patient-level bootstrap intervals, mean and SD.
//! - `write`: `cv.json`, `oof.csv`, `report.md` and the plots.

pub mod export;
pub mod lockbox;
mod outcome;
mod stats;
#[cfg(test)]
mod tests;
mod write;

use std::collections::HashSet;
use std::time::Instant;

pub use export::export_ensemble;
pub use lockbox::LockboxSpec;
pub use outcome::{
    Calibration, CvOutcome, CvResults, DatasetSummary, EnsembleCalibration, EpochPoint, FoldEpoch,
    FoldModel, FoldResult, LockboxResults, OofRow, Threshold,
};
use stats::group_of;
pub use stats::{bootstrap, Bootstrap, Estimate, Figures, MeanSd, Scored};

use pleura::model::manifest::CalibrationMethod;

use crate::calibration::{self, Scaling};
use crate::data::{self, Sample};
use crate::metrics;
use crate::train::{self, TrainConfig, TrainError};

/// Default bootstrap resamples.
pub const DEFAULT_RESAMPLES: usize = 2000;

/// What a cross-validation is told.
#[derive(Debug, Clone)]
pub struct CvConfig {
    /// The settings every fold trains with (as `train` would), and: the datasets
    /// (`data`, `more_data`), the output directory (`out`, written directly), the seed
    /// (folds, bootstrap; fold k trains with seed + k - 1) and the target recall. Its
    /// validation fraction, version, checkpoint and export settings are not used.
    pub train: TrainConfig,
    /// Folds, at least 2.
    pub folds: usize,
    /// Which epoch a fold contributes.
    pub fold_epoch: FoldEpoch,
    /// Bootstrap resamples for the intervals; 0 for none.
    pub resamples: usize,
    /// Write each fold's weights to `out/folds/fold-K.ot`.
    pub save_models: bool,
    /// How the OOF predictions are calibrated: a temperature, or Platt (temperature
    /// and bias); both are fitted and reported, this one is applied.
    pub calibration: CalibrationMethod,
    /// Patients held out of every fold, scored once at the end by the ensemble.
    pub lockbox: Option<LockboxSpec>,
    /// Fit the calibration and choose the threshold on this dataset's OOF predictions
    /// only (the full-size scans the fleet serves, say) instead of all of them.
    pub calibrate_on: Option<String>,
    /// Hold this share of the `calibrate_on` dataset's patients (else the first
    /// dataset's) out of every fold too, and fit the served ensemble's calibration and
    /// threshold on the ensemble's own predictions of them.
    pub calibration_holdout: Option<f64>,
}

impl CvConfig {
    /// `folds` folds with `train`'s settings; last epoch, 2000 resamples, models saved.
    pub fn new(train: TrainConfig, folds: usize) -> CvConfig {
        CvConfig {
            train,
            folds,
            fold_epoch: FoldEpoch::Last,
            resamples: DEFAULT_RESAMPLES,
            save_models: true,
            calibration: CalibrationMethod::Temperature,
            lockbox: None,
            calibrate_on: None,
            calibration_holdout: None,
        }
    }
}

/// Runs the cross-validation `cfg` describes and writes its report to `cfg.train.out`.
pub fn cross_validate(cfg: &CvConfig) -> Result<CvOutcome, TrainError> {
    let started = Instant::now();
    let tc = &cfg.train;
    if cfg.folds < 2 {
        return Err(TrainError::Config("--folds must be at least 2".into()));
    }
    if tc.ablation.is_some() {
        return Err(TrainError::Config(
            "--ablation and --folds do not go together".into(),
        ));
    }
    // Before any data is read or any fold trains.
    crate::train_config::validate(tc)?;
    let dataset = data::scan_datasets(&tc.datasets())?;
    let (samples, lockbox_samples) = lockbox::hold_out(dataset.samples, cfg.lockbox.as_ref())?;
    if tc.progress && !lockbox_samples.is_empty() {
        eprintln!(
            "lockbox: {} images ({} effusion) of {} held out of every fold",
            lockbox_samples.len(),
            lockbox_samples.iter().filter(|s| s.effusion).count(),
            lockbox_samples[0].dataset
        );
    }
    let holdout_spec = cfg.calibration_holdout.map(|fraction| LockboxSpec {
        dataset: cfg.calibrate_on.clone(),
        fraction,
    });
    let (samples, holdout_samples) = lockbox::hold_out_with(
        samples,
        holdout_spec.as_ref(),
        lockbox::CALIBRATION_HOLDOUT_SEED,
        "--calibration-holdout",
    )?;
    if let Some(name) = &cfg.calibrate_on {
        let of: Vec<&Sample> = samples.iter().filter(|s| &s.dataset == name).collect();
        if !of.iter().any(|s| s.effusion) || of.iter().all(|s| s.effusion) {
            return Err(TrainError::Config(format!(
                "--calibrate-on {name}: no dataset of that name with both classes (outside the lockbox)"
            )));
        }
    }
    let folds = data::kfold(&samples, cfg.folds, tc.seed)?;

    let mut runs = Vec::with_capacity(cfg.folds);
    for k in 0..cfg.folds {
        let (train_set, val_set) = folds.train_val(&samples, k);
        if tc.progress {
            eprintln!(
                "fold {}/{}: training on {} images ({} effusion), validating on {} ({} effusion)",
                k + 1,
                cfg.folds,
                train_set.len(),
                train_set.iter().filter(|s| s.effusion).count(),
                val_set.len(),
                val_set.iter().filter(|s| s.effusion).count()
            );
        }
        let fold_cfg = TrainConfig {
            seed: tc.seed.wrapping_add(k as u64),
            ..tc.clone()
        };
        runs.push(train::train_fold(&fold_cfg, train_set, val_set)?);
    }

    // Validation lists are in sample order within each fold, so the j-th
    // prediction of fold k is the j-th sample with fold_of == k.
    let members: Vec<Vec<usize>> = (0..cfg.folds)
        .map(|k| {
            (0..samples.len())
                .filter(|&i| folds.fold_of[i] == k)
                .collect()
        })
        .collect();
    let used_epoch = |r: &train::FoldRun| match cfg.fold_epoch {
        FoldEpoch::Last => r.records.len(),
        FoldEpoch::Best => r.best_epoch,
    };
    let n = samples.len();
    let per_fold = |pick: &dyn Fn(&train::FoldRun) -> usize| -> Vec<Vec<f32>> {
        runs.iter()
            .map(|r| r.epoch_scores[pick(r) - 1].clone())
            .collect()
    };
    let p = pool(&members, &per_fold(&used_epoch), f32::NAN);
    let fold_margins: Vec<Vec<Vec<f32>>> = runs
        .iter()
        .map(|r| {
            let views = &r.epoch_margins[used_epoch(r) - 1];
            let len = views.first().map_or(0, Vec::len);
            (0..len)
                .map(|j| views.iter().map(|v| v[j]).collect())
                .collect()
        })
        .collect();
    let margins = pool(&members, &fold_margins, Vec::new());
    let positives: Vec<bool> = samples.iter().map(|s| s.effusion).collect();

    // The images the calibration is fitted and the threshold chosen on.
    let fit_idx: Vec<usize> = match &cfg.calibrate_on {
        None => (0..n).collect(),
        Some(name) => (0..n).filter(|&i| &samples[i].dataset == name).collect(),
    };
    let on_fit = |v: &[f32]| -> Vec<f32> { fit_idx.iter().map(|&i| v[i]).collect() };
    let fit_margins: Vec<Vec<f32>> = fit_idx.iter().map(|&i| margins[i].clone()).collect();
    let fit_positives: Vec<bool> = fit_idx.iter().map(|&i| positives[i]).collect();
    let fit = calibration::fit_temperature(&fit_margins, &fit_positives);
    let temperature = fit.map_or(1.0, |f| f.temperature);
    let platt = calibration::fit_platt(&fit_margins, &fit_positives);
    let scaled = |s: Scaling| -> Vec<f32> {
        margins
            .iter()
            .map(|m| calibration::scaled_p(m, s))
            .collect()
    };
    let t_only = Scaling {
        temperature,
        bias: 0.0,
    };
    let applied = applied_scaling(cfg.calibration, fit, platt);
    let p_cal = scaled(applied);
    let chosen = metrics::threshold_for_recall(&on_fit(&p_cal), &fit_positives, tc.target_recall);
    let chosen_raw = metrics::threshold_for_recall(&on_fit(&p), &fit_positives, tc.target_recall);
    // Nothing flagged is the honest reading of "no threshold reaches the target".
    let threshold_value = chosen.map_or(f32::INFINITY, |c| c.threshold);
    let calibration_out = Calibration {
        method: cfg.calibration,
        temperature: applied.temperature,
        bias: applied.bias,
        fit,
        platt,
        fitted_on: cfg.calibrate_on.clone().unwrap_or_else(|| "all".into()),
        images: fit_idx.len(),
        ece_temperature: calibration::ece(&on_fit(&scaled(t_only)), &fit_positives),
        ece_platt: platt
            .and_then(|f| calibration::ece(&on_fit(&scaled(f.scaling)), &fit_positives)),
        views: margins.first().map_or(1, Vec::len),
        ece_before: calibration::ece(&on_fit(&p), &fit_positives),
        ece_after: calibration::ece(&on_fit(&p_cal), &fit_positives),
        reliability_before: calibration::reliability(
            &on_fit(&p),
            &fit_positives,
            calibration::ECE_BINS,
        ),
        reliability_after: calibration::reliability(
            &on_fit(&p_cal),
            &fit_positives,
            calibration::ECE_BINS,
        ),
    };

    let groups: Vec<String> = samples.iter().map(group_of).collect();
    let scored = Scored {
        p: &p,
        p_calibrated: &p_cal,
        positives: &positives,
        groups: &groups,
    };
    let boot = Bootstrap {
        resamples: cfg.resamples,
        seed: tc.seed,
    };
    let everything: Vec<usize> = (0..n).collect();
    let overall = stats::figures("all", &scored, &everything, threshold_value, boot);
    let names = dataset_names(&samples);
    let per_dataset: Vec<Figures> = names
        .iter()
        .map(|name| {
            let subset: Vec<usize> = (0..n).filter(|&i| &samples[i].dataset == name).collect();
            stats::figures(name, &scored, &subset, threshold_value, boot)
        })
        .collect();

    let fold_results: Vec<FoldResult> = runs
        .iter()
        .enumerate()
        .map(|(k, run)| {
            let idx = &members[k];
            let pc: Vec<f32> = idx.iter().map(|&i| p_cal[i]).collect();
            let y: Vec<bool> = idx.iter().map(|&i| positives[i]).collect();
            let c = metrics::Confusion::at(&pc, &y, threshold_value);
            let epoch_auroc = |e: usize| run.records.get(e - 1).and_then(|r| r.val_auroc);
            FoldResult {
                fold: k + 1,
                images: idx.len(),
                effusion: folds.summary[k].effusion,
                patients: folds.summary[k].patients,
                train_images: n - idx.len(),
                epoch_used: used_epoch(run),
                best_epoch: run.best_epoch,
                auroc: metrics::auroc(&pc, &y),
                pr_auc: metrics::pr_auc(&pc, &y),
                recall: c.recall(),
                precision: c.precision(),
                auroc_last_epoch: epoch_auroc(run.records.len()),
                auroc_best_epoch: epoch_auroc(run.best_epoch),
                seconds: run.seconds,
                epochs: run.records.clone(),
            }
        })
        .collect();

    let pooled_at = |pick: &dyn Fn(&train::FoldRun) -> usize| {
        metrics::auroc(&pool(&members, &per_fold(pick), f32::NAN), &positives)
    };
    let epochs = runs.iter().map(|r| r.records.len()).min().unwrap_or(0);
    let epoch_curve: Vec<EpochPoint> = (1..=epochs)
        .map(|e| EpochPoint {
            epoch: e,
            pooled_auroc: pooled_at(&|_| e),
            mean_fold_auroc: MeanSd::of(runs.iter().map(|r| r.records[e - 1].val_auroc)).mean,
        })
        .collect();

    let mut notes = caveats(cfg, &folds, &overall, &calibration_out, &per_dataset);
    if chosen.is_none() {
        notes.push(format!(
            "No threshold reaches recall {} on the pooled OOF predictions ({}): nothing is flagged at the reported operating point.",
            tc.target_recall, calibration_out.fitted_on
        ));
    }
    let results = CvResults {
        created_at: pleura::time::now_rfc3339_seconds(),
        settings: serde_json::to_value(tc).expect("config serialises"),
        k: cfg.folds,
        fold_epoch: cfg.fold_epoch,
        bootstrap: boot,
        data: summarise(&samples, &names),
        fold_auroc: MeanSd::of(fold_results.iter().map(|f| f.auroc)),
        fold_pr_auc: MeanSd::of(fold_results.iter().map(|f| f.pr_auc)),
        fold_recall: MeanSd::of(fold_results.iter().map(|f| Some(f.recall))),
        fold_precision: MeanSd::of(fold_results.iter().map(|f| Some(f.precision))),
        folds: fold_results,
        threshold: Threshold {
            target_recall: tc.target_recall,
            chosen_on: calibration_out.fitted_on.clone(),
            images: fit_idx.len(),
            calibrated: chosen.map(|c| c.threshold),
            uncalibrated: chosen_raw.map(|c| c.threshold),
            recall: chosen.map_or(0.0, |c| c.recall),
            precision: chosen.map_or(0.0, |c| c.precision),
        },
        roc: metrics::roc_curve(&p_cal, &positives),
        pr: metrics::pr_curve(&p_cal, &positives),
        roc_per_dataset: names
            .iter()
            .map(|name| {
                let idx: Vec<usize> = (0..n).filter(|&i| &samples[i].dataset == name).collect();
                let s: Vec<f32> = idx.iter().map(|&i| p_cal[i]).collect();
                let y: Vec<bool> = idx.iter().map(|&i| positives[i]).collect();
                (name.clone(), metrics::roc_curve(&s, &y))
            })
            .collect(),
        overall,
        per_dataset,
        calibration: calibration_out,
        oof_auroc_last_epoch: pooled_at(&|r| r.records.len()),
        oof_auroc_best_epoch: pooled_at(&|r| r.best_epoch),
        epoch_curve,
        training_seconds: runs.iter().map(|r| r.seconds).sum(),
        wall_seconds: 0.0,
        device: runs.first().map(|r| r.device.clone()).unwrap_or_default(),
        notes,
        lockbox: None,
        ensemble_calibration: None,
    };

    let oof: Vec<OofRow> = samples
        .iter()
        .enumerate()
        .map(|(i, s)| OofRow {
            dataset: s.dataset.clone(),
            image: s
                .path
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            path: s.path.clone(),
            patient: s.patient.clone(),
            effusion: s.effusion,
            fold: folds.fold_of[i] + 1,
            p: p[i],
            p_calibrated: p_cal[i],
            margins: margins[i].clone(),
        })
        .collect();

    let dir = tc.out.clone();
    let models: Vec<FoldModel> = runs
        .into_iter()
        .enumerate()
        .map(|(k, run)| {
            let epoch = used_epoch(&run);
            let (vs, net) = match cfg.fold_epoch {
                FoldEpoch::Last => run.last,
                FoldEpoch::Best => run.best,
            };
            FoldModel {
                fold: k + 1,
                epoch,
                vs,
                net,
                spec: run.spec,
                path: cfg
                    .save_models
                    .then(|| dir.join("folds").join(format!("fold-{}.ot", k + 1))),
            }
        })
        .collect();
    let mut results = results;
    if let Some(first) = holdout_samples.first() {
        let inputs = lockbox::load(&holdout_samples, tc.image_size, tc.loader_threads)?;
        let views = lockbox::ensemble_views(
            &lockbox::margins(&models, &inputs, tc.recipe.tta_flip)?,
            holdout_samples.len(),
        );
        let y: Vec<bool> = holdout_samples.iter().map(|s| s.effusion).collect();
        let fit = calibration::fit_temperature(&views, &y);
        let platt = calibration::fit_platt(&views, &y);
        let scaling = applied_scaling(cfg.calibration, fit, platt);
        let p_raw: Vec<f32> = views
            .iter()
            .map(|v| calibration::calibrated_p(v, 1.0))
            .collect();
        let p: Vec<f32> = views
            .iter()
            .map(|v| calibration::scaled_p(v, scaling))
            .collect();
        let chosen = metrics::threshold_for_recall(&p, &y, tc.target_recall);
        results.notes.push(format!(
            "The served ensemble is calibrated and thresholded on its own predictions of a calibration holdout ({} images of {}, {} effusion, held out of every fold): a threshold from one model's OOF predictions does not carry over to an average of several. So few images make its threshold coarse.",
            holdout_samples.len(),
            first.dataset,
            y.iter().filter(|&&b| b).count()
        ));
        results.ensemble_calibration = Some(EnsembleCalibration {
            dataset: first.dataset.clone(),
            images: holdout_samples.len(),
            effusion: y.iter().filter(|&&b| b).count(),
            method: cfg.calibration,
            scaling,
            fit,
            platt,
            ece_before: calibration::ece(&p_raw, &y),
            ece_after: calibration::ece(&p, &y),
            threshold: chosen.map(|c| c.threshold),
            recall: chosen.map_or(0.0, |c| c.recall),
            precision: chosen.map_or(0.0, |c| c.precision),
        });
    }
    let (served_scaling, served_threshold) = match &results.ensemble_calibration {
        Some(e) => (e.scaling, e.threshold.unwrap_or(f32::INFINITY)),
        None => (applied, threshold_value),
    };
    let mut lockbox_inputs = Vec::new();
    if let (Some(spec), Some(first)) = (&cfg.lockbox, lockbox_samples.first()) {
        lockbox_inputs = lockbox::load(&lockbox_samples, tc.image_size, tc.loader_threads)?;
        let lb = lockbox::evaluate(
            spec,
            &first.dataset,
            &lockbox_samples,
            &lockbox_inputs,
            &models,
            tc.recipe.tta_flip,
            served_scaling,
            served_threshold,
            boot,
        )?;
        results.notes.push(format!(
            "The lockbox ({} images of {}, {} effusion) was held out of every fold with a fixed seed and scored once by the ensemble: the threshold, the calibration and the recipe's settings were chosen without it.",
            lb.ensemble.images, lb.dataset, lb.ensemble.effusion
        ));
        results.lockbox = Some(lb);
    }
    let mut outcome = CvOutcome {
        results,
        oof,
        models,
        lockbox_inputs,
        report: dir.join("report.md"),
        dir,
    };
    outcome.results.wall_seconds = started.elapsed().as_secs_f64();
    write::write_all(&outcome).map_err(|e| TrainError::Report(e.to_string()))?;
    Ok(outcome)
}

/// Out-of-fold values in sample order: `members[k]` lists the samples of fold k
/// (in order), and `per_fold[k][j]` is the value for its j-th; samples in no fold
/// get `fill`.
pub(crate) fn pool<T: Clone>(members: &[Vec<usize>], per_fold: &[Vec<T>], fill: T) -> Vec<T> {
    let n = members.iter().flatten().max().map_or(0, |&i| i + 1);
    let mut out = vec![fill; n];
    for (idx, values) in members.iter().zip(per_fold) {
        assert_eq!(idx.len(), values.len(), "a value per fold member");
        for (&i, v) in idx.iter().zip(values) {
            out[i] = v.clone();
        }
    }
    out
}

/// The scaling `method` applies, from its fit (no change when the fit was impossible).
fn applied_scaling(
    method: CalibrationMethod,
    fit: Option<calibration::TemperatureFit>,
    platt: Option<calibration::PlattFit>,
) -> Scaling {
    match method {
        CalibrationMethod::Temperature => Scaling {
            temperature: fit.map_or(1.0, |f| f.temperature),
            bias: 0.0,
        },
        CalibrationMethod::Platt => platt.map_or(Scaling::IDENTITY, |f| f.scaling),
    }
}

/// Dataset names in order of first appearance.
fn dataset_names(samples: &[Sample]) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for s in samples {
        if !names.contains(&s.dataset) {
            names.push(s.dataset.clone());
        }
    }
    names
}

fn summarise(samples: &[Sample], names: &[String]) -> Vec<DatasetSummary> {
    names
        .iter()
        .map(|name| {
            let of: Vec<&Sample> = samples.iter().filter(|s| &s.dataset == name).collect();
            let patients: HashSet<String> = of.iter().map(|s| group_of(s)).collect();
            DatasetSummary {
                name: name.clone(),
                images: of.len(),
                effusion: of.iter().filter(|s| s.effusion).count(),
                patients: patients.len(),
                without_patient: of.iter().filter(|s| s.patient.is_none()).count(),
            }
        })
        .collect()
}

/// What a reader of the figures must keep in mind.
fn caveats(
    cfg: &CvConfig,
    folds: &data::Folds,
    overall: &Figures,
    cal: &Calibration,
    per_dataset: &[Figures],
) -> Vec<String> {
    let mut notes = vec![match cfg.fold_epoch {
        FoldEpoch::Last => "Each fold contributes its last epoch (a fixed epoch count): no fold's validation chose anything, so the OOF figures estimate a model trained the same way on patients it has not seen.".to_string(),
        FoldEpoch::Best => "Each fold contributes its epoch with the best validation AUROC, chosen on the same images it is scored on: the OOF figures are slightly optimistic (compare the pooled AUROC with every fold's last epoch).".to_string(),
    }];
    notes.push(
        "The threshold and the temperature are fitted on the same pooled OOF predictions they are measured on: one number each over all images, so the optimism is small, but it is not zero.".into(),
    );
    notes.push(
        "Intervals are patient-level bootstrap percentiles at a fixed threshold; they do not include the variation of re-training or of re-choosing the threshold.".into(),
    );
    notes.push(
        "An ensemble of the fold models averages several models' probabilities, which are less extreme than one model's: its recall at this threshold and its calibration should be checked on new data.".into(),
    );
    if folds.without_patient > 0 {
        notes.push(format!(
            "{} images have no patient id and were placed on their own; if they share patients, the figures are optimistic.",
            folds.without_patient
        ));
    }
    if overall.effusion < 100 {
        notes.push(format!(
            "The pooled figures rest on {} effusion images: wide intervals.",
            overall.effusion
        ));
    }
    for f in per_dataset.iter().filter(|f| f.effusion < 30) {
        notes.push(format!(
            "Dataset {} has {} effusion images: its recall moves {:.1} points per image.",
            f.name,
            f.effusion,
            100.0 / f.effusion.max(1) as f64
        ));
    }
    if let (Some(before), Some(after)) = (cal.ece_before, cal.ece_temperature) {
        if after >= before {
            notes.push(format!(
                "Temperature scaling alone lowered the NLL but not the ECE ({before:.3} -> {after:.3}): the probabilities are shifted (class weights move p towards effusion), which one temperature cannot fix; Platt scaling (`--calibration platt`, a bias as well) can{}.",
                cal.ece_platt.map_or(String::new(), |e| format!(" (ECE {e:.3})"))
            ));
        }
    }
    notes.push(
        "ECE is biased upwards on small sets (few images per bin), so its per-dataset values and intervals are indicative.".into(),
    );
    if cal.fit.is_some_and(|f| f.at_bound) {
        notes.push(
            "The temperature sits on its search bound: the OOF predictions are nearly constant or perfectly separated, and T means little.".into(),
        );
    }
    notes
}
