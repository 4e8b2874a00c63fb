//! The effusion ResNet in tch, built from the shared [`ResNetSpec`].
//!
//! The fleet never runs this code: it serves the ONNX graph that
//! [`pleura::model::onnx::write_onnx`] writes from the same spec. That only works if
//! the two networks are the same function with the same parameter names, so
//! this module mirrors the writer layer for layer (7x7/2 stem conv, BN, ReLU,
//! 3x3/2 max-pool, basic blocks with identity or 1x1 downsample shortcuts,
//! global average pool, fc) and registers every tensor in the `VarStore`
//! under exactly the name [`ResNetSpec::params`] gives it. [`to_weights`]
//! then hands the `VarStore` to the writer, and refuses anything that is
//! missing, misshapen or unexpected rather than letting a naming drift reach
//! the fleet. `crate::export` checks the result numerically (tract vs tch).
//!
//! The network returns logits; the ONNX graph ends in a softmax. Training
//! wants logits (cross-entropy is computed from them stably), so the softmax
//! is applied outside: `softmax(model(x))` is what the ONNX graph computes.

use std::collections::{BTreeSet, HashMap};

use pleura::model::onnx::{ResNetSpec, Weights};
use tch::nn::{self, ModuleT};
use tch::{Device, Kind, Tensor};

/// Batch-norm epsilon, the same constant the ONNX writer puts in every
/// `BatchNormalization` node (torch's default). A different value here would
/// make tch and tract normalise differently and fail the parity check.
pub const BN_EPSILON: f64 = pleura::model::onnx::BN_EPSILON as f64;

/// Batch-norm momentum for the running statistics: torch's default 0.1
/// (`running = 0.9 * running + 0.1 * batch`). It only affects training; the
/// exported graph reads the running statistics as they are.
pub const BN_MOMENTUM: f64 = 0.1;

/// Suffix of PyTorch's batch-norm step counter. It is not an inference
/// parameter (it only matters when momentum is unset, which it never is
/// here), the ONNX graph has no use for it, and tch 0.26 does not create it;
/// should a later tch add it, [`to_weights`] skips it instead of failing.
const NUM_BATCHES_TRACKED: &str = "num_batches_tracked";

/// Why the tch network could not be built, placed on a device, or read out
/// as weights. (The fleet's side of a model has `pleura::model::EngineError`.)
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// `--device cuda` was asked for but libtorch sees no CUDA device.
    #[error(
        "device \"cuda\" was requested but tch reports no usable CUDA device \
         (is this libtorch a CPU-only build, or is the driver missing?); \
         use \"cpu\" or \"auto\""
    )]
    CudaUnavailable,
    /// The device string is not one of `auto`, `cpu`, `cuda`.
    #[error("unknown device {0:?}: expected \"auto\", \"cpu\" or \"cuda\"")]
    UnknownDevice(String),
    /// The spec does not describe a buildable network.
    #[error("invalid ResNet spec: {0}")]
    InvalidSpec(String),
    /// A parameter of the spec is not in the `VarStore`.
    #[error("VarStore has no variable {name:?} (a parameter of the spec)")]
    MissingParam {
        /// The spec's name for it.
        name: String,
    },
    /// A variable has a different shape from the spec's.
    #[error("VarStore variable {name:?} has shape {found:?}, the spec expects {expected:?}")]
    ShapeMismatch {
        /// Variable name.
        name: String,
        /// Shape from [`ResNetSpec::params`].
        expected: Vec<i64>,
        /// Shape in the `VarStore`.
        found: Vec<i64>,
    },
    /// The `VarStore` holds a variable that is not a parameter of the spec:
    /// almost always a naming mismatch, so it is refused rather than dropped.
    #[error("VarStore variable {name:?} is not a parameter of the spec")]
    UnexpectedVariable {
        /// Variable name.
        name: String,
    },
    /// libtorch failed (e.g. copying a tensor off the device).
    #[error("tch: {0}")]
    Tch(#[from] tch::TchError),
}

/// One basic block: two 3x3 convs with batch norm, and a shortcut that is
/// the identity or, when the shape changes, a 1x1 conv with batch norm.
#[derive(Debug)]
struct BasicBlock {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    downsample: Option<(nn::Conv2D, nn::BatchNorm)>,
}

