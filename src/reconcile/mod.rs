//! One reconcile of one user: read the desired row and the status row,
//! observe the engine, plan, apply, write status, say when to look again.
//!
//! One file per step: `observe` looks at the engine, `target` decides what
//! the row asks for and claims a port and a token, [`crate::plan`] decides,
//! `execute` acts, `finish` writes the status; `memory` is what the
//! reconciler keeps about a user between passes.
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

mod error;
mod execute;
mod finish;
mod memory;
mod observe;
mod target;
#[cfg(test)]
mod testing;
mod turns;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tracing::{debug, warn};

use crate::clock::Clock;
use crate::config::ContainerSettings;
use crate::docker::{Engine, ObservedContainer};
use crate::plan::{plan, Action, Intent, Observed, Policy, Target};
use crate::ports::PortAllocator;
use crate::secrets::KeyRing;
use crate::status::{ContainerStatus, Phase};
use crate::store::{DesiredRow, Store};

pub use error::ReconcileError;
use memory::{Blocked, Memories};
pub use turns::{EngineTurns, Priority};

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
    /// A create or start of `priority` waited `waited` for its turn at the engine.
    fn engine_turn(&self, _priority: Priority, _waited: Duration) {}
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
    /// Creates and starts of bulk work in flight at once within a minute of
    /// a wake (wakes never wait for one; see [`EngineTurns`]).
    pub engine_concurrency: usize,
    /// Creates and starts of bulk work in flight at once otherwise (the
    /// reconcile concurrency).
    pub engine_burst: usize,
}

/// Default of [`ReconcilerOptions::engine_concurrency`] (`--engine-concurrency`).
pub const DEFAULT_ENGINE_CONCURRENCY: usize = 2;

impl Default for ReconcilerOptions {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            orphan_grace: Duration::from_secs(300),
            stable_after: Duration::from_secs(600),
            needs_human_retry: Duration::from_secs(300),
            engine_concurrency: DEFAULT_ENGINE_CONCURRENCY,
            engine_burst: crate::controller::DEFAULT_CONCURRENCY,
        }
    }
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
    memory: Memories,
    clock: Clock,
    telemetry: Arc<dyn Telemetry>,
    turns: EngineTurns,
}

/// What one pass over one user reads once and carries from the target
/// through the actions to the status write.
struct Pass<'a> {
    user_id: &'a str,
    /// The canonical container name.
    name: String,
    /// The desired row as read at the start of the pass.
    desired: Option<DesiredRow>,
    /// The status row as read at the start of the pass.
    previous: Option<ContainerStatus>,
    /// The status row being written.
    row: ContainerStatus,
    /// The canonical container as the last action left it.
    current: Option<ObservedContainer>,
    /// The pass's one reading of the clock.
    now: DateTime<Utc>,
    /// Whether an API caller waits for this pass.
    priority: Priority,
}

impl<'a> Pass<'a> {
    /// A pass over `user_id` from its rows; the status row to write starts
    /// as the stored one (or `pending`), showing the revision read.
    fn begin(
        user_id: &'a str,
        name: String,
        desired: Option<DesiredRow>,
        previous: Option<ContainerStatus>,
        now: DateTime<Utc>,
        priority: Priority,
    ) -> Self {
        let mut row = previous
            .clone()
            .unwrap_or_else(|| ContainerStatus::pending(user_id, now));
        match desired.as_ref() {
            Some(Ok(d)) => row.observed_revision = Some(d.revision),
            // An invalid row is reported `failed` for its revision too.
            Some(Err(invalid)) => row.observed_revision = Some(invalid.revision),
            None => {}
        }
        Self {
            user_id,
            name,
            desired,
            previous,
            row,
            current: None,
            now,
            priority,
        }
    }

