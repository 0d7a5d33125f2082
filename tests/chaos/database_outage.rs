//! The database away for ten seconds, on PostgreSQL and on SQLite.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::support::controller::{gateway, sql_now, token_of, ControllerConfig, ControllerProcess};
use crate::support::docker::{docker, eventually, volume_exists, DockerFixture};
use crate::support::fleet::{wait_converged, Want};
use crate::support::tcp_proxy::TcpProxy;
use crate::support::{Backend, TestDb};
use clawfleet::naming::{container_name, volume_name};
use clawfleet::status::ContainerStatus;
use clawfleet::store::Store;

use crate::harness::*;

/// How long the database is away.
const DB_OUTAGE: Duration = Duration::from_secs(10);

/// The users of the database outage tests and what the test does to them:
/// `o0` crashes during the outage; after it (PostgreSQL: during it) `o1` is
/// stopped, `o2` recreated, `o3` deleted and `o6` created.
fn outage_users() -> Vec<String> {
    (0..6).map(|i| format!("o{i}")).collect()
}

/// The changes the outage tests write (during or after the outage).
async fn outage_changes(db: &TestDb, want: &mut BTreeMap<String, Want>) {
    db.exec(&format!(
        "INSERT INTO desired_containers (user_id, last_active_at) VALUES ('o6', {})",
        sql_now(db)
    ))
    .await;
    db.exec("UPDATE desired_containers SET state = 'stopped' WHERE user_id = 'o1'")
        .await;
    db.exec("UPDATE desired_containers SET restart_nonce = restart_nonce + 1 WHERE user_id = 'o2'")
        .await;
    db.exec("DELETE FROM desired_containers WHERE user_id = 'o3'")
        .await;
    want.insert("o1".into(), Want::Stopped);
    want.insert("o3".into(), Want::Deleted);
    want.insert("o6".into(), Want::Running);
}

/// Crashes `o0` through its gateway (the controller must notice, and cannot
/// write down what it does about it).
async fn crash(status: &ContainerStatus) {
    let (port, token) = (status.host_port.unwrap(), token_of(status));
    let (code, _) = blocking(move || gateway(port, "POST", "/v1/exit?code=3", Some(&token)))
        .await
        .unwrap();
    assert_eq!(code, 200);
}

