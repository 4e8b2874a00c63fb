//! The lockbox: patients held out of the whole cross-validation, scored once at the end
//! by the ensemble of the fold models, calibrated as it will be served.
//!
//! Why: cross-validation is honest about one recipe, but a recipe chosen because its
//! cross-validated AUROC was the best of several trials is flattered by that choice
//! (the winner of many noisy comparisons is partly luck). The lockbox patients are taken
//! out before any fold is made, with a seed of their own ([`LOCKBOX_SEED`], not
//! `--seed`), so every trial and the recommended recipe hold out the same patients and
//! none of them ever trains, chooses an epoch, a threshold or a temperature. Their
//! figures are the estimate for scans the served model has never seen.
//!
//! What is scored is what the fleet serves: every fold model on the image (and its
//! mirror under flip TTA), each view's margin scaled as the exported graph scales it,
//! and the probabilities averaged; the export's parity check then runs these same scans
//! through tract.

use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

use pleura::scan::Limits;

use super::outcome::{FoldModel, LockboxResults};
use super::stats::{self, Bootstrap, MeanSd, Scored};
use crate::calibration::{self, Scaling};
use crate::data::{self, Dataset, Loader, Sample};
use crate::metrics;
use crate::recipe;
use crate::train::TrainError;

/// Seed of the lockbox split: fixed, so that every run holds out the same patients.
pub const LOCKBOX_SEED: u64 = 0x4c4f_434b;
/// Seed of the calibration holdout's split (see `CvConfig::calibration_holdout`).
pub const CALIBRATION_HOLDOUT_SEED: u64 = 0x4341_4c42;

/// Which patients to hold out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LockboxSpec {
    /// The dataset whose patients are held out (by name, see `data::dataset_name`);
    /// `None` takes the first one given. It should be what the fleet serves.
    pub dataset: Option<String>,
    /// Share of that dataset's images, by whole patients, stratified; in (0, 1).
    pub fraction: f64,
}

/// Splits `samples` into those cross-validation may use and the lockbox (both in
/// sample order), with [`LOCKBOX_SEED`]. `spec = None` holds nothing out.
pub fn hold_out(
    samples: Vec<Sample>,
    spec: Option<&LockboxSpec>,
) -> Result<(Vec<Sample>, Vec<Sample>), TrainError> {
    hold_out_with(samples, spec, LOCKBOX_SEED, "--lockbox")
}

/// [`hold_out`] with another seed; `flag` names the setting in errors.
pub fn hold_out_with(
    samples: Vec<Sample>,
    spec: Option<&LockboxSpec>,
    seed: u64,
    flag: &str,
) -> Result<(Vec<Sample>, Vec<Sample>), TrainError> {
    let Some(spec) = spec else {
        return Ok((samples, Vec::new()));
    };
    if !(spec.fraction > 0.0 && spec.fraction < 1.0) {
        return Err(TrainError::Config(format!(
            "{flag} {} must lie strictly between 0 and 1",
            spec.fraction
        )));
    }
    let name = match &spec.dataset {
        Some(n) => n.clone(),
        None => samples
            .first()
            .map(|s| s.dataset.clone())
            .unwrap_or_default(),
    };
    let of: Vec<Sample> = samples
        .iter()
        .filter(|s| s.dataset == name)
        .cloned()
        .collect();
    if of.is_empty() {
        return Err(TrainError::Config(format!(
            "{flag}: no dataset named {name} (names are the --data folders' names)"
        )));
    }
    let held = data::split(
        &Dataset {
            root: Default::default(),
            samples: of,
        },
        spec.fraction,
        seed,
    )
    .val;
    if !held.iter().any(|s| s.effusion) || held.iter().all(|s| s.effusion) {
        return Err(TrainError::Config(format!(
            "{flag} {} of {name} leaves the held-out images without both classes",
            spec.fraction
        )));
    }
    let (kept, lockbox): (Vec<Sample>, Vec<Sample>) =
        samples.into_iter().partition(|s| !held.contains(s));
    Ok((kept, lockbox))
}

/// Decodes and preprocesses `samples` at `size`, exactly as training and serving do.
pub fn load(samples: &[Sample], size: u32, threads: usize) -> Result<Vec<Vec<f32>>, TrainError> {
    let loader = Loader::new(samples.to_vec(), size, Limits::default(), threads.max(1), 1);
    loader.preload()?;
    Ok((0..loader.len())
        .map(|i| loader.cache().get(i).expect("preloaded").to_vec())
        .collect())
}

/// Each model's margins on `inputs`: `[model][view][image]`.
pub fn margins(
    models: &[FoldModel],
    inputs: &[Vec<f32>],
    tta_flip: bool,
) -> Result<Vec<Vec<Vec<f32>>>, TrainError> {
    let mut out = Vec::with_capacity(models.len());
    for m in models {
        let device = m.vs.device();
        let s = i64::from(m.spec.image_size);
        let mut views: Vec<Vec<f32>> = Vec::new();
        for chunk in inputs.chunks(32) {
            let xs = Tensor::f_from_slice(&chunk.concat())?
                .f_view([chunk.len() as i64, 1, s, s])?
                .f_to_device(device)?;
            let v = tch::no_grad(|| recipe::eval_views(&m.net, &xs, tta_flip));
            views.resize_with(v.margins.len(), Vec::new);
            for (all, view) in views.iter_mut().zip(&v.margins) {
                all.extend(Vec::<f32>::try_from(&view.to_device(Device::Cpu))?);
            }
        }
        out.push(views);
    }
    Ok(out)
}

