//! The scan path for one scan: decode, preprocess, infer.
//!
//! [`analyse_on`] is the whole path. The fleet's pool and the in-process
//! [`LocalClassifier`] (`pleura classify`) both run exactly it, which is why
//! they agree to the last digit.

use std::sync::Arc;
use std::time::Instant;

use super::engine::{Engine, EngineError, State};
use crate::scan::{self, Limits, ScanError};
use crate::wire::{Classification, Label};

/// A verdict on one scan, with where the time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// The answer, as results carry it.
    pub classification: Classification,
    /// Decode time, milliseconds.
    pub decode_ms: f64,
    /// Preprocess (resize, normalise) time, milliseconds.
    pub preprocess_ms: f64,
    /// Inference time, milliseconds.
    pub infer_ms: f64,
}

/// Why a scan got no verdict.
#[derive(Debug, thiserror::Error)]
pub enum AnalyseError {
    /// The scan itself is unusable. Permanent: retrying cannot help.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// No model is loaded yet. Transient.
    #[error("no model loaded")]
    NoModel,
    /// The model failed on this input. Treated as transient: the broker's
    /// delivery limit dead-letters a scan that keeps failing.
    #[error(transparent)]
    Model(#[from] EngineError),
    /// The pool has shut down.
    #[error("inference pool stopped")]
    PoolClosed,
}

/// One inference thread's tract state, rebuilt when the shared model changes.
pub(super) struct ThreadState {
    pub(super) engine: Arc<Engine>,
    state: State,
}

/// Decodes, preprocesses and classifies one scan with a per-thread state.
///
/// This is the whole scan path; the worker's pool and `pleura classify` both
/// run exactly this, which is why they agree to the last digit.
pub(super) fn analyse_on(
    slot: &mut Option<ThreadState>,
    engine: &Arc<Engine>,
    bytes: &[u8],
    limits: &Limits,
) -> Result<Verdict, AnalyseError> {
    let (input, times) = scan::load_scan_timed(bytes, limits, engine.input_size())?;

    if slot
        .as_ref()
        .is_none_or(|w| !Arc::ptr_eq(&w.engine, engine))
    {
        *slot = Some(ThreadState {
            engine: engine.clone(),
            state: engine.new_state()?,
        });
    }
    let w = slot.as_mut().expect("state just set");
    let t1 = Instant::now();
    let p = engine.run(&mut w.state, &input)?;
    let infer_ms = t1.elapsed().as_secs_f64() * 1e3;
    let threshold = engine.manifest().threshold;
    Ok(Verdict {
        classification: Classification {
            label: Label::from_probability(p, threshold),
            p_effusion: p,
            threshold,
            model_version: engine.version().to_string(),
        },
        decode_ms: times.decode_ms,
        preprocess_ms: times.preprocess_ms,
        infer_ms,
    })
}

/// Classifies scans in-process with no broker: the embedded mode behind
/// `pleura classify`, running the very same [`analyse_on`] as the fleet.
pub struct LocalClassifier {
    engine: Arc<Engine>,
    slot: Option<ThreadState>,
    limits: Limits,
}

impl LocalClassifier {
    /// Wraps a loaded engine.
    pub fn new(engine: Arc<Engine>, limits: Limits) -> LocalClassifier {
        LocalClassifier {
            engine,
            slot: None,
            limits,
        }
    }

    /// Classifies one scan.
    pub fn classify(&mut self, bytes: &[u8]) -> Result<Verdict, AnalyseError> {
        analyse_on(&mut self.slot, &self.engine, bytes, &self.limits)
    }

    /// The engine in use.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }
}
