//! `pleura fleet ...`: the operator's view of the workers.

use std::io::Write;
use std::process::ExitCode;

use clap::Subcommand;

use super::{failed, CliError};
use crate::config::Settings;
use crate::fleet::WorkerStatus;

/// `pleura fleet ...`
#[derive(Subcommand, Debug)]
pub enum FleetCommand {
    /// Workers, their model versions, health and totals, and the active version.
    Status {
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
        /// Exit 1 when no worker is ready (for probes and `helm test`).
        #[arg(long)]
        require_ready: bool,
    },
    /// Delete the whole namespace: its queues (with any scans still in
    /// them), exchanges, results, registry state and heartbeats. For
    /// decommissioning a fleet and for benchmark and test namespaces.
    Teardown {
        /// Required: the namespace to delete, typed out again.
        #[arg(long)]
        confirm: String,
    },
}

pub(super) async fn run(settings: &Settings, cmd: FleetCommand) -> Result<ExitCode, CliError> {
    let (json, require_ready) = match cmd {
        FleetCommand::Status {
            json,
            require_ready,
        } => (json, require_ready),
        FleetCommand::Teardown { confirm } => return teardown(settings, &confirm).await,
    };
    let client = settings
        .redis_tls()
        .map_err(super::config_error)?
        .redis_client(&settings.redis_url)
        .map_err(failed)?;
    let mut redis = redis::aio::ConnectionManager::new(client)
        .await
        .map_err(failed)?;
    let names = settings.names();
    let workers = crate::fleet::heartbeat::status(&mut redis, &names)
        .await
        .map_err(failed)?;
    let active: Option<String> = redis::AsyncCommands::get(&mut redis, names.active_model_key())
        .await
        .map_err(failed)?;
    let mut out = std::io::stdout().lock();
    if json {
        for w in &workers {
            let _ = writeln!(
                out,
                "{}",
                serde_json::to_string(w).expect("status serialises")
            );
        }
        return readiness(&workers, require_ready);
    }
    let _ = writeln!(out, "active model: {}", active.as_deref().unwrap_or("none"));
    let ww = workers
        .iter()
        .map(|w| w.worker.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let _ = writeln!(
        out,
        "{:<ww$}  {:<8}  {:<28}  {:>8}  {:>9}  {:>7}  {:>7}  {:>7}  {:>9}",
        "worker", "state", "model", "source", "in-flight", "ok", "errors", "reloads", "last seen"
    );
    for w in &workers {
        let (state, model, source, in_flight, ok, errors, reloads) = match &w.heartbeat {
            Some(h) => (
                state(w, active.as_deref()),
                h.model_version.clone().unwrap_or_else(|| "-".into()),
                h.model_source.clone(),
                h.in_flight.to_string(),
                h.totals.ok.to_string(),
                h.totals.error.to_string(),
                h.reloads.to_string(),
            ),
            None => (
                "gone",
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ),
        };
        let _ = writeln!(
            out,
            "{:<ww$}  {state:<8}  {model:<28}  {source:>8}  {in_flight:>9}  {ok:>7}  {errors:>7}  {reloads:>7}  {:>8.1}s",
            w.worker,
            w.last_seen_ms_ago as f64 / 1e3
        );
        if let Some(r) = w.heartbeat.as_ref().and_then(|h| h.last_refusal.as_ref()) {
            let _ = writeln!(
                out,
                "{:<ww$}  refused {} ({}) at {}",
                "", r.version, r.code, r.at
            );
        }
    }
    if workers.is_empty() {
        let _ = writeln!(out, "(no workers have reported)");
    }
    readiness(&workers, require_ready)
}

/// With `--require-ready`, fails unless some worker takes jobs.
async fn teardown(settings: &Settings, confirm: &str) -> Result<ExitCode, CliError> {
    let names = settings.names();
    if confirm != names.namespace() {
        return Err(CliError::Usage(format!(
            "--confirm {confirm:?} does not name this namespace ({:?}); nothing was deleted",
            names.namespace()
        )));
    }
    crate::fleet::teardown::delete_namespace_with_tls(
        &settings.amqp_url,
        &settings.amqp_tls().map_err(super::config_error)?,
        &settings.redis_url,
        &settings.redis_tls().map_err(super::config_error)?,
        &names,
    )
    .await
    .map_err(failed)?;
    eprintln!("deleted namespace {}", names.namespace());
    Ok(ExitCode::SUCCESS)
}

fn readiness(workers: &[WorkerStatus], require_ready: bool) -> Result<ExitCode, CliError> {
    let ready = workers
        .iter()
        .filter(|w| w.heartbeat.as_ref().is_some_and(|h| h.ready))
        .count();
    if require_ready && ready == 0 {
        return Err(CliError::Failed(format!(
            "no worker is ready ({} reported)",
            workers.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}

/// `ready`, `waiting` (no model yet), `stale` (serving something other than
/// the active version, e.g. because it refused it), or `pinned`.
fn state(w: &WorkerStatus, active: Option<&str>) -> &'static str {
    let Some(h) = &w.heartbeat else {
        return "gone";
    };
    if !h.ready {
        return "waiting";
    }
    if h.model_source == "pinned" {
        return "pinned";
    }
    if active.is_some() && h.model_version.as_deref() != active {
        return "stale";
    }
    "ready"
}
