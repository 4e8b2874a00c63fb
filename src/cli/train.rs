//! `pleura train submit | watch | list | show | cancel`: retraining runs on
//! the trainer service, for ML engineers.

use std::process::ExitCode;
use std::time::Duration;

use clap::Subcommand;
use indicatif::{ProgressBar, ProgressStyle};

use super::{config_error, failed, CliError};
use crate::config::Settings;
use crate::registry::who;
use crate::time;
use crate::training::{self, CancelOutcome, RunStore, TrainingError};
use crate::wire::{RunEvent, RunEventKind, RunRecord, RunState, TrainFlags, TrainRequest};

/// Training runs.
#[derive(Subcommand, Debug)]
pub enum TrainCommand {
    /// Ask the trainer service for a run; prints its id (--wait follows it).
    Submit(Box<SubmitArgs>),
    /// Follow a run's progress until it ends.
    Watch {
        /// JSON lines (one event each) instead of a progress bar.
        #[arg(long)]
        json: bool,
        /// The run id.
        run_id: String,
    },
    /// The newest runs, a line each.
    List {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Everything known about one run.
    Show {
        /// The record as JSON.
        #[arg(long)]
        json: bool,
        /// The run id.
        run_id: String,
    },
    /// Stop a run: at once if queued, at the next batch if running. No model
    /// is written.
    Cancel {
        /// The run id.
        run_id: String,
    },
}

/// `pleura train submit`.
#[derive(clap::Args, Debug)]
pub struct SubmitArgs {
    /// The dataset: file:///dir (a path the trainers see) or
    /// s3://bucket/prefix, with effusion/ and nofinding/ and optionally
    /// labels.csv.
    #[arg(long)]
    data: String,
    #[command(flatten)]
    flags: TrainFlags,
    /// Publish the model through the promotion gate and activate it. Without
    /// it, the model is uploaded to the registry unactivated.
    #[arg(long)]
    publish: bool,
    /// With --publish: activate even if the gate refuses (needs --reason).
    #[arg(long, requires = "publish", requires = "reason")]
    force: bool,
    /// Why; recorded in the registry's history.
    #[arg(long)]
    reason: Option<String>,
    /// The run id (default: generated).
    #[arg(long)]
    run_id: Option<String>,
    /// Follow the run to its end, as `watch` does.
    #[arg(long)]
    wait: bool,
    /// With --wait: JSON lines instead of a progress bar.
    #[arg(long)]
    json: bool,
}

pub(super) async fn run(settings: &Settings, cmd: TrainCommand) -> Result<ExitCode, CliError> {
    let runs = RunStore::connect(
        &settings.redis_url,
        &settings.redis_tls().map_err(config_error)?,
        settings.names(),
    )
    .await
    .map_err(failed)?;
    match cmd {
        TrainCommand::Submit(args) => submit(settings, &runs, *args).await,
        TrainCommand::Watch { json, run_id } => watch(&runs, &run_id, json).await,
        TrainCommand::List { limit, json } => list(&runs, limit, json).await,
        TrainCommand::Show { json, run_id } => show(&runs, &run_id, json).await,
        TrainCommand::Cancel { run_id } => cancel(&runs, &run_id).await,
    }
}

fn training_error(e: TrainingError) -> CliError {
    match e {
        TrainingError::Invalid(_) | TrainingError::Data { .. } | TrainingError::Exists(_) => {
            CliError::Usage(e.to_string())
        }
        other => failed(other),
    }
}

async fn submit(settings: &Settings, runs: &RunStore, a: SubmitArgs) -> Result<ExitCode, CliError> {
    let request = TrainRequest {
        v: crate::wire::TRAIN_SCHEMA_VERSION,
        run_id: a.run_id.unwrap_or_else(training::new_run_id),
        data: a.data,
        flags: a.flags,
        publish: a.publish,
        force: a.force,
        reason: a.reason,
        submitted_by: who(),
        submitted_at: time::now_rfc3339_seconds(),
    };
    // Checked before connecting to the broker: a typo should not wait on it.
    let problems = training::submit::problems(&request);
    if !problems.is_empty() {
        return Err(training_error(TrainingError::Invalid(problems)));
    }
    let conn = crate::fleet::broker::connect_with_tls(
        &settings.amqp_url,
        "pleura train submit",
        &settings.amqp_tls().map_err(config_error)?,
    )
    .await
    .map_err(failed)?;
    let submitted = training::submit(runs, &conn, request).await;
    let _ = conn.close(200, "done".into()).await;
    let submitted = submitted.map_err(training_error)?;
    let id = submitted.record.run_id().to_string();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"run_id": id, "state": "queued", "data": submitted.data})
        );
    } else {
        eprintln!(
            "queued {id}: {} effusion and {} nofinding images{}",
            submitted.data.effusion,
            submitted.data.nofinding,
            if submitted.data.labels_csv {
                ", labels.csv"
            } else {
                ""
            }
        );
        println!("{id}");
    }
    if a.wait {
        return watch(runs, &id, a.json).await;
    }
    Ok(ExitCode::SUCCESS)
}

