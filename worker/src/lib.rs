//! The Pleura fleet worker: scans from RabbitMQ, verdicts to Redis.
//!
//! A worker is stateless. It takes scans from the STAT and routine queues,
//! decodes and classifies them on a blocking inference pool, writes the
//! result to Redis, and only then acks. Anything it cannot finish goes back
//! to the broker; anything that can never succeed is dead-lettered with an
//! error result so the submitter learns at once.
//!
//! # Layout
//!
//! - [`run`] / [`run_with_listener`]: the whole worker, given settings and a
//!   shutdown future (mini-redis style; `main.rs` only wires it).
//! - `job`: turning a delivery into a job (job id, priority, correlation).
//! - [`ack`]: the guard that makes every delivery end in ack, nack or reject.
//! - [`retry`]: backoff for result writes during a Redis outage.
//! - [`reload`]: following the registry's active model: fetch, verify,
//!   load, canary, atomic swap; the old model stays on any failure.
//! - `heartbeat`: the worker's heartbeat in Redis for `pleura fleet status`.
//! - `http`: `/healthz`, `/readyz`, `/metrics`.
//! - `events`: log lines and metrics, emitted together.

pub mod ack;
mod events;
mod heartbeat;
mod http;
mod job;
pub mod reload;
pub mod retry;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use pleura::broker::{self, BrokerError};
use pleura::config::Settings;
use pleura::engine::{empty_slot, AnalyseError, Engine, InferencePool, ModelError, ModelSlot};
use pleura::registry::{ArtifactStore, Registry};
use pleura::results::{ResultStore, ResultsError};
use pleura::telemetry::redact_url;
use pleura::wire::{ErrorInfo, Names, ReloadFailure, ScanResult, Status, Timings, SCHEMA_VERSION};

use crate::ack::{AckGuard, Settlement};
use crate::events::Outcome;
use crate::retry::{retry, Backoff};

