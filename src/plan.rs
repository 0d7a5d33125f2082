//! Where actions are decided: the pure function from (target, observed, now)
//! to the actions that move the engine toward the target.
//!
//! Invariants (pinned by the table tests below and by the convergence
//! property test in `tests/`):
//! - no I/O and no clock: `now` is an argument, so the same inputs always plan
//!   the same actions;
//! - applying the plan and planning again converges: from any observed state,
//!   a bounded number of rounds reaches a plan with no actions;
//! - a container clawfleet did not make (no labels) is only touched when a
//!   desired row claims its exact name; one labelled for another user or
//!   instance is never touched;
//! - a create or a recreate carries the [`Blueprint`] of a present target
//!   (its spec and claimed port and token), so none is planned without them.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};

pub use crate::desired::Intent;
use crate::docker::{ContainerHealth, ContainerSummary, ObservedContainer, RunState};
use crate::spec::DesiredSpec;
use crate::status::Phase;

/// Exit code with which the OpenClaw gateway reports a configuration error.
pub const CONFIG_ERROR_EXIT_CODE: i64 = 78;

/// What the user's container should be, as far as planning is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// No desired row: remove the user's containers (volumes stay), once
    /// `remove_after` has passed (the grace period of an unexplained orphan).
    Absent {
        /// Not before this instant; `None`: now (the row was deleted).
        remove_after: Option<DateTime<Utc>>,
    },
    /// The row cannot be acted on (invalid, disallowed image, token that
    /// cannot be opened): report it and leave the container as it is.
    Failed {
        /// Why, for `container_status.message`.
        message: String,
        /// When to look again without a change of the row (a failure that
        /// needs a human is retried slowly); `None`: only when the row changes.
        retry_at: Option<DateTime<Utc>>,
    },
    /// A container made from `blueprint` should exist, running or not.
    Present {
        /// Whether it should run, and if not, why.
        intent: Intent,
        /// Its spec and the port and token claimed for it.
        blueprint: Arc<Blueprint>,
    },
    /// A stopped or idle user that has no container: none is made, so no
    /// port or token is claimed for it (a user who never ran holds neither).
    /// The reconciler gives this target only when the engine shows no
    /// container of `spec.name`; one seen anyway is left alone.
    Resting {
        /// [`Intent::Stopped`] or [`Intent::Idle`].
        intent: Intent,
        /// The spec the container would have (its port, if the status row
        /// holds one, for `host_url`).
        spec: DesiredSpec,
    },
}

impl Target {
    /// The desired spec, for a row that can be acted on.
    pub fn spec(&self) -> Option<&DesiredSpec> {
        match self {
            Self::Present { blueprint, .. } => Some(&blueprint.spec),
            Self::Resting { spec, .. } => Some(spec),
            Self::Absent { .. } | Self::Failed { .. } => None,
        }
    }
}

/// What making the user's container takes: its spec, and the host port and
/// gateway token claimed for it in `container_status` before any container
/// uses them. A create or recreate carries one, so none is made without them.
#[derive(Clone, PartialEq, Eq)]
pub struct Blueprint {
    /// The container; its `host_port` is the claimed one.
    pub spec: DesiredSpec,
    /// The claimed port and token.
    pub claim: Claim,
}

impl Blueprint {
    /// A blueprint of `spec` built with `claim`'s port.
    pub fn new(spec: DesiredSpec, claim: Claim) -> Self {
        debug_assert_eq!(spec.host_port, Some(claim.host_port));
        Self { spec, claim }
    }
}

/// Names only what tells blueprints apart, never the token.
impl std::fmt::Debug for Blueprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Blueprint")
            .field("name", &self.spec.name)
            .field("hash", &self.spec.hash)
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

/// A host port and a gateway token held for one user in `container_status`.
#[derive(Clone, PartialEq, Eq)]
pub struct Claim {
    /// The host port the gateway is published on.
    pub host_port: u16,
    /// The gateway token, sealed as the status row stores it.
    pub sealed_token: String,
}

/// Shows the port; the token, even sealed, never reaches a log.
impl std::fmt::Debug for Claim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Claim")
            .field("host_port", &self.host_port)
            .field("sealed_token", &"<redacted>")
            .finish()
    }
}

/// The resting phase of a settled intent: where the status ends when nothing is left to do.
fn resting_phase(intent: Intent) -> Phase {
    match intent {
        Intent::Running => Phase::Running,
        Intent::Stopped => Phase::Stopped,
        Intent::Idle => Phase::Idle,
    }
}

/// A user's restarts in the current crash streak (kept by the reconciler, in memory).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CrashHistory {
    /// Restarts since the container last ran stably.
    pub consecutive: u32,
    /// When the last of those restarts was issued.
    pub last_restart_at: Option<DateTime<Utc>>,
}

