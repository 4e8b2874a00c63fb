//! Calibration: whether p_effusion means what it says, and temperature scaling to make it.
//!
//! A network trained with class weights and early stopping ranks scans well but its
//! probabilities are usually too confident (or, with heavy weighting, shifted). A clinician
//! reading "p = 0.9" should be right about nine times in ten. Temperature scaling divides
//! the logit by one number T fitted on held-out predictions (here the out-of-fold ones);
//! T > 0 keeps the ranking, so AUROC does not move, only the probabilities.
//!
//! Conventions:
//!
//! - The model's two logits `(l_effusion, l_nofinding)` give `p_effusion =
//!   sigmoid(z)` with the margin `z = l_effusion - l_nofinding`; dividing both logits
//!   by T (what a graph with a temperature does before its softmax) gives `sigmoid(z / T)`.
//! - An image may have several *views* (the image and its horizontal flip, under
//!   test-time augmentation): `p = mean over views of sigmoid(z_v / T)`, the average of
//!   the per-view probabilities, which is what a graph applying T to each view and then
//!   averaging computes.
//! - ECE is the expected calibration error for the positive class over
//!   [`ECE_BINS`] equal-width bins of p_effusion on `[0, 1]`: the image-weighted mean of
//!   `|mean p - share of effusions|` per bin. NaN scores are left out.

use serde::{Deserialize, Serialize};

/// Bins of the ECE and the reliability diagram: 10 of equal width.
pub const ECE_BINS: usize = 10;

/// Bounds of the temperature search: far beyond any sensible model on either side.
pub const T_MIN: f64 = 0.05;
/// See [`T_MIN`].
pub const T_MAX: f64 = 20.0;

/// Golden-section steps: the bracket shrinks by 0.618 each, so 90 take `ln(T_MAX /
/// T_MIN)` (about 6) below 1e-17, past f64's resolution.
const GOLDEN_STEPS: usize = 90;

/// `1 / (1 + e^-x)`, without overflow for large |x|.
pub fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

/// `ln(p / (1 - p))`, the margin that gives p; p is clamped to stay finite.
pub fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).ln()
}

/// p_effusion of an image with margins `views` at temperature `t`: the mean of the
/// views' `sigmoid(z / t)`. `t = 1` is the model's own probability.
pub fn calibrated_p(views: &[f32], t: f64) -> f32 {
    p_f64(views, t) as f32
}

/// p_effusion of an image with margins `views` after scaling by `s`: the mean of the
/// views' `sigmoid(z / T + b)`.
pub fn scaled_p(views: &[f32], s: Scaling) -> f32 {
    p_biased(views, s.temperature, s.bias) as f32
}

/// [`calibrated_p`] in f64, so that the likelihood the fit minimises is not flattened by
/// f32 rounding where T barely moves p.
fn p_f64(views: &[f32], t: f64) -> f64 {
    p_biased(views, t, 0.0)
}

fn p_biased(views: &[f32], t: f64, b: f64) -> f64 {
    if views.is_empty() {
        return f64::NAN;
    }
    let sum: f64 = views.iter().map(|&z| sigmoid(f64::from(z) / t + b)).sum();
    sum / views.len() as f64
}

/// What a calibration does to a margin `z`: `sigmoid(z / temperature + bias)`.
///
/// Temperature scaling alone keeps `bias = 0`. Platt scaling fits the bias too, which
/// undoes a shift of the log-odds: class-weighted training moves every margin by about
/// `ln(w_effusion / w_nofinding)` (about ln 9 at a prevalence of 1 in 10), which a
/// temperature cannot remove. In a graph the bias is applied by adding `bias * T` to the
/// effusion logit's final-layer bias, so that `softmax(logits / T)` computes it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Scaling {
    /// Divides the margin.
    pub temperature: f64,
    /// Added to the scaled margin.
    pub bias: f64,
}

impl Scaling {
    /// No change: T = 1, b = 0.
    pub const IDENTITY: Scaling = Scaling {
        temperature: 1.0,
        bias: 0.0,
    };
}

/// Mean negative log-likelihood of the labels at temperature `t`; probabilities are
/// clamped to `[1e-12, 1 - 1e-12]` so one confident mistake cannot make it infinite.
pub fn nll(margins: &[Vec<f32>], positives: &[bool], t: f64) -> f64 {
    nll_scaled(
        margins,
        positives,
        Scaling {
            temperature: t,
            bias: 0.0,
        },
    )
}

