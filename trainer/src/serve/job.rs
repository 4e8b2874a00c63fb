//! One run, from its claim to its final state.
//!
//! While the training thread works, three things happen beside it: the
//! lease is renewed (and the cancel request read) every third of the lease,
//! each epoch's checkpoint is uploaded and the record updated, and progress
//! is appended to the run's stream (throttled to one event a second).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pleura::registry::{self, PublishError, PublishRequest, RegistryError};
use pleura::time;
use pleura::training::runs::event;
use pleura::training::TrainingError;
use pleura::wire::{Attempt, RunEventKind, RunRecord, RunState, TrainRequest};
use tokio::sync::mpsc;

use super::control::{Progress, ServiceControl, Stop};
use super::Ctx;
use crate::train::{TrainConfig, TrainError};

/// Progress events at most this often: enough for a live bar, few enough
/// that a fast GPU run does not flood Redis.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Records a request that arrived without a record (published by other
/// means than `pleura train submit`), after the same checks.
pub(super) async fn record_foreign(ctx: &Ctx, request: TrainRequest) -> Result<(), TrainingError> {
    let record = RunRecord::queued(request, time::now_rfc3339_seconds());
    ctx.runs.create(&record).await?;
    let problems = pleura::training::submit::problems(&record.request);
    if !problems.is_empty() {
        // Recorded, then failed at once: the submitter can see why.
        let err = TrainingError::Invalid(problems).to_string();
        let mut failed = record.clone();
        failed.error = Some(err.clone());
        ctx.runs
            .fail_unqueued(
                &failed,
                &finished(
                    &failed.request.run_id,
                    RunState::Failed,
                    None,
                    None,
                    Some(err),
                ),
            )
            .await?;
    }
    Ok(())
}

/// A request body that does not parse: if its message id names a queued
/// run, that run fails with the reason.
pub(super) async fn fail_unreadable(ctx: &Ctx, run_id: &str, why: &str) {
    if let Ok(Some(mut record)) = ctx.runs.get(run_id).await {
        let err = format!("the request on the queue could not be read: {why}");
        record.error = Some(err.clone());
        let _ = ctx
            .runs
            .fail_unqueued(
                &record,
                &finished(run_id, RunState::Failed, None, None, Some(err)),
            )
            .await;
    }
}

fn finished(
    run_id: &str,
    state: RunState,
    model_version: Option<String>,
    activated: Option<bool>,
    error: Option<String>,
) -> pleura::wire::RunEvent {
    event(
        run_id,
        RunEventKind::Finished {
            state,
            model_version,
            activated,
            error,
        },
    )
}

/// Runs a claimed run to a final state, or releases it (shutdown), or
/// drops it (lease lost).
pub(super) async fn execute(ctx: &Ctx, mut record: RunRecord, attempt: u32) {
    let run_id = record.run_id().to_string();
    let span = tracing::info_span!("run", run_id = %run_id, attempt);
    let _enter = span.enter();
    ctx.health.set_run(Some(run_id.clone()));
    let started = Instant::now();
    let outcome = execute_inner(ctx, &mut record, attempt).await;
    ctx.health.set_run(None);
    let label = match &outcome {
        Ok(state) => super::outcome_label(*state),
        Err(_) => "interrupted",
    };
    ::metrics::counter!("pleura_trainer_runs_total", "outcome" => label).increment(1);
    match outcome {
        Ok(state) => tracing::info!(
            state = %state,
            model_version = record.model_version.as_deref().unwrap_or(""),
            seconds = started.elapsed().as_secs_f64(),
            "run ended"
        ),
        Err(why) => tracing::warn!(reason = %why, "run let go without ending"),
    }
    // The local copies are scratch; the checkpoints that matter are in the
    // runs store.
    let _ = std::fs::remove_dir_all(run_dir(ctx, &run_id));
}

fn run_dir(ctx: &Ctx, run_id: &str) -> PathBuf {
    ctx.settings.trainer_work_dir.join("runs").join(run_id)
}

