//! The ResNet specification and the ONNX graph writer.
//!
//! Pleura's workers serve an ONNX model with tract, and the trainer builds the
//! same network in tch. Rather than exporting through Python (a second
//! toolchain, a second definition of the network), the graph is written here,
//! once, from a [`ResNetSpec`]; the trainer hands over its `VarStore` tensors
//! as [`Weights`] and calls [`write_onnx`]. That only works if both sides agree
//! on the parameter names, so [`ResNetSpec::params`] is the single source of
//! truth for them: they are exactly what a tch `VarStore` produces for the
//! natural module layout (`conv1`, `bn1`, `layer{1..4}.{block}.conv1`, ...,
//! `fc`), which is also the torchvision ResNet naming.
//!
//! The graph is a plain inference graph (opset 17, IR version 8):
//!
//! ```text
//! input [N,C,S,S] → Conv 7x7/2 → BatchNormalization → Relu → MaxPool 3x3/2
//!   → basic blocks (Conv→BN→Relu→Conv→BN, + identity or 1x1 Conv→BN downsample, Add, Relu)
//!   → GlobalAveragePool → Flatten → Gemm → Softmax → probabilities [N,classes]
//! ```
//!
//! The output is already softmaxed so that every consumer (worker, trainer's
//! evaluation, the Python checker) reads probabilities without re-deriving the
//! head; column 0 is effusion, column 1 is no finding (see
//! [`super::manifest::LABELS`]).
//!
//! One graph can also hold what is done at inference time to make those
//! probabilities better, so that the worker, the engine and the canary stay
//! unaware of it: [`ResNetSpec::members`] networks of the same shape (an
//! ensemble, weights under `m{i}.`), each also run on the image mirrored
//! left to right ([`ResNetSpec::tta_flip`]), logits divided by a fitted
//! [`ResNetSpec::temperature`] before the softmax, and the softmax outputs
//! averaged:
//!
//! ```text
//! input ──────────────► m0.* → Div T → Softmax ─┐
//!   └► flip (Gather W-1..0 on the width axis)   ├► Mean → probabilities
//!        └────────────► m0.flip.* → … Softmax ──┤
//!   (m1, m1.flip, … likewise)                   ┘
//! ```
//!
//! The plain spec (one member, no flip, temperature 1) writes exactly the
//! single-network graph above: same node and weight names, same bytes.
//!
//! [`init_weights`] gives deterministic untrained weights so `pleura model
//! init` can produce byte-identical files for a given seed.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tract_onnx::pb;

/// Name of the graph input: `[N, in_channels, image_size, image_size]` float32.
pub const INPUT_NAME: &str = "input";
/// Name of the graph output: `[N, num_classes]` softmax probabilities.
/// Class 0 = effusion, class 1 = nofinding.
pub const OUTPUT_NAME: &str = "probabilities";
/// Symbolic batch dimension of the input and output.
pub const BATCH_DIM: &str = "N";
/// ONNX IR version written into every model.
pub const IR_VERSION: i64 = 8;
/// Default-domain opset every model imports.
pub const OPSET_VERSION: i64 = 17;
/// `producer_name` of every model.
pub const PRODUCER_NAME: &str = "pleura";
/// Batch-norm epsilon: tch's and torch's default, written explicitly so the
/// ONNX consumer never falls back to a different default.
pub const BN_EPSILON: f32 = 1e-5;
/// Smallest supported input side. The network downsamples by 32; below this
/// the last stage would see a sub-pixel image and the model is meaningless.
pub const MIN_IMAGE_SIZE: u32 = 32;
/// Key of the model metadata entry holding the spec as JSON, so a stray
/// `model.onnx` still says what it is.
pub const SPEC_METADATA_KEY: &str = "pleura.spec";
/// Most networks one graph may average. Each member costs a full forward
/// pass per scan (two with the flip), so a larger ensemble is a mistake
/// rather than a choice.
pub const MAX_MEMBERS: u32 = 16;
/// Name of the node (and prefix of the branches) running on the image
/// mirrored left to right.
pub const FLIP_NODE: &str = "flip";
/// Initializer holding the reversed width indices the flip gathers.
pub const FLIP_INDICES: &str = "flip.indices";
/// Initializer holding the temperature the logits are divided by.
pub const TEMPERATURE_NAME: &str = "temperature";

