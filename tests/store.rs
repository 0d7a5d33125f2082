//! The tables as other services see them: rows written by raw SQL on SQLite
//! and PostgreSQL, revisions assigned by the database, deletions logged,
//! bad rows reported by field without hiding the good ones.

mod support;

use std::collections::HashSet;

use chrono::{TimeZone, Utc};
use clawfleet::desired::{DesiredState, InvalidRow};
use clawfleet::status::{ContainerStatus, Health, Phase};
use clawfleet::store::{DesiredRow, DesiredUpdate, StoreError};
use support::{Backend, TestDb};

const BOTH: [Backend; 2] = [Backend::Sqlite, Backend::Postgres];

async fn revision_of(db: &TestDb, user: &str) -> i64 {
    let mut conn = db.raw().await;
    sqlx::query_scalar::<_, i64>("SELECT revision FROM desired_containers WHERE user_id = $1")
        .bind(user)
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

fn expect_valid(row: Option<DesiredRow>) -> clawfleet::desired::DesiredContainer {
    row.expect("row exists").expect("row is valid")
}

fn expect_invalid(row: Option<DesiredRow>) -> InvalidRow {
    row.expect("row exists").expect_err("row is invalid")
}

#[tokio::test]
async fn every_insert_and_update_by_raw_sql_raises_the_revision() {
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let _store = db.store().await;
        db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice')")
            .await;
        let r1 = revision_of(&db, "alice").await;
        db.exec("INSERT INTO desired_containers (user_id) VALUES ('bob')")
            .await;
        let r2 = revision_of(&db, "bob").await;
        db.exec("UPDATE desired_containers SET state = 'stopped' WHERE user_id = 'alice'")
            .await;
        let r3 = revision_of(&db, "alice").await;
        db.exec("UPDATE desired_containers SET restart_nonce = restart_nonce + 1 WHERE user_id = 'alice'").await;
        let r4 = revision_of(&db, "alice").await;
        assert!(
            r1 > 0 && r1 < r2 && r2 < r3 && r3 < r4,
            "{backend:?}: {r1} {r2} {r3} {r4}"
        );
        // An update that changes nothing is still a write, and still bumps.
        db.exec("UPDATE desired_containers SET state = state WHERE user_id = 'bob'")
            .await;
        assert!(revision_of(&db, "bob").await > r4, "{backend:?}");
    }
}

#[tokio::test]
async fn a_writer_cannot_choose_the_revision() {
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let _store = db.store().await;
        db.exec("INSERT INTO desired_containers (user_id, revision) VALUES ('alice', 1000)")
            .await;
        let r = revision_of(&db, "alice").await;
        assert!(r < 1000, "{backend:?}: insert kept the writer's revision");
        let mut conn = db.raw().await;
        let result =
            sqlx::query("UPDATE desired_containers SET revision = 5000 WHERE user_id = 'alice'")
                .execute(&mut conn)
                .await;
        let after = revision_of(&db, "alice").await;
        // SQLite refuses the write; PostgreSQL replaces the value with the next one.
        assert!(
            result.is_err() || (after > r && after < 5000),
            "{backend:?}: {result:?} {after}"
        );
    }
}