/// `Ok(state)`: the run ended in `state`. `Err(why)`: this trainer let go
/// without ending it (shutdown, lost lease, Redis gone).
async fn execute_inner(
    ctx: &Ctx,
    record: &mut RunRecord,
    attempt: u32,
) -> Result<RunState, String> {
    let run_id = record.run_id().to_string();
    let now = time::now_rfc3339_seconds();
    if let Some(cancel) = record.cancel.clone() {
        // Cancelled between the queue and the claim.
        tracing::info!(by = %cancel.by, "cancelled before it started");
        record.state = RunState::Cancelled;
        return ended(ctx, record, None).await;
    }
    let latest = match ctx.checkpoints.latest(&run_id).await {
        Ok(l) => l,
        Err(e) => return let_go(ctx, record, format!("runs store: {e}")).await,
    };
    let resumed_from = latest.as_ref().map(|l| l.epoch);
    record.started_at.get_or_insert(now.clone());
    record.attempts.push(Attempt {
        attempt,
        trainer: ctx.trainer_id.clone(),
        started_at: now,
        resumed_from_epoch: resumed_from,
        device: None,
        ended: None,
    });
    if attempt > ctx.settings.trainer_max_attempts {
        let last = record
            .attempts
            .iter()
            .rev()
            .nth(1)
            .map(|a| format!(" (the last on {}, after epoch {})", a.trainer, record.epoch))
            .unwrap_or_default();
        record.state = RunState::Failed;
        record.error = Some(format!(
            "gave up after {} attempts: each trainer that took the run stopped without finishing it{last}; \
             a run that kills its trainer (out of memory, say) needs other settings",
            ctx.settings.trainer_max_attempts
        ));
        return ended(ctx, record, Some("failed: too many attempts")).await;
    }
    let started = event(
        &run_id,
        RunEventKind::Started {
            trainer: ctx.trainer_id.clone(),
            attempt,
            resumed_from_epoch: resumed_from,
        },
    );
    ctx.runs
        .update(&ctx.trainer_id, record, Some(&started))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(resumed_from_epoch = resumed_from, "run started");

    // The dataset and the checkpoint to resume from.
    let dir = run_dir(ctx, &run_id);
    let _ = std::fs::remove_dir_all(&dir);
    let data = match pleura::training::data::materialise(
        &record.request.data,
        &ctx.settings.trainer_work_dir,
    )
    .await
    {
        Ok(d) => d,
        Err(e) if e.is_transient() => return let_go(ctx, record, e.to_string()).await,
        Err(e) => return fail(ctx, record, e.to_string()).await,
    };
    let resume = match latest {
        Some(l) => {
            let to = dir.join("resume");
            if let Err(e) = ctx.checkpoints.download(&run_id, &l, &to).await {
                return let_go(ctx, record, format!("checkpoint download: {e}")).await;
            }
            Some(to)
        }
        None => None,
    };

    let (tx, rx) = mpsc::unbounded_channel();
    let control = Arc::new(ServiceControl::new(record.request.flags.epochs, tx));
    let mut cfg = TrainConfig::from_flags(data, dir.join("out"), &record.request.flags);
    cfg.progress = false;
    cfg.run_id = Some(run_id.clone());
    cfg.checkpoint_dir = Some(dir.join("checkpoints"));
    cfg.resume = resume;
    cfg.control = Some(control.clone());
    let device = crate::model::device_from(&cfg.device).map(describe_device);
    let device = match device {
        Ok(d) => d,
        Err(e) => return fail(ctx, record, e.to_string()).await,
    };
    record.device = Some(device.clone());
    if let Some(a) = record.attempts.last_mut() {
        a.device = Some(device.clone());
    }
    let _ = ctx
        .runs
        .update(
            &ctx.trainer_id,
            record,
            Some(&event(&run_id, RunEventKind::Device { device })),
        )
        .await;

    let training = tokio::task::spawn_blocking(move || crate::train::train(&cfg));
    let result = supervise(ctx, record, control.clone(), rx, training).await;
    let stop = control.stop_reason();
    match (result, stop) {
        (_, Some(Stop::LeaseLost)) => Err("lease lost".into()),
        (Err(TrainError::Stopped { .. }), Some(Stop::Shutdown)) | (Ok(_), Some(Stop::Shutdown)) => {
            // Ok with Shutdown: finished training but export/publish was
            // not started; resuming redoes only the last steps.
            let ev = event(
                &run_id,
                RunEventKind::Interrupted {
                    trainer: ctx.trainer_id.clone(),
                    reason: "the trainer is shutting down".into(),
                },
            );
            if let Some(a) = record.attempts.last_mut() {
                a.ended = Some("interrupted: trainer shut down".into());
            }
            ctx.runs
                .release(&ctx.trainer_id, record, &ev)
                .await
                .map_err(|e| e.to_string())?;
            Err("shutdown: released".into())
        }
        (Err(TrainError::Stopped { .. }), Some(Stop::Cancelled(c)))
        | (Ok(_), Some(Stop::Cancelled(c))) => {
            record.state = RunState::Cancelled;
            record.cancel = Some(c);
            ended(ctx, record, Some("cancelled")).await
        }
        (Ok(outcome), None) => finish_success(ctx, record, outcome).await,
        (Err(e), _) => fail(ctx, record, e.to_string()).await,
    }
}

