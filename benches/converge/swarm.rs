//! Convergence on the Swarm backend (README "Running on Docker Swarm"): 100
//! users (`BENCH_USERS`) from rows to every task running, beside a baseline
//! that makes the same services directly (create, then scale to one
//! replica, through the same bollard client) at the same concurrency and
//! waits for their tasks to run; the baseline runs before and after, and the
//! ratio is against their mean. Then the wake of a scaled-to-zero user: its
//! row set running → its status `running` and its gateway answering.
//!
//! Needs the engine to be a Swarm manager (`docker swarm init`); ports are
//! published in host mode (the routing mesh needs the kernel's IPVS).

use std::sync::Arc;
use std::time::{Duration, Instant};

use clawfleet::config::PortRange;
use clawfleet::docker::{
    ContainerFilter, DockerEngine, Engine, PublishMode, SwarmEngine, SwarmOptions,
};
use clawfleet::status::Phase;
use futures::StreamExt;
use sea_orm::ConnectionTrait;

use crate::real_engine::{docker_cli, RealEngine};
use crate::support::{
    agents_network, baseline_specs, bench_reconciler, create_and_start_all, insert_users, settings,
    sqlite_store, until, Running, Wants, CONCURRENCY,
};

/// What the measure found.
pub struct SwarmRun {
    /// The convergence: services made, the direct baselines (create and
    /// scale to one, before and after), clawfleet from rows to every task running.
    pub converge: RealEngine,
    /// A scaled-to-zero user's row set running → status running and gateway answering.
    pub wake: Duration,
}

/// True when the local engine is a Swarm manager.
pub fn available() -> bool {
    docker_cli(&["info", "--format", "{{.Swarm.ControlAvailable}}"]).trim() == "true"
}

/// Removes every service of `instance` and waits for their tasks to go.
async fn remove_all(engine: &SwarmEngine, instance: &str) {
    let services = engine
        .list_containers(&ContainerFilter {
            instance: instance.to_owned(),
            user_id: None,
        })
        .await
        .expect("list services");
    futures::stream::iter(services)
        .for_each_concurrent(CONCURRENCY, |s| async move {
            let _ = engine.remove_container(&s.id).await;
        })
        .await;
}

/// Removes the services, volumes and network of `instance`.
fn clean(instance: &str, prefix: &str) {
    let filter = format!("label=io.clawfleet.instance={instance}");
    let listed = |args: &[&str]| -> Vec<String> {
        docker_cli(args)
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let remove = |command: &[&str], ids: Vec<String>| {
        if !ids.is_empty() {
            let mut args = command.to_vec();
            args.extend(ids.iter().map(String::as_str));
            docker_cli(&args);
        }
    };
    remove(
        &["service", "rm"],
        listed(&["service", "ls", "-q", "--filter", &filter]),
    );
    remove(&["rm", "-f"], listed(&["ps", "-aq", "--filter", &filter]));
    let volumes: Vec<String> = listed(&["volume", "ls", "-q"])
        .into_iter()
        .filter(|v| v.starts_with(prefix))
        .collect();
    remove(&["volume", "rm", "-f"], volumes);
    remove(
        &["network", "rm"],
        listed(&["network", "ls", "-q", "--filter", &filter]),
    );
}

/// Waits until a task watcher of its own, listing every 100 ms, counts `n`
/// running tasks of `instance` (a fresh one each time: a watcher's counts
/// outlive the services they counted).
async fn until_tasks_running(
    docker: &DockerEngine,
    options: &SwarmOptions,
    instance: &str,
    n: usize,
) {
    let engine = SwarmEngine::new(
        docker.clone(),
        SwarmOptions {
            task_poll: Duration::from_millis(100),
            ..options.clone()
        },
    );
    let mut events = engine.events(
        &ContainerFilter {
            instance: instance.to_owned(),
            user_id: None,
        },
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let running = engine.task_states().get("running").copied().unwrap_or(0);
        if running as usize >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{n} tasks not running in 600 s");
        let _ = tokio::time::timeout(Duration::from_millis(50), events.next()).await;
    }
}

/// Converges `users` services directly, then through clawfleet; then a wake.
pub async fn measure(users: usize) -> SwarmRun {
    let docker = DockerEngine::connect("").await.expect("docker engine");
    let options = SwarmOptions {
        publish_mode: PublishMode::Host,
        ..SwarmOptions::default()
    };
    // The baseline's end is seen by a watcher listing every 100 ms; the
    // controller's watcher keeps the production default.
    let engine = Arc::new(SwarmEngine::new(docker.clone(), options.clone()));
    let pid = std::process::id();
    let instance = format!("bench-sw-{pid}");
    let prefix = format!("benchsw{pid}-");
    let network = format!("benchsw{pid}-net");
    let ports = PortRange::new(45000, 45000 + 2 * users as u16).expect("range");
    let settings = Arc::new(settings(&instance, &prefix, &network, ports));
    let network_id = agents_network(engine.as_ref(), &settings)
        .await
        .expect("overlay network");

    let specs = baseline_specs(&settings, users, ports.start() + users as u16, &network_id);
    let baseline = || async {
        let started = Instant::now();
        create_and_start_all(&engine, &specs).await;
        until_tasks_running(&docker, &options, &instance, users).await;
        let elapsed = started.elapsed();
        remove_all(&engine, &instance).await;
        elapsed
    };
    eprintln!("bench: swarm baseline: {users} services directly…");
    let baseline_before = baseline().await;

    eprintln!("bench: swarm: {users} users through clawfleet…");
    let dir = tempfile::tempdir().expect("dir");
    let store = sqlite_store(&dir).await;
    let reconciler = bench_reconciler(&store, engine.clone(), settings.clone(), ports, users);
    let controller = Running::start(&store, reconciler);
    controller.first_sync().await;
    let started = Instant::now();
    insert_users(&store, 0, users, Wants::Running).await;
    let running = |controller: &Running| {
        controller
            .handle
            .progress
            .summary()
            .by_phase
            .get(&Phase::Running)
            .copied()
            .unwrap_or(0)
    };
    until(
        "every task running",
        Duration::from_secs(600),
        Duration::from_millis(5),
        || running(&controller) == users,
    )
    .await;
    let elapsed = started.elapsed();

    // A wake: u0 scaled to zero, then wanted running again.
    eprintln!("bench: swarm: waking a scaled-to-zero user…");
    let exec = |sql: &'static str| {
        let store = store.clone();
        async move {
            store
                .connection()
                .execute_unprepared(sql)
                .await
                .expect("update");
        }
    };
    exec("UPDATE desired_containers SET state = 'stopped' WHERE user_id = 'u0'").await;
    until(
        "u0 stopped",
        Duration::from_secs(120),
        Duration::from_millis(5),
        || running(&controller) == users - 1,
    )
    .await;
    let woken = Instant::now();
    exec("UPDATE desired_containers SET state = 'running' WHERE user_id = 'u0'").await;
    until(
        "u0 running again",
        Duration::from_secs(120),
        Duration::from_millis(5),
        || running(&controller) == users,
    )
    .await;
    let port = store
        .status("u0")
        .await
        .expect("status")
        .and_then(|s| s.host_port)
        .expect("u0's port");
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "u0's gateway never answered");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let wake = woken.elapsed();
    controller.stop().await;
    remove_all(&engine, &instance).await;
    eprintln!("bench: swarm baseline again…");
    let baseline_after = baseline().await;
    clean(&instance, &prefix);
    SwarmRun {
        converge: RealEngine {
            users,
            baselines: [baseline_before, baseline_after],
            controller: elapsed,
        },
        wake,
    }
}
