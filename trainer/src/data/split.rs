//! Training/validation splits and subsets: by patient, stratified, and
//! never leaving a side without a class when the data allows it.

use std::collections::BTreeMap;

use super::dataset::{Dataset, Sample};
use super::seeds::{
    seeded, shuffle, STREAM_SPLIT, STREAM_SUBSAMPLE_EFFUSION, STREAM_SUBSAMPLE_NOFINDING,
};

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

/// A fingerprint of a set of images (their file names and labels): the
/// validation set's, so that the promotion gate can tell whether two models
/// were measured on the same data.
pub fn fingerprint(val: &[Sample]) -> String {
    let mut names: Vec<String> = val
        .iter()
        .map(|s| {
            format!(
                "{}:{}",
                s.path
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
                s.effusion
            )
        })
        .collect();
    names.sort();
    pleura::model::manifest::sha256_hex(names.join("\n").as_bytes())
}
