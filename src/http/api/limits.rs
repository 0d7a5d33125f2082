//! What bounds a `/v1` request (README "JSON API", limits): at most
//! `--api-max-inflight` served at once, past that 503 with `Retry-After`
//! (nothing queues); each answered within its time limit or 503.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::errors::ApiError;

/// The in-flight limit: a request holds a permit while it is served.
#[derive(Clone)]
pub(super) struct Inflight {
    permits: Arc<Semaphore>,
    limit: usize,
}

impl Inflight {
    /// A limit of `max` requests at once (at least one).
    pub(super) fn new(max: usize) -> Self {
        let limit = max.clamp(1, Semaphore::MAX_PERMITS);
        Self {
            permits: Arc::new(Semaphore::new(limit)),
            limit,
        }
    }
}

/// Serves a request only while fewer than the limit are in flight; 503
/// with `Retry-After` past it (the caller retries, nothing queues).
pub(super) async fn limit_inflight(
    State(inflight): State<Inflight>,
    request: Request,
    next: Next,
) -> Response {
    match inflight.permits.try_acquire_owned() {
        Ok(_permit) => next.run(request).await,
        Err(_) => ApiError::Busy(inflight.limit).into_response(),
    }
}

/// Answers 503 when the request takes longer than `limit` (a slow body
/// or a slow database): nothing holds a connection and a permit for good.
pub(super) async fn time_limit(
    State(limit): State<Duration>,
    request: Request,
    next: Next,
) -> Response {
    match tokio::time::timeout(limit, next.run(request)).await {
        Ok(response) => response,
        Err(_) => ApiError::TooSlow(limit).into_response(),
    }
}
