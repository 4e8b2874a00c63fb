//! Trial settings of the training recipe: regularisation and evaluation options that are
//! off (neutral) by default, so a run without them trains exactly as before.
//!
//! Why each exists, for a small, imbalanced CXR set:
//!
//! - **Label smoothing** (`--label-smoothing X`): targets `1 - X` and `X` instead of 1 and
//!   0, so the model is not pushed to infinite logits on a few hundred images; mostly a
//!   calibration aid.
//! - **Mixup** (`--mixup ALPHA`): each training batch is mixed with a permutation of
//!   itself, images and labels with one weight `lambda ~ Beta(ALPHA, ALPHA)`. CXR-safe: it
//!   blends whole radiographs (no crops, no flips), and the loss is the same blend of the
//!   two labels' losses.
//! - **Dropout** (`--dropout P`) on the pooled features before the final layer. Only in
//!   training: eval mode (what is exported and served) is unchanged, so the ONNX graph is
//!   the same.
//! - **Warm-up** (`--warmup-epochs N`): the learning rate rises linearly, batch by batch,
//!   over the first N epochs, before the schedule takes over; Adam's early steps on
//!   freshly initialised batch norms are otherwise large.
//! - **EMA** (`--ema DECAY`): an exponential moving average of the weights, updated
//!   after every step, is what is evaluated, kept and exported (after its own precise
//!   batch-norm statistics). Averaging over the last steps smooths the noise of small
//!   batches. Early steps use `min(DECAY, (1 + n) / (10 + n))` so the average is not
//!   dominated by the random initial weights in a short run.
//! - **Augmentation strength** (`--augment-strength S`): multiplies the rotation, shift,
//!   scale, brightness, contrast and noise ranges (not the flip probability); 1.0 is the
//!   default ranges.
//! - **Flip TTA** (`--tta-flip`): evaluation averages p_effusion over the image and its
//!   horizontal flip. It changes the validation (and out-of-fold) predictions; a
//!   served model gets the same only if the exported graph flips too, which `train`
//!   then asks of the export (`export::export_ensemble` with one member).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::nn::{self, ModuleT};
use tch::{Kind, Reduction, Tensor};

use pleura::model::onnx::ResNetSpec;

use crate::augment::AugmentConfig;
use crate::model::ResNet;

/// The trial settings; [`Recipe::default`] is the neutral recipe (today's training).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recipe {
    /// Label smoothing in `[0, 0.5)`; 0 is off.
    pub label_smoothing: f64,
    /// Mixup's Beta(alpha, alpha); 0 is off.
    pub mixup_alpha: f64,
    /// Dropout probability before the final layer, in `[0, 1)`; 0 is off.
    pub dropout: f64,
    /// Epochs of linear learning-rate warm-up; 0 is off.
    pub warmup_epochs: usize,
    /// EMA decay in `(0, 1)`; `None` is off.
    pub ema_decay: Option<f64>,
    /// Factor on the augmentation ranges; 1 is the default ranges.
    pub augment_strength: f64,
    /// Average evaluation over the image and its horizontal flip.
    pub tta_flip: bool,
}

impl Default for Recipe {
    fn default() -> Self {
        Recipe {
            label_smoothing: 0.0,
            mixup_alpha: 0.0,
            dropout: 0.0,
            warmup_epochs: 0,
            ema_decay: None,
            augment_strength: 1.0,
            tta_flip: false,
        }
    }
}

impl Recipe {
    /// Whether every setting is neutral.
    pub fn is_default(&self) -> bool {
        *self == Recipe::default()
    }

