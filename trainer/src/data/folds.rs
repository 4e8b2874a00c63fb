//! K-fold splits for cross-validation: by patient, stratified, seeded.
//!
//! Why: one validation split of a few hundred images gives one noisy number, and the
//! images it holds never train the model. K folds give every image exactly one
//! out-of-fold prediction, from the one model that never saw it (nor any other image of
//! its patient), so the whole dataset measures the recipe.

use std::collections::{BTreeMap, HashSet};

use super::dataset::Sample;
use super::error::DataError;
use super::seeds::{seeded, shuffle, STREAM_FOLDS};

/// What one fold holds, for logs and the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FoldSummary {
    /// 0-based fold index.
    pub fold: usize,
    /// Images in the fold.
    pub images: usize,
    /// Effusion images in the fold.
    pub effusion: usize,
    /// Groups in the fold: patients, and images without a patient id.
    pub patients: usize,
}

/// An assignment of every sample to one of `k` folds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Folds {
    /// Number of folds.
    pub k: usize,
    /// Fold of each sample, in the order of the samples given to [`kfold`].
    pub fold_of: Vec<usize>,
    /// Per-fold counts.
    pub summary: Vec<FoldSummary>,
    /// Images that had no patient id and were therefore placed on their own.
    pub without_patient: usize,
}

impl Folds {
    /// `(training, validation)` for `fold`: validation is the fold, training the rest, each
    /// in the order of `samples` (the list the folds were made from).
    ///
    /// # Panics
    /// If `samples` is not that list (a different length).
    pub fn train_val(&self, samples: &[Sample], fold: usize) -> (Vec<Sample>, Vec<Sample>) {
        assert_eq!(samples.len(), self.fold_of.len(), "folds of another list");
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (s, &f) in samples.iter().zip(&self.fold_of) {
            if f == fold {
                val.push(s.clone());
            } else {
                train.push(s.clone());
            }
        }
        (train, val)
    }
}

/// Splits `samples` into `k` folds, deterministically for `seed`.
///
/// - **Grouped**: all images of a patient (the same [`Sample::patient`]) land in one fold;
///   an image without a patient id is a group of its own. Combined datasets namespace
///   their ids (see `scan_datasets`), so equal raw ids of different datasets are
///   different patients.
/// - **Stratified**: groups are placed largest first (equal sizes in seeded random order),
///   each into the fold where it keeps the folds' effusion and no-finding counts closest
///   to an even share of each class (the least squared deviation, each class as a
///   fraction of its total, so the rare class weighs as much as the common one); ties go
///   to the fold with fewer images, then the lower index. How even the folds come out
///   is limited by the group sizes only.
///
/// # Errors
/// [`DataError::InvalidArgument`] for `k < 2`, and [`DataError::TooFewForFolds`] when
/// some fold would lack a class (fewer than `k` groups with effusion or without, or an
/// assignment the grouping forces into that).
pub fn kfold(samples: &[Sample], k: usize, seed: u64) -> Result<Folds, DataError> {
    if k < 2 {
        return Err(DataError::InvalidArgument(format!(
            "cross-validation needs at least 2 folds, not {k}"
        )));
    }
    // Groups keyed by patient; images without one are keyed by their index, which
    // cannot collide with a patient key since the two live in separate variants.
    let mut map: BTreeMap<(Option<&str>, usize), Vec<usize>> = BTreeMap::new();
    for (i, s) in samples.iter().enumerate() {
        let key = match s.patient.as_deref() {
            Some(p) => (Some(p), 0),
            None => (None, i),
        };
        map.entry(key).or_default().push(i);
    }
    let without_patient = samples.iter().filter(|s| s.patient.is_none()).count();
    let mut groups: Vec<Vec<usize>> = map.into_values().collect();
    let counts = |g: &[usize]| {
        let e = g.iter().filter(|&&i| samples[i].effusion).count();
        (e, g.len() - e)
    };
    let positive_groups = groups.iter().filter(|g| counts(g).0 > 0).count();
    let negative_groups = groups.iter().filter(|g| counts(g).1 > 0).count();
    let too_few = |detail: String| DataError::TooFewForFolds {
        k,
        positive_groups,
        negative_groups,
        detail,
    };
    if positive_groups < k || negative_groups < k {
        return Err(too_few(String::new()));
    }

    shuffle(&mut groups, &mut seeded(seed, STREAM_FOLDS));
    // Stable: equal sizes keep the seeded order.
    groups.sort_by_key(|g| std::cmp::Reverse(g.len()));

    let total_pos = samples.iter().filter(|s| s.effusion).count() as f64;
    let total_neg = samples.len() as f64 - total_pos;
    // Per fold: (effusion, no-finding) images so far.
    let mut load = vec![(0usize, 0usize); k];
    let mut fold_of = vec![0usize; samples.len()];
    for g in &groups {
        let (p, n) = counts(g);
        // Adding (p, n) to fold f changes sum_f (pos_f/P - 1/K)^2 + (neg_f/N - 1/K)^2 by
        // 2 (p pos_f / P^2 + n neg_f / N^2) plus terms that do not depend on f.
        let cost = |f: usize| {
            let (pf, nf) = load[f];
            p as f64 * pf as f64 / (total_pos * total_pos)
                + n as f64 * nf as f64 / (total_neg * total_neg)
        };
        let best = (0..k)
            .min_by(|&a, &b| {
                cost(a)
                    .total_cmp(&cost(b))
                    .then((load[a].0 + load[a].1).cmp(&(load[b].0 + load[b].1)))
                    .then(a.cmp(&b))
            })
            .expect("k >= 2 folds");
        load[best].0 += p;
        load[best].1 += n;
        for &i in g {
            fold_of[i] = best;
        }
    }

    let summary: Vec<FoldSummary> = (0..k)
        .map(|fold| {
            let members: Vec<&Sample> = samples
                .iter()
                .zip(&fold_of)
                .filter(|(_, &f)| f == fold)
                .map(|(s, _)| s)
                .collect();
            let patients: HashSet<(Option<&str>, Option<&std::path::Path>)> = members
                .iter()
                .map(|s| match s.patient.as_deref() {
                    Some(p) => (Some(p), None),
                    None => (None, Some(s.path.as_path())),
                })
                .collect();
            FoldSummary {
                fold,
                images: members.len(),
                effusion: members.iter().filter(|s| s.effusion).count(),
                patients: patients.len(),
            }
        })
        .collect();
    if let Some(f) = summary
        .iter()
        .find(|f| f.effusion == 0 || f.effusion == f.images)
    {
        return Err(too_few(format!(
            "; the patients' sizes leave fold {} with {} images, {} of them effusion",
            f.fold + 1,
            f.images,
            f.effusion
        )));
    }
    tracing::info!(k, seed, ?summary, "fold split");
    Ok(Folds {
        k,
        fold_of,
        summary,
        without_patient,
    })
}
