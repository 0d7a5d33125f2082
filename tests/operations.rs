//! What operators see of a running controller: metrics that move and pass
//! `promtool check metrics`, readiness that follows the database, and logs
//! that never carry a secret.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use clawfleet::status::Phase;
use support::controller::{
    gateway, test_key, token_of, wait_for_status, wait_running, ControllerConfig, ControllerProcess,
};
use support::docker::{docker, eventually, DockerFixture};
use support::tcp_proxy::TcpProxy;
use support::{Backend, TestDb};

const LONG: Duration = Duration::from_secs(180);

fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    gateway(addr.port(), "GET", path, None).expect("http get")
}

/// Samples of the exposition: `name{labels}` → value.
fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (key, value) = l.rsplit_once(' ')?;
            Some((key.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn promtool_check(text: &str) -> String {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package) must be installed: .ci/run installs it");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success() || !out.stdout.is_empty() || !out.stderr.is_empty(),
        "promtool failed to run"
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn metrics_move_with_a_real_scenario_and_pass_promtool() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("metrics");
    let controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    let addr = controller.http_addr().await;

    let (code, first) = http_get(addr, "/metrics");
    assert_eq!(code, 200);
    let problems = promtool_check(&first);
    assert!(
        problems.trim().is_empty(),
        "promtool check metrics:\n{problems}"
    );
    let before = samples(&first);
    assert_eq!(before["clawfleet_docker_events_total{action=\"die\"}"], 0.0);
    assert_eq!(before["clawfleet_reconcile_total{result=\"error\"}"], 0.0);

    db.exec("INSERT INTO desired_containers (user_id) VALUES ('m1'), ('m2'), ('m3')")
        .await;
    let m1 = wait_running(&store, "m1").await;
    wait_running(&store, "m2").await;
    wait_running(&store, "m3").await;
    let running = eventually(LONG, "three running containers in the metrics", || async {
        let s = samples(&http_get(addr, "/metrics").1);
        (s["clawfleet_containers{phase=\"running\"}"] == 3.0).then_some(s)
    })
    .await;
    let on_engine = docker(&[
        "ps",
        "-q",
        "--filter",
        &format!("label=io.clawfleet.instance={}", fx.instance),
    ])
    .unwrap();
    assert_eq!(on_engine.lines().count(), 3, "the gauge matches the engine");
    assert!(
        running["clawfleet_reconcile_total{result=\"requeue\"}"] >= 3.0,
        "each create is followed by a look"
    );
    assert!(running["clawfleet_reconcile_total{result=\"success\"}"] >= 3.0);
    assert!(running["clawfleet_docker_requests_total{op=\"create\",result=\"ok\"}"] >= 3.0);
    assert!(running["clawfleet_workqueue_adds_total"] >= 3.0);
    assert_eq!(
        running["clawfleet_desired_containers{state=\"running\"}"],
        3.0
    );
    assert_eq!(running["clawfleet_docker_event_stream_connected"], 1.0);
    assert!(running["clawfleet_container_start_duration_seconds_count"] >= 3.0);
    // Rows, not API wakes: each create and start took a bulk turn.
    assert!(
        running["clawfleet_engine_turn_wait_seconds_count{priority=\"bulk\"}"] >= 6.0,
        "a bulk turn per create and start"
    );
    assert_eq!(
        running["clawfleet_engine_turn_wait_seconds_count{priority=\"wake\"}"],
        0.0
    );
    assert!(running["clawfleet_last_full_resync_timestamp_seconds"] > 1.7e9);

    docker(&["kill", &fx.name("m1")]).unwrap();
    wait_for_status(&store, "m1", LONG, "restarted", |s| {
        s.restarts >= 1 && s.phase == Phase::Running
    })
    .await;
    let after = eventually(
        LONG,
        "the die event and the restart in the metrics",
        || async {
            let s = samples(&http_get(addr, "/metrics").1);
            (s["clawfleet_docker_events_total{action=\"die\"}"]
                > running["clawfleet_docker_events_total{action=\"die\"}"]
                && s["clawfleet_container_restarts_total{reason=\"crash\"}"] >= 1.0)
                .then_some(s)
        },
    )
    .await;
    assert!(
        after["clawfleet_reconcile_total{result=\"success\"}"]
            > running["clawfleet_reconcile_total{result=\"success\"}"]
    );
    let text = http_get(addr, "/metrics").1;
    assert!(promtool_check(&text).trim().is_empty());
    assert!(
        !text.contains("m1") && !text.contains(&m1.container_id.unwrap()),
        "no user or container in a label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_database_and_comes_back() {
    let db = TestDb::new(Backend::Postgres).await;
    let _store = db.store().await;
    let fx = DockerFixture::new("ready");
    let target: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let proxy = TcpProxy::start(target).await;
    let url = db.url.replace("127.0.0.1:5432", &proxy.addr.to_string());
    assert_ne!(url, db.url, "the test database URL goes through the proxy");
    let controller =
        ControllerProcess::start(&ControllerConfig::new(&db, &fx).with("DATABASE_URL", &url));
    let addr = controller.http_addr().await;
    eventually(LONG, "ready", || async {
        (http_get(addr, "/readyz").0 == 200).then_some(())
    })
    .await;

    proxy.set_down(true);
    let body = eventually(LONG, "not ready while the database is away", || async {
        let (code, body) = http_get(addr, "/readyz");
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains("database"), "{body}");
    assert_eq!(http_get(addr, "/healthz").0, 200, "alive all the same");

    proxy.set_down(false);
    eventually(LONG, "ready again", || async {
        (http_get(addr, "/readyz").0 == 200).then_some(())
    })
    .await;
}

#[tokio::test]
async fn not_ready_until_the_first_full_sync_is_done_then_ready() {
    let db = TestDb::new(Backend::Sqlite).await;
    let fx = DockerFixture::new("sync");
    let controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    let addr = controller.http_addr().await;
    eventually(LONG, "ready", || async {
        (http_get(addr, "/readyz").0 == 200).then_some(())
    })
    .await;
    let (code, body) = http_get(addr, "/healthz");
    assert_eq!((code, body.contains("ok")), (200, true));
}

#[tokio::test]
async fn no_token_key_or_api_token_reaches_the_logs() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("logs");
    let api_token = "api-token-that-must-never-be-logged-0123456789";
    let config = ControllerConfig::new(&db, &fx)
        .with("CLAWFLEET_API_TOKEN", api_token)
        .with("CLAWFLEET_LOG_FORMAT", "json")
        .with("RUST_LOG", "trace");
    let mut controller = ControllerProcess::start(&config);
    let addr = controller.http_addr().await;
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('l1'), ('l2')")
        .await;
    let l1 = wait_running(&store, "l1").await;
    let l2 = wait_running(&store, "l2").await;
    // Every path that handles a token: create, recreate, crash restart, API calls.
    db.exec("UPDATE desired_containers SET restart_nonce = 1 WHERE user_id = 'l1'")
        .await;
    docker(&["kill", &fx.name("l2")]).unwrap();
    let (code, _) = gateway(addr.port(), "GET", "/v1/users/l1", Some(api_token)).unwrap();
    assert!(code == 200 || code == 404, "{code}");
    let (code, _) = gateway(addr.port(), "GET", "/v1/users/l1", Some("wrong-token")).unwrap();
    assert_eq!(code, 401);
    let l1_after = wait_for_status(&store, "l1", LONG, "recreated", |s| {
        s.container_id != l1.container_id && s.phase == Phase::Running
    })
    .await;
    wait_for_status(&store, "l2", LONG, "restarted", |s| s.restarts >= 1).await;
    controller.terminate();

    let log = controller.log();
    assert!(log.lines().count() > 20, "the scenario was logged:\n{log}");
    let key = test_key().to_config_entry();
    let key_material = key.split_once(':').unwrap().1.to_owned();
    let secrets = [
        ("l1's gateway token", token_of(&l1_after)),
        ("l2's gateway token", token_of(&l2)),
        ("l1's sealed token", l1_after.gateway_token.clone().unwrap()),
        ("the encryption key", key_material),
        ("the API token", api_token.to_owned()),
    ];
    for (what, secret) in secrets {
        assert!(!log.contains(&secret), "{what} appears in the log");
    }
    assert!(
        log.contains("\"user_id\""),
        "reconcile spans carry the user id"
    );
}

#[tokio::test]
async fn the_healthcheck_command_probes_a_running_controller() {
    let db = TestDb::new(Backend::Sqlite).await;
    let fx = DockerFixture::new("probe");
    let controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    let addr = controller.http_addr().await;
    let probe = |listen: String| {
        Command::new(env!("CARGO_BIN_EXE_clawfleet"))
            .args(["healthcheck", "--listen", &listen])
            .output()
            .unwrap()
    };
    let healthy = probe(format!("0.0.0.0:{}", addr.port()));
    assert!(
        healthy.status.success(),
        "{}",
        String::from_utf8_lossy(&healthy.stderr)
    );
    let closed = support::docker::free_port();
    let down = probe(format!("127.0.0.1:{closed}"));
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("unhealthy"));
}
