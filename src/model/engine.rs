//! The inference engine: tract by default, ONNX Runtime as an option.
//!
//! A model is loaded, given a concrete input shape, optimised, made runnable
//! and warmed exactly once ([`Engine::load`]); an unoptimised tract plan is
//! several times slower, so nothing else builds plans. The engine is shared
//! behind an `Arc`; each inference thread owns its own state (a tract state,
//! or an ONNX Runtime session). Whatever the engine, every output goes
//! through the same check, and every model through the same warm-up and
//! canary.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tract_onnx::prelude::*;

use super::manifest::{golden_input, Manifest, ManifestError, ModelFiles};

/// Which engine runs the models (`engine` in the settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EngineKind {
    /// tract, in-process and pure Rust: the default.
    #[default]
    Tract,
    /// ONNX Runtime, loaded from `libonnxruntime.so` (cargo feature
    /// `onnxruntime`); the engine for int8 models.
    Onnxruntime,
}

impl EngineKind {
    /// The name in settings and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            EngineKind::Tract => "tract",
            EngineKind::Onnxruntime => "onnxruntime",
        }
    }
}

/// An engine name that is neither `tract` nor `onnxruntime`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown engine {0:?} (expected tract or onnxruntime)")]
pub struct UnknownEngine(pub String);

impl std::str::FromStr for EngineKind {
    type Err = UnknownEngine;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tract" => Ok(EngineKind::Tract),
            "onnxruntime" => Ok(EngineKind::Onnxruntime),
            other => Err(UnknownEngine(other.to_string())),
        }
    }
}

/// How models are run: the engine, and where ONNX Runtime lives.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EngineOptions {
    /// The engine.
    pub kind: EngineKind,
    /// `libonnxruntime.so` to load; `None`: `ORT_DYLIB_PATH`, else the
    /// dynamic loader's search path.
    pub onnxruntime_library: Option<PathBuf>,
}

/// Why a model could not be loaded, optimised or run, or failed its checks.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The model directory or manifest is unusable (including a hash mismatch).
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    /// tract could not load, optimise or run the graph.
    #[error("tract: {0}")]
    Tract(String),
    /// The chosen engine is not available, or could not load or run the graph.
    #[error("{0}")]
    Backend(String),
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
            EngineError::Tract(_) | EngineError::Backend(_) => "load",
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

pub(super) type Plan = TypedSimplePlan;
type TractState = TypedSimpleState;

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
    fn new_state(&self) -> Result<TractState, EngineError> {
        Ok(self.plan.spawn()?)
    }

    /// The optimised plan, for profiling.
    pub(super) fn plan(&self) -> &Arc<Plan> {
        &self.plan
    }

    /// Side of the square input.
    pub(super) fn input_size(&self) -> usize {
        self.size
    }

    /// Runs one preprocessed image (`size * size` values) on `state` and
    /// returns the output row, checked to be a probability pair.
    fn run(&self, state: &mut TractState, input: &[f32]) -> Result<[f32; 2], EngineError> {
        let tensor = Tensor::from_shape(&[1, 1, self.size, self.size], input)?;
        let outputs = state.run(tvec![tensor.into_tvalue()])?;
        let view = outputs[0].to_plain_array_view::<f32>()?;
        if view.shape() != [1, 2] {
            return Err(EngineError::BadOutput(format!(
                "shape {:?}, expected [1, 2]",
                view.shape()
            )));
        }
        check_pair(view[[0, 0]], view[[0, 1]])
    }

    /// Both class probabilities for one preprocessed image, on a fresh state:
    /// for checks and canaries, not for the hot path.
    pub fn probabilities(&self, input: &[f32]) -> Result<[f32; 2], EngineError> {
        let mut state = self.new_state()?;
        self.run(&mut state, input)
    }
}

/// Checks that an output row is a probability pair: finite, in [0, 1],
/// summing to 1. Every engine's output goes through it.
pub(super) fn check_pair(p: f32, q: f32) -> Result<[f32; 2], EngineError> {
    if !p.is_finite() || !q.is_finite() || !(0.0..=1.0).contains(&p) || (p + q - 1.0).abs() > 1e-3 {
        return Err(EngineError::BadOutput(format!(
            "not a probability pair: [{p}, {q}]"
        )));
    }
    Ok([p, q])
}

/// What runs a model.
enum Backend {
    Tract(Graph),
    #[cfg(feature = "onnxruntime")]
    Ort(super::onnxruntime::OrtModel),
}

/// One inference thread's own state of an engine.
pub(super) enum State {
    Tract(TractState),
    #[cfg(feature = "onnxruntime")]
    Ort(ort::session::Session),
}

/// A loaded, optimised and warmed model with its manifest.
pub struct Engine {
    manifest: Manifest,
    backend: Backend,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("version", &self.manifest.version)
            .field("engine", &self.kind().as_str())
            .finish()
    }
}

impl Engine {
    /// Loads `model.onnx` and `model.json` from `dir` into tract. A model
    /// whose sha256 does not match its manifest is refused.
    pub fn load(dir: &Path) -> Result<Engine, EngineError> {
        Engine::load_with(dir, &EngineOptions::default())
    }