/// What the engine and the status table hold for one user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Observed {
    /// The container holding the canonical name, if it is ours or unlabelled (adoptable).
    pub canonical: Option<ObservedContainer>,
    /// Set when the canonical name is held by a container labelled for
    /// another user or instance: who holds it.
    pub foreign_holder: Option<String>,
    /// Other containers labelled for this user (a replacement left by an
    /// interrupted recreate, or leftovers).
    pub strays: Vec<ContainerSummary>,
    /// The phase last written to `container_status`.
    pub previous_phase: Option<Phase>,
    /// The current crash streak.
    pub crash: CrashHistory,
}

/// Tunables of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Delay before the second restart of a crash streak; it doubles per restart.
    pub crash_backoff_base: Duration,
    /// Longest delay between restarts.
    pub crash_backoff_max: Duration,
    /// Wait before starting again a container that exited with the
    /// configuration-error code, or re-checking a name held by someone else.
    pub slow_retry: Duration,
    /// How long to wait before looking again at a container in a transient
    /// Docker state (restarting, removing).
    pub transient_poll: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            crash_backoff_base: Duration::from_secs(1),
            crash_backoff_max: Duration::from_secs(300),
            slow_retry: Duration::from_secs(300),
            transient_poll: Duration::from_secs(1),
        }
    }
}

impl Policy {
    /// Delay before restart number `consecutive + 1` of a crash streak:
    /// none for the first, then base, 2·base, 4·base … up to the maximum.
    pub fn crash_backoff(&self, consecutive: u32) -> Duration {
        if consecutive == 0 {
            return Duration::ZERO;
        }
        let factor = 2u32.saturating_pow(consecutive - 1);
        self.crash_backoff_base
            .saturating_mul(factor)
            .min(self.crash_backoff_max)
    }
}

/// Why a container is recreated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecreateReason {
    /// Its spec hash differs (configuration change or restart nonce bump).
    SpecChanged,
    /// It has no clawfleet labels: made by the old service, taken over.
    Adopted,
    /// Docker reports it dead.
    Dead,
}

/// Why a container is started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartReason {
    /// The row wants it running.
    Desired,
    /// It exited while it should run.
    Crashed {
        /// Its exit code.
        exit_code: Option<i64>,
    },
}

/// Why a container is restarted in place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartReason {
    /// Docker's health check reports it unhealthy.
    Unhealthy,
}

/// Why a container is stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// The row says `stopped`.
    Desired,
    /// The idle deadline passed.
    Idle,
}

/// One step toward the target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Give a replacement left by an interrupted recreate the canonical name.
    AdoptReplacement {
        /// Its id.
        id: String,
    },
    /// Remove a leftover container labelled for this user.
    RemoveStray {
        /// Its id.
        id: String,
        /// Its name.
        name: String,
    },
    /// Create the canonical container, and start it if `start`.
    Create {
        /// What to make it from.
        blueprint: Arc<Blueprint>,
        /// Start it after creating.
        start: bool,
    },
    /// Replace the canonical container with a fresh one (same volume),
    /// keeping the old one until the new one is created.
    Recreate {
        /// What to make the new one from.
        blueprint: Arc<Blueprint>,
        /// Why.
        reason: RecreateReason,
        /// Start the new one.
        start: bool,
    },
    /// Start the canonical container.
    Start {
        /// Why.
        reason: StartReason,
    },
    /// Restart the canonical container in place.
    Restart {
        /// Why.
        reason: RestartReason,
    },
    /// Stop the canonical container.
    Stop {
        /// Why.
        reason: StopReason,
    },
    /// Stop and remove the canonical container (its volume stays).
    Remove {
        /// Its id.
        id: String,
    },
    /// Keep the canonical container on the cluster node holding its volume,
    /// without restarting it (the Swarm backend; README "Running on Docker Swarm").
    Pin {
        /// The node's id.
        node: String,
    },
}

impl Action {
    /// A short name for logs (`create`, `recreate`, …).
    pub fn name(&self) -> &'static str {
        match self {
            Self::AdoptReplacement { .. } => "adopt_replacement",
            Self::RemoveStray { .. } => "remove_stray",
            Self::Create { .. } => "create",
            Self::Recreate { .. } => "recreate",
            Self::Start { .. } => "start",
            Self::Restart { .. } => "restart",
            Self::Stop { .. } => "stop",
            Self::Remove { .. } => "remove",
            Self::Pin { .. } => "pin",
        }
    }
}

/// What to do with the user's status row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StatusIntent {
    /// Write this phase and message.
    Write {
        /// Phase after the actions.
        phase: Phase,
        /// Reason or error; `None` when all is well.
        message: Option<String>,
    },
    /// The user is gone: delete the row (after the actions).
    Delete,
}

/// The decision for one user.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Steps, in order.
    pub actions: Vec<Action>,
    /// The status to report.
    pub status: StatusIntent,
    /// Look again after this long even if nothing happens.
    pub requeue_after: Option<Duration>,
}

