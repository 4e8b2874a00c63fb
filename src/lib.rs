//! Pleura: chest X-ray effusion triage.
//!
//! This crate is the shared contract between the fleet (`pleura-worker`),
//! the trainer and integrators. Anything two of them must agree on lives here
//! exactly once.
//!
//! # Layout
//!
//! - [`wire`]: the integrator contract: queue and key names, headers, the
//!   versioned [`wire::ScanResult`] and the registry and fleet documents.
//! - [`scan`]: detect, decode (PNG, JPEG, DICOM) and preprocess a scan into
//!   the model's input. The only copy: training and serving both call
//!   [`scan::load_scan`].
//! - [`model`]: the ResNet spec and ONNX writer, the manifest, the tract
//!   [`model::Engine`], the blocking [`model::InferencePool`] and the
//!   in-process [`model::LocalClassifier`], which share one scan path.
//! - [`registry`]: published models: signed artifacts in an object store,
//!   versions, the active version and its history in Redis, the promotion
//!   gate, and [`registry::publish()`].
//! - [`fleet`]: RabbitMQ topology and publishing, model announcements,
//!   write-once results, heartbeats.
//! - [`config`]: [`config::Settings`], from defaults, file and `PLEURA_*` env.
//! - [`telemetry`]: logging set-up and credential redaction.
//! - [`tls`]: TLS to RabbitMQ and Redis (rustls): the CA bundle and client
//!   certificate of each, read from PEM files.
//! - [`time`]: epoch milliseconds and RFC 3339, the one way each is made.
//! - [`training`]: training as a service: requests on the `{ns}.train`
//!   queue, run records, leases and events in Redis, datasets by URL.
//! - [`cli`]: the `pleura` command line. Nothing else in the crate uses it.
//!
//! Lower layers never import higher ones: `wire`, `time`, `tls` and `scan`
//! sit at the bottom; `model` uses `scan`; `registry` and `fleet` use `model`;
//! `config` maps settings onto their types; only `cli` reads everything.

pub mod cli;
pub mod config;
pub mod fleet;
pub mod model;
pub mod registry;
pub mod scan;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod training;
pub mod wire;
