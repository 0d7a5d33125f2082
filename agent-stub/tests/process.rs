//! Runs the `agent-stub` binary directly, without Docker: start-up checks, the HTTP
//! server on a real socket, the boot counter across restarts, exit codes and the
//! `healthcheck` subcommand.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::{json_field, raw_request, request, wait_for};

const BIN: &str = env!("CARGO_BIN_EXE_agent-stub");
const TOKEN: &str = "process-test-token";
const DEADLINE: Duration = Duration::from_secs(10);

/// A fresh state directory under the system temp dir, removed on drop.
struct StateDir(PathBuf);

impl StateDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let name = format!("clawfleet-agent-stub-proc-{}-{n}", std::process::id());
        let dir = std::env::temp_dir().join(name);
        let _ = std::fs::remove_dir_all(&dir);
        Self(dir)
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The stub's command with a clean environment, a random port and `state_dir`.
fn command(state_dir: &Path, token: Option<&str>) -> Command {
    let mut command = Command::new(BIN);
    command
        .env_clear()
        .env("OPENCLAW_GATEWAY_PORT", "0")
        .env("OPENCLAW_STATE_DIR", state_dir)
        .env("AGENT_ID", "agent-\"p\"")
        .env("AGENT_TOKEN", TOKEN);
    if let Some(token) = token {
        command.env("OPENCLAW_GATEWAY_TOKEN", token);
    }
    command
}

/// A running stub, killed on drop.
struct Stub {
    child: Child,
    addr: SocketAddr,
}

impl Stub {
    fn start(state_dir: &Path) -> Self {
        let mut child = command(state_dir, Some(TOKEN))
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn agent-stub");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout
            .read_line(&mut line)
            .expect("read the first log line");
        let port = line
            .trim_end()
            .rsplit_once(':')
            .and_then(|(_, port)| port.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("no port in {line:?}"));
        // Keep draining the log so the stub never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    fn wait(&mut self) -> ExitStatus {
        wait_for("the stub to exit", DEADLINE, || {
            self.child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "still running".to_owned())
        })
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn refuses_to_start_without_a_token() {
    let state = StateDir::new();
    for token in [None, Some("")] {
        let output = command(&state.0, token).output().expect("run agent-stub");
        assert_eq!(output.status.code(), Some(78), "token {token:?}");
        assert!(String::from_utf8_lossy(&output.stderr).contains("OPENCLAW_GATEWAY_TOKEN"));
    }
    assert!(!state.0.exists(), "no boot is counted without a token");
}

#[test]
fn serves_counts_boots_and_exits_on_request() {
    let state = StateDir::new();
    let stub = Stub::start(&state.0);
    let addr = stub.addr;
    assert_eq!(request(addr, "GET", "/healthz", None).unwrap().status, 200);
    assert_eq!(request(addr, "GET", "/readyz", None).unwrap().status, 200);
    assert_eq!(
        request(addr, "GET", "/v1/whoami", None).unwrap().status,
        401
    );
    assert_eq!(
        request(addr, "GET", "/v1/whoami", Some("nope"))
            .unwrap()
            .status,
        401
    );
    let whoami = request(addr, "GET", "/v1/whoami", Some(TOKEN)).unwrap();
    assert_eq!(whoami.status, 200);
    assert_eq!(json_field(&whoami.body, "boots"), Some("1"));
    assert_eq!(
        json_field(&whoami.body, "agent_token_matches"),
        Some("true")
    );
    assert!(
        whoami.body.contains(r#""agent_id":"agent-\"p\"""#),
        "{}",
        whoami.body
    );
    assert!(!whoami.body.contains(TOKEN));
    assert_eq!(
        request(addr, "GET", "/elsewhere", None).unwrap().status,
        404
    );
    assert_eq!(request(addr, "PUT", "/healthz", None).unwrap().status, 405);
    assert_eq!(raw_request(addr, b"nonsense\r\n\r\n").unwrap().status, 400);
    let huge = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "x".repeat(20_000));
    assert_eq!(raw_request(addr, huge.as_bytes()).unwrap().status, 431);
    let with_body = b"POST /v1/unhealthy HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
    assert_eq!(raw_request(addr, with_body).unwrap().status, 401);

    // The counter lives in the state dir: a restart sees the previous value.
    drop(stub);
    let mut stub = Stub::start(&state.0);
    let whoami = request(stub.addr, "GET", "/v1/whoami", Some(TOKEN)).unwrap();
    assert_eq!(json_field(&whoami.body, "boots"), Some("2"));

    let reply = request(stub.addr, "POST", "/v1/exit?code=7", Some(TOKEN)).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(stub.wait().code(), Some(7));
}

#[test]
fn healthcheck_subcommand_follows_healthz() {
    let state = StateDir::new();
    let stub = Stub::start(&state.0);
    let healthcheck = || {
        let output = Command::new(BIN)
            .arg("healthcheck")
            .env_clear()
            .env("OPENCLAW_GATEWAY_PORT", stub.addr.port().to_string())
            .output()
            .expect("run agent-stub healthcheck");
        output.status.code()
    };
    assert_eq!(healthcheck(), Some(0));
    let reply = request(stub.addr, "POST", "/v1/unhealthy", Some(TOKEN)).unwrap();
    assert_eq!(reply.status, 200);
    assert_eq!(
        request(stub.addr, "GET", "/healthz", None).unwrap().status,
        503
    );
    assert_eq!(healthcheck(), Some(1));

    let mut usage = Command::new(BIN)
        .arg("bogus")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = String::new();
    usage
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(usage.wait().unwrap().code(), Some(64));
    assert!(stderr.contains("usage"));
}
