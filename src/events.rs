//! The Docker event watcher: which users' containers just changed.
//!
//! Events are a nudge to reconcile a user, never the truth: the reconcile
//! inspects the container itself. The reader hands each user id to a
//! non-blocking sink and goes straight back to reading, because the engine
//! keeps only its last 256 events and drops a subscriber that does not read
//! within 100 ms. When the stream breaks it reconnects with back-off, asks
//! for events `since` the last one seen, and asks for a full relist (events
//! lost beyond the engine's buffer are found that way).
//!
//! Since every reconnect forces a relist, a flapping stream must not
//! reconnect at once: the back-off ([`ReconnectBackoff`]) grows from 800 ms
//! to at most 30 s, and starts again from 800 ms only after the stream has
//! stayed up for [`QUIET_RESET`] (as kube-runtime's watcher does), never
//! merely because an event arrived.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures::StreamExt;
use tokio::time::Instant;
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

/// An event observer that ignores everything.
pub struct NoEventObserver;

impl EventObserver for NoEventObserver {}

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
    let mut backoff = ReconnectBackoff::new();
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
        loop {
            match stream.next().await {
                Some(Ok(event)) => {
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
        let delay = backoff.next_delay(Instant::now());
        tokio::time::sleep(delay).await;
        info!(
            delay_ms = delay.as_millis() as u64,
            "resubscribing to docker events"
        );
    }
}

/// A stream that stays up this long since its last break counts as healthy
/// again: the next break starts the back-off from its first delay.
pub const QUIET_RESET: Duration = Duration::from_secs(120);
/// First reconnect delay.
pub const FIRST_DELAY: Duration = Duration::from_millis(800);
/// Longest delay before jitter; the jitter adds up to as much again, so no
/// delay exceeds [`MAX_DELAY`].
pub const MAX_BASE_DELAY: Duration = Duration::from_secs(15);
/// Longest reconnect delay, jitter included.
pub const MAX_DELAY: Duration = Duration::from_secs(30);

/// Reconnect delays of the event stream: doubling from 800 ms, jittered,
/// at most [`MAX_DELAY`]; reset only after [`QUIET_RESET`] without a break.
struct ReconnectBackoff {
    delays: backon::ExponentialBackoff,
    last_break: Option<Instant>,
}

impl ReconnectBackoff {
    fn new() -> Self {
        Self {
            delays: Self::fresh(),
            last_break: None,
        }
    }

    fn fresh() -> backon::ExponentialBackoff {
        backon::ExponentialBuilder::default()
            .with_min_delay(FIRST_DELAY)
            .with_max_delay(MAX_BASE_DELAY)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// The delay before reconnecting after a break at `now`.
    fn next_delay(&mut self, now: Instant) -> Duration {
        if self
            .last_break
            .is_some_and(|at| now.saturating_duration_since(at) >= QUIET_RESET)
        {
            self.delays = Self::fresh();
        }
        self.last_break = Some(now);
        self.delays.next().unwrap_or(MAX_DELAY).min(MAX_DELAY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_back_off_starts_again_only_after_a_quiet_period() {
        let start = Instant::now();
        let mut backoff = ReconnectBackoff::new();
        let mut at = start;
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = backoff.next_delay(at);
            assert!(last <= MAX_DELAY, "{last:?}");
            at += last + Duration::from_secs(1);
        }
        assert!(last >= MAX_BASE_DELAY, "grown to the cap: {last:?}");
        // Up for less than the quiet period: no reset.
        at += QUIET_RESET - Duration::from_secs(60);
        assert!(backoff.next_delay(at) >= MAX_BASE_DELAY);
        // Up for the quiet period: back to the first delay.
        at += QUIET_RESET;
        let reset = backoff.next_delay(at);
        assert!(reset >= FIRST_DELAY && reset < FIRST_DELAY * 2, "{reset:?}");
    }
}
