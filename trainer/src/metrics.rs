//! Evaluation metrics for a rare finding.
//!
//! Pleural effusion is in roughly one scan in ten, so accuracy says little: a
//! model that never flags anything is ~90% accurate and useless for triage.
//! What matters is how many effusions we catch (recall, a.k.a. sensitivity),
//! how many flags are real (precision), and how well the scores rank effusion
//! above no-finding regardless of threshold (AUROC, and PR-AUC, which unlike
//! AUROC is sensitive to the class imbalance).
//!
//! Conventions shared by everything here:
//!
//! - Class 0 = effusion is the *positive* class; `positives[i]` says whether
//!   scan `i` really has an effusion. Scores are `p_effusion` in `[0, 1]`.
//! - A scan is predicted positive iff `score >= threshold`, exactly what the
//!   worker does when serving, so a threshold chosen here behaves the same in
//!   production. Thresholds we choose are always actual score values, so the
//!   recall we report at a threshold is the recall [`Confusion::at`] gives.
//! - Ratios whose denominator is zero (e.g. precision when nothing is flagged)
//!   are defined as `0.0`: a ratio with nothing behind it earns no credit, and
//!   the report never shows `NaN`.
//! - A NaN score (a diverged model) is never predicted positive, because
//!   `NaN >= t` is false, as in serving. For ranking (AUROC, curves) NaN
//!   scores rank below every real score, tied with each other.
//! - `scores` and `positives` must have the same length; every function that
//!   takes both panics otherwise, since a mismatch means the caller paired
//!   the wrong vectors and any number computed from them would be wrong.

use std::cmp::Ordering;

use serde::{Deserialize, Serialize};

/// The default serving threshold reported alongside the chosen one.
pub const DEFAULT_THRESHOLD: f32 = 0.5;

/// `num / den`, or `0.0` when `den == 0` (see the module docs for why).
fn ratio(num: u64, den: u64) -> f64 {
    if den == 0 {
        0.0
    } else {
        num as f64 / den as f64
    }
}

fn check_lengths(scores: &[f32], positives: &[bool]) {
    assert_eq!(
        scores.len(),
        positives.len(),
        "metrics: {} scores but {} labels",
        scores.len(),
        positives.len()
    );
}

/// Confusion counts for the effusion (positive) class at one threshold.
///
/// Serialised with the field `fn_` named `"fn"` (`fn` is a Rust keyword).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confusion {
    /// Effusion, flagged.
    pub tp: u64,
    /// No finding, flagged (a false alarm).
    pub fp: u64,
    /// No finding, not flagged.
    pub tn: u64,
    /// Effusion, not flagged (a missed effusion: the costly error).
    #[serde(rename = "fn")]
    pub fn_: u64,
}

impl Confusion {
    /// Counts at `threshold`: scan `i` is predicted effusion iff
    /// `scores[i] >= threshold` (the serving rule; NaN scores never are).
    ///
    /// # Panics
    /// If `scores` and `positives` differ in length.
    pub fn at(scores: &[f32], positives: &[bool], threshold: f32) -> Confusion {
        check_lengths(scores, positives);
        let mut c = Confusion::default();
        for (&s, &p) in scores.iter().zip(positives) {
            match (s >= threshold, p) {
                (true, true) => c.tp += 1,
                (true, false) => c.fp += 1,
                (false, false) => c.tn += 1,
                (false, true) => c.fn_ += 1,
            }
        }
        c
    }

    /// Number of scans counted.
    pub fn total(&self) -> u64 {
        self.tp + self.fp + self.tn + self.fn_
    }

    /// Number of real effusions (`tp + fn`).
    pub fn positives(&self) -> u64 {
        self.tp + self.fn_
    }

    /// `(tp + tn) / total`; `0.0` when empty. Misleading for a rare finding:
    /// reported for completeness, never used to choose anything.
    pub fn accuracy(&self) -> f64 {
        ratio(self.tp + self.tn, self.total())
    }

