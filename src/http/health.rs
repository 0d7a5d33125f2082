//! `/healthz` (the process is alive), `/readyz` (database and engine
//! reachable, first full sync done) and `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde::Serialize;

use super::AppState;

/// The result of the readiness checks.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ReadinessReport {
    /// Why the process is not ready; empty when it is.
    pub reasons: Vec<String>,
}

impl ReadinessReport {
    /// True when nothing stands in the way.
    pub fn ready(&self) -> bool {
        self.reasons.is_empty()
    }
}

/// Answers "can this process do its job right now?".
pub trait Readiness: Send + Sync {
    /// Runs the checks (each bounded in time).
    fn check(&self) -> BoxFuture<'_, ReadinessReport>;
}

pub(super) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let report = state.readiness.check().await;
    if report.ready() {
        (
            StatusCode::OK,
            Json(serde_json::json!({ "status": "ready" })),
        )
            .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "status": "not ready", "reasons": report.reasons })),
        )
            .into_response()
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let metrics = state.metrics.clone();
    // Rendering reads /proc and walks every series: keep it off the reactor.
    match tokio::task::spawn_blocking(move || metrics.render()).await {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
