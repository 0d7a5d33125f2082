//! Why a reconcile ran (README "Metrics", `clawfleet_reconcile_triggers_total`):
//! each kind of cause counts under its own label.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use clawfleet::controller::{Controller, ControllerOptions, Observers};
use clawfleet::feed::FeedOptions;
use clawfleet::http::{router, ApiToken, AppState, Readiness, ReadinessReport};
use clawfleet::image_ref::ImageRef;
use clawfleet::metrics::Metrics;
use clawfleet::nudge::Nudge;
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
    let options = ControllerOptions {
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
    let app = router(Arc::new(AppState {
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
    }));
    let api_calls = triggered(&metrics, "api");
    let request = Request::builder()
        .method(Method::PUT)
        .uri("/v1/users/carol")
        .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(r#"{"state": "running"}"#))
        .unwrap();
    let answer = app.oneshot(request).await.unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    eventually("carol running", async || is_running(&store, "carol").await).await;
    assert_eq!(triggered(&metrics, "api"), api_calls + 1.0);
    running.stop().await;
}