impl Plan {
    fn write(phase: Phase, message: Option<String>) -> Self {
        Self {
            actions: Vec::new(),
            status: StatusIntent::Write { phase, message },
            requeue_after: None,
        }
    }

    fn with(mut self, action: Action) -> Self {
        self.actions.push(action);
        self
    }

    fn requeue(mut self, after: Duration) -> Self {
        self.requeue_after = Some(after);
        self
    }

    /// True when there is nothing left to do.
    pub fn is_converged(&self) -> bool {
        self.actions.is_empty()
    }
}

fn until(now: DateTime<Utc>, at: DateTime<Utc>) -> Duration {
    (at - now).to_std().unwrap_or(Duration::ZERO)
}

/// Decides the actions for one user.
pub fn plan(target: &Target, observed: &Observed, now: DateTime<Utc>, policy: &Policy) -> Plan {
    if let Some(holder) = &observed.foreign_holder {
        return Plan::write(
            Phase::Failed,
            Some(format!(
                "the container name is held by {holder}; remove or rename it"
            )),
        )
        .requeue(policy.slow_retry);
    }
    match target {
        Target::Failed { message, retry_at } => {
            let plan = Plan::write(Phase::Failed, Some(message.clone()));
            match retry_at {
                Some(at) => plan.requeue((*at - now).to_std().unwrap_or_default()),
                None => plan,
            }
        }
        Target::Absent { remove_after } => plan_absent(*remove_after, observed, now),
        Target::Present { intent, blueprint } => {
            let plan = plan_present(&blueprint.spec.name, observed, || {
                plan_canonical(*intent, blueprint, observed, now, policy)
            });
            pin_first(plan, blueprint, observed)
        }
        Target::Resting { intent, spec } => plan_present(&spec.name, observed, || {
            Plan::write(resting_phase(*intent), None)
        }),
    }
}

/// `plan` with a pin of the user's container to the node holding their
/// volume first, when the target names that node, the container is not
/// pinned there yet, and the plan changes it in a way that could move it (a
/// stop, start or restart). A converged user is left alone: a running task
/// stays on its node, and pinning every user as they first come up would
/// double the service updates of a fleet converging. A create or recreate
/// carries the pin in its spec.
fn pin_first(mut plan: Plan, blueprint: &Blueprint, observed: &Observed) -> Plan {
    let Some(node) = &blueprint.spec.node else {
        return plan;
    };
    let Some(c) = observed.canonical.as_ref().filter(|c| c.is_managed()) else {
        return plan;
    };
    let carries_spec = plan
        .actions
        .iter()
        .any(|a| matches!(a, Action::Create { .. } | Action::Recreate { .. }));
    if c.placement.pinned.as_ref() != Some(node) && !carries_spec && !plan.actions.is_empty() {
        plan.actions.insert(0, Action::Pin { node: node.clone() });
    }
    plan
}

fn plan_absent(
    remove_after: Option<DateTime<Utc>>,
    observed: &Observed,
    now: DateTime<Utc>,
) -> Plan {
    // Only what carries our labels is removed: never an unlabelled container.
    let ours = observed.canonical.as_ref().filter(|c| c.is_managed());
    if ours.is_none() && observed.strays.is_empty() {
        return Plan {
            actions: Vec::new(),
            status: StatusIntent::Delete,
            requeue_after: None,
        };
    }
    if let Some(at) = remove_after.filter(|at| *at > now) {
        return Plan::write(
            Phase::Removing,
            Some(format!(
                "no desired row; its container is removed at {} unless a row appears",
                at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )),
        )
        .requeue(until(now, at));
    }
    let mut plan = Plan {
        actions: Vec::new(),
        status: StatusIntent::Delete,
        requeue_after: None,
    };
    if let Some(c) = ours {
        plan.actions.push(Action::Remove { id: c.id.clone() });
    }
    for stray in &observed.strays {
        plan.actions.push(Action::RemoveStray {
            id: stray.id.clone(),
            name: stray.name.clone(),
        });
    }
    plan
}

/// The plan for a user with a row: what `canonical` plans for the
/// container of `name`, after the leftovers are removed.
fn plan_present(name: &str, observed: &Observed, canonical: impl FnOnce() -> Plan) -> Plan {
    let replacement = crate::naming::replacement_name(name);
    // An interrupted recreate left the new container under its temporary
    // name and removed the old one: finish the job before anything else.
    if observed.canonical.is_none() {
        if let Some(next) = observed.strays.iter().find(|s| s.name == replacement) {
            return Plan::write(Phase::Creating, None)
                .with(Action::AdoptReplacement {
                    id: next.id.clone(),
                })
                .requeue(Duration::ZERO);
        }
    }
    let mut plan = canonical();
    let strays = observed.strays.iter().map(|s| Action::RemoveStray {
        id: s.id.clone(),
        name: s.name.clone(),
    });
    // Leftovers go first: a stale replacement must not block a new recreate.
    plan.actions.splice(0..0, strays);
    plan
}