    /// Sensitivity, `tp / (tp + fn)`: the share of effusions flagged.
    /// `0.0` when there are no effusions.
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }

    /// Positive predictive value, `tp / (tp + fp)`: the share of flags that
    /// are real. `0.0` when nothing is flagged.
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }

    /// `tn / (tn + fp)`: the share of no-finding scans left unflagged.
    /// `0.0` when there are no no-finding scans.
    pub fn specificity(&self) -> f64 {
        ratio(self.tn, self.tn + self.fp)
    }

    /// Harmonic mean of precision and recall, computed as
    /// `2tp / (2tp + fp + fn)` (equal where both are defined); `0.0` when
    /// there are neither effusions nor flags.
    pub fn f1(&self) -> f64 {
        ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn_)
    }
}

/// Scans sharing one score, with how many are effusion and how many not.
#[derive(Debug, Clone, Copy)]
struct TieGroup {
    score: f32,
    pos: u64,
    neg: u64,
}

/// Groups scans by score, highest score first; all NaN scores form one last
/// group. Walking the groups in order and flagging everything seen so far
/// gives exactly the confusion at `threshold = group.score`, because scores
/// that compare equal (including `-0.0` and `0.0`) share a group.
fn tie_groups(scores: &[f32], positives: &[bool]) -> Vec<TieGroup> {
    check_lengths(scores, positives);
    let mut order: Vec<(f32, bool)> = scores
        .iter()
        .copied()
        .zip(positives.iter().copied())
        .collect();
    // Descending, NaN last. `total_cmp` is a total order, so the sort is
    // well defined; -0.0 and 0.0 end up adjacent and are merged below.
    order.sort_unstable_by(|a, b| match (a.0.is_nan(), b.0.is_nan()) {
        (false, false) => b.0.total_cmp(&a.0),
        (true, true) => Ordering::Equal,
        (true, false) => Ordering::Greater,
        (false, true) => Ordering::Less,
    });
    let mut groups: Vec<TieGroup> = Vec::new();
    for (score, pos) in order {
        let same = match groups.last() {
            Some(g) => g.score == score || (g.score.is_nan() && score.is_nan()),
            None => false,
        };
        if !same {
            groups.push(TieGroup {
                score,
                pos: 0,
                neg: 0,
            });
        }
        let g = groups.last_mut().expect("pushed above");
        if pos {
            g.pos += 1;
        } else {
            g.neg += 1;
        }
    }
    groups
}

fn class_counts(positives: &[bool]) -> (u64, u64) {
    let p = positives.iter().filter(|&&p| p).count() as u64;
    (p, positives.len() as u64 - p)
}

/// Area under the ROC curve: the probability that a random effusion scores
/// above a random no-finding scan, ties counting one half (the Mann–Whitney
/// U statistic over `n_pos * n_neg`).
///
/// Computed from mid-ranks in `O(n log n)`, in exact integer arithmetic until
/// the final division. `None` when either class is absent (undefined).
///
/// # Panics
/// If `scores` and `positives` differ in length.
pub fn auroc(scores: &[f32], positives: &[bool]) -> Option<f64> {
    let (n_pos, n_neg) = class_counts(positives);
    let groups = tie_groups(scores, positives);
    if n_pos == 0 || n_neg == 0 {
        return None;
    }
    // Ranks are 1-based ascending; a tie group covering ranks lo..=hi gets
    // mid-rank (lo + hi) / 2. Doubling everything keeps it in integers:
    // 2U = 2 * (rank sum of positives) - n_pos * (n_pos + 1).
    let mut twice_rank_sum: u128 = 0;
    let mut below: u128 = 0; // scans ranked below the current group
    for g in groups.iter().rev() {
        let size = u128::from(g.pos + g.neg);
        let (lo, hi) = (below + 1, below + size);
        twice_rank_sum += u128::from(g.pos) * (lo + hi);
        below += size;
    }
    let (p, n) = (u128::from(n_pos), u128::from(n_neg));
    let twice_u = twice_rank_sum - p * (p + 1);
    Some(twice_u as f64 / (2 * p * n) as f64)
}

