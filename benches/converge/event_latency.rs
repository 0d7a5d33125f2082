//! Docker event → action: how long the controller takes from a container
//! dying to issuing its `start`, on the in-memory engine (whose calls are
//! instant, so what is measured is the controller's own time: event watcher,
//! work queue, the reconcile's reads of SQLite and the engine, the plan).
//!
//! A fleet is converged, then containers are crashed (`MemoryEngine::crash`
//! at T0) and the `start` the controller issues for each is the end mark.
//! Every sample crashes a container that has not crashed before, so each is
//! the first restart of a fresh crash streak, which the plan does at once
//! (later restarts of a streak wait out the back-off on purpose).
//!
//! - spaced: one crash at a time, the next only once the controller is idle;
//! - burst: many crashes at one T0, each measured from that T0 (queueing
//!   behind `--concurrency` workers included).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawfleet::docker::Op;

use crate::latency::Latencies;
use crate::recording::Recording;
use crate::support::{insert_users, memory_engine, sim_reconciler, sqlite_store, Running, Wants};

/// How long one sample may wait for its action before it counts as a timeout.
const SAMPLE_LIMIT: Duration = Duration::from_secs(10);
/// Exit code of the simulated crashes (not 78, the configuration-error code).
const CRASH_CODE: i64 = 1;

/// What the measure found.
pub struct EventLatency {
    /// Users in the converged fleet.
    pub users: usize,
    /// One crash at a time.
    pub spaced: Latencies,
    /// `burst` crashes at one instant.
    pub burst: Latencies,
    /// Mutating calls other than the expected `start`s (none expected).
    pub unexpected_calls: usize,
}

/// Converges `users` running users, then takes `samples` spaced crashes and
/// one burst of `burst` crashes, each of a container crashed for the first time.
pub async fn measure(users: usize, samples: usize, burst: usize) -> EventLatency {
    assert!(
        samples + burst <= users,
        "every sample needs a container that has not crashed yet"
    );
    let dir = tempfile::tempdir().expect("dir");
    let store = sqlite_store(&dir).await;
    insert_users(&store, 0, users, Wants::Running).await;
    let memory = Arc::new(memory_engine());
    let (engine, mut calls) = Recording::new(memory.clone());
    let controller = Running::start(
        &store,
        sim_reconciler(&store, Arc::new(engine), "bench-events"),
    );
    controller
        .until_settled(
            "the event fleet to converge",
            users,
            users,
            Duration::from_secs(600),
        )
        .await;
    calls.drain();
    let ids: Vec<String> = memory.containers().into_iter().map(|c| c.id).collect();
    assert_eq!(ids.len(), users, "one container per user");
    let mut fresh = ids.iter();
    let mut unexpected_calls = 0;

    let mut spaced = Latencies::default();
    for sample in 0..samples {
        let id = fresh.next().expect("a fresh container");
        let t0 = Instant::now();
        memory.crash(id, CRASH_CODE).expect("crash");
        let (started, others) = calls.wait_for(Op::Start, id, SAMPLE_LIMIT).await;
        unexpected_calls += others.len();
        match started {
            Some(at) => spaced.push(at - t0),
            None => spaced.push_timeout(),
        }
        settle(&controller, users).await;
        unexpected_calls += calls.drain();
        if (sample + 1) % 100 == 0 {
            eprintln!("bench:   {} of {samples} spaced crashes", sample + 1);
        }
    }

    let mut burst_latencies = Latencies::default();
    let batch: Vec<&String> = fresh.by_ref().take(burst).collect();
    let mut waiting: HashSet<&str> = batch.iter().map(|id| id.as_str()).collect();
    let t0 = Instant::now();
    for id in &batch {
        memory.crash(id, CRASH_CODE).expect("crash");
    }
    let deadline = tokio::time::Instant::now() + SAMPLE_LIMIT;
    while !waiting.is_empty() {
        let Some(call) = calls.next(deadline).await else {
            break;
        };
        if call.op == Op::Start && waiting.remove(call.target.as_str()) {
            burst_latencies.push(call.at - t0);
        } else {
            unexpected_calls += 1;
        }
    }
    for _ in waiting {
        burst_latencies.push_timeout();
    }
    settle(&controller, users).await;
    unexpected_calls += calls.drain();
    controller.stop().await;
    EventLatency {
        users,
        spaced,
        burst: burst_latencies,
        unexpected_calls,
    }
}

/// Waits until every container runs again and the controller has nothing to
/// do, twice a few milliseconds apart (an event may still be on its way).
async fn settle(controller: &Running, users: usize) {
    for _ in 0..2 {
        controller
            .until_settled(
                "the fleet to settle after a crash",
                users,
                users,
                Duration::from_secs(60),
            )
            .await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
