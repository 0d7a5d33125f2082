//! One reconcile of one user: read the desired row and the status row,
//! observe the engine, plan, apply, write status, say when to look again.
//!
//! Invariants:
//! - the engine is observed afresh on every reconcile (events and lists only
//!   say *whom* to look at);
//! - running it twice in a row does nothing more the second time;
//! - a port and a token are claimed in `container_status` before any
//!   container uses them, so a crash between the two never hands a port to
//!   two users or a user two tokens;
//! - a recreate creates the new container before touching the old one, so a
//!   failed create leaves the user with the container they had;
//! - no token, plaintext or sealed, reaches a log field or an error message;
//! - a state volume labelled for another user or instance is never mounted,
//!   and no container is created on a network that disagrees with
//!   `--network-isolation` (README "Security"): both need a human.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{debug, info, warn};

use crate::config::ContainerSettings;
use crate::desired::{quote_short, DesiredContainer};
use crate::docker::{
    object_labels, shared_labels, ContainerFilter, Engine, EngineError, ObservedContainer,
    RunState, LABEL_INSTANCE, LABEL_MANAGED, LABEL_USER_ID,
};
use crate::isolation::NetworkMismatch;
use crate::naming::UserNames;
use crate::plan::{
    plan, Action, CrashHistory, Intent, Observed, Plan, Policy, StartReason, StatusIntent,
    StopReason, Target,
};
use crate::ports::{PortAllocator, PortError};
use crate::secrets::{GatewayToken, KeyRing, SecretsError};
use crate::spec::DesiredSpec;
use crate::status::{ContainerStatus, Phase};
use crate::store::{DesiredRow, Store, StoreError};

/// A reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A token could not be generated, sealed or opened.
    #[error("gateway token: {0}")]
    Secrets(#[from] SecretsError),
    /// No port could be allocated.
    #[error(transparent)]
    Ports(#[from] PortError),
    /// The agents' network disagrees with `--network-isolation`.
    #[error(transparent)]
    Network(#[from] NetworkMismatch),
    /// The user's state volume belongs to another user or instance.
    #[error(
        "volume {volume} is labelled for {holder}: it is never mounted into another user's container; remove it (docker volume rm) if it is unwanted, or give this instance another --name-prefix"
    )]
    ForeignVolume {
        /// The volume's name.
        volume: String,
        /// Whose it is, per its labels.
        holder: String,
    },
}

impl ReconcileError {
    /// True when a retry with back-off may fix it; false when it needs a
    /// human (bad image, exhausted port range, unopenable token).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(e) => e.is_transient(),
            Self::Engine(e) => e.is_transient(),
            Self::Secrets(_) => false,
            Self::Ports(PortError::Exhausted { .. }) => false,
            Self::Ports(PortError::Store(e)) => e.is_transient(),
            Self::Network(_) | Self::ForeignVolume { .. } => false,
        }
    }

    /// A short bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Store(_) => "database",
            Self::Engine(e) => e.kind(),
            Self::Secrets(_) => "secrets",
            Self::Ports(PortError::Exhausted { .. }) => "ports_exhausted",
            Self::Ports(PortError::Store(_)) => "database",
            Self::Network(_) | Self::ForeignVolume { .. } => "isolation",
        }
    }
}

/// `state` label values of `clawfleet_desired_containers`.
pub const DESIRED_STATES: [&str; 4] = ["running", "stopped", "idle", "invalid"];
/// `reason` label values of `clawfleet_container_restarts_total`.
pub const RESTART_REASONS: [&str; 2] = ["crash", "unhealthy"];

/// What the reconciler reports besides its results (for metrics). Every
/// method does nothing by default.
pub trait Telemetry: Send + Sync {
    /// A user desired running was seen running, `waited` after it was first
    /// seen desired running and not running.
    fn container_started(&self, _waited: Duration) {}
    /// A container was stopped at its idle deadline.
    fn idle_stop(&self) {}
    /// A crashed (`crash`) or unhealthy (`unhealthy`) container was restarted.
    fn restarted(&self, _reason: &'static str) {}
}

struct NoTelemetry;

impl Telemetry for NoTelemetry {}

/// What a reconcile found and decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Look again after this long (idle deadline, back-off, grace period).
    pub requeue_after: Option<Duration>,
    /// Nothing was left to do.
    pub converged: bool,
    /// The phase written (`None`: the user is gone).
    pub phase: Option<Phase>,
    /// Actions applied.
    pub actions: usize,
    /// The row's effective state (one of [`DESIRED_STATES`]); `None` without a row.
    pub desired_state: Option<&'static str>,
}

