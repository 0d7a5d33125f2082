//! The database edge: connecting, migrating, reading desired rows, writing
//! status rows. Everything SQL lives under this module.
//!
//! SQLite runs in WAL mode with a busy timeout so other services can write
//! `desired_containers` while the controller reads and writes; PostgreSQL
//! uses a small pool. Both go through sea-orm; the raw sqlx pool is kept for
//! what sea-orm does not cover (PostgreSQL LISTEN).
//!
//! Connections are kept apart by who uses them, so no user can starve
//! another: the reconcilers use the main pool; the JSON API and `/readyz`
//! read through a pool of their own ([`Store::with_own_pool`]); on
//! PostgreSQL the leader lease has one connection of its own and the LISTEN
//! connections a pool of their own, so a lease renewal never queues behind
//! reconciles or API calls.

mod desired;
mod heartbeat;
mod lease;
mod status;
mod users;
mod watch;

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use sea_orm::{
    ConnectionTrait, DatabaseBackend, DatabaseConnection, DbErr, SqlxPostgresConnector,
    SqlxSqliteConnector,
};
use sea_orm_migration::MigratorTrait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::Connection as _;

pub use desired::{DesiredChange, DesiredRow, DesiredUpdate};
pub use heartbeat::ControllerSeen;
pub use status::{StatusPage, StatusWrite};
pub use users::{desired_user_id, UserPage, UserRows};
pub use watch::{StatusSnapshot, StatusWatch, RECHECK};

/// How long a SQLite writer waits for a lock held by another writer.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for a pooled connection before reporting the database unreachable.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections of the main pool (reconciles, the change feed's polls).
const MAIN_CONNECTIONS_PG: u32 = 10;
/// Connections of the main pool on SQLite (one writer at a time anyway).
const MAIN_CONNECTIONS_SQLITE: u32 = 4;
/// Connections of the JSON API's own pool (see [`Store::with_own_pool`]).
pub const API_CONNECTIONS: u32 = 4;
/// LISTEN connections on PostgreSQL: the desired-row feed and the status feed.
const LISTEN_CONNECTIONS: u32 = 2;

/// What went wrong talking to the database.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL could not be understood.
    #[error("database url {url:?} is not valid: {reason}")]
    BadUrl {
        /// The URL with any password removed.
        url: String,
        /// Why.
        reason: String,
    },
    /// Connecting failed.
    #[error("cannot connect to database {url}: {source}")]
    Connect {
        /// The URL with any password removed.
        url: String,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Migrations failed.
    #[error("database migration failed: {0}")]
    Migrate(#[source] DbErr),
    /// A shared read failed (the text of the reader's error).
    #[error("database {operation} failed: {reason}")]
    Shared {
        /// What was being done.
        operation: &'static str,
        /// The reader's error, as text.
        reason: String,
    },
    /// A query failed.
    #[error("database {operation} failed: {source}")]
    Query {
        /// What was being done, e.g. "read of desired row".
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: DbErr,
    },
    /// A status write chose a host port another row already holds.
    #[error("host port {0} is already held by another user's status row")]
    PortTaken(u16),
    /// A write named a user that has no desired row.
    #[error("no desired row for user {0}")]
    NoSuchUser(String),
    /// A value to write was refused before reaching the database.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field at fault.
        field: &'static str,
        /// Why.
        reason: String,
    },
}

impl StoreError {
    pub(crate) fn query(operation: &'static str) -> impl FnOnce(DbErr) -> Self {
        move |source| Self::Query { operation, source }
    }

    /// True for errors worth retrying (the database was unreachable or busy),
    /// false for those a retry cannot fix.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Self::Connect { .. } | Self::Query { .. } | Self::Shared { .. } | Self::PortTaken(_)
        )
    }
}

/// Key of the PostgreSQL advisory lock held while migrating (the bytes of
/// "clawfleet" read as a number; advisory locks are per database).
pub const MIGRATION_LOCK: i64 = 0x0063_6c61_7766_6c65;

