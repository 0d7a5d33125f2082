//! The Docker event watcher: which users' containers just changed.
//!
//! Events are a nudge to reconcile a user, never the truth: the reconcile
//! inspects the container itself. The reader hands each user id to a
//! non-blocking sink and goes straight back to reading, because the engine
//! keeps only its last 256 events and drops a subscriber that does not read
//! within 100 ms. When the stream breaks it reconnects with back-off, asks
//! for events `since` the last one seen, and asks for a full relist (events
//! lost beyond the engine's buffer are found that way).

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures::StreamExt;
use tracing::{info, warn};

use crate::docker::{ContainerFilter, Engine, EngineEvent};

/// What the watcher reports besides user ids.
pub trait EventObserver: Send + Sync {
    /// An event arrived.
    fn event(&self, _event: &EngineEvent) {}
    /// The stream is connected (true) or broken (false).
    fn connected(&self, _connected: bool) {}
    /// A broken stream was re-established; anything may have been missed.
    fn reconnected(&self) {}
}

/// An observer that ignores everything.
pub struct NoObserver;

impl EventObserver for NoObserver {}

/// Watches managed containers of `instance` from `since_nanos` on, forever,
/// handing each event's user id to `sink`.
pub async fn run<E, F>(
    engine: Arc<E>,
    instance: String,
    since_nanos: Option<i64>,
    observer: Arc<dyn EventObserver>,
    sink: F,
) where
    E: Engine,
    F: Fn(String) + Send + Sync + 'static,
{
    let filter = ContainerFilter {
        instance,
        user_id: None,
    };
    let mut since = since_nanos;
    let mut backoff = reconnect_backoff();
    let mut first = true;
    loop {
        let mut stream = engine.events(&filter, since);
        // The subscription is only known to be broken when it fails; until
        // then it counts as connected.
        observer.connected(true);
        if !first {
            observer.reconnected();
        }
        first = false;
        let mut healthy = false;
        loop {
            match stream.next().await {
                Some(Ok(event)) => {
                    if !healthy {
                        healthy = true;
                        backoff = reconnect_backoff();
                    }
                    since = Some(event.time_nanos);
                    observer.event(&event);
                    // A health check runs as an exec every few seconds; its
                    // exec_* events say nothing about the container (its
                    // result comes as `health_status`).
                    if !event.action.starts_with("exec_") {
                        if let Some(user) = event.user_id {
                            sink(user);
                        }
                    }
                }
                Some(Err(e)) => {
                    warn!(error = %e, "docker event stream broke; reconnecting");
                    break;
                }
                None => {
                    warn!("docker event stream ended; reconnecting");
                    break;
                }
            }
        }
        observer.connected(false);
        let delay = backoff.next().unwrap_or(Duration::from_secs(10));
        tokio::time::sleep(delay).await;
        info!(
            delay_ms = delay.as_millis() as u64,
            "resubscribing to docker events"
        );
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}
