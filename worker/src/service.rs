//! [`Service`]: one worker, built once from the settings.
//!
//! Start-up, in order, each step waiting for the one before:
//!
//! 1. **The model source.** A pinned `model_dir` is loaded, optimised and
//!    warmed now (on a blocking thread); otherwise the registry's store and
//!    the trusted keys are checked. Settings that cannot work fail here,
//!    before anything is connected.
//! 2. **Redis**, retried until it answers. The heartbeat starts at once, so
//!    ops can see a worker that is still waiting for the broker or a model.
//! 3. **RabbitMQ**, retried likewise.
//! 4. **The inference pool**, idle, and, unless pinned, the reload task that
//!    follows the registry's active version.
//! 5. **Intake**: once a model is served, consume; at the stop, drain.
//!
//! Shutdown runs the other way: intake drains, the reload task stops, the
//! connection closes (returning unstarted prefetched deliveries), and the
//! heartbeat is removed.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use lapin::Connection;
use pleura::config::{ConfigError, Settings};
use pleura::fleet::{broker, ResultStore};
use pleura::model::{Engine, InferencePool};
use pleura::registry::{ArtifactStore, Registry, Trust};
use pleura::tls::ClientTls;
use pleura::wire::Names;
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::delivery::Handler;
use crate::error::WorkerError;
use crate::events;
use crate::health::Health;
use crate::heartbeat;
use crate::intake::Intake;
use crate::policy;
use crate::reload::{self, Reloader};
use crate::retry::retry;

/// Where the served model comes from.
enum ModelSource {
    /// A local `model_dir`, already loaded.
    Pinned,
    /// The registry's active version, verified against these keys.
    Registry { store: ArtifactStore, trust: Trust },
}