/// The device as people read it: `cpu` or `cuda:0`.
fn describe_device(d: tch::Device) -> String {
    match d {
        tch::Device::Cuda(i) => format!("cuda:{i}"),
        _ => "cpu".into(),
    }
}

/// A service the run needs is down: wait a little (so a short outage does
/// not use up the run's attempts at once), then put the run back for any
/// trainer, this one included.
async fn let_go(ctx: &Ctx, record: &mut RunRecord, why: String) -> Result<RunState, String> {
    tracing::warn!(reason = %why, "letting go of the run for now");
    let pause = Duration::from_millis(ctx.lease_ms() / 3).min(Duration::from_secs(5));
    tokio::select! {
        _ = ctx.shutdown.cancelled() => {}
        _ = tokio::time::sleep(pause) => {}
    }
    if let Some(a) = record.attempts.last_mut() {
        a.ended = Some(format!("interrupted: {why}"));
    }
    let ev = event(
        record.run_id(),
        RunEventKind::Interrupted {
            trainer: ctx.trainer_id.clone(),
            reason: why.clone(),
        },
    );
    // If this fails too, the lease expires and the run is taken all the same.
    let _ = ctx.runs.release(&ctx.trainer_id, record, &ev).await;
    Err(why)
}

/// Waits for the training thread while renewing the lease, watching for a
/// cancel or shutdown, and turning progress into events and uploads.
async fn supervise(
    ctx: &Ctx,
    record: &mut RunRecord,
    control: Arc<ServiceControl>,
    mut rx: mpsc::UnboundedReceiver<Progress>,
    training: tokio::task::JoinHandle<Result<crate::train::TrainOutcome, TrainError>>,
) -> Result<crate::train::TrainOutcome, TrainError> {
    let run_id = record.run_id().to_string();
    let lease = Duration::from_millis(ctx.lease_ms());
    let mut renew = tokio::time::interval(lease / 3);
    renew.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_renewed = Instant::now();
    let mut last_progress = Instant::now() - PROGRESS_EVERY;
    let mut ips_sum = 0.0;
    let mut ips_n = 0usize;
    tokio::pin!(training);
    let mut shutdown_seen = false;
    loop {
        tokio::select! {
            joined = &mut training => {
                // Drain what the thread reported before it ended.
                while let Ok(p) = rx.try_recv() {
                    on_progress(ctx, record, p, &mut last_progress, &mut ips_sum, &mut ips_n).await;
                }
                return joined.unwrap_or_else(|e| Err(TrainError::Config(format!("the training thread panicked: {e}"))));
            }
            Some(p) = rx.recv() => {
                on_progress(ctx, record, p, &mut last_progress, &mut ips_sum, &mut ips_n).await;
            }
            _ = ctx.shutdown.cancelled(), if !shutdown_seen => {
                shutdown_seen = true;
                control.request_stop(Stop::Shutdown);
            }
            _ = renew.tick() => {
                match ctx.runs.renew(&run_id, &ctx.trainer_id, ctx.lease_ms()).await {
                    Ok(Some(cancel)) => {
                        ctx.health.set_redis(true);
                        last_renewed = Instant::now();
                        ::metrics::counter!("pleura_trainer_lease_renewals_total", "result" => "ok").increment(1);
                        if let Some(c) = cancel {
                            control.request_stop(Stop::Cancelled(c));
                        }
                    }
                    Ok(None) => {
                        ::metrics::counter!("pleura_trainer_lease_renewals_total", "result" => "lost").increment(1);
                        tracing::warn!("lease lost: another trainer may hold the run; stopping");
                        control.request_stop(Stop::LeaseLost);
                    }
                    Err(e) => {
                        ctx.health.set_redis(false);
                        ::metrics::counter!("pleura_trainer_lease_renewals_total", "result" => "error").increment(1);
                        tracing::warn!(error = %e, "lease renewal failed");
                        if last_renewed.elapsed() >= lease {
                            // It has expired: someone else may take the run.
                            control.request_stop(Stop::LeaseLost);
                        }
                    }
                }
            }
        }
    }
}