/// Holds the outage for [`DB_OUTAGE`] from `since`, checking every 500 ms that
/// the controller lives and that no container but `o0`'s changed (same id,
/// still running); returns the `/readyz` codes seen.
async fn ride_out_the_outage(
    controller: &mut ControllerProcess,
    addr: SocketAddr,
    fx: &DockerFixture,
    before: &BTreeMap<String, Seen>,
    since: Instant,
) -> Vec<u16> {
    let mut codes = Vec::new();
    while since.elapsed() < DB_OUTAGE {
        assert_alive(controller, "while the database was away");
        let (code, body) = http_get(addr, "/readyz").await;
        if code != 200 {
            assert!(body.contains("database"), "{code} {body}");
        }
        codes.push(code);
        let engine: HashMap<String, (String, String)> = on_engine(fx)
            .await
            .into_iter()
            .map(|c| (c.user, (c.id, c.state)))
            .collect();
        for (user, seen) in before {
            if user == "o0" {
                continue;
            }
            let found = engine.get(user);
            assert_eq!(
                found,
                Some(&(seen.id.clone(), "running".to_owned())),
                "{user:?}: its container changed while the database was away ({:?} in)",
                since.elapsed()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    codes
}

/// After the outage: converged, the right containers kept, recreated,
/// removed; how many restarts `o0`'s status counts (it crashed once, during
/// the outage).
async fn check_after_outage(
    fx: &DockerFixture,
    store: &Store,
    want: &BTreeMap<String, Want>,
    before: &BTreeMap<String, Seen>,
    back: Instant,
) -> i64 {
    let took = wait_converged(fx, store, want, LONG).await;
    eprintln!(
        "database back: converged {took:?} later ({:?} after it came back)",
        back.elapsed()
    );
    let after = seen_all(store, want).await;
    for user in ["o0", "o4", "o5"] {
        assert_eq!(
            after[user].id, before[user].id,
            "{user:?}: kept its container"
        );
        assert_eq!(
            after[user].token, before[user].token,
            "{user:?}: kept its token"
        );
    }
    assert_eq!(after["o0"].boots, 2, "o0 was restarted once");
    assert_ne!(after["o2"].id, before["o2"].id, "o2 was recreated");
    assert_eq!(after["o2"].boots, 2, "o2 kept its volume");
    assert_eq!(after["o2"].token, before["o2"].token, "o2 kept its token");
    let stopped = docker(&[
        "inspect",
        "--format",
        "{{.Id}} {{.State.Status}}",
        &container_name(&fx.prefix, "o1"),
    ])
    .unwrap();
    assert_eq!(
        stopped,
        format!("{} exited", before["o1"].id),
        "o1 stopped in place"
    );
    assert!(
        volume_exists(&volume_name(&fx.prefix, "o3")),
        "o3's volume is kept"
    );
    let o0 = store.status("o0").await.expect("status").expect("o0");
    eprintln!(
        "o0 after its crash during the outage: restarts {}",
        o0.restarts
    );
    o0.restarts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_away_for_ten_seconds_leaves_containers_alone_and_is_caught_up_after() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let fx = DockerFixture::new("chaos-pgdown");
    // The PostgreSQL server is shared with every other test running at the
    // same time, so it must stay up: the outage is a proxy between this
    // controller and the server that the test takes down. The test itself
    // talks to the server directly and keeps writing.
    let (server, target) = pg_server().await;
    let proxy = TcpProxy::start(target).await;
    let url = db.url.replacen(&server, &proxy.addr.to_string(), 1);
    assert_ne!(
        url, db.url,
        "the controller's database URL goes through the proxy"
    );
    // The default lease TTL (15 s): after 10 s without a renewal the leader
    // stands down, and it must take the lease again once the database is back.
    let mut controller =
        ControllerProcess::start(&ControllerConfig::new(&db, &fx).with("DATABASE_URL", &url));
    let addr = controller.http_addr().await;
    let users = outage_users();
    insert_users(&db, &users).await;
    let mut want: BTreeMap<String, Want> =
        users.iter().map(|u| (u.clone(), Want::Running)).collect();
    wait_converged(&fx, &store, &want, LONG).await;
    let before = seen_all(&store, &want).await;
    let rows = statuses(&store).await;

    proxy.set_down(true);
    let down_at = Instant::now();
    crash(&rows["o0"]).await;
    // Written while the controller cannot see them (and misses their NOTIFY).
    outage_changes(&db, &mut want).await;
    let codes = ride_out_the_outage(&mut controller, addr, &fx, &before, down_at).await;
    proxy.set_down(false);
    let back = Instant::now();
    let first_503 = codes.iter().position(|c| *c == 503);
    eprintln!(
        "postgres away {DB_OUTAGE:?}: /readyz codes every 500 ms: {codes:?}; stood down: {}",
        controller
            .log()
            .contains("stopped reconciling before it can expire")
    );
    assert!(
        first_503.is_some(),
        "/readyz never answered 503 while the database was away: {codes:?}"
    );
    eventually(LONG, "the controller to lead again", || async {
        (metrics(addr).await.get("clawfleet_leader") == Some(&1.0)).then_some(())
    })
    .await;
    eprintln!(
        "leading again {:?} after the database came back",
        back.elapsed()
    );
    let restarts = check_after_outage(&fx, &store, &want, &before, back).await;
    assert_eq!(restarts, 1, "o0's restart is counted");
    assert_eq!(http_get(addr, "/readyz").await.0, 200, "ready again");
    log_summary("postgres-away", &controller);
    assert_alive(&mut controller, "after the outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_locked_for_ten_seconds_leaves_containers_alone_and_is_caught_up_after() {
    use sqlx::sqlite::SqliteConnectOptions;
    use sqlx::{ConnectOptions as _, Connection as _};

    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("chaos-sqlitelock");
    let mut controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    let addr = controller.http_addr().await;
    let users = outage_users();
    insert_users(&db, &users).await;
    let mut want: BTreeMap<String, Want> =
        users.iter().map(|u| (u.clone(), Want::Running)).collect();
    wait_converged(&fx, &store, &want, LONG).await;
    let before = seen_all(&store, &want).await;
    let rows = statuses(&store).await;

    // Another process's exclusive transaction: nobody else may write (in WAL
    // mode readers still read). A long busy timeout, so the lock is taken
    // even while the controller writes.
    let mut lock = SqliteConnectOptions::from_str(&db.url)
        .expect("sqlite url")
        .busy_timeout(Duration::from_secs(60))
        .connect()
        .await
        .expect("lock connection");
    sqlx::raw_sql("BEGIN EXCLUSIVE")
        .execute(&mut lock)
        .await
        .expect("BEGIN EXCLUSIVE");
    let locked_at = Instant::now();
    crash(&rows["o0"]).await;
    let codes = ride_out_the_outage(&mut controller, addr, &fx, &before, locked_at).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut lock)
        .await
        .expect("ROLLBACK");
    lock.close().await.expect("close the lock connection");
    let back = Instant::now();
    eprintln!("sqlite locked {DB_OUTAGE:?}: /readyz codes every 500 ms: {codes:?}");
    // A row cannot be written while the file is locked: right after, then.
    outage_changes(&db, &mut want).await;
    let restarts = check_after_outage(&fx, &store, &want, &before, back).await;
    log_summary("sqlite-lock", &controller);
    assert_alive(&mut controller, "after the lock");
    // Both judged at the end, so one failing does not hide the other.
    let mut problems = Vec::new();
    if !codes.contains(&503) {
        problems.push(format!(
            "/readyz never answered 503 while the database was locked: {codes:?}"
        ));
    }
    if restarts != 1 {
        problems.push(format!(
            "o0 was restarted once during the lock (it booted twice), yet its status counts {restarts} restarts"
        ));
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
