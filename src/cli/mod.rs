//! The `pleura` command line: submit scans, read results, classify in-process,
//! manage the model registry (`models`) and look at the fleet (`fleet`).
//!
//! Exit codes: 0 when every scan is ok, 1 when some scan errored (or got no
//! result in time), 2 for a usage or configuration error.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

use crate::broker::{Publisher, Submission};
use crate::config::Settings;
use crate::engine::{AnalyseError, Engine, LocalClassifier};
use crate::results::ResultStore;
use crate::wire::{Priority, ScanResult};

mod fleet;
mod models;

pub use models::{activate_model, publish_model, PublishRequest};

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
    Submit(SubmitArgs),
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
}

/// `pleura submit` arguments.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Urgency of these scans.
    #[arg(long, default_value = "routine", value_parser = ["stat", "routine"])]
    pub priority: String,
    /// Wait for the results and print them.
    #[arg(long)]
    pub wait: bool,
    /// Seconds to wait for all results with --wait.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Files or folders (searched recursively for .png .jpg .jpeg .dcm).
    #[arg(required = true)]
    pub paths: Vec<PathBuf>,
}

/// Runs the CLI; the binary only wires this to `main`.
pub async fn run(cli: Cli) -> ExitCode {
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => return usage_error(e),
    };
    let outcome = match cli.command {
        Command::Submit(args) => submit(&settings, args).await,
        Command::Result { json, job_id } => result(&settings, &job_id, json).await,
        Command::Classify { model, json, paths } => {
            tokio::task::block_in_place(|| classify(&settings, model.as_deref(), &paths, json))
        }
        Command::Models(cmd) => models::run(&settings, cmd).await,
        Command::Fleet(cmd) => fleet::run(&settings, cmd).await,
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

/// Expands files and folders into the scan files they hold, sorted so runs
/// are reproducible. Folders are searched recursively by extension; a file
/// named explicitly is taken whatever its name (the format comes from its
/// bytes anyway).
pub fn collect_scans(paths: &[PathBuf]) -> std::io::Result<Vec<PathBuf>> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.is_dir() {
                walk(&path, out)?;
            } else if path.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                matches!(
                    e.to_ascii_lowercase().as_str(),
                    "png" | "jpg" | "jpeg" | "dcm"
                )
            }) {
                out.push(path);
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found)?;
            found.sort();
            out.extend(found);
        } else if p.exists() {
            out.push(p.clone());
        } else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist", p.display()),
            ));
        }
    }
    Ok(out)
}

fn progress(len: usize, what: &'static str) -> ProgressBar {
    // A bar is noise for a handful of files and garbage in a pipe or a log.
    if len < 8 || !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>9} [{bar:30}] {pos}/{len} {per_sec} {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(what);
    bar
}

