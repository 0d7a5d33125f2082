//! Who reconciles: exactly one `clawfleet run` per instance.
//!
//! On PostgreSQL several processes (hosts) may run for one instance; they
//! elect a leader through a lease row (`clawfleet_leases`): the holder renews
//! it every third of its time-to-live, and a standby takes it once it has
//! expired by the database's clock. We chose a lease over advisory locks
//! because an advisory lock lives as long as its session: a leader cut off
//! from the database cannot know when the server notices the dead session and
//! hands the lock to a standby, so it cannot stop acting in time. With a
//! lease the leader knows: its lease cannot be taken before `ttl` after the
//! last renewal it sent, so it stops acting after two thirds of `ttl` without
//! a successful renewal, well before a standby may take over.
//!
//! On SQLite there is one process per database file: an exclusive lock on a
//! file next to the database refuses a second `run` with a clear message.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use crate::store::Store;

/// A term of leadership: the lease was granted on a request sent at `since`.
#[derive(Clone, Copy, Debug)]
pub struct Term {
    since: Instant,
}

/// Why leadership ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lost {
    /// Another process holds the lease now.
    TakenOver,
    /// Renewals failed (database unreachable) long enough that the lease
    /// might soon expire.
    RenewalsFailed,
}

/// Elects the leader of one instance through the lease row.
pub struct Elector {
    store: Store,
    instance: String,
    holder: String,
    ttl: Duration,
}

impl Elector {
    /// An elector for `instance`, naming this process `holder`.
    pub fn new(store: Store, instance: &str, holder: &str, ttl: Duration) -> Self {
        Self {
            store,
            instance: instance.to_owned(),
            holder: holder.to_owned(),
            ttl,
        }
    }

    /// This process's name in the lease.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Waits until this process holds the lease.
    pub async fn acquire(&self) -> Term {
        let mut last_seen: Option<String> = None;
        loop {
            let since = Instant::now();
            match self
                .store
                .acquire_lease(&self.instance, &self.holder, self.ttl)
                .await
            {
                Ok(true) => return Term { since },
                Ok(false) => {
                    let holder = self
                        .store
                        .lease_holder(&self.instance)
                        .await
                        .ok()
                        .flatten()
                        .map(|(h, _)| h);
                    if holder != last_seen {
                        info!(
                            leader = holder.as_deref().unwrap_or("?"),
                            "standby: another process leads this instance"
                        );
                        last_seen = holder;
                    }
                }
                Err(e) => warn!(error = %e, "standby: cannot reach the lease; retrying"),
            }
            tokio::time::sleep(self.ttl / 5).await;
        }
    }

    /// Keeps renewing the lease; resolves at the moment this process must stop acting.
    pub async fn hold(&self, term: Term) -> Lost {
        let mut valid_from = term.since;
        loop {
            let stop_at = valid_from + self.ttl * 2 / 3;
            let renew_at = (Instant::now() + self.ttl / 3).min(stop_at);
            tokio::time::sleep_until(renew_at).await;
            if Instant::now() >= stop_at {
                return Lost::RenewalsFailed;
            }
            let sent = Instant::now();
            match tokio::time::timeout_at(
                stop_at,
                self.store
                    .acquire_lease(&self.instance, &self.holder, self.ttl),
            )
            .await
            {
                Ok(Ok(true)) => valid_from = sent,
                Ok(Ok(false)) => return Lost::TakenOver,
                Ok(Err(e)) => warn!(error = %e, "lease renewal failed; retrying"),
                Err(_) => return Lost::RenewalsFailed,
            }
        }
    }

