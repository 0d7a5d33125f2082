//! Wake latency on the real engine, with the agent image's variant whose
//! `HEALTHCHECK` has Docker's default 30 s interval, so that an answer that
//! waited for Docker's health status would show as 30 s.
//!
//! Three measures, each the median of `BENCH_WAKE_SAMPLES` (5), the
//! controller's `POST /v1/users/{id}/ensure-running` (in process, on SQLite)
//! beside a baseline run in the same process on the same image, sample by
//! sample so that a machine getting busier lands on both:
//! - a stopped user woken, against `docker start` and polling the gateway
//!   until it answers;
//! - a new user, against `docker create` + `start` and the same polling;
//! - a stopped user woken while `BENCH_WAKE_BUSY_USERS` (200) others are
//!   inserted at once and converge, against the quiet wake; beside it, the
//!   baseline's `docker start` meanwhile, which shows how much of it is the
//!   engine's own wait.
//!
//! The baseline polls as the API does: `GET /healthz` every 50 ms.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use clawfleet::config::PortRange;
use clawfleet::desired::DesiredState;
use clawfleet::docker::{DockerEngine, Engine};
use clawfleet::http::{router, ApiToken, AppState, Readiness, ReadinessReport};
use clawfleet::image_ref::ImageRef;
use clawfleet::metrics::Metrics;
use clawfleet::nudge::Nudge;
use clawfleet::ports::PortAllocator;
use clawfleet::probe::{GatewayProbe, ProbeKind, ATTEMPT_INTERVAL};
use clawfleet::reconcile::Reconciler;
use clawfleet::secrets::GatewayToken;
use clawfleet::spec::DesiredSpec;
use clawfleet::status::Phase;
use clawfleet::store::{DesiredUpdate, Store};
use futures::future::BoxFuture;
use tower::ServiceExt;

use crate::real_engine::clean;
use crate::support::{agents_network, insert_users, ring, settings, sqlite_store, Running, Wants};

/// The agent image with a 30 s `HEALTHCHECK` interval.
pub const SLOW_HEALTH_IMAGE: &str = "clawfleet-agent-stub:slow-health";
/// The API token of the controller measured.
const TOKEN: &str = "bench-wake-token";
/// The longest a wake may take before the bench gives up on it.
const WAKE_LIMIT: Duration = Duration::from_secs(120);

/// What the measure found (medians).
pub struct Wake {
    /// Samples per measure.
    pub samples: usize,
    /// `docker start` + polling until the gateway answers.
    pub start_baseline: Duration,
    /// `ensure-running` of a stopped user.
    pub quiet: Duration,
    /// `docker create` + `start` + polling.
    pub create_baseline: Duration,
    /// `ensure-running` of a user without a row.
    pub new_user: Duration,
    /// Users converging during the busy wakes.
    pub busy_users: usize,
    /// `ensure-running` of a stopped user while they converge.
    pub busy: Duration,
    /// The slowest of those.
    pub busy_max: Duration,
    /// `docker start` + polling meanwhile, each just before a busy wake.
    pub busy_baseline: Duration,
    /// The slowest of those.
    pub busy_baseline_max: Duration,
    /// How many of them were still not running when the last busy wake answered.
    pub busy_still_converging: usize,
}

impl Wake {
    /// Quiet wake over its baseline.
    pub fn wake_ratio(&self) -> f64 {
        ratio(self.quiet, self.start_baseline)
    }

    /// New user over its baseline.
    pub fn new_user_ratio(&self) -> f64 {
        ratio(self.new_user, self.create_baseline)
    }

    /// Busy wake over the quiet wake.
    pub fn busy_ratio(&self) -> f64 {
        ratio(self.busy, self.quiet)
    }

    /// Busy wake over the busy baseline (the engine as loaded for both).
    pub fn busy_baseline_ratio(&self) -> f64 {
        ratio(self.busy, self.busy_baseline)
    }
}

