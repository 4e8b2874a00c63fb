//! The onnxruntime engine option (`engine = "onnxruntime"`, cargo feature
//! `onnxruntime`).
//!
//! ONNX Runtime is loaded at run time from `libonnxruntime.so` (the PyPI
//! wheel's, installed by `make onnxruntime`; the worker image carries it),
//! once per process. Each inference thread gets its own session with one
//! intra-op thread and no spinning, the same shape as tract's one state per
//! thread: parallelism comes from the pool's threads, not from inside a run.

use std::path::PathBuf;
use std::sync::OnceLock;

use ort::environment::Environment;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::TensorRef;

use super::engine::{check_pair, EngineError};

/// The library loaded when no path is configured: the dynamic loader finds it.
pub const DEFAULT_LIBRARY: &str = "libonnxruntime.so";

fn environment(library: Option<&PathBuf>) -> Result<&'static Environment, EngineError> {
    static ENV: OnceLock<Result<Environment, String>> = OnceLock::new();
    ENV.get_or_init(|| {
        let path = library
            .cloned()
            .or_else(|| std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_LIBRARY));
        ort::init_from(&path)
            .map_err(|e| format!("cannot load {}: {e}", path.display()))?
            .with_name("pleura")
            .build()
            .map_err(|e| format!("cannot start an environment: {e}"))
    })
    .as_ref()
    .map_err(|e| EngineError::Backend(format!("onnxruntime: {e}")))
}

/// A model for ONNX Runtime: its bytes, from which each thread builds its
/// own session.
pub(super) struct OrtModel {
    onnx: Vec<u8>,
    size: usize,
    env: &'static Environment,
}

impl OrtModel {
    /// Checks the library loads and the model builds (a first session).
    pub(super) fn new(
        onnx: &[u8],
        size: u32,
        library: Option<&PathBuf>,
    ) -> Result<(OrtModel, Session), EngineError> {
        let model = OrtModel {
            onnx: onnx.to_vec(),
            size: size as usize,
            env: environment(library)?,
        };
        let session = model.session()?;
        Ok((model, session))
    }

    /// A session for one thread.
    pub(super) fn session(&self) -> Result<Session, EngineError> {
        let build = || -> ort::Result<Session> {
            Session::builder(self.env)?
                .with_optimization_level(GraphOptimizationLevel::Level3)?
                .with_intra_threads(1)?
                .with_inter_threads(1)?
                .with_intra_op_spinning(false)?
                .commit_from_memory(&self.onnx)
        };
        build().map_err(|e| EngineError::Backend(format!("onnxruntime: {e}")))
    }

    /// Runs one preprocessed image; the output row, checked.
    pub(super) fn run(
        &self,
        session: &mut Session,
        input: &[f32],
    ) -> Result<[f32; 2], EngineError> {
        let err = |e: ort::Error| EngineError::Backend(format!("onnxruntime: {e}"));
        let tensor =
            TensorRef::from_array_view(([1usize, 1, self.size, self.size], input)).map_err(err)?;
        let outputs = session.run(ort::inputs![tensor]).map_err(err)?;
        let (shape, values) = outputs[0].try_extract_tensor::<f32>().map_err(err)?;
        let dims: Vec<i64> = shape.iter().copied().collect();
        if dims != [1, 2] {
            return Err(EngineError::BadOutput(format!(
                "shape {dims:?}, expected [1, 2]"
            )));
        }
        check_pair(values[0], values[1])
    }
}
