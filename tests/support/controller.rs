//! A `clawfleet run` process for integration tests: started with the
//! settings of a [`DockerFixture`] and a [`TestDb`], its log kept in a file
//! (printed when a test fails), stopped with SIGTERM — or killed with
//! SIGKILL — by the test.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use clawfleet::secrets::{EncryptionKey, KeyRing};
use clawfleet::status::{ContainerStatus, Phase};
use clawfleet::store::Store;

use super::docker::{eventually, DockerFixture, AGENT_IMAGE};
use super::http::Client;
use super::TestDb;

/// The encryption key every test controller runs with, so tests can open tokens.
pub fn test_key() -> EncryptionKey {
    use std::sync::OnceLock;
    static KEY: OnceLock<EncryptionKey> = OnceLock::new();
    KEY.get_or_init(|| EncryptionKey::generate("test").expect("key"))
        .clone()
}

/// The key ring matching [`test_key`].
pub fn test_ring() -> KeyRing {
    KeyRing::new(vec![test_key()]).expect("ring")
}

/// `token` sealed as builds before the v2 format sealed it (`v1`: AES-256-GCM
/// with no associated data), with `key`.
pub fn seal_v1(key: &EncryptionKey, token: &clawfleet::secrets::GatewayToken) -> String {
    use aes_gcm::aead::{Aead, KeyInit};
    use base64::Engine as _;
    let base64 = base64::engine::general_purpose::STANDARD;
    let entry = key.to_config_entry();
    let (id, material) = entry.split_once(':').expect("id:key");
    let material = base64.decode(material).expect("base64 key");
    let nonce = [9u8; 12];
    let ciphertext = aes_gcm::Aes256Gcm::new_from_slice(&material)
        .expect("a 32-byte key")
        .encrypt(
            aes_gcm::Nonce::from_slice(&nonce),
            token.expose().as_bytes(),
        )
        .expect("seal");
    format!(
        "v1:{id}:{}",
        base64.encode([&nonce[..], &ciphertext].concat())
    )
}

/// A `running` status row for `user` holding `sealed` as its token, nothing
/// else known.
pub fn status_with_token(user: &str, sealed: String) -> ContainerStatus {
    ContainerStatus {
        phase: Phase::Running,
        gateway_token: Some(sealed),
        ..ContainerStatus::pending(user, chrono::Utc::now())
    }
}

/// Writes `status` as the controller would.
pub async fn write_status(store: &Store, status: &ContainerStatus) {
    store
        .write_status(status, chrono::Utc::now())
        .await
        .expect("write status");
}

/// A port range of `len` ports no other test of this suite uses while this
/// process lives: the range's 50-port blocks are claimed with file locks
/// (released when the test's process exits), so tests running beside each
/// other never share a port.
pub fn port_range(len: u16) -> (u16, u16) {
    const BLOCK: u64 = 50;
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    let seed = std::process::id() as u64 * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as u64);
    // Below the kernel's ephemeral ports: a client socket of any process
    // (this suite's own database and engine connections) may hold one of
    // those, and a range there would look partly taken by others.
    let ephemeral_start = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(32768);
    let top = ephemeral_start.clamp(21000, 40000);
    let blocks = (top - 20000) / BLOCK;
    let needed = u64::from(len).div_ceil(BLOCK);
    let dir = std::env::temp_dir().join("clawfleet-test-ports");
    std::fs::create_dir_all(&dir).expect("port lock folder");
    let claim = |block: u64| -> Option<std::fs::File> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{}", 20000 + block * BLOCK)))
            .expect("port lock file");
        file.try_lock().ok().map(|()| file)
    };
    for i in 0..blocks {
        let first = (seed + i) % (blocks - needed + 1);
        let claimed: Vec<std::fs::File> = (first..first + needed).map_while(claim).collect();
        if claimed.len() as u64 == needed {
            HELD.lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(claimed);
            let start = (20000 + first * BLOCK) as u16;
            return (start, start + len - 1);
        }
    }
    panic!("no free {len}-port range below {top}: every block is held by a running test");
}

/// How to start a controller.
#[derive(Clone, Debug)]
pub struct ControllerConfig {
    /// Extra environment (overrides the defaults).
    pub env: BTreeMap<String, String>,
}