    /// Every setting that cannot work, in words (empty when all is well).
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if !(0.0..0.5).contains(&self.label_smoothing) {
            out.push(format!(
                "--label-smoothing {} must be within [0, 0.5)",
                self.label_smoothing
            ));
        }
        if !(self.mixup_alpha >= 0.0 && self.mixup_alpha <= 100.0) {
            out.push(format!(
                "--mixup {} must be within [0, 100] (0 is off)",
                self.mixup_alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            out.push(format!("--dropout {} must be within [0, 1)", self.dropout));
        }
        if let Some(d) = self.ema_decay {
            if !(d > 0.0 && d < 1.0) {
                out.push(format!("--ema {d} must be within (0, 1)"));
            }
        }
        match self.augmentation(true) {
            Some(a) if a.validate().is_err() => out.push(format!(
                "--augment-strength {} makes the augmentation ranges impossible \
                 (contrast and scale must stay below 100%)",
                self.augment_strength
            )),
            _ if !(self.augment_strength >= 0.0 && self.augment_strength.is_finite()) => {
                out.push(format!(
                    "--augment-strength {} must be finite and >= 0",
                    self.augment_strength
                ))
            }
            _ => {}
        }
        out
    }

    /// The augmentation for training (`None` when `augment` is off): the default ranges,
    /// magnitudes scaled by the strength.
    pub fn augmentation(&self, augment: bool) -> Option<AugmentConfig> {
        if !augment {
            return None;
        }
        let d = AugmentConfig::default();
        let s = self.augment_strength;
        Some(AugmentConfig {
            hflip_p: d.hflip_p,
            max_rotate_deg: d.max_rotate_deg * s,
            max_shift: d.max_shift * s,
            max_scale: d.max_scale * s,
            brightness: d.brightness * s,
            contrast: d.contrast * s,
            noise_std: d.noise_std * s,
        })
    }

    /// Factor on the scheduled learning rate for batch `batch` of `batches` in `epoch`
    /// (all 0-based): rises linearly to 1 over the warm-up epochs, then 1.
    pub fn warmup_factor(&self, epoch: usize, batch: usize, batches: usize) -> f64 {
        if epoch >= self.warmup_epochs {
            return 1.0;
        }
        let step = (epoch * batches + batch + 1) as f64;
        (step / (self.warmup_epochs * batches.max(1)) as f64).min(1.0)
    }

    /// Mixup for one batch of `n` images, or `None` when mixup is off or the batch has
    /// one image. Seeded by (epoch seed, batch index), so a resumed or repeated epoch
    /// mixes the same way.
    pub fn mixup(&self, epoch_seed: u64, batch: usize, n: usize) -> Option<Mix> {
        if self.mixup_alpha <= 0.0 || n < 2 {
            return None;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(epoch_seed ^ MIXUP_SALT);
        rng.set_stream(batch as u64);
        let lambda = beta(&mut rng, self.mixup_alpha);
        let mut perm: Vec<i64> = (0..n as i64).collect();
        for i in (1..n).rev() {
            perm.swap(i, rng.random_range(0..=i));
        }
        Some(Mix { lambda, perm })
    }
}

/// Keeps mixup's random stream apart from the epoch seed's other uses.
const MIXUP_SALT: u64 = 0x6d69_7875_705f_7631;

/// One batch's mixup: `lambda x + (1 - lambda) x[perm]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Mix {
    /// Weight of the batch's own images and labels.
    pub lambda: f64,
    /// The partner of each image.
    pub perm: Vec<i64>,
}

impl Mix {
    /// The mixed images and the partners' labels.
    pub fn apply(&self, xs: &Tensor, ys: &Tensor) -> (Tensor, Tensor) {
        let perm = Tensor::from_slice(&self.perm).to_device(xs.device());
        let mixed = xs * self.lambda + xs.index_select(0, &perm) * (1.0 - self.lambda);
        (mixed, ys.index_select(0, &perm))
    }
}

/// Class-weighted cross-entropy with label smoothing, blended over mixup's two labels
/// when there is a mix (`partner` labels and `lambda`).
pub fn loss(
    logits: &Tensor,
    ys: &Tensor,
    partner: Option<(&Tensor, f64)>,
    weights: &Tensor,
    label_smoothing: f64,
) -> Tensor {
    let ce = |y: &Tensor| {
        logits.cross_entropy_loss(y, Some(weights), Reduction::Mean, -100, label_smoothing)
    };
    match partner {
        None => ce(ys),
        Some((other, lambda)) => ce(ys) * lambda + ce(other) * (1.0 - lambda),
    }
}

/// A draw from Beta(a, a), as X / (X + Y) with X, Y ~ Gamma(a, 1).
fn beta(rng: &mut ChaCha8Rng, a: f64) -> f64 {
    let (x, y) = (gamma(rng, a), gamma(rng, a));
    if x + y > 0.0 {
        x / (x + y)
    } else {
        0.5
    }
}

/// A draw from Gamma(a, 1) by Marsaglia and Tsang's method; for `a < 1`, through
/// Gamma(a + 1) times `U^(1/a)`.
fn gamma(rng: &mut ChaCha8Rng, a: f64) -> f64 {
    if a < 1.0 {
        let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        return gamma(rng, a + 1.0) * u.powf(1.0 / a);
    }
    let d = a - 1.0 / 3.0;
    let c = 1.0 / (9.0 * d).sqrt();
    loop {
        let x = normal(rng);
        let v = (1.0 + c * x).powi(3);
        if v <= 0.0 {
            continue;
        }
        let u: f64 = rng.random();
        if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
            return d * v;
        }
    }
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// The exponential moving average of a network's weights, as a network of its own.
#[derive(Debug)]
pub struct Ema {
    /// The averaged weights (batch-norm statistics are recomputed before evaluation).
    pub vs: nn::VarStore,
    /// The network on them.
    pub net: ResNet,
    decay: f64,
    updates: u64,
}

impl Ema {
    /// Starts the average at `src`'s current weights.
    pub fn new(src: &nn::VarStore, spec: &ResNetSpec, decay: f64) -> Result<Ema, tch::TchError> {
        let mut vs = nn::VarStore::new(src.device());
        let net = ResNet::new(&vs.root(), spec);
        vs.copy(src)?;
        Ok(Ema {
            vs,
            net,
            decay,
            updates: 0,
        })
    }