/// Tunables of the reconciler beyond the plan's.
#[derive(Clone, Copy, Debug)]
pub struct ReconcilerOptions {
    /// The plan's back-off and retry delays.
    pub policy: Policy,
    /// How long a container with no desired row and no deletion tombstone is
    /// kept before it is removed (protects against a wrong or emptied database).
    pub orphan_grace: Duration,
    /// A container that ran this long ends its crash streak.
    pub stable_after: Duration,
    /// Delay before re-looking at a user whose container needs a human.
    pub needs_human_retry: Duration,
}

impl Default for ReconcilerOptions {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            orphan_grace: Duration::from_secs(300),
            stable_after: Duration::from_secs(600),
            needs_human_retry: Duration::from_secs(300),
        }
    }
}

/// What the reconciler remembers about a user between reconciles (in memory only).
#[derive(Clone, Debug, Default)]
struct Memory {
    crash: CrashHistory,
    orphan_since: Option<DateTime<Utc>>,
    /// A failure that needs a human (missing image, exhausted ports) for
    /// this revision of the row: not retried before `until`.
    blocked: Option<Blocked>,
    /// When the user was first seen desired running and not running.
    waiting_since: Option<DateTime<Utc>>,
    /// The restart count to report, when a restart happened but the status
    /// write that would have recorded it failed (database locked or away).
    unrecorded_restarts: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Blocked {
    revision: i64,
    until: DateTime<Utc>,
    message: String,
}

/// Reconciles users one at a time each (the work queue guarantees a user is
/// never reconciled twice at once; different users run concurrently).
pub struct Reconciler<E: Engine> {
    store: Store,
    engine: Arc<E>,
    settings: Arc<ContainerSettings>,
    keys: KeyRing,
    ports: PortAllocator,
    options: ReconcilerOptions,
    network: tokio::sync::Mutex<Option<String>>,
    memory: Mutex<HashMap<String, Memory>>,
    clock: fn() -> DateTime<Utc>,
    telemetry: Arc<dyn Telemetry>,
}

/// What the engine shows for one user, before the plan's view of it.
struct Found {
    canonical: Option<ObservedContainer>,
    foreign_holder: Option<String>,
    strays: Vec<crate::docker::ContainerSummary>,
}

impl<E: Engine> Reconciler<E> {
    /// A reconciler over these edges.
    pub fn new(
        store: Store,
        engine: Arc<E>,
        settings: Arc<ContainerSettings>,
        keys: KeyRing,
        ports: PortAllocator,
        options: ReconcilerOptions,
    ) -> Self {
        Self {
            store,
            engine,
            settings,
            keys,
            ports,
            options,
            network: tokio::sync::Mutex::new(None),
            memory: Mutex::new(HashMap::new()),
            clock: Utc::now,
            telemetry: Arc::new(NoTelemetry),
        }
    }

    /// Uses `clock` instead of the system clock (simulations).
    pub fn with_clock(mut self, clock: fn() -> DateTime<Utc>) -> Self {
        self.clock = clock;
        self
    }

    /// Reports starts, idle stops and restarts to `telemetry`.
    pub fn with_telemetry(mut self, telemetry: Arc<dyn Telemetry>) -> Self {
        self.telemetry = telemetry;
        self
    }

    /// The engine.
    pub fn engine(&self) -> &Arc<E> {
        &self.engine
    }

    /// The settings.
    pub fn settings(&self) -> &ContainerSettings {
        &self.settings
    }

    /// The port allocator (users waiting for a port are woken through it).
    pub fn ports(&self) -> &PortAllocator {
        &self.ports
    }