/// Shape of the network, and of the graph around it. Serialised into the
/// manifest, so the trainer, the writer and the worker all build from the
/// same description.
///
/// The first six fields describe one network: the trainer builds it in tch
/// from them ([`ResNetSpec::member`]). The last three say what the exported
/// graph does with it at inference time; their defaults (one member, no
/// flip, temperature 1) are left out of the JSON, so the manifests and the
/// ONNX metadata of plain models read exactly as before these fields existed.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResNetSpec {
    /// Channels of the input image (1: grayscale radiographs).
    pub in_channels: i64,
    /// Side of the square input image, in pixels.
    pub image_size: u32,
    /// Output channels of the 7x7 stride-2 stem conv (followed by BN, ReLU and a
    /// 3x3 stride-2 max-pool).
    pub stem_width: i64,
    /// Output channels of each stage.
    pub widths: Vec<i64>,
    /// Number of basic blocks in each stage (same length as `widths`).
    pub blocks: Vec<usize>,
    /// Number of output classes (2: effusion, nofinding).
    pub num_classes: i64,
    /// Networks of this shape whose probabilities the graph averages, in
    /// `1..=`[`MAX_MEMBERS`]. With more than one, member `i`'s weights are
    /// named `m{i}.<tch name>`; with one they keep their tch names.
    #[serde(default = "one_member", skip_serializing_if = "is_one_member")]
    pub members: u32,
    /// Test-time augmentation: each member also runs on the image mirrored
    /// left to right (reversed along the width axis; never upside down, which
    /// no radiograph is) and both outputs enter the average.
    #[serde(default, skip_serializing_if = "is_false")]
    pub tta_flip: bool,
    /// Temperature `T` of the softmax: every branch computes
    /// `softmax(logits / T)`. Fitted on out-of-fold predictions so that
    /// `p_effusion` is calibrated (see the manifest's `calibration`); finite
    /// and positive; 1 writes no node.
    #[serde(
        default = "unit_temperature",
        skip_serializing_if = "is_unit_temperature"
    )]
    pub temperature: f32,
}

// `temperature` is a float, but `validate` keeps it finite and JSON cannot
// carry a NaN, so equality on specs is reflexive and `Eq` holds.
impl Eq for ResNetSpec {}

fn one_member() -> u32 {
    1
}

fn is_one_member(m: &u32) -> bool {
    *m == 1
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn unit_temperature() -> f32 {
    1.0
}

fn is_unit_temperature(t: &f32) -> bool {
    *t == 1.0
}

impl Default for ResNetSpec {
    /// The seed model: a ResNet-18 on 256x256 grayscale images with two classes.
    fn default() -> Self {
        ResNetSpec {
            in_channels: 1,
            image_size: 256,
            stem_width: 64,
            widths: vec![64, 128, 256, 512],
            blocks: vec![2, 2, 2, 2],
            num_classes: 2,
            members: 1,
            tta_flip: false,
            temperature: 1.0,
        }
    }
}

/// One parameter (or buffer) of the network, named as tch's `VarStore` names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamSpec {
    /// Dotted `VarStore` path, e.g. `layer2.0.downsample.0.weight`.
    pub name: String,
    /// Tensor shape; conv weights are `[out, in, k, k]`, the fc weight `[classes, in]`.
    pub shape: Vec<i64>,
}

impl ParamSpec {
    /// False for batch-norm running statistics, which tch keeps as
    /// non-trainable buffers (`zeros_no_train` / `ones_no_train`).
    pub fn trainable(&self) -> bool {
        !(self.name.ends_with(".running_mean") || self.name.ends_with(".running_var"))
    }

    /// Number of elements (0 for a malformed negative shape).
    pub fn numel(&self) -> usize {
        numel(&self.shape)
    }
}

/// One basic block, as both [`ResNetSpec::params`] and the graph writer walk
/// it: sharing the walk is what keeps names and graph in step.
pub(super) struct Block {
    /// `layer{stage}.{index}`.
    pub(super) prefix: String,
    pub(super) in_ch: i64,
    pub(super) out_ch: i64,
    pub(super) stride: i64,
    pub(super) downsample: bool,
}

impl ResNetSpec {
    /// The default ResNet-18 layout scaled to `width`: stem `width`, stages
    /// `[w, 2w, 4w, 8w]`. Small widths make fast test models.
    pub fn with_width(width: i64) -> Self {
        ResNetSpec {
            stem_width: width,
            widths: vec![width, 2 * width, 4 * width, 8 * width],
            ..ResNetSpec::default()
        }
    }

