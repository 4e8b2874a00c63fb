//! Adam whose state can be saved and restored.
//!
//! tch's `nn::Optimizer` wraps libtorch's C++ optimiser, whose moment
//! estimates and step counts cannot be read out. A run resumed with a fresh
//! optimiser would restart Adam's bias correction and forget its moment
//! estimates, so it would not continue the run it claims to continue. This
//! is the same algorithm as `torch.optim.Adam` (L2 weight decay added to the
//! gradient, bias-corrected moments), over the trainable variables of a
//! `VarStore` by name, with its state in one file.

use std::path::Path;

use tch::nn::VarStore;
use tch::{TchError, Tensor};

/// Adam's hyper-parameters; the defaults are torch's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamConfig {
    /// Decay of the first-moment estimate.
    pub beta1: f64,
    /// Decay of the second-moment estimate.
    pub beta2: f64,
    /// Added to the denominator, against division by a vanishing second moment.
    pub eps: f64,
    /// L2 penalty, added to the gradient as `weight_decay * parameter`.
    pub weight_decay: f64,
}

impl Default for AdamConfig {
    fn default() -> Self {
        AdamConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Why optimiser state could not be saved or restored.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// libtorch failed to compute, read or write.
    #[error("optimiser: {0}")]
    Torch(#[from] TchError),
    /// The saved state does not belong to these variables.
    #[error("optimiser state does not match the model: {0}")]
    Mismatch(String),
}

/// One variable and what Adam remembers of it.
#[derive(Debug)]
struct Slot {
    name: String,
    param: Tensor,
    /// Steps taken with a gradient; torch counts per parameter too, so a
    /// parameter that once had no gradient keeps its own bias correction.
    step: i64,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
}

/// Adam over a `VarStore`'s trainable variables.
#[derive(Debug)]
pub struct Adam {
    cfg: AdamConfig,
    lr: f64,
    /// Sorted by name, so that the state file and the update order do not
    /// depend on the order the network registered its variables in.
    slots: Vec<Slot>,
}

const EXP_AVG: &str = "exp_avg";
const EXP_AVG_SQ: &str = "exp_avg_sq";
const STEP: &str = "step";

impl Adam {
    /// Adam with learning rate `lr` over every trainable variable in `vs`
    /// (those that require a gradient; batch-norm statistics do not).
    pub fn new(vs: &VarStore, cfg: AdamConfig, lr: f64) -> Result<Adam, OptimError> {
        let mut vars: Vec<(String, Tensor)> = vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        let slots = vars
            .into_iter()
            .map(|(name, param)| {
                Ok(Slot {
                    exp_avg: param.f_zeros_like()?,
                    exp_avg_sq: param.f_zeros_like()?,
                    step: 0,
                    name,
                    param,
                })
            })
            .collect::<Result<Vec<_>, TchError>>()?;
        Ok(Adam { cfg, lr, slots })
    }

    /// Sets the learning rate of the following steps.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The learning rate of the next step.
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Names of the variables it updates, in update order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.slots.iter().map(|s| s.name.as_str())
    }

    /// Zeroes every variable's gradient.
    pub fn zero_grad(&mut self) {
        for s in &mut self.slots {
            s.param.zero_grad();
        }
    }

    /// One Adam step on every variable that has a gradient.
    ///
    /// The operations follow libtorch's `torch::optim::Adam::step` one for
    /// one; libtorch fuses some multiply-adds that tch cannot express, so
    /// results agree to float rounding, not bit for bit.
    pub fn step(&mut self) -> Result<(), OptimError> {
        let AdamConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.cfg;
        let lr = self.lr;
        tch::no_grad(|| -> Result<(), OptimError> {
            for s in &mut self.slots {
                let grad = s.param.grad();
                if !grad.defined() {
                    continue;
                }
                s.step += 1;
                let bias_correction1 = 1.0 - beta1.powi(step_exponent(s.step));
                let bias_correction2 = 1.0 - beta2.powi(step_exponent(s.step));
                let grad = if weight_decay != 0.0 {
                    grad.f_add(&s.param.f_mul_scalar(weight_decay)?)?
                } else {
                    grad
                };
                let _ = s.exp_avg.f_mul_scalar_(beta1)?;
                let _ = s.exp_avg.f_add_(&grad.f_mul_scalar(1.0 - beta1)?)?;
                let _ = s.exp_avg_sq.f_mul_scalar_(beta2)?;
                let _ = s
                    .exp_avg_sq
                    .f_add_(&grad.f_mul_scalar(1.0 - beta2)?.f_mul(&grad)?)?;
                let denom = s
                    .exp_avg_sq
                    .f_sqrt()?
                    .f_div_scalar(bias_correction2.sqrt())?
                    .f_add_scalar(eps)?;
                let step_size = lr / bias_correction1;
                let update = s.exp_avg.f_mul_scalar(-step_size)?.f_div(&denom)?;
                let _ = s.param.f_add_(&update)?;
            }
            Ok(())
        })
    }

    /// Zeroes the gradients, back-propagates `loss` and takes a step.
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<(), OptimError> {
        self.zero_grad();
        loss.f_backward()?;
        self.step()
    }

    /// Writes the state (step counts and both moments of every variable,
    /// by name) to `path`, in libtorch's tensor-archive format.
    pub fn save(&self, path: &Path) -> Result<(), OptimError> {
        let mut named: Vec<(String, Tensor)> = Vec::with_capacity(3 * self.slots.len());
        for s in &self.slots {
            named.push((key(&s.name, STEP), Tensor::from(s.step)));
            named.push((key(&s.name, EXP_AVG), s.exp_avg.shallow_clone()));
            named.push((key(&s.name, EXP_AVG_SQ), s.exp_avg_sq.shallow_clone()));
        }
        Tensor::save_multi(&named, path)?;
        Ok(())
    }

    /// Restores state written by [`Adam::save`] for the same variables.
    ///
    /// The file must hold exactly this optimiser's variables with their
    /// shapes: state for another network would be applied silently otherwise.
    pub fn load(&mut self, path: &Path) -> Result<(), OptimError> {
        let mut saved: std::collections::HashMap<String, Tensor> =
            Tensor::load_multi(path)?.into_iter().collect();
        let expected = 3 * self.slots.len();
        if saved.len() != expected {
            return Err(OptimError::Mismatch(format!(
                "{} tensors saved, {expected} expected",
                saved.len()
            )));
        }
        let mut take = |name: &str, part: &str| {
            saved
                .remove(&key(name, part))
                .ok_or_else(|| OptimError::Mismatch(format!("no {part} for {name}")))
        };
        let mut restored = Vec::with_capacity(self.slots.len());
        for s in &self.slots {
            let step = take(&s.name, STEP)?.f_int64_value(&[])?;
            let m = take(&s.name, EXP_AVG)?;
            let v = take(&s.name, EXP_AVG_SQ)?;
            for (part, t) in [(EXP_AVG, &m), (EXP_AVG_SQ, &v)] {
                if t.size() != s.param.size() {
                    return Err(OptimError::Mismatch(format!(
                        "{part} of {} has shape {:?}, the variable {:?}",
                        s.name,
                        t.size(),
                        s.param.size()
                    )));
                }
            }
            if step < 0 {
                return Err(OptimError::Mismatch(format!(
                    "negative step count for {}",
                    s.name
                )));
            }
            let on = |t: Tensor| t.f_to_device(s.param.device())?.f_to_kind(s.param.kind());
            restored.push((step, on(m)?, on(v)?));
        }
        // Applied only once all of it checked out, so a bad file leaves the
        // optimiser as it was.
        for (s, (step, m, v)) in self.slots.iter_mut().zip(restored) {
            s.step = step;
            s.exp_avg = m;
            s.exp_avg_sq = v;
        }
        Ok(())
    }
}

fn key(name: &str, part: &str) -> String {
    format!("{name}/{part}")
}

/// `powi` takes an `i32`; beyond that the bias correction is 1 to the last bit anyway.
fn step_exponent(step: i64) -> i32 {
    i32::try_from(step).unwrap_or(i32::MAX)
}

/// The largest absolute difference between two tensors of one shape.
#[cfg(test)]
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64, TchError> {
    a.f_to_kind(tch::Kind::Double)?
        .f_sub(&b.f_to_kind(tch::Kind::Double)?)?
        .f_abs()?
        .f_max()?
        .f_double_value(&[])
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn::{self, Module, OptimizerConfig};
    use tch::{Device, Kind};

    /// A small net and the store that holds its variables.
    fn net() -> (nn::VarStore, nn::Sequential) {
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root();
        let m = nn::seq()
            .add(nn::linear(&root / "a", 6, 8, Default::default()))
            .add_fn(|x| x.tanh())
            .add(nn::linear(&root / "b", 8, 3, Default::default()));
        (vs, m)
    }

    /// A second net with the first one's weights.
    fn twin(of: &nn::VarStore) -> (nn::VarStore, nn::Sequential) {
        let (mut vs, m) = net();
        vs.copy(of).unwrap();
        (vs, m)
    }

    fn loss(m: &nn::Sequential, i: i64) -> Tensor {
        let xs = Tensor::arange(6 * 5, (Kind::Float, Device::Cpu))
            .view([5, 6])
            .f_mul_scalar(0.1 * (i + 1) as f64)
            .unwrap()
            .sin();
        let ys = Tensor::from_slice(&[0i64, 1, 2, 1, 0]).roll([i], [0]);
        m.forward(&xs).cross_entropy_for_logits(&ys)
    }

    fn max_diff(a: &nn::VarStore, b: &nn::VarStore) -> f64 {
        let (va, vb) = (a.variables(), b.variables());
        assert_eq!(va.len(), vb.len());
        va.iter()
            .map(|(k, t)| max_abs_diff(t, &vb[k]).unwrap())
            .fold(0.0, f64::max)
    }

    /// Would fail if the update drifted from torch's (bias correction, the
    /// placement of eps, decay added to the gradient rather than decoupled,
    /// a learning-rate change not taking effect).
    #[test]
    fn matches_libtorch_adam_step_for_step() {
        let (vs_t, m_t) = net();
        let (vs_o, m_o) = twin(&vs_t);
        let (lr, wd) = (0.05, 0.01);
        let mut torch = nn::Adam {
            wd,
            ..Default::default()
        }
        .build(&vs_t, lr)
        .unwrap();
        let cfg = AdamConfig {
            weight_decay: wd,
            ..AdamConfig::default()
        };
        let mut ours = Adam::new(&vs_o, cfg, lr).unwrap();
        assert_eq!(
            ours.names().collect::<Vec<_>>(),
            ["a.bias", "a.weight", "b.bias", "b.weight"]
        );
        let start = vs_o.variables()["a.weight"].copy();
        let mut worst = 0.0f64;
        for i in 0..30 {
            if i == 15 {
                torch.set_lr(lr / 3.0);
                ours.set_lr(lr / 3.0);
            }
            torch.backward_step(&loss(&m_t, i));
            ours.backward_step(&loss(&m_o, i)).unwrap();
            let d = max_diff(&vs_t, &vs_o);
            assert!(d <= 1e-6, "step {i}: max |torch - ours| = {d:e}");
            worst = worst.max(d);
        }
        eprintln!("largest difference from libtorch's Adam over 30 steps: {worst:e}");
        let moved = max_abs_diff(&start, &vs_o.variables()["a.weight"]).unwrap();
        assert!(moved > 0.1, "the weights must actually move ({moved})");
    }

    #[test]
    fn saved_state_continues_bit_for_bit() {
        let (vs_a, m_a) = net();
        let cfg = AdamConfig {
            weight_decay: 1e-3,
            ..AdamConfig::default()
        };
        let mut a = Adam::new(&vs_a, cfg, 0.01).unwrap();
        for i in 0..5 {
            a.backward_step(&loss(&m_a, i)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("adam.ot");
        a.save(&file).unwrap();
        let (vs_b, m_b) = twin(&vs_a);
        let mut b = Adam::new(&vs_b, cfg, 0.01).unwrap();
        b.load(&file).unwrap();
        // What a resume without the saved state would do.
        let (vs_c, m_c) = twin(&vs_a);
        let mut c = Adam::new(&vs_c, cfg, 0.01).unwrap();
        for i in 5..10 {
            a.backward_step(&loss(&m_a, i)).unwrap();
            b.backward_step(&loss(&m_b, i)).unwrap();
            c.backward_step(&loss(&m_c, i)).unwrap();
        }
        assert_eq!(max_diff(&vs_a, &vs_b), 0.0);
        assert!(max_diff(&vs_a, &vs_c) > 1e-4, "{}", max_diff(&vs_a, &vs_c));
    }

    #[test]
    fn state_of_another_network_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("adam.ot");
        let (vs, m) = net();
        let mut opt = Adam::new(&vs, AdamConfig::default(), 0.1).unwrap();
        opt.backward_step(&loss(&m, 0)).unwrap();

        let fewer = nn::VarStore::new(Device::Cpu);
        let _ = nn::linear(fewer.root() / "a", 6, 8, Default::default());
        Adam::new(&fewer, AdamConfig::default(), 0.1)
            .unwrap()
            .save(&file)
            .unwrap();
        let err = opt.load(&file).unwrap_err();
        assert!(matches!(err, OptimError::Mismatch(_)), "{err}");

        let wider = nn::VarStore::new(Device::Cpu);
        let _ = nn::linear(wider.root() / "a", 6, 9, Default::default());
        let _ = nn::linear(wider.root() / "b", 9, 3, Default::default());
        Adam::new(&wider, AdamConfig::default(), 0.1)
            .unwrap()
            .save(&file)
            .unwrap();
        let err = opt.load(&file).unwrap_err();
        assert!(err.to_string().contains("shape"), "{err}");
        assert!(opt.slots.iter().all(|s| s.step == 1));
    }
}
