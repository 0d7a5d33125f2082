//! The event watcher's reconnect back-off (README "How it works").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawfleet::docker::{object_labels, Confinement, ContainerSpec, EngineEvent, ResourceLimits};
use clawfleet::events::{run, EventObserver, FIRST_DELAY, MAX_BASE_DELAY, MAX_DELAY};
use clawfleet_engine_sim::MemoryEngine;
use tokio::time::Instant;

const INSTANCE: &str = "flapping";

/// Breaks the stream right after each event it delivers, and records
/// when each reconnect happens (in tokio's clock).
struct Flapping {
    engine: Arc<MemoryEngine>,
    reconnects: Mutex<Vec<Instant>>,
}

impl EventObserver for Flapping {
    fn event(&self, _event: &EngineEvent) {
        self.engine.break_event_streams();
    }
    fn reconnected(&self) {
        self.reconnects.lock().unwrap().push(Instant::now());
    }
}

/// Regression: the back-off was reset by the first event after each
/// reconnect, so a stream breaking right after it reconnected at once,
/// forcing a relist every time.
#[tokio::test(start_paused = true)]
async fn a_stream_that_breaks_after_its_first_event_backs_off_growing_delays() {
    let engine = Arc::new(MemoryEngine::new());
    let flapping = Arc::new(Flapping {
        engine: engine.clone(),
        reconnects: Mutex::new(Vec::new()),
    });
    let started = Instant::now();
    let watcher = tokio::spawn(run(
        engine.clone(),
        INSTANCE.to_owned(),
        None,
        flapping.clone(),
        |_| {},
    ));
    while engine.event_subscribers() == 0 {
        tokio::task::yield_now().await;
    }
    // One event, replayed by every reconnect (`since` the last one seen).
    let spec = ContainerSpec {
        name: "alice".to_owned(),
        image: "agent:1".to_owned(),
        env: Vec::new(),
        labels: object_labels(INSTANCE, "alice"),
        volume: "alice-state".to_owned(),
        mount_path: "/state".to_owned(),
        network: "agents".to_owned(),
        port: 8080,
        publish: None,
        stop_timeout: Duration::from_secs(10),
        limits: ResourceLimits::default(),
        confinement: Confinement::unconfined(),
        node: None,
    };
    engine.insert_container(&spec, false).expect("insert");
    while flapping.reconnects.lock().unwrap().len() < 8 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watcher.abort();
    let times = flapping.reconnects.lock().unwrap().clone();
    let mut previous = started;
    let mut gaps = Vec::new();
    for at in times {
        gaps.push(at - previous);
        previous = at;
    }
    // The first break comes at once; the delays after it double (the
    // jitter adds less than the next step) until the cap.
    for (i, gap) in gaps.iter().enumerate().skip(1) {
        let base = (FIRST_DELAY * 2u32.pow(i as u32 - 1)).min(MAX_BASE_DELAY);
        assert!(
            *gap >= base && *gap <= MAX_DELAY + Duration::from_millis(100),
            "reconnect {i} came {gap:?} after the previous, expected at least {base:?}: {gaps:?}"
        );
    }
}