/// A fitted temperature and what it does to the negative log-likelihood.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct TemperatureFit {
    /// Divide the margin (both logits) by this before the sigmoid (softmax).
    pub temperature: f64,
    /// Mean NLL at T = 1.
    pub nll_before: f64,
    /// Mean NLL at the fitted T.
    pub nll_after: f64,
    /// Whether T sits on a bound of the search ([`T_MIN`], [`T_MAX`]): the
    /// predictions are then nearly constant or nearly perfectly separated, and T means
    /// little.
    pub at_bound: bool,
}

/// Fits one temperature by minimising the mean NLL over `ln T` in `[ln T_MIN, ln
/// T_MAX]` with a golden-section search: deterministic, derivative-free, and exact
/// enough (the NLL is smooth and, for a single view, convex in `1/T`). `None` when there
/// are no predictions, no finite margins, or only one class (nothing to calibrate
/// against).
///
/// # Panics
/// If `margins` and `positives` differ in length.
pub fn fit_temperature(margins: &[Vec<f32>], positives: &[bool]) -> Option<TemperatureFit> {
    assert_eq!(margins.len(), positives.len(), "margins and labels differ");
    let pos = positives.iter().filter(|&&p| p).count();
    let finite = margins
        .iter()
        .all(|v| !v.is_empty() && v.iter().all(|z| z.is_finite()));
    if margins.is_empty() || pos == 0 || pos == positives.len() || !finite {
        return None;
    }
    let (u, nll_after) = golden(T_MIN.ln(), T_MAX.ln(), GOLDEN_STEPS, |u| {
        nll(margins, positives, u.exp())
    });
    let temperature = u.exp();
    // Within 0.1% of a bound: the likelihood kept improving towards it.
    let near = |bound: f64| (u - bound.ln()).abs() < 1e-3;
    Some(TemperatureFit {
        temperature,
        nll_before: nll(margins, positives, 1.0),
        nll_after,
        at_bound: near(T_MIN) || near(T_MAX),
    })
}

/// Bounds of the Platt bias search: a shift of the log-odds by e^10 either way is far
/// beyond any class weighting.
pub const BIAS_MAX: f64 = 10.0;

/// A fitted Platt scaling (temperature and bias) and what it does to the NLL.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PlattFit {
    /// The fitted scaling.
    pub scaling: Scaling,
    /// Mean NLL unscaled.
    pub nll_before: f64,
    /// Mean NLL after scaling.
    pub nll_after: f64,
    /// Whether T or b sits on a bound of its search.
    pub at_bound: bool,
}

/// Mean NLL after scaling by `s` (clamped as [`nll`] is).
pub fn nll_scaled(margins: &[Vec<f32>], positives: &[bool], s: Scaling) -> f64 {
    assert_eq!(margins.len(), positives.len(), "margins and labels differ");
    if margins.is_empty() {
        return f64::NAN;
    }
    let sum: f64 = margins
        .iter()
        .zip(positives)
        .map(|(views, &y)| {
            let p = p_biased(views, s.temperature, s.bias).clamp(1e-12, 1.0 - 1e-12);
            if y {
                -p.ln()
            } else {
                -(1.0 - p).ln()
            }
        })
        .sum();
    sum / margins.len() as f64
}

/// Golden-section minimum of `f` on `[a, b]` (argument, value): deterministic and
/// derivative-free, for the unimodal likelihoods of this module.
fn golden(mut a: f64, mut b: f64, steps: usize, f: impl Fn(f64) -> f64) -> (f64, f64) {
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut c, mut d) = (b - r * (b - a), a + r * (b - a));
    let (mut fc, mut fd) = (f(c), f(d));
    for _ in 0..steps {
        if fc <= fd {
            b = d;
            d = c;
            fd = fc;
            c = b - r * (b - a);
            fc = f(c);
        } else {
            a = c;
            c = d;
            fc = fd;
            d = a + r * (b - a);
            fd = f(d);
        }
    }
    let u = (a + b) / 2.0;
    (u, f(u))
}

/// Fits Platt scaling, `sigmoid(z / T + b)`, by minimising the mean NLL: for a single
/// view this is a logistic regression of the label on the margin, whose likelihood is
/// concave, so a golden-section search over `ln T` of the best `b` for each `T` (also by
/// golden section) finds it. `None` in the cases [`fit_temperature`] gives `None`.
///
/// # Panics
/// If `margins` and `positives` differ in length.
pub fn fit_platt(margins: &[Vec<f32>], positives: &[bool]) -> Option<PlattFit> {
    // Same admissibility as the temperature alone.
    fit_temperature(margins, positives)?;
    const STEPS: usize = 60;
    let best_bias = |t: f64| {
        golden(-BIAS_MAX, BIAS_MAX, STEPS, |b| {
            nll_scaled(
                margins,
                positives,
                Scaling {
                    temperature: t,
                    bias: b,
                },
            )
        })
    };
    let (u, _) = golden(T_MIN.ln(), T_MAX.ln(), STEPS, |u| best_bias(u.exp()).1);
    let temperature = u.exp();
    let (bias, nll_after) = best_bias(temperature);
    let near = |x: f64, bound: f64| (x - bound).abs() < 1e-3;
    Some(PlattFit {
        scaling: Scaling { temperature, bias },
        nll_before: nll(margins, positives, 1.0),
        nll_after,
        at_bound: near(u, T_MIN.ln())
            || near(u, T_MAX.ln())
            || near(bias, -BIAS_MAX)
            || near(bias, BIAS_MAX),
    })
}

