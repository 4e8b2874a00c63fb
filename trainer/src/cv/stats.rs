//! Point estimates with patient-level bootstrap intervals, for a set of out-of-fold
//! predictions or any subset of it (one dataset).
//!
//! Why patients: images of one patient are correlated (follow-up films look alike), so
//! resampling images would pretend to more independent evidence than there is and give
//! intervals that are too narrow. Each resample draws as many patients as there are, with
//! replacement, and takes all their images.
//!
//! The intervals are percentile intervals (2.5th and 97.5th percentiles of the resampled
//! values, linear interpolation). The threshold is held fixed: they say how recall and
//! precision at *this* threshold vary with the patients, not how a threshold re-chosen on
//! other data would do.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::calibration;
use crate::metrics::{self, Confusion};

/// Coverage of the intervals.
pub const LEVEL: f64 = 0.95;

/// A point estimate with its bootstrap interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// On all the data; `None` when undefined (e.g. AUROC without a class).
    pub value: Option<f64>,
    /// Lower end of the 95% interval; `None` without resamples.
    pub lo: Option<f64>,
    /// Upper end.
    pub hi: Option<f64>,
    /// Resamples on which the statistic was defined (those lacking a class are left
    /// out, which slightly favours resamples with both classes).
    pub resamples: usize,
}

impl Estimate {
    /// `0.912 [0.871, 0.946]`, or `n/a`.
    pub fn show(&self) -> String {
        match (self.value, self.lo, self.hi) {
            (Some(v), Some(lo), Some(hi)) => format!("{v:.3} [{lo:.3}, {hi:.3}]"),
            (Some(v), _, _) => format!("{v:.3}"),
            _ => "n/a".into(),
        }
    }
}

/// The OOF figures of one set of images: ranking, the operating point and calibration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// `all`, or a dataset's name.
    pub name: String,
    /// Images.
    pub images: usize,
    /// Effusion images.
    pub effusion: usize,
    /// Patients (groups the bootstrap resamples).
    pub patients: usize,
    /// AUROC of p_calibrated (the same ranking as p with one view).
    pub auroc: Estimate,
    /// PR-AUC (average precision) of p_calibrated.
    pub pr_auc: Estimate,
    /// Recall at the threshold.
    pub recall: Estimate,
    /// Precision at the threshold.
    pub precision: Estimate,
    /// Specificity at the threshold.
    pub specificity: Estimate,
    /// ECE of the uncalibrated p.
    pub ece_before: Estimate,
    /// ECE of p_calibrated.
    pub ece_after: Estimate,
    /// Counts at the threshold.
    pub confusion: Confusion,
}

/// What [`figures`] measures.
pub struct Scored<'a> {
    /// The model's p_effusion.
    pub p: &'a [f32],
    /// p_effusion after temperature scaling.
    pub p_calibrated: &'a [f32],
    /// Ground truth.
    pub positives: &'a [bool],
    /// Group (patient) of each image: any labels, equal for images of one patient.
    pub groups: &'a [String],
}

/// Bootstrap settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bootstrap {
    /// Resamples; 0 gives point estimates only.
    pub resamples: usize,
    /// Seed of the resampling.
    pub seed: u64,
}

/// Figures for the images `subset` (indices into `s`), with `threshold` applied to
/// p_calibrated.
pub fn figures(
    name: &str,
    s: &Scored<'_>,
    subset: &[usize],
    threshold: f32,
    boot: Bootstrap,
) -> Figures {
    let stat = |idx: &[usize]| -> [Option<f64>; 7] {
        let p: Vec<f32> = idx.iter().map(|&i| s.p[i]).collect();
        let pc: Vec<f32> = idx.iter().map(|&i| s.p_calibrated[i]).collect();
        let y: Vec<bool> = idx.iter().map(|&i| s.positives[i]).collect();
        let c = Confusion::at(&pc, &y, threshold);
        let has_pos = c.positives() > 0;
        let has_neg = c.tn + c.fp > 0;
        [
            metrics::auroc(&pc, &y),
            metrics::pr_auc(&pc, &y),
            has_pos.then(|| c.recall()),
            (c.tp + c.fp > 0).then(|| c.precision()),
            has_neg.then(|| c.specificity()),
            calibration::ece(&p, &y),
            calibration::ece(&pc, &y),
        ]
    };
    let groups = group_members(subset, s.groups);
    let [auroc, pr_auc, recall, precision, specificity, ece_before, ece_after] =
        bootstrap(&groups, boot, stat);
    let y: Vec<bool> = subset.iter().map(|&i| s.positives[i]).collect();
    let pc: Vec<f32> = subset.iter().map(|&i| s.p_calibrated[i]).collect();
    Figures {
        name: name.to_owned(),
        images: subset.len(),
        effusion: y.iter().filter(|&&b| b).count(),
        patients: groups.len(),
        auroc,
        pr_auc,
        recall,
        precision,
        specificity,
        ece_before,
        ece_after,
        confusion: Confusion::at(&pc, &y, threshold),
    }
}