    /// Like [`Engine::load`], on the engine `options` choose.
    pub fn load_with(dir: &Path, options: &EngineOptions) -> Result<Engine, EngineError> {
        let files = ModelFiles::read_dir(dir)?;
        Engine::from_files_with(files, options)
    }

    /// Builds a tract engine from verified model files.
    pub fn from_files(files: ModelFiles) -> Result<Engine, EngineError> {
        Engine::from_files_with(files, &EngineOptions::default())
    }

    /// Builds an engine from verified model files, loaded, optimised and
    /// warmed.
    pub fn from_files_with(
        files: ModelFiles,
        options: &EngineOptions,
    ) -> Result<Engine, EngineError> {
        let size = files.manifest.input.size;
        let backend = match options.kind {
            EngineKind::Tract => Backend::Tract(Graph::from_onnx(&files.onnx, size)?),
            #[cfg(feature = "onnxruntime")]
            EngineKind::Onnxruntime => {
                let (model, _first) = super::onnxruntime::OrtModel::new(
                    &files.onnx,
                    size,
                    options.onnxruntime_library.as_ref(),
                )?;
                Backend::Ort(model)
            }
            #[cfg(not(feature = "onnxruntime"))]
            EngineKind::Onnxruntime => {
                return Err(EngineError::Backend(
                    "engine \"onnxruntime\" is not in this build (cargo feature onnxruntime)"
                        .into(),
                ))
            }
        };
        let engine = Engine {
            manifest: files.manifest,
            backend,
        };
        // Warm-up: the first run allocates scratch buffers and pages in the
        // weights; doing it here keeps that cost off the first patient's scan
        // and proves the graph runs before anyone reports ready.
        let side = engine.input_size() as usize;
        engine.probabilities(&vec![0.5f32; side * side])?;
        Ok(engine)
    }

    /// The engine running this model.
    pub fn kind(&self) -> EngineKind {
        match self.backend {
            Backend::Tract(_) => EngineKind::Tract,
            #[cfg(feature = "onnxruntime")]
            Backend::Ort(_) => EngineKind::Onnxruntime,
        }
    }

    /// Both class probabilities for one preprocessed image, on a fresh
    /// state: for checks and canaries, not for the hot path.
    pub fn probabilities(&self, input: &[f32]) -> Result<[f32; 2], EngineError> {
        self.scorer()?.probabilities(input)
    }

    /// A reusable state for scoring many images on one thread (evaluation,
    /// canaries, calibration checks). An ONNX Runtime state is a session,
    /// so making one per image would cost more than the inference.
    pub fn scorer(&self) -> Result<Scorer<'_>, EngineError> {
        Ok(Scorer {
            engine: self,
            state: self.new_state()?,
        })
    }

    /// Proves the loaded graph computes what its trainer computed: every
    /// golden case in the manifest must give its recorded output within
    /// `tolerance`, and structured inputs must give a finite `[1, 2]`
    /// probability pair. Workers run this before swapping a model in.
    pub fn canary(&self, tolerance: f32) -> Result<(), EngineError> {
        let size = self.input_size();
        let mut scorer = self.scorer()?;
        for seed in CANARY_SEEDS {
            scorer.probabilities(&golden_input(seed, size))?;
        }
        for case in &self.manifest.golden {
            let got = scorer.probabilities(&golden_input(case.input_seed, size))?;
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

    /// The tract plan, when tract runs this model (for profiling).
    pub fn tract_graph(&self) -> Option<&Graph> {
        match &self.backend {
            Backend::Tract(g) => Some(g),
            #[cfg(feature = "onnxruntime")]
            Backend::Ort(_) => None,
        }
    }

    /// A fresh state for one inference thread.
    pub(super) fn new_state(&self) -> Result<State, EngineError> {
        Ok(match &self.backend {
            Backend::Tract(g) => State::Tract(g.new_state()?),
            #[cfg(feature = "onnxruntime")]
            Backend::Ort(m) => State::Ort(m.session()?),
        })
    }

    fn run_pair(&self, state: &mut State, input: &[f32]) -> Result<[f32; 2], EngineError> {
        match (&self.backend, state) {
            (Backend::Tract(g), State::Tract(s)) => g.run(s, input),
            #[cfg(feature = "onnxruntime")]
            (Backend::Ort(m), State::Ort(s)) => m.run(s, input),
            #[cfg(feature = "onnxruntime")]
            _ => Err(EngineError::Backend(
                "a state of another engine was used".into(),
            )),
        }
    }

    /// `p_effusion` for one preprocessed image on a thread's own state.
    pub(super) fn run(&self, state: &mut State, input: &[f32]) -> Result<f32, EngineError> {
        Ok(self.run_pair(state, input)?[0])
    }
}

/// One thread's state over an [`Engine`]: see [`Engine::scorer`].
pub struct Scorer<'a> {
    engine: &'a Engine,
    state: State,
}

impl Scorer<'_> {
    /// Both class probabilities for one preprocessed image.
    pub fn probabilities(&mut self, input: &[f32]) -> Result<[f32; 2], EngineError> {
        self.engine.run_pair(&mut self.state, input)
    }
}