fn plan_canonical(
    intent: Intent,
    blueprint: &Arc<Blueprint>,
    observed: &Observed,
    now: DateTime<Utc>,
    policy: &Policy,
) -> Plan {
    let resting = resting_phase(intent);
    let Some(c) = &observed.canonical else {
        return match intent {
            Intent::Running => Plan::write(Phase::Running, None).with(Action::Create {
                blueprint: blueprint.clone(),
                start: true,
            }),
            _ => Plan::write(resting, None),
        };
    };
    if c.state == RunState::Pending {
        // A Swarm task on its way (README "Running on Docker Swarm"): wait
        // for it, saying why it does not run yet; the task watcher looks
        // again when its state changes. A user no longer wanted running is
        // stopped at once.
        return match intent {
            Intent::Running => Plan::write(Phase::Pending, c.placement.waiting.clone()),
            Intent::Stopped | Intent::Idle => {
                let reason = if intent == Intent::Idle {
                    StopReason::Idle
                } else {
                    StopReason::Desired
                };
                Plan::write(resting, None).with(Action::Stop { reason })
            }
        };
    }
    if matches!(c.state, RunState::Removing | RunState::Restarting) {
        let phase = observed.previous_phase.unwrap_or(Phase::Pending);
        return Plan::write(phase, None).requeue(policy.transient_poll);
    }
    let start = intent == Intent::Running;
    if !c.is_managed() {
        return Plan::write(resting, None).with(Action::Recreate {
            blueprint: blueprint.clone(),
            reason: RecreateReason::Adopted,
            start,
        });
    }
    if c.state == RunState::Dead {
        return Plan::write(resting, None).with(Action::Recreate {
            blueprint: blueprint.clone(),
            reason: RecreateReason::Dead,
            start,
        });
    }
    if !blueprint.spec.hash.is_current(c.spec_hash()) {
        return Plan::write(resting, None).with(Action::Recreate {
            blueprint: blueprint.clone(),
            reason: RecreateReason::SpecChanged,
            start,
        });
    }
    let running = matches!(c.state, RunState::Running | RunState::Paused);
    match (intent, running) {
        (Intent::Stopped, true) => Plan::write(Phase::Stopped, None).with(Action::Stop {
            reason: StopReason::Desired,
        }),
        (Intent::Idle, true) => Plan::write(Phase::Idle, None).with(Action::Stop {
            reason: StopReason::Idle,
        }),
        (Intent::Stopped | Intent::Idle, false) => Plan::write(resting, None),
        (Intent::Running, true) if c.health == ContainerHealth::Unhealthy => {
            let wait = backoff_left(observed, now, policy);
            if wait > Duration::ZERO {
                Plan::write(
                    Phase::Running,
                    Some(format!(
                        "container is unhealthy; restarting in {}s (back-off)",
                        wait.as_secs().max(1)
                    )),
                )
                .requeue(wait)
            } else {
                Plan::write(Phase::Running, None).with(Action::Restart {
                    reason: RestartReason::Unhealthy,
                })
            }
        }
        (Intent::Running, true) => Plan::write(Phase::Running, None),
        (Intent::Running, false) => plan_start(c, observed, now, policy),
    }
}

fn plan_start(
    c: &ObservedContainer,
    observed: &Observed,
    now: DateTime<Utc>,
    policy: &Policy,
) -> Plan {
    let exit_code = c.exit_code;
    if c.state == RunState::Exited && exit_code == Some(CONFIG_ERROR_EXIT_CODE) {
        let since = c.finished_at.unwrap_or(now);
        let retry_at = since + chrono::Duration::from_std(policy.slow_retry).unwrap_or_default();
        let message = format!(
            "gateway exited with code {CONFIG_ERROR_EXIT_CODE} (configuration error); see `docker logs {}`",
            c.name
        );
        if retry_at > now {
            return Plan::write(Phase::Failed, Some(message)).requeue(until(now, retry_at));
        }
        return Plan::write(Phase::Running, None).with(Action::Start {
            reason: StartReason::Crashed { exit_code },
        });
    }
    // An exited container that had run, and that we did not stop, crashed
    // (or was stopped or killed behind our back): restart with back-off.
    let stopped_by_us = matches!(
        observed.previous_phase,
        Some(Phase::Stopped | Phase::Idle | Phase::Stopping)
    );
    let crashed = c.state == RunState::Exited && c.started_at.is_some() && !stopped_by_us;
    if !crashed {
        return Plan::write(Phase::Running, None).with(Action::Start {
            reason: StartReason::Desired,
        });
    }
    let wait = backoff_left(observed, now, policy);
    if wait > Duration::ZERO {
        let why = c
            .placement
            .waiting
            .as_ref()
            .map_or_else(String::new, |w| format!(" ({w})"));
        return Plan::write(
            Phase::Starting,
            Some(format!(
                "container exited (code {}){why}; restarting in {}s (back-off)",
                exit_code.map_or("?".into(), |c| c.to_string()),
                wait.as_secs().max(1)
            )),
        )
        .requeue(wait);
    }
    Plan::write(Phase::Running, None).with(Action::Start {
        reason: StartReason::Crashed { exit_code },
    })
}

