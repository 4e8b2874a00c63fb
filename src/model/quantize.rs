//! int8 variants of a trained model: batch norm folded into the convolutions,
//! activations calibrated on real scans, and a QDQ graph that ONNX Runtime
//! runs with its int8 kernels (VNNI where the CPU has it).
//!
//! The recipe is the standard static QDQ one:
//! - **weights** int8, symmetric, per output channel (`scale = max|w| / 127`);
//!   biases int32 at `input scale × weight scale`;
//! - **activations** uint8, per tensor, from the min/max seen on the
//!   calibration scans. A ReLU's output is quantised with zero point 0, so
//!   the QuantizeLinear itself clamps at 0 and the ReLU node goes;
//! - the quantised region is the whole trunk (stem, max-pool, every block,
//!   residual adds); the head (global average pool, fc, **Softmax**) stays
//!   in float. A Softmax between DequantizeLinear and QuantizeLinear would
//!   be replaced by a lookup table in tract and output 1.0.
//!
//! Calibration runs the folded float graph in tract with every tensor the
//! int8 graph quantises as an extra output, so the ranges come from exactly
//! the arithmetic the int8 graph approximates. Use scans from the model's
//! own training data, never its validation set.

use std::collections::BTreeMap;

use prost::Message;
use tract_onnx::pb;
use tract_onnx::prelude::*;

use super::engine::{Engine, EngineError, EngineOptions};
use super::manifest::{
    golden_input, sha256_hex, Derivation, GoldenCase, Manifest, ModelFiles, Precision,
    MAX_VERSION_LEN,
};
use super::onnx::{
    attr_float, attr_int, attr_ints, check_weights, tensor_value_info, GraphBuilder, OnnxError,
    ResNetSpec, WeightTensor, Weights, BATCH_DIM, BN_EPSILON, INPUT_NAME, IR_VERSION,
    OPSET_VERSION, OUTPUT_NAME, PRODUCER_NAME, SPEC_METADATA_KEY,
};

/// Why an int8 variant could not be made.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// The fp32 model's ONNX is not one this crate wrote.
    #[error("not a Pleura fp32 model: {0}")]
    NotOurs(String),
    /// Its weights do not fit its spec.
    #[error(transparent)]
    Weights(#[from] OnnxError),
    /// tract could not run the calibration graph.
    #[error("calibration: {0}")]
    Calibration(#[from] EngineError),
    /// No calibration scans were given.
    #[error("no calibration scans")]
    NoCalibration,
}

impl From<TractError> for QuantizeError {
    fn from(e: TractError) -> Self {
        QuantizeError::Calibration(EngineError::Tract(format!("{e:#}")))
    }
}

/// What calibration saw: each quantised tensor's range, and which scans.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Calibration {
    /// Tensor name to (min, max) over the calibration scans.
    pub ranges: BTreeMap<String, (f32, f32)>,
    /// Scans calibrated on.
    pub images: usize,
    /// SHA-256 of the calibration inputs' bytes, in order: which scans.
    pub fingerprint: String,
}

/// Reads back the weights of an ONNX model this crate's writer produced
/// (its initializers carry the tch names).
pub fn read_weights(onnx: &[u8]) -> Result<Weights, QuantizeError> {
    let model = pb::ModelProto::decode(onnx).map_err(|e| QuantizeError::NotOurs(e.to_string()))?;
    let graph = model
        .graph
        .ok_or_else(|| QuantizeError::NotOurs("no graph".into()))?;
    let mut weights = Weights::new();
    for t in graph.initializer {
        if t.data_type != pb::tensor_proto::DataType::Float as i32 {
            return Err(QuantizeError::NotOurs(format!(
                "initializer {} is not float32 (already quantised?)",
                t.name
            )));
        }
        let data: Vec<f32> = if !t.raw_data.is_empty() {
            t.raw_data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        } else {
            t.float_data
        };
        weights.insert(t.name, t.dims, data);
    }
    Ok(weights)
}

/// A convolution with its batch norm folded in: `[out, in, k, k]` weights
/// and a per-output-channel bias.
struct Folded {
    weight: WeightTensor,
    bias: Vec<f32>,
}