impl BasicBlock {
    fn new(p: &nn::Path, in_ch: i64, out_ch: i64, stride: i64) -> BasicBlock {
        // Same rule as the writer: project the shortcut whenever the block
        // changes resolution or width.
        let downsample = (stride != 1 || in_ch != out_ch).then(|| {
            let d = p / "downsample";
            (
                conv(&(&d / "0"), in_ch, out_ch, 1, stride, 0),
                batch_norm(&(&d / "1"), out_ch),
            )
        });
        BasicBlock {
            conv1: conv(&(p / "conv1"), in_ch, out_ch, 3, stride, 1),
            bn1: batch_norm(&(p / "bn1"), out_ch),
            conv2: conv(&(p / "conv2"), out_ch, out_ch, 3, 1, 1),
            bn2: batch_norm(&(p / "bn2"), out_ch),
            downsample,
        }
    }

    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let ys = xs
            .apply(&self.conv1)
            .apply_t(&self.bn1, train)
            .relu()
            .apply(&self.conv2)
            .apply_t(&self.bn2, train);
        let shortcut = match &self.downsample {
            Some((c, bn)) => xs.apply(c).apply_t(bn, train),
            None => xs.shallow_clone(),
        };
        (ys + shortcut).relu()
    }
}

/// The ResNet described by a [`ResNetSpec`]; returns logits `[N, classes]`.
#[derive(Debug)]
pub struct ResNet {
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    blocks: Vec<BasicBlock>,
    fc: nn::Linear,
    /// Dropout on the pooled features in training only (see [`ResNet::with_dropout`]).
    dropout: f64,
}

/// A bias-free square conv. Kaiming-normal (fan-out, ReLU gain) as
/// torchvision initialises ResNet convs.
fn conv(p: &nn::Path, in_ch: i64, out_ch: i64, k: i64, stride: i64, padding: i64) -> nn::Conv2D {
    let cfg = nn::ConvConfig {
        stride,
        padding,
        bias: false,
        ws_init: nn::Init::Kaiming {
            dist: nn::init::NormalOrUniform::Normal,
            fan: nn::init::FanInOut::FanOut,
            non_linearity: nn::init::NonLinearity::ReLU,
        },
        ..Default::default()
    };
    nn::conv2d(p, in_ch, out_ch, k, cfg)
}

/// Batch norm with the writer's epsilon and torch's momentum. Weight starts
/// at 1 (torch's init; tch's default is uniform in [0, 1]) and bias at 0, so
/// an untrained block starts close to the identity-plus-residual torch uses.
fn batch_norm(p: &nn::Path, ch: i64) -> nn::BatchNorm {
    let cfg = nn::BatchNormConfig {
        eps: BN_EPSILON,
        momentum: BN_MOMENTUM,
        ws_init: nn::Init::Const(1.0),
        bs_init: nn::Init::Const(0.0),
        ..Default::default()
    };
    nn::batch_norm2d(p, ch, cfg)
}

impl ResNet {
    /// Builds the network described by `spec` under `vs` (normally the
    /// `VarStore` root), registering every tensor under exactly the name
    /// [`ResNetSpec::params`] gives it, in the same order.
    ///
    /// # Panics
    ///
    /// If `spec` is invalid ([`ResNetSpec::validate`]); use
    /// [`ResNet::try_new`] to get an error instead.
    pub fn new(vs: &nn::Path, spec: &ResNetSpec) -> ResNet {
        match ResNet::try_new(vs, spec) {
            Ok(m) => m,
            Err(e) => panic!("{e}"),
        }
    }

    /// Every batch norm, in forward order.
    fn batch_norms(&self) -> Vec<&nn::BatchNorm> {
        let mut out = vec![&self.bn1];
        for b in &self.blocks {
            out.extend([&b.bn1, &b.bn2]);
            if let Some((_, d)) = &b.downsample {
                out.push(d);
            }
        }
        out
    }

