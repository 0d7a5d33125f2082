//! Why a reconcile ran (README "Metrics", `clawfleet_reconcile_triggers_total`):
//! each kind of cause counts under its own label; and what runs first: a
//! user queued by the API before bulk work (README "How it works").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use clawfleet::controller::{Controller, ControllerOptions, Observers, ReconcileObserver};
use clawfleet::desired::DesiredState;
use clawfleet::feed::FeedOptions;
use clawfleet::http::{router, ApiToken, AppState, Readiness, ReadinessReport};
use clawfleet::image_ref::ImageRef;
use clawfleet::metrics::Metrics;
use clawfleet::nudge::Nudge;
use clawfleet::queue::Trigger;
use clawfleet::secrets::{EncryptionKey, KeyRing};
use clawfleet::status::Phase;
use clawfleet::store::{DesiredUpdate, Store};
use clawfleet_engine_sim::MemoryEngine;
use futures::future::BoxFuture;
use tower::ServiceExt;

use crate::{reconciler, sqlite_store, Running, IMAGE};

const TOKEN: &str = "triggers-test-token";

struct AlwaysReady;

impl Readiness for AlwaysReady {
    fn check(&self) -> BoxFuture<'_, ReadinessReport> {
        Box::pin(async { ReadinessReport::default() })
    }
}

