//! Many users on the in-memory engine, one scale per fresh process (so each
//! peak RSS is that scale's own): convergence from nothing, the full resync
//! of the converged fleet (a fresh controller's first sync), then CPU used
//! while idle (controller running, nothing changing).
//!
//! The parent re-runs this bench binary as `converge sim <users> <idle_secs>`;
//! the child prints one `sim key=value …` line the parent parses. A second
//! child, `converge engine <users>`, builds only the simulated Docker
//! engine's state for the same fleet, so the table can say how much of the
//! RSS is the simulated engine rather than the controller.
//!
//! One host port per running container and a 50,001-port range: up to
//! 50,000 users all run; above that 40 % run and 60 % are idle (desired
//! running, idle deadline long past: status row, no container), a realistic
//! mix for a large fleet.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawfleet::config::PortRange;
use clawfleet::docker::{object_labels, shared_labels, Engine, Op};
use clawfleet::secrets::GatewayToken;
use clawfleet::spec::DesiredSpec;

use crate::support::{
    cpu_time, insert_users, memory_engine, peak_rss_mb, rss_mb, settings, sim_reconciler,
    sqlite_store, until, Running, Wants, SIM_PORTS,
};

/// Users that fit the port range all run; above that this share does.
const BIG_RUNNING_PERCENT: usize = 40;
/// How long a scale may take to converge or resync.
const LIMIT: Duration = Duration::from_secs(3600);

/// How many of `users` run (the rest are idle).
pub fn running_users(users: usize) -> usize {
    if users <= (SIM_PORTS.1 - SIM_PORTS.0) as usize {
        users
    } else {
        users * BIG_RUNNING_PERCENT / 100
    }
}

/// What one scale measured.
#[derive(Clone, Debug, Default)]
pub struct Scale {
    /// Users.
    pub users: usize,
    /// Of which running (the rest idle, without a container).
    pub running: usize,
    /// Convergence from nothing, ms.
    pub converge_ms: f64,
    /// Full resync of the converged fleet, ms.
    pub resync_ms: f64,
    /// CPU time the resync used, ms.
    pub resync_cpu_ms: f64,
    /// Peak RSS of the process, MiB.
    pub rss_peak_mb: f64,
    /// RSS at the end of the idle period, MiB.
    pub rss_end_mb: f64,
    /// Length of the idle period, s.
    pub idle_secs: f64,
    /// CPU used over the idle period, % of one core.
    pub idle_cpu_pct: f64,
    /// Engine calls over the idle period.
    pub idle_engine_calls: u64,
    /// Peak RSS of a process holding only the simulated engine's state, MiB.
    pub engine_only_rss_mb: f64,
}

fn engine_calls(engine: &clawfleet_engine_sim::MemoryEngine) -> u64 {
    Op::ALL.iter().map(|op| engine.calls(*op)).sum()
}

/// The child: measures `users` and prints its `sim …` line.
pub async fn child(users: usize, idle_secs: u64) {
    let running = running_users(users);
    let dir = tempfile::tempdir().expect("dir");
    let store = sqlite_store(&dir).await;
    insert_users(&store, 0, running, Wants::Running).await;
    insert_users(&store, running, users - running, Wants::Idle).await;
    let engine = Arc::new(memory_engine());

    eprintln!("bench:   {users} users: converging from nothing ({running} running)…");
    let started = Instant::now();
    let controller = Running::start(&store, sim_reconciler(&store, engine.clone(), "sim"));
    controller
        .until_settled("the simulated fleet to converge", users, running, LIMIT)
        .await;
    let converge = started.elapsed();
    controller.stop().await;

    eprintln!("bench:   {users} users: full resync of the converged fleet…");
    let cpu_before = cpu_time();
    let started = Instant::now();
    let controller = Running::start(&store, sim_reconciler(&store, engine.clone(), "sim"));
    until("the full resync", LIMIT, Duration::from_millis(5), || {
        controller.handle.progress.synced()
    })
    .await;
    let resync = started.elapsed();
    let resync_cpu = cpu_time() - cpu_before;
    controller
        .until_settled(
            "the fleet to settle after the resync",
            users,
            running,
            LIMIT,
        )
        .await;

    eprintln!("bench:   {users} users: {idle_secs} s idle…");
    let calls_before = engine_calls(&engine);
    let cpu_before = cpu_time();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let idle = started.elapsed();
    let idle_cpu = cpu_time() - cpu_before;
    let idle_calls = engine_calls(&engine) - calls_before;
    let rss_end = rss_mb();
    controller.stop().await;

    println!(
        "sim users={users} running={running} converge_ms={:.0} resync_ms={:.0} resync_cpu_ms={:.0} \
         rss_peak_mb={:.1} rss_end_mb={:.1} idle_secs={:.1} idle_cpu_pct={:.3} idle_engine_calls={idle_calls}",
        converge.as_secs_f64() * 1e3,
        resync.as_secs_f64() * 1e3,
        resync_cpu.as_secs_f64() * 1e3,
        peak_rss_mb(),
        rss_end,
        idle.as_secs_f64(),
        idle_cpu.as_secs_f64() / idle.as_secs_f64() * 100.0,
    );
}

