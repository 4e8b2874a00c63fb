//! `pleura-trainer serve`: the training service.
//!
//! # Layout
//!
//! - this file: start-up and the loop that finds work: runs whose trainer
//!   went away first, then requests from the `{ns}.train` queue.
//! - `job`: one run, from claim to its final state.
//! - `control`: the bridge between the training thread and the service.
//! - `http`: `/healthz`, `/readyz`, `/metrics`.
//!
//! Why `basic.get` and not a consumer: a consumer with prefetch 1 would be
//! handed the next request while this trainer is busy, and that request
//! would sit unacked behind a run of hours, past the broker's consumer
//! timeout. A trainer asks for one request only when it is idle, claims it
//! in Redis and acks it at once; from then on the run's lease, not the
//! message, says who owns it (see `pleura::training::runs`).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicRejectOptions};
use lapin::{Channel, Connection};
use pleura::config::Settings;
use pleura::fleet::Announcer;
use pleura::registry::Registry;
use pleura::training::{self, CheckpointStore, Claim, RunStore, TrainingError};
use pleura::wire::{RunRecord, RunState, TrainRequest};
use tokio_util::sync::CancellationToken;

mod control;
pub mod http;
mod job;

pub use control::Stop;

/// Why the service could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A setting is unusable.
    #[error("configuration: {0}")]
    Config(String),
    /// The HTTP address cannot be bound.
    #[error("http_addr {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// A service it needs at start-up is unreachable.
    #[error(transparent)]
    Training(#[from] TrainingError),
    /// The registry cannot be opened.
    #[error(transparent)]
    Registry(#[from] pleura::registry::RegistryError),
}

/// Everything a run needs from the service.
pub(crate) struct Ctx {
    pub settings: Settings,
    pub trainer_id: String,
    pub runs: RunStore,
    pub checkpoints: CheckpointStore,
    pub registry: Registry,
    pub announcer: Announcer,
    pub health: Arc<http::Health>,
    pub shutdown: CancellationToken,
}

impl Ctx {
    pub fn lease_ms(&self) -> u64 {
        self.settings.trainer_lease_secs.max(1) * 1000
    }
}

/// The trainer's id: `trainer_id`-like `worker_id` from the settings, else
/// `<host>-<pid>` (unique per process, so a restarted trainer is a new one).
fn trainer_id(settings: &Settings) -> String {
    if !settings.worker_id.is_empty() {
        return settings.worker_id.clone();
    }
    format!(
        "{}-{}",
        gethostname::gethostname().to_string_lossy(),
        std::process::id()
    )
}

/// Serves until `shutdown` resolves. A run in progress then stops at its
/// next batch and is released for another trainer, which resumes it from
/// its last checkpoint.
pub async fn run(settings: Settings, shutdown: impl Future<Output = ()>) -> Result<(), ServeError> {
    let problems = settings_problems(&settings);
    if !problems.is_empty() {
        return Err(ServeError::Config(problems.join("; ")));
    }
    let redis_tls = settings
        .redis_tls()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    let amqp_tls = settings
        .amqp_tls()
        .map_err(|e| ServeError::Config(e.to_string()))?;
    std::fs::create_dir_all(&settings.trainer_work_dir).map_err(|e| {
        ServeError::Config(format!(
            "trainer_work_dir {}: {e}",
            settings.trainer_work_dir.display()
        ))
    })?;
    let runs = RunStore::connect(&settings.redis_url, &redis_tls, settings.names()).await?;
    let registry = Registry::connect_with_tls(
        &settings.redis_url,
        &redis_tls,
        settings.names(),
        &settings.registry_url,
    )
    .await?;
    let checkpoints = CheckpointStore::open(&settings.runs_url)?;
    let announcer = Announcer::new(&settings.amqp_url, settings.names()).with_tls(amqp_tls.clone());
    let listener = tokio::net::TcpListener::bind(&settings.http_addr)
        .await
        .map_err(|source| ServeError::Bind {
            addr: settings.http_addr.clone(),
            source,
        })?;
    let health = Arc::new(http::Health::default());
    let stop_http = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(listener, health.clone(), stop_http.clone()));
    let token = CancellationToken::new();
    let ctx = Arc::new(Ctx {
        trainer_id: trainer_id(&settings),
        settings,
        runs,
        checkpoints,
        registry,
        announcer,
        health: health.clone(),
        shutdown: token.clone(),
    });
    tracing::info!(
        trainer = %ctx.trainer_id,
        queue = %ctx.settings.names().train_queue(),
        runs_url = %ctx.checkpoints.url(),
        lease_secs = ctx.settings.trainer_lease_secs,
        "trainer service started"
    );
    let serving = serve_loop(ctx.clone(), &amqp_tls);
    tokio::pin!(serving);
    tokio::select! {
        _ = &mut serving => {}
        _ = shutdown => {
            // The loop (and a run in progress) sees the token, stops at the
            // next batch, releases the run, and returns.
            health.set_stopping();
            token.cancel();
            serving.await;
        }
    }
    stop_http.cancel();
    let _ = http_task.await;
    tracing::info!("trainer service stopped");
    Ok(())
}

