//! Taking over the original service's fleet on the real engine (README
//! "Taking over from the original service"): unlabelled `<prefix><id>`
//! containers with their token in `AGENT_TOKEN`, their volume
//! `<prefix><id>-state` and a published port, imported with `clawfleet
//! import engine` and adopted by `clawfleet run`, keeping token, port,
//! volume and state.

mod support;

use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use clawfleet::status::{ContainerStatus, Phase};
use clawfleet::store::Store;
use support::controller::{
    gateway, token_of, wait_for_status, wait_running, whoami, ControllerConfig, ControllerProcess,
};
use support::docker::{agent_image, container_state, docker, eventually, DockerFixture};
use support::{Backend, TestDb};

/// The agent's state directory, where the stand-in counts its boots.
const STATE_PATH: &str = "/home/node/.openclaw";

/// One container of the original fleet.
struct Original {
    user: &'static str,
    token: String,
    port: u16,
    running: bool,
}

/// Starts `user`'s container as the original service did: unlabelled,
/// named `<prefix><user>`, on volume `<prefix><user>-state`, publishing
/// `port`, its token in `AGENT_TOKEN` (and in `OPENCLAW_GATEWAY_TOKEN`,
/// which the stand-in needs to start); then waits for its gateway and
/// stops it unless `running`. Returns the container's id.
async fn original(fx: &DockerFixture, o: &Original) -> String {
    let name = fx.name(o.user);
    let volume = format!("{name}-state:{STATE_PATH}");
    let publish = format!("127.0.0.1:{}:18789", o.port);
    let agent_token = format!("AGENT_TOKEN={}", o.token);
    let gateway_token = format!("OPENCLAW_GATEWAY_TOKEN={}", o.token);
    let id = docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "-v",
        &volume,
        "-p",
        &publish,
        "-e",
        &agent_token,
        "-e",
        &gateway_token,
        agent_image(),
    ])
    .expect("docker run of an original container");
    let port = o.port;
    let token = o.token.clone();
    eventually(Duration::from_secs(60), "the original gateway", || {
        let token = token.clone();
        async move {
            tokio::task::spawn_blocking(move || gateway(port, "GET", "/v1/whoami", Some(&token)))
                .await
                .ok()?
                .ok()
                .filter(|(code, _)| *code == 200)
        }
    })
    .await;
    if !o.running {
        docker(&["stop", &name]).expect("docker stop");
    }
    id.trim().to_owned()
}