    /// Reconciles `user_id` once.
    pub async fn reconcile(&self, user_id: &str) -> Result<Outcome, ReconcileError> {
        let now = (self.clock)();
        let desired = self.store.desired(user_id).await?;
        let previous = self.store.status(user_id).await?;
        let names = self.names(user_id, previous.as_ref()).await?;
        let name = names.container.clone();
        let found = self.observe(user_id, &name).await?;
        let mut row = previous
            .clone()
            .unwrap_or_else(|| ContainerStatus::pending(user_id, now));
        // A restart counted in memory but never written is not lost.
        row.restarts = self.remember(user_id, |m| match m.unrecorded_restarts {
            Some(n) if n > row.restarts => n,
            _ => {
                m.unrecorded_restarts = None;
                row.restarts
            }
        });
        match desired.as_ref() {
            Some(Ok(d)) => row.observed_revision = Some(d.revision),
            // An invalid row is reported `failed` for its revision too.
            Some(Err(invalid)) => row.observed_revision = Some(invalid.revision),
            None => {}
        }

        let (target, spec) = match self
            .target(user_id, &names, desired.as_ref(), &found, &mut row, now)
            .await
        {
            Ok(t) => t,
            Err(e) if !e.is_transient() => {
                let message = e.to_string();
                (Target::Failed { message }, None)
            }
            Err(e) => return Err(self.record_error(row, previous.as_ref(), e, now).await),
        };
        let desired_state = desired.as_ref().map(|d| match d {
            Ok(d) => match intent_of(d, now) {
                Intent::Running => "running",
                Intent::Stopped => "stopped",
                Intent::Idle => "idle",
            },
            Err(_) => "invalid",
        });
        self.track_start(user_id, &target, found.canonical.as_ref(), now);
        let crash = self.crash_history(user_id, found.canonical.as_ref(), now);
        let observed = Observed {
            canonical: found.canonical,
            foreign_holder: found.foreign_holder,
            strays: found.strays,
            previous_phase: previous.as_ref().map(|s| s.phase),
            crash,
        };
        let plan = plan(&target, &observed, now, &self.options.policy);
        debug!(actions = ?plan.actions, status = ?plan.status, "planned");
        if !plan.actions.is_empty() {
            let names: Vec<&str> = plan.actions.iter().map(Action::name).collect();
            tracing::Span::current().record("actions", names.join(",").as_str());
        }

        let applied = plan.actions.len();
        let mut current = observed.canonical.clone();
        for action in &plan.actions {
            if let Err(e) = self
                .apply(
                    action,
                    user_id,
                    &name,
                    spec.as_ref(),
                    &mut current,
                    &mut row,
                    previous.as_ref(),
                    now,
                )
                .await
            {
                if !e.is_transient() {
                    // Needs a human: report it, and do not try again before the
                    // slow retry unless the row changes.
                    warn!(error = %e, action = ?action, "reconcile needs attention");
                    if let Some(Ok(d)) = desired.as_ref() {
                        let blocked = Blocked {
                            revision: d.revision,
                            until: now
                                + chrono::Duration::from_std(self.options.needs_human_retry)
                                    .unwrap_or_default(),
                            message: e.to_string(),
                        };
                        self.remember(user_id, |m| m.blocked = Some(blocked));
                    }
                    row.message = Some(e.to_string());
                    set_phase(&mut row, Phase::Failed, now);
                    self.write(&row, previous.as_ref(), now).await?;
                    return Ok(Outcome {
                        requeue_after: Some(self.options.needs_human_retry),
                        converged: false,
                        phase: Some(Phase::Failed),
                        actions: applied,
                        desired_state,
                    });
                }
                return Err(self.record_error(row, previous.as_ref(), e, now).await);
            }
        }
        let mut outcome = self
            .finish(
                user_id,
                &plan,
                spec.as_ref(),
                current,
                row,
                previous.as_ref(),
                desired.as_ref(),
                now,
            )
            .await?;
        outcome.desired_state = desired_state;
        Ok(outcome)
    }