fn settings_problems(s: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    if s.trainer_lease_secs < 3 {
        out.push(format!(
            "trainer_lease_secs {} is too short to renew (at least 3)",
            s.trainer_lease_secs
        ));
    }
    if s.trainer_max_attempts == 0 {
        out.push("trainer_max_attempts must be at least 1".into());
    }
    out
}

async fn serve_loop(ctx: Arc<Ctx>, amqp_tls: &pleura::tls::ClientTls) {
    let mut backoff = Duration::from_millis(250);
    let poll = Duration::from_millis(500);
    let mut broker: Option<(Connection, Channel)> = None;
    while !ctx.shutdown.is_cancelled() {
        // The broker first: readiness reports it, and a trainer busy with
        // a resumed run must not look disconnected for the whole run.
        if broker.is_none() {
            match connect(&ctx, amqp_tls).await {
                Ok(b) => {
                    broker = Some(b);
                    backoff = Duration::from_millis(250);
                }
                Err(e) => {
                    ctx.health.set_broker(false);
                    tracing::warn!(error = %e, "broker unreachable; retrying");
                    sleep_or_stop(&ctx, backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(15));
                    continue;
                }
            }
        }
        // Runs whose trainer died or let go come first: they were taken
        // from the queue already and someone is waiting on them.
        match orphan(&ctx).await {
            Ok(Some((record, attempt))) => {
                job::execute(&ctx, *record, attempt).await;
                continue;
            }
            Ok(None) => ctx.health.set_redis(true),
            Err(e) => {
                ctx.health.set_redis(false);
                tracing::warn!(error = %e, "looking for orphaned runs failed");
            }
        }
        let Some((_, channel)) = &broker else {
            continue;
        };
        let got = channel
            .basic_get(
                ctx.settings.names().train_queue().as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await;
        match got {
            Ok(Some(message)) => {
                ctx.health.set_broker(true);
                take(&ctx, message.delivery).await;
            }
            Ok(None) => {
                ctx.health.set_broker(true);
                sleep_or_stop(&ctx, poll).await;
            }
            Err(e) => {
                ctx.health.set_broker(false);
                tracing::warn!(error = %e, "taking a training request failed; reconnecting");
                broker = None;
                sleep_or_stop(&ctx, backoff).await;
            }
        }
    }
    if let Some((conn, _)) = broker {
        let _ = conn.close(200, "trainer stopping".into()).await;
    }
}

async fn sleep_or_stop(ctx: &Ctx, d: Duration) {
    tokio::select! {
        _ = ctx.shutdown.cancelled() => {}
        _ = tokio::time::sleep(d) => {}
    }
}

async fn connect(
    ctx: &Ctx,
    tls: &pleura::tls::ClientTls,
) -> Result<(Connection, Channel), TrainingError> {
    let conn = pleura::fleet::broker::connect_with_tls(
        &ctx.settings.amqp_url,
        &format!("pleura-trainer {}", ctx.trainer_id),
        tls,
    )
    .await?;
    let channel = conn
        .create_channel()
        .await
        .map_err(pleura::fleet::BrokerError::from)?;
    training::declare_train_queue(&channel, &ctx.settings.names()).await?;
    ctx.health.set_broker(true);
    Ok((conn, channel))
}

/// A run that is open but unheld: its trainer died (the lease expired) or
/// let go of it (shutdown). Claims the first one found.
async fn orphan(ctx: &Ctx) -> Result<Option<(Box<RunRecord>, u32)>, TrainingError> {
    for run_id in ctx.runs.open_runs().await? {
        if ctx.runs.leased(&run_id).await? {
            continue;
        }
        let Some(record) = ctx.runs.get(&run_id).await? else {
            continue;
        };
        // A run never claimed is still on the queue, and taken from there.
        if record.attempts.is_empty() {
            continue;
        }
        if let Claim::Claimed { record, attempt } = ctx
            .runs
            .claim(&run_id, &ctx.trainer_id, ctx.lease_ms())
            .await?
        {
            tracing::info!(run_id = %run_id, attempt, "resuming a run its trainer let go of");
            return Ok(Some((record, attempt)));
        }
    }
    Ok(None)
}

/// Handles one request from the queue: claim, ack, run. The ack comes after
/// the claim, so a trainer that dies in between leaves the request on the
/// queue; whoever takes it again finds the claim and the lease.
async fn take(ctx: &Ctx, delivery: lapin::message::Delivery) {
    let request: TrainRequest = match serde_json::from_slice(&delivery.data) {
        Ok(r) => r,
        Err(e) => {
            // Retrying cannot make it parse: to the dead-letter queue.
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|s| s.to_string())
                .unwrap_or_default();
            tracing::warn!(run_id = %id, error = %e, "unreadable training request; dead-lettered");
            job::fail_unreadable(ctx, &id, &e.to_string()).await;
            let _ = delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await;
            return;
        }
    };
    let run_id = request.run_id.clone();
    let claim = match ctx
        .runs
        .claim(&run_id, &ctx.trainer_id, ctx.lease_ms())
        .await
    {
        Ok(Claim::Missing) => {
            // Queued by something other than `pleura train submit`, which
            // records first: record it now, checked like a submission.
            match job::record_foreign(ctx, request).await {
                Ok(()) => {
                    ctx.runs
                        .claim(&run_id, &ctx.trainer_id, ctx.lease_ms())
                        .await
                }
                Err(e) => Err(e),
            }
        }
        other => other,
    };
    match claim {
        Ok(Claim::Claimed { record, attempt }) => {
            ctx.health.set_redis(true);
            if let Err(e) = delivery.acker.ack(Default::default()).await {
                // The lease protects the run: a redelivered request finds it.
                tracing::warn!(run_id = %run_id, error = %e, "ack of a claimed request failed");
            }
            job::execute(ctx, *record, attempt).await;
        }
        Ok(Claim::Held { by }) => {
            tracing::info!(run_id = %run_id, holder = %by, "request for a run another trainer holds; dropped");
            let _ = delivery.acker.ack(Default::default()).await;
        }
        Ok(Claim::Ended(state)) => {
            tracing::info!(run_id = %run_id, state = %state, "request for a run that has ended; dropped");
            let _ = delivery.acker.ack(Default::default()).await;
        }
        Ok(Claim::Missing) => {
            let _ = delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await;
        }
        Err(e) => {
            ctx.health.set_redis(false);
            tracing::warn!(run_id = %run_id, error = %e, "could not claim a training request; returned to the queue");
            let _ = delivery
                .acker
                .nack(lapin::options::BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// The state a run is in, for logs and metrics.
pub(crate) fn outcome_label(state: RunState) -> &'static str {
    state.as_str()
}