/// The engine-only child: the simulated engine holding what the fleet of
/// `users` would (network, volumes, running containers), nothing else.
pub async fn engine_only_child(users: usize) {
    let running = running_users(users);
    let engine = memory_engine();
    let ports = PortRange::new(SIM_PORTS.0, SIM_PORTS.1).expect("range");
    let settings = settings("sim", "mosaic-user-", "sim-net", ports);
    let network = engine
        .ensure_network(
            &settings.network,
            &shared_labels(&settings.instance),
            &settings.network_isolation.network_options(),
        )
        .await
        .expect("network")
        .id;
    for i in 0..running {
        let user = format!("u{i}");
        let port = ports.start() + i as u16;
        let desired = DesiredSpec::new(&settings, &user, &settings.image, 0, Some(port));
        let token = GatewayToken::generate().expect("token");
        engine
            .ensure_volume(&desired.volume, &object_labels(&settings.instance, &user))
            .await
            .expect("volume");
        let spec = desired.container_spec(&settings, &token, &desired.name, &network);
        let id = engine.create_container(&spec).await.expect("create");
        engine.start_container(&id).await.expect("start");
    }
    assert_eq!(engine.containers().len(), running);
    println!("engine users={users} rss_peak_mb={:.1}", peak_rss_mb());
}

fn parse_line(stdout: &str, tag: &str) -> BTreeMap<String, f64> {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(tag))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn run_self(args: &[String]) -> String {
    let exe = std::env::current_exe().expect("the bench binary");
    let output = std::process::Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run the bench binary as a child");
    assert!(
        output.status.success(),
        "bench child {args:?} failed: {}",
        output.status
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Measures `users` in a fresh process (and the engine-only baseline in another).
pub fn measure(users: usize, idle_secs: u64) -> Scale {
    let out = run_self(&["sim".into(), users.to_string(), idle_secs.to_string()]);
    let sim = parse_line(&out, "sim ");
    let out = run_self(&["engine".into(), users.to_string()]);
    let engine = parse_line(&out, "engine ");
    let get = |m: &BTreeMap<String, f64>, k: &str| {
        *m.get(k)
            .unwrap_or_else(|| panic!("bench child printed no {k}"))
    };
    Scale {
        users,
        running: get(&sim, "running") as usize,
        converge_ms: get(&sim, "converge_ms"),
        resync_ms: get(&sim, "resync_ms"),
        resync_cpu_ms: get(&sim, "resync_cpu_ms"),
        rss_peak_mb: get(&sim, "rss_peak_mb"),
        rss_end_mb: get(&sim, "rss_end_mb"),
        idle_secs: get(&sim, "idle_secs"),
        idle_cpu_pct: get(&sim, "idle_cpu_pct"),
        idle_engine_calls: get(&sim, "idle_engine_calls") as u64,
        engine_only_rss_mb: get(&engine, "rss_peak_mb"),
    }
}