/// One row of output: a file and what became of it.
#[derive(Debug, Default, Serialize)]
struct Row {
    file: String,
    job_id: String,
    status: String,
    label: Option<String>,
    p_effusion: Option<f32>,
    threshold: Option<f32>,
    model_version: Option<String>,
    ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl Row {
    fn is_ok(&self) -> bool {
        self.status == "ok"
    }

    fn from_result(file: String, r: &ScanResult) -> Row {
        Row {
            file,
            job_id: r.job_id.clone(),
            status: if r.is_ok() {
                "ok".into()
            } else {
                "error".into()
            },
            label: r.label.map(|l| l.as_str().to_string()),
            p_effusion: r.p_effusion,
            threshold: r.threshold,
            model_version: r.model_version.clone(),
            ms: Some(r.timings_ms.total),
            error: r
                .error
                .as_ref()
                .map(|e| format!("{}: {}", e.code, e.message)),
        }
    }
}

fn print_rows(rows: &[Row], json: bool) {
    let mut out = std::io::stdout().lock();
    if json {
        for r in rows {
            let _ = writeln!(out, "{}", serde_json::to_string(r).expect("rows serialise"));
        }
        return;
    }
    let fw = rows
        .iter()
        .map(|r| r.file.len())
        .max()
        .unwrap_or(4)
        .clamp(4, 60);
    let _ = writeln!(
        out,
        "{:<fw$}  {:<36}  {:<10}  {:>10}  {:<24}  {:>8}",
        "file", "job id", "label", "p_effusion", "model", "ms"
    );
    for r in rows {
        let file = if r.file.len() > fw {
            format!("…{}", &r.file[r.file.len() - fw + 1..])
        } else {
            r.file.clone()
        };
        let label = match (&r.label, &r.error) {
            (Some(l), _) => l.clone(),
            (None, Some(e)) => format!("ERROR {}", e.split(':').next().unwrap_or("")),
            (None, None) => r.status.clone(),
        };
        let p = r
            .p_effusion
            .map(|p| format!("{p:.4}"))
            .unwrap_or_else(|| "-".into());
        let ms =
            r.ms.map(|m| format!("{m:.1}"))
                .unwrap_or_else(|| "-".into());
        let model = r.model_version.clone().unwrap_or_else(|| "-".into());
        let _ = writeln!(
            out,
            "{file:<fw$}  {:<36}  {label:<10}  {p:>10}  {model:<24}  {ms:>8}",
            r.job_id
        );
    }
    let ok = rows.iter().filter(|r| r.is_ok()).count();
    let _ = writeln!(out, "{ok} ok, {} failed", rows.len() - ok);
}

fn exit_for(rows: &[Row]) -> ExitCode {
    if rows.iter().all(Row::is_ok) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

async fn submit(settings: &Settings, args: SubmitArgs) -> Result<ExitCode, CliError> {
    let priority: Priority = args.priority.parse().map_err(CliError::Usage)?;
    let files = collect_scans(&args.paths).map_err(|e| CliError::Usage(e.to_string()))?;
    if files.is_empty() {
        return Err(CliError::Usage(
            "no scans found (.png .jpg .jpeg .dcm)".into(),
        ));
    }
    let conn = crate::broker::connect(&settings.amqp_url, "pleura-cli")
        .await
        .map_err(failed)?;
    let publisher = Publisher::new(&conn, settings.names(), settings.delivery_limit)
        .await
        .map_err(failed)?;

    let bar = progress(files.len(), "submitted");
    let mut jobs = Vec::with_capacity(files.len());
    for file in &files {
        let body = std::fs::read(file).map_err(|e| failed(format!("{}: {e}", file.display())))?;
        let job_id = uuid::Uuid::new_v4().to_string();
        publisher
            .submit(&Submission {
                job_id: &job_id,
                body: &body,
                priority,
                correlation: &[],
            })
            .await
            .map_err(failed)?;
        jobs.push((file.display().to_string(), job_id));
        bar.inc(1);
    }
    bar.finish_and_clear();
    let _ = conn.close(200, "done".into()).await;

    if !args.wait {
        let rows: Vec<Row> = jobs
            .into_iter()
            .map(|(file, job_id)| Row {
                file,
                job_id,
                status: "submitted".into(),
                ..Row::default()
            })
            .collect();
        print_rows(&rows, args.json);
        return Ok(ExitCode::SUCCESS);
    }

    let store = result_store(settings).await?;
    let ids: Vec<String> = jobs.iter().map(|(_, id)| id.clone()).collect();
    let results = wait_for_results(&store, &ids, Duration::from_secs(args.timeout))
        .await
        .map_err(failed)?;
    let rows: Vec<Row> = jobs
        .into_iter()
        .zip(results)
        .map(|((file, job_id), r)| match r {
            Some(r) => Row::from_result(file, &r),
            None => Row {
                file,
                job_id,
                status: "timeout".into(),
                error: Some(format!("timeout: no result within {}s", args.timeout)),
                ..Row::default()
            },
        })
        .collect();
    print_rows(&rows, args.json);
    Ok(exit_for(&rows))
}

/// Polls Redis until every job has a result or `timeout` passes. Returns the
/// results in the order of `ids`, `None` for the ones that never came.
pub async fn wait_for_results(
    store: &ResultStore,
    ids: &[String],
    timeout: Duration,
) -> Result<Vec<Option<ScanResult>>, crate::results::ResultsError> {
    let deadline = Instant::now() + timeout;
    let mut results: Vec<Option<ScanResult>> = vec![None; ids.len()];
    let bar = progress(ids.len(), "completed");
    loop {
        let pending: Vec<usize> = (0..ids.len()).filter(|&i| results[i].is_none()).collect();
        if pending.is_empty() || Instant::now() >= deadline {
            break;
        }
        // MGET in chunks keeps each round trip small for big submissions.
        for chunk in pending.chunks(500) {
            let keys: Vec<String> = chunk.iter().map(|&i| ids[i].clone()).collect();
            match store.get_many(&keys).await {
                Ok(got) => {
                    for (&i, r) in chunk.iter().zip(got) {
                        if r.is_some() {
                            bar.inc(1);
                        }
                        results[i] = r;
                    }
                }
                // Redis may blink (restart, failover); the connection manager
                // reconnects, so keep polling until the deadline.
                Err(e) if Instant::now() < deadline => {
                    tracing::warn!(error = %e, "reading results failed; retrying")
                }
                Err(e) => return Err(e),
            }
        }
        if results.iter().any(Option::is_none) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    bar.finish_and_clear();
    Ok(results)
}

async fn result_store(settings: &Settings) -> Result<ResultStore, CliError> {
    ResultStore::connect(
        &settings.redis_url,
        settings.names(),
        settings.result_ttl_secs,
        settings.results_stream_maxlen,
    )
    .await
    .map_err(failed)
}

async fn result(settings: &Settings, job_id: &str, json: bool) -> Result<ExitCode, CliError> {
    let store = result_store(settings).await?;
    match store.get(job_id).await.map_err(failed)? {
        None => Err(CliError::Failed(format!(
            "no result for job {job_id} (not finished, unknown, or expired)"
        ))),
        Some(r) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).expect("results serialise")
                );
            } else {
                print_rows(&[Row::from_result("-".into(), &r)], false);
            }
            Ok(if r.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn classify(
    settings: &Settings,
    model: Option<&Path>,
    paths: &[PathBuf],
    json: bool,
) -> Result<ExitCode, CliError> {
    let dir = model
        .map(Path::to_path_buf)
        .or_else(|| settings.model_dir.clone())
        .ok_or_else(|| CliError::Usage("no model: pass --model DIR or set model_dir".into()))?;
    let files = collect_scans(paths).map_err(|e| CliError::Usage(e.to_string()))?;
    if files.is_empty() {
        return Err(CliError::Usage(
            "no scans found (.png .jpg .jpeg .dcm)".into(),
        ));
    }
    let engine = Engine::load(&dir).map_err(|e| failed(format!("model {}: {e}", dir.display())))?;
    let mut classifier = LocalClassifier::new(Arc::new(engine), settings.limits());
    let bar = progress(files.len(), "classified");
    let mut rows = Vec::with_capacity(files.len());
    for file in files {
        let t0 = Instant::now();
        let outcome = std::fs::read(&file)
            .map_err(|e| format!("io: {e}"))
            .and_then(|bytes| classifier.classify(&bytes).map_err(|e| describe(&e)));
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let file = file.display().to_string();
        rows.push(match outcome {
            Ok(v) => Row {
                file,
                job_id: "-".into(),
                status: "ok".into(),
                label: Some(v.label.as_str().into()),
                p_effusion: Some(v.p_effusion),
                threshold: Some(v.threshold),
                model_version: Some(v.model_version),
                ms: Some(ms),
                error: None,
            },
            Err(e) => Row {
                file,
                job_id: "-".into(),
                status: "error".into(),
                model_version: Some(classifier.engine().version().into()),
                ms: Some(ms),
                error: Some(e),
                ..Row::default()
            },
        });
        bar.inc(1);
    }
    bar.finish_and_clear();
    print_rows(&rows, json);
    Ok(exit_for(&rows))
}

fn describe(e: &AnalyseError) -> String {
    match e {
        AnalyseError::Scan(s) => format!("{}: {s}", s.code()),
        other => format!("model_error: {other}"),
    }
}