    /// "Precise BN": replaces every batch norm's running statistics with the
    /// exact average of the batch statistics over `batches`, taken with the
    /// current weights.
    ///
    /// Why: eval mode (what tract serves) normalises with the running
    /// statistics, an exponential average of batches seen while the weights
    /// were still moving, and of augmented images. On small, imbalanced
    /// data that lag shifts the served logits from epoch to epoch, so
    /// probabilities (and recall at a threshold) swing while AUROC barely
    /// moves. Recomputing the statistics on un-augmented training images
    /// before each evaluation makes the evaluated, kept and exported model
    /// one whose statistics match the weights it has.
    pub fn recompute_batch_norm_stats(
        &self,
        batches: impl IntoIterator<Item = Tensor>,
    ) -> Result<usize, tch::TchError> {
        let bns = self.batch_norms();
        let mut sums: Vec<Option<(Tensor, Tensor)>> = (0..bns.len()).map(|_| None).collect();
        let mut seen = 0i64;
        tch::no_grad(|| -> Result<(), tch::TchError> {
            for xs in batches {
                let n = xs.size()[0];
                if n < 2 {
                    continue; // one image has no batch statistics worth the name
                }
                // With the running statistics zeroed, one train-mode pass
                // leaves momentum x (this batch's statistics) in them.
                for bn in &bns {
                    let _ = bn.running_mean.shallow_clone().f_zero_()?;
                    let _ = bn.running_var.shallow_clone().f_zero_()?;
                }
                let _ = self.forward_t(&xs, true);
                for (bn, sum) in bns.iter().zip(sums.iter_mut()) {
                    let scale = n as f64 / BN_MOMENTUM;
                    let (m, v) = (&bn.running_mean * scale, &bn.running_var * scale);
                    *sum = Some(match sum.take() {
                        None => (m, v),
                        Some((sm, sv)) => (sm + m, sv + v),
                    });
                }
                seen += n;
            }
            if seen > 0 {
                for (bn, sum) in bns.iter().zip(sums) {
                    let (m, v) = sum.expect("a sum per batch norm");
                    bn.running_mean
                        .shallow_clone()
                        .f_copy_(&(m / seen as f64))?;
                    bn.running_var.shallow_clone().f_copy_(&(v / seen as f64))?;
                }
            }
            Ok(())
        })?;
        Ok(seen as usize)
    }

    /// [`ResNet::new`], but an invalid spec is [`NetError::InvalidSpec`].
    pub fn try_new(vs: &nn::Path, spec: &ResNetSpec) -> Result<ResNet, NetError> {
        spec.validate()
            .map_err(|e| NetError::InvalidSpec(e.to_string()))?;
        // This is one network; an ensemble's members, its flip and its
        // temperature exist only in the exported graph (and in the export's
        // own tch reference), so building one from such a spec would
        // silently be something else.
        if !spec.is_plain() {
            return Err(NetError::InvalidSpec(format!(
                "a ResNet is one plain network, but the spec has {} member(s), tta_flip {} and \
                 temperature {}: build each member from spec.member()",
                spec.members, spec.tta_flip, spec.temperature
            )));
        }
        let conv1 = conv(&(vs / "conv1"), spec.in_channels, spec.stem_width, 7, 2, 3);
        let bn1 = batch_norm(&(vs / "bn1"), spec.stem_width);
        let mut blocks = Vec::new();
        let mut in_ch = spec.stem_width;
        for (stage, (&width, &count)) in spec.widths.iter().zip(&spec.blocks).enumerate() {
            let layer = vs / format!("layer{}", stage + 1);
            for index in 0..count {
                // Stage 1 keeps the resolution (the max-pool already halved
                // it); later stages halve it in their first block. This is
                // the writer's layout; the VarStore-vs-params test guards it.
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                blocks.push(BasicBlock::new(&(&layer / index), in_ch, width, stride));
                in_ch = width;
            }
        }
        let bound = 1.0 / (in_ch as f64).sqrt();
        // torch's `Linear` default (uniform ±1/sqrt(fan_in)) rather than tch's
        // Kaiming-uniform weight, which is sqrt(6) times wider.
        let fc = nn::linear(
            vs / "fc",
            in_ch,
            spec.num_classes,
            nn::LinearConfig {
                ws_init: nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
                bs_init: Some(nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                }),
                bias: true,
            },
        );
        Ok(ResNet {
            conv1,
            bn1,
            blocks,
            fc,
            dropout: 0.0,
        })
    }

    /// The same network with dropout `p` on the pooled features before `fc`, in
    /// training mode only: eval mode, and so the exported graph, is unchanged.
    pub fn with_dropout(mut self, p: f64) -> ResNet {
        self.dropout = p;
        self
    }
}

