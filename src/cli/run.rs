//! `clawfleet run`: the controller process.
//!
//! It always serves `/metrics`, `/healthz`, `/readyz` and the API. It
//! reconciles only while it leads its instance: on SQLite it is the only
//! process (a lock file refuses a second), on PostgreSQL it takes turns
//! through a lease (see [`crate::leader`]); a standby keeps serving and takes
//! over when the leader's lease expires.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use futures::future::BoxFuture;
use tracing::{info, warn};

use super::{Backend, CliError, GlobalArgs};
use crate::clock::Clock;
use crate::config::{
    parse_duration, parse_image, ContainerSettings, RuntimeSettings, API_TOKEN_ENV,
};
use crate::controller::{Controller, ControllerOptions, Observers};
use crate::docker::{DockerEngine, Engine, Instrumented, SwarmEngine};
use crate::feed::FeedOptions;
use crate::heartbeat::Heartbeat;
use crate::http::{self, ApiToken, AppState, Readiness, ReadinessReport};
use crate::image_ref::ImageRef;
use crate::isolation::NetworkIsolation;
use crate::leader::{default_holder, Elector, SqliteLock};
use crate::metrics::Metrics;
use crate::nudge::Nudge;
use crate::ports::PortAllocator;
use crate::probe::{GatewayProbe, ProbeKind, ProbeMode, ProbePath};
use crate::progress::Progress;
use crate::reconcile::{Reconciler, ReconcilerOptions};
use crate::secrets::{KeyRing, KeySource};
use crate::store::Store;

/// How long one readiness check may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Flags of `run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Default image (overrides the one given before the subcommand)
    #[arg(long = "image", value_parser = parse_image)]
    pub default_image: Option<ImageRef>,

    /// How often the database is polled for changed desired rows
    #[arg(long, env = "CLAWFLEET_POLL_INTERVAL", default_value = "250ms", value_parser = parse_duration, hide_env_values = true)]
    pub poll_interval: Duration,

    /// How long a managed container with no desired row (and no recorded deletion) is kept before removal
    #[arg(long, env = "CLAWFLEET_ORPHAN_GRACE", default_value = "5m", value_parser = parse_duration, hide_env_values = true)]
    pub orphan_grace: Duration,

    /// How long a user whose container needs a human (missing image, exit code 78, name conflict) waits before the next try, unless its row changes
    #[arg(long, env = "CLAWFLEET_FAILED_RETRY", default_value = "5m", value_parser = parse_duration, hide_env_values = true)]
    pub failed_retry: Duration,

    /// How long shutdown waits for reconciles in flight
    #[arg(long, env = "CLAWFLEET_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration, hide_env_values = true)]
    pub shutdown_timeout: Duration,

    /// Leader lease time on PostgreSQL: a standby takes over this long after the leader's last renewal
    #[arg(long, env = "CLAWFLEET_LEASE_TTL", default_value = "15s", value_parser = parse_lease_ttl, hide_env_values = true)]
    pub lease_ttl: Duration,

    /// This process's name in the leader lease (on SQLite, in the heartbeat) [default: <hostname>-<pid>-<random>]
    #[arg(long, env = "CLAWFLEET_HOLDER_ID", hide_env_values = true)]
    pub holder_id: Option<String>,

    /// JSON API requests served at once; past it they answer 503 with Retry-After
    #[arg(long, env = "CLAWFLEET_API_MAX_INFLIGHT", default_value_t = http::DEFAULT_MAX_INFLIGHT, value_parser = parse_max_inflight, hide_env_values = true)]
    pub api_max_inflight: usize,

    /// How ensure-running asks a started gateway whether it answers, every 50 ms: an HTTP GET of --readiness-path (any answer below 500), or a TCP connect
    #[arg(
        long,
        env = "CLAWFLEET_READINESS_PROBE",
        value_enum,
        default_value = "http",
        hide_env_values = true
    )]
    pub readiness_probe: ProbeMode,

    /// The path of the HTTP readiness probe, on the gateway's published port
    #[arg(
        long,
        env = "CLAWFLEET_READINESS_PATH",
        default_value = "/healthz",
        hide_env_values = true
    )]
    pub readiness_path: ProbePath,
}

fn parse_max_inflight(s: &str) -> Result<usize, String> {
    match s.trim().parse::<usize>() {
        Ok(n) if (1..=1_000_000).contains(&n) => Ok(n),
        _ => Err(format!("{s:?} is not a whole number from 1 to 1000000")),
    }
}

