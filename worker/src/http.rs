//! `/healthz`, `/readyz` and `/metrics`.
//!
//! Liveness only says the process answers. Readiness says the worker can do
//! its job: the broker is connected and a model is loaded and warmed.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::events;
use crate::health::Health;

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: PrometheusHandle,
}

/// The endpoints, served in the background.
pub(crate) struct Endpoints {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Endpoints {
    /// Serves on `listener` until [`Endpoints::stop`].
    pub(crate) fn spawn(listener: TcpListener, health: Arc<Health>) -> Endpoints {
        let stop = CancellationToken::new();
        let task = tokio::spawn(serve(
            listener,
            health,
            events::metrics_handle(),
            stop.clone(),
        ));
        Endpoints { stop, task }
    }

    /// Stops serving (open requests finish first).
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: PrometheusHandle,
    stop: CancellationToken,
) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AppState { health, metrics });
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(%error, "http server failed");
    }
}

async fn readyz(State(s): State<AppState>) -> (StatusCode, String) {
    let (broker, model) = (s.health.broker_connected(), s.health.model_version());
    let results = s.health.results_writable();
    let body = format!(
        "broker: {}\nresults: {}\nmodel: {}\n",
        if broker { "connected" } else { "disconnected" },
        if results { "writable" } else { "refused" },
        model.as_deref().unwrap_or("none")
    );
    if broker && results && model.is_some() && !s.health.stopping() {
        (StatusCode::OK, body)
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

async fn render_metrics(
    State(s): State<AppState>,
) -> ([(axum::http::header::HeaderName, &'static str); 1], String) {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        s.metrics.render(),
    )
}