/// Folds batch norm `bn` into conv `conv`:
/// `w' = w · γ / √(σ² + ε)`, `b' = β − μ · γ / √(σ² + ε)`.
fn fold(weights: &Weights, conv: &str, bn: &str) -> Folded {
    let get = |n: String| weights.get(&n).expect("checked against the spec");
    let w = get(format!("{conv}.weight"));
    let (gamma, beta) = (get(format!("{bn}.weight")), get(format!("{bn}.bias")));
    let (mean, var) = (
        get(format!("{bn}.running_mean")),
        get(format!("{bn}.running_var")),
    );
    let out = w.shape[0] as usize;
    let per = w.data.len() / out;
    let mut data = w.data.clone();
    let mut bias = vec![0f32; out];
    for c in 0..out {
        let k = gamma.data[c] / (var.data[c] + BN_EPSILON).sqrt();
        for v in &mut data[c * per..(c + 1) * per] {
            *v *= k;
        }
        bias[c] = beta.data[c] - mean.data[c] * k;
    }
    Folded {
        weight: WeightTensor {
            shape: w.shape.clone(),
            data,
        },
        bias,
    }
}

/// Tensor payloads of the graph being written.
#[derive(Default)]
struct Initializers(Vec<pb::TensorProto>);

impl Initializers {
    fn add(
        &mut self,
        name: &str,
        dims: Vec<i64>,
        data_type: pb::tensor_proto::DataType,
        raw: Vec<u8>,
    ) -> String {
        self.0.push(pb::TensorProto {
            dims,
            data_type: data_type as i32,
            name: name.into(),
            raw_data: raw,
            ..Default::default()
        });
        name.to_string()
    }

    fn f32s(&mut self, name: &str, dims: Vec<i64>, values: &[f32]) -> String {
        let raw = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.add(name, dims, pb::tensor_proto::DataType::Float, raw)
    }
}

/// Quantisation parameters of one uint8 tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
struct QParams {
    scale: f32,
    zero_point: u8,
}

impl QParams {
    /// Asymmetric uint8 over `[lo, hi]`, widened to contain 0 (so that 0 is
    /// exact, as padding needs).
    fn from_range(lo: f32, hi: f32) -> QParams {
        let (lo, hi) = (lo.min(0.0), hi.max(0.0));
        let span = hi - lo;
        let scale = if span > f32::EPSILON {
            span / 255.0
        } else {
            1.0 / 255.0
        };
        let zero_point = (-lo / scale).round().clamp(0.0, 255.0) as u8;
        QParams { scale, zero_point }
    }
}

/// How the shared graph walk treats each tensor the int8 graph quantises.
enum Mode<'a> {
    /// The float graph, with each such tensor made a graph output.
    Calibrate { outputs: Vec<String> },
    /// The QDQ graph, quantising each with its calibrated range.
    Int8 {
        ranges: &'a BTreeMap<String, (f32, f32)>,
        params: BTreeMap<String, QParams>,
    },
}

/// Writes the folded graph (float for calibration, QDQ for int8), walking
/// the network the same way in both so their tensors line up by name.
struct Writer<'a> {
    g: GraphBuilder,
    init: Initializers,
    mode: Mode<'a>,
    weights: &'a Weights,
}

/// A square convolution's kernel side, stride and padding.
#[derive(Clone, Copy)]
struct Geom {
    k: i64,
    stride: i64,
    pad: i64,
}

impl Geom {
    fn new(k: i64, stride: i64, pad: i64) -> Geom {
        Geom { k, stride, pad }
    }
}

