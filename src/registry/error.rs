//! [`RegistryError`]: why a registry operation failed, and whether trying
//! again may help.

use crate::model::ManifestError;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// `registry_url` is not a `file://` or `s3://` URL this build can open.
    #[error("registry url {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The artifact store failed (network, permissions, disk). Transient.
    #[error("artifact store: {0}")]
    Store(#[from] object_store::Error),
    /// Redis failed. Transient.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No such version in the registry.
    #[error("version {0} is not published")]
    NotFound(String),
    /// The version exists already; versions are immutable.
    #[error("version {version} is already published{}", if *.same { " with these exact files (use `pleura models activate` to make it active)" } else { " with different files; versions are immutable, pick a new one" })]
    VersionExists { version: String, same: bool },
    /// The promotion gate refused the candidate.
    #[error("promotion gate failed: {}; fix the model, or pass --force with --reason", .0.join("; "))]
    GateFailed(Vec<String>),
    /// Files in the store or registry state do not parse.
    #[error("corrupt registry data: {0}")]
    Corrupt(String),
    /// The model directory to publish is unusable.
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

impl RegistryError {
    /// Whether trying again later may succeed (the store or Redis was down),
    /// as opposed to a verdict about the model or the request.
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Store(object_store::Error::NotFound { .. }) => false,
            RegistryError::Store(_) | RegistryError::Redis(_) => true,
            _ => false,
        }
    }
}
