//! What every measure shares: knobs from the environment, container
//! settings, a store with users in it, a running controller, waiting, and
//! reading this process's memory and CPU time from `/proc`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawfleet::config::{ContainerSettings, PortRange};
use clawfleet::controller::{Controller, ControllerOptions, Handle, Observers};
use clawfleet::docker::{shared_labels, Confinement, Engine, EngineError, ResourceLimits};
use clawfleet::image_ref::ImageRef;
use clawfleet::isolation::NetworkIsolation;
use clawfleet::ports::PortAllocator;
use clawfleet::reconcile::{Reconciler, ReconcilerOptions};
use clawfleet::secrets::{EncryptionKey, KeyRing};
use clawfleet::store::Store;
use clawfleet_engine_sim::MemoryEngine;
use sea_orm::{ConnectionTrait, TransactionTrait};

/// The agent image the containers are made from.
pub const IMAGE: &str = "clawfleet-agent-stub:dev";
/// Reconciles at once: the production default (`--concurrency`).
pub const CONCURRENCY: usize = 16;

/// The reconciler's options: the defaults, with `BENCH_ENGINE_CONCURRENCY`
/// (when set) as `--engine-concurrency`.
pub fn reconciler_options() -> ReconcilerOptions {
    let mut options = ReconcilerOptions::default();
    if let Some(n) = std::env::var("BENCH_ENGINE_CONCURRENCY")
        .ok()
        .and_then(|v| v.trim().parse().ok())
    {
        options.engine_concurrency = n;
    }
    options
}
/// The port range of the in-memory simulations (one host port per running container).
pub const SIM_PORTS: (u16, u16) = (10_000, 60_000);

/// `name` from the environment, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The container settings of one measure.
pub fn settings(
    instance: &str,
    prefix: &str,
    network: &str,
    ports: PortRange,
) -> ContainerSettings {
    ContainerSettings {
        instance: instance.into(),
        image: ImageRef::parse(IMAGE).expect("image"),
        network: network.into(),
        name_prefix: prefix.into(),
        port_range: ports,
        publish_ip: "127.0.0.1".parse().expect("ip"),
        mosaic_api_url: "http://mosaic-api:3000/api".into(),
        allowed_images: clawfleet::image_ref::ImageAllowList::any(),
        stop_timeout: Duration::from_secs(2),
        limits: ResourceLimits::default(),
        confinement: Confinement::strict(),
        network_isolation: NetworkIsolation::Shared,
    }
}

/// Creates the agents' network of `settings` on `engine` (as the controller
/// would) and returns its id.
pub async fn agents_network(
    engine: &impl Engine,
    settings: &ContainerSettings,
) -> Result<String, EngineError> {
    Ok(engine
        .ensure_network(
            &settings.network,
            &shared_labels(&settings.instance),
            &settings.network_isolation.network_options(),
        )
        .await?
        .id)
}

/// A migrated SQLite store in `dir`, as `clawfleet run` opens it.
pub async fn sqlite_store(dir: &tempfile::TempDir) -> Store {
    let store = Store::connect(&sqlite_url(dir)).await.expect("store");
    store.migrate().await.expect("migrate");
    store
}

/// The URL of the SQLite database in `dir`.
pub fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}/bench.db?mode=rwc", dir.path().display())
}

/// How a batch of inserted users wants to run.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Wants {
    /// `state = running`, no idle timeout: a running container.
    Running,
    /// `state = running` with an idle deadline long past: no container.
    Idle,
}

/// Inserts users `u{first}` … `u{first+count-1}` in one transaction, by plain
/// SQL as another service would.
pub async fn insert_users(store: &Store, first: usize, count: usize, wants: Wants) {
    let txn = store.connection().begin().await.expect("begin");
    let ids: Vec<usize> = (first..first + count).collect();
    for chunk in ids.chunks(500) {
        let values: Vec<String> = chunk
            .iter()
            .map(|i| match wants {
                Wants::Running => format!("('u{i}', NULL, NULL)"),
                Wants::Idle => format!("('u{i}', 1800, '2020-01-01T00:00:00.000000Z')"),
            })
            .collect();
        txn.execute_unprepared(&format!(
            "INSERT INTO desired_containers (user_id, idle_timeout_secs, last_active_at) VALUES {}",
            values.join(",")
        ))
        .await
        .expect("insert");
    }
    txn.commit().await.expect("commit");
}

/// A key ring with one fresh key.
pub fn ring() -> KeyRing {
    KeyRing::new(vec![EncryptionKey::generate("bench").expect("key")]).expect("ring")
}

/// A reconciler on the in-memory engine `engine`, with production defaults
/// and the simulation's port range (no port probing: nothing listens).
pub fn sim_reconciler<E: Engine>(store: &Store, engine: Arc<E>, instance: &str) -> Reconciler<E> {
    let ports = PortRange::new(SIM_PORTS.0, SIM_PORTS.1).expect("range");
    let settings = Arc::new(settings(instance, "mosaic-user-", "sim-net", ports));
    Reconciler::new(
        store.clone(),
        engine,
        settings.clone(),
        ring(),
        PortAllocator::new(ports, settings.publish_ip).without_probe(),
        reconciler_options(),
    )
}