/// The migration lock, held by one connection opened for it alone: if the
/// process dies, the session ends and the server releases the lock.
struct MigrationLock(sqlx::PgConnection);

impl MigrationLock {
    async fn acquire(pool: &sqlx::PgPool) -> Result<Self, StoreError> {
        let failed = |source: sqlx::Error| StoreError::Query {
            operation: "migration lock",
            source: DbErr::Custom(source.to_string()),
        };
        let mut conn = sqlx::PgConnection::connect_with(&pool.connect_options())
            .await
            .map_err(failed)?;
        sqlx::query("SELECT pg_advisory_lock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut conn)
            .await
            .map_err(failed)?;
        Ok(Self(conn))
    }

    /// Unlocks and closes; closing alone would release it too.
    async fn release(mut self) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
            .bind(MIGRATION_LOCK)
            .execute(&mut self.0)
            .await;
        let _ = self.0.close().await;
    }
}

/// The database behind clawfleet: desired rows in, status rows out.
#[derive(Clone, Debug)]
pub struct Store {
    db: DatabaseConnection,
    pool: Pool,
    /// PostgreSQL: the lease's own connection (a pool of one).
    lease: Option<DatabaseConnection>,
    /// PostgreSQL: the pool the LISTEN connections come from.
    listen: Option<sqlx::PgPool>,
    /// The shared watchers of status rows (API waiters), woken by status writes.
    watchers: watch::StatusWatchers,
    /// Whether the last status write failed (for readiness).
    writes: std::sync::Arc<WriteHealth>,
}

/// Whether status writes succeed, shared by every clone of a store.
#[derive(Debug, Default)]
struct WriteHealth {
    failing: std::sync::atomic::AtomicBool,
    /// Status writes under way, and when one last began or ended while any
    /// was under way: a write waiting on a lock makes no progress.
    in_flight: std::sync::Mutex<(usize, Option<std::time::Instant>)>,
}

/// A status write under way; its drop records that writes moved on.
pub(crate) struct WriteInFlight(std::sync::Arc<WriteHealth>);

impl Drop for WriteInFlight {
    fn drop(&mut self) {
        let mut in_flight = self.0.in_flight.lock().unwrap_or_else(|e| e.into_inner());
        in_flight.0 = in_flight.0.saturating_sub(1);
        in_flight.1 = (in_flight.0 > 0).then(std::time::Instant::now);
    }
}

/// The raw pool under the sea-orm connection.
#[derive(Clone, Debug)]
pub enum Pool {
    /// SQLite.
    Sqlite(sqlx::SqlitePool),
    /// PostgreSQL.
    Postgres(sqlx::PgPool),
}

/// True for a PostgreSQL URL: a database a group of controllers may share
/// (README "High availability").
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres:") || url.starts_with("postgresql:")
}

/// The file of a SQLite URL (`sqlite://PATH?…`); `None` for another database
/// or an in-memory one. `doctor` looks for it before connecting, since
/// connecting with `mode=rwc` would create it.
pub fn sqlite_file(url: &str) -> Option<PathBuf> {
    if !url.starts_with("sqlite:") {
        return None;
    }
    let options = SqliteConnectOptions::from_str(url).ok()?;
    let path = options.get_filename();
    (!path.as_os_str().is_empty() && path != Path::new(":memory:") && !url.contains(":memory:"))
        .then(|| path.to_owned())
}

/// Query parameters whose name holds one of these (lowercased) carry a secret.
const SECRET_PARAMETER_WORDS: [&str; 7] = [
    "pass",
    "pwd",
    "secret",
    "token",
    "key",
    "auth",
    "credential",
];