impl Writer<'_> {
    /// A tensor the int8 graph quantises. `relu` says it is a ReLU's output:
    /// the float graph applies the ReLU, the int8 graph lets a zero-point-0
    /// QuantizeLinear clamp instead.
    fn point(&mut self, key: &str, x: &str, relu: bool) -> String {
        let q = match &mut self.mode {
            Mode::Calibrate { .. } => None,
            Mode::Int8 { ranges, params } => {
                let (lo, hi) = ranges.get(key).copied().unwrap_or((0.0, 1.0));
                let q = if relu {
                    QParams::from_range(0.0, hi)
                } else {
                    QParams::from_range(lo, hi)
                };
                params.insert(key.to_string(), q);
                Some(q)
            }
        };
        match q {
            Some(q) => self.qdq(key, x, q),
            None => {
                let y = if relu {
                    self.g.node("Relu", &format!("{key}.relu"), &[x], vec![])
                } else {
                    x.to_string()
                };
                if let Mode::Calibrate { outputs } = &mut self.mode {
                    outputs.push(y.clone());
                }
                y
            }
        }
    }

    /// QuantizeLinear then DequantizeLinear of `x` with `q`.
    fn qdq(&mut self, key: &str, x: &str, q: QParams) -> String {
        let scale = self
            .init
            .f32s(&format!("{key}.q.scale"), vec![], &[q.scale]);
        let zp = self.init.add(
            &format!("{key}.q.zero_point"),
            vec![],
            pb::tensor_proto::DataType::Uint8,
            vec![q.zero_point],
        );
        let quantised = self.g.node(
            "QuantizeLinear",
            &format!("{key}.q"),
            &[x, &scale, &zp],
            vec![],
        );
        self.g.node(
            "DequantizeLinear",
            &format!("{key}.dq"),
            &[&quantised, &scale, &zp],
            vec![],
        )
    }

    /// The input scale of a tensor already quantised at `key`.
    fn scale_of(&self, key: &str) -> f32 {
        match &self.mode {
            Mode::Int8 { params, .. } => params[key].scale,
            Mode::Calibrate { .. } => 1.0,
        }
    }

    /// A folded conv+bn reading `x`, quantised at `input_key`.
    fn conv(&mut self, conv: &str, bn: &str, x: &str, input_key: &str, geom: Geom) -> String {
        let Geom { k, stride, pad } = geom;
        let f = fold(self.weights, conv, bn);
        let out = f.weight.shape[0];
        let int8 = matches!(self.mode, Mode::Int8 { .. });
        let (w, b) = if int8 {
            let s_in = self.scale_of(input_key);
            self.quantised_weights(conv, &f, s_in)
        } else {
            (
                self.init.f32s(
                    &format!("{conv}.weight"),
                    f.weight.shape.clone(),
                    &f.weight.data,
                ),
                self.init.f32s(&format!("{conv}.bias"), vec![out], &f.bias),
            )
        };
        self.g.node(
            "Conv",
            conv,
            &[x, &w, &b],
            vec![
                attr_ints("kernel_shape", vec![k, k]),
                attr_ints("strides", vec![stride, stride]),
                attr_ints("pads", vec![pad, pad, pad, pad]),
                attr_ints("dilations", vec![1, 1]),
                attr_int("group", 1),
            ],
        )
    }

    /// int8 per-channel weights and int32 biases, each behind its
    /// DequantizeLinear (axis 0, the output channel).
    fn quantised_weights(&mut self, conv: &str, f: &Folded, s_in: f32) -> (String, String) {
        let out = f.weight.shape[0] as usize;
        let per = f.weight.data.len() / out;
        let mut w_scale = Vec::with_capacity(out);
        let mut w_q = Vec::with_capacity(f.weight.data.len());
        for row in f.weight.data.chunks_exact(per) {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if max > 0.0 { max / 127.0 } else { 1.0 };
            w_scale.push(s);
            w_q.extend(
                row.iter()
                    .map(|v| (v / s).round().clamp(-127.0, 127.0) as i8 as u8),
            );
        }
        let b_scale: Vec<f32> = w_scale.iter().map(|s| s * s_in).collect();
        let b_q: Vec<u8> = f
            .bias
            .iter()
            .zip(&b_scale)
            .flat_map(|(b, s)| {
                ((b / s).round().clamp(i32::MIN as f32, i32::MAX as f32) as i32).to_le_bytes()
            })
            .collect();
        let n = out as i64;
        let wq = self.init.add(
            &format!("{conv}.weight.q"),
            f.weight.shape.clone(),
            pb::tensor_proto::DataType::Int8,
            w_q,
        );
        let ws = self
            .init
            .f32s(&format!("{conv}.weight.scale"), vec![n], &w_scale);
        let wz = self.init.add(
            &format!("{conv}.weight.zero_point"),
            vec![n],
            pb::tensor_proto::DataType::Int8,
            vec![0; out],
        );
        let bq = self.init.add(
            &format!("{conv}.bias.q"),
            vec![n],
            pb::tensor_proto::DataType::Int32,
            b_q,
        );
        let bs = self
            .init
            .f32s(&format!("{conv}.bias.scale"), vec![n], &b_scale);
        let bz = self.init.add(
            &format!("{conv}.bias.zero_point"),
            vec![n],
            pb::tensor_proto::DataType::Int32,
            vec![0; out * 4],
        );
        let axis = vec![attr_int("axis", 0)];
        let w = self.g.node(
            "DequantizeLinear",
            &format!("{conv}.weight.dq"),
            &[&wq, &ws, &wz],
            axis.clone(),
        );
        let b = self.g.node(
            "DequantizeLinear",
            &format!("{conv}.bias.dq"),
            &[&bq, &bs, &bz],
            axis,
        );
        (w, b)
    }

    /// The whole network; returns the float logits' softmax output name.
    fn network(&mut self, spec: &ResNetSpec) {
        let mut x = self.point("input", INPUT_NAME, false);
        let mut key = "input".to_string();
        let c = self.conv("conv1", "bn1", &x, &key, Geom::new(7, 2, 3));
        x = self.point("stem", &c, true);
        key = "stem".into();
        let pooled = self.g.node(
            "MaxPool",
            "maxpool",
            &[&x],
            vec![
                attr_ints("kernel_shape", vec![3, 3]),
                attr_ints("strides", vec![2, 2]),
                attr_ints("pads", vec![1, 1, 1, 1]),
            ],
        );
        // Max-pooling keeps the input's quantisation: re-quantise identically.
        let stem = match &self.mode {
            Mode::Int8 { params, .. } => Some(params["stem"]),
            Mode::Calibrate { .. } => None,
        };
        x = match stem {
            Some(q) => self.qdq("maxpool", &pooled, q),
            None => pooled,
        };
        for b in spec.block_layout() {
            let p = &b.prefix;
            let c1 = self.conv(
                &format!("{p}.conv1"),
                &format!("{p}.bn1"),
                &x,
                &key,
                Geom::new(3, b.stride, 1),
            );
            let a = self.point(&format!("{p}.a"), &c1, true);
            let c2 = self.conv(
                &format!("{p}.conv2"),
                &format!("{p}.bn2"),
                &a,
                &format!("{p}.a"),
                Geom::new(3, 1, 1),
            );
            let y = self.point(&format!("{p}.b"), &c2, false);
            let shortcut = if b.downsample {
                let s = self.conv(
                    &format!("{p}.downsample.0"),
                    &format!("{p}.downsample.1"),
                    &x,
                    &key,
                    Geom::new(1, b.stride, 0),
                );
                self.point(&format!("{p}.s"), &s, false)
            } else {
                x.clone()
            };
            let sum = self
                .g
                .node("Add", &format!("{p}.add"), &[&y, &shortcut], vec![]);
            x = self.point(&format!("{p}.out"), &sum, true);
            key = format!("{p}.out");
        }
        // The head stays in float: it is tiny, and Softmax must be.
        let gap = self.g.node("GlobalAveragePool", "avgpool", &[&x], vec![]);
        let flat = self
            .g
            .node("Flatten", "flatten", &[&gap], vec![attr_int("axis", 1)]);
        let fc_w = self.weights.get("fc.weight").expect("checked");
        let fc_b = self.weights.get("fc.bias").expect("checked");
        let w = self.init.f32s("fc.weight", fc_w.shape.clone(), &fc_w.data);
        let bias = self.init.f32s("fc.bias", fc_b.shape.clone(), &fc_b.data);
        let logits = self.g.node(
            "Gemm",
            "fc",
            &[&flat, &w, &bias],
            vec![
                attr_float("alpha", 1.0),
                attr_float("beta", 1.0),
                attr_int("transB", 1),
            ],
        );
        self.g.node_to(
            "Softmax",
            "softmax",
            &[&logits],
            vec![attr_int("axis", 1)],
            OUTPUT_NAME,
        );
    }
}