/// Why a worker stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The settings cannot work (for example, no model configured).
    #[error("configuration: {0}")]
    Config(String),
    /// The model could not be loaded.
    #[error("model: {0}")]
    Model(#[from] ModelError),
    /// The broker failed beyond what connection recovery could repair.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// Redis could not be set up.
    #[error(transparent)]
    Results(#[from] ResultsError),
    /// The HTTP listener could not be bound.
    #[error("http listener: {0}")]
    Io(#[from] std::io::Error),
}

/// Counters the heartbeat reports.
#[derive(Default)]
pub struct Stats {
    ok: AtomicU64,
    error: AtomicU64,
    retried: AtomicU64,
    in_flight: AtomicU64,
    reloads: AtomicU64,
    last_refusal: Mutex<Option<ReloadFailure>>,
}

impl Stats {
    fn begin(&self) {
        events::in_flight(1.0);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }
    fn end(&self) {
        events::in_flight(-1.0);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
    fn finished(
        &self,
        job_id: Option<&str>,
        outcome: Outcome,
        model_version: Option<&str>,
        total: Duration,
    ) {
        let counter = match outcome {
            Outcome::Ok => &self.ok,
            Outcome::Error | Outcome::Poison => &self.error,
            Outcome::Retry => &self.retried,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        events::job_finished(job_id, outcome, model_version, total);
    }
}

/// What `/readyz` and the heartbeat look at.
pub struct Health {
    channel: OnceLock<Channel>,
    model: ModelSlot,
    stopping: AtomicBool,
    /// Serving a local `model_dir` instead of following the registry.
    pinned: bool,
    started_at: String,
    stats: Stats,
}

impl Health {
    fn broker_connected(&self) -> bool {
        self.channel.get().is_some_and(|c| c.status().connected())
    }
    fn model_version(&self) -> Option<String> {
        self.model.load().as_ref().map(|e| e.version().to_string())
    }
    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }
    /// Taking jobs: connected, a model loaded, not shutting down.
    fn ready(&self) -> bool {
        self.broker_connected() && self.model.load().is_some() && !self.stopping()
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Runs a worker until `shutdown` resolves, then finishes the jobs in flight.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let listener = TcpListener::bind(&settings.http_addr).await?;
    run_with_listener(settings, listener, shutdown).await
}

/// Everything a job task needs.
struct Ctx {
    worker_id: String,
    health: Arc<Health>,
    pool: Arc<InferencePool>,
    store: ResultStore,
    redis_ok: watch::Sender<bool>,
    max_backoff: Duration,
    /// Fires when the grace period is over: held jobs give up and requeue.
    hard_stop: CancellationToken,
}

/// Like [`run`], with the HTTP endpoints on an already bound listener (tests
/// bind port 0 and read the address back).
pub async fn run_with_listener(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), WorkerError> {
    let stop = CancellationToken::new();
    {
        let stop = stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            stop.cancel();
        });
    }
    let worker_id = settings.resolved_worker_id();
    let names = settings.names();
    let model = empty_slot();
    let health = Arc::new(Health {
        channel: OnceLock::new(),
        model: model.clone(),
        stopping: AtomicBool::new(false),
        pinned: settings.model_dir.is_some(),
        started_at: now_rfc3339(),
        stats: Stats::default(),
    });
    let http_addr: SocketAddr = listener.local_addr()?;
    let http_stop = CancellationToken::new();
    let http_task = tokio::spawn(http::serve(
        listener,
        health.clone(),
        events::metrics_handle(),
        http_stop.clone(),
    ));
    tracing::info!(
        worker = %worker_id,
        namespace = names.namespace(),
        amqp = %redact_url(&settings.amqp_url),
        redis = %redact_url(&settings.redis_url),
        http = %http_addr,
        "worker starting"
    );

    let outcome = serve(&settings, worker_id, names, model, health.clone(), stop).await;
    health.stopping.store(true, Ordering::Relaxed);
    http_stop.cancel();
    let _ = http_task.await;
    match &outcome {
        Ok(()) => tracing::info!("worker stopped"),
        Err(error) => tracing::error!(%error, "worker stopped on error"),
    }
    outcome
}

async fn serve(
    settings: &Settings,
    worker_id: String,
    names: Names,
    model: ModelSlot,
    health: Arc<Health>,
    stop: CancellationToken,
) -> Result<(), WorkerError> {
    // Settings that cannot work fail now, before anything is connected; a
    // pinned model is loaded now for the same reason (optimising takes
    // seconds of CPU, so on a blocking thread).
    let registry_parts = match &settings.model_dir {
        Some(dir) => {
            let t0 = Instant::now();
            let dir = dir.clone();
            let engine = tokio::task::spawn_blocking(move || Engine::load(&dir))
                .await
                .expect("model loading panicked")?;
            events::model_loaded(engine.version(), None, t0.elapsed());
            model.store(Some(Arc::new(engine)));
            None
        }
        None => {
            let store = ArtifactStore::open(&settings.registry_url)
                .map_err(|e| WorkerError::Config(e.to_string()))?;
            let trust = settings
                .trust()
                .map_err(|e| WorkerError::Config(e.to_string()))?;
            if trust.keys.is_empty() && !trust.allow_unsigned {
                return Err(WorkerError::Config(
                    "no trusted_keys: every published model would be refused; set trusted_keys \
                     (or allow_unsigned_models for development), or pin a model_dir"
                        .into(),
                ));
            }
            Some((store, trust))
        }
    };

    // 1. Redis, waiting for it if it is not up yet; the heartbeat starts at
    //    once so ops can see a worker that is still waiting for a model.
    let store = match connect_with_retry("redis", &stop, || {
        ResultStore::connect(
            &settings.redis_url,
            names.clone(),
            settings.result_ttl_secs,
            settings.results_stream_maxlen,
        )
    })
    .await
    {
        Some(s) => s,
        None => return Ok(()),
    };
    let beat = Arc::new(Notify::new());
    let heartbeat_stop = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat::run(
        store.connection(),
        names.clone(),
        health.clone(),
        worker_id.clone(),
        Duration::from_secs(settings.heartbeat_interval_secs),
        beat.clone(),
        heartbeat_stop.clone(),
    ));
    let outcome = serve_connected(
        settings,
        worker_id,
        names,
        model,
        health,
        stop,
        store,
        registry_parts,
        beat,
    )
    .await;
    heartbeat_stop.cancel();
    let _ = heartbeat.await;
    outcome
}

#[allow(clippy::too_many_arguments)]
async fn serve_connected(
    settings: &Settings,
    worker_id: String,
    names: Names,
    model: ModelSlot,
    health: Arc<Health>,
    stop: CancellationToken,
    store: ResultStore,
    registry_parts: Option<(ArtifactStore, pleura::signing::Trust)>,
    beat: Arc<Notify>,
) -> Result<(), WorkerError> {
    // 2. RabbitMQ.
    let conn = match connect_with_retry("rabbitmq", &stop, || {
        broker::connect(&settings.amqp_url, &worker_id)
    })
    .await
    {
        Some(c) => Arc::new(c),
        None => return Ok(()),
    };

    // 3. Unless a model is pinned, follow the registry's active version from
    //    now on. The pool exists first, idle, so a reload can tell its
    //    threads to let go of the old model.
    let pool = Arc::new(InferencePool::new(
        model.clone(),
        settings.resolved_inference_threads(),
        settings.limits(),
    ));
    let reload_stop = CancellationToken::new();
    let reload_task = match registry_parts {
        // Pinned: loaded before connecting.
        None => None,
        Some((artifacts, trust)) => {
            let registry = Registry::new(store.connection(), names.clone(), artifacts);
            let reloader = reload::Reloader::new(
                registry,
                trust,
                model.clone(),
                pool.clone(),
                worker_id.clone(),
                settings.canary_tolerance,
                health.clone(),
                beat.clone(),
            );
            Some(tokio::spawn(reload::run(
                reloader,
                conn.clone(),
                Duration::from_secs(settings.reconcile_interval_secs),
                reload_stop.clone(),
            )))
        }
    };
    let outcome = consume(
        settings, worker_id, names, model, pool, health, stop, store, &conn, beat,
    )
    .await;
    reload_stop.cancel();
    if let Some(task) = reload_task {
        let _ = task.await;
    }
    // Closing returns any prefetched but unstarted deliveries to the queues.
    let _ = conn.close(200, "worker shutting down".into()).await;
    outcome
}

/// Waits for a model, then takes jobs until `stop`, then drains.
#[allow(clippy::too_many_arguments)]
async fn consume(
    settings: &Settings,
    worker_id: String,
    names: Names,
    model: ModelSlot,
    pool: Arc<InferencePool>,
    health: Arc<Health>,
    stop: CancellationToken,
    store: ResultStore,
    conn: &Connection,
    beat: Arc<Notify>,
) -> Result<(), WorkerError> {
    // A worker without a usable model takes no jobs: they stay on the queue
    // for workers that have one.
    if model.load().is_none() {
        tracing::info!("waiting for a usable model before taking jobs");
        let mut check = tokio::time::interval(Duration::from_millis(100));
        while model.load().is_none() {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = check.tick() => {}
            }
        }
    }

    let threads = settings.resolved_inference_threads();
    let prefetch =
        (threads as u32 * settings.prefetch_per_thread as u32).min(u16::MAX as u32) as u16;
    let (stat_ch, routine_ch) =
        open_channels(conn, &names, settings.delivery_limit, prefetch).await?;
    let _ = health.channel.set(stat_ch.clone());
    let tag = format!("{worker_id}-{}", uuid_suffix());
    let mut stat = stat_ch
        .basic_consume(
            names.stat_queue().into(),
            format!("{tag}-stat").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::from)?;
    let mut routine = routine_ch
        .basic_consume(
            names.routine_queue().into(),
            format!("{tag}-routine").into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::from)?;
    tracing::info!(threads, prefetch, "consuming");
    // Ready now: say so at once rather than at the next heartbeat.
    beat.notify_one();

    let (redis_ok, mut redis_ok_rx) = watch::channel(true);
    let ctx = Arc::new(Ctx {
        worker_id,
        health: health.clone(),
        pool,
        store,
        redis_ok,
        max_backoff: Duration::from_millis(settings.redis_max_backoff_ms.max(1)),
        hard_stop: CancellationToken::new(),
    });
    let tracker = TaskTracker::new();
    let mut failure: Option<WorkerError> = None;

    loop {
        // While Redis refuses writes, take nothing new: the jobs already held
        // are retried, and everything else stays safely on the broker.
        if !*redis_ok_rx.borrow_and_update() {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = redis_ok_rx.changed() => continue,
            }
        }
        // STAT first whenever both queues have something for us.
        let (next, channel) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            d = stat.next() => (d, &stat_ch),
            d = routine.next() => (d, &routine_ch),
        };
        match next {
            Some(Ok(delivery)) => {
                let ctx = ctx.clone();
                tracker.spawn(handle_delivery(ctx, delivery));
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "consumer error; waiting for connection recovery");
                if let Err(error) = channel.wait_for_recovery(error).await {
                    failure = Some(BrokerError::from(error).into());
                    break;
                }
                tracing::info!("connection recovered");
            }
            None => {
                failure = Some(WorkerError::Config(
                    "the broker cancelled our consumer (queue deleted?)".into(),
                ));
                break;
            }
        }
    }

    // Stop consuming first, so the broker sends nothing more, then let the
    // jobs in flight finish and ack within the grace period.
    health.stopping.store(true, Ordering::Relaxed);
    for (ch, suffix) in [(&stat_ch, "stat"), (&routine_ch, "routine")] {
        let _ = ch
            .basic_cancel(
                format!("{tag}-{suffix}").into(),
                BasicCancelOptions::default(),
            )
            .await;
    }
    tracker.close();
    let grace = Duration::from_secs(settings.shutdown_grace_secs);
    tracing::info!(
        in_flight = tracker.len(),
        grace_secs = grace.as_secs(),
        "draining jobs in flight"
    );
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!(
            in_flight = tracker.len(),
            "grace period over; requeueing unfinished jobs"
        );
        ctx.hard_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await;
    }
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