impl ModuleT for ResNet {
    /// `xs`: `[N, in_channels, S, S]` float in [0, 1]. Returns logits
    /// `[N, num_classes]`. `train` switches batch norm between batch
    /// statistics (updating the running ones) and the running statistics,
    /// and turns on the dropout of [`ResNet::with_dropout`] if any; eval mode
    /// is deterministic and equals the exported graph before its softmax.
    fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut x = xs
            .apply(&self.conv1)
            .apply_t(&self.bn1, train)
            .relu()
            .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for b in &self.blocks {
            x = b.forward_t(&x, train);
        }
        // GlobalAveragePool + Flatten in one step: mean over H and W.
        let pooled = x.mean_dim([2i64, 3].as_slice(), false, Kind::Float);
        let pooled = if train && self.dropout > 0.0 {
            pooled.dropout(self.dropout, true)
        } else {
            pooled
        };
        pooled.apply(&self.fc)
    }
}

/// Picks the training device: `"auto"` is CUDA device 0 when tch sees CUDA
/// and the CPU otherwise; `"cpu"` is the CPU; `"cuda"` is CUDA device 0 and
/// an error when there is none, so a run that was meant for the GPU never
/// silently crawls on the CPU.
pub fn device_from(choice: &str) -> Result<Device, NetError> {
    match choice {
        "cpu" => Ok(Device::Cpu),
        "auto" | "cuda" => {
            load_cuda_backend();
            match (choice, tch::Cuda::is_available()) {
                (_, true) => Ok(Device::Cuda(0)),
                ("auto", false) => Ok(Device::Cpu),
                _ => Err(NetError::CudaUnavailable),
            }
        }
        other => Err(NetError::UnknownDevice(other.to_string())),
    }
}

/// Loads libtorch's CUDA backend, if it is there and its CUDA libraries
/// resolve; returns whether it is loaded.
///
/// libtorch registers CUDA only when `libtorch_cuda.so` is loaded, and the
/// linker drops it from the trainer's dependencies (nothing calls into it
/// directly), so without this `tch` would never see a GPU. It is loaded from
/// libtorch's own directory (the binary's rpath) rather than linked, so that
/// the same binary still starts where it is absent (the CPU image) or cannot
/// load (no CUDA libraries installed: `make cuda-libs`): it then trains on
/// the CPU. The driver's `libcuda.so` is only needed to use a GPU, not to
/// load the backend.
pub fn load_cuda_backend() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        // SAFETY: dlopen with a constant, NUL-terminated name; the handle is
        // kept for the life of the process (never dlclosed), as libtorch's
        // registered hooks point into the library.
        let handle = unsafe {
            libc::dlopen(
                c"libtorch_cuda.so".as_ptr(),
                libc::RTLD_NOW | libc::RTLD_GLOBAL,
            )
        };
        if handle.is_null() {
            tracing::debug!("libtorch_cuda.so not loadable; CUDA unavailable, the CPU is used");
        }
        !handle.is_null()
    })
}

/// True for a `VarStore` entry that is known not to be an inference
/// parameter: `X.num_batches_tracked` where `X` is a batch norm of the spec.
fn is_documented_extra(name: &str, spec_names: &BTreeSet<&str>) -> bool {
    name.strip_suffix(NUM_BATCHES_TRACKED)
        .and_then(|prefix| prefix.strip_suffix('.'))
        .is_some_and(|bn| spec_names.contains(format!("{bn}.running_mean").as_str()))
}

/// Copies a tensor (any device, any float kind) to a row-major `Vec<f32>`.
pub(crate) fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>, tch::TchError> {
    let flat = t
        .f_detach()?
        .f_to_device(Device::Cpu)?
        .f_to_kind(Kind::Float)?
        .f_contiguous()?
        .f_reshape([-1i64])?;
    Vec::<f32>::try_from(&flat)
}