fn ratio(a: Duration, b: Duration) -> f64 {
    a.as_secs_f64() / b.as_secs_f64()
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Builds [`SLOW_HEALTH_IMAGE`] from the agent image unless the engine has it.
fn ensure_slow_health_image() -> Result<(), String> {
    let has = |image: &str| {
        std::process::Command::new("docker")
            .args(["image", "inspect", image])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if has(SLOW_HEALTH_IMAGE) {
        return Ok(());
    }
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    std::fs::write(
        dir.path().join("Dockerfile"),
        format!(
            "FROM {}\nHEALTHCHECK --interval=30s --timeout=10s --retries=3 CMD [\"/agent-stub\", \"healthcheck\"]\n",
            crate::support::IMAGE
        ),
    )
    .map_err(|e| e.to_string())?;
    let built = std::process::Command::new("docker")
        .args(["build", "--quiet", "--tag", SLOW_HEALTH_IMAGE])
        .arg(dir.path())
        .output()
        .map_err(|e| e.to_string())?;
    if built.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&built.stderr).into_owned())
    }
}

struct AlwaysReady;

impl Readiness for AlwaysReady {
    fn check(&self) -> BoxFuture<'_, ReadinessReport> {
        Box::pin(async { ReadinessReport::default() })
    }
}

/// Polls the gateway on `port` as the API does, until it answers.
async fn until_gateway(probe: &GatewayProbe, port: u16) {
    let limit = Instant::now() + WAKE_LIMIT;
    while probe.attempt(port).await.is_err() {
        assert!(
            Instant::now() < limit,
            "the gateway on {port} never answered"
        );
        tokio::time::sleep(ATTEMPT_INTERVAL).await;
    }
}

