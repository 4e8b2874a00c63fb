//! The fleet's shared infrastructure: the broker, the result store, model
//! announcements and heartbeats.
//!
//! # Layout
//!
//! - `broker`: RabbitMQ connections (auto-recovering), the scan topology
//!   (STAT and routine quorum queues, dead letters, the delivery limit), and
//!   the confirm-mode [`Publisher`] that submitters use.
//! - `announce`: the `{ns}.models` exchange, each worker's queue on it, and
//!   the [`Announcer`].
//! - `results`: [`ResultStore`], write-once results in Redis.
//! - `heartbeat`: worker heartbeats, written by workers and read back for
//!   `pleura fleet status`.
//! - `teardown`: deleting a namespace's topology and keys (tests,
//!   decommissioning).

pub mod announce;
pub mod broker;
pub mod heartbeat;
pub mod results;
pub mod teardown;

pub use announce::{AnnounceError, Announcer};
pub use broker::{BrokerError, Publisher, Submission, DEFAULT_DELIVERY_LIMIT};
pub use heartbeat::WorkerStatus;
pub use results::{ResultStore, ResultsError, Written};