#[tokio::test]
async fn an_update_keeping_the_counters_last_revision_still_reaches_the_feed() {
    // Regression: SQLite's guard accepted `revision = <current counter
    // value>`, so a writer could change a row under a revision the feed had
    // already seen, and the change went unnoticed until the next resync.
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice'), ('bob')")
            .await;
        let seen = store.max_revision().await.unwrap();
        let counter = match backend {
            Backend::Sqlite => "(SELECT value FROM clawfleet_revision WHERE id = 1)",
            Backend::Postgres => "(SELECT last_value FROM clawfleet_revision_seq)",
        };
        let mut conn = db.raw().await;
        let result = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE desired_containers SET state = 'stopped', revision = {counter} \
             WHERE user_id = 'alice'"
        )))
        .execute(&mut conn)
        .await;
        let alice = expect_valid(store.desired("alice").await.unwrap());
        let changes = store.desired_changes(seen, &[], 100).await.unwrap();
        match result {
            // Refused: nothing changed, so there is nothing to see.
            Err(_) => assert_eq!(alice.state, DesiredState::Running, "{backend:?}"),
            Ok(_) => {
                assert_eq!(alice.state, DesiredState::Stopped, "{backend:?}");
                assert!(
                    alice.revision > seen,
                    "{backend:?}: {} <= {seen}",
                    alice.revision
                );
                assert!(
                    changes.iter().any(|c| c.user_id == "alice"),
                    "{backend:?}: the feed misses the change: {changes:?}"
                );
            }
        }
        // Ordinary writes go on as before.
        db.exec("UPDATE desired_containers SET state = 'stopped' WHERE user_id = 'bob'")
            .await;
        assert!(revision_of(&db, "bob").await > seen, "{backend:?}");
    }
}

#[tokio::test]
async fn a_minimal_insert_names_only_the_user_and_gets_the_defaults() {
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice')")
            .await;
        let d = expect_valid(store.desired("alice").await.unwrap());
        assert_eq!(d.state, DesiredState::Running);
        assert_eq!(
            (d.idle_timeout, d.last_active_at, d.image, d.restart_nonce),
            (None, None, None, 0)
        );
        assert!(d.revision > 0);
        assert!(store.desired("nobody").await.unwrap().is_none());
    }
}

#[tokio::test]
async fn deletions_are_logged_with_a_newer_revision_and_cleared_on_reinsert() {
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice')")
            .await;
        db.exec("INSERT INTO desired_containers (user_id) VALUES ('bob')")
            .await;
        let before = store.max_revision().await.unwrap();
        db.exec("DELETE FROM desired_containers WHERE user_id = 'alice'")
            .await;
        let changes = store.desired_changes(before, &[], 100).await.unwrap();
        assert_eq!(changes.len(), 1, "{backend:?}: {changes:?}");
        assert_eq!(changes[0].user_id, "alice");
        assert!(changes[0].deleted && changes[0].revision > before);
        assert_eq!(store.max_revision().await.unwrap(), changes[0].revision);

        db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice')")
            .await;
        let changes = store.desired_changes(0, &[], 100).await.unwrap();
        let alice: Vec<_> = changes.iter().filter(|c| c.user_id == "alice").collect();
        assert_eq!(
            alice.len(),
            1,
            "{backend:?}: tombstone cleared: {changes:?}"
        );
        assert!(!alice[0].deleted);
    }
}

#[tokio::test]
async fn renaming_a_user_id_is_seen_as_a_deletion_of_the_old_id() {
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        db.exec("INSERT INTO desired_containers (user_id) VALUES ('old')")
            .await;
        let before = store.max_revision().await.unwrap();
        db.exec("UPDATE desired_containers SET user_id = 'new' WHERE user_id = 'old'")
            .await;
        let changes = store.desired_changes(before, &[], 100).await.unwrap();
        assert!(
            changes.iter().any(|c| c.user_id == "old" && c.deleted),
            "{backend:?}: {changes:?}"
        );
        assert!(
            changes.iter().any(|c| c.user_id == "new" && !c.deleted),
            "{backend:?}: {changes:?}"
        );
    }
}

#[tokio::test]
async fn changes_since_a_revision_are_ordered_and_limited() {
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        for i in 0..10 {
            db.exec(&format!(
                "INSERT INTO desired_containers (user_id) VALUES ('u{i}')"
            ))
            .await;
        }
        let all = store.desired_changes(0, &[], 100).await.unwrap();
        assert_eq!(all.len(), 10);
        assert!(all.windows(2).all(|w| w[0].revision < w[1].revision));
        let first = store.desired_changes(0, &[], 4).await.unwrap();
        assert_eq!(first, all[..4]);
        let rest = store
            .desired_changes(first[3].revision, &[], 100)
            .await
            .unwrap();
        assert_eq!(rest, all[4..]);
        // Revisions asked for explicitly are returned even below the cursor.
        let again = store
            .desired_changes(all[9].revision, &[all[2].revision], 100)
            .await
            .unwrap();
        assert_eq!(again, vec![all[2].clone()]);
        assert!(store
            .desired_changes(all[9].revision, &[], 100)
            .await
            .unwrap()
            .is_empty());
    }
}

