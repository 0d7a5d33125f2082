//! The Swarm backend (`--backend swarm`) on this machine's engine, a
//! single-node swarm manager (`.ci/run` makes it one): the main scenario
//! through the real binary, with rows written by raw SQL (README "Running on
//! Docker Swarm").

mod support;

use std::time::Duration;

use clawfleet::status::{ContainerStatus, Phase};
use support::controller::{
    gateway, sql_now, token_of, wait_for_status, whoami, ControllerConfig, ControllerProcess,
};
use support::docker::{docker, eventually, volume_exists, DockerFixture};
use support::fleet::scrape;
use support::http::{user_path, Client};
use support::{Backend, TestDb};

const LONG: Duration = Duration::from_secs(180);

/// Skips nothing: the engine must be a swarm manager, as `.ci/run` leaves it.
fn require_swarm_manager() {
    let state = docker(&["info", "--format", "{{.Swarm.ControlAvailable}}"]).unwrap_or_default();
    assert_eq!(
        state.trim(),
        "true",
        "the engine is not a Swarm manager: run `docker swarm init --advertise-addr 127.0.0.1` (.ci/run does)"
    );
}

/// `docker service inspect` of `name`, formatted by `format`.
fn service(name: &str, format: &str) -> Option<String> {
    docker(&["service", "inspect", "--format", format, name])
        .ok()
        .map(|s| s.trim().to_owned())
}

fn swarm_config(db: &TestDb, fx: &DockerFixture) -> ControllerConfig {
    ControllerConfig::new(db, fx)
        .with("CLAWFLEET_BACKEND", "swarm")
        // This kernel has no IPVS, which the routing mesh needs.
        .with("CLAWFLEET_SWARM_PUBLISH_MODE", "host")
        .with("CLAWFLEET_API_TOKEN", "swarm-test-api-token-0123456789")
}

/// Waits until `user` runs: a task running, its node recorded.
async fn wait_task_running(store: &clawfleet::store::Store, user: &str) -> ContainerStatus {
    wait_for_status(store, user, LONG, "running on a node", |s| {
        s.phase == Phase::Running && s.container_id.is_some() && s.node.is_some()
    })
    .await
}

