//! `make bench`: how fast clawfleet converges, against a baseline measured in
//! the same run, and what a full resync costs at scale.
//!
//! 1. In-memory engine, 10,000 users (`BENCH_SIM_USERS`): convergence from
//!    nothing, then the time of a full resync of the converged fleet (a fresh
//!    controller's first sync), and the process's peak RSS.
//! 2. Real engine, 100 users (`BENCH_USERS`): wall time from "rows inserted"
//!    to "every container running", beside the same create+start calls issued
//!    directly through bollard at the same concurrency.
//!
//! Prints a table and one summary line:
//! `bench: converge_ratio=<x> resync_10k_ms=<y> rss_10k_mb=<z>`.
//! Numbers, not assertions: nothing here fails on a slow machine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawfleet::config::{ContainerSettings, PortRange};
use clawfleet::controller::{Controller, ControllerOptions, Handle, Observers};
use clawfleet::docker::{
    shared_labels, ContainerFilter, DockerEngine, Engine, MemoryEngine, ResourceLimits,
};
use clawfleet::image_ref::ImageRef;
use clawfleet::ports::PortAllocator;
use clawfleet::reconcile::{Reconciler, ReconcilerOptions};
use clawfleet::secrets::{EncryptionKey, GatewayToken, KeyRing};
use clawfleet::spec::DesiredSpec;
use clawfleet::status::Phase;
use clawfleet::store::Store;
use futures::StreamExt;
use sea_orm::ConnectionTrait;

const IMAGE: &str = "clawfleet-agent-stub:dev";
const CONCURRENCY: usize = 16;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Peak resident set size of this process, in MiB (VmHWM).
fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn settings(instance: &str, prefix: &str, network: &str, ports: PortRange) -> ContainerSettings {
    ContainerSettings {
        instance: instance.into(),
        image: ImageRef::parse(IMAGE).expect("image"),
        network: network.into(),
        name_prefix: prefix.into(),
        port_range: ports,
        publish_ip: "127.0.0.1".parse().expect("ip"),
        mosaic_api_url: "http://mosaic-api:3000/api".into(),
        allowed_images: vec![],
        stop_timeout: Duration::from_secs(2),
        limits: ResourceLimits::default(),
    }
}

async fn sqlite_store(dir: &tempfile::TempDir) -> Store {
    let store = Store::connect(&format!(
        "sqlite://{}/bench.db?mode=rwc",
        dir.path().display()
    ))
    .await
    .expect("store");
    store.migrate().await.expect("migrate");
    store
}

async fn insert_users(store: &Store, users: usize) {
    use sea_orm::TransactionTrait;
    let txn = store.connection().begin().await.expect("begin");
    for chunk in (0..users).collect::<Vec<_>>().chunks(500) {
        let values: Vec<String> = chunk.iter().map(|i| format!("('u{i}')")).collect();
        txn.execute_unprepared(&format!(
            "INSERT INTO desired_containers (user_id) VALUES {}",
            values.join(",")
        ))
        .await
        .expect("insert");
    }
    txn.commit().await.expect("commit");
}

fn ring() -> KeyRing {
    KeyRing::new(vec![EncryptionKey::generate("bench").expect("key")]).expect("ring")
}

/// Starts a controller; returns its handle, a stop switch and the task.
fn start<E: Engine>(
    store: &Store,
    reconciler: Reconciler<E>,
) -> (
    Handle,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
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
    (handle, stop, task)
}