impl ControllerConfig {
    /// The settings of `fx` on `db`, with a port range of its own.
    pub fn new(db: &TestDb, fx: &DockerFixture) -> Self {
        let (start, end) = port_range(200);
        let env = BTreeMap::from([
            ("DATABASE_URL".to_owned(), db.url.clone()),
            ("CLAWFLEET_INSTANCE".to_owned(), fx.instance.clone()),
            ("OPENCLAW_NETWORK".to_owned(), fx.network.clone()),
            ("CLAWFLEET_NAME_PREFIX".to_owned(), fx.prefix.clone()),
            ("OPENCLAW_IMAGE".to_owned(), AGENT_IMAGE.to_owned()),
            ("CLAWFLEET_PORT_RANGE".to_owned(), format!("{start}-{end}")),
            (
                "CLAWFLEET_ENCRYPTION_KEYS".to_owned(),
                test_key().to_config_entry().to_string(),
            ),
            ("CLAWFLEET_LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
            ("CLAWFLEET_POLL_INTERVAL".to_owned(), "100ms".to_owned()),
            ("CLAWFLEET_STOP_TIMEOUT".to_owned(), "2s".to_owned()),
            ("RUST_LOG".to_owned(), "info,clawfleet=debug".to_owned()),
        ]);
        Self { env }
    }

    /// Sets one environment variable.
    pub fn with(mut self, key: &str, value: &str) -> Self {
        self.env.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The port range given to the controller.
    pub fn ports(&self) -> (u16, u16) {
        let range = &self.env["CLAWFLEET_PORT_RANGE"];
        let (a, b) = range.split_once('-').expect("range");
        (a.parse().expect("start"), b.parse().expect("end"))
    }
}

/// A running `clawfleet run`.
pub struct ControllerProcess {
    child: Option<Child>,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ControllerProcess {
    /// Starts `clawfleet run` with `config`.
    pub fn start(config: &ControllerConfig) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("controller.log");
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_clawfleet"));
        cmd.arg("run")
            .env("CLAWFLEET_DATA_DIR", dir.path())
            .envs(&config.env)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file);
        let child = cmd.spawn().expect("start clawfleet run");
        Self {
            child: Some(child),
            log,
            _dir: dir,
        }
    }

    /// Everything the controller logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address of the controller's HTTP listener (waits for it to be bound).
    pub async fn http_addr(&self) -> std::net::SocketAddr {
        eventually(Duration::from_secs(30), "the http listener", || async {
            self.log().lines().find_map(|line| {
                if !line.contains("http listener ready") {
                    return None;
                }
                // Pretty logs say addr=…, JSON logs "addr":"…".
                let rest = line
                    .split("addr=")
                    .nth(1)
                    .or_else(|| line.split("\"addr\":\"").nth(1))?;
                rest.split(|c: char| c.is_whitespace() || c == '"')
                    .next()?
                    .parse()
                    .ok()
            })
        })
        .await
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The exit status, if the process has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Kills the process with SIGKILL (no chance to clean up).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        for _ in 0..300 {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        panic!(
            "controller did not exit within 30 s of SIGTERM\n{}",
            self.log()
        );
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            let log = self.log();
            // CLAWFLEET_TEST_LOG_DIR=<dir> keeps whole logs of failed tests.
            if let Some(dir) = std::env::var_os("CLAWFLEET_TEST_LOG_DIR") {
                let path = std::path::Path::new(&dir).join(format!(
                    "controller-{}-{}.log",
                    std::process::id(),
                    self._dir
                        .path()
                        .file_name()
                        .unwrap_or_default()
                        .to_string_lossy()
                ));
                if std::fs::create_dir_all(&dir).is_ok() && std::fs::write(&path, &log).is_ok() {
                    eprintln!("---- controller log kept in {} ----", path.display());
                }
            }
            let tail: Vec<&str> = log.lines().rev().take(80).collect();
            eprintln!("---- controller log (last 80 lines) ----");
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Waits until `user`'s status satisfies `check`; panics after `deadline` with the last status.
pub async fn wait_for_status(
    store: &Store,
    user: &str,
    deadline: Duration,
    what: &str,
    check: impl Fn(&ContainerStatus) -> bool,
) -> ContainerStatus {
    let description = format!("{what} (user {user:?})");
    eventually(deadline, &description, || async {
        store.status(user).await.ok().flatten().filter(|s| check(s))
    })
    .await
}

/// Waits until `user` is running and healthy.
pub async fn wait_running(store: &Store, user: &str) -> ContainerStatus {
    wait_for_status(
        store,
        user,
        Duration::from_secs(180),
        "running and healthy",
        |s| {
            s.phase == Phase::Running
                && s.health == Some(clawfleet::status::Health::Healthy)
                && s.container_id.is_some()
        },
    )
    .await
}

/// How long a gateway (or the controller's listener) may take to answer [`gateway`].
const GATEWAY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `method path` to a listener on 127.0.0.1:`port` (a gateway, or the
/// controller's) with `token` as bearer, waiting on the calling thread; status and body.
pub fn gateway(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    Client::new(addr, token)
        .with_timeout(GATEWAY_TIMEOUT)
        .blocking_send(method, path, None)
        .map(|reply| (reply.status, reply.text))
}

/// The plaintext gateway token in a status row (sealed with [`test_key`]).
pub fn token_of(status: &ContainerStatus) -> String {
    let sealed = status.gateway_token.as_deref().expect("a sealed token");
    test_ring()
        .open(&status.user_id, sealed)
        .expect("open token")
        .expose()
        .to_owned()
}

/// `GET /v1/whoami` of a user's gateway, parsed.
pub fn whoami(status: &ContainerStatus) -> serde_json::Value {
    let port = status.host_port.expect("a host port");
    let (code, body) = gateway(port, "GET", "/v1/whoami", Some(&token_of(status))).expect("whoami");
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("json")
}

/// The SQL expression for "now" in the backend's timestamp form.
pub fn sql_now(db: &TestDb) -> &'static str {
    match db.backend {
        super::Backend::Sqlite => "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        super::Backend::Postgres => "now()",
    }
}
