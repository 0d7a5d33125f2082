//! High availability on PostgreSQL: several `clawfleet run` for one instance
//! elect one leader through the lease; only it acts; a standby takes over
//! when the leader dies or loses the database, and the old leader, back, does
//! not act. On SQLite a second process is refused.

mod support;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use support::controller::{gateway, wait_running, ControllerConfig, ControllerProcess};
use support::docker::{docker, eventually, DockerFixture};
use support::tcp_proxy::TcpProxy;
use support::{Backend, TestDb};

const LONG: Duration = Duration::from_secs(180);

fn metrics(process: &ControllerProcess, addr: std::net::SocketAddr) -> BTreeMap<String, f64> {
    let _ = process;
    let (_, text) = gateway(addr.port(), "GET", "/metrics", None).unwrap_or_default();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn is_leader(m: &BTreeMap<String, f64>) -> bool {
    m.get("clawfleet_leader") == Some(&1.0)
}

fn creates(m: &BTreeMap<String, f64>) -> f64 {
    m.get("clawfleet_docker_requests_total{op=\"create\",result=\"ok\"}")
        .copied()
        .unwrap_or(0.0)
        + m.get("clawfleet_docker_requests_total{op=\"create\",result=\"error\"}")
            .copied()
            .unwrap_or(0.0)
}

fn containers(fx: &DockerFixture) -> usize {
    docker(&[
        "ps",
        "-aq",
        "--filter",
        &format!("label=io.clawfleet.instance={}", fx.instance),
    ])
    .unwrap_or_default()
    .lines()
    .filter(|l| !l.is_empty())
    .count()
}

/// The instant of the first log line containing `needle` (RFC 3339 at the line's start).
fn logged_at(log: &str, needle: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    log.lines().find(|l| l.contains(needle)).and_then(|l| {
        let stamp = l.split_whitespace().next()?;
        chrono::DateTime::parse_from_rfc3339(stamp)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc))
    })
}

async fn insert_users(db: &TestDb, prefix: &str, n: usize) -> Vec<String> {
    let users: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let values: Vec<String> = users.iter().map(|u| format!("('{u}')")).collect();
    db.exec(&format!(
        "INSERT INTO desired_containers (user_id) VALUES {}",
        values.join(",")
    ))
    .await;
    users
}

#[tokio::test]
async fn two_controllers_elect_one_leader_and_only_it_acts() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let fx = DockerFixture::new("ha-one");
    let config = ControllerConfig::new(&db, &fx).with("CLAWFLEET_LEASE_TTL", "6s");
    let a = ControllerProcess::start(&config);
    let b = ControllerProcess::start(&config);
    let (addr_a, addr_b) = (a.http_addr().await, b.http_addr().await);
    eventually(LONG, "a leader", || async {
        (is_leader(&metrics(&a, addr_a)) || is_leader(&metrics(&b, addr_b))).then_some(())
    })
    .await;

    let users = insert_users(&db, "h", 50).await;
    for user in &users {
        wait_running(&store, user).await;
    }
    let (ma, mb) = (metrics(&a, addr_a), metrics(&b, addr_b));
    assert!(is_leader(&ma) ^ is_leader(&mb), "exactly one leader");
    assert_eq!(
        creates(&ma) + creates(&mb),
        50.0,
        "one create per user across both processes"
    );
    let standby = if is_leader(&ma) { &mb } else { &ma };
    assert_eq!(creates(standby), 0.0, "the standby never created anything");
    assert_eq!(containers(&fx), 50);
    // The standby serves health and readiness all the same. Readiness
    // gives the engine and the database 2 s each: on a busy machine one
    // answer may come late, so it is asked again rather than read once.
    let standby_port = if is_leader(&ma) { addr_b } else { addr_a }.port();
    eventually(LONG, "the standby's /readyz to answer 200", || {
        let answer = gateway(standby_port, "GET", "/readyz", None).ok();
        if let Some((code, body)) = answer.as_ref().filter(|(code, _)| *code != 200) {
            eprintln!("standby /readyz answered {code}: {body}");
        }
        async move { answer.filter(|(code, _)| *code == 200) }
    })
    .await;
}