/// Reads every parameter and buffer of `spec` (batch-norm running statistics
/// included) out of `vs` as CPU f32, ready for [`pleura::model::onnx::write_onnx`].
///
/// A spec parameter missing from the store, a shape that differs, or a store
/// variable that is not a spec parameter is an error: each means the tch
/// network and the ONNX graph disagree. The one tolerated extra is a batch
/// norm's `num_batches_tracked` counter (not an inference parameter), which
/// tch 0.26 does not create but PyTorch does.
pub fn to_weights(vs: &nn::VarStore, spec: &ResNetSpec) -> Result<Weights, NetError> {
    let vars: HashMap<String, Tensor> = vs.variables();
    let params = spec.params();
    let spec_names: BTreeSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
    // Sorted so the error names the same variable on every run.
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    if let Some(name) = names
        .into_iter()
        .find(|n| !spec_names.contains(n.as_str()) && !is_documented_extra(n, &spec_names))
    {
        return Err(NetError::UnexpectedVariable { name: name.clone() });
    }
    let _no_grad = tch::no_grad_guard();
    let mut weights = Weights::new();
    for p in &params {
        let t = vars.get(&p.name).ok_or_else(|| NetError::MissingParam {
            name: p.name.clone(),
        })?;
        let found = t.size();
        if found != p.shape {
            return Err(NetError::ShapeMismatch {
                name: p.name.clone(),
                expected: p.shape.clone(),
                found,
            });
        }
        weights.insert(p.name.clone(), p.shape.clone(), to_f32_vec(t)?);
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(size: u32) -> ResNetSpec {
        ResNetSpec {
            image_size: size,
            ..ResNetSpec::tiny()
        }
    }

    fn store_shapes(vs: &nn::VarStore) -> Vec<(String, Vec<i64>)> {
        let mut v: Vec<_> = vs
            .variables()
            .into_iter()
            .map(|(n, t)| (n, t.size()))
            .collect();
        v.sort();
        v
    }

    fn spec_shapes(spec: &ResNetSpec) -> Vec<(String, Vec<i64>)> {
        let mut v: Vec<_> = spec
            .params()
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        v.sort();
        v
    }

    #[test]
    fn varstore_matches_spec_params_exactly() {
        for spec in [
            ResNetSpec::default(),
            ResNetSpec::with_width(8),
            // Channel change at stride 1 in stage 1 (a downsample the default
            // layout never has), three stages, three classes.
            ResNetSpec {
                in_channels: 1,
                image_size: 32,
                stem_width: 3,
                widths: vec![4, 8, 8],
                blocks: vec![2, 1, 3],
                num_classes: 3,
                ..ResNetSpec::default()
            },
        ] {
            let vs = nn::VarStore::new(Device::Cpu);
            let _ = ResNet::new(&vs.root(), &spec);
            assert_eq!(store_shapes(&vs), spec_shapes(&spec), "{spec:?}");
            // Trainable = everything but the running statistics.
            let trainable = spec.params().iter().filter(|p| p.trainable()).count();
            assert_eq!(vs.trainable_variables().len(), trainable);
            // Running statistics start at torch's values.
            let v = vs.variables();
            assert_eq!(
                v["bn1.running_mean"]
                    .abs()
                    .sum(Kind::Float)
                    .double_value(&[]),
                0.0
            );
            assert_eq!(
                to_f32_vec(&v["bn1.running_var"]).unwrap(),
                vec![1.0; spec.stem_width as usize]
            );
            assert_eq!(
                to_f32_vec(&v["bn1.weight"]).unwrap(),
                vec![1.0; spec.stem_width as usize]
            );
        }
    }

    #[test]
    fn forward_gives_logits_n_by_classes() {
        let spec = tiny(32);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ResNet::new(&vs.root(), &spec);
        for n in [1i64, 3] {
            let x = Tensor::rand([n, 1, 32, 32], (Kind::Float, Device::Cpu));
            let y = tch::no_grad(|| m.forward_t(&x, false));
            assert_eq!(y.size(), vec![n, 2]);
            assert_eq!(y.kind(), Kind::Float);
            // Logits, not probabilities: rows need not sum to 1, but must be finite.
            assert!(bool::try_from(y.isfinite().all()).unwrap());
        }
        // A larger, non-power-of-two image also works (odd intermediate sizes).
        let spec = tiny(72);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ResNet::new(&vs.root(), &spec);
        let x = Tensor::rand([2, 1, 72, 72], (Kind::Float, Device::Cpu));
        assert_eq!(tch::no_grad(|| m.forward_t(&x, false)).size(), vec![2, 2]);
    }

    /// Train mode of [`ResNet::forward_t`] step by step, recording the input
    /// of every batch norm (stem, then per block bn1, bn2, downsample).
    /// Returns the logits and the recorded inputs with their batch norms.
    fn train_forward_recording<'m>(
        m: &'m ResNet,
        xs: &Tensor,
    ) -> (Tensor, Vec<(&'m nn::BatchNorm, Tensor)>) {
        let mut rec = Vec::new();
        let mut bn = |bn: &'m nn::BatchNorm, x: Tensor| -> Tensor {
            let y = x.apply_t(bn, true);
            rec.push((bn, x));
            y
        };
        let mut x =
            bn(&m.bn1, xs.apply(&m.conv1))
                .relu()
                .max_pool2d([3, 3], [2, 2], [1, 1], [1, 1], false);
        for b in &m.blocks {
            let y = bn(&b.bn1, x.apply(&b.conv1)).relu();
            let y = bn(&b.bn2, y.apply(&b.conv2));
            let s = match &b.downsample {
                Some((c, d)) => bn(d, x.apply(c)),
                None => x.shallow_clone(),
            };
            x = (y + s).relu();
        }
        let logits = x
            .mean_dim([2i64, 3].as_slice(), false, Kind::Float)
            .apply(&m.fc);
        (logits, rec)
    }

    /// Precise BN leaves in every batch norm exactly the average, over the
    /// batches given, of the statistics train mode normalised each batch
    /// with (mean, and the unbiased variance torch keeps), whatever the
    /// running statistics were before.
    #[test]
    fn precise_bn_sets_running_stats_to_the_average_batch_stats() {
        tch::manual_seed(5);
        let spec = ResNetSpec {
            image_size: 64,
            ..ResNetSpec::tiny()
        };
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ResNet::new(&vs.root(), &spec);
        let batches: Vec<Tensor> = (0..3)
            .map(|_| Tensor::rand([4, 1, 64, 64], (Kind::Float, Device::Cpu)))
            .collect();
        let dims = [0i64, 2, 3];
        let mut expected: Vec<(Tensor, Tensor)> = Vec::new();
        for xs in &batches {
            let (_, rec) = tch::no_grad(|| train_forward_recording(&m, xs));
            for (j, (_, x)) in rec.iter().enumerate() {
                let mean = x.mean_dim(dims.as_slice(), false, Kind::Float) / 3.0;
                let var = x.var_dim(dims.as_slice(), true, false) / 3.0;
                match expected.get_mut(j) {
                    None => expected.push((mean, var)),
                    Some((m, v)) => {
                        *m = &*m + mean;
                        *v = &*v + var;
                    }
                }
            }
        }
        // A single image is skipped: it has no batch statistics to speak of.
        let one = Tensor::rand([1, 1, 64, 64], (Kind::Float, Device::Cpu));
        let used = m
            .recompute_batch_norm_stats(batches.iter().map(Tensor::shallow_clone).chain([one]))
            .unwrap();
        assert_eq!(used, 12);
        let bns = m.batch_norms();
        assert_eq!(bns.len(), expected.len());
        for (bn, (mean, var)) in bns.iter().zip(&expected) {
            let close = |a: &Tensor, b: &Tensor| {
                let diff = (a - b).abs().max().double_value(&[]);
                let scale = b.abs().max().double_value(&[]).max(1.0);
                diff <= 1e-4 * scale
            };
            assert!(close(&bn.running_mean, mean));
            assert!(close(&bn.running_var, var));
        }
    }

    /// Train and eval differ only through batch norm: eval is deterministic
    /// and changes nothing; train changes exactly the running statistics;
    /// and once every running statistic is set to the statistics the train
    /// pass normalised with (mean and biased variance of the batch), eval
    /// reproduces the train-mode output, so nothing else depends on the mode.
    #[test]
    fn train_and_eval_differ_only_through_batch_norm() {
        tch::manual_seed(3);
        let spec = tiny(32);
        let vs = nn::VarStore::new(Device::Cpu);
        let m = ResNet::new(&vs.root(), &spec);
        let x = Tensor::rand([4, 1, 32, 32], (Kind::Float, Device::Cpu));
        let snapshot = |vs: &nn::VarStore| -> HashMap<String, Vec<f32>> {
            vs.variables()
                .iter()
                .map(|(n, t)| (n.clone(), to_f32_vec(t).unwrap()))
                .collect()
        };
        let _g = tch::no_grad_guard();

        let before = snapshot(&vs);
        let e1 = m.forward_t(&x, false);
        let e2 = m.forward_t(&x, false);
        assert!(e1.equal(&e2), "eval mode is deterministic");
        assert_eq!(snapshot(&vs), before, "eval mode changes nothing");

        let t = m.forward_t(&x, true);
        assert!(
            !t.allclose(&e1, 1e-4, 1e-4, false),
            "batch vs running statistics"
        );
        let after = snapshot(&vs);
        for (name, old) in &before {
            let changed = &after[name] != old;
            let is_stat = name.ends_with(".running_mean") || name.ends_with(".running_var");
            assert_eq!(changed, is_stat, "{name}: changed={changed}");
        }

        // The step-by-step replica is the real train-mode forward ...
        let (replica, recorded) = train_forward_recording(&m, &x);
        assert!(replica.allclose(&m.forward_t(&x, true), 1e-6, 1e-6, false));
        assert_eq!(
            recorded.len(),
            spec.params()
                .iter()
                .filter(|p| p.name.ends_with("running_var"))
                .count()
        );
        // ... so its batch statistics, made the running ones, turn eval into train.
        for (bn, input) in &recorded {
            let dims = [0i64, 2, 3];
            let mean = input.mean_dim(dims.as_slice(), true, Kind::Float);
            let var = (input - &mean)
                .square()
                .mean_dim(dims.as_slice(), false, Kind::Float);
            bn.running_mean.shallow_clone().copy_(&mean.flatten(0, -1));
            bn.running_var.shallow_clone().copy_(&var);
        }
        let eval = m.forward_t(&x, false);
        let diff = (&eval - &replica).abs().max().double_value(&[]);
        assert!(
            diff < 1e-4,
            "eval with batch statistics differs from train by {diff}"
        );
    }

    #[test]
    fn to_weights_copies_everything_and_refuses_mismatches() {
        let spec = tiny(32);
        let vs = nn::VarStore::new(Device::Cpu);
        let _m = ResNet::new(&vs.root(), &spec);
        let w = to_weights(&vs, &spec).unwrap();
        assert_eq!(w.len(), spec.params().len());
        let vars = vs.variables();
        for p in spec.params() {
            let t = w.get(&p.name).unwrap();
            assert_eq!(t.shape, p.shape);
            assert_eq!(t.data, to_f32_vec(&vars[&p.name]).unwrap(), "{}", p.name);
        }
        // The shared writer accepts it as is.
        pleura::model::onnx::write_onnx(&spec, &w).unwrap();

        // Wider network than the spec: shape mismatch, named.
        let wide = nn::VarStore::new(Device::Cpu);
        let _ = ResNet::new(&wide.root(), &ResNetSpec::with_width(8));
        match to_weights(&wide, &ResNetSpec::with_width(4)) {
            Err(NetError::ShapeMismatch { name, .. }) => assert_eq!(name, "conv1.weight"),
            other => panic!("{other:?}"),
        }
        // Spec with an extra block: missing parameter.
        let deeper = ResNetSpec {
            blocks: vec![2, 2, 2, 3],
            ..spec.clone()
        };
        match to_weights(&vs, &deeper) {
            Err(NetError::MissingParam { name }) => {
                assert!(name.starts_with("layer4.2."), "{name}")
            }
            other => panic!("{other:?}"),
        }
        // Store with fewer blocks than the spec's store: unexpected variables.
        match to_weights(
            &vs,
            &ResNetSpec {
                blocks: vec![2, 2, 2, 1],
                ..spec.clone()
            },
        ) {
            Err(NetError::UnexpectedVariable { name }) => {
                assert!(name.starts_with("layer4.1."), "{name}")
            }
            other => panic!("{other:?}"),
        }
        // A stray variable is refused; BN's step counter is tolerated.
        let vs2 = nn::VarStore::new(Device::Cpu);
        let _ = ResNet::new(&vs2.root(), &spec);
        let _ = vs2
            .root()
            .sub("bn1")
            .zeros_no_train(NUM_BATCHES_TRACKED, &[]);
        assert_eq!(to_weights(&vs2, &spec).unwrap().len(), spec.params().len());
        let _ = vs2.root().sub("fc").zeros("extra", &[1]);
        match to_weights(&vs2, &spec) {
            Err(NetError::UnexpectedVariable { name }) => assert_eq!(name, "fc.extra"),
            other => panic!("{other:?}"),
        }
        // A counter under a path that is not a batch norm is not excused.
        let vs3 = nn::VarStore::new(Device::Cpu);
        let _ = ResNet::new(&vs3.root(), &spec);
        let _ = vs3
            .root()
            .sub("fc")
            .zeros_no_train(NUM_BATCHES_TRACKED, &[]);
        assert!(matches!(
            to_weights(&vs3, &spec),
            Err(NetError::UnexpectedVariable { .. })
        ));
    }

    #[test]
    fn invalid_spec_is_an_error() {
        let vs = nn::VarStore::new(Device::Cpu);
        let bad = ResNetSpec {
            blocks: vec![2, 2],
            ..ResNetSpec::with_width(4)
        };
        assert!(matches!(
            ResNet::try_new(&vs.root(), &bad),
            Err(NetError::InvalidSpec(_))
        ));
        // An ensemble spec is not one network; its member is.
        let ensemble = ResNetSpec {
            members: 3,
            ..ResNetSpec::tiny()
        };
        assert!(matches!(
            ResNet::try_new(&vs.root(), &ensemble),
            Err(NetError::InvalidSpec(_))
        ));
        assert!(ResNet::try_new(&vs.root(), &ensemble.member()).is_ok());
    }

    #[test]
    fn device_choice() {
        assert_eq!(device_from("cpu").unwrap(), Device::Cpu);
        let auto = device_from("auto").unwrap();
        if tch::Cuda::is_available() {
            assert_eq!(auto, Device::Cuda(0));
            assert_eq!(device_from("cuda").unwrap(), Device::Cuda(0));
        } else {
            assert_eq!(auto, Device::Cpu);
            let e = device_from("cuda").unwrap_err();
            assert!(matches!(e, NetError::CudaUnavailable));
            assert!(e.to_string().contains("no usable CUDA device"), "{e}");
        }
        let e = device_from("gpu").unwrap_err();
        assert!(matches!(e, NetError::UnknownDevice(_)));
        assert!(e.to_string().contains("\"auto\", \"cpu\" or \"cuda\""));
    }

    #[test]
    fn the_cuda_backend_loads_where_its_libraries_are_and_auto_falls_back_to_the_cpu() {
        // `make test` installs the CUDA libraries (make cuda-libs) and says so;
        // elsewhere the backend may be absent, which must not fail a run.
        let loaded = load_cuda_backend();
        if std::env::var_os("EXPECT_LIBTORCH_CUDA").is_some() {
            assert!(
                loaded,
                "libtorch_cuda.so and its CUDA libraries should load here"
            );
        } else if !loaded {
            eprintln!(
                "SKIP: libtorch_cuda.so not loadable here (make cuda-libs installs its libraries)"
            );
        }
        let device = device_from("auto").unwrap();
        if tch::Cuda::is_available() {
            assert_eq!(device, Device::Cuda(0));
        } else {
            assert_eq!(device, Device::Cpu, "no GPU: auto takes the CPU");
            assert!(matches!(
                device_from("cuda"),
                Err(NetError::CudaUnavailable)
            ));
        }
    }
}