async fn on_progress(
    ctx: &Ctx,
    record: &mut RunRecord,
    p: Progress,
    last_progress: &mut Instant,
    ips_sum: &mut f64,
    ips_n: &mut usize,
) {
    let run_id = record.run_id().to_string();
    match p {
        Progress::Batch(b) => {
            if last_progress.elapsed() < PROGRESS_EVERY && b.batch < b.batches {
                return;
            }
            *last_progress = Instant::now();
            let _ = ctx
                .runs
                .append(&event(
                    &run_id,
                    RunEventKind::Progress {
                        epoch: b.epoch,
                        epochs: b.epochs,
                        batch: b.batch,
                        batches: b.batches,
                        images_per_second: b.images_per_second,
                    },
                ))
                .await;
        }
        Progress::Epoch(figures, checkpoint) => {
            ::metrics::counter!("pleura_trainer_epochs_total").increment(1);
            ::metrics::histogram!("pleura_trainer_epoch_seconds").record(figures.seconds);
            ::metrics::gauge!("pleura_trainer_images_per_second").set(figures.images_per_second);
            *ips_sum += figures.images_per_second;
            *ips_n += 1;
            record.epoch = figures.epoch;
            record.images_per_second = Some(*ips_sum / *ips_n as f64);
            record.last_epoch = Some(figures.clone());
            let _ = ctx
                .runs
                .update(
                    &ctx.trainer_id,
                    record,
                    Some(&event(&run_id, RunEventKind::Epoch(figures.clone()))),
                )
                .await;
            if let Some(dir) = checkpoint {
                match ctx.checkpoints.upload(&run_id, figures.epoch, &dir).await {
                    Ok(()) => {
                        record.checkpoint_epoch = Some(figures.epoch);
                        let _ = ctx
                            .runs
                            .update(
                                &ctx.trainer_id,
                                record,
                                Some(&event(
                                    &run_id,
                                    RunEventKind::Checkpoint {
                                        epoch: figures.epoch,
                                    },
                                )),
                            )
                            .await;
                    }
                    // The next epoch's checkpoint tries again; a resume
                    // meanwhile starts from the older one.
                    Err(e) => {
                        tracing::warn!(epoch = figures.epoch, error = %e, "checkpoint upload failed")
                    }
                }
            }
        }
    }
}