fn parse_lease_ttl(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d < Duration::from_secs(3) {
        return Err(format!("{s:?} is too short for a lease; use at least 3s"));
    }
    Ok(d)
}

/// Whether this process leads, and the progress of its current term.
#[derive(Default)]
struct Role {
    leader: AtomicBool,
    progress: Mutex<Option<Arc<Progress>>>,
}

/// The readiness checks of a running process.
struct Checks<E: Engine> {
    store: Store,
    engine: Arc<E>,
    role: Arc<Role>,
    settings: Arc<ContainerSettings>,
}

impl<E: Engine> Readiness for Checks<E> {
    fn check(&self) -> BoxFuture<'_, ReadinessReport> {
        Box::pin(async move {
            // Short phrases: the driver's text goes to the log, not to callers.
            let mut reasons = Vec::new();
            match tokio::time::timeout(CHECK_TIMEOUT, self.store.ping()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "readiness: database unreachable");
                    reasons.push("database unreachable".to_owned());
                }
                Err(_) => reasons.push("database did not answer within 2s".to_owned()),
            }
            if self.store.writes_failing() {
                reasons.push("database writes failing (locked or read-only?)".to_owned());
            } else if self.store.writes_stalled(CHECK_TIMEOUT) {
                reasons.push("database writes waiting over 2s (locked?)".to_owned());
            }
            match tokio::time::timeout(CHECK_TIMEOUT, self.engine.version()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    warn!(error = %e, "readiness: docker engine unreachable");
                    reasons.push("docker engine unreachable".to_owned());
                }
                Err(_) => reasons.push("docker engine did not answer within 2s".to_owned()),
            }
            let network = crate::isolation::check_network(
                self.engine.as_ref(),
                &self.settings.network,
                self.settings.network_isolation,
            );
            if let Ok(Some(mismatch)) = tokio::time::timeout(CHECK_TIMEOUT, network).await {
                reasons.push(mismatch.reason());
            }
            if self.role.leader.load(Ordering::SeqCst) {
                let progress = self
                    .role
                    .progress
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                if !progress.is_some_and(|p| p.synced()) {
                    reasons.push("first full sync not finished".to_owned());
                }
            }
            ReadinessReport { reasons }
        })
    }
}

/// Everything a term of leadership builds its controller from.
struct Parts<E: Engine> {
    store: Store,
    engine: Arc<E>,
    settings: Arc<ContainerSettings>,
    keys: KeyRing,
    metrics: Arc<Metrics>,
    nudge: Arc<Nudge>,
    role: Arc<Role>,
    reconciler: ReconcilerOptions,
    controller: ControllerOptions,
}

impl<E: Engine> Parts<E> {
    /// Reconciles until `stop` resolves (graceful) or the returned future is dropped (at once).
    async fn lead(&self, stop: impl std::future::Future<Output = ()>) {
        // One clock for the reconciler, its port quarantine, the queue and the feed.
        let clock = self.controller.clock;
        let reconciler = Reconciler::new(
            self.store.clone(),
            self.engine.clone(),
            self.settings.clone(),
            self.keys.clone(),
            PortAllocator::new(self.settings.port_range, self.settings.publish_ip)
                .with_clock(clock),
            self.reconciler,
        )
        .with_clock(clock)
        .with_telemetry(self.metrics.clone());
        let observers = Observers {
            queue: self.metrics.clone(),
            events: self.metrics.clone(),
            reconciles: self.metrics.clone(),
        };
        let controller = Controller::new(
            self.store.clone(),
            reconciler,
            self.controller.clone(),
            observers,
        );
        let handle = controller.handle();
        self.metrics.attach(handle.clone());
        self.nudge.attach(handle.queue.clone());
        *self.role.progress.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(handle.progress.clone());
        self.role.leader.store(true, Ordering::SeqCst);
        self.metrics.set_leader(true);
        let _standing_down = StandDown(self);
        controller.run(stop).await;
    }
}

/// Marks the process a standby again when a term ends, however it ends.
struct StandDown<'a, E: Engine>(&'a Parts<E>);

impl<E: Engine> Drop for StandDown<'_, E> {
    fn drop(&mut self) {
        self.0.role.leader.store(false, Ordering::SeqCst);
        self.0.metrics.set_leader(false);
        self.0.metrics.detach();
        self.0.nudge.detach();
    }
}