async fn until(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "bench: gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

struct SimResult {
    users: usize,
    converge: Duration,
    resync: Duration,
    rss_mb: f64,
}

async fn simulate(users: usize) -> SimResult {
    let dir = tempfile::tempdir().expect("dir");
    let store = sqlite_store(&dir).await;
    insert_users(&store, users).await;
    let engine = Arc::new(MemoryEngine::new());
    engine.add_image(IMAGE);
    let ports = PortRange::new(10000, 60000).expect("range");
    let settings = Arc::new(settings("sim", "mosaic-user-", "sim-net", ports));
    let keys = ring();
    let reconciler = || {
        Reconciler::new(
            store.clone(),
            engine.clone(),
            settings.clone(),
            keys.clone(),
            PortAllocator::new(ports, settings.publish_ip).without_probe(),
            ReconcilerOptions::default(),
        )
    };

    let started = Instant::now();
    let (handle, stop, task) = start(&store, reconciler());
    until(
        "the simulated fleet to converge",
        Duration::from_secs(600),
        || {
            let s = handle.progress.summary();
            s.by_phase.get(&Phase::Running).copied().unwrap_or(0) == users && s.converged == users
        },
    )
    .await;
    let converge = started.elapsed();
    let _ = stop.send(());
    task.await.expect("controller task");

    let started = Instant::now();
    let (handle, stop, task) = start(&store, reconciler());
    until("the full resync", Duration::from_secs(600), || {
        handle.progress.synced()
    })
    .await;
    let resync = started.elapsed();
    let _ = stop.send(());
    task.await.expect("controller task");
    SimResult {
        users,
        converge,
        resync,
        rss_mb: peak_rss_mb(),
    }
}

fn docker_cli(args: &[&str]) -> String {
    std::process::Command::new("docker")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Removes every container, volume and network labelled with `instance`.
fn clean(instance: &str) {
    let filter = format!("label=io.clawfleet.instance={instance}");
    for (kind, list) in [
        ("container", vec!["ps", "-aq", "--filter", &filter]),
        ("volume", vec!["volume", "ls", "-q", "--filter", &filter]),
        ("network", vec!["network", "ls", "-q", "--filter", &filter]),
    ] {
        let ids: Vec<String> = docker_cli(&list).lines().map(str::to_owned).collect();
        if ids.is_empty() {
            continue;
        }
        let mut args: Vec<&str> = match kind {
            "container" => vec!["rm", "-f"],
            "volume" => vec!["volume", "rm", "-f"],
            _ => vec!["network", "rm"],
        };
        args.extend(ids.iter().map(String::as_str));
        docker_cli(&args);
    }
}

struct DockerResult {
    users: usize,
    baseline: Duration,
    controller: Duration,
}

async fn real_engine(users: usize) -> DockerResult {
    let engine = Arc::new(DockerEngine::connect("").await.expect("docker engine"));
    let pid = std::process::id();
    let instance = format!("bench-{pid}");
    let prefix = format!("bench{pid}-");
    let network = format!("bench{pid}-net");
    let ports = PortRange::new(47000, 47000 + 2 * users as u16).expect("range");
    let settings = Arc::new(settings(&instance, &prefix, &network, ports));
    let network_id = engine
        .ensure_network(&network, &shared_labels(&instance))
        .await
        .expect("network");

    // Baseline: the same create+start calls, directly, at the same concurrency.
    let token = GatewayToken::generate().expect("token");
    let specs: Vec<_> = (0..users)
        .map(|i| {
            let user = format!("base{i}");
            let desired = DesiredSpec::new(
                &settings,
                &user,
                &settings.image,
                0,
                Some(ports.start() + users as u16 + i as u16),
            );
            desired.container_spec(&settings, &token, &desired.name, &network_id)
        })
        .collect();
    let started = Instant::now();
    futures::stream::iter(specs.iter())
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
    let baseline = started.elapsed();
    for spec in &specs {
        let _ = engine.remove_container(&spec.name).await;
    }

    // The controller: rows in, every container running.
    let dir = tempfile::tempdir().expect("dir");
    let store = sqlite_store(&dir).await;
    let reconciler = Reconciler::new(
        store.clone(),
        engine.clone(),
        settings.clone(),
        ring(),
        PortAllocator::new(
            PortRange::new(ports.start(), ports.start() + users as u16 - 1).expect("range"),
            settings.publish_ip,
        ),
        ReconcilerOptions::default(),
    );
    let (handle, stop, task) = start(&store, reconciler);
    until(
        "the controller's first (empty) sync",
        Duration::from_secs(30),
        || handle.progress.synced(),
    )
    .await;
    let started = Instant::now();
    insert_users(&store, users).await;
    until("every container running", Duration::from_secs(600), || {
        handle
            .progress
            .summary()
            .by_phase
            .get(&Phase::Running)
            .copied()
            .unwrap_or(0)
            == users
    })
    .await;
    let controller = started.elapsed();
    let _ = stop.send(());
    task.await.expect("controller task");
    let still_there = engine
        .list_containers(&ContainerFilter {
            instance: instance.clone(),
            user_id: None,
        })
        .await
        .map_or(0, |c| c.len());
    assert_eq!(still_there, users, "the controller's containers");
    clean(&instance);
    DockerResult {
        users,
        baseline,
        controller,
    }
}

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let sim_users = env_usize("BENCH_SIM_USERS", 10_000);
    let users = env_usize("BENCH_USERS", 100);
    runtime.block_on(async {
        eprintln!("bench: simulating {sim_users} users on the in-memory engine…");
        let sim = simulate(sim_users).await;
        eprintln!("bench: converging {users} users on the real engine (baseline first)…");
        let real = real_engine(users).await;
        let ratio = real.controller.as_secs_f64() / real.baseline.as_secs_f64();
        let rows = BTreeMap::from([
            (
                "1 real engine: direct create+start (baseline)",
                format!(
                    "{:>9.0} ms  ({} containers, concurrency {CONCURRENCY})",
                    real.baseline.as_secs_f64() * 1e3,
                    real.users
                ),
            ),
            (
                "2 real engine: clawfleet rows -> running",
                format!(
                    "{:>9.0} ms  (ratio {ratio:.2})",
                    real.controller.as_secs_f64() * 1e3
                ),
            ),
            (
                "3 in-memory engine: converge from nothing",
                format!(
                    "{:>9.0} ms  ({} users)",
                    sim.converge.as_secs_f64() * 1e3,
                    sim.users
                ),
            ),
            (
                "4 in-memory engine: full resync, converged",
                format!(
                    "{:>9.0} ms  ({:.0} users/s)",
                    sim.resync.as_secs_f64() * 1e3,
                    sim.users as f64 / sim.resync.as_secs_f64()
                ),
            ),
            (
                "5 peak RSS during the simulation",
                format!("{:>9.1} MiB", sim.rss_mb),
            ),
        ]);
        println!("{:<46} value", "measure");
        for (k, v) in rows {
            println!("{:<46} {v}", &k[2..]);
        }
        println!(
            "bench: converge_ratio={ratio:.2} resync_10k_ms={:.0} rss_10k_mb={:.1}",
            sim.resync.as_secs_f64() * 1e3,
            sim.rss_mb
        );
    });
}