    /// The user's container and volume names: today's, unless the user
    /// already has names of the earlier 12-hex form — recorded in its status
    /// row, or, with no container recorded, an earlier state volume of ours
    /// still on the engine (a deleted user coming back) — which it keeps.
    async fn names(
        &self,
        user_id: &str,
        previous: Option<&ContainerStatus>,
    ) -> Result<UserNames, ReconcileError> {
        let prefix = &self.settings.name_prefix;
        let recorded = previous.and_then(|p| p.container_name.as_deref());
        if recorded.is_some() {
            return Ok(UserNames::resolve(prefix, user_id, recorded));
        }
        let Some(legacy) = UserNames::legacy(prefix, user_id) else {
            return Ok(UserNames::current(prefix, user_id));
        };
        match self.engine.inspect_volume(&legacy.volume).await? {
            Some(labels) if foreign_owner(&labels, &self.settings.instance, user_id).is_none() => {
                Ok(legacy)
            }
            _ => Ok(UserNames::current(prefix, user_id)),
        }
    }

    async fn observe(&self, user_id: &str, name: &str) -> Result<Found, ReconcileError> {
        let filter = ContainerFilter {
            instance: self.settings.instance.clone(),
            user_id: Some(user_id.to_owned()),
        };
        let labelled = self.engine.list_containers(&filter).await?;
        let by_name = labelled
            .iter()
            .find(|c| c.name == name)
            .map(|c| c.id.clone());
        // Docker resolves a name it does not know as an id prefix: only a
        // container of exactly this name counts.
        let inspected = self
            .engine
            .inspect_container(by_name.as_deref().unwrap_or(name))
            .await?
            .filter(|c| c.name == name);
        let mut found = Found {
            canonical: None,
            foreign_holder: None,
            strays: labelled.into_iter().filter(|c| c.name != name).collect(),
        };
        match inspected {
            None => {}
            Some(c) if !c.labels.contains_key(LABEL_MANAGED) => found.canonical = Some(c),
            Some(c)
                if c.instance() == Some(self.settings.instance.as_str())
                    && c.user_id() == Some(user_id) =>
            {
                found.canonical = Some(c)
            }
            Some(c) => {
                found.foreign_holder = Some(format!(
                    "container {} labelled for user {} of instance {}",
                    &c.id[..c.id.len().min(12)],
                    quote_short(c.user_id().unwrap_or("?")),
                    quote_short(c.instance().unwrap_or("?")),
                ))
            }
        }
        Ok(found)
    }

    /// Decides the target; claims a port (and a token) when a container will need one.
    async fn target(
        &self,
        user_id: &str,
        names: &UserNames,
        desired: Option<&DesiredRow>,
        found: &Found,
        row: &mut ContainerStatus,
        now: DateTime<Utc>,
    ) -> Result<(Target, Option<DesiredSpec>), ReconcileError> {
        let d = match desired {
            None => {
                let remove_after = if self.store.deleted_revision(user_id).await?.is_some() {
                    None
                } else {
                    let grace =
                        chrono::Duration::from_std(self.options.orphan_grace).unwrap_or_default();
                    let since = self.remember(user_id, |m| *m.orphan_since.get_or_insert(now));
                    Some(since + grace)
                };
                return Ok((Target::Absent { remove_after }, None));
            }
            Some(Err(invalid)) => {
                return Ok((
                    Target::Failed {
                        message: invalid.status_message(),
                    },
                    None,
                ));
            }
            Some(Ok(d)) => d,
        };
        let blocked = self.remember(user_id, |m| {
            m.orphan_since = None;
            // A changed row or an expired wait lifts the block.
            if m.blocked
                .as_ref()
                .is_some_and(|b| b.revision != d.revision || b.until <= now)
            {
                m.blocked = None;
            }
            m.blocked.clone()
        });
        if let Some(b) = blocked {
            return Ok((Target::Failed { message: b.message }, None));
        }
        let image = d
            .image
            .clone()
            .unwrap_or_else(|| self.settings.image.clone());
        if !self.settings.image_allowed(&image) {
            return Ok((
                Target::Failed {
                    message: format!(
                        "image {} is not allowed (--allowed-images: {})",
                        quote_short(image.as_str()),
                        self.settings.allowed_images
                    ),
                },
                None,
            ));
        }
        let intent = intent_of(d, now);
        let needs_port = intent == Intent::Running || found.canonical.is_some();
        let port = if needs_port {
            Some(
                self.resolve_port(user_id, found.canonical.as_ref(), row, now)
                    .await?,
            )
        } else {
            row.host_port.filter(|p| self.ports.usable(*p))
        };
        let spec = DesiredSpec::named(
            &self.settings,
            names,
            user_id,
            &image,
            d.restart_nonce,
            port,
        );
        Ok((
            Target::Present {
                intent,
                spec_hash: spec.hash.clone(),
                name: spec.name.clone(),
            },
            Some(spec),
        ))
    }

