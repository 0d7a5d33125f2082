//! The HTTP surface of `clawfleet run`: `/metrics`, `/healthz`, `/readyz`
//! and the JSON API under `/v1`, on one listener (`--listen`).
//!
//! Metrics, health and the API's OpenAPI document (`/v1/openapi.json`) are
//! always open; the rest of the API needs
//! `Authorization: Bearer $CLAWFLEET_API_TOKEN` and answers 503 when no token
//! is configured. The API only writes `desired_containers`, exactly as any
//! other service would; it never touches the engine.
//!
//! The listener bounds what a client can hold (README "JSON API", limits):
//! [`HEADER_READ_TIMEOUT`] to send headers, [`MAX_CONNECTIONS`] open
//! connections, a time limit per request and axum's 2 MB body limit.

mod api;
mod health;

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use subtle::ConstantTimeEq;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::image_ref::ImageRef;
use crate::metrics::Metrics;
use crate::nudge::Nudge;
use crate::secrets::KeyRing;
use crate::store::Store;

pub use api::{openapi, DEFAULT_MAX_INFLIGHT, REQUEST_TIMEOUT};
pub use health::{CachedReadiness, Readiness, ReadinessReport, READY_TTL};

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
    /// The instance whose controller the views report on (`--instance`).
    pub instance: String,
    /// The default image (shown for rows that name none).
    pub default_image: ImageRef,
    /// Readiness checks (wrap them in [`CachedReadiness`]).
    pub readiness: Arc<dyn Readiness>,
    /// How many `/v1` requests are served at once; 503 past it.
    pub max_inflight: usize,
    /// The metrics registry.
    pub metrics: Arc<Metrics>,
    /// How `ensure-running` asks a started gateway whether it answers.
    pub gateway_probe: crate::probe::GatewayProbe,
    /// Queues the users the API changes, while this process leads.
    pub nudge: Arc<Nudge>,
}

/// The router of the whole surface.
pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .merge(health::routes())
        .nest(api::PREFIX, api::routes(state.clone()))
        .with_state(state)
}

/// How long a client has to send a request's headers; then the connection
/// is closed (a slow client cannot hold one for good).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; one more is answered 503 and closed.
pub const MAX_CONNECTIONS: usize = 4096;
/// What a connection past [`MAX_CONNECTIONS`] is told before it is closed.
const TOO_MANY_CONNECTIONS: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\n\
content-type: application/json\r\nretry-after: 1\r\nconnection: close\r\n\
content-length: 66\r\n\r\n\
{\"error\":\"busy\",\"message\":\"too many connections; retry after 1s\"}\n";

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

    /// Serves `router` until `shutdown` resolves; open connections finish
    /// their request. HTTP/1.1 with [`HEADER_READ_TIMEOUT`] and at most
    /// [`MAX_CONNECTIONS`] connections (the routes bound the time of a request).
    pub async fn serve(
        self,
        router: Router,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let connections = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let (closing, closed) = tokio::sync::watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors, or a connection reset
                        // before it was accepted: go on after a pause.
                        tracing::debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
                () = &mut shutdown => break,
            };
            let _ = stream.set_nodelay(true);
            match connections.clone().try_acquire_owned() {
                Ok(permit) => {
                    tokio::spawn(serve_connection(
                        stream,
                        router.clone(),
                        closed.clone(),
                        permit,
                    ));
                }
                Err(_) => {
                    tokio::spawn(refuse(stream));
                }
            }
        }
        let _ = closing.send(true);
        // Every connection gives its permit back once its request is answered.
        let _ = connections.acquire_many(MAX_CONNECTIONS as u32).await;
        Ok(())
    }
}

/// Serves one connection until the client closes it, the header-read
/// timeout closes it, or shutdown lets its request in flight finish.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    mut closing: tokio::sync::watch::Receiver<bool>,
    _permit: OwnedSemaphorePermit,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(router));
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = async { let _ = closing.wait_for(|closing| *closing).await; } => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "http connection ended with an error");
    }
}

/// Tells a connection past the limit to come back later, and closes it.
async fn refuse(mut stream: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        stream.write_all(TOO_MANY_CONNECTIONS).await?;
        stream.shutdown().await?;
        // Closing with the request unread would reset the connection, and
        // the client could lose the answer: read until the client closes.
        let mut unread = [0u8; 1024];
        while stream.read(&mut unread).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}
