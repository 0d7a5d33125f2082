//! The controller's heartbeat on SQLite: how `users list`, `users show` and
//! the JSON API know whether a controller still runs, so they never show an
//! old status as if it were current (README "The tables").
//!
//! PostgreSQL needs none: the leader lease row is renewed every third of the
//! lease time and says the same. SQLite elects nobody, so the controller
//! writes that row itself: once at start, then every resync period, each
//! time promising the next write within [`STALE_AFTER_PERIODS`] periods, and
//! at a graceful stop it marks the row expired at once. Readers compare the
//! promise with the database's clock (see [`crate::store::ControllerSeen`]),
//! so they need not know the resync period.

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use tracing::warn;

use crate::store::Store;

/// How many resync periods without a heartbeat make the status stale.
pub const STALE_AFTER_PERIODS: u32 = 3;

/// Writes the heartbeat of one instance's controller.
pub struct Heartbeat {
    store: Store,
    instance: String,
    holder: String,
    period: Duration,
}

impl Heartbeat {
    /// The heartbeat of `instance`'s controller `holder`, beating every
    /// `resync_period`.
    pub fn new(store: Store, instance: &str, holder: &str, resync_period: Duration) -> Self {
        Self {
            store,
            instance: instance.to_owned(),
            holder: holder.to_owned(),
            period: resync_period,
        }
    }

    /// How long after its last beat the controller counts as gone.
    pub fn horizon(&self) -> Duration {
        self.period * STALE_AFTER_PERIODS
    }

    /// Beats while `work` runs, then records the stop; returns `work`'s output.
    pub async fn beat_while<T>(&self, work: impl Future<Output = T>) -> T {
        let out = tokio::select! {
            out = work => out,
            never = self.beat_forever() => match never {},
        };
        self.beat(Duration::ZERO).await;
        out
    }

    async fn beat_forever(&self) -> Infallible {
        loop {
            self.beat(self.horizon()).await;
            tokio::time::sleep(self.period).await;
        }
    }

    async fn beat(&self, horizon: Duration) {
        if let Err(e) = self.store.beat(&self.instance, &self.holder, horizon).await {
            warn!(error = %e, "could not write the controller heartbeat; readers may call the status stale");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_running_controller_keeps_its_heartbeat_fresh_and_marks_it_stale_when_it_stops() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/h.db?mode=rwc", dir.path().display());
        let store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        let heartbeat = Heartbeat::new(store.clone(), "default", "me", Duration::from_secs(60));
        assert_eq!(heartbeat.horizon(), Duration::from_secs(180));
        let seen_while_running = heartbeat
            .beat_while(async {
                // The first beat is written before the work gets far.
                loop {
                    if let Some(seen) = store.controller_seen("default").await.unwrap() {
                        break seen;
                    }
                    tokio::task::yield_now().await;
                }
            })
            .await;
        assert!(!seen_while_running.stale, "{seen_while_running:?}");
        let after = store.controller_seen("default").await.unwrap().unwrap();
        assert!(
            after.stale,
            "a stopped controller is stale at once: {after:?}"
        );
    }
}
