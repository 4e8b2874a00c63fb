//! What `/readyz`, `/metrics` and the heartbeat report: readiness and the
//! worker's counters.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use lapin::Channel;
use pleura::model::{empty_slot, ModelSlot};
use pleura::wire::{JobTotals, ReloadFailure};

use crate::events::{self, Outcome};

/// Counters the heartbeat reports.
#[derive(Default)]
pub(crate) struct Stats {
    ok: AtomicU64,
    error: AtomicU64,
    retried: AtomicU64,
    in_flight: AtomicU64,
    reloads: AtomicU64,
    last_refusal: Mutex<Option<ReloadFailure>>,
}

impl Stats {
    /// A delivery arrived.
    pub(crate) fn begin(&self) {
        events::in_flight(1.0);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A delivery is settled (whatever the outcome).
    pub(crate) fn end(&self) {
        events::in_flight(-1.0);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Counts and reports a settled delivery.
    pub(crate) fn finished(
        &self,
        job_id: Option<&str>,
        outcome: Outcome,
        model_version: Option<&str>,
        total: Duration,
        stages: &events::Stages,
    ) {
        let counter = match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Error | Outcome::Poison => &self.error,
            Outcome::Retry => &self.retried,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        events::job_finished(job_id, outcome, model_version, total, stages);
    }

    /// A new model is being served.
    pub(crate) fn reloaded(&self) {
        self.reloads.fetch_add(1, Ordering::Relaxed);
    }

    /// A model version was refused.
    pub(crate) fn refused(&self, failure: ReloadFailure) {
        *self.last_refusal.lock().expect("not poisoned") = Some(failure);
    }

    pub(crate) fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub(crate) fn totals(&self) -> JobTotals {
        JobTotals {
            ok: self.ok.load(Ordering::Relaxed),
            error: self.error.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
        }
    }

    pub(crate) fn reloads(&self) -> u64 {
        self.reloads.load(Ordering::Relaxed)
    }

    pub(crate) fn last_refusal(&self) -> Option<ReloadFailure> {
        self.last_refusal.lock().expect("not poisoned").clone()
    }
}

/// The worker's state as probes see it.
pub(crate) struct Health {
    /// The consuming channel, once intake has opened it.
    channel: OnceLock<Channel>,
    /// The model being served.
    model: ModelSlot,
    /// Whether Redis takes result writes, as the job tasks last found it
    /// (set once intake starts).
    results: OnceLock<tokio::sync::watch::Receiver<bool>>,
    stopping: AtomicBool,
    /// Serving a local `model_dir` instead of following the registry.
    pinned: bool,
    started_at: String,
    pub(crate) stats: Stats,
}

impl Health {
    /// A worker that has just started: no broker, no model.
    pub(crate) fn new(pinned: bool) -> Health {
        Health {
            channel: OnceLock::new(),
            model: empty_slot(),
            results: OnceLock::new(),
            stopping: AtomicBool::new(false),
            pinned,
            started_at: pleura::time::now_rfc3339(),
            stats: Stats::default(),
        }
    }

    /// The slot the pool serves from and the reloader swaps.
    pub(crate) fn model(&self) -> &ModelSlot {
        &self.model
    }

    /// Remembers the consuming channel, whose state says whether the broker
    /// is connected.
    pub(crate) fn set_channel(&self, channel: Channel) {
        let _ = self.channel.set(channel);
    }

    /// Follows whether Redis takes result writes.
    pub(crate) fn watch_results(&self, writable: tokio::sync::watch::Receiver<bool>) {
        let _ = self.results.set(writable);
    }

    /// Whether the last result write succeeded (true before the first). A
    /// worker whose results cannot be written takes no jobs, so it is not
    /// ready, though it stays alive: Redis coming back is enough to resume.
    pub(crate) fn results_writable(&self) -> bool {
        self.results.get().is_none_or(|w| *w.borrow())
    }

    pub(crate) fn broker_connected(&self) -> bool {
        self.channel.get().is_some_and(|c| c.status().connected())
    }

    pub(crate) fn model_version(&self) -> Option<String> {
        self.model.load().as_ref().map(|e| e.version().to_string())
    }

    pub(crate) fn has_model(&self) -> bool {
        self.model.load().is_some()
    }

    pub(crate) fn pinned(&self) -> bool {
        self.pinned
    }

    pub(crate) fn started_at(&self) -> &str {
        &self.started_at
    }

    /// From now on the worker takes no new jobs.
    pub(crate) fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// Taking jobs: connected, a model loaded, not shutting down.
    pub(crate) fn ready(&self) -> bool {
        self.broker_connected() && self.has_model() && !self.stopping()
    }
}
