//! The tract inference engine.
//!
//! A model is loaded, given a concrete input shape, optimised, made runnable
//! and warmed exactly once ([`Engine::load`]); an unoptimised tract plan is
//! several times slower, so nothing else builds plans. The engine is shared
//! behind an `Arc`; each inference thread owns its own tract state.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;

use super::manifest::{golden_input, Manifest, ManifestError, ModelFiles};

/// Why a model could not be loaded, optimised or run, or failed its checks.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model directory or manifest is unusable (including a hash mismatch).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// tract could not load, optimise or run the graph.
    #[error("tract: {0}")]
    Tract(String),
    /// The model ran but its output is not a probability pair.
    #[error("model output invalid: {0}")]
    BadOutput(String),
    /// A golden case did not give its recorded output.
    #[error("canary failed: {0}")]
    Canary(String),
}

impl EngineError {
    /// A stable code for metrics and refusal records.
    pub fn code(&self) -> &'static str {
        match self {
            EngineError::Manifest(ManifestError::HashMismatch { .. }) => "hash_mismatch",
            EngineError::Manifest(_) => "bad_manifest",
            EngineError::Tract(_) => "load",
            EngineError::BadOutput(_) => "bad_output",
            EngineError::Canary(_) => "canary",
        }
    }
}

/// Seeds of the extra canary inputs every model must turn into a valid
/// probability pair, golden cases or not (a uniform warm-up image can hide
/// a graph that only misbehaves on structure).
const CANARY_SEEDS: [u64; 2] = [0x5eed_0001, 0x5eed_0002];

impl From<TractError> for EngineError {
    fn from(e: TractError) -> Self {
        EngineError::Tract(format!("{e:#}"))
    }
}

type Plan = TypedSimplePlan;
pub(super) type State = TypedSimpleState;

/// An optimised, runnable `[1, 1, S, S]` graph, without a manifest.
///
/// [`Engine`] serves through one; the trainer checks a freshly written graph
/// through one before it has a manifest, so parity is measured on exactly
/// the plan the fleet will run.
pub struct Graph {
    plan: Arc<Plan>,
    size: usize,
}

impl Graph {
    /// Loads ONNX bytes, fixes the input to `[1, 1, size, size]`, optimises
    /// and makes the plan runnable.
    pub fn from_onnx(onnx: &[u8], size: u32) -> Result<Graph, EngineError> {
        let size = size as usize;
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])?
            .with_input_fact(0, f32::fact([1, 1, size, size]).into())?
            .into_optimized()?
            .into_runnable()?;
        Ok(Graph { plan, size })
    }

    /// A fresh tract state; each thread keeps its own.
    fn new_state(&self) -> Result<State, EngineError> {
        Ok(self.plan.spawn()?)
    }

    /// Runs one preprocessed image (`size * size` values) on `state` and
    /// returns the output row, checked to be a probability pair.
    fn run(&self, state: &mut State, input: &[f32]) -> Result<[f32; 2], EngineError> {
        let tensor = Tensor::from_shape(&[1, 1, self.size, self.size], input)?;
        let outputs = state.run(tvec![tensor.into_tvalue()])?;
        let view = outputs[0].to_plain_array_view::<f32>()?;
        if view.shape() != [1, 2] {
            return Err(EngineError::BadOutput(format!(
                "shape {:?}, expected [1, 2]",
                view.shape()
            )));
        }
        let (p, q) = (view[[0, 0]], view[[0, 1]]);
        if !p.is_finite()
            || !q.is_finite()
            || !(0.0..=1.0).contains(&p)
            || (p + q - 1.0).abs() > 1e-3
        {
            return Err(EngineError::BadOutput(format!(
                "not a probability pair: [{p}, {q}]"
            )));
        }
        Ok([p, q])
    }

    /// Both class probabilities for one preprocessed image, on a fresh state:
    /// for checks and canaries, not for the hot path.
    pub fn probabilities(&self, input: &[f32]) -> Result<[f32; 2], EngineError> {
        let mut state = self.new_state()?;
        self.run(&mut state, input)
    }
}

/// A loaded, optimised and warmed model with its manifest.
pub struct Engine {
    manifest: Manifest,
    graph: Graph,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.manifest.version)
            .finish()
    }
}

impl Engine {
    /// Loads `model.onnx` and `model.json` from `dir`. A model whose sha256
    /// does not match its manifest is refused.
    pub fn load(dir: &Path) -> Result<Engine, EngineError> {
        let files = ModelFiles::read_dir(dir)?;
        Engine::from_files(files)
    }

    /// Builds an engine from verified model files.
    pub fn from_files(files: ModelFiles) -> Result<Engine, EngineError> {
        let graph = Graph::from_onnx(&files.onnx, files.manifest.input.size)?;
        let engine = Engine {
            manifest: files.manifest,
            graph,
        };
        // Warm-up: the first run allocates scratch buffers and pages in the
        // weights; doing it here keeps that cost off the first patient's scan
        // and proves the graph runs before anyone reports ready.
        let side = engine.input_size() as usize;
        engine.graph.probabilities(&vec![0.5f32; side * side])?;
        Ok(engine)
    }

    /// Proves the loaded graph computes what its trainer computed: every
    /// golden case in the manifest must give its recorded output within
    /// `tolerance`, and structured inputs must give a finite `[1, 2]`
    /// probability pair. Workers run this before swapping a model in.
    pub fn canary(&self, tolerance: f32) -> Result<(), EngineError> {
        let size = self.input_size();
        for seed in CANARY_SEEDS {
            self.graph.probabilities(&golden_input(seed, size))?;
        }
        for case in &self.manifest.golden {
            let got = self
                .graph
                .probabilities(&golden_input(case.input_seed, size))?;
            let close = case.expected.len() == got.len()
                && case
                    .expected
                    .iter()
                    .zip(got)
                    .all(|(e, g)| (e - g).abs() <= tolerance);
            if !close {
                return Err(EngineError::Canary(format!(
                    "golden case {:?} gave {got:?}, expected {:?} (tolerance {tolerance})",
                    case.name, case.expected
                )));
            }
        }
        Ok(())
    }

    /// The model's manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The model's version.
    pub fn version(&self) -> &str {
        &self.manifest.version
    }

    /// Side of the square input image.
    pub fn input_size(&self) -> u32 {
        self.manifest.input.size
    }

    /// The runnable graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    pub(super) fn new_state(&self) -> Result<State, EngineError> {
        self.graph.new_state()
    }

    /// `p_effusion` for one preprocessed image on a thread's own state.
    pub(super) fn run(&self, state: &mut State, input: &[f32]) -> Result<f32, EngineError> {
        Ok(self.graph.run(state, input)?[0])
    }
}