    /// The election loop, as controller-runtime's Manager runs it: waits for
    /// the lease, then runs `lead(stopping())` for as long as the term holds.
    /// When `lead` returns (graceful stop) the lease is released and the loop
    /// ends; when the term is lost, `lead`'s future is dropped at once (every
    /// reconcile in flight is aborted, since a standby may take over soon and
    /// must find nobody acting) and the process stands by for the next term.
    /// A standby returns as soon as `stopping()` resolves.
    pub async fn lead_while_elected<S, L>(
        &self,
        stopping: impl Fn() -> S,
        mut lead: impl FnMut(S) -> L,
    ) where
        S: Future<Output = ()>,
        L: Future<Output = ()>,
    {
        loop {
            let term = tokio::select! {
                term = self.acquire() => term,
                () = stopping() => return,
            };
            info!(holder = %self.holder, "became leader: reconciling");
            let mut term_work = std::pin::pin!(lead(stopping()));
            tokio::select! {
                () = &mut term_work => {
                    self.release().await;
                    info!("lease released");
                    return;
                }
                lost = self.hold(term) => match lost {
                    Lost::TakenOver => warn!("lost the lease to another process: standing by"),
                    Lost::RenewalsFailed => warn!("cannot renew the lease (database unreachable?): stopped reconciling before it can expire; standing by"),
                },
            }
        }
    }

    /// Gives the lease up at once (graceful shutdown), so a standby need not wait for it to expire.
    pub async fn release(&self) {
        if let Err(e) = self.store.release_lease(&self.instance, &self.holder).await {
            warn!(error = %e, "could not release the lease; a standby takes over when it expires");
        }
    }
}

/// The name this process goes by in the lease: host name, process id and a random tag.
pub fn default_holder() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!(
        "{host}-{}-{:04x}",
        std::process::id(),
        rand::random::<u16>()
    )
}

/// Another process already runs against this SQLite file.
#[derive(Debug, thiserror::Error)]
#[error("another `clawfleet run` is using {database}: SQLite runs are single-instance (lock {lock}); stop it, or use PostgreSQL to run several")]
pub struct AlreadyRunning {
    /// The database file.
    pub database: PathBuf,
    /// The lock file.
    pub lock: PathBuf,
}

/// An exclusive lock on a SQLite database's companion lock file, held for the life of the process.
#[derive(Debug)]
pub struct SqliteLock {
    _file: File,
}

impl SqliteLock {
    /// Locks `<database>.clawfleet.lock`, or says who holds it.
    pub fn acquire(database: &Path) -> Result<Self, AlreadyRunning> {
        let lock = PathBuf::from(format!("{}.clawfleet.lock", database.display()));
        let busy = || AlreadyRunning {
            database: database.to_path_buf(),
            lock: lock.clone(),
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock)
            .map_err(|_| busy())?;
        file.try_lock().map_err(|_| busy())?;
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_on_one_sqlite_file_is_refused_with_a_clear_message() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("clawfleet.db");
        let first = SqliteLock::acquire(&db).unwrap();
        let err = SqliteLock::acquire(&db).unwrap_err();
        assert!(err.to_string().contains("single-instance"), "{err}");
        drop(first);
        assert!(
            SqliteLock::acquire(&db).is_ok(),
            "released with the process"
        );
    }

    #[tokio::test]
    async fn a_standby_that_never_gets_the_lease_stops_at_shutdown_without_leading() {
        // SQLite keeps no lease: every attempt fails, as with an unreachable database.
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/l.db?mode=rwc", dir.path().display());
        let store = Store::connect(&url).await.unwrap();
        // Virtual time from here: the standby's retries and the shutdown timer.
        tokio::time::pause();
        let elector = Elector::new(store, "test", "standby", Duration::from_secs(3));
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let stopping = || {
            let mut stopped = stopped.clone();
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            }
        };
        let mut terms = 0;
        let election = elector.lead_while_elected(stopping, |_stop| {
            terms += 1;
            std::future::ready(())
        });
        let shutdown = async {
            tokio::time::sleep(Duration::from_secs(10)).await;
            stop.send(true).unwrap();
        };
        tokio::join!(election, shutdown);
        assert_eq!(terms, 0, "led without the lease");
    }

    #[test]
    fn holders_are_unique_per_process_start() {
        assert_ne!(default_holder(), default_holder());
    }
}