    /// The user's port: the one in the status row, else the one the existing
    /// container publishes, else a new one; claimed in the status row (with a
    /// token, generated once) before it is used.
    async fn resolve_port(
        &self,
        user_id: &str,
        canonical: Option<&ObservedContainer>,
        row: &mut ContainerStatus,
        now: DateTime<Utc>,
    ) -> Result<u16, ReconcileError> {
        match row.gateway_token.as_deref() {
            None => row.gateway_token = Some(self.keys.seal(user_id, &GatewayToken::generate()?)?),
            // A v1 token, or one sealed before a rotation, is sealed again as
            // it is: the plaintext, and so the container, stay. One that does
            // not open is left for `create` and `doctor` to report.
            Some(sealed) if self.keys.needs_reseal(sealed) => {
                if let Ok(token) = self.keys.open(user_id, sealed) {
                    row.gateway_token = Some(self.keys.seal(user_id, &token)?);
                }
            }
            Some(_) => {}
        }
        if let Some(port) = row.host_port.filter(|p| self.ports.usable(*p)) {
            // The user's own port, whatever the probe may have found on it.
            self.ports.note_claimed(port);
            return Ok(port);
        }
        // A port out of the range or found busy is given up for another.
        if let Some(old) = row.host_port.take() {
            self.ports.release(old);
        }
        if let Some(port) = canonical
            .and_then(|c| c.host_port)
            .filter(|p| self.ports.usable(*p))
        {
            row.host_port = Some(port);
            match self.store.write_status(row, now).await {
                Ok(()) => {
                    self.ports.note_claimed(port);
                    return Ok(port);
                }
                Err(StoreError::PortTaken(_)) => {
                    self.ports.note_claimed(port);
                    row.host_port = None;
                }
                Err(e) => return Err(e.into()),
            }
        }
        if !self.ports.is_loaded() {
            self.ports.load(self.store.ports_in_use().await?);
        }
        let claim_row = row.clone();
        let port = self
            .ports
            .allocate(user_id, |port| {
                let mut candidate = claim_row.clone();
                candidate.host_port = Some(port);
                let store = self.store.clone();
                async move { store.write_status(&candidate, now).await }
            })
            .await?;
        row.host_port = Some(port);
        debug!(port, user = %quote_short(user_id), "claimed host port");
        Ok(port)
    }

    fn remember<T>(&self, user_id: &str, f: impl FnOnce(&mut Memory) -> T) -> T {
        let mut memory = self.memory.lock().unwrap_or_else(|e| e.into_inner());
        let entry = memory.entry(user_id.to_owned()).or_default();
        let out = f(entry);
        if entry.crash == CrashHistory::default()
            && entry.orphan_since.is_none()
            && entry.blocked.is_none()
            && entry.waiting_since.is_none()
            && entry.unrecorded_restarts.is_none()
        {
            memory.remove(user_id);
        }
        out
    }

    /// Measures desired-running-to-running for the start-duration metric.
    fn track_start(
        &self,
        user_id: &str,
        target: &Target,
        canonical: Option<&ObservedContainer>,
        now: DateTime<Utc>,
    ) {
        let wants_running = matches!(
            target,
            Target::Present {
                intent: Intent::Running,
                ..
            }
        );
        let running = canonical.is_some_and(|c| c.state == RunState::Running);
        let started = self.remember(user_id, |m| match (wants_running, running) {
            (true, true) => m.waiting_since.take(),
            (true, false) => {
                m.waiting_since.get_or_insert(now);
                None
            }
            (false, _) => {
                m.waiting_since = None;
                None
            }
        });
        if let Some(since) = started {
            self.telemetry
                .container_started((now - since).to_std().unwrap_or_default());
        }
    }