/// Average precision, the step-wise area under the precision–recall curve
/// as scikit-learn computes it: `sum_k (R_k - R_{k-1}) * P_k` over distinct
/// thresholds from highest to lowest (no interpolation, so it is not
/// optimistic). Chance level is the prevalence. `None` when there are no
/// effusions (recall undefined).
///
/// # Panics
/// If `scores` and `positives` differ in length.
pub fn pr_auc(scores: &[f32], positives: &[bool]) -> Option<f64> {
    let (n_pos, _) = class_counts(positives);
    let groups = tie_groups(scores, positives);
    if n_pos == 0 {
        return None;
    }
    let (mut tp, mut fp, mut ap) = (0u64, 0u64, 0.0f64);
    for g in &groups {
        tp += g.pos;
        fp += g.neg;
        // Recall only moves when the group holds effusions; each one adds
        // 1/n_pos of recall at this group's precision.
        ap += ratio(g.pos, n_pos) * ratio(tp, tp + fp);
    }
    Some(ap)
}

/// ROC curve as `(false positive rate, true positive rate)` points, from
/// `(0, 0)` (nothing flagged) through one point per distinct score (flagging
/// every scan scoring at least that) to `(1, 1)`. Empty when either class is
/// absent.
///
/// # Panics
/// If `scores` and `positives` differ in length.
pub fn roc_curve(scores: &[f32], positives: &[bool]) -> Vec<(f64, f64)> {
    let (n_pos, n_neg) = class_counts(positives);
    let groups = tie_groups(scores, positives);
    if n_pos == 0 || n_neg == 0 {
        return Vec::new();
    }
    let mut points = Vec::with_capacity(groups.len() + 1);
    points.push((0.0, 0.0));
    let (mut tp, mut fp) = (0u64, 0u64);
    for g in &groups {
        tp += g.pos;
        fp += g.neg;
        points.push((ratio(fp, n_neg), ratio(tp, n_pos)));
    }
    points
}

/// Precision–recall curve as `(recall, precision)` points: first `(0, 1)`
/// (the conventional start, as in scikit-learn), then one point per distinct
/// score from highest to lowest, so recall never decreases. Empty when there
/// are no effusions.
///
/// The area under the step function through these points, holding each
/// point's precision back to the previous recall, is [`pr_auc`].
///
/// # Panics
/// If `scores` and `positives` differ in length.
pub fn pr_curve(scores: &[f32], positives: &[bool]) -> Vec<(f64, f64)> {
    let (n_pos, _) = class_counts(positives);
    let groups = tie_groups(scores, positives);
    if n_pos == 0 {
        return Vec::new();
    }
    let mut points = Vec::with_capacity(groups.len() + 1);
    points.push((0.0, 1.0));
    let (mut tp, mut fp) = (0u64, 0u64);
    for g in &groups {
        tp += g.pos;
        fp += g.neg;
        points.push((ratio(tp, n_pos), ratio(tp, tp + fp)));
    }
    points
}

/// A threshold picked to reach a target recall, with what it achieves.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ThresholdChoice {
    /// Flag effusion iff `p_effusion >= threshold`. Halfway between the
    /// lowest flagged score and the next lower one.
    pub threshold: f32,
    /// Recall at `threshold` (at least `target_recall`).
    pub recall: f64,
    /// Precision at `threshold`.
    pub precision: f64,
    /// The recall that was asked for.
    pub target_recall: f64,
}

