//! Shared watchers of status rows, for the API's `ensure-running` waiters.
//!
//! Invariants (pinned by the tests below):
//! - a user has at most one watcher, however many callers wait on it: one
//!   task re-reads the row and every waiter of that user sees its reads;
//! - a status write of user A wakes A's watcher only, never B's;
//! - the watcher ends, and its entry is removed, when its last waiter leaves.
//!
//! A watcher re-reads the row when this process writes or deletes it (or a
//! PostgreSQL NOTIFY says another process did) and at least every
//! [`RECHECK`], in case a notification was lost: one read per user, not per
//! waiter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{watch, Notify};

use super::Store;
use crate::status::ContainerStatus;

/// How often a watcher re-reads its row without a notification.
pub const RECHECK: Duration = Duration::from_secs(2);

/// What a watcher last read of one user's status row.
#[derive(Clone, Debug, PartialEq)]
pub enum StatusSnapshot {
    /// The first read has not finished yet.
    NotRead,
    /// The row as read (`None`: the user has no status row).
    Read(Option<Box<ContainerStatus>>),
    /// The last read failed; the driver's text.
    Failed(String),
}

/// The watchers of one process, shared by every clone of a [`Store`] (and
/// by the stores made with [`Store::with_own_pool`]).
#[derive(Clone, Debug)]
pub(crate) struct StatusWatchers {
    inner: Arc<Mutex<HashMap<String, Entry>>>,
    reads: Arc<AtomicU64>,
    recheck: Duration,
}

impl Default for StatusWatchers {
    fn default() -> Self {
        Self::new(RECHECK)
    }
}

#[derive(Debug)]
struct Entry {
    waiters: usize,
    wake: Arc<Notify>,
    latest: watch::Receiver<StatusSnapshot>,
    task: tokio::task::AbortHandle,
}

impl StatusWatchers {
    /// Watchers that re-read at least every `recheck`.
    pub(crate) fn new(recheck: Duration) -> Self {
        Self {
            inner: Arc::default(),
            reads: Arc::default(),
            recheck,
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes `user_id`'s watcher, if it has one.
    pub(crate) fn announce(&self, user_id: &str) {
        if let Some(entry) = self.entries().get(user_id) {
            // A permit is kept when the watcher is reading: it reads again after.
            entry.wake.notify_one();
        }
    }

    /// Users watched right now.
    pub(crate) fn watched(&self) -> usize {
        self.entries().len()
    }

    fn join(&self, store: &Store, user_id: &str) -> StatusWatch {
        let mut entries = self.entries();
        let entry = entries.entry(user_id.to_owned()).or_insert_with(|| {
            let (tx, latest) = watch::channel(StatusSnapshot::NotRead);
            let wake = Arc::new(Notify::new());
            let task = tokio::spawn(refresh(
                store.clone(),
                user_id.to_owned(),
                tx,
                wake.clone(),
                self.clone(),
            ))
            .abort_handle();
            Entry {
                waiters: 0,
                wake,
                latest,
                task,
            }
        });
        entry.waiters += 1;
        StatusWatch {
            user_id: user_id.to_owned(),
            latest: entry.latest.clone(),
            watchers: self.clone(),
        }
    }

    fn leave(&self, user_id: &str) {
        let mut entries = self.entries();
        if let Some(entry) = entries.get_mut(user_id) {
            entry.waiters -= 1;
            if entry.waiters == 0 {
                entry.task.abort();
                entries.remove(user_id);
            }
        }
    }
}

/// Reads `user_id`'s status row now, then at each wake-up or `recheck`,
/// publishing each read that differs from the last.
async fn refresh(
    store: Store,
    user_id: String,
    tx: watch::Sender<StatusSnapshot>,
    wake: Arc<Notify>,
    watchers: StatusWatchers,
) {
    loop {
        let snapshot = match store.status(&user_id).await {
            Ok(status) => StatusSnapshot::Read(status.map(Box::new)),
            Err(e) => StatusSnapshot::Failed(e.to_string()),
        };
        watchers.reads.fetch_add(1, Ordering::Relaxed);
        tx.send_if_modified(|last| {
            let changed = *last != snapshot;
            *last = snapshot;
            changed
        });
        let _ = tokio::time::timeout(watchers.recheck, wake.notified()).await;
    }
}

/// One waiter's view of a user's shared watcher; leaves it on drop.
#[derive(Debug)]
pub struct StatusWatch {
    user_id: String,
    latest: watch::Receiver<StatusSnapshot>,
    watchers: StatusWatchers,
}

impl StatusWatch {
    /// The latest read, marking it seen.
    pub fn latest(&mut self) -> StatusSnapshot {
        self.latest.borrow_and_update().clone()
    }

    /// Waits until a read differs from the one [`Self::latest`] returned last.
    pub async fn changed(&mut self) {
        if self.latest.changed().await.is_err() {
            // The watcher's task cannot end while a waiter holds its entry;
            // should it ever, wait forever rather than spin (callers bound
            // the wait with their deadline).
            std::future::pending::<()>().await;
        }
    }
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.watchers.leave(&self.user_id);
    }
}

impl Store {
    /// Joins (or starts) the shared watcher of `user_id`'s status row; it
    /// reads through this store's connections.
    pub fn watch_status(&self, user_id: &str) -> StatusWatch {
        self.watchers.join(self, user_id)
    }

    /// Users whose status row is watched right now (one watcher each).
    pub fn watched_users(&self) -> usize {
        self.watchers.watched()
    }

    /// Status reads done by watchers since the store was opened.
    pub fn watcher_reads(&self) -> u64 {
        self.watchers.reads.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    async fn store(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}/w.db?mode=rwc", dir.path().display());
        let mut store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        // No periodic re-read during the test: every read is one a write caused.
        store.watchers = StatusWatchers::new(Duration::from_secs(3600));
        store
    }

    async fn next(watch: &mut StatusWatch) -> StatusSnapshot {
        tokio::time::timeout(Duration::from_secs(30), watch.changed())
            .await
            .expect("a read within 30 s");
        watch.latest()
    }

    #[tokio::test]
    async fn waiters_of_one_user_share_one_watcher_and_a_write_wakes_only_that_user() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let mut a1 = store.watch_status("a");
        let mut a2 = store.watch_status("a");
        let mut b = store.watch_status("b");
        assert_eq!(store.watched_users(), 2, "one watcher per user");
        assert_eq!(next(&mut a1).await, StatusSnapshot::Read(None));
        assert_eq!(next(&mut a2).await, StatusSnapshot::Read(None));
        assert_eq!(next(&mut b).await, StatusSnapshot::Read(None));
        assert_eq!(
            store.watcher_reads(),
            2,
            "one read per user, not per waiter"
        );

        store
            .write_status(&ContainerStatus::pending("a", Utc::now()), Utc::now())
            .await
            .unwrap();
        for waiter in [&mut a1, &mut a2] {
            match next(waiter).await {
                StatusSnapshot::Read(Some(s)) => assert_eq!(s.user_id, "a"),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            store.watcher_reads(),
            3,
            "a's write re-read a's row once and b's not at all"
        );

        drop(a1);
        assert_eq!(store.watched_users(), 2, "a still has a waiter");
        drop(a2);
        assert_eq!(
            store.watched_users(),
            1,
            "a's watcher left with its last waiter"
        );
        drop(b);
        assert_eq!(store.watched_users(), 0);
    }
}