    /// Folds `src`'s trainable weights into the average (after an optimiser step).
    pub fn update(&mut self, src: &nn::VarStore) {
        let n = self.updates as f64;
        let d = self.decay.min((1.0 + n) / (10.0 + n));
        let mine = self.vs.variables();
        tch::no_grad(|| {
            for (name, w) in src.variables() {
                if !w.requires_grad() {
                    continue;
                }
                if let Some(e) = mine.get(&name) {
                    let mut e = e.shallow_clone();
                    let _ = e
                        .f_mul_scalar_(d)
                        .and_then(|mut e| e.f_add_(&(&w * (1.0 - d))));
                }
            }
        });
        self.updates += 1;
    }

    /// The averaged network in eval mode on `xs` (for tests).
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        self.net.forward_t(xs, false)
    }
}

/// What evaluation takes from one batch.
pub struct Views {
    /// The unflipped image's logits `[N, 2]` (the loss is computed on these).
    pub logits: Tensor,
    /// p_effusion `[N]`, averaged over the views.
    pub p: Tensor,
    /// Each view's margin `logit_effusion - logit_nofinding` `[N]` (see `calibration`):
    /// the image's, then its flip's under flip TTA.
    pub margins: Vec<Tensor>,
}

/// Evaluates `net` (eval mode) on `xs`: p_effusion per image, averaged over the image
/// and its horizontal flip when `tta_flip`.
pub fn eval_views(net: &ResNet, xs: &Tensor, tta_flip: bool) -> Views {
    let logits = net.forward_t(xs, false);
    let mut views = vec![logits.shallow_clone()];
    if tta_flip {
        // Width is the last axis of [N, C, H, W]: a left-right flip.
        views.push(net.forward_t(&xs.flip([3]), false));
    }
    let margins = views
        .iter()
        .map(|l| l.select(1, 0) - l.select(1, 1))
        .collect();
    let p = views
        .iter()
        .map(|l| l.softmax(1, Kind::Float).select(1, 0))
        .reduce(|a, b| a + b)
        .expect("at least one view")
        / views.len() as f64;
    Views { logits, p, margins }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_recipe_is_neutral() {
        let r = Recipe::default();
        assert!(r.is_default() && r.problems().is_empty());
        assert_eq!(r.augmentation(true), Some(AugmentConfig::default()));
        assert_eq!(r.augmentation(false), None);
        assert_eq!(r.warmup_factor(0, 0, 10), 1.0);
        assert!(r.mixup(1, 0, 8).is_none());
    }

    #[test]
    fn problems_are_named() {
        let bad = Recipe {
            label_smoothing: 0.5,
            mixup_alpha: -1.0,
            dropout: 1.0,
            ema_decay: Some(1.0),
            augment_strength: 10.0,
            ..Recipe::default()
        };
        let p = bad.problems().join("\n");
        for flag in [
            "--label-smoothing",
            "--mixup",
            "--dropout",
            "--ema",
            "--augment-strength",
        ] {
            assert!(p.contains(flag), "{flag} in {p}");
        }
    }

    #[test]
    fn strength_scales_magnitudes_not_the_flip() {
        let r = Recipe {
            augment_strength: 2.0,
            ..Recipe::default()
        };
        let (a, d) = (r.augmentation(true).unwrap(), AugmentConfig::default());
        assert_eq!(a.hflip_p, d.hflip_p);
        assert_eq!(a.max_rotate_deg, 2.0 * d.max_rotate_deg);
        assert_eq!(a.noise_std, 2.0 * d.noise_std);
        assert_eq!(a.contrast, 2.0 * d.contrast);
    }

    #[test]
    fn warmup_rises_linearly_by_batch() {
        let r = Recipe {
            warmup_epochs: 2,
            ..Recipe::default()
        };
        assert!((r.warmup_factor(0, 0, 5) - 0.1).abs() < 1e-12);
        assert!((r.warmup_factor(1, 4, 5) - 1.0).abs() < 1e-12);
        assert_eq!(r.warmup_factor(2, 0, 5), 1.0);
    }

    #[test]
    fn mixup_is_seeded_and_beta_has_the_right_mean() {
        let r = Recipe {
            mixup_alpha: 0.4,
            ..Recipe::default()
        };
        let m = r.mixup(7, 3, 8).unwrap();
        assert_eq!(r.mixup(7, 3, 8).unwrap(), m);
        assert_ne!(r.mixup(7, 4, 8).unwrap(), m);
        let mut sorted = m.perm.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<i64>>());
        // Beta(a, a) has mean 1/2 and variance 1 / (4 (2a + 1)).
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let draws: Vec<f64> = (0..20_000).map(|_| beta(&mut rng, 0.4)).collect();
        let mean = draws.iter().sum::<f64>() / draws.len() as f64;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / draws.len() as f64;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        assert!((var - 1.0 / (4.0 * 1.8)).abs() < 0.01, "{var}");
        assert!(draws.iter().all(|x| (0.0..=1.0).contains(x)));
    }

    #[test]
    fn mixed_loss_blends_the_two_labels() {
        let logits = Tensor::from_slice(&[2.0f32, -1.0, 0.5, 0.5]).view([2, 2]);
        let ys = Tensor::from_slice(&[0i64, 1]);
        let other = Tensor::from_slice(&[1i64, 0]);
        let w = Tensor::from_slice(&[1.0f32, 1.0]);
        let a = loss(&logits, &ys, None, &w, 0.0).double_value(&[]);
        let b = loss(&logits, &other, None, &w, 0.0).double_value(&[]);
        let mixed = loss(&logits, &ys, Some((&other, 0.3)), &w, 0.0).double_value(&[]);
        assert!((mixed - (0.3 * a + 0.7 * b)).abs() < 1e-6);
        let smoothed = loss(&logits, &ys, None, &w, 0.1).double_value(&[]);
        assert!(smoothed != a);
    }

    #[test]
    fn ema_moves_towards_the_weights() {
        let spec = ResNetSpec {
            image_size: 32,
            ..ResNetSpec::with_width(2)
        };
        let src = nn::VarStore::new(tch::Device::Cpu);
        let _net = ResNet::new(&src.root(), &spec);
        let mut ema = Ema::new(&src, &spec, 0.5).unwrap();
        let name = "fc.bias";
        let start = ema.vs.variables()[name].copy();
        tch::no_grad(|| {
            let _ = src.variables()[name].shallow_clone().fill_(3.0);
        });
        ema.update(&src);
        // First update: d = min(0.5, 1/10) = 0.1, so e = 0.1 start + 0.9 * 3.
        let expected = start * 0.1 + 2.7;
        let got = ema.vs.variables()[name].copy();
        assert!(
            (got - expected).abs().max().double_value(&[]) < 1e-5,
            "EMA update"
        );
        let xs = Tensor::zeros([2, 1, 32, 32], (Kind::Float, tch::Device::Cpu));
        assert_eq!(ema.forward(&xs).size(), vec![2, 2]);
    }
}