#[tokio::test]
async fn a_revision_committed_late_by_a_slow_transaction_is_found_by_asking_for_the_gap() {
    // PostgreSQL hands out revisions at write time but transactions commit in
    // any order: a poller that saw revision N+1 must still find N later.
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let mut slow = db.raw().await;
    let mut fast = db.raw().await;
    sqlx::raw_sql("BEGIN; INSERT INTO desired_containers (user_id) VALUES ('slow')")
        .execute(&mut slow)
        .await
        .unwrap();
    sqlx::raw_sql("INSERT INTO desired_containers (user_id) VALUES ('fast')")
        .execute(&mut fast)
        .await
        .unwrap();
    let seen = store.desired_changes(0, &[], 100).await.unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].user_id, "fast");
    let gap = seen[0].revision - 1;
    sqlx::raw_sql("COMMIT").execute(&mut slow).await.unwrap();
    assert!(store
        .desired_changes(seen[0].revision, &[], 100)
        .await
        .unwrap()
        .is_empty());
    let late = store
        .desired_changes(seen[0].revision, &[gap], 100)
        .await
        .unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!((late[0].user_id.as_str(), late[0].revision), ("slow", gap));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poll_reads_one_snapshot_so_no_change_committed_while_it_reads_is_skipped() {
    // Regression: a poll read upserts and deletions in two statements. An
    // insert and a deletion committed between the two came back as just the
    // deletion; the cursor moved past both, and on SQLite (no gaps asked for)
    // the insert was never handed on.
    const ROUNDS: usize = 400;
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let doomed: Vec<String> = (0..ROUNDS).map(|i| format!("('d{i}')")).collect();
        db.exec(&format!(
            "INSERT INTO desired_containers (user_id) VALUES {}",
            doomed.join(", ")
        ))
        .await;
        let start = store
            .desired_changes(0, &[], 100_000)
            .await
            .unwrap()
            .last()
            .unwrap()
            .revision;
        let mut conn = db.raw().await;
        let writer = tokio::spawn(async move {
            for i in 0..ROUNDS {
                for (sql, user) in [
                    (
                        "INSERT INTO desired_containers (user_id) VALUES ($1)",
                        format!("u{i}"),
                    ),
                    (
                        "DELETE FROM desired_containers WHERE user_id = $1",
                        format!("d{i}"),
                    ),
                ] {
                    sqlx::query(sql)
                        .bind(user)
                        .execute(&mut conn)
                        .await
                        .unwrap();
                }
            }
        });
        let (mut cursor, mut seen) = (start, HashSet::new());
        let mut poll = async || {
            for change in store.desired_changes(cursor, &[], 100_000).await.unwrap() {
                cursor = cursor.max(change.revision);
                seen.insert(change.user_id);
            }
        };
        while !writer.is_finished() {
            poll().await;
        }
        writer.await.unwrap();
        poll().await;
        let missed: Vec<String> = (0..ROUNDS)
            .flat_map(|i| [format!("u{i}"), format!("d{i}")])
            .filter(|user| !seen.contains(user))
            .collect();
        assert!(
            missed.is_empty(),
            "{backend:?}: a cursor-only poller never saw {} of {} changes: {missed:?}",
            missed.len(),
            2 * ROUNDS
        );
    }
}