/// The fleet of `users` (id, running) on ports `first`, `first + 1`, …
async fn fleet(fx: &DockerFixture, users: &[(&'static str, bool)], first: u16) -> Vec<Original> {
    let mut fleet = Vec::new();
    for (i, (user, running)) in users.iter().enumerate() {
        let o = Original {
            user,
            token: format!("original-token-of-{user}-0123456789abcdef"),
            port: first + i as u16,
            running: *running,
        };
        original(fx, &o).await;
        fleet.push(o);
    }
    fleet
}

/// `clawfleet import engine <args>` with the controller's settings; its output.
fn import_engine(config: &ControllerConfig, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
        .args(["import", "engine"])
        .args(args)
        .envs(&config.env)
        .output()
        .expect("run clawfleet import engine");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{args:?}: {text}");
    text
}

/// `docker inspect -f <format> <name>`, trimmed.
fn inspect(name: &str, format: &str) -> String {
    docker(&["inspect", "-f", format, name])
        .expect("docker inspect")
        .trim()
        .to_owned()
}

/// The names of every container, labelled or not, named `<prefix>…`.
fn containers_named(fx: &DockerFixture) -> Vec<String> {
    let mut names: Vec<String> = docker(&["ps", "-a", "--format", "{{.Names}}"])
        .expect("docker ps")
        .lines()
        .filter(|n| n.starts_with(&fx.prefix))
        .map(str::to_owned)
        .collect();
    names.sort();
    names
}

/// Waits until `user`'s container is clawfleet's and stopped.
async fn wait_adopted_stopped(store: &Store, fx: &DockerFixture, user: &str) -> ContainerStatus {
    let name = fx.name(user);
    wait_for_status(
        store,
        user,
        Duration::from_secs(120),
        "taken over and stopped",
        |s| {
            s.phase == Phase::Stopped
                && s.container_id.is_some()
                && inspect(&name, "{{index .Config.Labels \"io.clawfleet.managed\"}}") == "true"
        },
    )
    .await
}

/// Checks what a user taken over keeps: one container, clawfleet's, on its
/// old volume, with its old token.
fn assert_kept(fx: &DockerFixture, o: &Original, status: &ContainerStatus) {
    let name = fx.name(o.user);
    assert_eq!(
        inspect(&name, "{{index .Config.Labels \"io.clawfleet.user-id\"}}"),
        o.user
    );
    assert_eq!(
        inspect(&name, "{{range .Mounts}}{{.Name}}{{end}}"),
        format!("{name}-state"),
        "the same volume"
    );
    assert_eq!(token_of(status), o.token, "the same token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_taken_over_keeps_its_tokens_ports_volumes_and_stopped_users() {
    let db = TestDb::new(Backend::Sqlite).await;
    let fx = DockerFixture::new("takeover");
    let config = ControllerConfig::new(&db, &fx);
    let (first, _) = config.ports();
    let fleet = fleet(&fx, &[("1", true), ("2", true), ("3", false)], first).await;

    let dry = import_engine(&config, &["--dry-run"]);
    assert!(dry.contains("3 to create"), "{dry}");
    let text = import_engine(&config, &["--idle-timeout", "30m"]);
    assert!(text.contains("3 user(s): 3 created"), "{text}");
    let again = import_engine(&config, &[]);
    assert!(again.contains("0 created, 0 updated, 3 kept"), "{again}");

    let store = db.store().await;
    let started = std::time::Instant::now();
    let controller = ControllerProcess::start(&config);
    for o in fleet.iter().filter(|o| o.running) {
        let status = wait_running(&store, o.user).await;
        assert_kept(&fx, o, &status);
        assert_eq!(status.host_port, Some(o.port), "the same port");
        let who = whoami(&status);
        assert_eq!(
            who["boots"], 2,
            "the old volume's boot counter goes on: {who}"
        );
    }
    let stopped = &fleet[2];
    let status = wait_adopted_stopped(&store, &fx, stopped.user).await;
    assert_kept(&fx, stopped, &status);
    assert_eq!(status.host_port, Some(stopped.port), "the same port");
    assert_eq!(
        container_state(&fx.name(stopped.user)).as_deref(),
        Some("created"),
        "a stopped user stays stopped: recreated, never started"
    );
    let names: Vec<String> = fleet.iter().map(|o| fx.name(o.user)).collect();
    assert_eq!(containers_named(&fx), names, "one container per user");
    eprintln!(
        "taken over: {} users in {:?} from the controller's start",
        fleet.len(),
        started.elapsed()
    );
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_whose_port_another_process_holds_moves_and_the_others_keep_theirs() {
    let db = TestDb::new(Backend::Sqlite).await;
    let fx = DockerFixture::new("takeover-port");
    let config = ControllerConfig::new(&db, &fx);
    let (first, _) = config.ports();
    // The first port stays free: the one a user who moves gets.
    let fleet = fleet(&fx, &[("1", true), ("2", true), ("3", false)], first + 1).await;
    let held = fleet[2].port;
    let foreign = TcpListener::bind(("127.0.0.1", held)).expect("hold the stopped user's port");

    let text = import_engine(&config, &[]);
    assert!(text.contains("3 user(s): 3 created"), "{text}");
    let store = db.store().await;
    let controller = ControllerProcess::start(&config);
    for o in &fleet[..2] {
        let status = wait_running(&store, o.user).await;
        assert_eq!(status.host_port, Some(o.port), "the others keep theirs");
        assert_kept(&fx, o, &status);
    }
    let status = wait_adopted_stopped(&store, &fx, "3").await;
    assert_kept(&fx, &fleet[2], &status);
    let moved = status.host_port.expect("a port");
    assert_ne!(moved, held);
    let message = status.message.clone().unwrap_or_default();
    assert_eq!(
        message,
        format!(
            "host port {held} of the taken-over container is held by another process; moved to {moved}"
        )
    );
    assert!(
        inspect(&fx.name("3"), "{{json .HostConfig.PortBindings}}").contains(&moved.to_string()),
        "the container publishes the new port"
    );
    drop(foreign);
    drop(controller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_whose_recreate_fails_leaves_the_original_container_as_it_was() {
    let db = TestDb::new(Backend::Sqlite).await;
    let fx = DockerFixture::new("takeover-fail");
    let config = ControllerConfig::new(&db, &fx);
    let (first, _) = config.ports();
    let fleet = fleet(&fx, &[("1", true)], first).await;
    let o = &fleet[0];
    let name = fx.name(o.user);
    let before = inspect(
        &name,
        "{{.Id}} {{.State.StartedAt}} {{json .Config.Labels}}",
    );
    // A foreign container holds the replacement's name: the create fails.
    let next = format!("{name}-next");
    docker(&["create", "--name", &next, agent_image()]).expect("docker create");

    let text = import_engine(&config, &[]);
    assert!(text.contains("1 user(s): 1 created"), "{text}");
    let store = db.store().await;
    let controller = ControllerProcess::start(&config);
    wait_for_status(
        &store,
        o.user,
        Duration::from_secs(60),
        "the failed create reported",
        |s| {
            s.message
                .as_deref()
                .is_some_and(|m| m.contains("already in use"))
        },
    )
    .await;
    assert_eq!(
        inspect(
            &name,
            "{{.Id}} {{.State.StartedAt}} {{json .Config.Labels}}"
        ),
        before,
        "the same container, never restarted nor relabelled"
    );
    assert_eq!(container_state(&name).as_deref(), Some("running"));
    let port = o.port;
    let token = o.token.clone();
    let answer = tokio::task::spawn_blocking(move || {
        gateway(port, "GET", "/v1/whoami", Some(&token)).expect("the old gateway answers")
    })
    .await
    .unwrap();
    assert_eq!(answer.0, 200, "{}", answer.1);
    assert_eq!(
        containers_named(&fx),
        [name.clone(), next.clone()],
        "nothing else made"
    );
    drop(controller);
}