/// Runs the process until SIGINT or SIGTERM.
pub async fn run(
    global: &GlobalArgs,
    image: Option<ImageRef>,
    args: &RunArgs,
) -> Result<(), CliError> {
    let settings = global.container_settings(args.default_image.clone().or(image))?;
    let runtime = global.runtime_settings();
    warn_about_allowed_images(&settings);
    // Before the database is touched: on PostgreSQL a replica without the
    // group's keys must not start (README "High availability").
    let (keys, source) = global.key_ring(true)?;
    match &source {
        KeySource::Created(path) => warn!(
            path = %path.display(),
            "no encryption key configured: created a new key file; back it up, without it stored tokens cannot be opened"
        ),
        other => info!(source = %other, keys = keys.key_ids().len(), "encryption keys loaded"),
    }
    if let KeySource::File(path) = &source {
        if crate::secrets::key_file_is_shared(path) {
            warn!(path = %path.display(), "key file is readable by other users; chmod 600 it");
        }
    }
    let store = global.open_store().await?;
    info!(database = %crate::store::redact_url(&runtime.database_url), "database migrated");
    // SQLite: one process per database file, for the life of the process.
    let _sqlite_lock = match store.sqlite_file() {
        Some(path) => {
            Some(SqliteLock::acquire(&path).map_err(|e| CliError::Config(e.to_string()))?)
        }
        None => None,
    };
    let metrics = Metrics::new();
    let engine = DockerEngine::connect(&runtime.docker_host)
        .await
        .map_err(|e| CliError::Config(e.to_string()))?;
    let version = engine
        .version()
        .await
        .map_err(|e| CliError::Config(e.to_string()))?;
    info!(engine = %version.version, api = %version.api_version, host = %runtime.docker_host, "docker engine reachable");
    let observer = metrics.clone();
    let started = Started {
        settings,
        runtime,
        keys,
        store,
        metrics,
    };
    match global.backend {
        Backend::Docker => {
            let engine = Arc::new(Instrumented::new(engine, observer));
            serve(engine, started, args).await?;
        }
        Backend::Swarm => {
            let swarm = swarm_engine(engine, global, &started.settings).await?;
            started.metrics.watch_swarm_tasks(swarm.clone());
            serve(Arc::new(Instrumented::new(swarm, observer)), started, args).await?;
        }
    }
    info!("stopped");
    Ok(())
}

/// The Swarm backend on `engine`, once it is known to be a manager and
/// the settings suit it (README "Running on Docker Swarm").
async fn swarm_engine(
    engine: DockerEngine,
    global: &GlobalArgs,
    settings: &ContainerSettings,
) -> Result<SwarmEngine, CliError> {
    if settings.network_isolation == NetworkIsolation::Isolated {
        return Err(CliError::Config(
            "--network-isolation isolated needs a bridge network; Swarm's overlay networks cannot disable traffic between agents (README \"Running on Docker Swarm\")".to_owned(),
        ));
    }
    let swarm = SwarmEngine::new(engine, global.swarm_options());
    let nodes = swarm
        .manager_nodes()
        .await
        .map_err(|e| CliError::Config(e.to_string()))?;
    let options = swarm.options();
    info!(nodes, placement = ?options.placement, volume_driver = ?options.volume_driver, publish_mode = options.publish_mode.as_str(), "Swarm manager reachable");
    Ok(swarm)
}

/// What `run` has set up before it picks the backend.
struct Started {
    settings: ContainerSettings,
    runtime: RuntimeSettings,
    keys: KeyRing,
    store: Store,
    metrics: Arc<Metrics>,
}