    /// The smallest network that is still this ResNet-18 layout: width 4 on
    /// 32×32 inputs (the smallest size the network supports). Tests build it
    /// in milliseconds; vary it with `ResNetSpec { image_size: 64, ..ResNetSpec::tiny() }`.
    pub fn tiny() -> Self {
        ResNetSpec {
            image_size: MIN_IMAGE_SIZE,
            ..ResNetSpec::with_width(4)
        }
    }

    /// Checks the spec describes a buildable network.
    pub fn validate(&self) -> Result<(), OnnxError> {
        let bad = |msg: String| Err(OnnxError::InvalidSpec(msg));
        if self.in_channels < 1 {
            return bad(format!(
                "in_channels must be >= 1, got {}",
                self.in_channels
            ));
        }
        if self.image_size < MIN_IMAGE_SIZE {
            return bad(format!(
                "image_size must be >= {MIN_IMAGE_SIZE}, got {}",
                self.image_size
            ));
        }
        if self.stem_width < 1 {
            return bad(format!("stem_width must be >= 1, got {}", self.stem_width));
        }
        if self.widths.is_empty() {
            return bad("widths must name at least one stage".into());
        }
        if self.widths.len() != self.blocks.len() {
            return bad(format!(
                "widths has {} stages but blocks has {}",
                self.widths.len(),
                self.blocks.len()
            ));
        }
        if let Some(w) = self.widths.iter().find(|w| **w < 1) {
            return bad(format!("every stage width must be >= 1, got {w}"));
        }
        if self.blocks.contains(&0) {
            return bad("every stage needs at least one block".into());
        }
        if self.num_classes < 1 {
            return bad(format!(
                "num_classes must be >= 1, got {}",
                self.num_classes
            ));
        }
        if !(1..=MAX_MEMBERS).contains(&self.members) {
            return bad(format!(
                "members must be in 1..={MAX_MEMBERS}, got {}",
                self.members
            ));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!(
                "temperature must be finite and > 0, got {}",
                self.temperature
            ));
        }
        Ok(())
    }

    /// True for one network with no flip and temperature 1: the graph is the
    /// bare network, as every model was before ensembles.
    pub fn is_plain(&self) -> bool {
        self.members == 1 && !self.tta_flip && self.temperature == 1.0
    }

    /// The one network every member is: this spec with one member, no flip
    /// and temperature 1. What the trainer builds in tch and what
    /// [`ResNetSpec::params`] names.
    pub fn member(&self) -> ResNetSpec {
        ResNetSpec {
            members: 1,
            tta_flip: false,
            temperature: 1.0,
            ..self.clone()
        }
    }

    /// Forward passes of the network per scan: members, twice with the flip.
    /// The cost of a scan grows with it.
    pub fn branches(&self) -> usize {
        self.members as usize * if self.tta_flip { 2 } else { 1 }
    }

    /// The prefix of member `i`'s weight names: none for a single member,
    /// so plain models keep their tch names, else `m{i}.`.
    pub fn member_prefix(&self, i: u32) -> String {
        if self.members == 1 {
            String::new()
        } else {
            format!("m{i}.")
        }
    }

    /// Every initializer of the network weights in the graph: one member's
    /// [`ResNetSpec::params`] under each [`ResNetSpec::member_prefix`], in
    /// member order. [`write_onnx`] expects exactly this set.
    pub fn graph_params(&self) -> Vec<ParamSpec> {
        let params = self.params();
        (0..self.members)
            .flat_map(|i| {
                let prefix = self.member_prefix(i);
                params.iter().map(move |p| ParamSpec {
                    name: format!("{prefix}{}", p.name),
                    shape: p.shape.clone(),
                })
            })
            .collect()
    }

    /// The basic blocks in order. Stage 1 keeps the resolution (the max-pool
    /// already halved it); every later stage halves it in its first block.
    pub(super) fn block_layout(&self) -> Vec<Block> {
        let mut out = Vec::new();
        let mut in_ch = self.stem_width;
        for (stage, (&width, &count)) in self.widths.iter().zip(&self.blocks).enumerate() {
            for index in 0..count {
                let stride = if stage > 0 && index == 0 { 2 } else { 1 };
                out.push(Block {
                    prefix: format!("layer{}.{}", stage + 1, index),
                    in_ch,
                    out_ch: width,
                    stride,
                    downsample: stride != 1 || in_ch != width,
                });
                in_ch = width;
            }
        }
        out
    }

    /// Channels entering the classifier head.
    fn last_width(&self) -> i64 {
        self.widths.last().copied().unwrap_or(self.stem_width)
    }

    /// Every parameter and buffer of one network ([`ResNetSpec::member`]), in
    /// module-creation order, with the exact name a tch `VarStore` gives it
    /// and its shape. For a single member, [`write_onnx`] expects exactly this
    /// set; [`ResNetSpec::graph_params`] names an ensemble's.
    pub fn params(&self) -> Vec<ParamSpec> {
        let mut out = Vec::new();
        let conv = |out: &mut Vec<ParamSpec>, path: &str, o: i64, i: i64, k: i64| {
            out.push(ParamSpec {
                name: format!("{path}.weight"),
                shape: vec![o, i, k, k],
            });
        };
        let bn = |out: &mut Vec<ParamSpec>, path: &str, c: i64| {
            for field in ["weight", "bias", "running_mean", "running_var"] {
                out.push(ParamSpec {
                    name: format!("{path}.{field}"),
                    shape: vec![c],
                });
            }
        };
        conv(&mut out, "conv1", self.stem_width, self.in_channels, 7);
        bn(&mut out, "bn1", self.stem_width);
        for b in self.block_layout() {
            let p = &b.prefix;
            conv(&mut out, &format!("{p}.conv1"), b.out_ch, b.in_ch, 3);
            bn(&mut out, &format!("{p}.bn1"), b.out_ch);
            conv(&mut out, &format!("{p}.conv2"), b.out_ch, b.out_ch, 3);
            bn(&mut out, &format!("{p}.bn2"), b.out_ch);
            if b.downsample {
                conv(&mut out, &format!("{p}.downsample.0"), b.out_ch, b.in_ch, 1);
                bn(&mut out, &format!("{p}.downsample.1"), b.out_ch);
            }
        }
        out.push(ParamSpec {
            name: "fc.weight".into(),
            shape: vec![self.num_classes, self.last_width()],
        });
        out.push(ParamSpec {
            name: "fc.bias".into(),
            shape: vec![self.num_classes],
        });
        out
    }
}