/// The threshold that flags the FEWEST scans while recall reaches `target`,
/// so precision is as good as it can be while recall holds, with the recall
/// and precision at it.
///
/// It sits halfway between the lowest score it flags and the highest one it
/// does not (or on the lowest flagged score when nothing lower exists), not
/// on a score: a threshold equal to the boundary effusion's score would
/// miss that effusion as soon as its score dropped by one rounding step, as
/// it may between tch and tract, or between a model and its int8 variant.
/// `Confusion::at(scores, positives, choice.threshold).recall() >= target`
/// holds exactly, ties included. Returns `None` when there are no effusions,
/// or when `target` cannot be reached (it is NaN or above 1, or effusions
/// with NaN scores can never be flagged).
///
/// # Panics
/// If `scores` and `positives` differ in length.
pub fn threshold_for_recall(
    scores: &[f32],
    positives: &[bool],
    target: f64,
) -> Option<ThresholdChoice> {
    let (n_pos, _) = class_counts(positives);
    let groups = tie_groups(scores, positives);
    if n_pos == 0 {
        return None;
    }
    let (mut tp, mut fp) = (0u64, 0u64);
    let scored: Vec<&TieGroup> = groups.iter().filter(|g| !g.score.is_nan()).collect();
    for (i, g) in scored.iter().enumerate() {
        tp += g.pos;
        fp += g.neg;
        // The same expression as Confusion::recall, so the comparison here
        // and the one a caller makes agree bit for bit.
        let recall = ratio(tp, n_pos);
        if recall >= target {
            let threshold = match scored.get(i + 1) {
                Some(next) => {
                    let mid = ((f64::from(g.score) + f64::from(next.score)) / 2.0) as f32;
                    // Adjacent floats have no midpoint; the score itself
                    // then still flags exactly this group and above.
                    if mid > next.score && mid <= g.score {
                        mid
                    } else {
                        g.score
                    }
                }
                None => g.score,
            };
            return Some(ThresholdChoice {
                threshold,
                recall,
                precision: ratio(tp, tp + fp),
                target_recall: target,
            });
        }
    }
    None
}

/// The 95% Wilson score interval for a proportion of `successes` out of
/// `trials` (e.g. recall: effusions caught out of effusions). Unlike the
/// normal approximation it stays inside `[0, 1]` and behaves at 0% and
/// 100%, which is where small validation sets put us. `None` when
/// `trials == 0`.
pub fn wilson_interval(successes: u64, trials: u64) -> Option<(f64, f64)> {
    if trials == 0 {
        return None;
    }
    const Z: f64 = 1.959_963_984_540_054; // two-sided 95%
    let n = trials as f64;
    let p = successes.min(trials) as f64 / n;
    let z2 = Z * Z;
    let denom = 1.0 + z2 / n;
    let centre = (p + z2 / (2.0 * n)) / denom;
    let half = Z * (p * (1.0 - p) / n + z2 / (4.0 * n * n)).sqrt() / denom;
    Some(((centre - half).max(0.0), (centre + half).min(1.0)))
}

/// The metrics at one threshold, ready to report.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Flag effusion iff `p_effusion >= threshold`.
    pub threshold: f32,
    /// See [`Confusion::accuracy`].
    pub accuracy: f64,
    /// See [`Confusion::recall`].
    pub recall: f64,
    /// See [`Confusion::precision`].
    pub precision: f64,
    /// See [`Confusion::specificity`].
    pub specificity: f64,
    /// See [`Confusion::f1`].
    pub f1: f64,
    /// The counts the ratios come from.
    pub confusion: Confusion,
}

impl Summary {
    /// Summarises `confusion`, which was counted at `threshold`.
    pub fn from_confusion(threshold: f32, confusion: Confusion) -> Summary {
        Summary {
            threshold,
            accuracy: confusion.accuracy(),
            recall: confusion.recall(),
            precision: confusion.precision(),
            specificity: confusion.specificity(),
            f1: confusion.f1(),
            confusion,
        }
    }

    /// Counts and summarises at `threshold` (see [`Confusion::at`]).
    ///
    /// # Panics
    /// If `scores` and `positives` differ in length.
    pub fn at(scores: &[f32], positives: &[bool], threshold: f32) -> Summary {
        Summary::from_confusion(threshold, Confusion::at(scores, positives, threshold))
    }
}