#[tokio::test]
async fn the_main_scenario_runs_on_the_swarm_backend() {
    require_swarm_manager();
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("swarm");
    let controller = ControllerProcess::start(&swarm_config(&db, &fx));
    let addr = controller.http_addr().await;

    for user in ["alice", "bob", "crash", "conf", "sick"] {
        db.exec(&format!(
            "INSERT INTO desired_containers (user_id) VALUES ('{user}')"
        ))
        .await;
    }
    // One service per user, one replica, pinned to the node it first ran on.
    let alice = wait_task_running(&store, "alice").await;
    let name = fx.name("alice");
    assert_eq!(alice.container_name.as_deref(), Some(name.as_str()));
    assert_eq!(
        service(&name, "{{.Spec.Mode.Replicated.Replicas}}").as_deref(),
        Some("1")
    );
    assert_eq!(
        service(&name, "{{index .Spec.Labels \"io.clawfleet.user-id\"}}").as_deref(),
        Some("alice")
    );
    let node = alice.node.clone().expect("node recorded");
    let constraints = || service(&name, "{{json .Spec.TaskTemplate.Placement.Constraints}}");
    assert_eq!(
        alice.url.as_deref(),
        Some(format!("http://{name}:18789").as_str())
    );
    let port = alice.host_port.expect("a published port");
    assert_eq!(alice.host_url, Some(format!("http://127.0.0.1:{port}")));
    // Published on her node; the gateway answers with the token.
    let me = eventually(LONG, "alice's gateway on her node", || async {
        let s = store.status("alice").await.ok().flatten()?;
        gateway(port, "GET", "/healthz", None)
            .ok()
            .filter(|(code, _)| *code == 200)
            .map(|_| whoami(&s))
    })
    .await;
    assert_eq!(me["agent_id"], "alice");
    assert_eq!(me["boots"], 1);
    assert_eq!(me["agent_token_matches"], true);

    // A restart_nonce bump redeploys the same service (ForceUpdate), on the same volume.
    let force = service(&name, "{{.Spec.TaskTemplate.ForceUpdate}}").unwrap_or_default();
    let service_id = alice.container_id.clone();
    db.exec("UPDATE desired_containers SET restart_nonce = 1 WHERE user_id = 'alice'")
        .await;
    eventually(LONG, "alice redeployed on her volume", || async {
        let s = store.status("alice").await.ok().flatten()?;
        if s.phase != Phase::Running {
            return None;
        }
        gateway(port, "GET", "/healthz", None)
            .ok()
            .filter(|(c, _)| *c == 200)?;
        let me = std::panic::catch_unwind(|| whoami(&s)).ok()?;
        (me["boots"] == 2).then_some(())
    })
    .await;
    assert_ne!(
        service(&name, "{{.Spec.TaskTemplate.ForceUpdate}}").unwrap_or_default(),
        force,
        "ForceUpdate bumped"
    );
    let after = store.status("alice").await.unwrap().unwrap();
    assert_eq!(
        after.container_id, service_id,
        "the same service, updated in place"
    );
    assert_eq!(after.node.as_deref(), Some(node.as_str()));
    // Pinned to her node by the update (before it, she only ran there).
    assert!(
        constraints().is_some_and(|c| c.contains(&format!("node.id=={node}"))),
        "{:?}",
        constraints()
    );

    // A crash is restarted with back-off and counted.
    let crash = wait_task_running(&store, "crash").await;
    let crash_port = crash.host_port.unwrap();
    eventually(LONG, "crash's gateway", || async {
        gateway(crash_port, "GET", "/healthz", None)
            .ok()
            .filter(|(c, _)| *c == 200)
    })
    .await;
    let _ = gateway(
        crash_port,
        "POST",
        "/v1/exit?code=3",
        Some(&token_of(&crash)),
    );
    wait_for_status(&store, "crash", LONG, "restarted after its crash", |s| {
        s.restarts >= 1 && s.phase == Phase::Running
    })
    .await;

    // A task Swarm kills as unhealthy is replaced, counted as an unhealthy restart.
    let sick = wait_task_running(&store, "sick").await;
    let sick_port = sick.host_port.unwrap();
    eventually(LONG, "sick's gateway", || async {
        gateway(sick_port, "GET", "/healthz", None)
            .ok()
            .filter(|(c, _)| *c == 200)
    })
    .await;
    let (code, _) = gateway(sick_port, "POST", "/v1/unhealthy", Some(&token_of(&sick))).unwrap();
    assert_eq!(code, 200);
    wait_for_status(
        &store,
        "sick",
        LONG,
        "replaced after turning unhealthy",
        |s| s.restarts >= 1 && s.phase == Phase::Running,
    )
    .await;
    let unhealthy = eventually(LONG, "the unhealthy restart counted", || async {
        scrape(addr)
            .get("clawfleet_container_restarts_total{reason=\"unhealthy\"}")
            .copied()
            .filter(|n| *n >= 1.0)
    })
    .await;
    assert!(unhealthy >= 1.0);

    // Exit 78 is a configuration error: failed, not restarted in a loop.
    let conf = wait_task_running(&store, "conf").await;
    let conf_port = conf.host_port.unwrap();
    eventually(LONG, "conf's gateway", || async {
        gateway(conf_port, "GET", "/healthz", None)
            .ok()
            .filter(|(c, _)| *c == 200)
    })
    .await;
    let _ = gateway(
        conf_port,
        "POST",
        "/v1/exit?code=78",
        Some(&token_of(&conf)),
    );
    let failed = wait_for_status(&store, "conf", LONG, "failed with exit 78", |s| {
        s.phase == Phase::Failed
    })
    .await;
    assert!(
        failed.message.as_deref().unwrap_or_default().contains("78"),
        "{failed:?}"
    );

    // The idle deadline scales to zero; the service is kept.
    db.exec(&format!(
        "UPDATE desired_containers SET idle_timeout_secs = 2, last_active_at = {} WHERE user_id = 'bob'",
        sql_now(&db)
    ))
    .await;
    wait_for_status(&store, "bob", LONG, "idle", |s| s.phase == Phase::Idle).await;
    let bob = fx.name("bob");
    assert_eq!(
        service(&bob, "{{.Spec.Mode.Replicated.Replicas}}").as_deref(),
        Some("0")
    );

    // Still idle with a longer timeout, last active an hour ago; then
    // ensure-running wakes the scaled-to-zero user and answers with the
    // addresses and token.
    db.exec(
        "UPDATE desired_containers SET idle_timeout_secs = 600, \
         last_active_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-1 hour') WHERE user_id = 'bob'",
    )
    .await;
    wait_for_status(&store, "bob", LONG, "idle", |s| s.phase == Phase::Idle).await;
    let client = Client::new(addr, Some("swarm-test-api-token-0123456789"));
    let reply = client
        .send("POST", &user_path("bob", "/ensure-running?wait=120s"), None)
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    let body = reply.json();
    assert_eq!(body["url"], format!("http://{bob}:18789"));
    assert!(
        body["token"].as_str().is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    assert_eq!(
        service(&bob, "{{.Spec.Mode.Replicated.Replicas}}").as_deref(),
        Some("1")
    );

    // A bad row is reported and leaves the others alone.
    db.exec("INSERT INTO desired_containers (user_id, state) VALUES ('weird', 'sideways')")
        .await;
    wait_for_status(&store, "weird", LONG, "failed as invalid", |s| {
        s.phase == Phase::Failed
    })
    .await;

    // A deleted row removes the service and keeps the volume.
    db.exec("DELETE FROM desired_containers WHERE user_id = 'alice'")
        .await;
    eventually(LONG, "alice's status row to go", || async {
        store.status("alice").await.unwrap().is_none().then_some(())
    })
    .await;
    assert_eq!(service(&name, "{{.ID}}"), None, "service removed");
    assert!(volume_exists(&format!("{name}-state")), "volume kept");

    // Metrics name the backend and count tasks by state.
    let samples = scrape(addr);
    assert!(
        samples
            .keys()
            .any(|k| k.starts_with("clawfleet_build_info{") && k.contains("backend=\"swarm\"")),
        "{samples:?}"
    );
    assert!(
        samples
            .keys()
            .any(|k| k.starts_with("clawfleet_swarm_tasks{state=\"running\"}")),
        "{samples:?}"
    );
    drop(controller);
}

#[tokio::test]
async fn a_controller_killed_mid_convergence_leaves_one_service_per_user_on_swarm() {
    require_swarm_manager();
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("swkill");
    let config = swarm_config(&db, &fx);
    let users: Vec<String> = (0..6).map(|i| format!("k{i}")).collect();
    let mut first = ControllerProcess::start(&config);
    for user in &users {
        db.exec(&format!(
            "INSERT INTO desired_containers (user_id) VALUES ('{user}')"
        ))
        .await;
    }
    // Killed as soon as the first service exists, with the rest under way.
    eventually(LONG, "a first service", || async {
        let filter = format!("label=io.clawfleet.instance={}", fx.instance);
        docker(&["service", "ls", "-q", "--filter", &filter])
            .ok()
            .filter(|s| !s.trim().is_empty())
    })
    .await;
    first.kill9();
    let _second = ControllerProcess::start(&config);
    for user in &users {
        wait_task_running(&store, user).await;
    }
    let filter = format!("label=io.clawfleet.instance={}", fx.instance);
    let names = docker(&[
        "service",
        "ls",
        "--filter",
        &filter,
        "--format",
        "{{.Name}}",
    ])
    .unwrap_or_default();
    let mut names: Vec<&str> = names.lines().filter(|l| !l.is_empty()).collect();
    names.sort_unstable();
    let mut expected: Vec<String> = users.iter().map(|u| fx.name(u)).collect();
    expected.sort();
    assert_eq!(
        names, expected,
        "one service per user, none lost, none doubled"
    );
}

#[tokio::test]
async fn run_on_swarm_refuses_network_isolation_and_says_why() {
    require_swarm_manager();
    let db = TestDb::new(Backend::Sqlite).await;
    let fx = DockerFixture::new("swiso");
    let mut controller = ControllerProcess::start(
        &swarm_config(&db, &fx).with("CLAWFLEET_NETWORK_ISOLATION", "isolated"),
    );
    let status = eventually(LONG, "clawfleet run to exit", || {
        let exited = controller.try_exit();
        async move { exited }
    })
    .await;
    assert!(!status.success());
    assert!(
        controller
            .log()
            .contains("overlay networks cannot disable traffic"),
        "{}",
        controller.log()
    );
}