/// Waits until `user`'s status says `phase`.
async fn until_phase(store: &Store, user: &str, phase: Phase) {
    let limit = Instant::now() + WAKE_LIMIT;
    while store
        .status(user)
        .await
        .ok()
        .flatten()
        .is_none_or(|s| s.phase != phase)
    {
        assert!(Instant::now() < limit, "{user} never became {phase:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The controller under measure, with its API in process.
struct Api {
    app: axum::Router,
    store: Store,
    nudge: Arc<Nudge>,
}

impl Api {
    /// `ensure-running` of `user`: how long until it answered 200.
    async fn ensure_running(&self, user: &str) -> Duration {
        let request = Request::builder()
            .method(Method::POST)
            .uri(format!("/v1/users/{user}/ensure-running?wait=120s"))
            .header(header::AUTHORIZATION, format!("Bearer {TOKEN}"))
            .body(Body::empty())
            .expect("request");
        let started = Instant::now();
        let answer = self.app.clone().oneshot(request).await.expect("answer");
        let took = started.elapsed();
        let status = answer.status();
        if status != StatusCode::OK {
            let body = axum::body::to_bytes(answer.into_body(), 1 << 16).await;
            panic!("ensure-running of {user} answered {status}: {body:?}");
        }
        took
    }

    /// Sets `user` stopped and waits until its container is.
    async fn stop(&self, user: &str) {
        let update = DesiredUpdate {
            user_id: user.into(),
            state: Some(DesiredState::Stopped),
            ..Default::default()
        };
        self.store.upsert_desired(&update).await.expect("stop");
        self.nudge.user(user);
        until_phase(&self.store, user, Phase::Stopped).await;
    }
}

/// Removes what the measure made, however it ends.
struct Cleanup {
    instance: String,
    prefix: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        clean(&self.instance, &self.prefix);
    }
}

/// Measures the three wakes; `Err` when the slow-health image cannot be built.
pub async fn measure(samples: usize, busy_users: usize) -> Result<Wake, String> {
    ensure_slow_health_image()?;
    let samples = samples.max(1);
    let engine = Arc::new(DockerEngine::connect("").await.map_err(|e| e.to_string())?);
    let pid = std::process::id();
    let instance = format!("benchwake-{pid}");
    let prefix = format!("benchwake{pid}-");
    let network = format!("benchwake{pid}-net");
    let _cleanup = Cleanup {
        instance: instance.clone(),
        prefix: prefix.clone(),
    };
    let own = (busy_users + 2 * samples) as u16;
    let ports = PortRange::new(48000, 48000 + own + samples as u16).expect("range");
    let mut settings = settings(&instance, &prefix, &network, ports);
    settings.image = ImageRef::parse(SLOW_HEALTH_IMAGE).expect("image");
    let settings = Arc::new(settings);
    let network_id = agents_network(engine.as_ref(), &settings)
        .await
        .map_err(|e| e.to_string())?;
    let probe = GatewayProbe::new(
        ProbeKind::Http {
            path: "/healthz".into(),
        },
        settings.publish_ip,
    );

    let dir = tempfile::tempdir().expect("dir");
    let store = sqlite_store(&dir).await;
    // The API opens the tokens the reconciler sealed.
    let keys = ring();
    let reconciler = Reconciler::new(
        store.clone(),
        engine.clone(),
        settings.clone(),
        keys.clone(),
        PortAllocator::new(
            PortRange::new(ports.start(), ports.start() + own - 1).expect("range"),
            settings.publish_ip,
        ),
        crate::support::reconciler_options(),
    );
    let controller = Running::start(&store, reconciler);
    let nudge = Arc::new(Nudge::new());
    nudge.attach(controller.handle.queue.clone());
    // The API on a pool of its own, as `clawfleet run` gives it.
    let api_store = store.with_own_pool(clawfleet::store::API_CONNECTIONS);
    let api = Api {
        app: router(Arc::new(AppState {
            store: api_store.clone(),
            keys,
            api_token: ApiToken::new(TOKEN),
            instance: settings.instance.clone(),
            default_image: settings.image.clone(),
            readiness: Arc::new(AlwaysReady),
            max_inflight: 64,
            metrics: Metrics::new(),
            nudge: nudge.clone(),
            gateway_probe: probe.clone(),
        })),
        store: api_store,
        nudge,
    };
    controller.first_sync().await;

    let token = GatewayToken::generate().expect("token");
    let (mut start_baseline, mut quiet, mut create_baseline, mut new_user) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut baselines = Vec::new();
    for i in 0..samples {
        let port = ports.start() + own + i as u16;
        let desired = DesiredSpec::new(
            &settings,
            &format!("base{i}"),
            &settings.image,
            0,
            Some(port),
        );
        let spec = desired.container_spec(&settings, &token, &desired.name, &network_id);
        let started = Instant::now();
        let id = engine.create_container(&spec).await.expect("create");
        engine.start_container(&id).await.expect("start");
        until_gateway(&probe, port).await;
        create_baseline.push(started.elapsed());
        engine
            .stop_container(&id, settings.stop_timeout)
            .await
            .expect("stop");
        let started = Instant::now();
        engine.start_container(&id).await.expect("start");
        until_gateway(&probe, port).await;
        start_baseline.push(started.elapsed());
        engine
            .stop_container(&id, settings.stop_timeout)
            .await
            .expect("stop");
        baselines.push((id, port));

        let user = format!("w{i}");
        new_user.push(api.ensure_running(&user).await);
        api.stop(&user).await;
        quiet.push(api.ensure_running(&user).await);
        eprintln!(
            "bench: wake sample {i}: create+start+poll {:?}, new user {:?}, start+poll {:?}, wake {:?}",
            create_baseline[i], new_user[i], start_baseline[i], quiet[i]
        );
    }

    // Busy: stopped users woken one after another while the others converge.
    let sleepers: Vec<String> = (0..samples).map(|i| format!("z{i}")).collect();
    for user in &sleepers {
        api.ensure_running(user).await;
        api.stop(user).await;
    }
    insert_users(&store, 0, busy_users, Wants::Running).await;
    // Each busy wake beside a busy baseline: the engine is as loaded for both.
    let (mut busy, mut busy_baseline) = (Vec::new(), Vec::new());
    for (user, (id, port)) in sleepers.iter().zip(&baselines) {
        let started = Instant::now();
        engine.start_container(id).await.expect("start");
        until_gateway(&probe, *port).await;
        busy_baseline.push(started.elapsed());
        busy.push(api.ensure_running(user).await);
    }
    let running = controller
        .handle
        .progress
        .summary()
        .by_phase
        .get(&Phase::Running)
        .copied()
        .unwrap_or(0);
    let busy_still_converging = (busy_users + 2 * samples).saturating_sub(running);
    eprintln!(
        "bench: busy: start+poll {busy_baseline:?}, wakes {busy:?}, \
         {busy_still_converging} users not yet running after them"
    );
    controller.stop().await;
    Ok(Wake {
        samples,
        start_baseline: median(start_baseline),
        quiet: median(quiet),
        create_baseline: median(create_baseline),
        new_user: median(new_user),
        busy_users,
        busy_max: busy.iter().copied().max().unwrap_or_default(),
        busy: median(busy),
        busy_baseline_max: busy_baseline.iter().copied().max().unwrap_or_default(),
        busy_baseline: median(busy_baseline),
        busy_still_converging,
    })
}