fn numel(shape: &[i64]) -> usize {
    shape.iter().map(|&d| d.max(0) as usize).product()
}

/// One weight tensor: row-major f32 data and its shape.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightTensor {
    /// Shape, as in [`ParamSpec::shape`].
    pub shape: Vec<i64>,
    /// Row-major (C order) values; `data.len()` must equal the shape's product.
    pub data: Vec<f32>,
}

/// Named weights for a [`ResNetSpec`], keyed by `VarStore` name. The trainer
/// fills it from its `VarStore`; [`init_weights`] fills it for untrained models.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Weights {
    tensors: BTreeMap<String, WeightTensor>,
}

impl Weights {
    /// An empty set.
    pub fn new() -> Self {
        Weights::default()
    }

    /// Adds (or replaces, returning the old one) a tensor. Shapes and lengths
    /// are checked by [`write_onnx`], where the spec is known.
    pub fn insert(
        &mut self,
        name: impl Into<String>,
        shape: Vec<i64>,
        data: Vec<f32>,
    ) -> Option<WeightTensor> {
        self.tensors
            .insert(name.into(), WeightTensor { shape, data })
    }

    /// The tensor called `name`, if present.
    pub fn get(&self, name: &str) -> Option<&WeightTensor> {
        self.tensors.get(name)
    }

