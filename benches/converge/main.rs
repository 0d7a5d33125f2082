//! `make bench`: how fast clawfleet converges and reacts, against a baseline
//! measured in the same run, and what a large fleet costs.
//!
//! 1. Real engine, 100 users (`BENCH_USERS`): wall time from "rows inserted"
//!    to "every container running", beside the same create+start calls
//!    issued directly through bollard at the same concurrency (before and
//!    after; the ratio is against their mean). `BENCH_ONLY=converge` runs
//!    this measure alone.
//! 2. Docker event → action on the in-memory engine: crash → `start` issued,
//!    p50/p99 over 500 spaced crashes (`BENCH_SAMPLES`) and one burst of a
//!    fifth as many, in a fleet of 1,000 users (`BENCH_EVENT_USERS`).
//! 3. Desired-row change → action, SQLite and PostgreSQL: an `UPDATE` by
//!    another connection → `stop`/`start` issued, p50/p99 over 200 samples
//!    each (`BENCH_SAMPLES`), feed at its production default.
//! 4. 10,000 (`BENCH_SIM_USERS`) and 100,000 (`BENCH_BIG_USERS`, 0 to skip)
//!    users on the in-memory engine, each in a fresh child process
//!    (`converge sim <users> <idle_secs>`): convergence, full resync, peak
//!    RSS, and CPU over 60 s of idle (`BENCH_IDLE_SECS`).
//!
//! 5. The JSON API under load (`api_load`): 5,000 (`BENCH_API_CALLS`, 0 to
//!    skip) concurrent `ensure-running` calls over 100 (`BENCH_API_USERS`)
//!    users against the real binary on PostgreSQL and the real engine.
//!    `BENCH_ONLY=api` runs this measure alone.
//! 6. Wakes on the real engine (`wake`), with the image variant whose health
//!    check has a 30 s interval: `ensure-running` of a stopped user and of a
//!    new user against `docker start` (or create+start) and polling the
//!    gateway, and a wake while 200 (`BENCH_WAKE_BUSY_USERS`) others
//!    converge; medians of 5 (`BENCH_WAKE_SAMPLES`, 0 to skip).
//!    `BENCH_ONLY=wake` runs this measure alone.
//! 7. The Swarm backend (`swarm`), when the engine is a Swarm manager: 100
//!    users (`BENCH_USERS`) from rows to every task running, beside the same
//!    services made directly through bollard at the same concurrency (before
//!    and after), and the wake of a scaled-to-zero user. `BENCH_ONLY=swarm`
//!    runs this measure alone.
//!
//! Prints one table (each number beside its target) and one summary line:
//! `bench: converge_ratio=… resync_10k_ms=… rss_10k_mb=… event_p99_ms=…
//! change_p99_ms_sqlite=… change_p99_ms_pg=… rss_100k_mb=… idle_cpu_pct_10k=…
//! wake_ratio=… wake_new_ratio=… wake_busy_ratio=… swarm_converge_ratio=…
//! swarm_wake_ms=…`.
//! Numbers, not assertions: nothing here fails because a target is missed.
//! Progress goes to stderr.

mod api_load;
mod change_latency;
mod event_latency;
mod latency;
mod real_engine;
mod recording;
mod report;
mod scale;
mod support;
mod swarm;
mod wake;

use std::time::Instant;

use change_latency::{ChangeLatency, Db};
use clawfleet::feed::FeedOptions;
use latency::Latencies;
use report::{count, num, Table, Target};
use support::{env_usize, CONCURRENCY};

/// The knobs, from the environment.
struct Knobs {
    users: usize,
    event_users: usize,
    event_samples: usize,
    burst: usize,
    change_samples: usize,
    sim_users: usize,
    big_users: usize,
    idle_secs: u64,
    api_users: usize,
    api_calls: usize,
    wake_samples: usize,
    wake_busy_users: usize,
    /// `BENCH_ONLY`: `converge`, `api`, `wake` or `swarm`, that measure alone.
    only: Option<String>,
}

