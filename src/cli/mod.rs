//! The `pleura` command line: submit scans, read results, classify in-process,
//! manage the model registry (`models`) and look at the fleet (`fleet`).
//!
//! Exit codes: 0 when every scan is ok, 1 when some scan errored (or got no
//! result in time), 2 for a usage or configuration error.
//!
//! This is the only module that prints. Everything it does goes through the
//! library's own APIs (`registry::publish`, `fleet::ResultStore`, ...), so a
//! program can do anything the CLI does without it.
//!
//! # Layout
//!
//! - `scans`: `submit`, `result`, `classify`.
//! - `models`: `models init | keygen | publish | list | show | activate |
//!   history | verify`.
//! - `fleet`: `fleet status`.
//! - `train`: `train submit | watch | list | show | cancel`.
//! - `bench`: `bench engine`.
//! - `output`: the table and JSON rows, progress bars, exit codes.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::Settings;
use crate::fleet::{Announcer, ResultStore};
use crate::registry::Registry;

mod bench;
mod fleet;
mod models;
mod output;
mod scans;
mod train;

pub use scans::collect_scans;

/// Pleura: chest X-ray effusion triage.
#[derive(Parser, Debug)]
#[command(name = "pleura", version, about)]
pub struct Cli {
    /// Configuration file (TOML); `PLEURA_CONFIG` also works. `PLEURA_*`
    /// environment variables override it.
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Put scans on the queue; with --wait, print their verdicts.
    Submit(scans::SubmitArgs),
    /// Print the stored result of one job.
    Result {
        /// Print the result document as JSON.
        #[arg(long)]
        json: bool,
        /// The job id.
        job_id: String,
    },
    /// Classify scans in this process, with no broker (same pipeline as the fleet).
    Classify {
        /// Model directory (model.onnx + model.json); defaults to `model_dir` from the config.
        #[arg(long)]
        model: Option<PathBuf>,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Files or folders (searched recursively for .png .jpg .jpeg .dcm).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Models: create, sign, publish, list, activate (promote or roll back), verify.
    #[command(subcommand, alias = "model")]
    Models(models::ModelsCommand),
    /// The fleet: workers, their models and health.
    #[command(subcommand)]
    Fleet(fleet::FleetCommand),
    /// Retraining runs on the trainer service: submit, watch, list, show, cancel.
    #[command(subcommand)]
    Train(train::TrainCommand),
    /// Measure this machine: engine-only throughput, per-operation profile.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

/// Runs the CLI; the binary only wires this to `main`.
pub async fn run(cli: Cli) -> ExitCode {
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    let outcome = match cli.command {
        Command::Submit(args) => scans::submit(&settings, args).await,
        Command::Result { json, job_id } => scans::result(&settings, &job_id, json).await,
        Command::Classify { model, json, paths } => tokio::task::block_in_place(|| {
            scans::classify(&settings, model.as_deref(), &paths, json)
        }),
        Command::Models(cmd) => models::run(&settings, cmd).await,
        Command::Fleet(cmd) => fleet::run(&settings, cmd).await,
        Command::Train(cmd) => train::run(&settings, cmd).await,
        Command::Bench(cmd) => tokio::task::block_in_place(|| bench::run(&settings, cmd)),
    };
    match outcome {
        Ok(code) => code,
        Err(CliError::Usage(m)) => usage_error(m),
        Err(CliError::Failed(m)) => {
            eprintln!("pleura: {m}");
            ExitCode::from(1)
        }
    }
}

fn usage_error(m: impl std::fmt::Display) -> ExitCode {
    eprintln!("pleura: {m}");
    ExitCode::from(2)
}

pub(crate) enum CliError {
    /// Bad arguments or configuration: exit 2.
    Usage(String),
    /// The command ran and failed: exit 1.
    Failed(String),
}

pub(crate) fn failed(e: impl std::fmt::Display) -> CliError {
    CliError::Failed(e.to_string())
}

/// A configuration error (a TLS file gone since start-up): exit 2.
pub(crate) fn config_error(e: crate::config::ConfigError) -> CliError {
    CliError::Usage(e.to_string())
}

/// The configured registry (`redis_url`, `namespace`, `registry_url`).
async fn open_registry(settings: &Settings) -> Result<Registry, CliError> {
    Registry::connect_with_tls(
        &settings.redis_url,
        &settings.redis_tls().map_err(config_error)?,
        settings.names(),
        &settings.registry_url,
    )
    .await
    .map_err(failed)
}

/// Announces activations to the configured fleet.
fn announcer(settings: &Settings) -> Result<Announcer, CliError> {
    Ok(Announcer::new(&settings.amqp_url, settings.names())
        .with_tls(settings.amqp_tls().map_err(config_error)?))
}

/// The configured result store.
async fn result_store(settings: &Settings) -> Result<ResultStore, CliError> {
    ResultStore::connect_with_tls(
        &settings.redis_url,
        &settings.redis_tls().map_err(config_error)?,
        settings.names(),
        settings.result_ttl_secs,
        settings.results_stream_maxlen,
    )
    .await
    .map_err(failed)
}