    /// Mutable access, e.g. to tweak one tensor in a test.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut WeightTensor> {
        self.tensors.get_mut(name)
    }

    /// Removes and returns the tensor called `name`.
    pub fn remove(&mut self, name: &str) -> Option<WeightTensor> {
        self.tensors.remove(name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// True when no tensor is present.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Tensors in name order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &WeightTensor)> {
        self.tensors.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The weights of an ensemble graph from its members' own (each named as
    /// its tch `VarStore` names it): member `i`'s under `m{i}.`, as
    /// [`ResNetSpec::member_prefix`] names them. A single member is returned
    /// unchanged, since a one-member graph keeps the tch names.
    pub fn from_members(members: Vec<Weights>) -> Weights {
        if members.len() == 1 {
            return members.into_iter().next().expect("one member");
        }
        let mut out = Weights::new();
        for (i, member) in members.into_iter().enumerate() {
            for (name, t) in member.tensors {
                out.tensors.insert(format!("m{i}.{name}"), t);
            }
        }
        out
    }
}

/// Why a model could not be written.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// The spec does not describe a buildable network.
    #[error("invalid ResNet spec: {0}")]
    InvalidSpec(String),
    /// A parameter of the spec has no weight.
    #[error("missing weight {name:?}")]
    MissingWeight { name: String },
    /// A weight exists with the wrong shape.
    #[error("weight {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<i64>,
        found: Vec<i64>,
    },
    /// A weight's data length disagrees with its own shape.
    #[error("weight {name:?} has {found} values but shape {shape:?} needs {expected}")]
    DataLength {
        name: String,
        shape: Vec<i64>,
        expected: usize,
        found: usize,
    },
    /// A weight holds NaN or infinity (e.g. a diverged training run).
    #[error("weight {name:?} holds a non-finite value at index {index}")]
    NonFinite { name: String, index: usize },
    /// A weight that is not a parameter of the spec: almost always a naming
    /// mismatch with the trainer, so it is refused rather than dropped.
    #[error("unexpected weight {name:?}: not a parameter of this spec")]
    UnexpectedWeight { name: String },
    /// A writer that rebuilds one network by itself (the int8 writer) was
    /// given an ensemble, flip or temperature spec, which it would drop.
    #[error("{what} handles one plain network only, but the spec has {members} member(s), tta_flip {tta_flip} and temperature {temperature}")]
    NotPlain {
        what: &'static str,
        members: u32,
        tta_flip: bool,
        temperature: f32,
    },
}

/// A normal sampler over a ChaCha stream. Box-Muller by hand keeps the
/// dependency list short and the sequence fixed for a given seed.
struct Normal {
    rng: ChaCha8Rng,
    spare: Option<f64>,
}

impl Normal {
    fn next(&mut self) -> f64 {
        if let Some(z) = self.spare.take() {
            return z;
        }
        // 1 - U lies in (0, 1], so the log is finite.
        let u1: f64 = 1.0 - self.rng.random::<f64>();
        let u2: f64 = self.rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some(r * theta.sin());
        r * theta.cos()
    }
}

/// Deterministic untrained weights for `spec` (same seed, same weights, on
/// every platform): convs Kaiming-normal (fan_out, ReLU gain) as torchvision
/// initialises ResNets, batch norm as identity (weight 1, bias 0, running
/// mean 0, running var 1), the fc weight uniform in ±1/sqrt(fan_in) (torch's
/// `Linear` default) and the fc bias 0. An ensemble's member `i` is drawn
/// from seed `seed + i`, so its members differ and member 0 is the plain
/// model of the same seed.
pub fn init_weights(spec: &ResNetSpec, seed: u64) -> Weights {
    let member = spec.member();
    Weights::from_members(
        (0..u64::from(spec.members))
            .map(|i| init_member(&member, seed.wrapping_add(i)))
            .collect(),
    )
}

