//! `pleura submit`, `pleura result` and `pleura classify`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;

use super::output::{exit_for, print_rows, progress, Row};
use super::{failed, result_store, CliError};
use crate::config::Settings;
use crate::fleet::{broker, Publisher, Submission};
use crate::model::{AnalyseError, Engine, LocalClassifier};
use crate::wire::Priority;

/// `pleura submit` arguments.
#[derive(Args, Debug)]
pub struct SubmitArgs {
    /// Urgency of these scans: stat or routine.
    #[arg(long, default_value = "routine")]
    pub priority: Priority,
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

pub(super) async fn submit(settings: &Settings, args: SubmitArgs) -> Result<ExitCode, CliError> {
    let priority = args.priority;
    let files = collect_scans(&args.paths).map_err(|e| CliError::Usage(e.to_string()))?;
    if files.is_empty() {
        return Err(CliError::Usage(
            "no scans found (.png .jpg .jpeg .dcm)".into(),
        ));
    }
    let tls = settings.amqp_tls().map_err(super::config_error)?;
    let conn = broker::connect_with_tls(&settings.amqp_url, "pleura-cli", &tls)
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
    let bar = progress(ids.len(), "completed");
    let results = store
        .wait_all(&ids, Duration::from_secs(args.timeout), |_| bar.inc(1))
        .await
        .map_err(failed)?;
    bar.finish_and_clear();
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

pub(super) async fn result(
    settings: &Settings,
    job_id: &str,
    json: bool,
) -> Result<ExitCode, CliError> {
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

pub(super) fn classify(
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
    let engine = Engine::load_with(&dir, &settings.engine_options())
        .map_err(|e| failed(format!("model {}: {e}", dir.display())))?;
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
                ms: Some(ms),
                ..Row::classified(file, &v.classification)
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
