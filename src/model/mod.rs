//! Models: what a model is, and running it.
//!
//! A model is a directory of two files: `model.onnx`, written by this crate's
//! own graph writer from a [`ResNetSpec`], and `model.json`, its
//! [`Manifest`]. The fleet runs it with tract: an [`Engine`] is loaded,
//! optimised and warmed once, then shared; the [`InferencePool`] runs it on
//! OS threads with one tract state each, off the async executor.
//!
//! # Layout
//!
//! - `onnx`: [`ResNetSpec`] (one network, and the graph around it: members
//!   of an ensemble, test-time flip, temperature), tch-compatible parameter
//!   names, [`write_onnx`], deterministic [`init_weights`]; `onnx/tests.rs`
//!   its tests.
//! - `manifest`: [`Manifest`] (`model.json`, with the optional
//!   [`CalibrationRecord`]), [`ModelFiles`] (read with the sha256 check,
//!   written atomically), [`init_model`], [`golden_input`].
//! - `engine`: [`Engine`] (a model on tract or ONNX Runtime, with its
//!   manifest, warm-up and canary), [`Graph`] (tract's optimised plan),
//!   [`EngineKind`], [`EngineError`].
//! - `onnxruntime` (cargo feature): the ONNX Runtime backend.
//! - `analyse`: the scan path for one scan ([`Verdict`], [`AnalyseError`]),
//!   and [`LocalClassifier`], the in-process mode behind `pleura classify`.
//! - `pool`: [`InferencePool`] and the [`ModelSlot`] it serves from.
//! - `quantize`: int8 QDQ variants: batch norm folded, calibrated on scans.
//! - `bench`: engine-only throughput and the per-operation profile
//!   (`pleura bench engine`, `make bench`).

mod analyse;
pub mod bench;
mod engine;
pub mod manifest;
pub mod onnx;
#[cfg(feature = "onnxruntime")]
mod onnxruntime;
mod pool;
pub mod quantize;

pub use analyse::{AnalyseError, LocalClassifier, Verdict};
pub use engine::{Engine, EngineError, EngineKind, EngineOptions, Graph, Scorer};
pub use manifest::{
    golden_input, init_model, CalibrationMethod, CalibrationRecord, Derivation, Manifest,
    ManifestError, ModelFiles, Precision,
};
pub use onnx::{init_weights, write_onnx, OnnxError, ResNetSpec, Weights};
pub use pool::{empty_slot, InferencePool, ModelSlot};
