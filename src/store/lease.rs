//! The leader lease on PostgreSQL: one row per instance naming the process
//! that may reconcile and until when. Times are the database's, so the
//! hosts' clocks never have to agree. Every lease query goes through the
//! lease's own connection, so a renewal never waits for a pooled one.

use std::time::Duration;

use sea_orm::{ConnectionTrait, DatabaseBackend, Statement};

use super::{Store, StoreError};

impl Store {
    /// Takes the lease of `instance` for `holder` (or renews it if `holder`
    /// already has it) for `ttl`, unless another holder's lease is still
    /// valid. True when `holder` holds it afterwards.
    pub async fn acquire_lease(
        &self,
        instance: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        if self.backend() != DatabaseBackend::Postgres {
            return Err(StoreError::Invalid {
                field: "database_url",
                reason: "leases are kept on PostgreSQL only; SQLite runs are single-instance"
                    .into(),
            });
        }
        let sql = "
            INSERT INTO clawfleet_leases (instance, holder, acquired_at, renewed_at, expires_at)
            VALUES ($1, $2, clock_timestamp(), clock_timestamp(), clock_timestamp() + make_interval(secs => $3))
            ON CONFLICT (instance) DO UPDATE
               SET holder = EXCLUDED.holder,
                   acquired_at = CASE WHEN clawfleet_leases.holder = EXCLUDED.holder
                                      THEN clawfleet_leases.acquired_at ELSE clock_timestamp() END,
                   renewed_at = clock_timestamp(),
                   expires_at = EXCLUDED.expires_at
             WHERE clawfleet_leases.holder = EXCLUDED.holder
                OR clawfleet_leases.expires_at < clock_timestamp()
            RETURNING holder";
        let row = self
            .lease_connection()
            .query_one_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                sql,
                [instance.into(), holder.into(), ttl.as_secs_f64().into()],
            ))
            .await
            .map_err(StoreError::query("lease acquisition"))?;
        Ok(row.is_some())
    }

    /// Gives up `holder`'s lease of `instance` at once (graceful shutdown),
    /// so a standby takes over without waiting for the expiry. The row is
    /// left expired rather than deleted: readers still learn when a
    /// controller last ran (see `controller_seen`).
    pub async fn release_lease(&self, instance: &str, holder: &str) -> Result<(), StoreError> {
        if self.backend() != DatabaseBackend::Postgres {
            return Ok(());
        }
        self.lease_connection()
            .execute_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "UPDATE clawfleet_leases SET expires_at = clock_timestamp()
                  WHERE instance = $1 AND holder = $2",
                [instance.into(), holder.into()],
            ))
            .await
            .map(drop)
            .map_err(StoreError::query("lease release"))
    }

    /// Who holds the lease of `instance`, and for how many more seconds (negative: expired).
    pub async fn lease_holder(&self, instance: &str) -> Result<Option<(String, f64)>, StoreError> {
        if self.backend() != DatabaseBackend::Postgres {
            return Ok(None);
        }
        let row = self
            .lease_connection()
            .query_one_raw(Statement::from_sql_and_values(
                DatabaseBackend::Postgres,
                "SELECT holder, EXTRACT(EPOCH FROM (expires_at - clock_timestamp()))::float8 AS remaining
                   FROM clawfleet_leases WHERE instance = $1",
                [instance.into()],
            ))
            .await
            .map_err(StoreError::query("lease read"))?;
        Ok(row.and_then(|r| {
            Some((
                r.try_get("", "holder").ok()?,
                r.try_get("", "remaining").ok()?,
            ))
        }))
    }

    /// The SQLite database file, when this store is a SQLite file.
    pub fn sqlite_file(&self) -> Option<std::path::PathBuf> {
        match &self.pool {
            super::Pool::Sqlite(pool) => {
                let options = pool.connect_options();
                let path = options.get_filename();
                (!path.as_os_str().is_empty() && path.to_str() != Some(":memory:"))
                    .then(|| path.to_path_buf())
            }
            super::Pool::Postgres(_) => None,
        }
    }
}