/// Image i's margins over every model and view (`per_model` as [`margins`] gives it):
/// what the ensemble graph averages over.
pub fn ensemble_views(per_model: &[Vec<Vec<f32>>], n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|i| {
            per_model
                .iter()
                .flat_map(|views| views.iter().map(move |v| v[i]))
                .collect()
        })
        .collect()
}

/// Scores the lockbox with the ensemble of `models` (see the module docs).
#[allow(clippy::too_many_arguments)]
pub fn evaluate(
    spec: &LockboxSpec,
    dataset: &str,
    lockbox: &[Sample],
    inputs: &[Vec<f32>],
    models: &[FoldModel],
    tta_flip: bool,
    scaling: Scaling,
    threshold: f32,
    boot: Bootstrap,
) -> Result<LockboxResults, TrainError> {
    let per_model = margins(models, inputs, tta_flip)?;
    let n = lockbox.len();
    let all_views = ensemble_views(&per_model, n);
    let p: Vec<f32> = all_views
        .iter()
        .map(|v| calibration::calibrated_p(v, 1.0))
        .collect();
    let p_cal: Vec<f32> = all_views
        .iter()
        .map(|v| calibration::scaled_p(v, scaling))
        .collect();
    let positives: Vec<bool> = lockbox.iter().map(|s| s.effusion).collect();
    let groups: Vec<String> = lockbox.iter().map(stats::group_of).collect();
    let scored = Scored {
        p: &p,
        p_calibrated: &p_cal,
        positives: &positives,
        groups: &groups,
    };
    let all: Vec<usize> = (0..n).collect();
    let ensemble = stats::figures("lockbox", &scored, &all, threshold, boot);
    let member_auroc: Vec<Option<f64>> = per_model
        .iter()
        .map(|views| {
            let pm: Vec<f32> = (0..n)
                .map(|i| {
                    let v: Vec<f32> = views.iter().map(|view| view[i]).collect();
                    calibration::scaled_p(&v, scaling)
                })
                .collect();
            metrics::auroc(&pm, &positives)
        })
        .collect();
    Ok(LockboxResults {
        dataset: dataset.to_string(),
        fraction: spec.fraction,
        seed: LOCKBOX_SEED,
        ensemble,
        member_auroc_mean: MeanSd::of(member_auroc.iter().copied()),
        member_auroc,
        predictions: lockbox
            .iter()
            .zip(&p_cal)
            .map(|(s, &p)| {
                (
                    s.path
                        .file_name()
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                    s.effusion,
                    p,
                )
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    /// `n` images of `dataset`, two per patient, every third patient with effusion.
    fn samples(dataset: &str, n: usize) -> Vec<Sample> {
        (0..n)
            .map(|i| Sample {
                path: format!("/{dataset}/{i:03}.png").into(),
                effusion: (i / 2) % 3 == 0,
                patient: Some(format!("{dataset}:{}", i / 2)),
                dataset: dataset.into(),
            })
            .collect()
    }

    fn spec(dataset: Option<&str>, fraction: f64) -> LockboxSpec {
        LockboxSpec {
            dataset: dataset.map(Into::into),
            fraction,
        }
    }

    #[test]
    fn whole_patients_of_one_dataset_are_held_out_the_same_way_every_time() {
        let mut all = samples("full", 60);
        all.extend(samples("thumbs", 200));
        let (kept, held) = hold_out(all.clone(), Some(&spec(None, 0.3))).unwrap();
        assert_eq!(kept.len() + held.len(), all.len());
        assert!(
            held.iter().all(|s| s.dataset == "full"),
            "the first dataset"
        );
        assert!((15..=21).contains(&held.len()), "about 30%: {}", held.len());
        assert!(held.iter().any(|s| s.effusion) && held.iter().any(|s| !s.effusion));
        let kept_patients: HashSet<_> = kept.iter().map(|s| s.patient.clone()).collect();
        assert!(
            held.iter().all(|s| !kept_patients.contains(&s.patient)),
            "no patient on both sides"
        );
        // Fixed: the same patients whatever else changes, so trials never see them.
        assert_eq!(
            hold_out(all.clone(), Some(&spec(Some("full"), 0.3)))
                .unwrap()
                .1,
            held
        );
        let (_, thumbs) = hold_out(all.clone(), Some(&spec(Some("thumbs"), 0.1))).unwrap();
        assert!(thumbs.iter().all(|s| s.dataset == "thumbs"));
        // None holds nothing out.
        assert_eq!(hold_out(all.clone(), None).unwrap(), (all, Vec::new()));
    }

    #[test]
    fn impossible_lockboxes_are_refused_by_name() {
        let all = samples("full", 40);
        for (s, says) in [
            (spec(None, 0.0), "strictly between"),
            (spec(None, 1.0), "strictly between"),
            (spec(None, f64::NAN), "strictly between"),
            (spec(Some("nope"), 0.3), "no dataset named nope"),
        ] {
            match hold_out(all.clone(), Some(&s)) {
                Err(TrainError::Config(m)) => assert!(m.contains(says), "{m}"),
                other => panic!("{s:?}: {other:?}"),
            }
        }
    }
}
