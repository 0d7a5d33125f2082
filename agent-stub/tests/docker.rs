//! Runs the agent-stub image on the real Docker engine, driving the `docker` CLI: the
//! image is built once per test binary by `build-image.sh`; each test creates uniquely
//! named containers and volumes (labelled `io.clawfleet.test=agent-stub`) and removes
//! them again, even when it fails.
//!
//! Docker is required: without it these tests fail, they never skip.

mod common;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use common::{json_field, request, wait_for};

const IMAGE: &str = "clawfleet-agent-stub:dev";
const LABEL: &str = "io.clawfleet.test=agent-stub";
const STATE_DIR: &str = "/home/node/.openclaw";
const DEADLINE: Duration = Duration::from_secs(30);

/// Runs `docker args…`; its trimmed stdout, or an error with its stderr.
fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(format!(
            "docker {args:?}: {}: {}",
            output.status,
            stderr.trim()
        ))
    }
}

/// Builds the image once for all tests of this binary, panicking if that fails.
fn build_image_once() {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/build-image.sh");
        let output = Command::new("bash")
            .arg(script)
            .env("IMAGE", IMAGE)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run {script}: {e}"))?;
        if output.status.success() {
            Ok(())
        } else {
            let stderr = String::from_utf8_lossy(&output.stderr);
            Err(format!("{script} failed ({}):\n{stderr}", output.status))
        }
    });
    if let Err(e) = built {
        panic!("building {IMAGE}: {e}");
    }
}

/// The containers and volumes a test created; removed on drop.
#[derive(Default)]
struct Fixture {
    containers: Vec<String>,
    volumes: Vec<String>,
}

impl Fixture {
    fn unique_name(kind: &str) -> String {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        format!("clawfleet-stub-test-{}-{n}-{kind}", std::process::id())
    }

    fn volume(&mut self) -> String {
        let name = Self::unique_name("state");
        self.volumes.push(name.clone());
        docker(&["volume", "create", "--label", LABEL, &name]).unwrap();
        name
    }

    /// Starts a detached container of the image with `env`, `volume` mounted on the
    /// state dir, and the gateway port published on an ephemeral loopback port.
    fn run(&mut self, volume: Option<&str>, env: &[(&str, &str)]) -> String {
        let name = Self::unique_name("gw");
        self.containers.push(name.clone());
        let mut args = vec!["run", "--detach", "--name", &name, "--label", LABEL];
        args.extend(["--publish", "127.0.0.1::18789"]);
        let mount = volume.map(|v| format!("{v}:{STATE_DIR}"));
        if let Some(mount) = &mount {
            args.extend(["--volume", mount]);
        }
        let env: Vec<String> = env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        for pair in &env {
            args.extend(["--env", pair]);
        }
        args.push(IMAGE);
        docker(&args).unwrap();
        name
    }

    fn remove(&mut self, container: &str) {
        docker(&["rm", "--force", container]).unwrap();
        self.containers.retain(|c| c != container);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        for container in &self.containers {
            let _ = docker(&["rm", "--force", "--volumes", container]);
        }
        for volume in &self.volumes {
            let _ = docker(&["volume", "rm", "--force", volume]);
        }
    }
}

/// The loopback address the container's gateway port is published on.
fn published_addr(container: &str) -> SocketAddr {
    let out = docker(&["port", container, "18789/tcp"]).unwrap();
    let first = out.lines().next().unwrap_or_default();
    first
        .parse()
        .unwrap_or_else(|_| panic!("unexpected `docker port` output {out:?}"))
}

/// Waits until the container's gateway answers `/readyz`, and returns its address.
fn wait_ready(container: &str) -> SocketAddr {
    let addr = published_addr(container);
    wait_for(
        &format!("{container} to answer /readyz"),
        DEADLINE,
        || match request(addr, "GET", "/readyz", None) {
            Ok(reply) if reply.status == 200 => Ok(addr),
            Ok(reply) => Err(format!("status {}", reply.status)),
            Err(e) => Err(e.to_string()),
        },
    )
}

