//! The tract inference engine and the blocking pool that runs it.
//!
//! A model is loaded, given a concrete input shape, optimised, made runnable
//! and warmed exactly once ([`Engine::load`]); an unoptimised tract plan is
//! several times slower, so nothing else builds plans. The engine is shared
//! behind an `Arc`; each inference thread owns its own tract state.
//!
//! Decoding and inference are CPU-bound, so they never run on the async
//! executor: [`InferencePool`] is a fixed set of OS threads fed through
//! channels, and async callers await a oneshot reply. STAT work has its own
//! channel that every thread checks first.

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use arc_swap::ArcSwapOption;
use crossbeam_channel::{select_biased, Receiver, Sender};
use tract_onnx::prelude::*;

use crate::manifest::{Manifest, ManifestError, ModelFiles};
use crate::preprocess::{self, Limits, ScanError};
use crate::wire::{Label, Priority};

/// Errors loading or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
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

impl ModelError {
    /// A stable code for metrics and refusal records.
    pub fn code(&self) -> &'static str {
        match self {
            ModelError::Manifest(ManifestError::HashMismatch { .. }) => "hash_mismatch",
            ModelError::Manifest(_) => "bad_manifest",
            ModelError::Tract(_) => "load",
            ModelError::BadOutput(_) => "bad_output",
            ModelError::Canary(_) => "canary",
        }
    }
}

/// Seeds of the extra canary inputs every model must turn into a valid
/// probability pair, golden cases or not (a uniform warm-up image can hide
/// a graph that only misbehaves on structure).
const CANARY_SEEDS: [u64; 2] = [0x5eed_0001, 0x5eed_0002];

impl From<TractError> for ModelError {
    fn from(e: TractError) -> Self {
        ModelError::Tract(format!("{e:#}"))
    }
}

