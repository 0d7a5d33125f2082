//! What a start, stop, restart, update or pin of a user's agent asks of its
//! Swarm service: the replica count and the `ForceUpdate` counter, decided
//! from the service as last inspected (README "Running on Docker Swarm").
//!
//! Pure and table-tested; `mod.rs` sends the result with the version it
//! was read at and, when Swarm says the service moved on meanwhile, reads
//! it again and decides again.
//!
//! Invariants:
//! - a start or stop of a service already there is no change, so retries
//!   and repeated passes never redeploy a running agent;
//! - a task that ended while its service has a replica is replaced by
//!   bumping `ForceUpdate` (Swarm's own restart policy is off);
//! - an update keeps the replica count and bumps `ForceUpdate`, so a
//!   `restart_nonce` bump, which changes no other field of the task,
//!   still redeploys.

use bollard::models::{ServiceSpec, TaskState};

use super::spec::pin_constraint;

/// One change of a service's spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Change {
    /// Set the replica count.
    Scale(i64),
    /// Replace the task: bump `ForceUpdate`.
    Redeploy,
}

/// The service's state a decision reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ServiceState {
    /// Its replica count.
    pub replicas: i64,
    /// The state of its current task, if it has one.
    pub task: Option<TaskState>,
}

fn ended(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::COMPLETE
            | TaskState::SHUTDOWN
            | TaskState::FAILED
            | TaskState::REJECTED
            | TaskState::REMOVE
            | TaskState::ORPHANED
    )
}

/// What starting the agent asks: a replica, or a new task for one that
/// ended, or for a replica Swarm never made a task for.
pub(super) fn start(state: ServiceState) -> Option<Change> {
    if state.replicas == 0 {
        return Some(Change::Scale(1));
    }
    match state.task {
        None => Some(Change::Redeploy),
        Some(s) if ended(s) => Some(Change::Redeploy),
        Some(_) => None,
    }
}

/// What stopping the agent asks: no replica.
pub(super) fn stop(state: ServiceState) -> Option<Change> {
    (state.replicas != 0).then_some(Change::Scale(0))
}

/// What restarting the agent asks: a new task (or a first one).
pub(super) fn restart(state: ServiceState) -> Change {
    if state.replicas == 0 {
        Change::Scale(1)
    } else {
        Change::Redeploy
    }
}

/// `spec` with `change` made.
pub(super) fn changed(mut spec: ServiceSpec, change: Change) -> ServiceSpec {
    match change {
        Change::Scale(replicas) => {
            let mode = spec.mode.get_or_insert_with(Default::default);
            mode.replicated
                .get_or_insert_with(Default::default)
                .replicas = Some(replicas);
        }
        Change::Redeploy => {
            let task = spec.task_template.get_or_insert_with(Default::default);
            task.force_update = Some(task.force_update.unwrap_or(0).wrapping_add(1));
        }
    }
    spec
}

/// `spec` kept on `node` (unless it already is); `None` when nothing changes.
pub(super) fn pinned(mut spec: ServiceSpec, node: &str) -> Option<ServiceSpec> {
    let constraint = pin_constraint(node);
    let task = spec.task_template.get_or_insert_with(Default::default);
    let placement = task.placement.get_or_insert_with(Default::default);
    let constraints = placement.constraints.get_or_insert_with(Vec::new);
    if constraints.contains(&constraint) {
        return None;
    }
    // A pin to another node is replaced, never added beside (no node would match both).
    constraints.retain(|c| !c.replace(' ', "").starts_with("node.id=="));
    constraints.push(constraint);
    Some(spec)
}

/// The replica count and `ForceUpdate` counter of `current`, carried over
/// into `next` with the counter bumped: an update replaces the task.
pub(super) fn updated(current: &ServiceSpec, next: ServiceSpec) -> ServiceSpec {
    let replicas = current
        .mode
        .as_ref()
        .and_then(|m| m.replicated.as_ref())
        .and_then(|r| r.replicas)
        .unwrap_or(0);
    let force = current
        .task_template
        .as_ref()
        .and_then(|t| t.force_update)
        .unwrap_or(0);
    let mut next = changed(next, Change::Scale(replicas));
    next.task_template
        .get_or_insert_with(Default::default)
        .force_update = Some(force);
    changed(next, Change::Redeploy)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(replicas: i64, task: Option<TaskState>) -> ServiceState {
        ServiceState { replicas, task }
    }

    #[test]
    fn starts_stops_and_restarts_change_only_what_they_must() {
        use TaskState::*;
        let table = [
            (
                state(0, None),
                Some(Change::Scale(1)),
                None,
                Change::Scale(1),
            ),
            (
                state(0, Some(SHUTDOWN)),
                Some(Change::Scale(1)),
                None,
                Change::Scale(1),
            ),
            (
                state(1, None),
                Some(Change::Redeploy),
                Some(Change::Scale(0)),
                Change::Redeploy,
            ),
            (
                state(1, Some(PREPARING)),
                None,
                Some(Change::Scale(0)),
                Change::Redeploy,
            ),
            (
                state(1, Some(RUNNING)),
                None,
                Some(Change::Scale(0)),
                Change::Redeploy,
            ),
            (
                state(1, Some(FAILED)),
                Some(Change::Redeploy),
                Some(Change::Scale(0)),
                Change::Redeploy,
            ),
            (
                state(1, Some(REJECTED)),
                Some(Change::Redeploy),
                Some(Change::Scale(0)),
                Change::Redeploy,
            ),
            (
                state(1, Some(COMPLETE)),
                Some(Change::Redeploy),
                Some(Change::Scale(0)),
                Change::Redeploy,
            ),
        ];
        for (service, on_start, on_stop, on_restart) in table {
            assert_eq!(start(service), on_start, "start of {service:?}");
            assert_eq!(stop(service), on_stop, "stop of {service:?}");
            assert_eq!(restart(service), on_restart, "restart of {service:?}");
        }
    }

    #[test]
    fn an_update_keeps_the_replicas_and_replaces_the_task() {
        let current = changed(
            changed(ServiceSpec::default(), Change::Scale(1)),
            Change::Redeploy,
        );
        let next = changed(ServiceSpec::default(), Change::Scale(0));
        let next = updated(&current, next);
        assert_eq!(next.mode.unwrap().replicated.unwrap().replicas, Some(1));
        assert_eq!(next.task_template.unwrap().force_update, Some(2));
    }

    #[test]
    fn a_pin_is_added_once_and_replaces_a_pin_to_another_node() {
        let spec = pinned(ServiceSpec::default(), "n1").expect("pinned");
        assert_eq!(pinned(spec.clone(), "n1"), None, "already pinned");
        let moved = pinned(spec, "n2").expect("re-pinned");
        let constraints = moved
            .task_template
            .unwrap()
            .placement
            .unwrap()
            .constraints
            .unwrap();
        assert_eq!(constraints, ["node.id==n2"]);
    }
}
