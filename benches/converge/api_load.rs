//! The JSON API under load: `BENCH_API_CALLS` (5,000) concurrent
//! `ensure-running` calls spread over `BENCH_API_USERS` (100) running users,
//! against the real binary (`clawfleet run`) on PostgreSQL and the real
//! engine, loopback only. While the calls are in flight, a tenth as many new
//! users are inserted by SQL: the reconcilers must keep converging them.
//!
//! Every call has its own connection and a 60 s `wait`; one not answered
//! within [`CALL_LIMIT`] counts as hung. Reported: the answers by status, the
//! p50/p99 answer time, the reconciles per second during the load (from
//! `/metrics`), how long the newcomers took to run, and whether the
//! controller ever lost its lease (its log says so).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clawfleet::store::Store;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::change_latency::PgDatabase;
use crate::latency::Latencies;
use crate::support::{insert_users, until, Wants, IMAGE};

/// How long one call may take before it counts as hung (its `wait` is 60 s).
const CALL_LIMIT: Duration = Duration::from_secs(120);
/// The API token of the controller under load.
const TOKEN: &str = "bench-api-load-token";

/// What the measure found.
pub struct ApiLoad {
    /// Answer times of the calls answered (any status).
    pub latencies: Latencies,
    /// Calls answered 200.
    pub ok: usize,
    /// Calls answered 503 `busy` (past the in-flight or connection limit).
    pub busy: usize,
    /// Calls answered 503 otherwise (no database connection of the API's free in time).
    pub unavailable: usize,
    /// Calls answered otherwise, or whose connection failed.
    pub other: usize,
    /// Reconciles per second while the calls were in flight.
    pub reconcile_rate: f64,
    /// Users inserted during the load.
    pub newcomers: usize,
    /// From their insert to all of them running (`None`: not within the limit).
    pub newcomers_running: Option<Duration>,
    /// The controller logged a lost lease.
    pub lease_lost: bool,
}

