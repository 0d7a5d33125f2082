//! The HTTP surface of `clawfleet run`: `/metrics`, `/healthz`, `/readyz`
//! and the JSON API under `/v1`, on one listener (`--listen`).
//!
//! Metrics and health are always open; the API needs
//! `Authorization: Bearer $CLAWFLEET_API_TOKEN` and answers 503 when no token
//! is configured. The API only writes `desired_containers`, exactly as any
//! other service would; it never touches the engine.

mod api;
mod health;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use subtle::ConstantTimeEq;

use crate::image_ref::ImageRef;
use crate::metrics::Metrics;
use crate::secrets::KeyRing;
use crate::store::Store;

pub use health::{Readiness, ReadinessReport};

/// The API bearer token; compared in constant time, never printed.
#[derive(Clone)]
pub struct ApiToken(zeroize::Zeroizing<String>);

impl ApiToken {
    /// Wraps a configured token; `None` for an empty one.
    pub fn new(token: &str) -> Option<Self> {
        let token = token.trim();
        (!token.is_empty()).then(|| Self(zeroize::Zeroizing::new(token.to_owned())))
    }

    /// True when `candidate` is this token (constant time in the token's content).
    pub fn matches(&self, candidate: &str) -> bool {
        self.0.as_bytes().ct_eq(candidate.as_bytes()).into()
    }
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiToken(<redacted>)")
    }
}

/// What the handlers share.
pub struct AppState {
    /// The database.
    pub store: Store,
    /// The key ring, to open gateway tokens for `ensure-running`.
    pub keys: KeyRing,
    /// The API token; `None`: the API is off.
    pub api_token: Option<ApiToken>,
    /// The default image (shown for rows that name none).
    pub default_image: ImageRef,
    /// Readiness checks.
    pub readiness: Arc<dyn Readiness>,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
}

/// The router of the whole surface.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(health::routes())
        .nest("/v1", api::routes(state.clone()))
        .with_state(state)
}

/// A bound listener, serving until `shutdown` resolves.
pub struct Server {
    listener: tokio::net::TcpListener,
}

/// Binding the listener failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct BindError {
    /// The address.
    pub addr: SocketAddr,
    /// The OS error.
    #[source]
    pub source: std::io::Error,
}

impl Server {
    /// Binds `addr` (port 0 picks a free port).
    pub async fn bind(addr: SocketAddr) -> Result<Self, BindError> {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| BindError { addr, source })?;
        Ok(Self { listener })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.listener.local_addr().ok()
    }

    /// Serves `router` until `shutdown` resolves; open connections finish their request.
    pub async fn serve(
        self,
        router: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        axum::serve(self.listener, router)
            .with_graceful_shutdown(shutdown)
            .await
    }
}