fn init_member(spec: &ResNetSpec, seed: u64) -> Weights {
    let mut normal = Normal {
        rng: ChaCha8Rng::seed_from_u64(seed),
        spare: None,
    };
    let mut weights = Weights::new();
    for p in spec.params() {
        let n = p.numel();
        let data: Vec<f32> = match p.shape.len() {
            4 => {
                let fan_out = (p.shape[0] * p.shape[2] * p.shape[3]).max(1) as f64;
                let std = (2.0 / fan_out).sqrt();
                (0..n).map(|_| (normal.next() * std) as f32).collect()
            }
            2 => {
                let bound = 1.0 / (p.shape[1].max(1) as f64).sqrt();
                (0..n)
                    .map(|_| ((normal.rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                    .collect()
            }
            _ => {
                let one = p.name.ends_with(".running_var")
                    || (p.name.ends_with(".weight") && p.name != "fc.weight");
                vec![if one { 1.0 } else { 0.0 }; n]
            }
        };
        weights.insert(p.name, p.shape, data);
    }
    weights
}

/// Checks `weights` holds exactly the parameters of one plain network of
/// `spec`, with the right shapes and finite values: for writers that rebuild
/// that network by themselves (the int8 writer). They know nothing of
/// members, flips or temperatures and would silently drop them, so such a
/// spec is [`OnnxError::NotPlain`].
pub(super) fn check_weights(
    spec: &ResNetSpec,
    weights: &Weights,
) -> Result<Vec<ParamSpec>, OnnxError> {
    if !spec.is_plain() {
        return Err(OnnxError::NotPlain {
            what: "int8 quantisation",
            members: spec.members,
            tta_flip: spec.tta_flip,
            temperature: spec.temperature,
        });
    }
    check_params(spec.params(), weights)
}

/// Checks `weights` holds exactly `params`, with the right shapes and
/// finite values.
fn check_params(params: Vec<ParamSpec>, weights: &Weights) -> Result<Vec<ParamSpec>, OnnxError> {
    for p in &params {
        let w = weights
            .get(&p.name)
            .ok_or_else(|| OnnxError::MissingWeight {
                name: p.name.clone(),
            })?;
        if w.shape != p.shape {
            return Err(OnnxError::ShapeMismatch {
                name: p.name.clone(),
                expected: p.shape.clone(),
                found: w.shape.clone(),
            });
        }
        if w.data.len() != p.numel() {
            return Err(OnnxError::DataLength {
                name: p.name.clone(),
                shape: p.shape.clone(),
                expected: p.numel(),
                found: w.data.len(),
            });
        }
        if let Some(index) = w.data.iter().position(|v| !v.is_finite()) {
            return Err(OnnxError::NonFinite {
                name: p.name.clone(),
                index,
            });
        }
    }
    let known: BTreeSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
    if let Some((name, _)) = weights.iter().find(|(name, _)| !known.contains(name)) {
        return Err(OnnxError::UnexpectedWeight {
            name: name.to_string(),
        });
    }
    Ok(params)
}

pub(super) fn attr_int(name: &str, i: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i,
        ..Default::default()
    }
}

pub(super) fn attr_ints(name: &str, ints: Vec<i64>) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints,
        ..Default::default()
    }
}

pub(super) fn attr_float(name: &str, f: f32) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Float as i32,
        f,
        ..Default::default()
    }
}