fn wait_health(container: &str, wanted: &str) {
    wait_for(&format!("{container} to be {wanted}"), DEADLINE, || {
        let status = docker(&["inspect", "--format", "{{.State.Health.Status}}", container])?;
        if status == wanted {
            Ok(())
        } else {
            Err(status)
        }
    });
}

/// `docker wait`, bounded by [`DEADLINE`]: the container's exit code.
fn wait_exit(container: &str) -> i32 {
    let mut child = Command::new("docker")
        .args(["wait", container])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run docker wait");
    let exited = wait_for(&format!("{container} to exit"), DEADLINE, || {
        child
            .try_wait()
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "running".to_owned())
    });
    assert!(exited.success(), "docker wait {container}: {exited}");
    let output = child.wait_with_output().expect("docker wait output");
    let code = String::from_utf8_lossy(&output.stdout);
    code.trim()
        .parse()
        .unwrap_or_else(|_| panic!("docker wait printed {code:?}"))
}

fn whoami(addr: SocketAddr, token: &str) -> String {
    let reply = request(addr, "GET", "/v1/whoami", Some(token)).unwrap();
    assert_eq!(reply.status, 200, "{}", reply.body);
    reply.body
}

fn token() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("gw-token-{}-{nanos}", std::process::id())
}

#[test]
fn serves_gets_healthy_and_keeps_its_boot_count_across_recreate() {
    build_image_once();
    let mut fx = Fixture::default();
    let token = token();
    let env = [
        ("OPENCLAW_GATEWAY_TOKEN", token.as_str()),
        ("AGENT_TOKEN", token.as_str()),
        ("AGENT_ID", "agent-42"),
    ];
    let volume = fx.volume();
    let first = fx.run(Some(&volume), &env);
    let addr = wait_ready(&first);

    assert_eq!(request(addr, "GET", "/healthz", None).unwrap().status, 200);
    assert_eq!(
        request(addr, "GET", "/v1/whoami", None).unwrap().status,
        401
    );
    assert_eq!(
        request(addr, "GET", "/v1/whoami", Some("wrong"))
            .unwrap()
            .status,
        401
    );
    let body = whoami(addr, &token);
    assert_eq!(
        json_field(&body, "agent_id"),
        Some("\"agent-42\""),
        "{body}"
    );
    assert_eq!(json_field(&body, "boots"), Some("1"), "{body}");
    assert_eq!(
        json_field(&body, "agent_token_matches"),
        Some("true"),
        "{body}"
    );
    assert!(!body.contains(&token), "whoami must not echo the token");
    wait_health(&first, "healthy");

    let logs = Command::new("docker")
        .args(["logs", &first])
        .output()
        .unwrap();
    let logs = [logs.stdout, logs.stderr].concat();
    let logs = String::from_utf8_lossy(&logs);
    assert!(logs.contains("GET /v1/whoami 200"), "{logs}");
    assert!(!logs.contains(&token), "the log must not contain the token");

    // Re-create on the same volume: the state, and so the counter, survives.
    fx.remove(&first);
    let second = fx.run(Some(&volume), &env);
    let addr = wait_ready(&second);
    assert_eq!(json_field(&whoami(addr, &token), "boots"), Some("2"));
}

#[test]
fn unhealthy_and_exit_endpoints_drive_docker_state() {
    build_image_once();
    let mut fx = Fixture::default();
    let token = token();
    let container = fx.run(None, &[("OPENCLAW_GATEWAY_TOKEN", &token)]);
    let addr = wait_ready(&container);
    assert!(json_field(&whoami(addr, &token), "agent_token_matches") == Some("false"));
    wait_health(&container, "healthy");

    let reply = request(addr, "POST", "/v1/unhealthy", Some(&token)).unwrap();
    assert_eq!(reply.status, 200);
    wait_health(&container, "unhealthy");

    let reply = request(addr, "POST", "/v1/exit?code=3", Some(&token)).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(wait_exit(&container), 3);
}

#[test]
fn refuses_to_start_without_a_token() {
    build_image_once();
    let mut fx = Fixture::default();
    let container = fx.run(None, &[("AGENT_ID", "agent-without-token")]);
    assert_eq!(wait_exit(&container), 78);
}