#[tokio::test]
async fn postgres_notifies_the_user_id_on_every_change() {
    let db = TestDb::new(Backend::Postgres).await;
    let _store = db.store().await;
    let mut listener = sqlx::postgres::PgListener::connect(&db.url).await.unwrap();
    listener
        .listen(clawfleet_migration::NOTIFY_CHANNEL)
        .await
        .unwrap();
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice')")
        .await;
    db.exec("UPDATE desired_containers SET state = 'stopped' WHERE user_id = 'alice'")
        .await;
    db.exec("DELETE FROM desired_containers WHERE user_id = 'alice'")
        .await;
    for _ in 0..3 {
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), listener.recv())
            .await
            .expect("notification within 10 s")
            .unwrap();
        assert_eq!(n.payload(), "alice");
    }
}

#[tokio::test]
async fn both_sqlite_timestamp_forms_are_read_as_utc() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    db.exec(
        "INSERT INTO desired_containers (user_id, idle_timeout_secs, last_active_at) VALUES
           ('native', 60, datetime('now')),
           ('rfc', 60, '2026-11-29T10:20:30Z'),
           ('offset', 60, '2026-11-29T11:20:30+01:00'),
           ('spaced', 60, '2026-11-29 10:20:30')",
    )
    .await;
    let expected = Utc.with_ymd_and_hms(2026, 11, 29, 10, 20, 30).unwrap();
    for user in ["rfc", "offset", "spaced"] {
        let d = expect_valid(store.desired(user).await.unwrap());
        assert_eq!(d.last_active_at, Some(expected), "{user}");
    }
    let native = expect_valid(store.desired("native").await.unwrap());
    let age = Utc::now() - native.last_active_at.unwrap();
    assert!(
        age.num_seconds().abs() < 60,
        "datetime('now') is UTC: {age}"
    );
}

#[tokio::test]
async fn postgres_timestamps_keep_their_instant_whatever_the_session_time_zone() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    db.exec(
        "SET TIME ZONE 'Asia/Tokyo';
         INSERT INTO desired_containers (user_id, last_active_at) VALUES ('alice', '2026-11-29 19:20:30');",
    )
    .await;
    let d = expect_valid(store.desired("alice").await.unwrap());
    assert_eq!(
        d.last_active_at,
        Some(Utc.with_ymd_and_hms(2026, 11, 29, 10, 20, 30).unwrap())
    );
}

#[tokio::test]
async fn each_bad_row_is_rejected_by_field_and_the_good_rows_still_read() {
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let long_id = "x".repeat(200);
        let mut cases = vec![
            ("bad-state", "INSERT INTO desired_containers (user_id, state) VALUES ('bad-state', 'banana')".into(), "state"),
            ("shouting", "INSERT INTO desired_containers (user_id, state) VALUES ('shouting', 'RUNNING')".into(), "state"),
            ("negative", "INSERT INTO desired_containers (user_id, idle_timeout_secs) VALUES ('negative', -5)".into(), "idle_timeout_secs"),
            ("absurd", "INSERT INTO desired_containers (user_id, idle_timeout_secs) VALUES ('absurd', 99999999999)".into(), "idle_timeout_secs"),
            ("dotdot", "INSERT INTO desired_containers (user_id, image) VALUES ('dotdot', '../etc')".into(), "image"),
            ("upper-image", "INSERT INTO desired_containers (user_id, image) VALUES ('upper-image', 'Alpine/OpenClaw')".into(), "image"),
            ("", "INSERT INTO desired_containers (user_id) VALUES ('')".into(), "user_id"),
            (long_id.as_str(), format!("INSERT INTO desired_containers (user_id) VALUES ('{long_id}')"), "user_id"),
        ];
        if backend == Backend::Sqlite {
            // Only SQLite lets a writer put text in an integer or timestamp column.
            cases.extend([
                ("text-timeout", "INSERT INTO desired_containers (user_id, idle_timeout_secs) VALUES ('text-timeout', 'thirty')".into(), "idle_timeout_secs"),
                ("overflow", "INSERT INTO desired_containers (user_id, idle_timeout_secs) VALUES ('overflow', 99999999999999999999999)".into(), "idle_timeout_secs"),
                ("broken-time", "INSERT INTO desired_containers (user_id, last_active_at) VALUES ('broken-time', 'yesterday')".into(), "last_active_at"),
                ("epoch-time", "INSERT INTO desired_containers (user_id, last_active_at) VALUES ('epoch-time', 1700000000)".into(), "last_active_at"),
                ("text-nonce", "INSERT INTO desired_containers (user_id, restart_nonce) VALUES ('text-nonce', 'x')".into(), "restart_nonce"),
                ("nul\0byte", "INSERT INTO desired_containers (user_id) VALUES ('nul' || char(0) || 'byte')".into(), "user_id"),
            ]);
        }
        db.exec("INSERT INTO desired_containers (user_id) VALUES ('good1')")
            .await;
        for (_, sql, _) in &cases {
            db.exec(sql).await;
        }
        db.exec("INSERT INTO desired_containers (user_id) VALUES ('good2')")
            .await;

        for (user, _, field) in &cases {
            let err = expect_invalid(store.desired(user).await.unwrap());
            assert_eq!(err.field, *field, "{backend:?} {user:?}: {err}");
            assert!(
                err.status_message().contains(field),
                "{backend:?}: {}",
                err.status_message()
            );
        }
        let all = store.desired_all().await.unwrap();
        assert_eq!(all.len(), cases.len() + 2, "{backend:?}: no row is lost");
        let good: Vec<_> = all
            .iter()
            .filter_map(|r| r.as_ref().ok())
            .map(|d| d.user_id.as_str())
            .collect();
        assert_eq!(good, ["good1", "good2"], "{backend:?}");
    }
}

