//! A storm of activity updates: no reconcile storm, no missed idle deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::controller::{sql_now, ControllerConfig, ControllerProcess};
use crate::support::docker::{docker, DockerFixture};
use crate::support::fleet::{total, wait_converged, Want};
use crate::support::{Backend, TestDb};
use clawfleet::status::{ContainerStatus, Phase};

use crate::harness::*;

/// Idle timeout of every user of the storm.
const STORM_IDLE: Duration = Duration::from_secs(5);
/// The controller's `--stop-timeout` in the storm: the longest a stop may take.
const STORM_STOP_TIMEOUT: Duration = Duration::from_secs(2);
/// How much longer than its stop timeout the engine may take to carry out a
/// stop the controller began on time. A loaded engine (CI builds images
/// beside the tests) has been seen to take over 4 s for `docker stop -t 2`;
/// that is the engine's time, not the controller's, whose promise (to begin
/// stopping within the tolerance) is checked on its own.
const STORM_ENGINE_SLACK: Duration = Duration::from_secs(30);

/// When each sleeper of the storm was seen to begin stopping, and to be idle
/// (the controller's own transition times).
#[derive(Default)]
struct SleeperStops {
    acted: BTreeMap<String, chrono::DateTime<chrono::Utc>>,
    idle: BTreeMap<String, chrono::DateTime<chrono::Utc>>,
}

impl SleeperStops {
    fn note(&mut self, s: &ContainerStatus) {
        // A stop too quick to be seen as `stopping` counts from its end.
        if matches!(s.phase, Phase::Stopping | Phase::Idle) {
            self.acted
                .entry(s.user_id.clone())
                .or_insert(s.last_transition_at);
        }
        if s.phase == Phase::Idle {
            self.idle
                .entry(s.user_id.clone())
                .or_insert(s.last_transition_at);
        }
    }
}

/// The most reconciles an activity storm may cause over `window`. Each poll (every `poll`) reads one change per user (a row's
/// revision is replaced by each update), and the queue holds one entry
/// per user (a user mid-reconcile is marked once to go again), so
/// activity can cause at most one reconcile per user per poll: users ×
/// (window / poll + 1) over the window between the two scrapes. A NOTIFY
/// path must not do more than the poll would: it gets the same bound.
/// Besides, every engine event of a managed container nudges its user
/// once (the health check's exec events alone come about once a second
/// per container with the stub's 2 s interval), each user's idle
/// deadline timer fires at most once per idle timeout (a touch moves the
/// deadline, and the look at the old one finds it moved), and each
/// sleeper takes a few reconciles to stop (stop, the look after acting).
/// Plus slack for a resync.
fn storm_bound(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    window: Duration,
    poll: Duration,
    users: usize,
    sleepers: usize,
) -> f64 {
    let users = users as f64;
    let polls = window.as_secs_f64() / poll.as_secs_f64() + 1.0;
    let timers = window.as_secs_f64() / STORM_IDLE.as_secs_f64() + 1.0;
    let events = total(after, "clawfleet_docker_events_total")
        - total(before, "clawfleet_docker_events_total");
    users * polls + events + users * timers + 5.0 * sleepers as f64 + 20.0
}

