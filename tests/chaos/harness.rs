//! What every chaos scenario uses: the seeded random choices, blocking work
//! off the runtime, the controller's listener and log, raw SQL, and what
//! each user's gateway says about itself.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use crate::support::controller::{token_of, ControllerProcess};
use crate::support::docker::{docker, DockerFixture};
use crate::support::fleet::{engine_containers, scrape, EngineContainer, Want};
use crate::support::http::Client;
use crate::support::{pg_admin_url, TestDb};
use clawfleet::status::ContainerStatus;
use clawfleet::store::Store;
use rand::rngs::StdRng;
use rand::SeedableRng;

/// How long a gateway or the controller's listener may take to answer.
pub(crate) const GATEWAY_TIMEOUT: Duration = Duration::from_secs(10);

/// Deadline of every wait for convergence.
pub(crate) const LONG: Duration = Duration::from_secs(180);

/// `name` from the environment, or `default`.
pub(crate) fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The seeded generator of a test's random choices, its seed printed.
pub(crate) fn chaos_rng(test: &str) -> StdRng {
    let seed = env_or(
        "CHAOS_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
    );
    eprintln!("{test}: seed {seed} (replay with CHAOS_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// Runs blocking work (the docker CLI, a synchronous HTTP call) off the
/// runtime's threads, where the test's proxies forward traffic.
pub(crate) async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("blocking task")
}

/// The docker CLI, off the runtime's threads.
pub(crate) async fn docker_cli(args: &[&str]) -> Result<String, String> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    blocking(move || docker(&args.iter().map(String::as_str).collect::<Vec<_>>())).await
}

/// `GET path` on the controller's listener: status and body (0 when it does not answer).
pub(crate) async fn http_get(addr: SocketAddr, path: &'static str) -> (u16, String) {
    Client::new(addr, None)
        .with_timeout(GATEWAY_TIMEOUT)
        .try_send("GET", path, None)
        .await
        .map_or((0, String::new()), |reply| (reply.status, reply.text))
}

/// The fixture's containers on the engine.
pub(crate) async fn on_engine(fx: &DockerFixture) -> Vec<EngineContainer> {
    let (instance, prefix) = (fx.instance.clone(), fx.prefix.clone());
    blocking(move || engine_containers(&instance, &prefix))
        .await
        .expect("docker ps")
}

/// The controller's metrics.
pub(crate) async fn metrics(addr: SocketAddr) -> BTreeMap<String, f64> {
    blocking(move || scrape(addr)).await
}

/// Panics (with the log) if the controller has exited.
pub(crate) fn assert_alive(controller: &mut ControllerProcess, when: &str) {
    if let Some(status) = controller.try_exit() {
        panic!(
            "the controller exited ({status}) {when}\n{}",
            controller.log()
        );
    }
}

/// Prints how often the controller logged what a chaos test provokes.
pub(crate) fn log_summary(test: &str, controller: &ControllerProcess) {
    const NOTABLE: [&str; 10] = [
        "creating container",
        "recreating container",
        "finishing an interrupted recreate",
        "removing leftover container",
        "restarting crashed container",
        "restarting unhealthy container",
        "host port taken outside clawfleet",
        "reconcile needs attention",
        "reconcile failed",
        "resubscribing to docker events",
    ];
    let log = controller.log();
    let counts: Vec<String> = NOTABLE
        .iter()
        .map(|needle| (needle, count_lines(&log, &[needle])))
        .filter(|(_, n)| *n > 0)
        .map(|(needle, n)| format!("{needle}: {n}"))
        .collect();
    eprintln!("{test}: controller log: {}", counts.join("; "));
}

/// Inserts `users` with default columns.
pub(crate) async fn insert_users(db: &TestDb, users: &[String]) {
    let values: Vec<String> = users.iter().map(|u| format!("('{u}')")).collect();
    db.exec(&format!(
        "INSERT INTO desired_containers (user_id) VALUES {}",
        values.join(",")
    ))
    .await;
}

/// `'a','b'` for an `IN (...)` list.
pub(crate) fn sql_list(users: &[String]) -> String {
    users
        .iter()
        .map(|u| format!("'{u}'"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Status rows by user.
pub(crate) async fn statuses(store: &Store) -> HashMap<String, ContainerStatus> {
    store
        .status_all()
        .await
        .expect("status rows")
        .into_iter()
        .map(|s| (s.user_id.clone(), s))
        .collect()
}

/// What a user's running gateway says about itself: agent id and boots,
/// or why it could not be asked.
pub(crate) async fn ask_whoami(status: &ContainerStatus) -> Result<(String, u64), String> {
    let port = status.host_port.ok_or("no port")?;
    let reply = Client::new(
        SocketAddr::from(([127, 0, 0, 1], port)),
        Some(&token_of(status)),
    )
    .with_timeout(GATEWAY_TIMEOUT)
    .try_send("GET", "/v1/whoami", None)
    .await?;
    let (code, body) = (reply.status, reply.text);
    if code != 200 {
        return Err(format!("whoami answered {code}: {body}"));
    }
    let me: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    if me["agent_token_matches"] != true {
        return Err(format!("AGENT_TOKEN differs from the gateway token: {me}"));
    }
    Ok((
        me["agent_id"].as_str().unwrap_or_default().to_owned(),
        me["boots"].as_u64().unwrap_or_default(),
    ))
}

/// One user's container, token and boot count once converged.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) id: String,
    pub(crate) token: String,
    pub(crate) boots: u64,
}

/// Reads [`Seen`] of every user wanted running, checking that each gateway
/// answers as its own user with its own token.
pub(crate) async fn seen_all(
    store: &Store,
    want: &BTreeMap<String, Want>,
) -> BTreeMap<String, Seen> {
    let rows = statuses(store).await;
    let mut seen = BTreeMap::new();
    for (user, wanted) in want {
        if *wanted != Want::Running {
            continue;
        }
        let status = &rows[user];
        let (agent, boots) = ask_whoami(status)
            .await
            .unwrap_or_else(|e| panic!("{user:?}: {e}"));
        assert_eq!(
            agent, *user,
            "the port of {user:?} reaches another user's gateway"
        );
        seen.insert(
            user.clone(),
            Seen {
                id: status.container_id.clone().expect("an id"),
                token: token_of(status),
                boots,
            },
        );
    }
    seen
}

/// Where the test PostgreSQL listens (`host:port` as written in its URL, and resolved).
pub(crate) async fn pg_server() -> (String, SocketAddr) {
    let url = pg_admin_url();
    let after_at = url.rsplit_once('@').map_or(url.as_str(), |(_, h)| h);
    let host_port = after_at.split('/').next().unwrap_or(after_at).to_owned();
    let with_port = if host_port.rsplit_once(':').is_some() {
        host_port.clone()
    } else {
        format!("{host_port}:5432")
    };
    let addr = tokio::net::lookup_host(with_port.as_str())
        .await
        .ok()
        .and_then(|mut a| a.next())
        .unwrap_or_else(|| panic!("cannot resolve the test PostgreSQL at {with_port}"));
    (host_port, addr)
}

/// Counts lines of `log` containing any of `needles`.
pub(crate) fn count_lines(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|l| needles.iter().any(|n| l.contains(n)))
        .count()
}