impl Knobs {
    fn from_env() -> Self {
        let event_samples = env_usize("BENCH_SAMPLES", 500);
        let burst = event_samples / 5;
        Self {
            users: env_usize("BENCH_USERS", 100),
            // Every sample crashes a container for the first time.
            event_users: env_usize("BENCH_EVENT_USERS", 1_000).max(event_samples + burst),
            event_samples,
            burst,
            change_samples: env_usize("BENCH_SAMPLES", 200),
            sim_users: env_usize("BENCH_SIM_USERS", 10_000),
            big_users: env_usize("BENCH_BIG_USERS", 100_000),
            idle_secs: env_usize("BENCH_IDLE_SECS", 60) as u64,
            api_users: env_usize("BENCH_API_USERS", 100).max(1),
            api_calls: env_usize("BENCH_API_CALLS", 5_000),
            wake_samples: env_usize("BENCH_WAKE_SAMPLES", 5),
            wake_busy_users: env_usize("BENCH_WAKE_BUSY_USERS", 200),
            only: std::env::var("BENCH_ONLY")
                .ok()
                .map(|v| v.trim().to_owned()),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let arg = |i: usize| -> usize {
        args.get(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("bench child: argument {i} must be a number: {args:?}"))
    };
    match args.first().map(String::as_str) {
        Some("sim") => runtime.block_on(scale::child(arg(1), arg(2) as u64)),
        Some("engine") => runtime.block_on(scale::engine_only_child(arg(1))),
        _ => runtime.block_on(parent(Knobs::from_env())),
    }
}

fn latency_value(l: &Latencies) -> String {
    let timeouts = match l.timeouts() {
        0 => String::new(),
        n => format!(", {n} timed out"),
    };
    format!(
        "p50 {} ms  p99 {} ms  max {} ms{timeouts}",
        num(l.p50_ms(), 2),
        num(l.p99_ms(), 2),
        num(l.max_ms(), 2)
    )
}

fn change_row(
    table: &mut Table,
    name: &str,
    result: &Result<ChangeLatency, String>,
    limit_ms: f64,
) -> f64 {
    match result {
        Ok(c) => {
            let p99 = c.latencies.p99_ms();
            table.checked(
                format!(
                    "change → action, {name}: {} row updates over {} users",
                    c.latencies.count(),
                    c.users
                ),
                latency_value(&c.latencies),
                Target::at_most("p99 ", p99, limit_ms, "ms"),
            );
            if c.unexpected_calls > 0 {
                table.row(
                    format!("  {name}: other engine calls meanwhile"),
                    c.unexpected_calls.to_string(),
                );
            }
            p99
        }
        Err(e) => {
            table.checked(
                format!("change → action, {name}"),
                format!("not measured: {e}"),
                Target::at_most("p99 ", f64::NAN, limit_ms, "ms"),
            );
            f64::NAN
        }
    }
}

fn scale_rows(
    table: &mut Table,
    s: &scale::Scale,
    rss_limit: Option<f64>,
    idle_limit: Option<f64>,
) {
    let who = if s.running == s.users {
        format!("{} users (all running)", count(s.users))
    } else {
        format!(
            "{} users ({} running, {} idle: no container)",
            count(s.users),
            count(s.running),
            count(s.users - s.running)
        )
    };
    table.row(
        format!("{who}: converge from nothing"),
        format!("{:.0} ms", s.converge_ms),
    );
    table.row(
        format!("{} users: full resync (fresh controller)", count(s.users)),
        format!(
            "{:.0} ms  ({:.0} users/s, {:.0} ms CPU)",
            s.resync_ms,
            s.users as f64 / (s.resync_ms / 1e3),
            s.resync_cpu_ms
        ),
    );
    let rss = format!(
        "{:.1} MiB  (simulated engine alone {:.1} MiB; {:.1} MiB after idle)",
        s.rss_peak_mb, s.engine_only_rss_mb, s.rss_end_mb
    );
    let measure = format!("{} users: peak RSS, own process", count(s.users));
    match rss_limit {
        Some(limit) => table.checked(measure, rss, Target::below("", s.rss_peak_mb, limit, "MiB")),
        None => table.row(measure, rss),
    }
    let resync_share = s.resync_cpu_ms
        / 1e3
        / clawfleet::controller::ControllerOptions::default()
            .resync_period
            .as_secs_f64()
        * 100.0;
    let measure = format!(
        "{} users: CPU over {:.0} s idle (% of one core)",
        count(s.users),
        s.idle_secs
    );
    let cpu = format!(
        "{:.3} %  ({} engine calls; +{resync_share:.3} % for the 5-min resync)",
        s.idle_cpu_pct, s.idle_engine_calls
    );
    match idle_limit {
        Some(limit) => table.checked(measure, cpu, Target::below("", s.idle_cpu_pct, limit, "%")),
        None => table.row(measure, cpu),
    }
}

/// Runs the API load and adds its rows.
async fn api_rows(table: &mut Table, k: &Knobs) {
    if k.api_calls == 0 {
        return;
    }
    eprintln!(
        "bench: api load: {} concurrent ensure-running calls over {} users (real engine, PostgreSQL)…",
        k.api_calls, k.api_users
    );
    let measure = format!(
        "api load: {} concurrent ensure-running over {} users (PostgreSQL, real engine)",
        count(k.api_calls),
        k.api_users
    );
    match api_load::measure(k.api_users, k.api_calls).await {
        Ok(load) => {
            table.checked(
                measure,
                format!(
                    "{}  ({} × 200, {} × 503 busy, {} × 503 unavailable, {} other)",
                    latency_value(&load.latencies),
                    load.ok,
                    load.busy,
                    load.unavailable,
                    load.other
                ),
                Target::at_most("hung ", load.latencies.timeouts() as f64, 0.0, ""),
            );
            table.row(
                format!(
                    "api load: reconciles meanwhile; {} new users inserted during it",
                    load.newcomers
                ),
                format!(
                    "{:.1} reconciles/s; newcomers running after {}; lease {}",
                    load.reconcile_rate,
                    load.newcomers_running
                        .map_or("— (not within 120 s)".to_owned(), |d| {
                            format!("{:.1} s", d.as_secs_f64())
                        }),
                    if load.lease_lost { "LOST" } else { "kept" },
                ),
            );
        }
        Err(e) => table.row(measure, format!("not measured: {e}")),
    }
}

/// Runs the wakes and adds their rows; their ratios (NaN when not measured):
/// quiet, new user, busy.
async fn wake_rows(table: &mut Table, k: &Knobs) -> [f64; 3] {
    if k.wake_samples == 0 {
        return [f64::NAN; 3];
    }
    eprintln!(
        "bench: wakes: {} samples, then {} users converging (real engine, {})…",
        k.wake_samples,
        k.wake_busy_users,
        wake::SLOW_HEALTH_IMAGE
    );
    let w = match wake::measure(k.wake_samples, k.wake_busy_users).await {
        Ok(w) => w,
        Err(e) => {
            table.row("wake, real engine", format!("not measured: {e}"));
            return [f64::NAN; 3];
        }
    };
    let ms = |d: std::time::Duration| format!("{:.0} ms", d.as_secs_f64() * 1e3);
    let median = format!("median of {}", w.samples);
    // One baseline row, then clawfleet's row against it (target ≤ 1.2).
    let mut pair = |baseline: &str, measured: &str, base, took, ratio: f64| {
        table.row(baseline, format!("{}  ({median})", ms(base)));
        table.checked(
            measured,
            format!("{}  (ratio {ratio:.2})", ms(took)),
            Target::at_most("ratio ", ratio, 1.2, ""),
        );
    };
    pair(
        "wake of a stopped user: docker start + poll the gateway (baseline)",
        "wake of a stopped user: ensure-running (30 s health interval)",
        w.start_baseline,
        w.quiet,
        w.wake_ratio(),
    );
    pair(
        "new user: docker create + start + poll the gateway (baseline)",
        "new user: ensure-running",
        w.create_baseline,
        w.new_user,
        w.new_user_ratio(),
    );
    table.row(
        format!(
            "wake while {} other users converge: docker start + poll (baseline)",
            w.busy_users
        ),
        format!("{}  (max {})", ms(w.busy_baseline), ms(w.busy_baseline_max)),
    );
    table.checked(
        format!(
            "wake while {} other users converge: ensure-running (vs the quiet wake)",
            w.busy_users
        ),
        format!(
            "{}  (max {}; ratio {:.2}, {:.2} vs the busy baseline; {} users not running after)",
            ms(w.busy),
            ms(w.busy_max),
            w.busy_ratio(),
            w.busy_baseline_ratio(),
            w.busy_still_converging
        ),
        Target::at_most("ratio ", w.busy_ratio(), 1.5, ""),
    );
    [w.wake_ratio(), w.new_user_ratio(), w.busy_ratio()]
}

async fn parent(k: Knobs) {
    let wall = Instant::now();
    let mut table = Table::default();
    match k.only.as_deref() {
        Some("api") => {
            api_rows(&mut table, &k).await;
            table.print();
        }
        Some("wake") => {
            let [wake, new, busy] = wake_rows(&mut table, &k).await;
            table.print();
            println!(
                "bench: wake_ratio={} wake_new_ratio={} wake_busy_ratio={}",
                num(wake, 2),
                num(new, 2),
                num(busy, 2)
            );
        }
        Some("swarm") => {
            let [ratio, wake] = swarm_rows(&mut table, &k).await;
            table.print();
            println!(
                "bench: swarm_converge_ratio={} swarm_wake_ms={}",
                num(ratio, 2),
                num(wake, 0)
            );
        }
        Some("converge") => {
            eprintln!(
                "bench: converging {} users on the real engine (baseline first)…",
                k.users
            );
            let real = real_engine::measure(k.users).await;
            converge_rows(&mut table, &real);
            table.print();
            println!("bench: converge_ratio={}", num(real.ratio(), 2));
        }
        _ => return all(k, table, wall).await,
    }
    eprintln!("bench: wall time {:.0} s", wall.elapsed().as_secs_f64());
}

/// Measures the Swarm backend and adds its rows (measure 7): the
/// convergence ratio and the wake in ms, NaN when the engine is no manager.
async fn swarm_rows(table: &mut Table, k: &Knobs) -> [f64; 2] {
    if !swarm::available() {
        eprintln!(
            "bench: the engine is not a Swarm manager (docker swarm init); Swarm not measured"
        );
        table.row(
            "Swarm backend".to_owned(),
            "not measured: the engine is not a Swarm manager".to_owned(),
        );
        return [f64::NAN, f64::NAN];
    }
    let run = swarm::measure(k.users).await;
    let c = &run.converge;
    table.row(
        format!(
            "converge {} users, Swarm: direct bollard service create+scale (baseline)",
            c.users
        ),
        format!(
            "{:.0} ms  (mean of {:.0} ms before, {:.0} ms after; concurrency {CONCURRENCY})",
            c.baseline().as_secs_f64() * 1e3,
            c.baselines[0].as_secs_f64() * 1e3,
            c.baselines[1].as_secs_f64() * 1e3,
        ),
    );
    table.checked(
        format!(
            "converge {} users, Swarm: clawfleet rows → all tasks running",
            c.users
        ),
        format!(
            "{:.0} ms  (ratio {:.2})",
            c.controller.as_secs_f64() * 1e3,
            c.ratio()
        ),
        Target::at_most("ratio ", c.ratio(), 1.2, ""),
    );
    let wake_ms = run.wake.as_secs_f64() * 1e3;
    table.row(
        "wake a scaled-to-zero user, Swarm: row running → running, gateway answering".to_owned(),
        format!("{wake_ms:.0} ms"),
    );
    [c.ratio(), wake_ms]
}

/// Adds the real-engine convergence rows (measure 1).
fn converge_rows(table: &mut Table, real: &real_engine::RealEngine) {
    table.row(
        format!(
            "converge {} users, real engine: direct bollard create+start (baseline)",
            real.users
        ),
        format!(
            "{:.0} ms  (mean of {:.0} ms before, {:.0} ms after; concurrency {CONCURRENCY})",
            real.baseline().as_secs_f64() * 1e3,
            real.baselines[0].as_secs_f64() * 1e3,
            real.baselines[1].as_secs_f64() * 1e3,
        ),
    );
    table.checked(
        format!(
            "converge {} users, real engine: clawfleet rows → all running",
            real.users
        ),
        format!(
            "{:.0} ms  (ratio {:.2})",
            real.controller.as_secs_f64() * 1e3,
            real.ratio()
        ),
        Target::at_most("ratio ", real.ratio(), 1.1, ""),
    );
}

/// Every measure.
async fn all(k: Knobs, mut table: Table, wall: Instant) {
    eprintln!(
        "bench: converging {} users on the real engine (baseline first)…",
        k.users
    );
    let real = real_engine::measure(k.users).await;
    let ratio = real.ratio();

    eprintln!(
        "bench: event → action: {} users, {} spaced crashes and a burst of {}…",
        k.event_users, k.event_samples, k.burst
    );
    let events = event_latency::measure(k.event_users, k.event_samples, k.burst).await;

    let poll_ms = FeedOptions::default().poll_interval.as_millis();
    let change_users = k.change_samples.div_ceil(2).max(1);
    eprintln!(
        "bench: change → action on SQLite: {} row updates…",
        k.change_samples
    );
    let sqlite = change_latency::measure(Db::Sqlite, change_users, k.change_samples).await;
    eprintln!(
        "bench: change → action on PostgreSQL: {} row updates…",
        k.change_samples
    );
    let pg = change_latency::measure(Db::Postgres, change_users, k.change_samples).await;
    if let Err(e) = &pg {
        eprintln!("bench: PostgreSQL not measured: {e}");
    }

    eprintln!(
        "bench: {} users on the in-memory engine, in a child process…",
        k.sim_users
    );
    let sim = scale::measure(k.sim_users, k.idle_secs);
    let big = (k.big_users > 0).then(|| {
        eprintln!(
            "bench: {} users on the in-memory engine, in a child process…",
            k.big_users
        );
        scale::measure(k.big_users, k.idle_secs)
    });

    converge_rows(&mut table, &real);
    let event_p99 = events.spaced.p99_ms();
    table.checked(
        format!(
            "event → action (crash → start), {} spaced crashes, {} users",
            events.spaced.count(),
            count(events.users)
        ),
        latency_value(&events.spaced),
        Target::at_most("p99 ", event_p99, 10.0, "ms"),
    );
    table.row(
        format!(
            "event → action, burst: {} crashes at one instant",
            events.burst.count()
        ),
        latency_value(&events.burst),
    );
    if events.unexpected_calls > 0 {
        table.row(
            "  events: other engine calls meanwhile",
            events.unexpected_calls.to_string(),
        );
    }
    let sqlite_p99 = change_row(
        &mut table,
        &format!("SQLite (poll {poll_ms} ms)"),
        &sqlite,
        300.0,
    );
    let pg_p99 = change_row(
        &mut table,
        &format!("PostgreSQL (NOTIFY + poll {poll_ms} ms)"),
        &pg,
        100.0,
    );
    scale_rows(&mut table, &sim, None, Some(1.0));
    if let Some(big) = &big {
        scale_rows(&mut table, big, Some(256.0), None);
    }
    api_rows(&mut table, &k).await;
    let [wake, wake_new, wake_busy] = wake_rows(&mut table, &k).await;
    let [swarm_ratio, swarm_wake] = swarm_rows(&mut table, &k).await;
    table.print();
    println!(
        "bench: converge_ratio={ratio:.2} resync_10k_ms={:.0} rss_10k_mb={:.1} event_p99_ms={} \
         change_p99_ms_sqlite={} change_p99_ms_pg={} rss_100k_mb={} idle_cpu_pct_10k={} \
         wake_ratio={} wake_new_ratio={} wake_busy_ratio={} swarm_converge_ratio={} \
         swarm_wake_ms={}",
        sim.resync_ms,
        sim.rss_peak_mb,
        num(event_p99, 2),
        num(sqlite_p99, 1),
        num(pg_p99, 1),
        num(big.as_ref().map_or(f64::NAN, |b| b.rss_peak_mb), 1),
        num(sim.idle_cpu_pct, 3),
        num(wake, 2),
        num(wake_new, 2),
        num(wake_busy, 2),
        num(swarm_ratio, 2),
        num(swarm_wake, 0),
    );
    eprintln!("bench: wall time {:.0} s", wall.elapsed().as_secs_f64());
}