/// Publishes (or uploads) the model and ends the run as succeeded.
async fn finish_success(
    ctx: &Ctx,
    record: &mut RunRecord,
    outcome: crate::train::TrainOutcome,
) -> Result<RunState, String> {
    let Some(exported) = outcome.exported else {
        return fail(ctx, record, "training exported no model".into()).await;
    };
    let run_id = record.run_id().to_string();
    let v = &outcome.report.validation;
    record.validation = Some(serde_json::json!({
        "n": v.n,
        "n_positive": v.n_positive,
        "auroc": v.auroc,
        "pr_auc": v.pr_auc,
        "threshold": exported.manifest.threshold,
        "recall": v.at_chosen.map(|s| s.recall),
        "precision": v.at_chosen.map(|s| s.precision),
        "best_epoch": outcome.report.best_epoch,
    }));
    let request = &record.request;
    let by = format!("{} (run {run_id})", request.submitted_by);
    let reason = request
        .reason
        .clone()
        .unwrap_or_else(|| format!("training run {run_id}"));
    let publish = |activate: bool, force: bool, reason: String| PublishRequest {
        dir: exported.dir.clone(),
        key_file: ctx.settings.signing_key_file.clone(),
        force,
        reason: Some(reason),
        activate,
        by: by.clone(),
    };
    let policy = ctx.settings.gate_policy();
    let first = publish(request.publish, request.force, reason.clone());
    let published = match registry::publish(&ctx.registry, &ctx.announcer, &policy, &first).await {
        Ok(p) => Ok(p),
        Err(PublishError::Registry(RegistryError::GateFailed(failures))) => {
            // Refused: kept in the registry for inspection, never active.
            record.gate_refusals = failures.clone();
            let why = format!(
                "run {run_id}: the promotion gate refused it ({}); uploaded for inspection, not activated",
                failures.join("; ")
            );
            registry::publish(
                &ctx.registry,
                &ctx.announcer,
                &policy,
                &publish(false, true, why),
            )
            .await
        }
        Err(e) => Err(e),
    };
    match published {
        Ok(p) => {
            record.model_version = Some(p.published.entry.version.clone());
            record.model_url = Some(p.published.entry.artifact_url.clone());
            record.activated = Some(p.published.activation.is_some());
            for w in p.warnings() {
                tracing::warn!(warning = %w, "publish");
            }
            record.state = RunState::Succeeded;
            let label = if record.activated == Some(true) {
                "succeeded: published and active"
            } else {
                "succeeded: uploaded, not active"
            };
            ended(ctx, record, Some(label)).await
        }
        Err(e) if e.is_transient() => {
            // The registry was down: the run is finished again from its last
            // checkpoint by whoever claims it next.
            let_go(ctx, record, format!("publishing failed for now: {e}")).await
        }
        Err(e) => {
            fail(
                ctx,
                record,
                format!("the model was trained but not published: {e}"),
            )
            .await
        }
    }
}

async fn fail(ctx: &Ctx, record: &mut RunRecord, error: String) -> Result<RunState, String> {
    tracing::warn!(error = %error, "run failed");
    record.state = RunState::Failed;
    record.error = Some(error);
    ended(ctx, record, Some("failed")).await
}

/// [`end`], as the run's outcome.
async fn ended(
    ctx: &Ctx,
    record: &mut RunRecord,
    attempt_end: Option<&str>,
) -> Result<RunState, String> {
    end(ctx, record, attempt_end)
        .await
        .map_err(|e| e.to_string())?;
    Ok(record.state)
}

/// Writes the final state and event, and forgets the run's checkpoints.
async fn end(
    ctx: &Ctx,
    record: &mut RunRecord,
    attempt_end: Option<&str>,
) -> Result<(), TrainingError> {
    let run_id = record.run_id().to_string();
    record.finished_at = Some(time::now_rfc3339_seconds());
    record.trainer = None;
    if let (Some(a), Some(why)) = (record.attempts.last_mut(), attempt_end) {
        a.ended = Some(match (&record.error, record.state) {
            (Some(e), RunState::Failed) => format!("{why}: {e}"),
            _ => why.to_string(),
        });
    }
    let ev = finished(
        &run_id,
        record.state,
        record.model_version.clone(),
        record.activated,
        record.error.clone(),
    );
    ctx.runs.finish(&ctx.trainer_id, record, &ev).await?;
    if let Err(e) = ctx.checkpoints.delete_run(&run_id).await {
        tracing::warn!(error = %e, "could not delete the run's checkpoints");
    }
    Ok(())
}