    fn crash_history(
        &self,
        user_id: &str,
        canonical: Option<&ObservedContainer>,
        now: DateTime<Utc>,
    ) -> CrashHistory {
        let stable = canonical.is_some_and(|c| {
            c.state == RunState::Running
                && c.started_at.is_some_and(|at| {
                    (now - at).to_std().unwrap_or_default() >= self.options.stable_after
                })
        });
        self.remember(user_id, |m| {
            if stable {
                m.crash = CrashHistory::default();
            }
            m.crash
        })
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        action: &Action,
        user_id: &str,
        name: &str,
        spec: Option<&DesiredSpec>,
        current: &mut Option<ObservedContainer>,
        row: &mut ContainerStatus,
        previous: Option<&ContainerStatus>,
        now: DateTime<Utc>,
    ) -> Result<(), ReconcileError> {
        let timeout = self.settings.stop_timeout;
        let current_id = || {
            current
                .as_ref()
                .map(|c| c.id.clone())
                .unwrap_or_else(|| name.to_owned())
        };
        match action {
            Action::AdoptReplacement { id } => {
                info!(container = %name, "finishing an interrupted recreate");
                self.engine.rename_container(id, name).await?;
            }
            Action::RemoveStray { id, name: stray } => {
                info!(container = %stray, "removing leftover container");
                self.engine.remove_container(id).await?;
            }
            Action::Create { start } => {
                let spec = spec.expect("a present target has a spec");
                set_phase(row, Phase::Creating, now);
                row.message = None;
                self.write(row, previous, now).await?;
                info!(container = %name, image = %spec.image, port = ?spec.host_port, "creating container");
                let id = self.create(spec, row, name, now).await?;
                *current = self.engine.inspect_container(&id).await?;
                if *start {
                    self.start(&id, spec.host_port, row, now).await?;
                }
            }
            Action::Recreate { reason, start } => {
                let spec = spec.expect("a present target has a spec");
                let old = current_id();
                info!(container = %name, reason = ?reason, "recreating container");
                set_phase(row, Phase::Creating, now);
                self.write(row, previous, now).await?;
                let next = spec.replacement_name();
                let new_id = self.create(spec, row, &next, now).await?;
                // The new container exists: only now is the old one let go.
                self.engine.stop_container(&old, timeout).await?;
                self.engine.remove_container(&old).await?;
                self.engine.rename_container(&new_id, name).await?;
                *current = self.engine.inspect_container(&new_id).await?;
                if *start {
                    self.start(&new_id, spec.host_port, row, now).await?;
                }
            }
            Action::Start { reason } => {
                let id = current_id();
                if let StartReason::Crashed { exit_code } = reason {
                    info!(container = %name, exit_code = ?exit_code, restarts = row.restarts + 1, "restarting crashed container");
                    self.count_restart(user_id, row, now);
                    self.telemetry.restarted("crash");
                } else {
                    info!(container = %name, "starting container");
                }
                self.start(&id, spec.and_then(|s| s.host_port), row, now)
                    .await?;
            }
            Action::Restart { reason } => {
                info!(container = %name, reason = ?reason, restarts = row.restarts + 1, "restarting unhealthy container");
                self.count_restart(user_id, row, now);
                self.telemetry.restarted("unhealthy");
                let id = current_id();
                self.engine.restart_container(&id, timeout).await?;
            }
            Action::Stop { reason } => {
                info!(container = %name, reason = ?reason, "stopping container");
                set_phase(row, Phase::Stopping, now);
                self.write(row, previous, now).await?;
                self.engine.stop_container(&current_id(), timeout).await?;
                if *reason == StopReason::Idle {
                    self.telemetry.idle_stop();
                }
            }
            Action::Remove { id } => {
                info!(container = %name, "removing container (volume kept)");
                set_phase(row, Phase::Removing, now);
                self.write(row, previous, now).await?;
                self.engine.stop_container(id, timeout).await?;
                self.engine.remove_container(id).await?;
                *current = None;
            }
        }
        Ok(())
    }

    fn count_restart(&self, user_id: &str, row: &mut ContainerStatus, now: DateTime<Utc>) {
        row.restarts += 1;
        let restarts = row.restarts;
        self.remember(user_id, |m| {
            m.crash.consecutive += 1;
            m.crash.last_restart_at = Some(now);
            // Until a later reconcile reads it back from the table.
            m.unrecorded_restarts = Some(restarts);
        });
    }

