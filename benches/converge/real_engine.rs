//! Convergence on the real Docker engine: wall time from "rows inserted" to
//! "every container running", beside the same create+start calls issued
//! directly through bollard at the same concurrency (the baseline). The
//! baseline runs before and after the controller, on an engine holding no
//! other container of this run each time, and the ratio is against their
//! mean, so a machine getting busier or quieter half-way (other tests share
//! the engine) does not land on one side only.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawfleet::config::PortRange;
use clawfleet::docker::{ContainerFilter, DockerEngine, Engine};
use clawfleet::status::Phase;

use crate::support::{
    agents_network, baseline_specs, bench_reconciler, create_and_start_all, insert_users, settings,
    sqlite_store, until, Running, Wants,
};

/// What the measure found.
pub struct RealEngine {
    /// Containers made.
    pub users: usize,
    /// Direct create+start through bollard, before and after the controller
    /// (their spread shows how much the engine's speed drifted meanwhile).
    pub baselines: [Duration; 2],
    /// clawfleet from rows inserted to every container running.
    pub controller: Duration,
}

impl RealEngine {
    /// The mean of the two baselines.
    pub fn baseline(&self) -> Duration {
        (self.baselines[0] + self.baselines[1]) / 2
    }

    /// Controller time over the mean baseline time.
    pub fn ratio(&self) -> f64 {
        self.controller.as_secs_f64() / self.baseline().as_secs_f64()
    }
}

pub fn docker_cli(args: &[&str]) -> String {
    std::process::Command::new("docker")
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// Removes every container labelled with `instance` (volumes and network stay).
async fn remove_all(engine: &DockerEngine, instance: &str) {
    let containers = engine
        .list_containers(&ContainerFilter {
            instance: instance.to_owned(),
            user_id: None,
        })
        .await
        .expect("list");
    for c in containers {
        let _ = engine.remove_container(&c.id).await;
    }
}

/// Removes every container, volume and network labelled with `instance`, and
/// the baseline's volumes (Docker makes those unlabelled, from the mount):
/// every volume whose name starts with `prefix`.
pub fn clean(instance: &str, prefix: &str) {
    let filter = format!("label=io.clawfleet.instance={instance}");
    let listed =
        |args: &[&str]| -> Vec<String> { docker_cli(args).lines().map(str::to_owned).collect() };
    let remove = |command: &[&str], ids: Vec<String>| {
        if !ids.is_empty() {
            let mut args = command.to_vec();
            args.extend(ids.iter().map(String::as_str));
            docker_cli(&args);
        }
    };
    remove(&["rm", "-f"], listed(&["ps", "-aq", "--filter", &filter]));
    let mut volumes = listed(&["volume", "ls", "-q", "--filter", &filter]);
    volumes.extend(
        listed(&["volume", "ls", "-q"])
            .into_iter()
            .filter(|v| v.starts_with(prefix)),
    );
    volumes.sort();
    volumes.dedup();
    remove(&["volume", "rm", "-f"], volumes);
    remove(
        &["network", "rm"],
        listed(&["network", "ls", "-q", "--filter", &filter]),
    );
}

/// Converges `users` containers directly, then through clawfleet.
pub async fn measure(users: usize) -> RealEngine {
    let engine = Arc::new(DockerEngine::connect("").await.expect("docker engine"));
    let pid = std::process::id();
    let instance = format!("bench-{pid}");
    let prefix = format!("bench{pid}-");
    let network = format!("bench{pid}-net");
    let ports = PortRange::new(47000, 47000 + 2 * users as u16).expect("range");
    let settings = Arc::new(settings(&instance, &prefix, &network, ports));
    let network_id = agents_network(engine.as_ref(), &settings)
        .await
        .expect("network");

    // Baseline: the same create+start calls, directly, at the same concurrency.
    let specs = baseline_specs(&settings, users, ports.start() + users as u16, &network_id);
    let baseline = || async {
        let started = Instant::now();
        create_and_start_all(&engine, &specs).await;
        let elapsed = started.elapsed();
        remove_all(&engine, &instance).await;
        elapsed
    };
    let baseline_before = baseline().await;

    // The controller: rows in, every container running.
    let dir = tempfile::tempdir().expect("dir");
    let store = sqlite_store(&dir).await;
    let reconciler = bench_reconciler(&store, engine.clone(), settings.clone(), ports, users);
    let controller = Running::start(&store, reconciler);
    controller.first_sync().await;
    let started = Instant::now();
    insert_users(&store, 0, users, Wants::Running).await;
    until(
        "every container running",
        Duration::from_secs(600),
        Duration::from_millis(5),
        || {
            controller
                .handle
                .progress
                .summary()
                .by_phase
                .get(&Phase::Running)
                .copied()
                .unwrap_or(0)
                == users
        },
    )
    .await;
    let elapsed = started.elapsed();
    controller.stop().await;
    let still_there = engine
        .list_containers(&ContainerFilter {
            instance: instance.clone(),
            user_id: None,
        })
        .await
        .map_or(0, |c| c.len());
    assert_eq!(still_there, users, "the controller's containers");
    remove_all(&engine, &instance).await;
    let baseline_after = baseline().await;
    clean(&instance, &prefix);
    RealEngine {
        users,
        baselines: [baseline_before, baseline_after],
        controller: elapsed,
    }
}
