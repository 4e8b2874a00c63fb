//! Training as a service: requests on a queue, runs in Redis, datasets and
//! checkpoints in object stores. The trainer service (`pleura-trainer
//! serve`) and the `pleura train` commands both build on this; neither links
//! anything the other needs (the CLI never links libtorch).
//!
//! # Layout
//!
//! - [`runs`]: [`RunStore`]: run records, leases, cancel requests, events.
//! - [`data`]: datasets by URL: checked at submission, fetched by trainers.
//! - [`submit`]: validating a request and putting it on the queue.
//! - [`checkpoints`]: each run's epoch checkpoints in the runs store.
//!
//! The wire types (request, record, events, flags) are in [`crate::wire`].

pub mod checkpoints;
pub mod data;
pub mod runs;
pub mod submit;

pub use checkpoints::{CheckpointStore, Latest};
pub use runs::{CancelOutcome, Claim, RunStore};
pub use submit::{declare_train_queue, new_run_id, submit, Submitted};

/// Why a training-service operation failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainingError {
    /// The request asks for something impossible (each problem named).
    #[error("invalid training request: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// The dataset cannot be used.
    #[error("dataset {url}: {reason}")]
    Data {
        /// The dataset URL.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// A run with this id exists already.
    #[error("run {0} exists already")]
    Exists(String),
    /// No such run.
    #[error("no run {0}")]
    NotFound(String),
    /// The trainer no longer holds the run: its lease expired and another
    /// trainer may have taken it. It must stop without writing more.
    #[error("lost the lease on run {0}")]
    LeaseLost(String),
    /// Redis failed. Transient.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// RabbitMQ failed or refused the request. Transient.
    #[error(transparent)]
    Broker(#[from] crate::fleet::BrokerError),
    /// The checkpoint store failed.
    #[error("runs store: {0}")]
    Store(String),
    /// Stored run data does not parse.
    #[error("corrupt run data: {0}")]
    Corrupt(String),
}

impl TrainingError {
    /// Whether trying again later may help (a service was down), as opposed
    /// to a verdict about the request.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            TrainingError::Redis(_) | TrainingError::Broker(_) | TrainingError::Store(_)
        )
    }
}
