//! The worker's errors: [`WorkerError`], why a worker stopped, and
//! [`ReloadError`], why a model version is not being served.

use pleura::fleet::{BrokerError, ResultsError};
use pleura::model::EngineError;
use pleura::registry::{RegistryError, VerifyError};

/// Why a worker stopped with an error. A clean shutdown is `Ok`.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The settings cannot work (for example, no model and no trusted key).
    #[error("configuration: {0}")]
    Config(String),
    /// The pinned model could not be loaded.
    #[error("model: {0}")]
    Model(#[from] EngineError),
    /// The broker failed beyond what connection recovery could repair.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The broker cancelled the worker's consumer (its queue was deleted).
    #[error("the broker cancelled our consumer (queue deleted?)")]
    ConsumerCancelled,
    /// Redis could not be set up.
    #[error(transparent)]
    Results(#[from] ResultsError),
    /// The HTTP listener could not be bound.
    #[error("http listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a candidate version is not being served.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// Fetching failed for a reason that may pass. Retried next tick.
    #[error(transparent)]
    Fetch(RegistryError),
    /// The files are not trustworthy (hash, signature, manifest).
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// The model does not load, or fails its canary.
    #[error(transparent)]
    Model(#[from] EngineError),
}

impl ReloadError {
    /// Stable code for metrics and refusal records.
    pub fn code(&self) -> &'static str {
        match self {
            ReloadError::Fetch(_) => "fetch_failed",
            ReloadError::Verify(e) => e.code(),
            ReloadError::Model(e) => e.code(),
        }
    }
}
