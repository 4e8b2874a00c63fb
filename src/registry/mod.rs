//! The model registry: immutable, signed artifacts in an object store, and
//! the registry's state in Redis.
//!
//! Versions are immutable: publishing a version that exists fails, and an
//! artifact already in the store with other bytes is never overwritten.
//! Workers fetch with [`Registry::fetch`] and check with [`Artifact::verify`]
//! (manifest, hash and signature) before they load anything; `pleura models
//! verify` runs the very same check.
//!
//! # Layout
//!
//! - `publish`: [`publish()`] and [`activate()`], the whole sequences that the
//!   CLI and the trainer call, with [`PublishError`].
//! - `state`: [`Registry`]: entries, the index, the active version, the
//!   history and refusals in Redis; the publish and activate scripts.
//! - `gate`: [`GatePolicy`] and [`gate()`], the promotion rules.
//! - `artifact`: [`Artifact`] (the files as they travel) and its
//!   [`Artifact::verify`]; [`VerifyError`].
//! - `store`: [`ArtifactStore`] on `object_store` (`file://`, `s3://`).
//! - `signing`: ed25519 keys, `model.sig`, and the [`Trust`] workers verify
//!   with.
//! - `error`: [`RegistryError`].

mod artifact;
mod error;
mod gate;
mod publish;
pub mod signing;
mod state;
mod store;

pub use artifact::{Artifact, Verified, VerifyError};
pub use error::RegistryError;
pub use gate::{gate, manifest_auroc, manifest_fingerprint, manifest_recall, GatePolicy};
pub use publish::{activate, publish, Promotion, Publication, PublishError, PublishRequest};
pub use signing::{SignatureError, Trust};
pub use state::{who, PublishOptions, Published, Registry, HISTORY_LEN};
pub use store::{open_url, ArtifactStore};