pub(super) fn tensor_value_info(
    name: &str,
    dims: Vec<pb::tensor_shape_proto::dimension::Value>,
) -> pb::ValueInfoProto {
    let dim = dims
        .into_iter()
        .map(|v| pb::tensor_shape_proto::Dimension {
            value: Some(v),
            ..Default::default()
        })
        .collect();
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: pb::tensor_proto::DataType::Float as i32,
                shape: Some(pb::TensorShapeProto { dim }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Accumulates nodes. Node names follow the module paths (`layer2.0.conv1`)
/// so a graph viewer lines up with the weight names; each node's output
/// tensor is `<node>.out` unless it is the graph output.
#[derive(Default)]
pub(super) struct GraphBuilder {
    pub(super) nodes: Vec<pb::NodeProto>,
}

impl GraphBuilder {
    pub(super) fn node(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<pb::AttributeProto>,
    ) -> String {
        let output = format!("{name}.out");
        self.node_to(op_type, name, inputs, attribute, &output);
        output
    }

    pub(super) fn node_to(
        &mut self,
        op_type: &str,
        name: &str,
        inputs: &[&str],
        attribute: Vec<pb::AttributeProto>,
        output: &str,
    ) {
        self.nodes.push(pb::NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![output.to_string()],
            name: name.into(),
            op_type: op_type.into(),
            attribute,
            ..Default::default()
        });
    }

    /// Bias-free square conv: node `{branch}{path}`, weight
    /// `{weights}{path}.weight` (`path` is the tch module path).
    fn conv(&mut self, at: &Branch, path: &str, x: &str, k: i64, stride: i64, pad: i64) -> String {
        let weight = format!("{}{path}.weight", at.weights);
        self.node(
            "Conv",
            &format!("{}{path}", at.nodes),
            &[x, &weight],
            vec![
                attr_ints("kernel_shape", vec![k, k]),
                attr_ints("strides", vec![stride, stride]),
                attr_ints("pads", vec![pad, pad, pad, pad]),
                attr_ints("dilations", vec![1, 1]),
                attr_int("group", 1),
            ],
        )
    }

    /// Inference-mode batch norm with the four tch tensors under `path`.
    fn bn(&mut self, at: &Branch, path: &str, x: &str) -> String {
        let names: Vec<String> = ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .map(|f| format!("{}{path}.{f}", at.weights))
            .collect();
        let inputs = [x, &names[0], &names[1], &names[2], &names[3]];
        self.node(
            "BatchNormalization",
            &format!("{}{path}", at.nodes),
            &inputs,
            vec![attr_float("epsilon", BN_EPSILON)],
        )
    }

    fn relu(&mut self, at: &Branch, name: &str, x: &str) -> String {
        self.node("Relu", &format!("{}{name}", at.nodes), &[x], vec![])
    }

    /// One network on `at.input`, up to its logits `[N, classes]`.
    fn network(&mut self, spec: &ResNetSpec, at: &Branch) -> String {
        let x = self.conv(at, "conv1", &at.input, 7, 2, 3);
        let x = self.bn(at, "bn1", &x);
        let x = self.relu(at, "relu", &x);
        let mut x = self.node(
            "MaxPool",
            &format!("{}maxpool", at.nodes),
            &[&x],
            vec![
                attr_ints("kernel_shape", vec![3, 3]),
                attr_ints("strides", vec![2, 2]),
                attr_ints("pads", vec![1, 1, 1, 1]),
            ],
        );
        for b in spec.block_layout() {
            let p = &b.prefix;
            let y = self.conv(at, &format!("{p}.conv1"), &x, 3, b.stride, 1);
            let y = self.bn(at, &format!("{p}.bn1"), &y);
            let y = self.relu(at, &format!("{p}.relu1"), &y);
            let y = self.conv(at, &format!("{p}.conv2"), &y, 3, 1, 1);
            let y = self.bn(at, &format!("{p}.bn2"), &y);
            let shortcut = if b.downsample {
                let s = self.conv(at, &format!("{p}.downsample.0"), &x, 1, b.stride, 0);
                self.bn(at, &format!("{p}.downsample.1"), &s)
            } else {
                x.clone()
            };
            let sum = self.node(
                "Add",
                &format!("{}{p}.add", at.nodes),
                &[&y, &shortcut],
                vec![],
            );
            x = self.relu(at, &format!("{p}.relu2"), &sum);
        }
        let x = self.node(
            "GlobalAveragePool",
            &format!("{}avgpool", at.nodes),
            &[&x],
            vec![],
        );
        let x = self.node(
            "Flatten",
            &format!("{}flatten", at.nodes),
            &[&x],
            vec![attr_int("axis", 1)],
        );
        self.node(
            "Gemm",
            &format!("{}fc", at.nodes),
            &[
                &x,
                &format!("{}fc.weight", at.weights),
                &format!("{}fc.bias", at.weights),
            ],
            vec![
                attr_float("alpha", 1.0),
                attr_float("beta", 1.0),
                attr_int("transB", 1),
            ],
        )
    }
}

/// One forward pass of a member inside the graph: where its nodes' names
/// start, where its weights' names start, and the image it sees.
struct Branch {
    /// Prefix of its node names: `""` for the plain model, `m{i}.` for a
    /// member, with `flip.` added on the mirrored image.
    nodes: String,
    /// Prefix of its weight names ([`ResNetSpec::member_prefix`]); a member
    /// shares its weights between its two branches.
    weights: String,
    /// The graph input or the flipped image.
    input: String,
}

/// The branches of `spec`'s graph, member by member, each member's plain
/// branch before its flipped one (`flipped` names the mirrored input).
fn branches(spec: &ResNetSpec, flipped: Option<&str>) -> Vec<Branch> {
    let mut out = Vec::with_capacity(spec.branches());
    for i in 0..spec.members {
        let weights = spec.member_prefix(i);
        out.push(Branch {
            nodes: weights.clone(),
            weights: weights.clone(),
            input: INPUT_NAME.into(),
        });
        if let Some(flipped) = flipped {
            out.push(Branch {
                nodes: format!("{weights}{FLIP_NODE}."),
                weights,
                input: flipped.into(),
            });
        }
    }
    out
}

/// A float32 initializer, little-endian raw data.
fn float_initializer(name: &str, dims: Vec<i64>, data: &[f32]) -> pb::TensorProto {
    let mut raw = Vec::with_capacity(data.len() * 4);
    for v in data {
        raw.extend_from_slice(&v.to_le_bytes());
    }
    pb::TensorProto {
        dims,
        data_type: pb::tensor_proto::DataType::Float as i32,
        name: name.into(),
        raw_data: raw,
        ..Default::default()
    }
}

/// Serialises `spec` with `weights` to ONNX protobuf bytes.
///
/// `weights` holds [`ResNetSpec::graph_params`]: one network's tch names for
/// a single member, `m{i}.`-prefixed names for an ensemble (see
/// [`Weights::from_members`]). Refuses (naming the tensor) any missing,
/// misshapen, non-finite or unexpected weight: a model that silently dropped
/// or zero-filled a tensor would load fine and predict garbage.
pub fn write_onnx(spec: &ResNetSpec, weights: &Weights) -> Result<Vec<u8>, OnnxError> {
    spec.validate()?;
    let params = check_params(spec.graph_params(), weights)?;

    let mut initializer: Vec<pb::TensorProto> = params
        .iter()
        .map(|p| {
            let data = &weights.get(&p.name).expect("checked above").data;
            float_initializer(&p.name, p.shape.clone(), data)
        })
        .collect();

    let mut g = GraphBuilder::default();
    // The mirror image is made once and shared by every member: a Gather of
    // the width indices in reverse, the flip torch writes as `x.flip(3)`.
    let flipped = if spec.tta_flip {
        let side = i64::from(spec.image_size);
        let mut raw = Vec::with_capacity(spec.image_size as usize * 8);
        for i in (0..side).rev() {
            raw.extend_from_slice(&i.to_le_bytes());
        }
        initializer.push(pb::TensorProto {
            dims: vec![side],
            data_type: pb::tensor_proto::DataType::Int64 as i32,
            name: FLIP_INDICES.into(),
            raw_data: raw,
            ..Default::default()
        });
        Some(g.node(
            "Gather",
            FLIP_NODE,
            &[INPUT_NAME, FLIP_INDICES],
            vec![attr_int("axis", 3)],
        ))
    } else {
        None
    };
    if spec.temperature != 1.0 {
        // A scalar, so Div broadcasts it over [N, classes].
        initializer.push(float_initializer(
            TEMPERATURE_NAME,
            vec![],
            &[spec.temperature],
        ));
    }
    let branches = branches(spec, flipped.as_deref());
    let single = branches.len() == 1;
    let mut probabilities = Vec::with_capacity(branches.len());
    for at in &branches {
        let mut logits = g.network(spec, at);
        if spec.temperature != 1.0 {
            // Not named like the initializer: tract puts nodes and
            // initializers in one namespace.
            logits = g.node(
                "Div",
                &format!("{}{TEMPERATURE_NAME}_div", at.nodes),
                &[&logits, TEMPERATURE_NAME],
                vec![],
            );
        }
        let name = format!("{}softmax", at.nodes);
        let softmax = vec![attr_int("axis", 1)];
        if single {
            g.node_to("Softmax", &name, &[&logits], softmax, OUTPUT_NAME);
        } else {
            probabilities.push(g.node("Softmax", &name, &[&logits], softmax));
        }
    }
    if !single {
        // The average of probabilities, not of logits: each member's
        // softmax is a calibrated-ish vote, and the mean of votes stays in
        // [0, 1] and sums to 1 whatever the members disagree on.
        let inputs: Vec<&str> = probabilities.iter().map(String::as_str).collect();
        g.node_to("Mean", "mean", &inputs, vec![], OUTPUT_NAME);
    }

    use pb::tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    let side = i64::from(spec.image_size);
    let mut input = tensor_value_info(
        INPUT_NAME,
        vec![
            DimParam(BATCH_DIM.into()),
            DimValue(spec.in_channels),
            DimValue(side),
            DimValue(side),
        ],
    );
    input.doc_string = "float32 image batch, min-max normalised to [0, 1]".into();
    let mut output = tensor_value_info(
        OUTPUT_NAME,
        vec![DimParam(BATCH_DIM.into()), DimValue(spec.num_classes)],
    );
    output.doc_string = "softmax probabilities; column 0 = effusion, column 1 = nofinding".into();

    let graph = pb::GraphProto {
        node: g.nodes,
        name: "pleura_resnet".into(),
        initializer,
        input: vec![input],
        output: vec![output],
        ..Default::default()
    };
    let spec_json = serde_json::to_string(spec).expect("a ResNetSpec always serialises to JSON");
    let model = pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET_VERSION,
        }],
        producer_name: PRODUCER_NAME.into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: vec![pb::StringStringEntryProto {
            key: SPEC_METADATA_KEY.into(),
            value: spec_json,
        }],
        ..Default::default()
    };
    Ok(model.encode_to_vec())
}

#[cfg(test)]
mod tests;