fn status(user: &str, port: Option<u16>) -> ContainerStatus {
    let at = Utc.with_ymd_and_hms(2026, 11, 29, 10, 0, 0).unwrap();
    ContainerStatus {
        user_id: user.into(),
        phase: Phase::Running,
        container_id: Some("abc123".into()),
        container_name: Some(format!("mosaic-user-{user}")),
        host_port: port,
        url: Some(format!("http://mosaic-user-{user}:18789")),
        host_url: port.map(|p| format!("http://127.0.0.1:{p}")),
        health: Some(Health::Healthy),
        gateway_token: Some("v1:k1:AAAA".into()),
        observed_revision: Some(3),
        message: None,
        restarts: 2,
        last_transition_at: at,
        updated_at: at,
        node: Some("node-1".into()),
    }
}

#[tokio::test]
async fn status_rows_round_trip_and_host_ports_are_unique() {
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let now = Utc.with_ymd_and_hms(2026, 11, 29, 11, 0, 0).unwrap();
        let alice = status("alice", Some(19000));
        store.write_status(&alice, now).await.unwrap();
        let read = store.status("alice").await.unwrap().unwrap();
        assert_eq!(
            read,
            ContainerStatus {
                updated_at: now,
                ..alice.clone()
            },
            "{backend:?}"
        );

        let err = store
            .write_status(&status("bob", Some(19000)), now)
            .await
            .unwrap_err();
        assert!(
            matches!(err, StoreError::PortTaken(19000)),
            "{backend:?}: {err}"
        );
        store
            .write_status(&status("bob", Some(19001)), now)
            .await
            .unwrap();
        store
            .write_status(&status("carol", None), now)
            .await
            .unwrap();
        store
            .write_status(&status("dave", None), now)
            .await
            .unwrap();
        let mut ports = store.ports_in_use().await.unwrap();
        ports.sort();
        assert_eq!(ports, [19000, 19001]);

        let page = store.status_page(None, None, 2).await.unwrap();
        assert_eq!(
            page.rows
                .iter()
                .map(|r| r.user_id.as_str())
                .collect::<Vec<_>>(),
            ["alice", "bob"]
        );
        let next = store
            .status_page(None, page.next_after.as_deref(), 2)
            .await
            .unwrap();
        assert_eq!(
            next.rows
                .iter()
                .map(|r| r.user_id.as_str())
                .collect::<Vec<_>>(),
            ["carol", "dave"]
        );
        assert_eq!(next.next_after, None);
        assert_eq!(
            store
                .status_page(Some(Phase::Failed), None, 10)
                .await
                .unwrap()
                .rows
                .len(),
            0
        );

        store.delete_status("alice").await.unwrap();
        assert!(store.status("alice").await.unwrap().is_none());
        // Alice's port is free again.
        store
            .write_status(&status("erin", Some(19000)), now)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn the_store_writes_desired_rows_like_any_other_service() {
    for backend in BOTH {
        let db = TestDb::new(backend).await;
        let store = db.store().await;
        let at = Utc.with_ymd_and_hms(2026, 11, 29, 10, 0, 0).unwrap();
        store
            .upsert_desired(&DesiredUpdate {
                user_id: "alice".into(),
                idle_timeout_secs: Some(Some(1800)),
                touch: Some(at),
                ..Default::default()
            })
            .await
            .unwrap();
        let d = expect_valid(store.desired("alice").await.unwrap());
        assert_eq!(d.idle_deadline(), Some(at + chrono::Duration::minutes(30)));
        let r1 = d.revision;

        // Fields not named are kept.
        store
            .upsert_desired(&DesiredUpdate {
                user_id: "alice".into(),
                state: Some(DesiredState::Stopped),
                ..Default::default()
            })
            .await
            .unwrap();
        let d = expect_valid(store.desired("alice").await.unwrap());
        assert_eq!(d.state, DesiredState::Stopped);
        assert_eq!(d.idle_timeout, Some(std::time::Duration::from_secs(1800)));
        assert!(d.revision > r1);

        store.request_restart("alice").await.unwrap();
        assert_eq!(
            expect_valid(store.desired("alice").await.unwrap()).restart_nonce,
            1
        );
        store
            .touch("alice", at + chrono::Duration::hours(1))
            .await
            .unwrap();
        assert!(matches!(
            store.touch("nobody", at).await,
            Err(StoreError::NoSuchUser(_))
        ));
        assert!(matches!(
            store.request_restart("nobody").await,
            Err(StoreError::NoSuchUser(_))
        ));
        assert!(store.delete_desired("alice").await.unwrap());
        assert!(!store.delete_desired("alice").await.unwrap());
        let err = store
            .upsert_desired(&DesiredUpdate {
                user_id: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(err.to_string().starts_with("user_id:"), "{err}");
    }
}

#[tokio::test]
async fn an_unreachable_database_is_a_clear_error_without_the_password() {
    let err = clawfleet::store::Store::connect("postgres://app:hunter2@127.0.0.1:1/db")
        .await
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("cannot connect") && !text.contains("hunter2"),
        "{text}"
    );
    let err = clawfleet::store::Store::connect("mysql://x")
        .await
        .unwrap_err();
    assert!(err.to_string().contains("expected sqlite://"), "{err}");
}

#[tokio::test]
async fn on_postgres_the_lease_is_the_heartbeat_and_a_released_one_is_stale_yet_taken_at_once() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let ttl = std::time::Duration::from_secs(60);
    assert_eq!(store.controller_seen("i").await.unwrap(), None);
    assert!(store.acquire_lease("i", "leader", ttl).await.unwrap());
    let leading = store.controller_seen("i").await.unwrap().unwrap();
    assert!(!leading.stale, "{leading:?}");
    assert!(!store.acquire_lease("i", "standby", ttl).await.unwrap());

    store.release_lease("i", "leader").await.unwrap();
    let released = store.controller_seen("i").await.unwrap().unwrap();
    assert!(released.stale, "{released:?}");
    assert_eq!(released.last_seen, leading.last_seen);
    assert!(
        store.acquire_lease("i", "standby", ttl).await.unwrap(),
        "a standby takes a released lease at once"
    );
    assert!(!store.controller_seen("i").await.unwrap().unwrap().stale);
}