/// Removes the secrets from a database URL so it can be shown: the password
/// of the userinfo, and every password-like query parameter (sqlx accepts
/// `?password=`). A URL that cannot be parsed is cut after its scheme.
pub fn redact_url(text: &str) -> String {
    const HIDDEN: &str = "***";
    let Ok(mut url) = url::Url::parse(text) else {
        return match text.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://{HIDDEN}"),
            None if text.contains(['@', '?']) => HIDDEN.to_owned(),
            None => text.to_owned(),
        };
    };
    if url.cannot_be_a_base() && text.contains('@') {
        // `scheme:user:password@host` parses as a path: nothing to keep.
        return format!("{}:{HIDDEN}", url.scheme());
    }
    let mut redacted = false;
    if url.password().is_some() {
        redacted = url.set_password(Some(HIDDEN)).is_ok();
    }
    let secret = |name: &str| {
        let name = name.to_ascii_lowercase();
        SECRET_PARAMETER_WORDS.iter().any(|w| name.contains(w))
    };
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    if pairs.iter().any(|(name, _)| secret(name)) {
        let shown: Vec<(String, String)> = pairs
            .into_iter()
            .map(|(name, value)| {
                let value = if secret(&name) {
                    HIDDEN.to_owned()
                } else {
                    value
                };
                (name, value)
            })
            .collect();
        url.query_pairs_mut().clear().extend_pairs(shown);
        redacted = true;
    }
    // Unchanged URLs are shown as written, not as the parser normalises them.
    if redacted {
        url.to_string()
    } else {
        text.to_owned()
    }
}