/// One bin of a reliability diagram.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ReliabilityBin {
    /// Lower edge (inclusive).
    pub lo: f64,
    /// Upper edge (exclusive, but 1.0 belongs to the last bin).
    pub hi: f64,
    /// Images in the bin.
    pub count: usize,
    /// Mean p_effusion of those images (0 when empty).
    pub mean_p: f64,
    /// Share of them with effusion (0 when empty).
    pub positive_rate: f64,
}

/// The reliability diagram's data: `bins` equal-width bins of p_effusion over `[0, 1]`
/// (see the module docs).
///
/// # Panics
/// If `scores` and `positives` differ in length.
pub fn reliability(scores: &[f32], positives: &[bool], bins: usize) -> Vec<ReliabilityBin> {
    assert_eq!(scores.len(), positives.len(), "scores and labels differ");
    let bins = bins.max(1);
    let mut sum_p = vec![0.0f64; bins];
    let mut pos = vec![0usize; bins];
    let mut count = vec![0usize; bins];
    for (&s, &y) in scores.iter().zip(positives) {
        if s.is_nan() {
            continue;
        }
        let p = f64::from(s).clamp(0.0, 1.0);
        let b = ((p * bins as f64) as usize).min(bins - 1);
        sum_p[b] += p;
        pos[b] += usize::from(y);
        count[b] += 1;
    }
    (0..bins)
        .map(|b| {
            let n = count[b];
            let div = |x: f64| if n == 0 { 0.0 } else { x / n as f64 };
            ReliabilityBin {
                lo: b as f64 / bins as f64,
                hi: (b + 1) as f64 / bins as f64,
                count: n,
                mean_p: div(sum_p[b]),
                positive_rate: div(pos[b] as f64),
            }
        })
        .collect()
}