/// Encodes the written graph as a model with `outputs` (the probabilities first).
fn encode(spec: &ResNetSpec, w: Writer<'_>, extra_outputs: &[String], precision: &str) -> Vec<u8> {
    use pb::tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    let side = i64::from(spec.image_size);
    let input = tensor_value_info(
        INPUT_NAME,
        vec![
            DimParam(BATCH_DIM.into()),
            DimValue(spec.in_channels),
            DimValue(side),
            DimValue(side),
        ],
    );
    let mut output = vec![tensor_value_info(
        OUTPUT_NAME,
        vec![DimParam(BATCH_DIM.into()), DimValue(spec.num_classes)],
    )];
    for name in extra_outputs {
        let mut v = tensor_value_info(name, vec![]);
        // Rank unknown to the writer: let the loader infer it.
        if let Some(pb::type_proto::Value::TensorType(t)) =
            v.r#type.as_mut().and_then(|t| t.value.as_mut())
        {
            t.shape = None;
        }
        output.push(v);
    }
    let graph = pb::GraphProto {
        node: w.g.nodes,
        name: format!("pleura_resnet_{precision}"),
        initializer: w.init.0,
        input: vec![input],
        output,
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: IR_VERSION,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: OPSET_VERSION,
        }],
        producer_name: PRODUCER_NAME.into(),
        producer_version: env!("CARGO_PKG_VERSION").into(),
        graph: Some(graph),
        metadata_props: vec![
            pb::StringStringEntryProto {
                key: SPEC_METADATA_KEY.into(),
                value: serde_json::to_string(spec).expect("a spec serialises"),
            },
            pb::StringStringEntryProto {
                key: "pleura.precision".into(),
                value: precision.into(),
            },
        ],
        ..Default::default()
    };
    model.encode_to_vec()
}