#[tokio::test]
async fn a_killed_leader_is_replaced_and_when_back_it_does_not_act() {
    let db = TestDb::new(Backend::Postgres).await;
    let store = db.store().await;
    let fx = DockerFixture::new("ha-kill");
    let config = ControllerConfig::new(&db, &fx).with("CLAWFLEET_LEASE_TTL", "6s");
    let mut a = ControllerProcess::start(&config);
    let addr_a = a.http_addr().await;
    eventually(LONG, "A to lead", || async {
        is_leader(&metrics(&a, addr_a)).then_some(())
    })
    .await;
    let b = ControllerProcess::start(&config);
    let addr_b = b.http_addr().await;
    for user in insert_users(&db, "before", 5).await {
        wait_running(&store, &user).await;
    }
    assert!(!is_leader(&metrics(&b, addr_b)));

    a.kill9();
    let killed = Instant::now();
    eventually(LONG, "B to take over", || async {
        is_leader(&metrics(&b, addr_b)).then_some(())
    })
    .await;
    eprintln!(
        "takeover after SIGKILL of the leader: {:?} (lease 6s)",
        killed.elapsed()
    );
    for user in insert_users(&db, "after", 5).await {
        wait_running(&store, &user).await;
    }

    // The old leader comes back: it stays a standby and creates nothing.
    let a2 = ControllerProcess::start(&config);
    let addr_a2 = a2.http_addr().await;
    eventually(LONG, "A to be up", || async {
        (gateway(addr_a2.port(), "GET", "/healthz", None).ok()?.0 == 200).then_some(())
    })
    .await;
    for user in insert_users(&db, "later", 5).await {
        wait_running(&store, &user).await;
    }
    let m = metrics(&a2, addr_a2);
    assert!(!is_leader(&m), "the restarted old leader does not lead");
    assert_eq!(creates(&m), 0.0, "the restarted old leader did not act");
    assert!(a2.log().contains("standby"), "it says it is a standby");
    assert_eq!(containers(&fx), 15);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_from_the_database_stops_before_a_standby_takes_over() {
    let db = TestDb::new(Backend::Postgres).await;
    let _store = db.store().await;
    let fx = DockerFixture::new("ha-cut");
    let proxy = TcpProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let config = ControllerConfig::new(&db, &fx).with("CLAWFLEET_LEASE_TTL", "6s");
    let cut_config = config.clone().with(
        "DATABASE_URL",
        &db.url.replace("127.0.0.1:5432", &proxy.addr.to_string()),
    );
    let a = ControllerProcess::start(&cut_config);
    let addr_a = a.http_addr().await;
    eventually(LONG, "A to lead", || async {
        is_leader(&metrics(&a, addr_a)).then_some(())
    })
    .await;
    let b = ControllerProcess::start(&config);
    let addr_b = b.http_addr().await;

    proxy.set_down(true);
    eventually(LONG, "B to take over", || async {
        is_leader(&metrics(&b, addr_b)).then_some(())
    })
    .await;
    assert!(
        !is_leader(&metrics(&a, addr_a)),
        "A no longer claims to lead"
    );
    let stopped = logged_at(&a.log(), "stopped reconciling before it can expire")
        .expect("A logged that it stopped");
    let took_over = logged_at(&b.log(), "became leader").expect("B logged its takeover");
    assert!(
        stopped < took_over,
        "A stopped ({stopped}) before B took over ({took_over})"
    );
    eprintln!(
        "A stopped {} ms before B took over",
        (took_over - stopped).num_milliseconds()
    );
}

#[tokio::test]
async fn a_second_controller_on_one_sqlite_file_is_refused() {
    let db = TestDb::new(Backend::Sqlite).await;
    let fx = DockerFixture::new("sqlite-one");
    let config = ControllerConfig::new(&db, &fx);
    let first = ControllerProcess::start(&config);
    first.http_addr().await;
    let mut second = ControllerProcess::start(&config);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = second.try_exit() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the second controller did not exit"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!status.success());
    assert!(second.log().contains("single-instance"), "{}", second.log());
}
