//! Tenant isolation on the real engine (README "Security"): what a user's
//! container is allowed, whether agents reach each other, and whose state
//! volume a user may mount.

mod support;

use std::process::Command;
use std::time::Duration;

use clawfleet::docker::{LABEL_INSTANCE, LABEL_MANAGED, LABEL_USER_ID};
use clawfleet::naming::UserNames;
use clawfleet::status::{ContainerStatus, Phase};
use clawfleet::store::Store;
use support::controller::{
    gateway, wait_for_status, wait_running, ControllerConfig, ControllerProcess,
};
use support::docker::{docker, eventually, DockerFixture};
use support::{Backend, TestDb};

const LONG: Duration = Duration::from_secs(180);

/// `docker inspect` of a container's HostConfig, parsed.
fn host_config(container: &str) -> serde_json::Value {
    let json = docker(&["inspect", "--format", "{{json .HostConfig}}", container])
        .unwrap_or_else(|e| panic!("inspect {container}: {e}"));
    serde_json::from_str(&json).expect("HostConfig json")
}

/// Runs `agent-stub connect target` inside `container`: true when a TCP
/// connection opened, false when it did not; panics on anything else (an
/// agent image without the `connect` subcommand: `make agent-image`).
fn connects_from(container: &str, target: &str) -> bool {
    let out = Command::new("docker")
        .args(["exec", container, "/agent-stub", "connect", target])
        .output()
        .expect("docker exec");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        other => panic!(
            "docker exec {container} /agent-stub connect {target}: {other:?}: {}{} (rebuild the agent image: make agent-image)",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// The status of `user` once it is `failed`.
async fn wait_failed(store: &Store, user: &str) -> ContainerStatus {
    wait_for_status(store, user, LONG, "failed", |s| s.phase == Phase::Failed).await
}

/// A container's address on `network`.
fn address_on(container: &str, network: &str) -> String {
    let format = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    docker(&["inspect", "--format", &format, container]).expect("container address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_container_has_every_capability_dropped_no_new_privileges_and_pids_and_log_caps() {
    // Regression: containers ran with Docker's default capabilities (NET_RAW
    // among them), could gain privileges, and had no process or log limit.
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("confine");
    let _controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice')")
        .await;
    let status = wait_running(&store, "alice").await;

    assert_confined(
        status.container_id.as_deref().unwrap(),
        serde_json::Value::Null,
        512,
        ("10m", "3"),
    );
}

/// Asserts what `docker inspect` shows of a container's confinement:
/// every capability dropped and `cap_add` given back, `no-new-privileges`,
/// the pids limit and the json-file log rotation.
fn assert_confined(container: &str, cap_add: serde_json::Value, pids: i64, log: (&str, &str)) {
    let host = host_config(container);
    assert_eq!(host["CapDrop"], serde_json::json!(["ALL"]), "{host}");
    assert_eq!(host["CapAdd"], cap_add, "{host}");
    assert_eq!(
        host["SecurityOpt"],
        serde_json::json!(["no-new-privileges:true"]),
        "{host}"
    );
    assert_eq!(host["PidsLimit"], pids, "{host}");
    assert_eq!(host["LogConfig"]["Type"], "json-file", "{host}");
    assert_eq!(host["LogConfig"]["Config"]["max-size"], log.0, "{host}");
    assert_eq!(host["LogConfig"]["Config"]["max-file"], log.1, "{host}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_isolated_networks_an_agent_cannot_reach_another_agent_but_the_host_can() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("isolated");
    let config = ControllerConfig::new(&db, &fx)
        .with("CLAWFLEET_NETWORK_ISOLATION", "isolated")
        .with("CLAWFLEET_CAP_ADD", "cap_chown")
        .with("CLAWFLEET_PIDS_LIMIT", "100")
        .with("CLAWFLEET_LOG_MAX_SIZE", "1m")
        .with("CLAWFLEET_LOG_MAX_FILE", "2");
    let _controller = ControllerProcess::start(&config);
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('a'), ('b')")
        .await;
    let a = wait_running(&store, "a").await;
    let b = wait_running(&store, "b").await;
    let a_name = a.container_name.as_deref().unwrap();
    let b_name = b.container_name.as_deref().unwrap();

    let icc = docker(&[
        "network",
        "inspect",
        "--format",
        "{{index .Options \"com.docker.network.bridge.enable_icc\"}}",
        &fx.network,
    ])
    .expect("network inspect");
    assert_eq!(icc, "false");
    // The probe works: A reaches its own gateway.
    assert!(connects_from(a_name, "127.0.0.1:18789"));
    assert!(
        !connects_from(a_name, &format!("{b_name}:18789")),
        "A reached B by name"
    );
    let b_ip = address_on(b_name, &fx.network);
    assert!(
        !connects_from(a_name, &format!("{b_ip}:18789")),
        "A reached B at {b_ip}"
    );
    let (code, body) = gateway(b.host_port.unwrap(), "GET", "/healthz", None).expect("host_url");
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        b.host_url,
        Some(format!("http://127.0.0.1:{}", b.host_port.unwrap()))
    );

    // The overrides reach the container.
    assert_confined(a_name, serde_json::json!(["CHOWN"]), 100, ("1m", "2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_network_that_disagrees_with_the_isolation_setting_is_never_used() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("netmismatch");
    // An existing agents' network with inter-container traffic on.
    docker(&[
        "network",
        "create",
        "--label",
        &format!("{LABEL_INSTANCE}={}", fx.instance),
        &fx.network,
    ])
    .expect("network create");
    let controller = ControllerProcess::start(
        &ControllerConfig::new(&db, &fx).with("CLAWFLEET_NETWORK_ISOLATION", "isolated"),
    );
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice')")
        .await;

    let failed = wait_failed(&store, "alice").await;
    let message = failed.message.clone().unwrap_or_default();
    assert!(
        message.contains(&fx.network) && message.contains("--network-isolation"),
        "{message}"
    );
    assert!(failed.container_id.is_none(), "no container was made");
    let addr = controller.http_addr().await;
    let (code, body) = eventually(LONG, "/readyz naming the network", || async {
        gateway(addr.port(), "GET", "/readyz", None)
            .ok()
            .filter(|(_, body)| body.contains(&fx.network))
    })
    .await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("--network-isolation isolated"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_labelled_for_another_instance_is_never_mounted_and_the_user_fails_naming_it() {
    // Regression: `make demo` after `make run` mounted the default
    // instance's `mosaic-user-alice-state` into the demo's alice.
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("forvol");
    let volume = fx.name("alice-state");
    let label = |k: &str, v: &str| format!("{k}={v}");
    docker(&[
        "volume",
        "create",
        "--label",
        &label(LABEL_MANAGED, "true"),
        "--label",
        &label(LABEL_INSTANCE, &format!("{}-other", fx.instance)),
        "--label",
        &label(LABEL_USER_ID, "alice"),
        &volume,
    ])
    .expect("volume create");
    let _controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('alice')")
        .await;

    let failed = wait_failed(&store, "alice").await;
    let message = failed.message.clone().unwrap_or_default();
    assert!(
        message.contains(&volume) && message.contains("-other"),
        "{message}"
    );
    assert!(
        docker(&["inspect", &fx.name("alice")]).is_err(),
        "no container was made on the volume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unlabelled_volume_of_the_right_name_is_adopted() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("adoptvol");
    let volume = fx.name("bob-state");
    docker(&["volume", "create", &volume]).expect("volume create");
    let _controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    db.exec("INSERT INTO desired_containers (user_id) VALUES ('bob')")
        .await;

    let running = wait_running(&store, "bob").await;
    let mounted = docker(&[
        "inspect",
        "--format",
        "{{range .Mounts}}{{.Name}}{{end}}",
        running.container_id.as_deref().unwrap(),
    ])
    .expect("inspect");
    assert_eq!(mounted, volume);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_keep_their_12_hex_names_and_new_users_get_20_hex_names() {
    let db = TestDb::new(Backend::Sqlite).await;
    let store = db.store().await;
    let fx = DockerFixture::new("names");
    let (recorded, returning, new) = ("Carol@Example.com", "Erin@Example.com", "Dave@Example.com");
    // Carol's status row records the name an earlier build gave her.
    let carol = UserNames::legacy(&fx.prefix, recorded).unwrap();
    let now = chrono::Utc::now();
    let row = ContainerStatus {
        phase: Phase::Stopped,
        container_name: Some(carol.container.clone()),
        ..ContainerStatus::pending(recorded, now)
    };
    store.write_status(&row, now).await.expect("status row");
    // Erin was deleted (no status row) and her earlier volume was kept.
    let erin = UserNames::legacy(&fx.prefix, returning).unwrap();
    docker(&[
        "volume",
        "create",
        "--label",
        &format!("{LABEL_INSTANCE}={}", fx.instance),
        "--label",
        &format!("{LABEL_USER_ID}={returning}"),
        &erin.volume,
    ])
    .expect("volume create");
    let _controller = ControllerProcess::start(&ControllerConfig::new(&db, &fx));
    for user in [recorded, returning, new] {
        db.exec(&format!(
            "INSERT INTO desired_containers (user_id) VALUES ('{user}')"
        ))
        .await;
    }

    for (user, names) in [
        (recorded, carol),
        (returning, erin),
        (new, UserNames::current(&fx.prefix, new)),
    ] {
        let status = wait_running(&store, user).await;
        assert_eq!(
            status.container_name.as_deref(),
            Some(names.container.as_str()),
            "{user}"
        );
        let mounted = docker(&[
            "inspect",
            "--format",
            "{{range .Mounts}}{{.Name}}{{end}}",
            &names.container,
        ])
        .expect("inspect");
        assert_eq!(mounted, names.volume, "{user}");
    }
    let dave = UserNames::current(&fx.prefix, new).container;
    assert_eq!(dave.rsplit('-').next().unwrap().len(), 20, "{dave}");
}
