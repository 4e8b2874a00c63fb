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

/// Shape of the network. Serialised into the manifest, so the trainer, the
/// writer and the worker all build from the same description.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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
        Ok(())
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

    /// Every parameter and buffer, in module-creation order, with the exact
    /// name a tch `VarStore` gives it and its shape. [`write_onnx`] expects
    /// exactly this set; [`init_weights`] produces it.
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
/// `Linear` default) and the fc bias 0.
pub fn init_weights(spec: &ResNetSpec, seed: u64) -> Weights {
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

/// Checks `weights` holds exactly the parameters of `spec`, with the right
/// shapes and finite values.
pub(super) fn check_weights(
    spec: &ResNetSpec,
    weights: &Weights,
) -> Result<Vec<ParamSpec>, OnnxError> {
    let params = spec.params();
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

    /// Bias-free square conv; `path` is the module path (its weight is `path.weight`).
    fn conv(&mut self, path: &str, x: &str, k: i64, stride: i64, pad: i64) -> String {
        let weight = format!("{path}.weight");
        self.node(
            "Conv",
            path,
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
    fn bn(&mut self, path: &str, x: &str) -> String {
        let names: Vec<String> = ["weight", "bias", "running_mean", "running_var"]
            .iter()
            .map(|f| format!("{path}.{f}"))
            .collect();
        let inputs = [x, &names[0], &names[1], &names[2], &names[3]];
        self.node(
            "BatchNormalization",
            path,
            &inputs,
            vec![attr_float("epsilon", BN_EPSILON)],
        )
    }

    fn relu(&mut self, name: &str, x: &str) -> String {
        self.node("Relu", name, &[x], vec![])
    }
}

/// Serialises `spec` with `weights` to ONNX protobuf bytes.
///
/// Refuses (naming the tensor) any missing, misshapen, non-finite or
/// unexpected weight: a model that silently dropped or zero-filled a tensor
/// would load fine and predict garbage.
pub fn write_onnx(spec: &ResNetSpec, weights: &Weights) -> Result<Vec<u8>, OnnxError> {
    spec.validate()?;
    let params = check_weights(spec, weights)?;

    let initializer = params
        .iter()
        .map(|p| {
            let data = &weights.get(&p.name).expect("checked above").data;
            let mut raw = Vec::with_capacity(data.len() * 4);
            for v in data {
                raw.extend_from_slice(&v.to_le_bytes());
            }
            pb::TensorProto {
                dims: p.shape.clone(),
                data_type: pb::tensor_proto::DataType::Float as i32,
                name: p.name.clone(),
                raw_data: raw,
                ..Default::default()
            }
        })
        .collect();

    let mut g = GraphBuilder::default();
    let x = g.conv("conv1", INPUT_NAME, 7, 2, 3);
    let x = g.bn("bn1", &x);
    let x = g.relu("relu", &x);
    let mut x = g.node(
        "MaxPool",
        "maxpool",
        &[&x],
        vec![
            attr_ints("kernel_shape", vec![3, 3]),
            attr_ints("strides", vec![2, 2]),
            attr_ints("pads", vec![1, 1, 1, 1]),
        ],
    );
    for b in spec.block_layout() {
        let p = &b.prefix;
        let y = g.conv(&format!("{p}.conv1"), &x, 3, b.stride, 1);
        let y = g.bn(&format!("{p}.bn1"), &y);
        let y = g.relu(&format!("{p}.relu1"), &y);
        let y = g.conv(&format!("{p}.conv2"), &y, 3, 1, 1);
        let y = g.bn(&format!("{p}.bn2"), &y);
        let shortcut = if b.downsample {
            let s = g.conv(&format!("{p}.downsample.0"), &x, 1, b.stride, 0);
            g.bn(&format!("{p}.downsample.1"), &s)
        } else {
            x.clone()
        };
        let sum = g.node("Add", &format!("{p}.add"), &[&y, &shortcut], vec![]);
        x = g.relu(&format!("{p}.relu2"), &sum);
    }
    let x = g.node("GlobalAveragePool", "avgpool", &[&x], vec![]);
    let x = g.node("Flatten", "flatten", &[&x], vec![attr_int("axis", 1)]);
    let x = g.node(
        "Gemm",
        "fc",
        &[&x, "fc.weight", "fc.bias"],
        vec![
            attr_float("alpha", 1.0),
            attr_float("beta", 1.0),
            attr_int("transB", 1),
        ],
    );
    g.node_to(
        "Softmax",
        "softmax",
        &[&x],
        vec![attr_int("axis", 1)],
        OUTPUT_NAME,
    );

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
mod tests {
    use super::*;
    use tract_onnx::prelude::*;

    fn tiny(image_size: u32) -> ResNetSpec {
        ResNetSpec {
            image_size,
            ..ResNetSpec::tiny()
        }
    }

    /// Loads `bytes` in tract for a fixed input shape and runs it.
    fn run_tract(
        bytes: &[u8],
        shape: [usize; 4],
        input: &[f32],
    ) -> TractResult<(Vec<usize>, Vec<f32>)> {
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])?
            .with_input_fact(0, f32::fact(shape).into())?
            .into_optimized()?
            .into_runnable()?;
        let out = model.run(tvec!(Tensor::from_shape(&shape, input)?.into()))?;
        let view = out[0].to_plain_array_view::<f32>()?;
        Ok((view.shape().to_vec(), view.iter().copied().collect()))
    }

    fn random_input(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<f32>()).collect()
    }

    fn assert_probabilities(shape: &[usize], probs: &[f32], batch: usize, classes: usize) {
        assert_eq!(shape, &[batch, classes]);
        for row in probs.chunks(classes) {
            assert!(row.iter().all(|p| p.is_finite() && *p >= 0.0), "{row:?}");
            let sum: f32 = row.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "row sums to {sum}");
        }
    }

    #[test]
    fn default_spec_params_match_tch_names() {
        let params = ResNetSpec::default().params();
        // conv1 + bn1(4) + 8 blocks x (2 convs + 2 BNs = 10) + 3 downsamples x 5 + fc(2).
        assert_eq!(params.len(), 1 + 4 + 8 * 10 + 3 * 5 + 2);
        let shape = |name: &str| {
            params
                .iter()
                .find(|p| p.name == name)
                .map(|p| p.shape.clone())
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        assert_eq!(params[0].name, "conv1.weight");
        assert_eq!(shape("conv1.weight"), vec![64, 1, 7, 7]);
        assert_eq!(shape("bn1.running_var"), vec![64]);
        assert_eq!(shape("layer1.0.conv1.weight"), vec![64, 64, 3, 3]);
        assert_eq!(shape("layer1.1.bn2.bias"), vec![64]);
        assert_eq!(shape("layer2.0.conv1.weight"), vec![128, 64, 3, 3]);
        assert_eq!(shape("layer2.0.downsample.0.weight"), vec![128, 64, 1, 1]);
        assert_eq!(shape("layer2.0.downsample.1.running_mean"), vec![128]);
        assert_eq!(shape("layer4.1.conv2.weight"), vec![512, 512, 3, 3]);
        assert_eq!(shape("fc.weight"), vec![2, 512]);
        assert_eq!(shape("fc.bias"), vec![2]);
        assert_eq!(params.last().unwrap().name, "fc.bias");
        // Stage 1 keeps channels and stride: no downsample there.
        assert!(!params
            .iter()
            .any(|p| p.name.starts_with("layer1.0.downsample")));
        assert!(!params
            .iter()
            .any(|p| p.name.starts_with("layer2.1.downsample")));
        // ResNet-18 has 11.17M trainable parameters at 3 input channels; at 1
        // input channel the stem loses 2*64*49 and the head is 2 classes.
        let trainable: usize = params
            .iter()
            .filter(|p| p.trainable())
            .map(|p| p.numel())
            .sum();
        assert_eq!(trainable, 11_689_512 - 2 * 64 * 49 - 998 * 513);
        let names: BTreeSet<_> = params.iter().map(|p| &p.name).collect();
        assert_eq!(names.len(), params.len(), "names are unique");
    }

    #[test]
    fn with_width_scales_stages() {
        let s = ResNetSpec::with_width(4);
        assert_eq!((s.stem_width, s.widths.clone()), (4, vec![4, 8, 16, 32]));
        assert_eq!(s.image_size, 256);
        assert_eq!(s.blocks, vec![2, 2, 2, 2]);
    }

    #[test]
    fn write_onnx_refuses_bad_weights() {
        let spec = tiny(32);
        let good = init_weights(&spec, 1);
        assert!(write_onnx(&spec, &good).is_ok());

        let mut w = good.clone();
        w.remove("layer3.0.bn1.running_var");
        match write_onnx(&spec, &w) {
            Err(OnnxError::MissingWeight { name }) => assert_eq!(name, "layer3.0.bn1.running_var"),
            other => panic!("{other:?}"),
        }

        let mut w = good.clone();
        w.insert("fc.weight", vec![32, 2], vec![0.0; 64]);
        match write_onnx(&spec, &w) {
            Err(OnnxError::ShapeMismatch {
                name,
                expected,
                found,
            }) => {
                assert_eq!(
                    (name.as_str(), expected, found),
                    ("fc.weight", vec![2, 32], vec![32, 2])
                );
            }
            other => panic!("{other:?}"),
        }

        let mut w = good.clone();
        w.get_mut("fc.bias").unwrap().data.push(0.0);
        assert!(matches!(
            write_onnx(&spec, &w),
            Err(OnnxError::DataLength { .. })
        ));

        let mut w = good.clone();
        w.get_mut("conv1.weight").unwrap().data[3] = f32::NAN;
        assert!(matches!(
            write_onnx(&spec, &w),
            Err(OnnxError::NonFinite { index: 3, .. })
        ));

        let mut w = good.clone();
        w.insert("bn1.num_batches_tracked", vec![1], vec![0.0]);
        match write_onnx(&spec, &w) {
            Err(OnnxError::UnexpectedWeight { name }) => {
                assert_eq!(name, "bn1.num_batches_tracked")
            }
            other => panic!("{other:?}"),
        }

        let bad = ResNetSpec {
            blocks: vec![2, 2],
            ..spec.clone()
        };
        assert!(matches!(
            write_onnx(&bad, &good),
            Err(OnnxError::InvalidSpec(_))
        ));
        let bad = ResNetSpec {
            image_size: 16,
            ..spec
        };
        assert!(matches!(
            write_onnx(&bad, &good),
            Err(OnnxError::InvalidSpec(_))
        ));
    }

    #[test]
    fn model_structure_is_as_declared() {
        let spec = tiny(32);
        let bytes = write_onnx(&spec, &init_weights(&spec, 0)).unwrap();
        let model = pb::ModelProto::decode(&bytes[..]).unwrap();
        assert_eq!(model.ir_version, 8);
        assert_eq!(model.opset_import.len(), 1);
        assert_eq!(
            (
                model.opset_import[0].domain.as_str(),
                model.opset_import[0].version
            ),
            ("", 17)
        );
        assert_eq!(model.producer_name, "pleura");
        let g = model.graph.unwrap();
        assert_eq!(g.input.len(), 1, "initializers are not graph inputs");
        assert_eq!(g.input[0].name, INPUT_NAME);
        assert_eq!(g.output.len(), 1);
        assert_eq!(g.output[0].name, OUTPUT_NAME);
        let names: BTreeSet<_> = g.node.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names.len(), g.node.len(), "node names are unique");
        let init: Vec<_> = g.initializer.iter().map(|t| t.name.clone()).collect();
        let params: Vec<_> = spec.params().into_iter().map(|p| p.name).collect();
        assert_eq!(init, params);
        assert!(g
            .initializer
            .iter()
            .all(|t| t.float_data.is_empty() && !t.raw_data.is_empty()));
        let bn = g
            .node
            .iter()
            .find(|n| n.op_type == "BatchNormalization")
            .unwrap();
        assert_eq!(bn.attribute[0].name, "epsilon");
        assert_eq!(bn.attribute[0].f, 1e-5);
        assert_eq!(g.node.last().unwrap().op_type, "Softmax");
    }

    #[test]
    fn tract_runs_tiny_model_batch_1_and_3() {
        let spec = tiny(64);
        let bytes = write_onnx(&spec, &init_weights(&spec, 7)).unwrap();
        for batch in [1usize, 3] {
            let shape = [batch, 1, 64, 64];
            let input = random_input(batch * 64 * 64, 3);
            let (out_shape, probs) = run_tract(&bytes, shape, &input).unwrap();
            assert_probabilities(&out_shape, &probs, batch, 2);
        }
    }

    #[test]
    fn init_is_deterministic() {
        let spec = tiny(32);
        let a = write_onnx(&spec, &init_weights(&spec, 42)).unwrap();
        let b = write_onnx(&spec, &init_weights(&spec, 42)).unwrap();
        let c = write_onnx(&spec, &init_weights(&spec, 43)).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let w = init_weights(&spec, 42);
        assert!(w.get("bn1.weight").unwrap().data.iter().all(|v| *v == 1.0));
        assert!(w
            .get("bn1.running_mean")
            .unwrap()
            .data
            .iter()
            .all(|v| *v == 0.0));
        assert!(w.get("fc.bias").unwrap().data.iter().all(|v| *v == 0.0));
        // Kaiming fan_out: std = sqrt(2 / (out * k * k)).
        let conv = &w.get("layer4.0.conv1.weight").unwrap().data;
        let var = conv.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / conv.len() as f64;
        let expected = 2.0 / (32.0 * 9.0);
        assert!(
            (var / expected - 1.0).abs() < 0.05,
            "variance {var} vs {expected}"
        );
    }

    // ---- A naive reference forward pass, NCHW, single image at a time. ----

    struct Act {
        c: usize,
        h: usize,
        w: usize,
        v: Vec<f32>,
    }

    fn conv(x: &Act, wt: &WeightTensor, stride: usize, pad: usize) -> Act {
        let (o, k) = (wt.shape[0] as usize, wt.shape[2] as usize);
        let oh = (x.h + 2 * pad - k) / stride + 1;
        let ow = (x.w + 2 * pad - k) / stride + 1;
        let mut v = vec![0f32; o * oh * ow];
        for oc in 0..o {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0f64;
                    for ic in 0..x.c {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * stride + ky) as isize - pad as isize;
                                let ix = (ox * stride + kx) as isize - pad as isize;
                                if iy < 0 || ix < 0 || iy >= x.h as isize || ix >= x.w as isize {
                                    continue;
                                }
                                let xv = x.v[(ic * x.h + iy as usize) * x.w + ix as usize];
                                let wv = wt.data[((oc * x.c + ic) * k + ky) * k + kx];
                                acc += (xv * wv) as f64;
                            }
                        }
                    }
                    v[(oc * oh + oy) * ow + ox] = acc as f32;
                }
            }
        }
        Act {
            c: o,
            h: oh,
            w: ow,
            v,
        }
    }

    fn bn(mut x: Act, w: &Weights, path: &str) -> Act {
        let g = |f: &str| &w.get(&format!("{path}.{f}")).unwrap().data;
        let (gamma, beta, mean, var) =
            (g("weight"), g("bias"), g("running_mean"), g("running_var"));
        let hw = x.h * x.w;
        for (i, v) in x.v.iter_mut().enumerate() {
            let c = i / hw;
            *v = (*v - mean[c]) / (var[c] + BN_EPSILON).sqrt() * gamma[c] + beta[c];
        }
        x
    }

    fn relu(mut x: Act) -> Act {
        x.v.iter_mut().for_each(|v| *v = v.max(0.0));
        x
    }

    fn maxpool(x: &Act) -> Act {
        let (oh, ow) = ((x.h - 1) / 2 + 1, (x.w - 1) / 2 + 1);
        let mut v = vec![f32::NEG_INFINITY; x.c * oh * ow];
        for c in 0..x.c {
            for oy in 0..oh {
                for ox in 0..ow {
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                            if iy >= 0 && ix >= 0 && (iy as usize) < x.h && (ix as usize) < x.w {
                                let o = &mut v[(c * oh + oy) * ow + ox];
                                *o = o.max(x.v[(c * x.h + iy as usize) * x.w + ix as usize]);
                            }
                        }
                    }
                }
            }
        }
        Act {
            c: x.c,
            h: oh,
            w: ow,
            v,
        }
    }

    fn reference_forward(spec: &ResNetSpec, w: &Weights, image: &[f32]) -> Vec<f32> {
        let s = spec.image_size as usize;
        let x = Act {
            c: spec.in_channels as usize,
            h: s,
            w: s,
            v: image.to_vec(),
        };
        let x = relu(bn(conv(&x, w.get("conv1.weight").unwrap(), 2, 3), w, "bn1"));
        let mut x = maxpool(&x);
        for b in spec.block_layout() {
            let p = &b.prefix;
            let st = b.stride as usize;
            let y = conv(&x, w.get(&format!("{p}.conv1.weight")).unwrap(), st, 1);
            let y = relu(bn(y, w, &format!("{p}.bn1")));
            let y = conv(&y, w.get(&format!("{p}.conv2.weight")).unwrap(), 1, 1);
            let mut y = bn(y, w, &format!("{p}.bn2"));
            let short = if b.downsample {
                let s = conv(
                    &x,
                    w.get(&format!("{p}.downsample.0.weight")).unwrap(),
                    st,
                    0,
                );
                bn(s, w, &format!("{p}.downsample.1"))
            } else {
                x
            };
            y.v.iter_mut().zip(&short.v).for_each(|(a, b)| *a += b);
            x = relu(y);
        }
        let hw = (x.h * x.w) as f32;
        let pooled: Vec<f32> =
            x.v.chunks(x.h * x.w)
                .map(|c| c.iter().sum::<f32>() / hw)
                .collect();
        let fc = w.get("fc.weight").unwrap();
        let bias = &w.get("fc.bias").unwrap().data;
        let logits: Vec<f32> = fc
            .data
            .chunks(pooled.len())
            .zip(bias)
            .map(|(row, b)| row.iter().zip(&pooled).map(|(a, p)| a * p).sum::<f32>() + b)
            .collect();
        let max = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        exp.iter().map(|e| e / sum).collect()
    }

    /// Tract's output equals a hand-written forward pass. The spec covers
    /// both downsample triggers (channel change at stride 1 in stage 1, stride
    /// 2 later), an identity shortcut, 3 classes and batch 2, and every tensor
    /// (BN statistics included) is random so a swapped or ignored input shows.
    #[test]
    fn tract_matches_reference_forward_pass() {
        let spec = ResNetSpec {
            in_channels: 1,
            image_size: 32,
            stem_width: 3,
            widths: vec![4, 8, 8],
            blocks: vec![2, 1, 1],
            num_classes: 3,
        };
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut w = Weights::new();
        for p in spec.params() {
            let positive = p.name.ends_with("running_var");
            let data = (0..p.numel())
                .map(|_| {
                    let u = rng.random::<f32>();
                    if positive {
                        0.5 + u
                    } else {
                        u - 0.5
                    }
                })
                .collect();
            w.insert(p.name, p.shape, data);
        }
        assert!(w.get("layer1.0.downsample.0.weight").is_some());
        assert!(w.get("layer1.1.downsample.0.weight").is_none());
        let bytes = write_onnx(&spec, &w).unwrap();
        let batch = 2;
        let input = random_input(batch * 32 * 32, 11);
        let (shape, got) = run_tract(&bytes, [batch, 1, 32, 32], &input).unwrap();
        assert_probabilities(&shape, &got, batch, 3);
        let expected: Vec<f32> = input
            .chunks(32 * 32)
            .flat_map(|img| reference_forward(&spec, &w, img))
            .collect();
        for (g, e) in got.iter().zip(&expected) {
            assert!(
                (g - e).abs() < 1e-4,
                "tract {got:?} vs reference {expected:?}"
            );
        }
        // Guard against a degenerate comparison (all rows uniform).
        assert!(
            expected.iter().any(|p| (p - 1.0 / 3.0).abs() > 1e-3),
            "{expected:?}"
        );
    }

    /// The real seed model: ResNet-18 at 256x256 loads, optimises and runs.
    #[test]
    fn default_model_runs_in_tract() {
        let spec = ResNetSpec::default();
        let t0 = std::time::Instant::now();
        let bytes = write_onnx(&spec, &init_weights(&spec, 0)).unwrap();
        let t1 = std::time::Instant::now();
        let shape = [1, 1, 256, 256];
        let model = tract_onnx::onnx()
            .model_for_read(&mut &bytes[..])
            .unwrap()
            .with_input_fact(0, f32::fact(shape).into())
            .unwrap()
            .into_optimized()
            .unwrap()
            .into_runnable()
            .unwrap();
        let t2 = std::time::Instant::now();
        let input = Tensor::from_shape(&shape, &random_input(256 * 256, 1)).unwrap();
        let out = model.run(tvec!(input.into())).unwrap();
        let t3 = std::time::Instant::now();
        let view = out[0].to_plain_array_view::<f32>().unwrap();
        let probs: Vec<f32> = view.iter().copied().collect();
        assert_probabilities(view.shape(), &probs, 1, 2);
        eprintln!(
            "resnet18@256: {} MB onnx; init+write {:?}, load+optimise {:?}, one inference {:?}",
            bytes.len() / 1_000_000,
            t1 - t0,
            t2 - t1,
            t3 - t2
        );
    }
}