/// An in-memory engine holding the agent image.
pub fn memory_engine() -> MemoryEngine {
    let engine = MemoryEngine::new();
    engine.add_image(IMAGE);
    engine
}

/// A running controller: its handle, and how to stop it.
pub struct Running {
    /// Progress and queue.
    pub handle: Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts a controller around `reconciler` with the production defaults.
    pub fn start<E: Engine>(store: &Store, reconciler: Reconciler<E>) -> Self {
        let options = ControllerOptions {
            concurrency: CONCURRENCY,
            ..Default::default()
        };
        let controller = Controller::new(store.clone(), reconciler, options, Observers::default());
        let handle = controller.handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            controller
                .run(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Self { handle, stop, task }
    }

    /// Waits for the controller's first sync (of an empty fleet: 30 s at most).
    pub async fn first_sync(&self) {
        until(
            "the controller's first (empty) sync",
            Duration::from_secs(30),
            Duration::from_millis(5),
            || self.handle.progress.synced(),
        )
        .await;
    }

    /// Stops the controller and waits for it to finish.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.expect("controller task");
    }

    /// True when the first sync is done, every user is converged, `running`
    /// of them run, and the queue holds nothing ready or in flight.
    pub fn settled(&self, users: usize, running: usize) -> bool {
        let s = self.handle.progress.summary();
        let q = self.handle.queue.stats();
        s.synced
            && s.converged == users
            && s.by_phase
                .get(&clawfleet::status::Phase::Running)
                .copied()
                .unwrap_or(0)
                == running
            && q.ready == 0
            && q.processing == 0
    }

    /// Waits (up to `limit`) for [`settled`](Self::settled).
    pub async fn until_settled(&self, what: &str, users: usize, running: usize, limit: Duration) {
        until(what, limit, Duration::from_millis(1), || {
            self.settled(users, running)
        })
        .await;
    }
}

/// Polls `done` every `every` until it holds; panics after `limit` (a
/// stuck controller is a bug, not a slow number).
pub async fn until(what: &str, limit: Duration, every: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "bench: gave up waiting for {what}"
        );
        tokio::time::sleep(every).await;
    }
}

fn status_field_kb(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
}

/// Peak resident set size of this process, in MiB (VmHWM).
pub fn peak_rss_mb() -> f64 {
    status_field_kb("VmHWM:") / 1024.0
}

/// Current resident set size of this process, in MiB (VmRSS).
pub fn rss_mb() -> f64 {
    status_field_kb("VmRSS:") / 1024.0
}

/// CPU time (user + system, every thread) this process has used so far.
pub fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of proc(5); here 11 and 12.
    let total = ticks(11) + ticks(12);
    Duration::from_secs_f64(total as f64 / clock_ticks_per_second())
}

fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// The container specs of the direct baselines: users `base0`… with ports
/// from `first_port` on, on the network `network_id`, one token for all.
pub fn baseline_specs(
    settings: &ContainerSettings,
    users: usize,
    first_port: u16,
    network_id: &str,
) -> Vec<clawfleet::docker::ContainerSpec> {
    let token = clawfleet::secrets::GatewayToken::generate().expect("token");
    (0..users)
        .map(|i| {
            let user = format!("base{i}");
            let desired = clawfleet::spec::DesiredSpec::new(
                settings,
                &user,
                &settings.image,
                0,
                Some(first_port + i as u16),
            );
            desired.container_spec(settings, &token, &desired.name, network_id)
        })
        .collect()
}

/// Creates and starts every one of `specs` directly, [`CONCURRENCY`] at once.
pub async fn create_and_start_all<E: Engine>(
    engine: &Arc<E>,
    specs: &[clawfleet::docker::ContainerSpec],
) {
    use futures::StreamExt;
    futures::stream::iter(specs)
        .map(|spec| {
            let engine = engine.clone();
            async move {
                let id = engine.create_container(spec).await.expect("create");
                engine.start_container(&id).await.expect("start");
            }
        })
        .buffer_unordered(CONCURRENCY)
        .collect::<Vec<()>>()
        .await;
}

/// A reconciler on `engine` with the production defaults, handing out the
/// first `users` ports of `ports`.
pub fn bench_reconciler<E: Engine>(
    store: &Store,
    engine: Arc<E>,
    settings: Arc<ContainerSettings>,
    ports: PortRange,
    users: usize,
) -> Reconciler<E> {
    let publish_ip = settings.publish_ip;
    Reconciler::new(
        store.clone(),
        engine,
        settings,
        ring(),
        PortAllocator::new(
            PortRange::new(ports.start(), ports.start() + users as u16 - 1).expect("range"),
            publish_ip,
        ),
        reconciler_options(),
    )
}
