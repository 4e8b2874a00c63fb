//! `pleura bench engine`: what this machine does with a model, inference
//! alone, and where the time goes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::Subcommand;

use super::scans::collect_scans;
use super::{failed, CliError};
use crate::config::Settings;
use crate::model::{bench, golden_input, Engine, EngineKind};
use crate::scan::load_scan;

/// `pleura bench ...`
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Engine-only throughput with T threads (one state each, as workers run
    /// it), and with --profile the time per operation on one thread.
    Engine {
        /// Model directory; defaults to `model_dir` from the config.
        #[arg(long)]
        model: Option<PathBuf>,
        /// Engine: tract or onnxruntime; defaults to `engine` from the config.
        #[arg(long)]
        engine: Option<EngineKind>,
        /// Inference threads; 0 means one per core.
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// Images to run.
        #[arg(long, default_value_t = 200)]
        images: usize,
        /// Also profile one thread per operation (tract).
        #[arg(long)]
        profile: bool,
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
        /// Scans to use as inputs (preprocessed first); default: synthetic inputs.
        paths: Vec<PathBuf>,
    },
}

pub(super) fn run(settings: &Settings, cmd: BenchCommand) -> Result<ExitCode, CliError> {
    let BenchCommand::Engine {
        model,
        engine,
        threads,
        images,
        profile,
        json,
        paths,
    } = cmd;
    let dir = model
        .or_else(|| settings.model_dir.clone())
        .ok_or_else(|| CliError::Usage("no model: pass --model DIR or set model_dir".into()))?;
    let mut options = settings.engine_options();
    if let Some(kind) = engine {
        options.kind = kind;
    }
    let engine = Arc::new(
        Engine::load_with(&dir, &options)
            .map_err(|e| failed(format!("model {}: {e}", dir.display())))?,
    );
    let size = engine.input_size();
    let inputs = inputs(&paths, settings, size)?;
    let threads = if threads == 0 {
        settings.resolved_inference_threads()
    } else {
        threads
    };
    let throughput = bench::throughput(&engine, &inputs, threads, images).map_err(failed)?;
    let ops = match (profile, engine.tract_graph()) {
        (false, _) => None,
        (true, Some(graph)) => Some(
            bench::profile(graph, &inputs[0], (images / threads).clamp(5, 50)).map_err(failed)?,
        ),
        (true, None) => {
            return Err(CliError::Usage(
                "--profile profiles tract's plan: use --engine tract".into(),
            ))
        }
    };
    let mut out = std::io::stdout().lock();
    if json {
        let doc = serde_json::json!({
            "model_version": engine.version(),
            "engine": engine.kind().as_str(),
            "input_size": size,
            "throughput": throughput,
            "profile": ops,
        });
        let _ = writeln!(out, "{doc}");
        return Ok(ExitCode::SUCCESS);
    }
    let _ = writeln!(
        out,
        "{} on {}: {:.1} images/s with {} threads ({} images, p50 {:.1} ms, p99 {:.1} ms per image)",
        engine.version(),
        engine.kind().as_str(),
        throughput.images_per_second,
        throughput.threads,
        throughput.images,
        throughput.p50_ms,
        throughput.p99_ms
    );
    if let Some(ops) = ops {
        let _ = writeln!(
            out,
            "{:<24} {:>5} {:>10} {:>6}",
            "operation", "nodes", "ms/image", "share"
        );
        for o in ops {
            let _ = writeln!(
                out,
                "{:<24} {:>5} {:>10.2} {:>5.1}%",
                o.op,
                o.nodes,
                o.ms_per_image,
                o.share * 100.0
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Preprocessed scans, or the synthetic golden inputs when none are given.
fn inputs(paths: &[PathBuf], settings: &Settings, size: u32) -> Result<Vec<Vec<f32>>, CliError> {
    if paths.is_empty() {
        return Ok((1..=8).map(|seed| golden_input(seed, size)).collect());
    }
    let files = collect_scans(paths).map_err(|e| CliError::Usage(e.to_string()))?;
    let read = |f: &Path| -> Result<Vec<f32>, String> {
        let bytes = std::fs::read(f).map_err(|e| e.to_string())?;
        load_scan(&bytes, &settings.limits(), size).map_err(|e| e.to_string())
    };
    let inputs: Vec<Vec<f32>> = files.iter().take(64).filter_map(|f| read(f).ok()).collect();
    if inputs.is_empty() {
        return Err(CliError::Usage("none of the scans could be read".into()));
    }
    Ok(inputs)
}
