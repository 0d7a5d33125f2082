//! `/healthz` (the process is alive), `/readyz` (database and engine
//! reachable, first full sync done) and `/metrics`.
//!
//! `/readyz` answers from a cached check ([`CachedReadiness`]): however
//! often it is called, the checks run at most once per [`READY_TTL`], one
//! at a time (callers that arrive during a check wait for its result).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures::future::BoxFuture;
use serde::Serialize;
use tokio::time::Instant;

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

/// How long a readiness result is served before the checks run again.
pub const READY_TTL: Duration = Duration::from_secs(1);

/// A readiness check run at most once per [`READY_TTL`] (single-flight).
pub struct CachedReadiness {
    inner: Arc<dyn Readiness>,
    last: tokio::sync::Mutex<Option<(Instant, ReadinessReport)>>,
}

impl CachedReadiness {
    /// Caches the results of `inner`.
    pub fn new(inner: Arc<dyn Readiness>) -> Self {
        Self {
            inner,
            last: tokio::sync::Mutex::new(None),
        }
    }
}

impl Readiness for CachedReadiness {
    fn check(&self) -> BoxFuture<'_, ReadinessReport> {
        Box::pin(async move {
            // Held across the check: who comes meanwhile waits for its result.
            let mut last = self.last.lock().await;
            if let Some((at, report)) = last.as_ref() {
                if at.elapsed() < READY_TTL {
                    return report.clone();
                }
            }
            let report = self.inner.check().await;
            *last = Some((Instant::now(), report.clone()));
            report
        })
    }
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

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    struct Counting(AtomicUsize);

    impl Readiness for Counting {
        fn check(&self) -> BoxFuture<'_, ReadinessReport> {
            Box::pin(async move {
                self.0.fetch_add(1, Ordering::SeqCst);
                // A check takes a while: callers arriving meanwhile share it.
                tokio::time::sleep(Duration::from_millis(300)).await;
                ReadinessReport::default()
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn many_readiness_calls_run_the_checks_at_most_once_a_second() {
        let counting = Arc::new(Counting(AtomicUsize::new(0)));
        let cached = Arc::new(CachedReadiness::new(counting.clone()));
        let calls = || {
            let cached = cached.clone();
            futures::future::join_all((0..200).map(move |_| {
                let cached = cached.clone();
                async move { cached.check().await }
            }))
        };
        let reports = calls().await;
        assert!(reports.iter().all(ReadinessReport::ready));
        assert_eq!(
            counting.0.load(Ordering::SeqCst),
            1,
            "one check for 200 concurrent calls"
        );
        calls().await;
        assert_eq!(counting.0.load(Ordering::SeqCst), 1, "still fresh");
        tokio::time::advance(READY_TTL).await;
        calls().await;
        calls().await;
        assert_eq!(
            counting.0.load(Ordering::SeqCst),
            2,
            "one more check after a second"
        );
    }
}
