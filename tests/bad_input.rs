//! Hostile rows written by raw SQL, as a careless or malicious service might:
//! each one is reported `failed` with a message naming the field, every other
//! user converges, SQL-looking ids are just ids, and the controller never
//! panics.

mod support;

use std::time::Duration;

use clawfleet::status::Phase;
use support::controller::{wait_for_status, wait_running, ControllerConfig, ControllerProcess};
use support::docker::DockerFixture;
use support::{Backend, TestDb};

const LONG: Duration = Duration::from_secs(180);

/// (user id, SQL inserting it, the field its message must name).
fn hostile_rows(backend: Backend) -> Vec<(String, String, &'static str)> {
    let long_id = "x".repeat(10 * 1024);
    let long_image = format!("{}:1", "a".repeat(500));
    let mut rows = vec![
        ("shout".to_owned(), "INSERT INTO desired_containers (user_id, state) VALUES ('shout', 'RUNNING')".to_owned(), "state"),
        ("banana".into(), "INSERT INTO desired_containers (user_id, state) VALUES ('banana', 'banana')".into(), "state"),
        ("empty-state".into(), "INSERT INTO desired_containers (user_id, state) VALUES ('empty-state', '')".into(), "state"),
        (long_id.clone(), format!("INSERT INTO desired_containers (user_id) VALUES ('{long_id}')"), "user_id"),
        ("neg".into(), "INSERT INTO desired_containers (user_id, idle_timeout_secs) VALUES ('neg', -30)".into(), "idle_timeout_secs"),
        ("huge".into(), "INSERT INTO desired_containers (user_id, idle_timeout_secs) VALUES ('huge', 99999999999)".into(), "idle_timeout_secs"),
        ("dots".into(), "INSERT INTO desired_containers (user_id, image) VALUES ('dots', '../../etc/passwd')".into(), "image"),
        ("upper".into(), "INSERT INTO desired_containers (user_id, image) VALUES ('upper', 'Alpine/OpenClaw:Latest')".into(), "image"),
        ("long-image".into(), format!("INSERT INTO desired_containers (user_id, image) VALUES ('long-image', '{long_image}')"), "image"),
    ];
    if backend == Backend::Sqlite {
        // Only SQLite stores what its column types do not allow.
        rows.extend([
            ("nul".to_owned(), "INSERT INTO desired_containers (user_id, state) VALUES ('nul', 'run' || char(0) || 'ning')".to_owned(), "state"),
            ("nul\0id".into(), "INSERT INTO desired_containers (user_id) VALUES ('nul' || char(0) || 'id')".into(), "user_id"),
            ("overflow".into(), "INSERT INTO desired_containers (user_id, idle_timeout_secs) VALUES ('overflow', 99999999999999999999999999)".into(), "idle_timeout_secs"),
            ("text-timeout".into(), "INSERT INTO desired_containers (user_id, idle_timeout_secs) VALUES ('text-timeout', '30 minutes')".into(), "idle_timeout_secs"),
            ("broken-time".into(), "INSERT INTO desired_containers (user_id, idle_timeout_secs, last_active_at) VALUES ('broken-time', 60, '2026-02-30T25:61:00Z')".into(), "last_active_at"),
            ("word-time".into(), "INSERT INTO desired_containers (user_id, last_active_at) VALUES ('word-time', 'yesterday')".into(), "last_active_at"),
            ("blob-image".into(), "INSERT INTO desired_containers (user_id, image) VALUES ('blob-image', X'00ff')".into(), "image"),
        ]);
    }
    rows
}

async fn hostile_rows_fail_alone(backend: Backend) {
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let fx = DockerFixture::new("hostile");
    let mut controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    let rows = hostile_rows(backend);
    // SQL-looking ids are ordinary ids: stored with quotes escaped, like any writer would.
    let sneaky = [
        "'; DROP TABLE desired_containers; --",
        "1 OR 1=1",
        "robert\"); --",
    ];
    for (_, sql, _) in &rows {
        db.exec(sql).await;
    }
    for id in sneaky {
        db.exec(&format!(
            "INSERT INTO desired_containers (user_id) VALUES ('{}')",
            id.replace('\'', "''")
        ))
        .await;
    }
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('fine1'), ('fine2')")
        .await;

    for (user, _, field) in &rows {
        let status =
            wait_for_status(&store, user, LONG, "failed", |s| s.phase == Phase::Failed).await;
        let message = status.message.unwrap_or_default();
        assert!(
            message.contains(field),
            "{backend:?} {}: {message}",
            &user[..user.len().min(20)]
        );
        assert!(message.len() < 1024, "a 10 KB value is not echoed whole");
        assert!(status.container_id.is_none(), "no container for a bad row");
    }
    for user in sneaky.iter().copied().chain(["fine1", "fine2"]) {
        wait_running(&store, user).await;
    }
    assert_eq!(
        store.desired_all().await.unwrap().len(),
        rows.len() + sneaky.len() + 2,
        "nothing dropped"
    );
    let status = controller.terminate();
    assert!(status.success(), "{status}");
    let log = controller.log();
    assert!(!log.contains("panicked"), "the controller panicked:\n{log}");
}

#[tokio::test]
async fn hostile_rows_fail_alone_on_sqlite() {
    hostile_rows_fail_alone(Backend::Sqlite).await;
}

#[tokio::test]
async fn hostile_rows_fail_alone_on_postgres() {
    hostile_rows_fail_alone(Backend::Postgres).await;
}