/// Follows the event stream until the run's final event, then prints the
/// outcome. Exit 0 only for a run that succeeded and (when publishing was
/// asked) became active.
async fn watch(runs: &RunStore, run_id: &str, json: bool) -> Result<ExitCode, CliError> {
    if runs.get(run_id).await.map_err(failed)?.is_none() {
        return Err(CliError::Usage(format!("no run {run_id}")));
    }
    let bar = (!json).then(|| {
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} batches {msg}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        bar.set_prefix(run_id.to_string());
        bar
    });
    let mut after = "-".to_string();
    loop {
        let events = match runs.events(run_id, &after, 500).await {
            Ok(e) => e,
            Err(e) if e.is_transient() => {
                // Redis comes back; the stream keeps what happened meanwhile.
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            Err(e) => return Err(failed(e)),
        };
        let mut done = false;
        for (id, event) in events {
            after = id;
            if json {
                println!(
                    "{}",
                    serde_json::to_string(&event).expect("events serialise")
                );
            } else if let Some(bar) = &bar {
                show_event(bar, &event);
            }
            done |= event.is_final();
        }
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    let record = runs
        .get(run_id)
        .await
        .map_err(failed)?
        .ok_or_else(|| failed(format!("run {run_id} vanished")))?;
    if !json {
        print_summary(&record);
    }
    Ok(exit_for(&record))
}

fn show_event(bar: &ProgressBar, event: &RunEvent) {
    match &event.kind {
        RunEventKind::Queued { by } => bar.println(format!("queued by {by}")),
        RunEventKind::Started {
            trainer,
            attempt,
            resumed_from_epoch,
        } => bar.println(match resumed_from_epoch {
            Some(e) => format!("attempt {attempt}: {trainer} resumes after epoch {e}"),
            None => format!("attempt {attempt}: {trainer} starts"),
        }),
        RunEventKind::Device { device } => bar.println(format!("device: {device}")),
        RunEventKind::Progress {
            epoch,
            epochs,
            batch,
            batches,
            images_per_second,
        } => {
            bar.set_length(*batches as u64);
            bar.set_position(*batch as u64);
            bar.set_message(format!("epoch {epoch}/{epochs}, {images_per_second:.1} img/s"));
        }
        RunEventKind::Epoch(f) => bar.println(format!(
            "epoch {}/{}: train loss {}, val loss {}, val AUROC {}, recall {}, precision {}, {:.1} img/s, {:.1} s",
            f.epoch,
            f.epochs,
            opt(f.train_loss),
            opt(f.val_loss),
            opt(f.val_auroc),
            opt(f.val_recall),
            opt(f.val_precision),
            f.images_per_second,
            f.seconds
        )),
        RunEventKind::Checkpoint { epoch } => bar.println(format!("checkpoint after epoch {epoch}")),
        RunEventKind::CancelRequested { by } => bar.println(format!("cancel requested by {by}")),
        RunEventKind::Interrupted { trainer, reason } => {
            bar.println(format!("{trainer} let go of the run ({reason}); another trainer resumes it"))
        }
        RunEventKind::Finished { .. } => {}
    }
}

fn opt(x: Option<f64>) -> String {
    x.map(|x| format!("{x:.4}")).unwrap_or_else(|| "n/a".into())
}

fn exit_for(r: &RunRecord) -> ExitCode {
    let ok = r.state == RunState::Succeeded && (!r.request.publish || r.activated == Some(true));
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn print_summary(r: &RunRecord) {
    let id = r.run_id();
    match r.state {
        RunState::Succeeded => {
            let version = r.model_version.as_deref().unwrap_or("?");
            match (r.request.publish, r.activated) {
                (true, Some(true)) => println!("{id} succeeded: {version} is published and active"),
                (true, _) => println!(
                    "{id} succeeded, but the promotion gate refused {version}: {}. It is in the registry, not active",
                    r.gate_refusals.join("; ")
                ),
                (false, _) => println!(
                    "{id} succeeded: {version} is in the registry, not active (`pleura models activate {version} --reason ...`)"
                ),
            }
        }
        RunState::Failed => println!(
            "{id} failed: {}",
            r.error.as_deref().unwrap_or("no reason recorded")
        ),
        RunState::Cancelled => println!(
            "{id} cancelled by {}",
            r.cancel
                .as_ref()
                .map(|c| c.by.as_str())
                .unwrap_or("someone")
        ),
        RunState::Queued | RunState::Running => println!("{id} is {}", r.state),
    }
}

async fn list(runs: &RunStore, limit: usize, json: bool) -> Result<ExitCode, CliError> {
    let records = runs.list(limit).await.map_err(failed)?;
    if json {
        for r in &records {
            println!("{}", serde_json::to_string(r).expect("records serialise"));
        }
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<30} {:<10} {:>9} {:<20} {:<26} TRAINER",
        "RUN", "STATE", "EPOCH", "SUBMITTED", "MODEL"
    );
    for r in &records {
        println!(
            "{:<30} {:<10} {:>9} {:<20} {:<26} {}",
            r.run_id(),
            r.state,
            format!("{}/{}", r.epoch, r.request.flags.epochs),
            r.created_at,
            r.model_version.as_deref().unwrap_or("-"),
            r.trainer.as_deref().unwrap_or("-"),
        );
    }
    Ok(ExitCode::SUCCESS)
}

async fn show(runs: &RunStore, run_id: &str, json: bool) -> Result<ExitCode, CliError> {
    let Some(r) = runs.get(run_id).await.map_err(failed)? else {
        return Err(CliError::Usage(format!("no run {run_id}")));
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&r).expect("records serialise")
        );
        return Ok(ExitCode::SUCCESS);
    }
    let f = &r.request.flags;
    println!("run        {}", r.run_id());
    println!("state      {}", r.state);
    println!("data       {}", r.request.data);
    println!(
        "settings   epochs {} batch {} width {} image {} lr {} wd {} schedule {} weights {} seed {} device {}",
        f.epochs, f.batch_size, f.width, f.image_size, f.lr, f.weight_decay, f.schedule,
        f.class_weights, f.seed, f.device
    );
    println!(
        "publish    {}",
        if r.request.publish {
            "yes"
        } else {
            "no (upload only)"
        }
    );
    println!("submitted  {} by {}", r.created_at, r.request.submitted_by);
    if let Some(t) = &r.started_at {
        println!("started    {t}");
    }
    if let Some(t) = &r.finished_at {
        println!("finished   {t}");
    }
    println!("epoch      {}/{}", r.epoch, f.epochs);
    if let Some(e) = &r.last_epoch {
        println!(
            "last epoch train loss {}, val AUROC {}, recall {}, precision {}",
            opt(e.train_loss),
            opt(e.val_auroc),
            opt(e.val_recall),
            opt(e.val_precision)
        );
    }
    if let Some(d) = &r.device {
        println!("device     {d}");
    }
    if let Some(ips) = r.images_per_second {
        println!("speed      {ips:.1} images/s");
    }
    if let Some(c) = r.checkpoint_epoch {
        println!("checkpoint after epoch {c}");
    }
    for a in &r.attempts {
        println!(
            "attempt {}  {} from {}{}{}",
            a.attempt,
            a.trainer,
            a.started_at,
            a.resumed_from_epoch
                .map(|e| format!(", resumed after epoch {e}"))
                .unwrap_or_default(),
            a.ended
                .as_ref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        );
    }
    if let Some(v) = &r.model_version {
        println!(
            "model      {v}{}",
            match r.activated {
                Some(true) => " (active)",
                Some(false) => " (not active)",
                None => "",
            }
        );
    }
    if !r.gate_refusals.is_empty() {
        println!("gate       refused: {}", r.gate_refusals.join("; "));
    }
    if let Some(e) = &r.error {
        println!("error      {e}");
    }
    if let Some(c) = &r.cancel {
        println!("cancelled  by {} at {}", c.by, c.at);
    }
    Ok(ExitCode::SUCCESS)
}

async fn cancel(runs: &RunStore, run_id: &str) -> Result<ExitCode, CliError> {
    match runs.cancel(run_id, &who()).await {
        Ok(CancelOutcome::Cancelled) => println!("{run_id} cancelled (it had not started)"),
        Ok(CancelOutcome::Requested) => {
            println!("{run_id}: cancel requested; its trainer stops at the next batch")
        }
        Ok(CancelOutcome::AlreadyEnded(state)) => {
            println!("{run_id} had already ended: {state}");
            return Ok(ExitCode::from(1));
        }
        Err(TrainingError::NotFound(_)) => return Err(CliError::Usage(format!("no run {run_id}"))),
        Err(e) => return Err(failed(e)),
    }
    Ok(ExitCode::SUCCESS)
}
