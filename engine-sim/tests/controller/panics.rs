//! A reconcile that panics (README "Metrics").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clawfleet::controller::{Controller, ControllerOptions, Observers, ReconcileObserver};
use clawfleet::docker::Op;
use clawfleet::queue::BackoffPolicy;
use clawfleet::status::Phase;
use clawfleet::store::DesiredUpdate;
use clawfleet_engine_sim::MemoryEngine;

use crate::{reconciler, sqlite_store, Running, IMAGE};

/// Every reconcile result, in order.
#[derive(Default)]
struct Recorded(Mutex<Vec<(&'static str, Option<&'static str>)>>);

impl ReconcileObserver for Recorded {
    fn reconciled(&self, result: &'static str, kind: Option<&'static str>, _seconds: f64) {
        self.0.lock().unwrap().push((result, kind));
    }
}

async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Regression: the `panic` kind of `clawfleet_reconcile_errors_total` was
/// declared but never counted, because only the worker pool saw panics.
#[tokio::test]
async fn a_reconcile_that_panics_is_counted_as_a_panic_error_and_retried() {
    let (store, _dir) = sqlite_store().await;
    let engine = Arc::new(MemoryEngine::new());
    engine.add_image(IMAGE);
    let reconciler = reconciler(&store, &engine);
    let recorded = Arc::new(Recorded::default());
    let observers = Observers {
        reconciles: recorded.clone(),
        ..Observers::default()
    };
    let options = ControllerOptions {
        backoff: BackoffPolicy {
            min: Duration::from_millis(10),
            max: Duration::from_millis(100),
            factor: 2.0,
            jitter: false,
        },
        ..ControllerOptions::default()
    };
    let running = Running::spawn(Controller::new(
        store.clone(),
        reconciler,
        options,
        observers,
    ));
    eventually("the first full sync", || running.handle.progress.synced()).await;

    engine.panic_next(Op::Create);
    store
        .upsert_desired(&DesiredUpdate {
            user_id: "alice".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    eventually("a panic to be counted", || {
        recorded
            .0
            .lock()
            .unwrap()
            .contains(&("error", Some("panic")))
    })
    .await;
    // The pool carries on and the retry converges.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let status = store.status("alice").await.unwrap();
        if status.as_ref().is_some_and(|s| s.phase == Phase::Running) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice never ran: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.stop().await;
}