/// A `clawfleet run` child process, killed on drop.
struct Controller {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Controller {
    fn start(env: &[(&str, String)]) -> Self {
        let dir = tempfile::tempdir().expect("dir");
        let log = dir.path().join("controller.log");
        let file = std::fs::File::create(&log).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_clawfleet"))
            .arg("run")
            .env("CLAWFLEET_DATA_DIR", dir.path())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log"))
            .stderr(file)
            .spawn()
            .expect("start clawfleet run");
        Self {
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    async fn addr(&self) -> SocketAddr {
        let mut addr = None;
        until(
            "the controller's listener",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || {
                addr = self.log().lines().find_map(|line| {
                    let rest = line.split("http listener ready").nth(1)?;
                    let rest = rest.split("addr=").nth(1)?;
                    rest.split_whitespace().next()?.parse().ok()
                });
                addr.is_some()
            },
        )
        .await;
        addr.expect("listener address")
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request on its own connection: the status code, or `None` when the
/// connection failed or the answer was not HTTP.
async fn call(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).await.ok()?;
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, text))
}

/// The sum of every sample of `name` in a `/metrics` text.
fn metric_total(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

async fn reconciles(addr: SocketAddr) -> f64 {
    let text = call(addr, "GET", "/metrics").await.map(|(_, t)| t);
    metric_total(&text.unwrap_or_default(), "clawfleet_reconcile_total")
}

/// Status rows of `users` ids that show a running container.
async fn running(store: &Store, ids: &[String]) -> usize {
    store
        .status_of(ids)
        .await
        .map(|rows| {
            rows.iter()
                .filter(|s| s.phase == clawfleet::status::Phase::Running)
                .count()
        })
        .unwrap_or(0)
}

/// Runs the load: `users` users, `calls` concurrent calls.
pub async fn measure(users: usize, calls: usize) -> Result<ApiLoad, String> {
    let pg = PgDatabase::create().await?;
    let store = Store::connect(&pg.url).await.map_err(|e| e.to_string())?;
    store.migrate().await.map_err(|e| e.to_string())?;
    let pid = std::process::id();
    let instance = format!("bench-api-{pid}");
    let prefix = format!("benchapi{pid}-");
    let newcomers = (users / 10).max(1);
    let first_port = 45000u16;
    let key = clawfleet::secrets::EncryptionKey::generate("bench").map_err(|e| e.to_string())?;
    let controller = Controller::start(&[
        ("DATABASE_URL", pg.url.clone()),
        ("CLAWFLEET_INSTANCE", instance.clone()),
        ("OPENCLAW_NETWORK", format!("benchapi{pid}-net")),
        ("CLAWFLEET_NAME_PREFIX", prefix.clone()),
        ("OPENCLAW_IMAGE", IMAGE.to_owned()),
        (
            "CLAWFLEET_PORT_RANGE",
            format!(
                "{first_port}-{}",
                first_port + 2 * (users + newcomers) as u16
            ),
        ),
        (
            "CLAWFLEET_ENCRYPTION_KEYS",
            key.to_config_entry().to_string(),
        ),
        ("CLAWFLEET_LISTEN", "127.0.0.1:0".to_owned()),
        ("CLAWFLEET_API_TOKEN", TOKEN.to_owned()),
        ("CLAWFLEET_STOP_TIMEOUT", "2s".to_owned()),
        ("RUST_LOG", "info".to_owned()),
    ]);
    let result = load(&store, &controller, users, calls, newcomers).await;
    drop(controller);
    crate::real_engine::clean(&instance, &prefix);
    result
}

async fn load(
    store: &Store,
    controller: &Controller,
    users: usize,
    calls: usize,
    newcomers: usize,
) -> Result<ApiLoad, String> {
    let addr = controller.addr().await;
    insert_users(store, 0, users, Wants::Running).await;
    let ids: Vec<String> = (0..users).map(|i| format!("u{i}")).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    while running(store, &ids).await < users {
        if Instant::now() > deadline {
            return Err(format!("{users} users did not all run within 10 min"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let before = reconciles(addr).await;
    let started = Instant::now();
    let tasks: Vec<_> = (0..calls)
        .map(|i| {
            let path = format!("/v1/users/u{}/ensure-running?wait=60s", i % users);
            tokio::spawn(async move {
                let t = Instant::now();
                let answer = tokio::time::timeout(CALL_LIMIT, call(addr, "POST", &path)).await;
                (answer, t.elapsed())
            })
        })
        .collect();
    // Newcomers while the calls are in flight: the reconcilers keep converging.
    insert_users(store, users, newcomers, Wants::Running).await;
    let inserted = Instant::now();
    let new_ids: Vec<String> = (users..users + newcomers)
        .map(|i| format!("u{i}"))
        .collect();
    let mut newcomers_running = None;
    let watch_newcomers = async {
        while inserted.elapsed() < CALL_LIMIT {
            if running(store, &new_ids).await >= newcomers {
                newcomers_running = Some(inserted.elapsed());
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (answers, ()) = tokio::join!(futures::future::join_all(tasks), watch_newcomers);
    let load_time = started.elapsed();
    let after = reconciles(addr).await;

    let mut result = ApiLoad {
        latencies: Latencies::default(),
        ok: 0,
        busy: 0,
        unavailable: 0,
        other: 0,
        reconcile_rate: (after - before) / load_time.as_secs_f64(),
        newcomers,
        newcomers_running,
        lease_lost: false,
    };
    for answer in answers {
        let (answer, took) = answer.map_err(|e| format!("call task: {e}"))?;
        match answer {
            Err(_) => result.latencies.push_timeout(),
            Ok(answer) => {
                result.latencies.push(took);
                match answer {
                    Some((200, _)) => result.ok += 1,
                    Some((503, text)) if text.contains("\"busy\"") => result.busy += 1,
                    Some((503, _)) => result.unavailable += 1,
                    _ => result.other += 1,
                }
            }
        }
    }
    let log = controller.log();
    result.lease_lost = log.contains("lost the lease") || log.contains("cannot renew the lease");
    Ok(result)
}
