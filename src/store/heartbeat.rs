//! Whether a controller runs for an instance, as readers (`users list`,
//! `users show`, the JSON API) see it: the instance's row in
//! `clawfleet_leases`. On PostgreSQL it is the leader lease (see
//! [`crate::leader`]); on SQLite, where nobody is elected, the controller
//! writes the same row as its heartbeat ([`Store::beat`]). Either way the
//! row says when a controller last wrote (`renewed_at`) and until when it
//! promises to write again (`expires_at`), so a reader needs to know
//! neither the lease time nor the resync period. A stopped controller
//! leaves its row expired, not deleted, so readers can still say since when
//! nobody runs. Times are the database's.

use std::time::Duration;

use chrono::{DateTime, Utc};
use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};

use super::{Store, StoreError};

/// The last a controller of an instance was heard of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ControllerSeen {
    /// When it last wrote its row.
    pub last_seen: DateTime<Utc>,
    /// True when its promise to write again has run out: it stopped, died
    /// or cannot reach the database, so status rows may be out of date.
    pub stale: bool,
}

impl Store {
    /// SQLite: records that `holder`, the controller of `instance`, is
    /// running and will write again within `horizon`; a zero `horizon`
    /// records that it stops. PostgreSQL keeps this row as the leader lease
    /// and refuses the call.
    pub async fn beat(
        &self,
        instance: &str,
        holder: &str,
        horizon: Duration,
    ) -> Result<(), StoreError> {
        if self.backend() != DatabaseBackend::Sqlite {
            return Err(StoreError::Invalid {
                field: "database_url",
                reason: "on PostgreSQL the leader lease is the controller's heartbeat".into(),
            });
        }
        let sql = "
            INSERT INTO clawfleet_leases (instance, holder, acquired_at, renewed_at, expires_at)
            VALUES (?1, ?2, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                    strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?3))
            ON CONFLICT (instance) DO UPDATE
               SET holder = excluded.holder,
                   acquired_at = CASE WHEN clawfleet_leases.holder = excluded.holder
                                      THEN clawfleet_leases.acquired_at ELSE excluded.acquired_at END,
                   renewed_at = excluded.renewed_at,
                   expires_at = excluded.expires_at";
        let ahead = format!("+{:.3} seconds", horizon.as_secs_f64());
        self.connection()
            .execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Sqlite,
                sql,
                [instance.into(), holder.into(), ahead.into()],
            ))
            .await
            .map(drop)
            .map_err(StoreError::query("heartbeat write"))
    }

    /// The last a controller of `instance` was heard of; `None` when none
    /// ever ran against this database.
    pub async fn controller_seen(
        &self,
        instance: &str,
    ) -> Result<Option<ControllerSeen>, StoreError> {
        let backend = self.backend();
        let sql = match backend {
            DatabaseBackend::Postgres => {
                "SELECT EXTRACT(EPOCH FROM renewed_at)::float8 AS last_seen,
                        expires_at <= clock_timestamp() AS stale
                   FROM clawfleet_leases WHERE instance = $1"
            }
            _ => {
                "SELECT (julianday(renewed_at) - 2440587.5) * 86400.0 AS last_seen,
                        julianday(expires_at) <= julianday('now') AS stale
                   FROM clawfleet_leases WHERE instance = ?1"
            }
        };
        let row = self
            .connection()
            .query_one_raw(Statement::from_sql_and_values(
                backend,
                sql,
                [instance.into()],
            ))
            .await
            .map_err(StoreError::query("heartbeat read"))?;
        let Some(row) = row else {
            return Ok(None);
        };
        let read = StoreError::query("heartbeat read");
        let epoch: f64 = row.try_get("", "last_seen").map_err(read)?;
        let stale: bool = row
            .try_get("", "stale")
            .map_err(StoreError::query("heartbeat read"))?;
        let last_seen = DateTime::from_timestamp_millis((epoch * 1000.0).round() as i64)
            .ok_or_else(|| StoreError::Invalid {
                field: "clawfleet_leases.renewed_at",
                reason: format!("{epoch} is not a time"),
            })?;
        Ok(Some(ControllerSeen { last_seen, stale }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn sqlite() -> (Store, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/h.db?mode=rwc", dir.path().display());
        let store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        (store, dir)
    }

    #[tokio::test]
    async fn a_heartbeat_is_fresh_within_its_horizon_and_stale_once_its_controller_stops() {
        let (store, _dir) = sqlite().await;
        assert_eq!(store.controller_seen("default").await.unwrap(), None);
        let before = Utc::now() - chrono::Duration::seconds(1);
        store
            .beat("default", "me", Duration::from_secs(900))
            .await
            .unwrap();
        let seen = store.controller_seen("default").await.unwrap().unwrap();
        assert!(!seen.stale, "{seen:?}");
        assert!(seen.last_seen >= before, "{seen:?} before {before}");
        assert_eq!(store.controller_seen("other").await.unwrap(), None);

        store.beat("default", "me", Duration::ZERO).await.unwrap();
        let stopped = store.controller_seen("default").await.unwrap().unwrap();
        assert!(stopped.stale, "{stopped:?}");
        assert!(stopped.last_seen >= seen.last_seen, "{stopped:?}");
    }

    #[tokio::test]
    async fn a_heartbeat_written_long_ago_is_stale() {
        let (store, _dir) = sqlite().await;
        store
            .connection()
            .execute_unprepared(
                "INSERT INTO clawfleet_leases (instance, holder, acquired_at, renewed_at, expires_at)
                 VALUES ('default', 'gone', '2026-01-01T00:00:00Z', '2026-01-01T00:00:00Z', '2026-01-01T00:15:00Z')",
            )
            .await
            .unwrap();
        let seen = store.controller_seen("default").await.unwrap().unwrap();
        assert!(seen.stale);
        assert_eq!(seen.last_seen.to_rfc3339(), "2026-01-01T00:00:00+00:00");
    }
}