/// `clawfleet_reconcile_triggers_total{trigger}` as last exported.
fn triggered(metrics: &Metrics, trigger: &str) -> f64 {
    let line = format!("clawfleet_reconcile_triggers_total{{trigger=\"{trigger}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .unwrap_or_else(|| panic!("no {line}"))
        .parse()
        .unwrap()
}

async fn eventually(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !done().await {
        assert!(
            std::time::Instant::now() < deadline,
            "gave up waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn is_running(store: &Store, user: &str) -> bool {
    let status = store.status(user).await.unwrap();
    status.is_some_and(|s| s.phase == Phase::Running)
}

/// A controller over `store` and `engine` reporting to `metrics`, whose
/// feed polls every `poll_interval`.
fn start(
    store: &Store,
    engine: &Arc<MemoryEngine>,
    metrics: &Arc<Metrics>,
    poll_interval: Duration,
) -> Running {
    let observers = Observers {
        queue: metrics.clone(),
        events: metrics.clone(),
        reconciles: metrics.clone(),
    };
    start_with(store, engine, observers, poll_interval, 16)
}

/// A controller over `store` and `engine` reporting to `observers`, whose
/// feed polls every `poll_interval`, running `concurrency` reconciles at once.
fn start_with(
    store: &Store,
    engine: &Arc<MemoryEngine>,
    observers: Observers,
    poll_interval: Duration,
    concurrency: usize,
) -> Running {
    let options = ControllerOptions {
        concurrency,
        feed: FeedOptions {
            poll_interval,
            ..FeedOptions::default()
        },
        ..ControllerOptions::default()
    };
    let reconciler = reconciler(store, engine);
    Running::spawn(Controller::new(
        store.clone(),
        reconciler,
        options,
        observers,
    ))
}

/// The JSON API over `store`, queueing into the leader's queue through `nudge`.
fn api(store: &Store, metrics: &Arc<Metrics>, nudge: Arc<Nudge>) -> axum::Router {
    router(Arc::new(AppState {
        store: store.clone(),
        keys: KeyRing::new(vec![EncryptionKey::generate("t").unwrap()]).unwrap(),
        api_token: ApiToken::new(TOKEN),
        instance: "default".to_owned(),
        default_image: ImageRef::parse(IMAGE).unwrap(),
        readiness: Arc::new(AlwaysReady),
        max_inflight: 8,
        metrics: metrics.clone(),
        nudge,
        gateway_probe: clawfleet::probe::GatewayProbe::new(
            clawfleet::probe::ProbeKind::Tcp,
            "127.0.0.1".parse().unwrap(),
        ),
    }))
}

/// `PUT /v1/users/{user}` with `{"state": "running"}`.
fn put_running(user: &str) -> Request<Body> {
    Request::builder()
        .method(Method::PUT)
        .uri(format!("/v1/users/{user}"))
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"state": "running"}"#))
        .unwrap()
}

#[tokio::test]
async fn a_row_change_an_event_a_resync_and_an_api_call_each_count_under_their_trigger() {
    let (store, _dir) = sqlite_store().await;
    let engine = Arc::new(MemoryEngine::new());
    engine.add_image(IMAGE);
    let metrics = Metrics::new();
    for trigger in [
        "row_change",
        "docker_event",
        "timer",
        "retry",
        "resync",
        "api",
    ] {
        assert_eq!(
            triggered(&metrics, trigger),
            0.0,
            "{trigger} from the start"
        );
    }
    let user = |id: &str| DesiredUpdate {
        user_id: id.into(),
        ..Default::default()
    };

    // A row written before the controller starts is found by the first full sync.
    store.upsert_desired(&user("synced")).await.unwrap();
    let running = start(&store, &engine, &metrics, Duration::from_millis(20));
    eventually("the first full sync", async || {
        running.handle.progress.synced()
    })
    .await;
    eventually("synced running", async || {
        is_running(&store, "synced").await
    })
    .await;
    assert!(triggered(&metrics, "resync") >= 1.0);

    // A row written while it runs comes through the feed.
    let row_changes = triggered(&metrics, "row_change");
    store.upsert_desired(&user("written")).await.unwrap();
    eventually("written running", async || {
        is_running(&store, "written").await
    })
    .await;
    assert!(triggered(&metrics, "row_change") > row_changes);

    // A crash behind its back comes through the event stream.
    let events = triggered(&metrics, "docker_event");
    let synced = store.status("synced").await.unwrap().unwrap();
    engine.crash(&synced.container_id.unwrap(), 1).unwrap();
    eventually("the crash to be reconciled", async || {
        triggered(&metrics, "docker_event") > events
    })
    .await;
    running.stop().await;

    // An API call reaches the leader's queue at once: with the feed asleep,
    // the user it creates still runs, queued by the API alone.
    let running = start(&store, &engine, &metrics, Duration::from_secs(3600));
    eventually("the first full sync", async || {
        running.handle.progress.synced()
    })
    .await;
    let nudge = Arc::new(Nudge::new());
    nudge.attach(running.handle.queue.clone());
    let app = api(&store, &metrics, nudge);
    let api_calls = triggered(&metrics, "api");
    let answer = app.oneshot(put_running("carol")).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    eventually("carol running", async || is_running(&store, "carol").await).await;
    assert_eq!(triggered(&metrics, "api"), api_calls + 1.0);
    running.stop().await;
}

/// The trigger of every reconcile, in the order they began.
#[derive(Default)]
struct Begun(Mutex<Vec<Trigger>>);

impl Begun {
    fn triggers(&self) -> Vec<Trigger> {
        self.0.lock().unwrap().clone()
    }
}

impl ReconcileObserver for Begun {
    fn triggered(&self, trigger: Trigger) {
        self.0.lock().unwrap().push(trigger);
    }
}

#[tokio::test]
async fn a_wake_during_a_1000_user_resync_is_reconciled_before_the_resync_drains() {
    const CONCURRENCY: usize = 2;
    let (store, _dir) = sqlite_store().await;
    let engine = Arc::new(MemoryEngine::new());
    engine.add_image(IMAGE);
    let stopped = |id: String| DesiredUpdate {
        user_id: id,
        state: Some(DesiredState::Stopped),
        ..Default::default()
    };
    for i in 0..1000 {
        store
            .upsert_desired(&stopped(format!("user-{i:04}")))
            .await
            .unwrap();
    }
    // Listed after every other user, so the resync queues it last.
    store
        .upsert_desired(&stopped("zz-sleeper".into()))
        .await
        .unwrap();

    let begun = Arc::new(Begun::default());
    let observers = Observers {
        reconciles: begun.clone(),
        ..Observers::default()
    };
    // The feed asleep: only the resync and the API queue anyone.
    let running = start_with(
        &store,
        &engine,
        observers,
        Duration::from_secs(3600),
        CONCURRENCY,
    );
    eventually("the first full sync to begin", async || {
        !begun.triggers().is_empty()
    })
    .await;
    let nudge = Arc::new(Nudge::new());
    nudge.attach(running.handle.queue.clone());
    let app = api(&store, &Metrics::new(), nudge);
    let answer = app.oneshot(put_running("zz-sleeper")).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    // The wake is queued; at most the reconciles already taken start first.
    let begun_before_the_wake = begun.triggers().len();
    eventually("the sleeper running", async || {
        is_running(&store, "zz-sleeper").await
    })
    .await;
    eventually("the first full sync", async || {
        running.handle.progress.synced()
    })
    .await;
    running.stop().await;

    let triggers = begun.triggers();
    let wake = triggers
        .iter()
        .position(|&t| t == Trigger::Api)
        .expect("the wake was reconciled as an API call");
    let resync_after_the_wake = triggers[wake..]
        .iter()
        .filter(|&&t| t == Trigger::Resync)
        .count();
    assert!(
        wake <= begun_before_the_wake + CONCURRENCY,
        "the wake began {} reconciles after it was queued",
        wake.saturating_sub(begun_before_the_wake)
    );
    assert!(
        resync_after_the_wake > 0,
        "the resync had drained before the wake (it began {wake}th of {})",
        triggers.len()
    );
}
