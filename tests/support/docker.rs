//! Docker fixtures of the integration tests: the agent image, a throwaway
//! clawfleet instance per test, the docker CLI for checking what the engine
//! holds, and a proxy in front of the engine's socket that a test can cut.
//!
//! A [`DockerFixture`] owns everything labelled with its instance and every
//! container, volume and network whose name starts with its prefix, and
//! removes exactly those when dropped: tests running side by side, or other
//! clawfleet instances on the engine, are never touched.

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use clawfleet::docker::{
    object_labels, Confinement, ContainerSpec, EnvValue, ResourceLimits, SecretString,
    LABEL_INSTANCE, LABEL_SPEC_HASH,
};
use clawfleet::spec::{GATEWAY_PORT, STATE_PATH};

/// The stand-in gateway image every Docker test runs.
pub const AGENT_IMAGE: &str = "clawfleet-agent-stub:dev";
/// The engine's socket when `DOCKER_HOST` does not name another.
pub const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// The gateway token of the fixture's containers.
pub const TEST_TOKEN: &str = "clawfleet-test-token-0123456789abcdef0123456789";

static FIXTURES: AtomicUsize = AtomicUsize::new(0);

/// The stand-in gateway image (`make agent-image` builds it).
pub fn agent_image() -> &'static str {
    AGENT_IMAGE
}