/// Measures the range of every tensor the int8 graph quantises, running
/// the folded float graph in tract on `inputs` (preprocessed scans of
/// `spec.image_size`², from the model's training data).
pub fn calibrate(
    spec: &ResNetSpec,
    weights: &Weights,
    inputs: &[Vec<f32>],
) -> Result<Calibration, QuantizeError> {
    check_weights(spec, weights)?;
    if inputs.is_empty() {
        return Err(QuantizeError::NoCalibration);
    }
    let mut w = Writer {
        g: GraphBuilder::default(),
        init: Initializers::default(),
        mode: Mode::Calibrate {
            outputs: Vec::new(),
        },
        weights,
    };
    w.network(spec);
    let Mode::Calibrate { outputs } = std::mem::replace(
        &mut w.mode,
        Mode::Calibrate {
            outputs: Vec::new(),
        },
    ) else {
        unreachable!("calibration mode")
    };
    // The keys of the points, in the order the walk met them.
    let keys = point_keys(spec);
    assert_eq!(keys.len(), outputs.len(), "one output per quantised tensor");
    let onnx = encode(spec, w, &outputs, "fp32-calibration");
    let size = spec.image_size as usize;
    let plan = tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])?
        .with_input_fact(0, f32::fact([1, 1, size, size]).into())?
        .into_optimized()?
        .into_runnable()?;
    let mut state = plan.spawn()?;
    let mut ranges: BTreeMap<String, (f32, f32)> = BTreeMap::new();
    let mut hash_input = Vec::with_capacity(inputs.len() * size * size * 4);
    for input in inputs {
        hash_input.extend(input.iter().flat_map(|v| v.to_le_bytes()));
        let tensor = Tensor::from_shape(&[1, 1, size, size], input)?;
        let out = state.run(tvec![tensor.into_tvalue()])?;
        for (key, t) in keys.iter().zip(out.iter().skip(1)) {
            let view = t.to_plain_array_view::<f32>()?;
            let (lo, hi) = view
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
                    (lo.min(v), hi.max(v))
                });
            let e = ranges.entry(key.clone()).or_insert((lo, hi));
            *e = (e.0.min(lo), e.1.max(hi));
        }
    }
    Ok(Calibration {
        ranges,
        images: inputs.len(),
        fingerprint: sha256_hex(&hash_input),
    })
}

/// The names of the quantisation points, in walk order.
fn point_keys(spec: &ResNetSpec) -> Vec<String> {
    let mut keys = vec!["input".to_string(), "stem".to_string()];
    for b in spec.block_layout() {
        let p = &b.prefix;
        keys.push(format!("{p}.a"));
        keys.push(format!("{p}.b"));
        if b.downsample {
            keys.push(format!("{p}.s"));
        }
        keys.push(format!("{p}.out"));
    }
    keys
}