/// Serves the API and reconciles on `engine` until SIGINT or SIGTERM.
async fn serve<E: Engine>(
    engine: Arc<E>,
    started: Started,
    args: &RunArgs,
) -> Result<(), CliError> {
    let Started {
        settings,
        runtime,
        keys,
        store,
        metrics,
    } = started;
    let api_token = std::env::var(API_TOKEN_ENV)
        .ok()
        .as_deref()
        .and_then(ApiToken::new);
    if api_token.is_none() {
        info!("{API_TOKEN_ENV} not set: the JSON API answers 503; metrics and health stay open");
    }
    info!(
        instance = %settings.instance,
        image = %settings.image,
        network = %settings.network,
        ports = %settings.port_range,
        publish_ip = %settings.publish_ip,
        allowed_images = %settings.allowed_images,
        network_isolation = settings.network_isolation.as_str(),
        concurrency = runtime.concurrency,
        engine_concurrency = runtime.engine_concurrency,
        "controller starting"
    );

    let role = Arc::new(Role::default());
    let nudge = Arc::new(Nudge::new());
    // The API and /readyz read through connections of their own: no number
    // of callers can take the reconcilers' (README "Operations").
    let api_store = store.with_own_pool(crate::store::API_CONNECTIONS);
    let state = Arc::new(AppState {
        store: api_store.clone(),
        keys: keys.clone(),
        api_token,
        instance: settings.instance.clone(),
        default_image: settings.image.clone(),
        readiness: Arc::new(http::CachedReadiness::new(Arc::new(Checks {
            store: api_store,
            engine: engine.clone(),
            role: role.clone(),
            settings: Arc::new(settings.clone()),
        }))),
        max_inflight: args.api_max_inflight,
        metrics: metrics.clone(),
        gateway_probe: GatewayProbe::new(
            ProbeKind::new(args.readiness_probe, &args.readiness_path),
            settings.publish_ip,
        ),
        nudge: nudge.clone(),
    });
    let server = http::Server::bind(runtime.listen)
        .await
        .map_err(|e| CliError::Config(e.to_string()))?;
    let addr = server.local_addr().unwrap_or(runtime.listen);
    info!(addr = %addr, "http listener ready: /metrics /healthz /readyz /v1");
    let (stop_http, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let http_task = tokio::spawn(server.serve(http::router(state), async {
        let _ = http_stopped.await;
    }));
    let status_feed = tokio::spawn(crate::feed::status_notifications(store.clone()));

    let (shutdown_tx, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = shutdown_tx.send(true);
    });
    let stopping = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };

    let parts = Parts {
        store: store.clone(),
        engine,
        settings: Arc::new(settings),
        keys,
        metrics,
        nudge,
        role,
        reconciler: ReconcilerOptions {
            orphan_grace: args.orphan_grace,
            needs_human_retry: args.failed_retry,
            engine_concurrency: runtime.engine_concurrency,
            engine_burst: runtime.concurrency,
            policy: crate::plan::Policy {
                slow_retry: args.failed_retry,
                ..Default::default()
            },
            ..Default::default()
        },
        controller: ControllerOptions {
            concurrency: runtime.concurrency,
            resync_period: runtime.resync_period,
            feed: FeedOptions {
                poll_interval: args.poll_interval,
                ..Default::default()
            },
            shutdown_timeout: args.shutdown_timeout,
            clock: Clock::system(),
            ..Default::default()
        },
    };

    if store.sqlite_file().is_some() || store.backend() == sea_orm::DatabaseBackend::Sqlite {
        info!("SQLite: this process is the only one for this database; reconciling");
        let holder = args.holder_id.clone().unwrap_or_else(default_holder);
        Heartbeat::new(
            store.clone(),
            &parts.settings.instance,
            &holder,
            runtime.resync_period,
        )
        .beat_while(parts.lead(stopping(shutdown.clone())))
        .await;
    } else {
        let holder = args.holder_id.clone().unwrap_or_else(default_holder);
        let elector = Elector::new(
            store.clone(),
            &parts.settings.instance,
            &holder,
            args.lease_ttl,
        );
        info!(holder = %holder, lease_ttl_s = args.lease_ttl.as_secs(), "PostgreSQL: electing a leader through the lease");
        elector
            .lead_while_elected(|| stopping(shutdown.clone()), |stop| parts.lead(stop))
            .await;
    }

    status_feed.abort();
    let _ = stop_http.send(());
    match tokio::time::timeout(Duration::from_secs(5), http_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(error = %e, "http listener failed"),
        _ => warn!("http listener did not close within 5s"),
    }
    Ok(())
}

/// Warns when the image allow-list is open to any image, or shuts out the
/// default image (every row naming no image would then fail).
fn warn_about_allowed_images(settings: &ContainerSettings) {
    let allowed = settings.allowed_images.to_string();
    if settings.allowed_images.allows_any() {
        warn!(
            allowed_images = %allowed,
            "--allowed-images allows any image: rows and API callers can run any image from any registry the engine reaches"
        );
    } else if !settings.image_allowed(&settings.image) {
        warn!(
            allowed_images = %allowed,
            image = %settings.image,
            "the default image is not in --allowed-images: rows naming no image will fail"
        );
    }
}

/// Resolves on SIGINT or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot listen for SIGTERM; only SIGINT stops the controller");
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => info!("SIGINT received"),
        _ = term.recv() => info!("SIGTERM received"),
    }
}