impl Store {
    /// Connects to `url` (`sqlite://...` or `postgres://...`). For SQLite the
    /// folder of the database file is created if missing.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let shown = redact_url(url);
        let bad_url = |reason: String| StoreError::BadUrl {
            url: shown.clone(),
            reason,
        };
        let connect_err = |source| StoreError::Connect {
            url: shown.clone(),
            source,
        };
        if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| bad_url(e.to_string()))?
                .journal_mode(SqliteJournalMode::Wal)
                // In WAL mode NORMAL survives an application crash; only an
                // OS crash may lose the last commits, which the next
                // reconcile rewrites anyway.
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(SQLITE_BUSY_TIMEOUT)
                .foreign_keys(true);
            if let Some(dir) = options.get_filename().parent() {
                if !dir.as_os_str().is_empty() && !Path::new(dir).exists() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| bad_url(format!("cannot create {}: {e}", dir.display())))?;
                }
            }
            let pool = SqlitePoolOptions::new()
                .max_connections(MAIN_CONNECTIONS_SQLITE)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options)
                .await
                .map_err(connect_err)?;
            Ok(Self::assemble(Pool::Sqlite(pool), None, None))
        } else if is_postgres_url(url) {
            let options = PgConnectOptions::from_str(url).map_err(|e| bad_url(e.to_string()))?;
            // One direct connection first: a pool only reports "timed out",
            // hiding "connection refused" or "password authentication failed".
            sqlx::PgConnection::connect_with(&options)
                .await
                .map_err(connect_err)?
                .close()
                .await
                .map_err(connect_err)?;
            let pool = PgPoolOptions::new()
                .max_connections(MAIN_CONNECTIONS_PG)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_with(options.clone())
                .await
                .map_err(connect_err)?;
            // Connected when first used: a process that never leads or
            // listens opens none.
            let lease = PgPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_lazy_with(options.clone());
            let listen = PgPoolOptions::new()
                .max_connections(LISTEN_CONNECTIONS)
                .acquire_timeout(ACQUIRE_TIMEOUT)
                .connect_lazy_with(options);
            Ok(Self::assemble(
                Pool::Postgres(pool),
                Some(SqlxPostgresConnector::from_sqlx_postgres_pool(lease)),
                Some(listen),
            ))
        } else {
            Err(bad_url(
                "expected sqlite://PATH or postgres://USER@HOST/DB".into(),
            ))
        }
    }

    fn assemble(
        pool: Pool,
        lease: Option<DatabaseConnection>,
        listen: Option<sqlx::PgPool>,
    ) -> Self {
        Self {
            db: Self::connection_of(&pool),
            pool,
            lease,
            listen,
            watchers: watch::StatusWatchers::default(),
            writes: Default::default(),
        }
    }

    fn connection_of(pool: &Pool) -> DatabaseConnection {
        match pool {
            Pool::Sqlite(p) => SqlxSqliteConnector::from_sqlx_sqlite_pool(p.clone()),
            Pool::Postgres(p) => SqlxPostgresConnector::from_sqlx_postgres_pool(p.clone()),
        }
    }

    /// This store reading and writing through a pool of its own of
    /// `max_connections` (connected when first used), sharing everything
    /// else (the lease and LISTEN connections, the status watchers): what
    /// goes through it can never take a connection from this store's users.
    /// An in-memory SQLite database has one pool only, and is returned as is.
    pub fn with_own_pool(&self, max_connections: u32) -> Self {
        let pool = match &self.pool {
            Pool::Sqlite(_) if self.sqlite_file().is_none() => return self.clone(),
            Pool::Sqlite(p) => Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with((*p.connect_options()).clone()),
            ),
            Pool::Postgres(p) => Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy_with((*p.connect_options()).clone()),
            ),
        };
        Self {
            db: Self::connection_of(&pool),
            pool,
            ..self.clone()
        }
    }

    /// Applies pending migrations and returns the names of those it applied.
    ///
    /// On PostgreSQL the replicas of an HA group start at once: each takes
    /// the advisory lock [`MIGRATION_LOCK`] on a connection of its own
    /// first, so one migrates while the others wait and then find nothing
    /// left to do. (On SQLite the database's write lock serialises writers.)
    pub async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        let lock = match &self.pool {
            Pool::Postgres(pool) => Some(MigrationLock::acquire(pool).await?),
            Pool::Sqlite(_) => None,
        };
        let pending = self.pending_migrations().await?;
        let applied = clawfleet_migration::Migrator::up(&self.db, None)
            .await
            .map_err(StoreError::Migrate);
        if let Some(lock) = lock {
            lock.release().await;
        }
        applied.map(|()| pending)
    }

    /// Names of migrations not yet applied.
    pub async fn pending_migrations(&self) -> Result<Vec<String>, StoreError> {
        let pending = clawfleet_migration::Migrator::get_pending_migrations(&self.db)
            .await
            .map_err(StoreError::Migrate)?;
        Ok(pending.iter().map(|m| m.name().to_owned()).collect())
    }

    /// A cheap round trip, for readiness checks. It reads (on SQLite it
    /// never takes the write lock, which would queue behind the
    /// reconcilers' writes); whether writes succeed is
    /// [`Self::writes_failing`].
    pub async fn ping(&self) -> Result<(), StoreError> {
        let sql = match &self.pool {
            Pool::Postgres(_) => "SELECT 1",
            // Reads the schema page: the file is there and readable.
            Pool::Sqlite(_) => "SELECT count(*) FROM sqlite_master",
        };
        self.db
            .execute_unprepared(sql)
            .await
            .map(drop)
            .map_err(StoreError::query("ping"))
    }

    /// True when the last status write failed (the database is locked,
    /// read-only or away) and none has succeeded since.
    pub fn writes_failing(&self) -> bool {
        self.writes
            .failing
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// True when status writes are under way and none has begun or ended
    /// for longer than `limit`: they wait on a lock another process holds
    /// (SQLite's busy timeout lets a write wait seconds before it fails).
    pub fn writes_stalled(&self, limit: std::time::Duration) -> bool {
        let in_flight = self
            .writes
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        in_flight.0 > 0 && in_flight.1.is_some_and(|since| since.elapsed() > limit)
    }

    /// Marks a status write as under way until the guard drops.
    pub(crate) fn write_in_flight(&self) -> WriteInFlight {
        let mut in_flight = self
            .writes
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        in_flight.0 += 1;
        in_flight.1 = Some(std::time::Instant::now());
        WriteInFlight(self.writes.clone())
    }

    /// Records whether a status write succeeded.
    pub(crate) fn note_write(&self, ok: bool) {
        self.writes
            .failing
            .store(!ok, std::sync::atomic::Ordering::Relaxed);
    }

    /// Announces a status change of `user_id` to its watcher (no-op without one).
    pub(crate) fn announce_status(&self, user_id: &str) {
        self.watchers.announce(user_id);
    }

    /// SQLite or PostgreSQL.
    pub fn backend(&self) -> DatabaseBackend {
        self.db.get_database_backend()
    }

    /// The sea-orm connection.
    pub fn connection(&self) -> &DatabaseConnection {
        &self.db
    }

    /// The raw pool.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// PostgreSQL: the pool LISTEN connections come from, apart from the
    /// others (a LISTEN holds its connection for good).
    pub fn listen_pool(&self) -> Option<&sqlx::PgPool> {
        self.listen.as_ref()
    }

    /// The connection of the leader lease (PostgreSQL: one of its own).
    fn lease_connection(&self) -> &DatabaseConnection {
        self.lease.as_ref().unwrap_or(&self.db)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_status_write_waiting_on_a_lock_shows_as_stalled_until_writes_move_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let url = format!("sqlite://{}/s.db?mode=rwc", dir.path().display());
        let store = Store::connect(&url).await.expect("store");
        let limit = std::time::Duration::from_millis(20);
        assert!(!store.writes_stalled(limit), "no write under way");
        let waiting = store.write_in_flight();
        assert!(!store.writes_stalled(limit), "just begun");
        std::thread::sleep(limit * 2);
        assert!(store.writes_stalled(limit), "waited past the limit");
        let another = store.write_in_flight();
        assert!(!store.writes_stalled(limit), "a write began: progress");
        drop(another);
        std::thread::sleep(limit * 2);
        assert!(store.writes_stalled(limit), "the first still waits");
        drop(waiting);
        assert!(!store.writes_stalled(limit), "none under way");
    }

    #[test]
    fn passwords_are_removed_from_shown_urls() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:5432/clawfleet"),
            "postgres://app:***@db:5432/clawfleet"
        );
        assert_eq!(
            redact_url("sqlite://./data/clawfleet.db?mode=rwc"),
            "sqlite://./data/clawfleet.db?mode=rwc"
        );
        assert_eq!(
            redact_url("postgres://app@db/clawfleet"),
            "postgres://app@db/clawfleet"
        );
    }

    /// Regression: `?password=` (which sqlx accepts) was shown in clear.
    #[test]
    fn password_like_query_parameters_are_removed_from_shown_urls() {
        for (url, secret) in [
            ("postgres://app@db/cf?password=s3cret", "s3cret"),
            (
                "postgres://db/cf?user=app&PASSWORD=s3cret&sslmode=require",
                "s3cret",
            ),
            ("postgres://db/cf?sslpassword=s3cret", "s3cret"),
            ("postgres://db/cf?pwd=s3cret&pass=s3cret2", "s3cret"),
            ("postgres://db/cf?api_token=s3cret", "s3cret"),
            ("postgres://db/cf?secret=s3cret", "s3cret"),
            ("postgres://db/cf?sslkey=s3cret", "s3cret"),
            ("postgres://u:pw1@db/cf?password=s3cret", "pw1"),
            ("postgres://db/cf?password=s%33cret", "s3cret"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} shown as {shown}");
            assert!(!shown.contains("s%33cret"), "{url} shown as {shown}");
            assert!(shown.contains("***"), "{url} shown as {shown}");
        }
        let shown = redact_url("postgres://db/cf?user=app&password=x&sslmode=require");
        assert!(
            shown.contains("user=app") && shown.contains("sslmode=require"),
            "{shown}"
        );
    }

    #[test]
    fn unparseable_urls_are_cut_after_their_scheme() {
        assert_eq!(
            redact_url("postgres://app:s3cret@db:99999/cf"),
            "postgres://***"
        );
        assert_eq!(redact_url("app:s3cret@db"), "app:***");
        assert_eq!(redact_url("not a url"), "not a url");
    }
}