type Plan = TypedSimplePlan;
type State = TypedSimpleState;

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
    pub fn from_onnx(onnx: &[u8], size: u32) -> Result<Graph, ModelError> {
        let size = size as usize;
        let plan = tract_onnx::onnx()
            .model_for_read(&mut &onnx[..])?
            .with_input_fact(0, f32::fact([1, 1, size, size]).into())?
            .into_optimized()?
            .into_runnable()?;
        Ok(Graph { plan, size })
    }

    /// A fresh tract state; each thread keeps its own.
    fn new_state(&self) -> Result<State, ModelError> {
        Ok(self.plan.spawn()?)
    }

    /// Runs one preprocessed image (`size * size` values) on `state` and
    /// returns the output row, checked to be a probability pair.
    fn run(&self, state: &mut State, input: &[f32]) -> Result<[f32; 2], ModelError> {
        let tensor = Tensor::from_shape(&[1, 1, self.size, self.size], input)?;
        let outputs = state.run(tvec![tensor.into_tvalue()])?;
        let view = outputs[0].to_plain_array_view::<f32>()?;
        if view.shape() != [1, 2] {
            return Err(ModelError::BadOutput(format!(
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
            return Err(ModelError::BadOutput(format!(
                "not a probability pair: [{p}, {q}]"
            )));
        }
        Ok([p, q])
    }

    /// Both class probabilities for one preprocessed image, on a fresh state:
    /// for checks and canaries, not for the hot path.
    pub fn probabilities(&self, input: &[f32]) -> Result<[f32; 2], ModelError> {
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
    pub fn load(dir: &Path) -> Result<Engine, ModelError> {
        let files = ModelFiles::read_dir(dir)?;
        Engine::from_files(files)
    }

    /// Builds an engine from verified model files.
    pub fn from_files(files: ModelFiles) -> Result<Engine, ModelError> {
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
    pub fn canary(&self, tolerance: f32) -> Result<(), ModelError> {
        let size = self.input_size();
        for seed in CANARY_SEEDS {
            self.graph
                .probabilities(&crate::manifest::golden_input(seed, size))?;
        }
        for case in &self.manifest.golden {
            let got = self
                .graph
                .probabilities(&crate::manifest::golden_input(case.input_seed, size))?;
            let close = case.expected.len() == got.len()
                && case
                    .expected
                    .iter()
                    .zip(got)
                    .all(|(e, g)| (e - g).abs() <= tolerance);
            if !close {
                return Err(ModelError::Canary(format!(
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

    fn new_state(&self) -> Result<State, ModelError> {
        self.graph.new_state()
    }

    /// `p_effusion` for one preprocessed image on a thread's own state.
    fn run(&self, state: &mut State, input: &[f32]) -> Result<f32, ModelError> {
        Ok(self.graph.run(state, input)?[0])
    }
}

/// A verdict on one scan, with where the time went.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    /// Probability of effusion.
    pub p_effusion: f32,
    /// `p_effusion` against the model's threshold.
    pub label: Label,
    /// The model's decision threshold.
    pub threshold: f32,
    /// Version of the model that produced the verdict.
    pub model_version: String,
    /// Decode and preprocess time, milliseconds.
    pub decode_ms: f64,
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
    Model(#[from] ModelError),
    /// The pool has shut down.
    #[error("inference pool stopped")]
    PoolClosed,
}

/// One inference thread's state, rebuilt when the shared model changes.
struct Worker {
    engine: Arc<Engine>,
    state: State,
}

/// Decodes, preprocesses and classifies one scan with a per-thread state.
///
/// This is the whole scan path; the worker's pool and `pleura classify` both
/// run exactly this, which is why they agree to the last digit.
fn analyse_on(
    slot: &mut Option<Worker>,
    engine: &Arc<Engine>,
    bytes: &[u8],
    limits: &Limits,
) -> Result<Verdict, AnalyseError> {
    let t0 = Instant::now();
    let input = preprocess::load_scan(bytes, limits, engine.input_size())?;
    let decode_ms = t0.elapsed().as_secs_f64() * 1e3;

    if slot
        .as_ref()
        .is_none_or(|w| !Arc::ptr_eq(&w.engine, engine))
    {
        *slot = Some(Worker {
            engine: engine.clone(),
            state: engine.new_state()?,
        });
    }
    let w = slot.as_mut().expect("state just set");
    let t1 = Instant::now();
    let p = engine.run(&mut w.state, &input)?;
    let infer_ms = t1.elapsed().as_secs_f64() * 1e3;
    let threshold = engine.manifest.threshold;
    Ok(Verdict {
        p_effusion: p,
        label: Label::from_probability(p, threshold),
        threshold,
        model_version: engine.version().to_string(),
        decode_ms,
        infer_ms,
    })
}

/// The model currently served. Readers take a snapshot per job, so a job
/// finishes on the model it started with even if the slot changes meanwhile.
pub type ModelSlot = Arc<ArcSwapOption<Engine>>;

/// Creates an empty model slot.
pub fn empty_slot() -> ModelSlot {
    Arc::new(ArcSwapOption::empty())
}

struct Task {
    bytes: Vec<u8>,
    reply: tokio::sync::oneshot::Sender<Result<Verdict, AnalyseError>>,
}

/// Asks one inference thread to drop its state if it belongs to a model
/// that is no longer in the slot, and to say when it has.
struct Retire {
    done: tokio::sync::oneshot::Sender<()>,
}

/// A fixed pool of inference threads, each with its own tract state.
pub struct InferencePool {
    stat: Option<Sender<Task>>,
    routine: Option<Sender<Task>>,
    /// One per thread: a broadcast needs every thread to get its own copy.
    controls: Vec<Sender<Retire>>,
    threads: Vec<JoinHandle<()>>,
    model: ModelSlot,
}

impl InferencePool {
    /// Starts `threads` inference threads serving whatever model is in `model`.
    pub fn new(model: ModelSlot, threads: usize, limits: Limits) -> InferencePool {
        let (stat_tx, stat_rx) = crossbeam_channel::unbounded::<Task>();
        let (routine_tx, routine_rx) = crossbeam_channel::unbounded::<Task>();
        let mut controls = Vec::new();
        let threads = (0..threads.max(1))
            .map(|i| {
                let (stat_rx, routine_rx, model) =
                    (stat_rx.clone(), routine_rx.clone(), model.clone());
                let (control_tx, control_rx) = crossbeam_channel::unbounded::<Retire>();
                controls.push(control_tx);
                std::thread::Builder::new()
                    .name(format!("pleura-infer-{i}"))
                    .spawn(move || inference_thread(stat_rx, routine_rx, control_rx, model, limits))
                    .expect("spawn inference thread")
            })
            .collect();
        InferencePool {
            stat: Some(stat_tx),
            routine: Some(routine_tx),
            controls,
            threads,
            model,
        }
    }

    /// Makes every thread drop a state built for a model that is no longer
    /// in the slot, and resolves once all have (each finishes its current
    /// job first). Without this an idle thread would keep a swapped-out
    /// model alive until its next job: after a reload, memory would hold two
    /// or three models instead of one.
    pub async fn retire_stale(&self) {
        let mut waits = Vec::new();
        for control in &self.controls {
            let (done, wait) = tokio::sync::oneshot::channel();
            if control.send(Retire { done }).is_ok() {
                waits.push(wait);
            }
        }
        for wait in waits {
            let _ = wait.await;
        }
    }

    /// The slot this pool serves from.
    pub fn model(&self) -> &ModelSlot {
        &self.model
    }

    /// Number of inference threads.
    pub fn size(&self) -> usize {
        self.threads.len()
    }

    /// Classifies a scan on the pool. STAT scans jump every routine one that
    /// is still waiting for a thread.
    pub async fn analyse(
        &self,
        bytes: Vec<u8>,
        priority: Priority,
    ) -> Result<Verdict, AnalyseError> {
        let (reply, rx) = tokio::sync::oneshot::channel();
        let lane = match priority {
            Priority::Stat => &self.stat,
            Priority::Routine => &self.routine,
        };
        lane.as_ref()
            .ok_or(AnalyseError::PoolClosed)?
            .send(Task { bytes, reply })
            .map_err(|_| AnalyseError::PoolClosed)?;
        rx.await.map_err(|_| AnalyseError::PoolClosed)?
    }
}

impl Drop for InferencePool {
    fn drop(&mut self) {
        // Closing the senders ends each thread's loop once queued work is done.
        // The control channels stay open until the threads are joined: a
        // disconnected one would always be ready and spin the select.
        self.stat.take();
        self.routine.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn inference_thread(
    stat: Receiver<Task>,
    routine: Receiver<Task>,
    control: Receiver<Retire>,
    model: ModelSlot,
    limits: Limits,
) {
    let mut slot: Option<Worker> = None;
    loop {
        // STAT first whenever both lanes have work.
        let task = match stat.try_recv() {
            Ok(t) => t,
            Err(_) => select_biased! {
                recv(control) -> r => {
                    if let Ok(Retire { done }) = r {
                        let current = model.load();
                        let stale = slot.as_ref().is_some_and(|w| {
                            current.as_ref().is_none_or(|c| !Arc::ptr_eq(&w.engine, c))
                        });
                        if stale {
                            slot = None;
                        }
                        let _ = done.send(());
                    }
                    continue;
                },
                recv(stat) -> t => match t { Ok(t) => t, Err(_) => match routine.recv() { Ok(t) => t, Err(_) => return } },
                recv(routine) -> t => match t { Ok(t) => t, Err(_) => match stat.recv() { Ok(t) => t, Err(_) => return } },
            },
        };
        if task.reply.is_closed() {
            continue; // the caller gave up (shutdown); don't burn CPU on it
        }
        let result = match model.load_full() {
            Some(engine) => analyse_on(&mut slot, &engine, &task.bytes, &limits),
            None => Err(AnalyseError::NoModel),
        };
        let _ = task.reply.send(result);
    }
}

/// Classifies scans in-process with no broker: the embedded mode behind
/// `pleura classify`, running the very same [`analyse_on`] as the fleet.
pub struct LocalClassifier {
    engine: Arc<Engine>,
    slot: Option<Worker>,
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