/// Writes the int8 QDQ graph of `weights` with `calibration`'s ranges.
pub fn write_int8(
    spec: &ResNetSpec,
    weights: &Weights,
    calibration: &Calibration,
) -> Result<Vec<u8>, QuantizeError> {
    spec.validate()?;
    check_weights(spec, weights)?;
    let mut w = Writer {
        g: GraphBuilder::default(),
        init: Initializers::default(),
        mode: Mode::Int8 {
            ranges: &calibration.ranges,
            params: BTreeMap::new(),
        },
        weights,
    };
    w.network(spec);
    Ok(encode(spec, w, &[], "int8"))
}

/// Longest parent version that still leaves room for the `-int8` suffix.
const VARIANT_SUFFIX: &str = "-int8";

/// The int8 variant of `parent`, calibrated on `calibration_inputs`: the
/// same spec, input, labels and threshold, version `<parent>-int8`, and its
/// golden cases recomputed on the engine that will serve it (`engine`), so
/// that engine's canary checks it. Metrics are the caller's to add: they
/// must be measured on the parent's validation set.
pub fn int8_variant(
    parent: &ModelFiles,
    calibration_inputs: &[Vec<f32>],
    engine: &EngineOptions,
) -> Result<(ModelFiles, Calibration), QuantizeError> {
    let spec = &parent.manifest.spec;
    let weights = read_weights(&parent.onnx)?;
    let calibration = calibrate(spec, &weights, calibration_inputs)?;
    let onnx = write_int8(spec, &weights, &calibration)?;
    let version = format!("{}{VARIANT_SUFFIX}", parent.manifest.version);
    if version.len() > MAX_VERSION_LEN {
        return Err(QuantizeError::NotOurs(format!(
            "version {version} is longer than {MAX_VERSION_LEN} characters"
        )));
    }
    let mut manifest = Manifest {
        version,
        sha256: sha256_hex(&onnx),
        created_at: crate::time::now_rfc3339_seconds(),
        metrics: None,
        golden: Vec::new(),
        precision: Precision::Int8,
        derived_from: Some(Derivation {
            parent: parent.manifest.version.clone(),
            calibration_images: calibration.images,
            calibration_fingerprint: calibration.fingerprint.clone(),
        }),
        ..parent.manifest.clone()
    };
    let probe = Engine::from_files_with(
        ModelFiles {
            manifest: manifest.clone(),
            onnx: onnx.clone(),
        },
        engine,
    )?;
    let mut scorer = probe.scorer()?;
    for case in &parent.manifest.golden {
        let got = scorer.probabilities(&golden_input(case.input_seed, spec.image_size))?;
        manifest.golden.push(GoldenCase {
            expected: got.to_vec(),
            ..case.clone()
        });
    }
    Ok((ModelFiles { manifest, onnx }, calibration))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{golden_input, init_model, write_onnx, Graph};

    fn calibration_inputs(size: u32) -> Vec<Vec<f32>> {
        (20..28).map(|s| golden_input(s, size)).collect()
    }

    #[test]
    fn weights_read_back_as_written() {
        let files = init_model(&ResNetSpec::tiny(), 4).unwrap();
        let w = read_weights(&files.onnx).unwrap();
        let again = write_onnx(&files.manifest.spec, &w).unwrap();
        assert_eq!(again, files.onnx, "the same weights write the same bytes");
    }

    #[test]
    fn folding_batch_norm_changes_no_output() {
        // Random weights with non-trivial batch-norm statistics: the folded
        // float graph (the calibration graph's first output) must match.
        let spec = ResNetSpec {
            image_size: 64,
            ..ResNetSpec::tiny()
        };
        let mut w = super::super::onnx::init_weights(&spec, 7);
        for p in spec.params() {
            if p.name.ends_with("running_mean") || p.name.ends_with(".bias") && p.name != "fc.bias"
            {
                let t = w.get_mut(&p.name).unwrap();
                t.data
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = (i as f32 * 0.37).sin() * 0.2);
            }
            if p.name.ends_with("running_var") {
                let t = w.get_mut(&p.name).unwrap();
                t.data
                    .iter_mut()
                    .enumerate()
                    .for_each(|(i, v)| *v = 0.5 + (i as f32 * 0.11).cos().abs());
            }
        }
        let original = Graph::from_onnx(&write_onnx(&spec, &w).unwrap(), 64).unwrap();
        let mut writer = Writer {
            g: GraphBuilder::default(),
            init: Initializers::default(),
            mode: Mode::Calibrate {
                outputs: Vec::new(),
            },
            weights: &w,
        };
        writer.network(&spec);
        let folded = Graph::from_onnx(&encode(&spec, writer, &[], "fp32"), 64).unwrap();
        for input in calibration_inputs(64) {
            let (a, b) = (
                original.probabilities(&input).unwrap(),
                folded.probabilities(&input).unwrap(),
            );
            assert!((a[0] - b[0]).abs() < 1e-5, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn calibration_sees_every_quantised_tensor_and_relus_are_non_negative() {
        let files = init_model(
            &ResNetSpec {
                image_size: 64,
                ..ResNetSpec::tiny()
            },
            5,
        )
        .unwrap();
        let spec = &files.manifest.spec;
        let w = read_weights(&files.onnx).unwrap();
        let c = calibrate(spec, &w, &calibration_inputs(64)).unwrap();
        assert_eq!(c.images, 8);
        assert_eq!(c.ranges.len(), point_keys(spec).len());
        assert_eq!(
            c.ranges["input"],
            (0.0, 1.0),
            "inputs are min-max normalised"
        );
        for (k, (lo, hi)) in &c.ranges {
            assert!(lo <= hi, "{k}");
            if k == "stem" || k.ends_with(".a") || k.ends_with(".out") {
                assert!(*lo >= 0.0, "{k} is a ReLU output");
            }
        }
        assert!(matches!(
            calibrate(spec, &w, &[]),
            Err(QuantizeError::NoCalibration)
        ));
    }

    #[test]
    fn a_variant_names_its_parent_and_its_golden_cases_hold_on_its_engine() {
        let mut parent = init_model(
            &ResNetSpec {
                image_size: 64,
                ..ResNetSpec::tiny()
            },
            8,
        )
        .unwrap();
        parent.manifest.golden = vec![GoldenCase {
            name: "smooth-1".into(),
            input_seed: 1,
            expected: vec![0.5, 0.5],
        }];
        let (v, c) =
            int8_variant(&parent, &calibration_inputs(64), &EngineOptions::default()).unwrap();
        v.manifest.validate().unwrap();
        v.verify().unwrap();
        assert_eq!(
            v.manifest.version,
            format!("{}-int8", parent.manifest.version)
        );
        assert_eq!(v.manifest.precision, Precision::Int8);
        let d = v.manifest.derived_from.as_ref().unwrap();
        assert_eq!(
            (d.parent.as_str(), d.calibration_images),
            (parent.manifest.version.as_str(), 8)
        );
        assert_eq!(d.calibration_fingerprint, c.fingerprint);
        assert_eq!(v.manifest.threshold, parent.manifest.threshold);
        let engine = Engine::from_files(v.clone()).unwrap();
        engine
            .canary(1e-6)
            .expect("golden cases recomputed on the serving engine");
    }

    #[test]
    fn the_int8_graph_loads_in_tract_and_tracks_the_float_model() {
        let files = init_model(
            &ResNetSpec {
                image_size: 64,
                ..ResNetSpec::tiny()
            },
            6,
        )
        .unwrap();
        let spec = &files.manifest.spec;
        let w = read_weights(&files.onnx).unwrap();
        let inputs = calibration_inputs(64);
        let c = calibrate(spec, &w, &inputs).unwrap();
        let int8 = write_int8(spec, &w, &c).unwrap();
        assert!(
            matches!(read_weights(&int8), Err(QuantizeError::NotOurs(_))),
            "not re-quantisable"
        );
        let fp32 = Graph::from_onnx(&files.onnx, 64).unwrap();
        let q = Graph::from_onnx(&int8, 64).unwrap();
        for input in &inputs {
            let (a, b) = (
                fp32.probabilities(input).unwrap(),
                q.probabilities(input).unwrap(),
            );
            assert!((a[0] - b[0]).abs() < 0.05, "int8 {b:?} vs fp32 {a:?}");
        }
    }
}
