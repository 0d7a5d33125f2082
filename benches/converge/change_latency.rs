//! Desired-row change → action: how long from another service's `UPDATE` of
//! `desired_containers` to the controller issuing the engine call it asks
//! for, on a real database (SQLite file; PostgreSQL on the test server) and
//! the in-memory engine.
//!
//! T0 is taken just before the `UPDATE` is sent on the writer's own
//! connection (the write's commit is inside the number). Samples alternate
//! users: the first pass stops each user (`state = 'stopped'` → `stop`),
//! the next starts them again (`'running'` → `start`), and so on. A random
//! pause of up to one poll interval before each write keeps the samples from
//! locking onto the feed's poll phase. The feed runs at its production
//! default (poll every 250 ms; PostgreSQL also LISTENs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawfleet::docker::Op;
use clawfleet::feed::FeedOptions;
use clawfleet::store::Store;
use sqlx::Connection;

use crate::latency::Latencies;
use crate::recording::Recording;
use crate::support::{
    insert_users, memory_engine, sim_reconciler, sqlite_store, sqlite_url, Running, Wants,
};

/// How long one sample may wait for its action before it counts as a timeout.
const SAMPLE_LIMIT: Duration = Duration::from_secs(10);

/// Which database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Db {
    /// A SQLite file in a temporary folder.
    Sqlite,
    /// A throwaway database on the test PostgreSQL server.
    Postgres,
}

/// What the measure found.
pub struct ChangeLatency {
    /// Users in the fleet (each flipped in turn).
    pub users: usize,
    /// Every sample.
    pub latencies: Latencies,
    /// Mutating calls other than the expected ones (none expected).
    pub unexpected_calls: usize,
}

/// The admin URL of the test PostgreSQL server.
fn pg_admin_url() -> String {
    std::env::var("CLAWFLEET_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://clawfleet:clawfleet@127.0.0.1:5432/postgres".into())
}

/// A database created on the test server, dropped when this is dropped.
pub struct PgDatabase {
    name: String,
    /// Its URL.
    pub url: String,
}

impl PgDatabase {
    /// Creates one.
    pub async fn create() -> Result<Self, String> {
        let admin = pg_admin_url();
        let name = format!(
            "clawfleet_bench_{}_{}",
            std::process::id(),
            rand::random::<u32>()
        );
        let mut conn = sqlx::PgConnection::connect(&admin)
            .await
            .map_err(|e| format!("PostgreSQL test server unreachable: {e}"))?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .map_err(|e| format!("CREATE DATABASE {name}: {e}"))?;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        let url = format!("{base}/{name}");
        Ok(Self { name, url })
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop may run inside the runtime: use a private one on a thread.
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            runtime.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&pg_admin_url()).await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .ok()
            })
        })
        .join();
    }
}

/// Converges `users` running users on `db`, then takes `samples` row changes.
pub async fn measure(db: Db, users: usize, samples: usize) -> Result<ChangeLatency, String> {
    let dir = tempfile::tempdir().expect("dir");
    let pg = match db {
        Db::Postgres => Some(PgDatabase::create().await?),
        Db::Sqlite => None,
    };
    let url = pg
        .as_ref()
        .map_or_else(|| sqlite_url(&dir), |pg| pg.url.clone());
    let store = match db {
        Db::Sqlite => sqlite_store(&dir).await,
        Db::Postgres => {
            let store = Store::connect(&url).await.map_err(|e| e.to_string())?;
            store.migrate().await.map_err(|e| e.to_string())?;
            store
        }
    };
    sqlx::any::install_default_drivers();
    let mut writer = sqlx::AnyConnection::connect(&url)
        .await
        .map_err(|e| format!("writer connection: {e}"))?;
    insert_users(&store, 0, users, Wants::Running).await;
    let memory = Arc::new(memory_engine());
    let (engine, mut calls) = Recording::new(memory.clone());
    let controller = Running::start(
        &store,
        sim_reconciler(&store, Arc::new(engine), "bench-changes"),
    );
    controller
        .until_settled(
            "the change fleet to converge",
            users,
            users,
            Duration::from_secs(600),
        )
        .await;
    calls.drain();
    let ids: Vec<String> = (0..users)
        .map(|i| {
            let name = clawfleet::naming::container_name("mosaic-user-", &format!("u{i}"));
            memory.container(&name).expect("container").id
        })
        .collect();

    let poll = FeedOptions::default().poll_interval;
    let mut latencies = Latencies::default();
    let mut unexpected_calls = 0;
    let mut running = users;
    for sample in 0..samples {
        let user = sample % users;
        let (state, op) = if (sample / users).is_multiple_of(2) {
            ("stopped", Op::Stop)
        } else {
            ("running", Op::Start)
        };
        let pause = rand::random_range(0..poll.as_micros() as u64);
        tokio::time::sleep(Duration::from_micros(pause)).await;
        let t0 = Instant::now();
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "UPDATE desired_containers SET state = '{state}' WHERE user_id = 'u{user}'"
        )))
        .execute(&mut writer)
        .await
        .map_err(|e| format!("UPDATE: {e}"))?;
        let (at, others) = calls.wait_for(op, &ids[user], SAMPLE_LIMIT).await;
        unexpected_calls += others.len();
        match at {
            Some(at) => latencies.push(at - t0),
            None => latencies.push_timeout(),
        }
        running = if op == Op::Stop {
            running - 1
        } else {
            running + 1
        };
        controller
            .until_settled(
                "the fleet to settle after a row change",
                users,
                running,
                Duration::from_secs(60),
            )
            .await;
        unexpected_calls += calls.drain();
        if (sample + 1) % 50 == 0 {
            eprintln!("bench:   {} of {samples} row changes", sample + 1);
        }
    }
    controller.stop().await;
    drop(writer);
    drop(store);
    drop(pg);
    Ok(ChangeLatency {
        users,
        latencies,
        unexpected_calls,
    })
}
