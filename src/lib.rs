//! Pleura: chest X-ray effusion triage.
//!
//! This crate is the shared contract between the fleet (`pleura-worker`),
//! the trainer and integrators. Anything two of them must agree on lives here
//! exactly once.
//!
//! # Layout
//!
//! - [`wire`]: the integrator contract: queue and key names, headers, the
//!   versioned [`wire::ScanResult`].
//! - [`preprocess`]: detect, decode (PNG, JPEG, DICOM) and preprocess a scan into the
//!   model's input. The only copy: training and serving both call it.
//! - [`engine`]: tract inference, the blocking [`engine::InferencePool`] and the
//!   in-process [`engine::LocalClassifier`], which share one scan path.
//! - [`onnx`]: [`onnx::ResNetSpec`] and the ONNX graph writer, with tch-compatible
//!   weight names.
//! - [`manifest`]: `model.json`, the manifest that travels beside every `model.onnx`,
//!   and the deterministic untrained model.
//! - [`registry`]: published models: artifacts in an object store (`file://`,
//!   `s3://`), versions, the active version and its history in Redis, the
//!   promotion gate.
//! - [`signing`]: ed25519 keys and model signatures, and the [`signing::Trust`]
//!   workers verify with.
//! - [`fleet`]: worker heartbeats, read back for `pleura fleet status`.
//! - [`broker`]: RabbitMQ connection, topology, confirmed publishing and
//!   model announcements.
//! - [`results`]: write-once results in Redis.
//! - [`config`]: [`config::Settings`], from defaults, file and `PLEURA_*` env.
//! - [`telemetry`]: logging set-up and credential redaction.
//! - [`phantom`]: synthetic CXR-like phantoms for demos and tests.
//! - [`cli`]: the `pleura` command line.

pub mod broker;
pub mod cli;
pub mod config;
pub mod engine;
pub mod fleet;
pub mod manifest;
pub mod onnx;
pub mod phantom;
pub mod preprocess;
pub mod registry;
pub mod results;
pub mod signing;
pub mod telemetry;
pub mod wire;