/// Expected calibration error over [`ECE_BINS`] equal-width bins (see the module docs);
/// `None` when there is no (non-NaN) score.
///
/// # Panics
/// If `scores` and `positives` differ in length.
pub fn ece(scores: &[f32], positives: &[bool]) -> Option<f64> {
    let bins = reliability(scores, positives, ECE_BINS);
    let n: usize = bins.iter().map(|b| b.count).sum();
    if n == 0 {
        return None;
    }
    Some(
        bins.iter()
            .map(|b| b.count as f64 / n as f64 * (b.mean_p - b.positive_rate).abs())
            .sum(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Margins z ~ N(0, 3^2) and labels drawn from sigmoid(z / t_true): the model is
    /// over-confident by exactly t_true.
    fn synthetic(n: usize, t_true: f64, seed: u64) -> (Vec<Vec<f32>>, Vec<bool>) {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut margins = Vec::with_capacity(n);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            // Box-Muller.
            let (u1, u2): (f64, f64) = (rng.random::<f64>().max(1e-300), rng.random());
            let z = 3.0 * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            labels.push(rng.random::<f64>() < sigmoid(z / t_true));
            margins.push(vec![z as f32]);
        }
        (margins, labels)
    }

    fn probabilities(margins: &[Vec<f32>], t: f64) -> Vec<f32> {
        margins.iter().map(|v| calibrated_p(v, t)).collect()
    }

    #[test]
    fn temperature_recovers_a_known_overconfidence_and_lowers_ece() {
        let (margins, labels) = synthetic(20_000, 2.0, 7);
        let fit = fit_temperature(&margins, &labels).unwrap();
        assert!(
            (fit.temperature - 2.0).abs() < 0.1,
            "T = {}",
            fit.temperature
        );
        assert!(fit.nll_after < fit.nll_before);
        assert!(!fit.at_bound);
        let before = ece(&probabilities(&margins, 1.0), &labels).unwrap();
        let after = ece(&probabilities(&margins, fit.temperature), &labels).unwrap();
        assert!(before > 0.05, "over-confident by 2x: ECE {before}");
        assert!(after < 0.02 && after < before / 3.0, "{before} -> {after}");
        // Deterministic.
        assert_eq!(fit_temperature(&margins, &labels).unwrap(), fit);

        // An under-confident model gets T < 1.
        let (margins, labels) = synthetic(20_000, 0.5, 8);
        let fit = fit_temperature(&margins, &labels).unwrap();
        assert!((fit.temperature - 0.5).abs() < 0.05, "{}", fit.temperature);
    }

    #[test]
    fn a_calibrated_model_keeps_t_near_one() {
        let (margins, labels) = synthetic(20_000, 1.0, 9);
        let fit = fit_temperature(&margins, &labels).unwrap();
        assert!((fit.temperature - 1.0).abs() < 0.06, "{}", fit.temperature);
        assert!(fit.nll_before - fit.nll_after < 1e-3);
    }

    #[test]
    fn temperature_needs_both_classes_and_finite_margins() {
        assert!(fit_temperature(&[vec![1.0], vec![2.0]], &[true, true]).is_none());
        assert!(fit_temperature(&[], &[]).is_none());
        assert!(fit_temperature(&[vec![f32::NAN], vec![2.0]], &[true, false]).is_none());
        // Perfectly separated: the NLL keeps falling as T shrinks, so T hits the bound.
        let fit = fit_temperature(&[vec![5.0], vec![-5.0]], &[true, false]).unwrap();
        assert!(fit.at_bound && fit.temperature < 0.06, "{fit:?}");
    }

    /// Margins shifted by ln 9 (what class weights of 9:1 do) and over-confident by 2:
    /// Platt recovers both, a temperature alone cannot, and Platt's ECE is far lower.
    #[test]
    fn platt_recovers_a_shift_that_temperature_cannot() {
        let (margins, labels) = synthetic(20_000, 2.0, 11);
        let shift = 9f32.ln();
        let shifted: Vec<Vec<f32>> = margins.iter().map(|v| vec![v[0] * 2.0 + shift]).collect();
        // labels ~ sigmoid(z / 2) = sigmoid((z' - ln 9) / 4) = sigmoid(z' / 4 - ln 9 / 4).
        let fit = fit_platt(&shifted, &labels).unwrap();
        let s = fit.scaling;
        assert!((s.temperature - 4.0).abs() < 0.25, "{s:?}");
        assert!((s.bias + f64::from(shift) / 4.0).abs() < 0.08, "{s:?}");
        assert!(!fit.at_bound && fit.nll_after < fit.nll_before);
        let t_only = fit_temperature(&shifted, &labels).unwrap();
        assert!(fit.nll_after < t_only.nll_after);
        let ece_of = |sc: Scaling| {
            let p: Vec<f32> = shifted.iter().map(|v| scaled_p(v, sc)).collect();
            ece(&p, &labels).unwrap()
        };
        let (e_t, e_p) = (
            ece_of(Scaling {
                temperature: t_only.temperature,
                bias: 0.0,
            }),
            ece_of(s),
        );
        assert!(
            e_p < 0.02 && e_p < e_t / 2.0,
            "temperature {e_t}, platt {e_p}"
        );
        assert_eq!(fit_platt(&shifted, &labels).unwrap(), fit, "deterministic");
        assert!(fit_platt(&[vec![1.0]], &[true]).is_none());
    }

    #[test]
    fn views_average_probabilities() {
        let p = calibrated_p(&[0.0, 100.0], 1.0);
        assert!((p - 0.75).abs() < 1e-6);
        assert!(calibrated_p(&[], 1.0).is_nan());
        assert!((calibrated_p(&[2.0], 2.0) - sigmoid(1.0) as f32).abs() < 1e-7);
        assert!((logit(sigmoid(1.3)) - 1.3).abs() < 1e-9);
    }

    #[test]
    fn ece_and_reliability_known_case() {
        // Bin [0.1, 0.2): 0.1 twice, one effusion -> |0.1 - 0.5| = 0.4 on 2 of 4 images.
        // Bin [0.9, 1.0]: 0.95 and 1.0, both effusion -> |0.975 - 1| = 0.025 on 2 of 4.
        let scores = [0.1, 0.1, 0.95, 1.0, f32::NAN];
        let labels = [true, false, true, true, true];
        let bins = reliability(&scores, &labels, ECE_BINS);
        assert_eq!(bins.len(), 10);
        assert_eq!(bins[1].count, 2);
        assert_eq!(bins[9].count, 2, "1.0 belongs to the last bin");
        assert_eq!(
            bins.iter().map(|b| b.count).sum::<usize>(),
            4,
            "NaN left out"
        );
        let e = ece(&scores, &labels).unwrap();
        assert!((e - (0.5 * 0.4 + 0.5 * 0.025)).abs() < 1e-6, "{e}");
        assert!(ece(&[f32::NAN], &[true]).is_none());
    }
}