    /// The row's effective state, one of [`DESIRED_STATES`].
    fn desired_state(&self) -> Option<&'static str> {
        self.desired.as_ref().map(|d| match d {
            Ok(d) => match target::intent_of(d, self.now) {
                Intent::Running => "running",
                Intent::Stopped => "stopped",
                Intent::Idle => "idle",
            },
            Err(_) => "invalid",
        })
    }
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
            memory: Memories::default(),
            clock: Clock::system(),
            telemetry: Arc::new(NoTelemetry),
            turns: EngineTurns::new(
                options.engine_concurrency,
                options.engine_burst,
                Clock::system(),
            ),
        }
    }

    /// Reads the time from `clock` instead of the system clock (virtual
    /// time in tests; give the port allocator and the controller the same).
    pub fn with_clock(mut self, clock: Clock) -> Self {
        self.turns = EngineTurns::new(
            self.options.engine_concurrency,
            self.options.engine_burst,
            clock,
        );
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

    /// Waits for a turn at the engine for a create or start, and reports the wait.
    async fn turn(&self, priority: Priority) -> turns::Turn<'_> {
        let asked = self.clock.now();
        let turn = self.turns.take(priority).await;
        self.telemetry
            .engine_turn(priority, self.clock.now().duration_since(asked));
        turn
    }

    /// Reconciles `user_id` once, as bulk work.
    pub async fn reconcile(&self, user_id: &str) -> Result<Outcome, ReconcileError> {
        self.reconcile_as(user_id, Priority::Bulk).await
    }

    /// Reconciles `user_id` once; a [`Priority::Wake`] pass never waits for
    /// a turn at the engine.
    pub async fn reconcile_as(
        &self,
        user_id: &str,
        priority: Priority,
    ) -> Result<Outcome, ReconcileError> {
        let now = self.clock.wall();
        let desired = self.store.desired(user_id).await?;
        let previous = self.store.status(user_id).await?;
        let names = self.names(user_id, previous.as_ref()).await?;
        let found = self.observe(user_id, &names.container).await?;
        let mut pass = Pass::begin(
            user_id,
            names.container.clone(),
            desired,
            previous,
            now,
            priority,
        );
        // A restart counted in memory but never written is not lost.
        pass.row.restarts = self.memory.restarts_to_report(user_id, pass.row.restarts);

        let target = match self
            .target(&mut pass, &names, found.canonical.as_ref())
            .await
        {
            Ok(t) => t,
            Err(e) if !e.is_transient() => Target::Failed {
                message: e.to_string(),
                retry_at: None,
            },
            Err(e) => return Err(self.record_error(pass, e).await),
        };
        let desired_state = pass.desired_state();
        let wants_running = matches!(
            target,
            Target::Present {
                intent: Intent::Running,
                ..
            }
        );
        let canonical = found.canonical.as_ref();
        if let Some(waited) = self
            .memory
            .track_start(user_id, wants_running, canonical, now)
        {
            self.telemetry.container_started(waited);
        }
        let crash = self
            .memory
            .crash_history(user_id, canonical, now, self.options.stable_after);
        let observed = Observed {
            canonical: found.canonical,
            foreign_holder: found.foreign_holder,
            strays: found.strays,
            previous_phase: pass.previous.as_ref().map(|s| s.phase),
            crash,
        };
        let plan = plan(&target, &observed, now, &self.options.policy);
        debug!(actions = ?plan.actions, status = ?plan.status, "planned");
        if !plan.actions.is_empty() {
            let names: Vec<&str> = plan.actions.iter().map(Action::name).collect();
            tracing::Span::current().record("actions", names.join(",").as_str());
        }

        pass.current = observed.canonical;
        for action in &plan.actions {
            let Err(e) = self.apply(action, &mut pass).await else {
                continue;
            };
            if e.is_transient() {
                return Err(self.record_error(pass, e).await);
            }
            // Needs a human: report it, and do not try again before the
            // slow retry unless the row changes.
            warn!(error = %e, action = ?action, "reconcile needs attention");
            let mut outcome = self.needs_human(pass, e, plan.actions.len()).await?;
            outcome.desired_state = desired_state;
            return Ok(outcome);
        }
        let mut outcome = self.finish(&plan, &target, pass).await?;
        outcome.desired_state = desired_state;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{reconciler, StubEngine};
    use super::*;
    use crate::desired::DesiredState;
    use crate::store::DesiredUpdate;

    #[tokio::test]
    async fn a_second_pass_over_a_stopped_user_does_nothing_more() {
        let (r, _dir) = reconciler(StubEngine::default()).await;
        let row = DesiredUpdate {
            user_id: "alice".into(),
            state: Some(DesiredState::Stopped),
            ..DesiredUpdate::default()
        };
        r.store.upsert_desired(&row).await.unwrap();
        let first = r.reconcile("alice").await.unwrap();
        assert_eq!(first.phase, Some(Phase::Stopped));
        assert_eq!(first.desired_state, Some("stopped"));
        assert!(first.converged);
        let written = r.store.status("alice").await.unwrap().unwrap();
        assert_eq!(
            (written.host_port, written.gateway_token.as_ref()),
            (None, None)
        );
        let second = r.reconcile("alice").await.unwrap();
        assert_eq!(second, first);
        assert_eq!(r.store.status("alice").await.unwrap(), Some(written));
        assert_eq!(r.engine.calls(), Vec::<String>::new());
    }
}