/// A background task with its own stop.
struct Background {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Background {
    fn spawn<F: Future<Output = ()> + Send + 'static>(
        start: impl FnOnce(CancellationToken) -> F,
    ) -> Background {
        let stop = CancellationToken::new();
        let task = tokio::spawn(start(stop.clone()));
        Background { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// A worker's connections, pool, stores and background tasks.
pub(crate) struct Service {
    settings: Settings,
    worker_id: String,
    names: Names,
    health: Arc<Health>,
    results: ResultStore,
    conn: Arc<Connection>,
    pool: Arc<InferencePool>,
    /// Poked to make the heartbeat report at once.
    beat: Arc<Notify>,
    stop: CancellationToken,
    heartbeat: Background,
    reload: Option<Background>,
}

impl Service {
    /// Starts everything but intake (steps 1–4 above). `None` when `stop`
    /// fired while waiting for Redis or RabbitMQ.
    pub(crate) async fn start(
        settings: Settings,
        health: Arc<Health>,
        stop: CancellationToken,
    ) -> Result<Option<Service>, WorkerError> {
        let worker_id = settings.resolved_worker_id();
        let names = settings.names();
        // Read once, before the retry loops: a TLS file that went missing
        // since the settings were checked will not come back by retrying.
        let tls = |read: Result<ClientTls, ConfigError>| {
            read.map_err(|e| match e {
                ConfigError::Tls(e) => WorkerError::Config(e.to_string()),
                other => WorkerError::Config(other.to_string()),
            })
        };
        let (amqp_tls, redis_tls) = (tls(settings.amqp_tls())?, tls(settings.redis_tls())?);
        let source = model_source(&settings, &health).await?;

        let Some(results) = connect("redis", &stop, || {
            ResultStore::connect_with_tls(
                &settings.redis_url,
                &redis_tls,
                names.clone(),
                settings.result_ttl_secs,
                settings.results_stream_maxlen,
            )
        })
        .await
        else {
            return Ok(None);
        };
        let beat = Arc::new(Notify::new());
        let heartbeat = {
            let (redis, names, health) = (results.connection(), names.clone(), health.clone());
            let (worker, beat) = (worker_id.clone(), beat.clone());
            let interval = Duration::from_secs(settings.heartbeat_interval_secs);
            Background::spawn(move |stop| {
                heartbeat::run(redis, names, health, worker, interval, beat, stop)
            })
        };

        let Some(conn) = connect("rabbitmq", &stop, || {
            broker::connect_with_tls(&settings.amqp_url, &worker_id, &amqp_tls)
        })
        .await
        else {
            heartbeat.stop().await;
            return Ok(None);
        };
        let conn = Arc::new(conn);

        // The pool exists before the reloader, so a reload can tell its
        // threads to let go of the old model.
        let pool = Arc::new(InferencePool::new(
            health.model().clone(),
            settings.resolved_inference_threads(),
            settings.limits(),
        ));
        let reload = match source {
            ModelSource::Pinned => None,
            ModelSource::Registry { store, trust } => {
                let reloader = Reloader {
                    registry: Registry::new(results.connection(), names.clone(), store),
                    trust,
                    pool: pool.clone(),
                    worker_id: worker_id.clone(),
                    canary_tolerance: settings.canary_tolerance,
                    engine: settings.engine_options(),
                    health: health.clone(),
                    beat: beat.clone(),
                    refused: Default::default(),
                };
                let conn = conn.clone();
                let interval = Duration::from_secs(settings.reconcile_interval_secs);
                Some(Background::spawn(move |stop| {
                    reload::run(reloader, conn, interval, stop)
                }))
            }
        };
        Ok(Some(Service {
            settings,
            worker_id,
            names,
            health,
            results,
            conn,
            pool,
            beat,
            stop,
            heartbeat,
            reload,
        }))
    }

    /// Takes jobs until the stop, then shuts down in order.
    pub(crate) async fn run(self) -> Result<(), WorkerError> {
        let (redis_ok, redis_ok_rx) = watch::channel(true);
        self.health.watch_results(redis_ok_rx.clone());
        let handler = Arc::new(Handler {
            worker_id: self.worker_id.clone(),
            health: self.health.clone(),
            pool: self.pool.clone(),
            results: self.results.clone(),
            redis_ok,
            max_write_backoff: Duration::from_millis(self.settings.redis_max_backoff_ms.max(1)),
            hard_stop: CancellationToken::new(),
        });
        let threads = self.pool.size() as u32;
        let intake = Intake {
            names: self.names.clone(),
            delivery_limit: self.settings.delivery_limit,
            prefetch: (threads * u32::from(self.settings.prefetch_per_thread))
                .min(u32::from(u16::MAX)) as u16,
            tag: format!(
                "{}-{}",
                self.worker_id,
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            grace: Duration::from_secs(self.settings.shutdown_grace_secs),
        };
        let outcome = intake
            .run(&self.conn, handler, redis_ok_rx, &self.beat, &self.stop)
            .await;
        if let Some(reload) = self.reload {
            reload.stop().await;
        }
        // Closing returns any prefetched but unstarted deliveries to the queues.
        let _ = self.conn.close(200, "worker shutting down".into()).await;
        self.heartbeat.stop().await;
        outcome
    }
}

/// Step 1: loads a pinned model, or checks that the registry can be
/// followed at all.
async fn model_source(settings: &Settings, health: &Health) -> Result<ModelSource, WorkerError> {
    if let Some(dir) = &settings.model_dir {
        // Optimising takes seconds of CPU: a blocking thread, not the executor.
        let t0 = Instant::now();
        let (dir, options) = (dir.clone(), settings.engine_options());
        let engine = tokio::task::spawn_blocking(move || Engine::load_with(&dir, &options))
            .await
            .expect("model loading panicked")?;
        events::model_loaded(engine.version(), None, t0.elapsed());
        health.model().store(Some(Arc::new(engine)));
        return Ok(ModelSource::Pinned);
    }
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
    Ok(ModelSource::Registry { store, trust })
}

/// Retries a connection on [`policy::CONNECT_BACKOFF`] until it succeeds or
/// `stop` fires, so a worker started before its broker or Redis simply
/// waits for them.
async fn connect<T, E: std::fmt::Display, Fut: Future<Output = Result<T, E>>>(
    what: &'static str,
    stop: &CancellationToken,
    connect: impl FnMut() -> Fut,
) -> Option<T> {
    retry(connect, policy::connect_backoff(), stop, |e, attempt| {
        tracing::warn!(service = what, attempt, error = %e, "cannot connect yet; retrying");
    })
    .await
    .ok()
}