/// Everything we report about one evaluation pass.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Scans evaluated.
    pub n: usize,
    /// Of which effusion.
    pub n_positive: usize,
    /// Mean loss; [`evaluate`] leaves it `None` for the caller to fill.
    pub loss: Option<f64>,
    /// Metrics at the default threshold, 0.5.
    pub at_default: Summary,
    /// The threshold for the target recall; `None` if there are no
    /// effusions (or the target is unreachable, see [`threshold_for_recall`]).
    pub chosen: Option<ThresholdChoice>,
    /// Metrics at the chosen threshold.
    pub at_chosen: Option<Summary>,
    /// See [`auroc`].
    pub auroc: Option<f64>,
    /// See [`pr_auc`].
    pub pr_auc: Option<f64>,
}

/// Evaluates scores against labels: metrics at 0.5, the threshold for
/// `target_recall` and the metrics there, AUROC and PR-AUC.
///
/// # Panics
/// If `scores` and `positives` differ in length.
pub fn evaluate(scores: &[f32], positives: &[bool], target_recall: f64) -> Evaluation {
    check_lengths(scores, positives);
    let chosen = threshold_for_recall(scores, positives, target_recall);
    Evaluation {
        n: scores.len(),
        n_positive: positives.iter().filter(|&&p| p).count(),
        loss: None,
        at_default: Summary::at(scores, positives, DEFAULT_THRESHOLD),
        chosen,
        at_chosen: chosen.map(|c| Summary::at(scores, positives, c.threshold)),
        auroc: auroc(scores, positives),
        pr_auc: pr_auc(scores, positives),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    const T: bool = true;
    const F: bool = false;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-12
    }

    /// O(n^2) pair counting: the definition AUROC must agree with.
    fn auroc_by_pairs(scores: &[f32], positives: &[bool]) -> f64 {
        let (mut wins, mut pairs) = (0.0, 0.0);
        for (i, &si) in scores.iter().enumerate() {
            for (j, &sj) in scores.iter().enumerate() {
                if positives[i] && !positives[j] {
                    pairs += 1.0;
                    if si > sj {
                        wins += 1.0;
                    } else if si == sj {
                        wins += 0.5;
                    }
                }
            }
        }
        wins / pairs
    }

    #[test]
    fn confusion_counts_with_inclusive_threshold() {
        let scores = [0.9, 0.5, 0.5, 0.2, 0.7];
        let labels = [T, T, F, T, F];
        let c = Confusion::at(&scores, &labels, 0.5);
        // 0.5 >= 0.5 counts as flagged, as in serving.
        assert_eq!(
            c,
            Confusion {
                tp: 2,
                fp: 2,
                tn: 0,
                fn_: 1
            }
        );
        assert!(close(c.recall(), 2.0 / 3.0));
        assert!(close(c.precision(), 0.5));
        assert!(close(c.specificity(), 0.0));
        assert!(close(c.accuracy(), 0.4));
        assert!(close(c.f1(), 2.0 * 0.5 * (2.0 / 3.0) / (0.5 + 2.0 / 3.0)));
    }

    #[test]
    fn zero_denominators_are_zero() {
        let empty = Confusion::default();
        assert_eq!(empty.accuracy(), 0.0);
        assert_eq!(empty.recall(), 0.0);
        assert_eq!(empty.precision(), 0.0);
        assert_eq!(empty.specificity(), 0.0);
        assert_eq!(empty.f1(), 0.0);
        // Nothing flagged: precision 0, not NaN; recall 0 too.
        let silent = Confusion {
            tp: 0,
            fp: 0,
            tn: 9,
            fn_: 1,
        };
        assert_eq!(silent.precision(), 0.0);
        assert_eq!(silent.recall(), 0.0);
        assert_eq!(silent.f1(), 0.0);
        assert!(close(silent.accuracy(), 0.9)); // why accuracy misleads
        assert!(close(silent.specificity(), 1.0));
    }

    #[test]
    fn nan_score_is_never_flagged() {
        let c = Confusion::at(&[f32::NAN, f32::NAN], &[T, F], 0.0);
        assert_eq!(
            c,
            Confusion {
                tp: 0,
                fp: 0,
                tn: 1,
                fn_: 1
            }
        );
    }

    #[test]
    fn confusion_serialises_fn_as_fn() {
        let c = Confusion {
            tp: 1,
            fp: 2,
            tn: 3,
            fn_: 4,
        };
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"tp": 1, "fp": 2, "tn": 3, "fn": 4})
        );
        let back: Confusion = serde_json::from_value(json).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    #[should_panic(expected = "3 scores but 2 labels")]
    fn length_mismatch_panics() {
        Confusion::at(&[0.1, 0.2, 0.3], &[T, F], 0.5);
    }

    #[test]
    #[should_panic]
    fn length_mismatch_panics_in_ranking_too() {
        auroc(&[0.1], &[T, F]);
    }

    #[test]
    fn auroc_extremes_and_ties() {
        let labels = [F, F, T, T];
        assert_eq!(auroc(&[0.1, 0.2, 0.8, 0.9], &labels), Some(1.0));
        assert_eq!(auroc(&[0.9, 0.8, 0.2, 0.1], &labels), Some(0.0));
        assert_eq!(auroc(&[0.5, 0.5, 0.5, 0.5], &labels), Some(0.5));
    }

    #[test]
    fn small_known_case() {
        let scores = [0.1, 0.4, 0.35, 0.8];
        let labels = [F, F, T, T];
        // Pairs (pos, neg): 0.8>0.1, 0.8>0.4, 0.35>0.1, 0.35<0.4 -> 3/4.
        assert!(close(auroc(&scores, &labels).unwrap(), 0.75));
        // Thresholds 0.8 (R .5, P 1), 0.4 (R .5), 0.35 (R 1, P 2/3), 0.1:
        // AP = .5*1 + .5*(2/3) = 5/6.
        assert!(close(pr_auc(&scores, &labels).unwrap(), 5.0 / 6.0));
        assert_eq!(
            roc_curve(&scores, &labels),
            vec![(0.0, 0.0), (0.0, 0.5), (0.5, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        let pr = pr_curve(&scores, &labels);
        let expected = [
            (0.0, 1.0),
            (0.5, 1.0),
            (0.5, 0.5),
            (1.0, 2.0 / 3.0),
            (1.0, 0.5),
        ];
        assert_eq!(pr.len(), expected.len());
        for (got, want) in pr.iter().zip(expected) {
            assert!(
                close(got.0, want.0) && close(got.1, want.1),
                "{got:?} vs {want:?}"
            );
        }
    }

    #[test]
    fn ties_give_half_credit_and_one_curve_point() {
        // One positive tied with one negative at 0.5, plus a clear pair.
        let scores = [0.9, 0.5, 0.5, 0.1];
        let labels = [T, T, F, F];
        // Pairs: 0.9 beats both (2), tied 0.5 vs 0.5 (0.5), 0.5 > 0.1 (1).
        assert!(close(auroc(&scores, &labels).unwrap(), 3.5 / 4.0));
        assert_eq!(
            roc_curve(&scores, &labels),
            vec![(0.0, 0.0), (0.0, 0.5), (0.5, 1.0), (1.0, 1.0)]
        );
        // AP: 0.9 -> R .5 P 1; 0.5 -> R 1 P 2/3.
        assert!(close(
            pr_auc(&scores, &labels).unwrap(),
            0.5 + 0.5 * 2.0 / 3.0
        ));
    }

    #[test]
    fn negative_and_positive_zero_are_one_threshold() {
        let scores = [-0.0, 0.0];
        let labels = [T, F];
        assert_eq!(auroc(&scores, &labels), Some(0.5));
        assert_eq!(roc_curve(&scores, &labels).len(), 2);
    }

    #[test]
    fn nan_scores_rank_lowest() {
        let scores = [f32::NAN, 0.2, 0.1];
        let labels = [T, F, T];
        // NaN positive below everything: pairs (NaN vs 0.2) lost, (0.1 vs 0.2) lost.
        assert_eq!(auroc(&scores, &labels), Some(0.0));
        // Recall 1 would need flagging the NaN, which no threshold does.
        assert_eq!(threshold_for_recall(&scores, &labels, 1.0), None);
        let c = threshold_for_recall(&scores, &labels, 0.5).unwrap();
        assert_eq!(c.threshold, 0.1, "nothing scored lies below it");
    }

    #[test]
    fn one_class_is_undefined() {
        assert_eq!(auroc(&[0.1, 0.9], &[T, T]), None);
        assert_eq!(auroc(&[0.1, 0.9], &[F, F]), None);
        assert_eq!(auroc(&[], &[]), None);
        assert_eq!(pr_auc(&[0.1, 0.9], &[F, F]), None);
        assert_eq!(pr_auc(&[0.1, 0.9], &[T, T]), Some(1.0));
        assert!(roc_curve(&[0.1, 0.9], &[T, T]).is_empty());
        assert!(pr_curve(&[0.1, 0.9], &[F, F]).is_empty());
        assert_eq!(threshold_for_recall(&[0.1, 0.9], &[F, F], 0.9), None);
    }

    #[test]
    fn threshold_for_recall_known_case() {
        // Sorted: 0.9 T, 0.8 F, 0.7 T, 0.6 T, 0.4 F, 0.3 T, 0.2 F, 0.1 F.
        let scores = [0.1, 0.9, 0.3, 0.7, 0.8, 0.2, 0.6, 0.4];
        let labels = [F, T, T, T, F, F, T, F];
        let c = threshold_for_recall(&scores, &labels, 0.75).unwrap();
        // Down to 0.6: tp 3 of 4, fp 1 -> R .75, P .75. 0.7 gives only R .5.
        // The threshold sits between 0.6 and the next score, 0.4.
        assert_eq!(c.threshold, 0.5);
        assert_eq!(c.recall, 0.75);
        assert_eq!(c.precision, 0.75);
        assert_eq!(c.target_recall, 0.75);
        let c = threshold_for_recall(&scores, &labels, 0.76).unwrap();
        // Full recall needs 0.3: tp 4, fp 2; the next score is 0.2.
        assert_eq!(c.threshold, 0.25);
        assert_eq!((c.recall, c.precision), (1.0, 4.0 / 6.0));
        let c = threshold_for_recall(&scores, &labels, 0.0).unwrap();
        assert!((c.threshold - 0.85).abs() < 1e-6, "{}", c.threshold);
        assert_eq!(threshold_for_recall(&scores, &labels, 1.01), None);
        assert_eq!(threshold_for_recall(&scores, &labels, f64::NAN), None);
    }

    #[test]
    fn threshold_with_ties_holds_under_serving_rule() {
        // The positive at 0.5 is tied with two negatives: reaching it means
        // flagging all three, and the choice must say so.
        let scores = [0.9, 0.5, 0.5, 0.5, 0.1];
        let labels = [T, F, T, F, T];
        let c = threshold_for_recall(&scores, &labels, 0.6).unwrap();
        assert!((c.threshold - 0.3).abs() < 1e-6, "{}", c.threshold);
        assert!(close(c.recall, 2.0 / 3.0));
        assert!(close(c.precision, 0.5));
        let conf = Confusion::at(&scores, &labels, c.threshold);
        assert_eq!(conf.recall(), c.recall);
        assert_eq!(conf.precision(), c.precision);
    }

    #[test]
    fn random_cases_agree_with_definitions() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..200 {
            let n = rng.random_range(1..60);
            // Coarse scores make ties common.
            let levels = if case % 2 == 0 { 5 } else { 1000 };
            let scores: Vec<f32> = (0..n)
                .map(|_| rng.random_range(0..=levels) as f32 / levels as f32)
                .collect();
            let labels: Vec<bool> = (0..n).map(|_| rng.random_bool(0.3)).collect();
            let n_pos = labels.iter().filter(|&&p| p).count();

            match auroc(&scores, &labels) {
                Some(a) => assert!(close(a, auroc_by_pairs(&scores, &labels))),
                None => assert!(n_pos == 0 || n_pos == n),
            }

            if n_pos > 0 {
                // AP as the area under the step-wise PR curve.
                let pr = pr_curve(&scores, &labels);
                let area: f64 = pr.windows(2).map(|w| (w[1].0 - w[0].0) * w[1].1).sum();
                assert!(close(area, pr_auc(&scores, &labels).unwrap()));
            }

            for target in [0.0, 0.3, 0.5, 0.8, 0.9, 0.95, 1.0] {
                let Some(c) = threshold_for_recall(&scores, &labels, target) else {
                    assert_eq!(n_pos, 0);
                    continue;
                };
                let conf = Confusion::at(&scores, &labels, c.threshold);
                assert!(conf.recall() >= target, "case {case} target {target}");
                assert_eq!(conf.recall(), c.recall);
                assert_eq!(conf.precision(), c.precision);
                // Fewest flagged: a threshold on any flagged score above the
                // lowest flagged one misses the target.
                let lowest = scores
                    .iter()
                    .copied()
                    .filter(|&s| s >= c.threshold)
                    .fold(f32::INFINITY, f32::min);
                assert_eq!(Confusion::at(&scores, &labels, lowest), conf);
                for &s in scores.iter().filter(|&&s| s > lowest) {
                    assert!(Confusion::at(&scores, &labels, s).recall() < target);
                }
                // Margin: halfway to the highest unflagged score.
                if let Some(below) = scores
                    .iter()
                    .copied()
                    .filter(|&s| s < c.threshold)
                    .reduce(f32::max)
                {
                    let half = (lowest - below) / 2.0;
                    assert!((c.threshold - below - half).abs() <= 1e-6, "case {case}");
                }
            }
        }
    }

    #[test]
    fn wilson_interval_known_values() {
        // 9/10: p .9, z 1.96 -> about 0.596 .. 0.982.
        let (lo, hi) = wilson_interval(9, 10).unwrap();
        assert!(
            (lo - 0.5958).abs() < 1e-3 && (hi - 0.9821).abs() < 1e-3,
            "{lo} {hi}"
        );
        let (lo, hi) = wilson_interval(10, 10).unwrap();
        assert!(lo > 0.71 && lo < 0.73 && hi > 1.0 - 1e-12, "{lo} {hi}");
        let (lo, hi) = wilson_interval(0, 5).unwrap();
        assert!(lo < 1e-12 && hi > 0.43 && hi < 0.44, "{lo} {hi}");
        assert_eq!(wilson_interval(0, 0), None);
    }

    #[test]
    fn evaluate_fills_everything() {
        let scores = [0.1, 0.4, 0.35, 0.8];
        let labels = [F, F, T, T];
        let e = evaluate(&scores, &labels, 0.9);
        assert_eq!((e.n, e.n_positive, e.loss), (4, 2, None));
        assert_eq!(e.at_default.threshold, 0.5);
        assert_eq!(
            e.at_default.confusion,
            Confusion {
                tp: 1,
                fp: 0,
                tn: 2,
                fn_: 1
            }
        );
        let chosen = e.chosen.unwrap();
        // Halfway between the flagged 0.35 and the unflagged 0.1.
        assert_eq!(chosen.threshold, 0.225);
        let at = e.at_chosen.unwrap();
        assert_eq!(at.threshold, 0.225);
        assert_eq!(at.recall, 1.0);
        assert_eq!(
            at.confusion,
            Confusion {
                tp: 2,
                fp: 1,
                tn: 1,
                fn_: 0
            }
        );
        assert!(close(e.auroc.unwrap(), 0.75));
        assert!(close(e.pr_auc.unwrap(), 5.0 / 6.0));

        let json = serde_json::to_string(&e).unwrap();
        let back: Evaluation = serde_json::from_str(&json).unwrap();
        assert_eq!(back, e);
    }

    #[test]
    fn evaluate_without_effusions() {
        let e = evaluate(&[0.2, 0.7], &[F, F], 0.9);
        assert_eq!(e.n_positive, 0);
        assert_eq!(
            (e.chosen, e.at_chosen, e.auroc, e.pr_auc),
            (None, None, None, None)
        );
        assert_eq!(
            e.at_default.confusion,
            Confusion {
                tp: 0,
                fp: 1,
                tn: 1,
                fn_: 0
            }
        );
    }
}