    /// Creates a container for `spec` named `name`, pulling the image if missing.
    async fn create(
        &self,
        spec: &DesiredSpec,
        row: &mut ContainerStatus,
        name: &str,
        now: DateTime<Utc>,
    ) -> Result<String, ReconcileError> {
        let sealed = row
            .gateway_token
            .clone()
            .expect("a token is claimed with the port");
        let token = self.keys.open(&spec.user_id, &sealed)?;
        let network = self.network_id().await?;
        let volume_labels = self
            .engine
            .ensure_volume(
                &spec.volume,
                &object_labels(&self.settings.instance, &spec.user_id),
            )
            .await?;
        if let Some(holder) = foreign_owner(&volume_labels, &self.settings.instance, &spec.user_id)
        {
            return Err(ReconcileError::ForeignVolume {
                volume: spec.volume.clone(),
                holder,
            });
        }
        let container = spec.container_spec(&self.settings, &token, name, &network);
        match self.engine.create_container(&container).await {
            Ok(id) => Ok(id),
            Err(EngineError::ImageNotFound { image, .. }) => {
                info!(image = %image, "image not present; pulling");
                row.message = Some(format!("pulling image {image}"));
                self.write(row, None, now).await?;
                self.engine.pull_image(&image).await?;
                row.message = None;
                Ok(self.engine.create_container(&container).await?)
            }
            Err(e @ EngineError::Api { status: 404, .. }) => {
                // Most likely the network was removed behind our back: look it up again next time.
                *self.network.lock().await = None;
                Err(e.into())
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Starts `id`; a port the engine refuses is quarantined and released so
    /// the next reconcile moves the user to another one.
    async fn start(
        &self,
        id: &str,
        port: Option<u16>,
        row: &mut ContainerStatus,
        now: DateTime<Utc>,
    ) -> Result<(), ReconcileError> {
        match self.engine.start_container(id).await {
            Err(e @ EngineError::PortAllocated { .. }) => {
                let busy = match &e {
                    EngineError::PortAllocated { port: Some(p), .. } => Some(*p),
                    _ => port,
                };
                if let Some(busy) = busy {
                    warn!(
                        port = busy,
                        "host port taken outside clawfleet; moving to another port"
                    );
                    self.ports.quarantine(busy);
                    self.ports.release(busy);
                    if row.host_port == Some(busy) {
                        row.host_port = None;
                        row.message = Some(e.to_string());
                        self.store.write_status(row, now).await?;
                    }
                }
                Err(e.into())
            }
            other => Ok(other?),
        }
    }

    /// The agents' network id, created once (single-flight: one creator at a
    /// time) with the options `--network-isolation` asks for. A network that
    /// disagrees with the setting is refused, and asked about again next time.
    async fn network_id(&self) -> Result<String, ReconcileError> {
        let mut cached = self.network.lock().await;
        if let Some(id) = cached.as_ref() {
            return Ok(id.clone());
        }
        let isolation = self.settings.network_isolation;
        let network = self
            .engine
            .ensure_network(
                &self.settings.network,
                &shared_labels(&self.settings.instance),
                &isolation.network_options(),
            )
            .await?;
        if let Some(mismatch) = isolation.mismatch(&self.settings.network, &network) {
            return Err(mismatch.into());
        }
        *cached = Some(network.id.clone());
        Ok(network.id)
    }

    #[allow(clippy::too_many_arguments)]
    async fn finish(
        &self,
        user_id: &str,
        plan: &Plan,
        spec: Option<&DesiredSpec>,
        current: Option<ObservedContainer>,
        mut row: ContainerStatus,
        previous: Option<&ContainerStatus>,
        desired: Option<&DesiredRow>,
        now: DateTime<Utc>,
    ) -> Result<Outcome, ReconcileError> {
        let acted = !plan.actions.is_empty();
        let phase = match &plan.status {
            StatusIntent::Delete => {
                if let Some(previous) = previous {
                    self.store.delete_status(user_id).await?;
                    if let Some(port) = previous.host_port {
                        self.ports.release(port);
                    }
                    info!("user gone; status removed");
                }
                self.remember(user_id, |m| *m = Memory::default());
                return Ok(Outcome {
                    requeue_after: plan.requeue_after,
                    converged: !acted,
                    phase: None,
                    actions: plan.actions.len(),
                    desired_state: None,
                });
            }
            StatusIntent::Write { phase, message } => {
                // A container just started is not yet seen running: the look
                // that follows at once says `running` (with its health).
                let phase = match (*phase, acted) {
                    (Phase::Running, true) => Phase::Starting,
                    (phase, _) => phase,
                };
                set_phase(&mut row, phase, now);
                row.message = message.clone();
                phase
            }
        };
        row.container_id = current.as_ref().map(|c| c.id.clone());
        row.container_name = current.as_ref().map(|c| c.name.clone());
        // After acting, what the engine now holds is seen on the next look.
        // Docker keeps the last health result of a stopped container; only a
        // running one has a health worth reporting.
        row.health = match &current {
            Some(c) if !acted && c.state == RunState::Running => c.health,
            _ => None,
        };
        if let Some(spec) = spec {
            row.url = current.as_ref().map(|_| spec.url());
            row.host_url = spec.host_url(&self.settings);
        }
        self.write(&row, previous, now).await?;

        let mut requeue = plan.requeue_after;
        if acted {
            // Look again at once: the next reconcile observes what the actions did.
            requeue = Some(Duration::ZERO);
        } else if let Some(deadline) = desired
            .and_then(|d| d.as_ref().ok())
            .and_then(|d| d.idle_deadline())
        {
            if deadline > now {
                let wait = (deadline - now).to_std().unwrap_or_default();
                requeue = Some(requeue.map_or(wait, |r| r.min(wait)));
            }
        }
        let converged = !acted && plan.requeue_after.is_none() && phase != Phase::Failed;
        Ok(Outcome {
            requeue_after: requeue,
            converged,
            phase: Some(phase),
            actions: plan.actions.len(),
            desired_state: None,
        })
    }

    /// Writes the row when it differs from what is stored.
    async fn write(
        &self,
        row: &ContainerStatus,
        previous: Option<&ContainerStatus>,
        now: DateTime<Utc>,
    ) -> Result<(), ReconcileError> {
        let unchanged = previous.is_some_and(|p| {
            ContainerStatus {
                updated_at: p.updated_at,
                ..row.clone()
            } == *p
        });
        if !unchanged {
            self.store.write_status(row, now).await?;
        }
        Ok(())
    }

    /// Reports a transient error in the status row (best effort) and hands it back.
    ///
    /// The row keeps the revision it last showed: this reconcile did not
    /// finish acting on the revision it read, and `ensure-running` takes an
    /// `observed_revision` at or past its own as "this container is the one
    /// you asked for" (regression: it handed out the old container).
    async fn record_error(
        &self,
        mut row: ContainerStatus,
        previous: Option<&ContainerStatus>,
        error: ReconcileError,
        now: DateTime<Utc>,
    ) -> ReconcileError {
        row.observed_revision = previous.and_then(|p| p.observed_revision);
        row.message = Some(error.to_string());
        if let Err(e) = self.write(&row, previous, now).await {
            debug!(error = %e, "could not record the error in the status row");
        }
        error
    }
}

/// Whose an object is when its labels name another instance or user than
/// `instance`/`user_id`; `None` for ours or an unlabelled one (adopted, as a
/// takeover from the original service needs).
fn foreign_owner(
    labels: &std::collections::BTreeMap<String, String>,
    instance: &str,
    user_id: &str,
) -> Option<String> {
    let other = |key: &str, ours: &str| labels.get(key).filter(|v| v.as_str() != ours);
    if other(LABEL_INSTANCE, instance).is_none() && other(LABEL_USER_ID, user_id).is_none() {
        return None;
    }
    Some(format!(
        "user {} of instance {}",
        quote_short(labels.get(LABEL_USER_ID).map_or("?", String::as_str)),
        quote_short(labels.get(LABEL_INSTANCE).map_or("?", String::as_str)),
    ))
}

fn set_phase(row: &mut ContainerStatus, phase: Phase, now: DateTime<Utc>) {
    if row.phase != phase {
        row.phase = phase;
        row.last_transition_at = now;
    }
}

fn intent_of(d: &DesiredContainer, now: DateTime<Utc>) -> Intent {
    d.intent(now)
}
