//! `/healthz`, `/readyz` and `/metrics` of the training service.
//!
//! Liveness only says the process answers. Readiness says the trainer can
//! take work: the broker and Redis answered its last calls, and it is not
//! shutting down. A trainer busy with a run is still ready: readiness is
//! about being healthy, and the queue (not a load balancer) hands out work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the endpoints report.
#[derive(Debug, Default)]
pub struct Health {
    broker: AtomicBool,
    redis: AtomicBool,
    stopping: AtomicBool,
    run: Mutex<Option<String>>,
}

impl Health {
    /// Whether the last broker call succeeded.
    pub fn set_broker(&self, ok: bool) {
        self.broker.store(ok, Ordering::Relaxed);
    }
    /// Whether the last Redis call succeeded.
    pub fn set_redis(&self, ok: bool) {
        self.redis.store(ok, Ordering::Relaxed);
    }
    /// Shutting down: take nothing new.
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::Relaxed);
    }
    /// The run in progress.
    pub fn set_run(&self, run: Option<String>) {
        *self.run.lock().unwrap_or_else(|e| e.into_inner()) = run;
    }
    fn ready(&self) -> (bool, String) {
        let broker = self.broker.load(Ordering::Relaxed);
        let redis = self.redis.load(Ordering::Relaxed);
        let stopping = self.stopping.load(Ordering::Relaxed);
        let run = self.run.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let body = format!(
            "broker: {}\nredis: {}\nrun: {}\n{}",
            if broker { "connected" } else { "disconnected" },
            if redis { "reachable" } else { "unreachable" },
            run.as_deref().unwrap_or("none"),
            if stopping { "stopping\n" } else { "" }
        );
        (broker && redis && !stopping, body)
    }
}

/// The process's Prometheus recorder, installed once.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("pleura_trainer_epoch_seconds".into()),
                    &[
                        1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
                    ],
                )
                .expect("valid buckets");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Another recorder (a test harness) may be installed; the
            // handle still renders ours.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// The endpoints, served in the background until `stop`.
pub async fn serve(listener: TcpListener, health: Arc<Health>, stop: CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state((health, metrics_handle()));
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(%error, "http server failed");
    }
}

async fn readyz(
    State((health, _)): State<(Arc<Health>, PrometheusHandle)>,
) -> (StatusCode, String) {
    match health.ready() {
        (true, body) => (StatusCode::OK, body),
        (false, body) => (StatusCode::SERVICE_UNAVAILABLE, body),
    }
}

async fn render_metrics(
    State((_, metrics)): State<(Arc<Health>, PrometheusHandle)>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        metrics.render(),
    )
}
