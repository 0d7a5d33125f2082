//! Shared helpers of the integration tests: throwaway databases on SQLite and
//! PostgreSQL, raw SQL as another service would write it.
//!
//! PostgreSQL tests need a server: `CLAWFLEET_TEST_PG_URL` (default
//! `postgres://clawfleet:clawfleet@127.0.0.1:5432/postgres`, what `.ci/run`
//! sets up) must name a role allowed to create databases. They fail, never
//! skip, when it is unreachable.

#![allow(dead_code)]

pub mod controller;
pub mod docker;
pub mod fleet;
pub mod http;
pub mod tcp_proxy;

use std::sync::atomic::{AtomicUsize, Ordering};

use clawfleet::store::Store;
use sqlx::{AnyConnection, Connection as _};

/// Default admin URL of the test PostgreSQL server.
pub const DEFAULT_PG_URL: &str = "postgres://clawfleet:clawfleet@127.0.0.1:5432/postgres";

/// The two databases clawfleet runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// SQLite file in a temporary folder.
    Sqlite,
    /// A fresh database on the test PostgreSQL server.
    Postgres,
}

/// A throwaway database, removed when dropped.
pub struct TestDb {
    /// Which backend.
    pub backend: Backend,
    /// URL clawfleet connects with.
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_name: Option<String>,
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn unique(tag: &str) -> String {
    format!(
        "{tag}_{}_{}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        chrono::Utc::now().timestamp_micros() % 1_000_000
    )
}

/// Admin URL of the test PostgreSQL server.
pub fn pg_admin_url() -> String {
    std::env::var("CLAWFLEET_TEST_PG_URL").unwrap_or_else(|_| DEFAULT_PG_URL.to_owned())
}

/// The URL of database `db` on the test server.
pub fn pg_url_for(db: &str) -> String {
    let admin = pg_admin_url();
    let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
    format!("{base}/{db}")
}

impl TestDb {
    /// A new empty database of `backend`.
    pub async fn new(backend: Backend) -> Self {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().expect("temp dir");
                let url = format!("sqlite://{}/clawfleet.db?mode=rwc", dir.path().display());
                Self {
                    backend,
                    url,
                    _dir: Some(dir),
                    pg_name: None,
                }
            }
            Backend::Postgres => {
                sqlx::any::install_default_drivers();
                let name = unique("clawfleet_test");
                let mut admin = AnyConnection::connect(&pg_admin_url()).await.unwrap_or_else(|e| {
                    panic!(
                        "PostgreSQL test server unreachable at {} ({e}); run .ci/run or set CLAWFLEET_TEST_PG_URL",
                        pg_admin_url()
                    )
                });
                sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .expect("create test database");
                Self {
                    backend,
                    url: pg_url_for(&name),
                    _dir: None,
                    pg_name: Some(name),
                }
            }
        }
    }

    /// A migrated store on this database.
    pub async fn store(&self) -> Store {
        let store = Store::connect(&self.url).await.expect("connect");
        store.migrate().await.expect("migrate");
        store
    }

    /// A raw connection, as another service would open.
    pub async fn raw(&self) -> AnyConnection {
        sqlx::any::install_default_drivers();
        AnyConnection::connect(&self.url)
            .await
            .expect("raw connection")
    }

    /// Runs one SQL statement on a raw connection.
    pub async fn exec(&self, sql: &str) {
        let mut conn = self.raw().await;
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_owned()))
            .execute(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let Some(name) = self.pg_name.take() else {
            return;
        };
        // Drop runs outside any runtime guarantee: use a private one on a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut admin = AnyConnection::connect(&pg_admin_url()).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut admin)
                .await
                .ok()
            })
        })
        .join();
    }
}