/// The group an image is resampled and counted with: its patient, or itself when it
/// has no patient id.
pub fn group_of(s: &crate::data::Sample) -> String {
    match &s.patient {
        Some(id) => format!("p:{id}"),
        None => format!("i:{}", s.path.display()),
    }
}

/// The members of each group among `subset`, groups in order of first appearance.
pub fn group_members(subset: &[usize], groups: &[String]) -> Vec<Vec<usize>> {
    let mut index: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    let mut out: Vec<Vec<usize>> = Vec::new();
    for &i in subset {
        let g = *index.entry(groups[i].as_str()).or_insert_with(|| {
            out.push(Vec::new());
            out.len() - 1
        });
        out[g].push(i);
    }
    out
}

/// `stat` on all the groups' images, and its percentile interval over `boot.resamples`
/// resamples of the groups (with replacement, as many as there are).
pub fn bootstrap<const N: usize>(
    groups: &[Vec<usize>],
    boot: Bootstrap,
    stat: impl Fn(&[usize]) -> [Option<f64>; N],
) -> [Estimate; N] {
    let all: Vec<usize> = groups.iter().flatten().copied().collect();
    let point = stat(&all);
    let mut draws: Vec<Vec<f64>> = vec![Vec::with_capacity(boot.resamples); N];
    if !groups.is_empty() {
        let mut rng = ChaCha8Rng::seed_from_u64(boot.seed);
        let mut idx = Vec::with_capacity(all.len() * 2);
        for _ in 0..boot.resamples {
            idx.clear();
            for _ in 0..groups.len() {
                idx.extend_from_slice(&groups[rng.random_range(0..groups.len())]);
            }
            for (d, v) in draws.iter_mut().zip(stat(&idx)) {
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    d.push(v);
                }
            }
        }
    }
    std::array::from_fn(|k| {
        let d = &mut draws[k];
        d.sort_by(f64::total_cmp);
        let tail = (1.0 - LEVEL) / 2.0;
        Estimate {
            value: point[k],
            lo: percentile(d, tail),
            hi: percentile(d, 1.0 - tail),
            resamples: d.len(),
        }
    })
}

/// The `q` quantile of sorted values, interpolating linearly between order statistics;
/// `None` when empty.
fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let at = q.clamp(0.0, 1.0) * last as f64;
    let (lo, frac) = (at.floor() as usize, at - at.floor());
    let hi = (lo + 1).min(last);
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Mean and sample standard deviation of the defined values.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MeanSd {
    /// Mean; `None` with no value.
    pub mean: Option<f64>,
    /// Sample standard deviation (n - 1); `None` with fewer than two values.
    pub sd: Option<f64>,
    /// Values it rests on.
    pub n: usize,
}

impl MeanSd {
    /// Of the `Some` values.
    pub fn of(values: impl IntoIterator<Item = Option<f64>>) -> MeanSd {
        let v: Vec<f64> = values.into_iter().flatten().collect();
        let n = v.len();
        let mean = (n > 0).then(|| v.iter().sum::<f64>() / n as f64);
        let sd = mean
            .filter(|_| n > 1)
            .map(|m| (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt());
        MeanSd { mean, sd, n }
    }

    /// `0.912 ± 0.031`, or `n/a`.
    pub fn show(&self) -> String {
        match (self.mean, self.sd) {
            (Some(m), Some(sd)) => format!("{m:.3} ± {sd:.3}"),
            (Some(m), None) => format!("{m:.3}"),
            _ => "n/a".into(),
        }
    }
}