async fn activity_storm(backend: Backend) {
    let seconds: u64 = env_or("CHAOS_SECONDS", 30);
    let rate: u64 = env_or("CHAOS_TOUCH_RATE", 1000);
    let tolerance = Duration::from_millis(env_or("CHAOS_IDLE_TOLERANCE_MS", 2500));
    // SQLite serialises writers on its one lock anyway; a PostgreSQL round
    // trip (update, trigger, NOTIFY) takes a few ms on a loaded machine, so
    // more connections keep the rate.
    let writers: u64 = match backend {
        Backend::Sqlite => 4,
        Backend::Postgres => 8,
    };
    let duration = Duration::from_secs(seconds);
    let poll = Duration::from_millis(250);
    let db = TestDb::new(backend).await;
    let store = db.store().await;
    let fx = DockerFixture::new("chaos-storm");
    let mut controller = ControllerProcess::start(
        &ControllerConfig::new(&db, &fx)
            .with("CLAWFLEET_POLL_INTERVAL", "250ms")
            .with(
                "CLAWFLEET_STOP_TIMEOUT",
                &format!("{}s", STORM_STOP_TIMEOUT.as_secs()),
            ),
    );
    let addr = controller.http_addr().await;
    // Touched all along, and sleepers: touched until their turn comes, then
    // left alone to fall idle in the middle of the storm.
    let touched: Vec<String> = (0..16).map(|i| format!("t{i}")).collect();
    let sleepers: Vec<String> = (0..4).map(|i| format!("z{i}")).collect();
    let all: Vec<String> = touched.iter().chain(&sleepers).cloned().collect();
    insert_users(&db, &all).await;
    let want: BTreeMap<String, Want> = all.iter().map(|u| (u.clone(), Want::Running)).collect();
    wait_converged(&fx, &store, &want, LONG).await;
    let ids: HashMap<String, String> = statuses(&store)
        .await
        .into_iter()
        .map(|(u, s)| (u, s.container_id.unwrap()))
        .collect();

    let window_start = Instant::now();
    let before = metrics(addr).await;
    db.exec(&format!(
        "UPDATE desired_containers SET idle_timeout_secs = {}, last_active_at = {}",
        STORM_IDLE.as_secs(),
        sql_now(&db)
    ))
    .await;
    let start = Instant::now();
    // Sleeper k is left alone from (k + 1) / sleepers of the storm's first
    // part on: the last one's deadline, plus the tolerance and the stop
    // timeout, falls before the storm ends, so every idle stop happens in
    // the thick of it.
    let first_part = duration
        .checked_sub(STORM_IDLE + tolerance + STORM_STOP_TIMEOUT)
        .filter(|d| *d >= Duration::from_secs(2))
        .expect("CHAOS_SECONDS leaves room for the idle timeout and its tolerance");
    let release: Vec<Duration> = (0..sleepers.len())
        .map(|k| first_part * (k as u32 + 1) / sleepers.len() as u32)
        .collect();
    let updates = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let touch = match backend {
        Backend::Sqlite => {
            "UPDATE desired_containers SET last_active_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE user_id = $1"
        }
        Backend::Postgres => {
            "UPDATE desired_containers SET last_active_at = now() WHERE user_id = $1"
        }
    };
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mut conn = db.raw().await;
        if backend == Backend::Sqlite {
            // As a busy service would: no fsync per commit, wait for the lock.
            sqlx::raw_sql("PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 10000")
                .execute(&mut conn)
                .await
                .expect("pragmas");
        }
        let (touched, sleepers, release) = (touched.clone(), sleepers.clone(), release.clone());
        let (updates, stop) = (updates.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut tick =
                tokio::time::interval(Duration::from_micros(1_000_000 * writers / rate.max(1)));
            let mut n = w as usize;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let elapsed = start.elapsed();
                let mut eligible: Vec<&String> = touched.iter().collect();
                eligible.extend(
                    sleepers
                        .iter()
                        .zip(&release)
                        .filter(|(_, at)| elapsed < **at)
                        .map(|(u, _)| u),
                );
                n = n.wrapping_add(7);
                let user = eligible[n % eligible.len()];
                sqlx::query(touch)
                    .bind(user.as_str())
                    .execute(&mut conn)
                    .await
                    .expect("touch");
                updates.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }

    // Watch: when each sleeper began to stop and when it was idle, and that
    // no touched user ever stopped.
    let mut stops = SleeperStops::default();
    let mut samples = 0;
    // The storm lasts `duration`, and longer (up to three times) while the
    // writers have not yet made enough updates for the bound below to tell
    // coalescing from a reconcile per update: a slow load generator on a
    // busy machine lengthens the storm instead of failing the test.
    let (users, sleeper_count) = (touched.len() + sleepers.len(), sleepers.len());
    // With a tenth to spare: the bound still grows until the writers stop.
    let dense_enough = |after: &BTreeMap<String, f64>, window: Duration, updates: u64| {
        1.1 * storm_bound(&before, after, window, poll, users, sleeper_count) < updates as f64 / 2.0
    };
    let mut next_check = duration;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration && elapsed >= next_check {
            next_check = elapsed + Duration::from_secs(1);
            let made = updates.load(Ordering::Relaxed);
            if elapsed >= 3 * duration
                || dense_enough(&metrics(addr).await, window_start.elapsed(), made)
            {
                break;
            }
        }
        let rows = statuses(&store).await;
        samples += 1;
        for user in &touched {
            let s = &rows[user];
            assert!(
                s.phase == Phase::Running && s.container_id.as_ref() == Some(&ids[user]),
                "{user:?} is touched all along, yet {} after {:?} of the storm ({:?})",
                s.phase,
                start.elapsed(),
                s.message
            );
        }
        for user in &sleepers {
            stops.note(&rows[user]);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("writer");
    }
    let after = metrics(addr).await;
    // At once, before the touched users' own deadlines (5 s after the last
    // touch) come: one look at the engine.
    let rows = statuses(&store).await;
    let engine: HashMap<String, String> = on_engine(&fx)
        .await
        .into_iter()
        .map(|c| (c.id, c.state))
        .collect();
    for user in &touched {
        assert_eq!(rows[user].phase, Phase::Running, "{user:?}");
        assert_eq!(
            engine.get(&ids[user]).map(String::as_str),
            Some("running"),
            "{user:?}"
        );
    }
    for user in &sleepers {
        stops.note(&rows[user]);
    }
    let window = window_start.elapsed();
    let updates = updates.load(Ordering::Relaxed);
    let reconciles =
        total(&after, "clawfleet_reconcile_total") - total(&before, "clawfleet_reconcile_total");
    let idle_stops =
        total(&after, "clawfleet_idle_stops_total") - total(&before, "clawfleet_idle_stops_total");
    let bound = storm_bound(&before, &after, window, poll, all.len(), sleepers.len());
    let polls = window.as_secs_f64() / poll.as_secs_f64() + 1.0;
    eprintln!(
        "{backend:?} storm: {updates} updates in {:?} ({:.0}/s) from {writers} writers; {reconciles} reconciles (bound {bound:.0}, {:.1}% of the updates); {idle_stops} idle stops; {samples} samples",
        start.elapsed(),
        updates as f64 / start.elapsed().as_secs_f64(),
        100.0 * reconciles / updates.max(1) as f64
    );
    let moved: Vec<String> = after
        .iter()
        .filter(|(k, _)| {
            k.starts_with("clawfleet_reconcile_total")
                || k.starts_with("clawfleet_docker_events_total")
                || k.starts_with("clawfleet_workqueue_adds_total")
        })
        .filter_map(|(k, v)| {
            let delta = v - before.get(k).copied().unwrap_or(0.0);
            (delta != 0.0).then(|| format!("{k} +{delta}"))
        })
        .collect();
    eprintln!(
        "{backend:?} storm: window {window:?} = {polls:.0} polls; {}",
        moved.join(", ")
    );
    log_summary(&format!("{backend:?} storm"), &controller);
    // Judged against the updates actually made: the storm went on until
    // they were dense enough (or three times its length had passed).
    assert!(
        bound < updates as f64 / 2.0,
        "the bound ({bound:.0}) is no test against the {updates} updates the writers made in {:?} (aiming at {}/s): the storm was not dense enough to tell coalescing from a reconcile per update",
        start.elapsed(),
        rate
    );
    assert!(
        reconciles <= bound,
        "a reconcile storm: {reconciles} reconciles for {updates} updates (bound {bound:.0})"
    );

    // The touched users would fall idle 5 s after their last touch: a slow
    // stop waited for below must not count their stops as well.
    db.exec(&format!(
        "UPDATE desired_containers SET idle_timeout_secs = 0 WHERE user_id IN ({})",
        touched
            .iter()
            .map(|u| format!("'{u}'"))
            .collect::<Vec<_>>()
            .join(", ")
    ))
    .await;
    for user in &sleepers {
        let row = store
            .desired(user)
            .await
            .expect("desired row")
            .expect("a row")
            .expect("a valid row");
        let deadline = row.idle_deadline().expect("an idle deadline");
        // Normally seen during the storm; a late one is waited for until
        // the latest it may be idle, then judged.
        let latest = deadline
            + chrono::Duration::from_std(tolerance + STORM_STOP_TIMEOUT + STORM_ENGINE_SLACK)
                .unwrap();
        while !stops.idle.contains_key(user) && chrono::Utc::now() < latest {
            if let Some(s) = store.status(user).await.expect("status") {
                stops.note(&s);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (Some(acted), Some(idle)) = (stops.acted.get(user), stops.idle.get(user)) else {
            panic!(
                "{user:?} was not idle {:?} after its deadline {deadline}: {:?}",
                tolerance + STORM_STOP_TIMEOUT + STORM_ENGINE_SLACK,
                store.status(user).await.expect("status")
            );
        };
        let (acted, idle) = (*acted - deadline, *idle - deadline);
        eprintln!(
            "{user:?}: stopping {} ms, idle {} ms after its deadline",
            acted.num_milliseconds(),
            idle.num_milliseconds()
        );
        assert!(
            acted >= chrono::Duration::zero(),
            "{user:?} was stopped {acted} before its deadline {deadline}"
        );
        assert!(
            acted.to_std().unwrap_or_default() <= tolerance,
            "{user:?} began to stop {acted} after its deadline (tolerance {tolerance:?})"
        );
        if idle.to_std().unwrap_or_default() > tolerance + STORM_STOP_TIMEOUT {
            eprintln!(
                "{user:?}: the engine took {} ms to carry out a stop with a {STORM_STOP_TIMEOUT:?} timeout",
                (idle - acted).num_milliseconds()
            );
        }
        assert_eq!(
            docker(&["inspect", "--format", "{{.State.Status}}", &ids[user]]).unwrap(),
            "exited",
            "{user:?}: its container stopped"
        );
    }
    // Counted once every stop is over (a slow one may end after the window).
    let idle_stops = total(&metrics(addr).await, "clawfleet_idle_stops_total")
        - total(&before, "clawfleet_idle_stops_total");
    assert_eq!(
        idle_stops,
        sleepers.len() as f64,
        "idle stops: the sleepers only"
    );
    assert_alive(&mut controller, "after the storm");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_activity_updates_on_sqlite_causes_no_reconcile_storm_and_misses_no_idle_deadline(
) {
    activity_storm(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_activity_updates_on_postgres_causes_no_reconcile_storm_and_misses_no_idle_deadline(
) {
    activity_storm(Backend::Postgres).await;
}