fn backoff_left(observed: &Observed, now: DateTime<Utc>, policy: &Policy) -> Duration {
    let delay = policy.crash_backoff(observed.crash.consecutive);
    match observed.crash.last_restart_at {
        Some(last) => {
            let at = last + chrono::Duration::from_std(delay).unwrap_or_default();
            until(now, at)
        }
        None => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::{LABEL_INSTANCE, LABEL_MANAGED, LABEL_SPEC_HASH, LABEL_USER_ID};
    use crate::spec::SpecHash;
    use chrono::TimeZone;
    use std::collections::BTreeMap;

    const HASH: &str = "0123456789abcdef";
    const NAME: &str = "mosaic-user-alice";

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap()
    }

    fn secs(s: i64) -> chrono::Duration {
        chrono::Duration::seconds(s)
    }

    fn labels(hash: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_MANAGED.into(), "true".into()),
            (LABEL_INSTANCE.into(), "default".into()),
            (LABEL_USER_ID.into(), "alice".into()),
            (LABEL_SPEC_HASH.into(), hash.into()),
        ])
    }

    fn container(state: RunState) -> ObservedContainer {
        ObservedContainer {
            id: "c1".into(),
            name: NAME.into(),
            labels: labels(HASH),
            image: "img".into(),
            state,
            exit_code: (state == RunState::Exited).then_some(0),
            health: ContainerHealth::None,
            started_at: (state != RunState::Created).then(|| now() - secs(60)),
            finished_at: (state == RunState::Exited).then(|| now() - secs(5)),
            host_port: Some(19000),
            env: BTreeMap::new(),
            placement: Default::default(),
        }
    }

    /// The replacement an interrupted recreate left.
    fn replacement() -> ContainerSummary {
        ContainerSummary {
            id: "n1".into(),
            name: format!("{NAME}-next"),
            labels: labels(HASH),
            state: RunState::Created,
        }
    }

    fn spec() -> DesiredSpec {
        let s = crate::spec::tests::settings();
        let mut spec = DesiredSpec::new(&s, "alice", &s.image, 0, Some(19000));
        spec.name = NAME.into();
        spec.hash = SpecHash::exact(HASH);
        spec
    }

    fn blueprint() -> Arc<Blueprint> {
        blueprint_of(spec())
    }

    fn blueprint_of(spec: DesiredSpec) -> Arc<Blueprint> {
        let claim = Claim {
            host_port: 19000,
            sealed_token: "v2:sealed".into(),
        };
        Arc::new(Blueprint::new(spec, claim))
    }

    fn present(intent: Intent) -> Target {
        Target::Present {
            intent,
            blueprint: blueprint(),
        }
    }

    fn observed(c: Option<ObservedContainer>, previous: Option<Phase>) -> Observed {
        Observed {
            canonical: c,
            previous_phase: previous,
            ..Default::default()
        }
    }

    fn run(target: &Target, observed: &Observed) -> Plan {
        plan(target, observed, now(), &Policy::default())
    }

    fn phase_of(p: &Plan) -> Phase {
        match &p.status {
            StatusIntent::Write { phase, .. } => *phase,
            StatusIntent::Delete => panic!("expected a write"),
        }
    }

    fn message_of(p: &Plan) -> Option<String> {
        match &p.status {
            StatusIntent::Write { message, .. } => message.clone(),
            StatusIntent::Delete => None,
        }
    }

    /// Alice's target pinned to `node`, with `intent`.
    fn pinned_target(intent: Intent, node: &str) -> Target {
        let mut spec = spec();
        spec.node = Some(node.into());
        Target::Present {
            intent,
            blueprint: blueprint_of(spec),
        }
    }

    #[test]
    fn a_swarm_task_on_its_way_waits_saying_why_unless_it_is_no_longer_wanted() {
        let mut c = container(RunState::Pending);
        c.placement.waiting = Some("node w1 (n1) is down; this user's volume lives there".into());
        let waiting = run(
            &present(Intent::Running),
            &observed(Some(c.clone()), Some(Phase::Running)),
        );
        assert!(waiting.actions.is_empty(), "{waiting:?}");
        assert_eq!(phase_of(&waiting), Phase::Pending);
        assert_eq!(message_of(&waiting), c.placement.waiting);
        assert_eq!(waiting.requeue_after, None, "the task watcher looks again");
        for (intent, reason, phase) in [
            (Intent::Stopped, StopReason::Desired, Phase::Stopped),
            (Intent::Idle, StopReason::Idle, Phase::Idle),
        ] {
            let p = run(
                &present(intent),
                &observed(Some(c.clone()), Some(Phase::Pending)),
            );
            assert_eq!(p.actions, [Action::Stop { reason }]);
            assert_eq!(phase_of(&p), phase);
        }
    }

    #[test]
    fn a_user_is_pinned_to_the_node_of_their_volume_before_anything_could_move_them() {
        let running = container(RunState::Running);
        // Converged: a running task stays where it is; nothing is sent.
        let p = run(
            &pinned_target(Intent::Running, "n1"),
            &observed(Some(running.clone()), Some(Phase::Running)),
        );
        assert!(p.is_converged(), "{p:?}");
        // A stop could let the next start land elsewhere: pinned first.
        let p = run(
            &pinned_target(Intent::Stopped, "n1"),
            &observed(Some(running.clone()), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [
                Action::Pin { node: "n1".into() },
                Action::Stop {
                    reason: StopReason::Desired
                }
            ]
        );
        // Already pinned there: the stop alone.
        let mut pinned = running.clone();
        pinned.placement.pinned = Some("n1".into());
        let p = run(
            &pinned_target(Intent::Stopped, "n1"),
            &observed(Some(pinned), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [Action::Stop {
                reason: StopReason::Desired
            }]
        );
        // A recreate carries the pin in its spec.
        let mut old = running;
        old.labels = labels("another-hash");
        let p = run(
            &pinned_target(Intent::Running, "n1"),
            &observed(Some(old), Some(Phase::Running)),
        );
        assert!(matches!(p.actions[..], [Action::Recreate { .. }]), "{p:?}");
        // The Docker backend never names a node: never a pin.
        let p = run(
            &present(Intent::Stopped),
            &observed(Some(container(RunState::Running)), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [Action::Stop {
                reason: StopReason::Desired
            }]
        );
    }

    #[test]
    fn a_new_running_user_gets_a_container_created_and_started() {
        let p = run(&present(Intent::Running), &observed(None, None));
        assert_eq!(
            p.actions,
            [Action::Create {
                blueprint: blueprint(),
                start: true
            }]
        );
        assert_eq!(phase_of(&p), Phase::Running);
    }

    #[test]
    fn a_new_stopped_or_idle_user_gets_no_container() {
        for (intent, phase) in [
            (Intent::Stopped, Phase::Stopped),
            (Intent::Idle, Phase::Idle),
        ] {
            let p = run(&present(intent), &observed(None, None));
            assert!(p.actions.is_empty());
            assert_eq!(phase_of(&p), phase);
        }
    }

    #[test]
    fn a_running_container_that_matches_plans_nothing() {
        let p = run(
            &present(Intent::Running),
            &observed(Some(container(RunState::Running)), Some(Phase::Running)),
        );
        assert!(p.is_converged());
        assert_eq!(phase_of(&p), Phase::Running);
        assert_eq!(message_of(&p), None);
    }

    #[test]
    fn state_stopped_stops_a_running_container() {
        let p = run(
            &present(Intent::Stopped),
            &observed(Some(container(RunState::Running)), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [Action::Stop {
                reason: StopReason::Desired
            }]
        );
        assert_eq!(phase_of(&p), Phase::Stopped);
    }

    #[test]
    fn idle_container_is_stopped_at_its_deadline() {
        let p = run(
            &present(Intent::Idle),
            &observed(Some(container(RunState::Running)), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [Action::Stop {
                reason: StopReason::Idle
            }]
        );
        assert_eq!(phase_of(&p), Phase::Idle);
    }

    #[test]
    fn an_idle_user_with_activity_is_started_again_without_counting_a_crash() {
        let p = run(
            &present(Intent::Running),
            &observed(Some(container(RunState::Exited)), Some(Phase::Idle)),
        );
        assert_eq!(
            p.actions,
            [Action::Start {
                reason: StartReason::Desired
            }]
        );
    }

    #[test]
    fn a_created_container_is_started() {
        let p = run(
            &present(Intent::Running),
            &observed(Some(container(RunState::Created)), Some(Phase::Creating)),
        );
        assert_eq!(
            p.actions,
            [Action::Start {
                reason: StartReason::Desired
            }]
        );
    }

    #[test]
    fn a_stopped_container_stays_stopped_when_stopped_is_desired() {
        for intent in [Intent::Stopped, Intent::Idle] {
            let p = run(
                &present(intent),
                &observed(Some(container(RunState::Exited)), Some(Phase::Running)),
            );
            assert!(p.is_converged(), "{intent:?}");
        }
    }

    #[test]
    fn a_crashed_container_is_restarted_at_once_the_first_time() {
        let p = run(
            &present(Intent::Running),
            &observed(Some(container(RunState::Exited)), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [Action::Start {
                reason: StartReason::Crashed { exit_code: Some(0) }
            }]
        );
    }

    #[test]
    fn repeated_crashes_back_off_exponentially() {
        let policy = Policy::default();
        assert_eq!(policy.crash_backoff(0), Duration::ZERO);
        assert_eq!(policy.crash_backoff(1), Duration::from_secs(1));
        assert_eq!(policy.crash_backoff(4), Duration::from_secs(8));
        assert_eq!(policy.crash_backoff(30), Duration::from_secs(300));

        let mut o = observed(Some(container(RunState::Exited)), Some(Phase::Running));
        o.crash = CrashHistory {
            consecutive: 3,
            last_restart_at: Some(now() - secs(1)),
        };
        let p = run(&present(Intent::Running), &o);
        assert!(p.actions.is_empty());
        assert_eq!(phase_of(&p), Phase::Starting);
        assert_eq!(p.requeue_after, Some(Duration::from_secs(3)));
        assert!(message_of(&p).unwrap().contains("back-off"));

        o.crash.last_restart_at = Some(now() - secs(4));
        let p = run(&present(Intent::Running), &o);
        assert!(matches!(
            p.actions[..],
            [Action::Start {
                reason: StartReason::Crashed { .. }
            }]
        ));
    }

    #[test]
    fn exit_code_78_is_failed_with_a_slow_retry_not_a_hot_loop() {
        let mut c = container(RunState::Exited);
        c.exit_code = Some(78);
        let p = run(
            &present(Intent::Running),
            &observed(Some(c.clone()), Some(Phase::Running)),
        );
        assert!(p.actions.is_empty());
        assert_eq!(phase_of(&p), Phase::Failed);
        assert!(message_of(&p).unwrap().contains("code 78"));
        assert_eq!(p.requeue_after, Some(Duration::from_secs(295)));

        c.finished_at = Some(now() - secs(301));
        let p = run(
            &present(Intent::Running),
            &observed(Some(c), Some(Phase::Failed)),
        );
        assert_eq!(p.actions.len(), 1);
    }

    #[test]
    fn an_unhealthy_container_is_restarted_with_back_off() {
        let mut c = container(RunState::Running);
        c.health = ContainerHealth::Unhealthy;
        let p = run(
            &present(Intent::Running),
            &observed(Some(c.clone()), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [Action::Restart {
                reason: RestartReason::Unhealthy
            }]
        );

        let mut o = observed(Some(c), Some(Phase::Running));
        o.crash = CrashHistory {
            consecutive: 2,
            last_restart_at: Some(now()),
        };
        let p = run(&present(Intent::Running), &o);
        assert!(p.actions.is_empty());
        assert_eq!(p.requeue_after, Some(Duration::from_secs(2)));
    }

    #[test]
    fn a_container_labelled_with_the_legacy_hash_of_its_spec_is_not_recreated() {
        let mut c = container(RunState::Running);
        c.labels = labels("0123456789abcdef");
        let mut spec = spec();
        spec.hash = SpecHash::with_legacy(HASH, "0123456789abcdef");
        let target = Target::Present {
            intent: Intent::Running,
            blueprint: blueprint_of(spec),
        };
        let p = run(&target, &observed(Some(c), Some(Phase::Running)));
        assert!(p.actions.is_empty(), "{:?}", p.actions);
    }

    #[test]
    fn a_changed_spec_hash_recreates_running_or_stopped() {
        let mut c = container(RunState::Running);
        c.labels = labels("ffffffffffffffff");
        let p = run(
            &present(Intent::Running),
            &observed(Some(c.clone()), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [Action::Recreate {
                blueprint: blueprint(),
                reason: RecreateReason::SpecChanged,
                start: true
            }]
        );
        let p = run(
            &present(Intent::Stopped),
            &observed(Some(c), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [Action::Recreate {
                blueprint: blueprint(),
                reason: RecreateReason::SpecChanged,
                start: false
            }]
        );
    }

    #[test]
    fn an_unlabelled_container_of_the_right_name_is_adopted() {
        let mut c = container(RunState::Running);
        c.labels.clear();
        let p = run(&present(Intent::Running), &observed(Some(c), None));
        assert_eq!(
            p.actions,
            [Action::Recreate {
                blueprint: blueprint(),
                reason: RecreateReason::Adopted,
                start: true
            }]
        );
    }

    #[test]
    fn a_name_held_by_another_users_container_is_a_conflict_not_a_match() {
        let o = Observed {
            foreign_holder: Some("container abc labelled for user \"10\"".into()),
            ..Default::default()
        };
        for target in [
            present(Intent::Running),
            Target::Absent { remove_after: None },
        ] {
            let p = run(&target, &o);
            assert!(p.actions.is_empty());
            assert_eq!(phase_of(&p), Phase::Failed);
            assert!(message_of(&p).unwrap().contains("held by"));
        }
    }

    #[test]
    fn a_deleted_row_removes_the_container_and_then_the_status() {
        let t = Target::Absent { remove_after: None };
        let p = run(
            &t,
            &observed(Some(container(RunState::Running)), Some(Phase::Running)),
        );
        assert_eq!(p.actions, [Action::Remove { id: "c1".into() }]);
        assert_eq!(p.status, StatusIntent::Delete);
        let p = run(&t, &observed(None, Some(Phase::Removing)));
        assert!(p.is_converged());
        assert_eq!(p.status, StatusIntent::Delete);
    }

    #[test]
    fn an_orphan_waits_out_its_grace_period() {
        let t = Target::Absent {
            remove_after: Some(now() + secs(30)),
        };
        let p = run(&t, &observed(Some(container(RunState::Running)), None));
        assert!(p.actions.is_empty());
        assert_eq!(phase_of(&p), Phase::Removing);
        assert_eq!(p.requeue_after, Some(Duration::from_secs(30)));
    }

    #[test]
    fn an_unlabelled_container_is_never_removed_for_a_missing_row() {
        let mut c = container(RunState::Running);
        c.labels.clear();
        let p = run(
            &Target::Absent { remove_after: None },
            &observed(Some(c), None),
        );
        assert!(p.actions.is_empty());
        assert_eq!(p.status, StatusIntent::Delete);
    }

    #[test]
    fn an_interrupted_recreate_is_finished_by_adopting_the_replacement() {
        let next = replacement();
        let o = Observed {
            strays: vec![next.clone()],
            ..Default::default()
        };
        let p = run(&present(Intent::Running), &o);
        assert_eq!(p.actions, [Action::AdoptReplacement { id: "n1".into() }]);
        // With the canonical container present, the replacement is a leftover.
        let o = Observed {
            canonical: Some(container(RunState::Running)),
            strays: vec![next],
            ..Default::default()
        };
        let p = run(&present(Intent::Running), &o);
        assert_eq!(
            p.actions,
            [Action::RemoveStray {
                id: "n1".into(),
                name: format!("{NAME}-next")
            }]
        );
    }

    #[test]
    fn a_resting_user_gets_no_container_but_finishes_an_interrupted_recreate() {
        for (intent, phase) in [
            (Intent::Stopped, Phase::Stopped),
            (Intent::Idle, Phase::Idle),
        ] {
            let resting = Target::Resting {
                intent,
                spec: spec(),
            };
            let p = run(&resting, &observed(None, None));
            assert!(p.is_converged());
            assert_eq!(phase_of(&p), phase);
            let o = Observed {
                strays: vec![replacement()],
                ..Default::default()
            };
            let p = run(&resting, &o);
            assert_eq!(p.actions, [Action::AdoptReplacement { id: "n1".into() }]);
        }
    }

    #[test]
    fn a_failed_row_leaves_the_container_alone() {
        let t = Target::Failed {
            message: "invalid desired row: state: \"banana\"".into(),
            retry_at: None,
        };
        let p = run(
            &t,
            &observed(Some(container(RunState::Running)), Some(Phase::Running)),
        );
        assert!(p.actions.is_empty());
        assert_eq!(phase_of(&p), Phase::Failed);
        assert_eq!(p.requeue_after, None, "only a change of the row helps");
    }

    /// Regression: a second reconcile of a user blocked for a failure that
    /// needs a human (a duplicate trigger) dropped its slow retry, and the
    /// user waited for the next full resync.
    #[test]
    fn a_failure_held_until_a_retry_is_looked_at_again_then() {
        let t = Target::Failed {
            message: "image x is not available".into(),
            retry_at: Some(now() + secs(240)),
        };
        let p = run(&t, &observed(None, Some(Phase::Failed)));
        assert!(p.actions.is_empty());
        assert_eq!(p.requeue_after, Some(Duration::from_secs(240)));
    }

    #[test]
    fn a_dead_container_is_recreated() {
        let p = run(
            &present(Intent::Running),
            &observed(Some(container(RunState::Dead)), Some(Phase::Running)),
        );
        assert_eq!(
            p.actions,
            [Action::Recreate {
                blueprint: blueprint(),
                reason: RecreateReason::Dead,
                start: true
            }]
        );
    }

    #[test]
    fn containers_in_transient_docker_states_are_looked_at_again_shortly() {
        for state in [RunState::Restarting, RunState::Removing] {
            let p = run(
                &present(Intent::Running),
                &observed(Some(container(state)), Some(Phase::Running)),
            );
            assert!(p.actions.is_empty());
            assert_eq!(p.requeue_after, Some(Duration::from_secs(1)));
        }
    }
}