/// Builds [`AGENT_IMAGE`] with `agent-stub/build-image.sh` unless the engine
/// has it; at most once per process. Panics with the script's output when
/// the build fails.
pub fn ensure_agent_image() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        if docker(&["image", "inspect", "--format", "{{.Id}}", AGENT_IMAGE]).is_ok() {
            return;
        }
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("agent-stub/build-image.sh");
        let output = Command::new("bash")
            .arg(&script)
            .env("IMAGE", AGENT_IMAGE)
            .output()
            .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", script.display()));
        assert!(
            output.status.success(),
            "building {AGENT_IMAGE} with {} failed ({}):\n{}",
            script.display(),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

/// The stand-in image with Docker's default health-check interval (30 s):
/// on engine 20.10 its first health probe comes 30 s after start. Built from
/// [`AGENT_IMAGE`] (no registry needed), at most once per process.
pub const SLOW_HEALTH_IMAGE: &str = "clawfleet-agent-stub:slow-health";

/// Builds [`SLOW_HEALTH_IMAGE`] unless the engine has it.
pub fn ensure_slow_health_image() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        ensure_agent_image();
        if docker(&["image", "inspect", "--format", "{{.Id}}", SLOW_HEALTH_IMAGE]).is_ok() {
            return;
        }
        let dockerfile = format!(
            "FROM {AGENT_IMAGE}\nHEALTHCHECK --interval=30s --timeout=10s --retries=3 CMD [\"/agent-stub\", \"healthcheck\"]\n"
        );
        let mut child = Command::new("docker")
            .args(["build", "--quiet", "--tag", SLOW_HEALTH_IMAGE, "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("docker build");
        use std::io::Write as _;
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(dockerfile.as_bytes())
            .expect("write the Dockerfile");
        let output = child.wait_with_output().expect("docker build");
        assert!(
            output.status.success(),
            "building {SLOW_HEALTH_IMAGE} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    });
}

/// The `DOCKER_HOST` the tests use: the environment's, or empty for the default socket.
pub fn docker_host() -> String {
    std::env::var("DOCKER_HOST").unwrap_or_default()
}

/// Runs the docker CLI; its trimmed stdout, or its stderr when it fails.
pub fn docker(args: &[&str]) -> Result<String, String> {
    let output = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if output.status.success() {
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

/// The non-empty lines of a docker CLI answer; none when the command fails.
fn docker_lines(args: &[&str]) -> Vec<String> {
    docker(args)
        .map(|out| {
            out.lines()
                .map(str::to_owned)
                .filter(|l| !l.is_empty())
                .collect()
        })
        .unwrap_or_default()
}

/// Docker's `State.Status` of a container, or `None` when there is none.
pub fn container_state(name_or_id: &str) -> Option<String> {
    docker(&[
        "container",
        "inspect",
        "--format",
        "{{.State.Status}}",
        name_or_id,
    ])
    .ok()
}

/// True when a volume of exactly this name exists.
pub fn volume_exists(name: &str) -> bool {
    docker(&["volume", "inspect", "--format", "{{.Name}}", name]).is_ok_and(|n| n == name)
}

/// One label of a volume, `None` when the volume or the label is missing.
pub fn volume_label(name: &str, label: &str) -> Option<String> {
    let format = format!("{{{{index .Labels \"{label}\"}}}}");
    docker(&["volume", "inspect", "--format", &format, name])
        .ok()
        .filter(|v| !v.is_empty() && v != "<no value>")
}

/// The ids of the networks named exactly `name` (the CLI's filter matches substrings).
pub fn networks_named(name: &str) -> Vec<String> {
    docker_lines(&[
        "network",
        "ls",
        "--no-trunc",
        "--filter",
        &format!("name={name}"),
        "--format",
        "{{.ID}} {{.Name}}",
    ])
    .into_iter()
    .filter_map(|line| {
        let (id, found) = line.split_once(' ')?;
        (found == name).then(|| id.to_owned())
    })
    .collect()
}

/// A host port free right now on 127.0.0.1 (the kernel picks it; the
/// listener is dropped before returning, so use the port at once).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind 127.0.0.1:0")
}

/// Sends one raw request to the engine's socket, bypassing clawfleet's
/// client (to make objects no client of clawfleet's would); status and body.
pub fn raw_engine_request(
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<(u16, String), String> {
    super::http::Client::unix(engine_socket())
        .blocking_send(method, path, body)
        .map(|reply| (reply.status, reply.text))
}

/// The path of the engine's Unix socket (`DOCKER_HOST`, or the default).
fn engine_socket() -> String {
    let host = docker_host();
    match host.strip_prefix("unix://").unwrap_or(&host) {
        "" => DEFAULT_SOCKET.to_owned(),
        path => path.to_owned(),
    }
}

/// Polls `check` every 100 ms until it yields a value; panics naming `what`
/// when `deadline` passes first.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let until = Instant::now() + deadline;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < until,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A throwaway clawfleet instance on the real engine: a unique instance
/// label, network name and name prefix, and the removal of everything they
/// cover when dropped.
#[derive(Debug)]
pub struct DockerFixture {
    /// The `io.clawfleet.instance` label value of this fixture's objects.
    pub instance: String,
    /// A network name of this fixture (not created until a test asks for it).
    pub network: String,
    /// The prefix of every container and volume name this fixture hands out.
    pub prefix: String,
}

impl DockerFixture {
    /// A fresh fixture; `tag` (a short word) shows in the instance name.
    /// Ensures the agent image exists.
    pub fn new(tag: &str) -> Self {
        ensure_agent_image();
        let count = FIXTURES.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // The clock tells apart processes that reuse a pid of an earlier run.
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() % 0x100_0000);
        let unique = format!("{pid:x}x{count:x}x{clock:x}");
        Self {
            instance: format!("t-{tag}-{unique}"),
            network: format!("cf{unique}-net"),
            prefix: format!("cf{unique}-"),
        }
    }

    /// A container or volume name of this fixture.
    pub fn name(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    /// The spec of an agent container for `user_id` named `<prefix><suffix>`,
    /// with its volume `<name>-state`, on the fixture's network, unpublished.
    pub fn spec(&self, user_id: &str, suffix: &str) -> ContainerSpec {
        let name = self.name(suffix);
        let token = || EnvValue::Secret(SecretString::new(TEST_TOKEN));
        let mut labels = object_labels(&self.instance, user_id);
        labels.insert(LABEL_SPEC_HASH.to_owned(), "test".to_owned());
        ContainerSpec {
            volume: format!("{name}-state"),
            name,
            image: AGENT_IMAGE.to_owned(),
            env: vec![
                (
                    "MOSAIC_API_URL".to_owned(),
                    EnvValue::Plain("http://mosaic-api:3000/api".to_owned()),
                ),
                ("AGENT_ID".to_owned(), EnvValue::Plain(user_id.to_owned())),
                ("AGENT_TOKEN".to_owned(), token()),
                ("OPENCLAW_GATEWAY_TOKEN".to_owned(), token()),
            ],
            labels,
            mount_path: STATE_PATH.to_owned(),
            network: self.network.clone(),
            port: GATEWAY_PORT,
            publish: None,
            stop_timeout: Duration::from_secs(10),
            limits: ResourceLimits::default(),
            confinement: Confinement::strict(),
            node: None,
        }
    }

    /// The ids of the containers this fixture owns (an id may appear twice).
    fn owned_containers(&self) -> Vec<String> {
        let mut ids = self.labelled(&["ps", "-aq", "--no-trunc"]);
        ids.extend(self.prefixed(&["ps", "-a", "--no-trunc", "--format", "{{.ID}} {{.Names}}"]));
        ids
    }

    /// Objects listed by `args` with this fixture's instance label.
    fn labelled(&self, args: &[&str]) -> Vec<String> {
        let filter = format!("label={LABEL_INSTANCE}={}", self.instance);
        let mut args = args.to_vec();
        args.extend(["--filter", &filter]);
        docker_lines(&args)
    }

    /// The ids of objects listed by `args` as `<id> <name>` whose name starts with the prefix.
    fn prefixed(&self, args: &[&str]) -> Vec<String> {
        docker_lines(args)
            .into_iter()
            .filter_map(|line| {
                let (id, name) = line.split_once(' ')?;
                name.starts_with(&self.prefix).then(|| id.to_owned())
            })
            .collect()
    }
}

impl Drop for DockerFixture {
    fn drop(&mut self) {
        // Swarm services first (the Swarm backend's tests), then their
        // tasks' containers with the rest: a volume or network in use
        // cannot be removed.
        let services = self.labelled(&["service", "ls", "-q"]);
        if !services.is_empty() {
            let mut args = vec!["service", "rm"];
            args.extend(services.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let mut containers = self.owned_containers();
        containers.sort();
        containers.dedup();
        if !containers.is_empty() {
            let mut args = vec!["rm", "-f"];
            args.extend(containers.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let mut volumes = self.labelled(&["volume", "ls", "-q"]);
        volumes.extend(self.prefixed(&["volume", "ls", "--format", "{{.Name}} {{.Name}}"]));
        volumes.sort();
        volumes.dedup();
        if !volumes.is_empty() {
            let mut args = vec!["volume", "rm", "-f"];
            args.extend(volumes.iter().map(String::as_str));
            let _ = docker(&args);
        }
        let mut networks = self.labelled(&["network", "ls", "-q", "--no-trunc"]);
        networks.extend(self.prefixed(&[
            "network",
            "ls",
            "--no-trunc",
            "--format",
            "{{.ID}} {{.Name}}",
        ]));
        networks.sort();
        networks.dedup();
        for network in networks {
            let _ = docker(&["network", "rm", &network]);
        }
    }
}

/// A proxy in front of the engine's Unix socket, on TCP or on a socket of its
/// own, whose open connections a test can cut (as a restarting engine or a
/// broken network would), or that it can take down altogether for a while.
pub struct EngineProxy {
    /// The `DOCKER_HOST` value that reaches the engine through this proxy.
    pub docker_host: String,
    connections: Connections,
    /// While set, every new connection is closed as soon as it is accepted.
    down: Arc<AtomicBool>,
    accept: tokio::task::JoinHandle<()>,
    _dir: Option<tempfile::TempDir>,
}

impl EngineProxy {
    /// A proxy listening on 127.0.0.1, reached as `<scheme>://127.0.0.1:<port>`.
    pub async fn tcp(scheme: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("proxy address").port();
        Self::serve(listener, format!("{scheme}://127.0.0.1:{port}"), None)
    }

    /// A proxy on a Unix socket in a temporary folder, reached as `unix://<path>`.
    pub async fn unix() -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("engine.sock");
        let listener = tokio::net::UnixListener::bind(&path).expect("bind proxy socket");
        Self::serve(listener, format!("unix://{}", path.display()), Some(dir))
    }

    /// Forwards every client `listener` accepts to the engine.
    fn serve<L: Accept>(listener: L, docker_host: String, dir: Option<tempfile::TempDir>) -> Self {
        let connections: Connections = Arc::default();
        let down = Arc::new(AtomicBool::new(false));
        let (open, refusing) = (Arc::clone(&connections), Arc::clone(&down));
        let accept = tokio::spawn(async move {
            while let Ok(client) = listener.next_client().await {
                // Checked under the lock `set_down` cuts under, so a
                // connection accepted as the proxy goes down is cut too.
                let mut open = open.lock().expect("proxy lock");
                if !refusing.load(Ordering::SeqCst) {
                    open.push(forward(client));
                }
            }
        });
        Self {
            docker_host,
            connections,
            down,
            accept,
            _dir: dir,
        }
    }

    /// Closes every connection open through the proxy; new ones are still accepted.
    pub fn cut(&self) {
        for connection in self.connections.lock().expect("proxy lock").drain(..) {
            connection.abort();
        }
    }

    /// Takes the engine away (`true`): cuts every open connection and closes
    /// each new one as soon as it is accepted (the client reads an empty
    /// answer, as from an engine restarting), until brought back (`false`).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            self.cut();
        }
    }

    /// True while the proxy is down.
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }
}

/// The proxy's open connections.
type Connections = Arc<Mutex<Vec<tokio::task::AbortHandle>>>;

/// Copies between `client` and a new connection to the engine's socket until
/// either side closes or the proxy cuts it (with the returned handle).
/// A listener the proxy can take clients from (TCP or Unix socket).
trait Accept: Send + 'static {
    type Client: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    fn next_client(
        &self,
    ) -> impl std::future::Future<Output = std::io::Result<Self::Client>> + Send;
}

impl Accept for tokio::net::TcpListener {
    type Client = tokio::net::TcpStream;
    async fn next_client(&self) -> std::io::Result<Self::Client> {
        Ok(self.accept().await?.0)
    }
}

impl Accept for tokio::net::UnixListener {
    type Client = tokio::net::UnixStream;
    async fn next_client(&self) -> std::io::Result<Self::Client> {
        Ok(self.accept().await?.0)
    }
}

fn forward<S>(mut client: S) -> tokio::task::AbortHandle
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let upstream = engine_socket();
    let task = tokio::spawn(async move {
        if let Ok(mut upstream) = tokio::net::UnixStream::connect(&upstream).await {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        }
    });
    task.abort_handle()
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}