async fn open_channels(
    conn: &Connection,
    names: &Names,
    delivery_limit: u32,
    prefetch: u16,
) -> Result<(Channel, Channel), BrokerError> {
    let stat = conn.create_channel().await?;
    broker::declare_topology(&stat, names, delivery_limit).await?;
    stat.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let routine = conn.create_channel().await?;
    routine
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok((stat, routine))
}

/// Retries a connection with backoff until it succeeds or `stop` fires, so a
/// worker started before its broker or Redis simply waits for them.
async fn connect_with_retry<T, E: std::fmt::Display, Fut: Future<Output = Result<T, E>>>(
    what: &'static str,
    stop: &CancellationToken,
    connect: impl FnMut() -> Fut,
) -> Option<T> {
    retry(
        connect,
        Backoff::new(Duration::from_millis(200), Duration::from_secs(5)),
        stop,
        |e, attempt| {
            tracing::warn!(service = what, attempt, error = %e, "cannot connect yet; retrying");
        },
    )
    .await
    .ok()
}

fn uuid_suffix() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_string()
}

pub(crate) fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// One delivery from receipt to settlement.
async fn handle_delivery(ctx: Arc<Ctx>, delivery: lapin::message::Delivery) {
    let received = Instant::now();
    ctx.health.stats.begin();
    let lapin::message::Delivery {
        properties,
        data,
        acker,
        redelivered,
        ..
    } = delivery;
    let guard = AckGuard::new(acker);
    let job = job::Job::from_properties(&properties);
    if let Some(ms) = job.queue_ms {
        events::stage("queue", ms / 1e3);
    }

    let job_id = match job.job_id {
        Ok(id) => id,
        Err(reason) => {
            // Without a usable job id nobody can be told: dead-letter only.
            events::scan_rejected(None, "invalid_job_id", &reason);
            guard.settle(Settlement::DeadLetter).await;
            ctx.health
                .stats
                .finished(None, Outcome::Poison, None, received.elapsed());
            ctx.health.stats.end();
            return;
        }
    };
    if redelivered {
        tracing::debug!(job_id = %job_id, "redelivered job");
    }

    let verdict = ctx.pool.analyse(data, job.priority).await;
    let mut result = ScanResult {
        schema: SCHEMA_VERSION,
        job_id: job_id.clone(),
        status: Status::Ok,
        label: None,
        p_effusion: None,
        threshold: None,
        model_version: None,
        priority: job.priority,
        timings_ms: Timings {
            queue: job.queue_ms,
            decode: 0.0,
            infer: 0.0,
            total: 0.0,
        },
        worker: ctx.worker_id.clone(),
        completed_at: String::new(),
        error: None,
        correlation: job.correlation,
    };
    let (settlement, outcome) = match verdict {
        Ok(v) => {
            events::stage("decode", v.decode_ms / 1e3);
            events::stage("infer", v.infer_ms / 1e3);
            result.label = Some(v.label);
            result.p_effusion = Some(v.p_effusion);
            result.threshold = Some(v.threshold);
            result.model_version = Some(v.model_version);
            result.timings_ms.decode = v.decode_ms;
            result.timings_ms.infer = v.infer_ms;
            (Settlement::Ack, Outcome::Ok)
        }
        Err(AnalyseError::Scan(e)) => {
            events::scan_rejected(Some(&job_id), e.code(), &e.to_string());
            result.status = Status::Error;
            result.error = Some(ErrorInfo {
                code: e.code().to_string(),
                message: e.to_string(),
            });
            (Settlement::DeadLetter, Outcome::Error)
        }
        Err(e) => {
            events::job_requeued(&job_id, &e);
            guard.settle(Settlement::Requeue).await;
            ctx.health
                .stats
                .finished(Some(&job_id), Outcome::Retry, None, received.elapsed());
            ctx.health.stats.end();
            return;
        }
    };
    result.timings_ms.total = received.elapsed().as_secs_f64() * 1e3;
    result.completed_at = now_rfc3339();

    // Hold the job until its result is in Redis. Only then settle it.
    let t_write = Instant::now();
    let written = retry(
        || ctx.store.write_once(&result),
        Backoff::new(Duration::from_millis(50), ctx.max_backoff),
        &ctx.hard_stop,
        |e, attempt| {
            ctx.redis_ok.send_replace(false);
            events::redis_write_failed(&job_id, attempt, e);
        },
    )
    .await;
    match written {
        Ok(_) => {
            ctx.redis_ok
                .send_if_modified(|ok| !std::mem::replace(ok, true));
            events::stage("write", t_write.elapsed().as_secs_f64());
            guard.settle(settlement).await;
            ctx.health.stats.finished(
                Some(&job_id),
                outcome,
                result.model_version.as_deref(),
                received.elapsed(),
            );
        }
        Err(retry::Cancelled) => {
            guard.settle(Settlement::Requeue).await;
            ctx.health
                .stats
                .finished(Some(&job_id), Outcome::Retry, None, received.elapsed());
        }
    }
    ctx.health.stats.end();
}
