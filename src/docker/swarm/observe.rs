//! A user's service and its tasks, read as the container the reconciler
//! plans for: one run state, an exit code, a health, and where it runs or
//! why it does not yet (README "Running on Docker Swarm").
//!
//! Pure: the calls that fetch the service, its tasks and a node are in
//! `mod.rs`; what they mean is decided here and table-tested.
//!
//! The mapping:
//! - 0 replicas: a task still live is `running` (a stop waits for it to
//!   go), else the last task's end is `exited`, and a service that never ran
//!   is `created`;
//! - 1 replica: the current task (the newest whose desired state is running)
//!   `running` is running; scheduled, preparing or starting is `pending`
//!   with Swarm's state and error as the reason; ended is `exited` with its
//!   exit code, but for one Swarm killed as unhealthy, which is running and
//!   unhealthy so the plan replaces it as the Docker backend restarts one;
//!   a replica without any task is `created`, so the plan starts it (and the
//!   start sees that Swarm makes the task);
//! - a task whose node is down or drained is `pending`, naming the node and
//!   saying that the user's volume lives there.

use std::collections::BTreeMap;

use bollard::models::{Node, NodeSpecAvailabilityEnum, NodeState, Service, Task, TaskState};
use chrono::{DateTime, Utc};

use super::spec::pinned_node;
use crate::docker::bollard::containers::{docker_time, env_map};
use crate::docker::{ContainerHealth, ObservedContainer, Placement, RunState};

/// A cluster node, as far as placing a user goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    /// Swarm's node id.
    pub id: String,
    /// Its hostname.
    pub hostname: String,
    /// Its address.
    pub addr: Option<String>,
    /// `ready`, `down`, `disconnected`, `unknown`.
    pub state: String,
    /// `active`, `pause`, `drain`.
    pub availability: String,
}

impl NodeView {
    /// Our view of an inspected node.
    pub(super) fn from_node(node: Node) -> Self {
        let status = node.status.unwrap_or_default();
        let spec = node.spec.unwrap_or_default();
        Self {
            id: node.id.unwrap_or_default(),
            hostname: node
                .description
                .and_then(|d| d.hostname)
                .unwrap_or_default(),
            addr: status.addr,
            state: status.state.unwrap_or(NodeState::UNKNOWN).to_string(),
            availability: spec
                .availability
                .unwrap_or(NodeSpecAvailabilityEnum::ACTIVE)
                .to_string(),
        }
    }

    /// Why no task of a user pinned here can run, if the node is unusable.
    pub fn unusable(&self) -> Option<String> {
        let why = if self.state != "ready" {
            format!("is {}", self.state)
        } else if self.availability == "drain" {
            "is drained".to_owned()
        } else {
            return None;
        };
        Some(format!(
            "node {} ({}) {why}; this user's volume lives there, so the agent runs again when the node is back",
            self.hostname, self.id
        ))
    }
}

/// The live states: a task in one of them runs or is on its way to.
pub(super) fn is_live(state: TaskState) -> bool {
    matches!(
        state,
        TaskState::NEW
            | TaskState::ALLOCATED
            | TaskState::PENDING
            | TaskState::ASSIGNED
            | TaskState::ACCEPTED
            | TaskState::PREPARING
            | TaskState::READY
            | TaskState::STARTING
            | TaskState::RUNNING
    )
}

fn state_of(task: &Task) -> TaskState {
    task.status
        .as_ref()
        .and_then(|s| s.state)
        .unwrap_or(TaskState::NEW)
}

fn created(task: &Task) -> Option<DateTime<Utc>> {
    task.created_at.as_deref().and_then(docker_time)
}

/// The task that stands for the user now: the newest one Swarm wants
/// running, or else the newest of all.
pub(super) fn current_task(tasks: &[Task]) -> Option<&Task> {
    let newest = |wanted: bool| {
        tasks
            .iter()
            .filter(|t| !wanted || t.desired_state == Some(TaskState::RUNNING))
            .max_by_key(|t| (created(t), t.id.clone()))
    };
    newest(true).or_else(|| newest(false))
}

/// The task's state and Swarm's error, as `status.message` shows them.
fn task_reason(task: &Task) -> String {
    let status = task.status.clone().unwrap_or_default();
    let state = state_of(task).to_string();
    match status.err.filter(|e| !e.is_empty()) {
        Some(err) => format!("Swarm task {state}: {err}"),
        None => match status.message.filter(|m| !m.is_empty() && *m != state) {
            Some(message) => format!("Swarm task {state} ({message})"),
            None => format!("Swarm task {state}"),
        },
    }
}

/// True when Swarm killed the task because its health check failed.
fn killed_unhealthy(task: &Task) -> bool {
    task.status
        .as_ref()
        .and_then(|s| s.err.as_deref())
        .is_some_and(|e| e.contains("unhealthy"))
}

/// The run state, health and waiting reason of a service of `replicas`
/// with `tasks`; `node` is the node of the current task, or the pinned
/// node when there is no task.
fn run_state(
    replicas: i64,
    tasks: &[Task],
    node: Option<&NodeView>,
) -> (RunState, ContainerHealth, Option<String>) {
    let current = current_task(tasks);
    let node_down = node.and_then(NodeView::unusable);
    if replicas == 0 {
        let leaving = tasks.iter().find(|t| is_live(state_of(t)));
        return match (leaving, current) {
            (Some(_), _) if node_down.is_none() => (RunState::Running, ContainerHealth::None, None),
            (_, Some(_)) => (RunState::Exited, ContainerHealth::None, None),
            (_, None) => (RunState::Created, ContainerHealth::None, None),
        };
    }
    let Some(task) = current else {
        // A replica without a task: the pinned node is down, or Swarm has
        // not made one (the start that asked for it makes sure it does).
        return match node_down {
            Some(why) => (RunState::Pending, ContainerHealth::None, Some(why)),
            None => (RunState::Created, ContainerHealth::None, None),
        };
    };
    let state = state_of(task);
    if let Some(why) = node_down.filter(|_| is_live(state)) {
        return (RunState::Pending, ContainerHealth::None, Some(why));
    }
    match state {
        TaskState::RUNNING => (RunState::Running, ContainerHealth::None, None),
        s if is_live(s) => (
            RunState::Pending,
            ContainerHealth::None,
            Some(task_reason(task)),
        ),
        _ if killed_unhealthy(task) => (
            RunState::Running,
            ContainerHealth::Unhealthy,
            Some(task_reason(task)),
        ),
        _ => (
            RunState::Exited,
            ContainerHealth::None,
            Some(task_reason(task)),
        ),
    }
}

/// The service's replica count (0 when it is not a replicated service).
pub(super) fn replicas(service: &Service) -> i64 {
    service
        .spec
        .as_ref()
        .and_then(|s| s.mode.as_ref())
        .and_then(|m| m.replicated.as_ref())
        .and_then(|r| r.replicas)
        .unwrap_or(0)
}

/// The service's placement constraints.
pub(super) fn constraints(service: &Service) -> Vec<String> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.task_template.as_ref())
        .and_then(|t| t.placement.as_ref())
        .and_then(|p| p.constraints.clone())
        .unwrap_or_default()
}

/// The node whose state decides the user's: the current task's, or, with
/// no task yet, the pinned one.
pub(super) fn node_to_check(service: &Service, tasks: &[Task]) -> Option<String> {
    current_task(tasks)
        .and_then(|t| t.node_id.clone())
        .filter(|n| !n.is_empty())
        .or_else(|| pinned_node(&constraints(service)))
}

/// The container the reconciler sees for `service` with its `tasks`;
/// `node` is the node [`node_to_check`] named, when it could be read.
pub(super) fn observed(
    service: &Service,
    tasks: &[Task],
    node: Option<&NodeView>,
) -> ObservedContainer {
    let spec = service.spec.clone().unwrap_or_default();
    let container = spec
        .task_template
        .as_ref()
        .and_then(|t| t.container_spec.clone())
        .unwrap_or_default();
    let (state, health, waiting) = run_state(replicas(service), tasks, node);
    let current = current_task(tasks);
    let status = current.and_then(|t| t.status.clone()).unwrap_or_default();
    let at = status.timestamp.as_deref().and_then(docker_time);
    let (started_at, finished_at) = match state {
        RunState::Running => (at, None),
        RunState::Exited => (current.and_then(created), at),
        _ => (None, None),
    };
    let image = container.image.unwrap_or_default();
    // Swarm pins the image to a digest when it can resolve one.
    let image = match image.split_once('@') {
        Some((reference, _)) => reference.to_owned(),
        None => image,
    };
    let task_node = current
        .and_then(|t| t.node_id.clone())
        .filter(|n| !n.is_empty());
    let node_addr = node
        .filter(|n| Some(&n.id) == task_node.as_ref())
        .and_then(|n| n.addr.clone());
    ObservedContainer {
        id: service.id.clone().unwrap_or_default(),
        name: spec.name.clone().unwrap_or_default(),
        labels: spec
            .labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        image,
        state,
        exit_code: status.container_status.and_then(|c| c.exit_code),
        health,
        started_at,
        finished_at,
        host_port: published_port(service),
        env: env_map(container.env.unwrap_or_default()),
        placement: Placement {
            node: task_node,
            node_addr,
            pinned: pinned_node(&constraints(service)),
            waiting,
        },
    }
}

/// The published port of the service's spec.
fn published_port(service: &Service) -> Option<u16> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.endpoint_spec.as_ref())
        .and_then(|e| e.ports.as_ref())
        .and_then(|ports| {
            ports
                .iter()
                .filter_map(|p| Some((p.target_port?, p.published_port?)))
                .min()
        })
        .and_then(|(_, published)| u16::try_from(published).ok())
}

/// What the task watcher compares between two lists: per user, the current
/// task's id, the stage of its state, desired state and error, and the
/// state of its node (`node_state`: a node going down changes no task). A
/// change nudges the user. The steps between scheduled and running
/// (assigned, accepted, preparing, ready, starting) are one stage: they
/// change nothing the reconciler does, and a fleet starting at once would
/// otherwise be reconciled once per step.
pub(super) fn fingerprints(
    tasks: &[Task],
    user_of: impl Fn(&Task) -> Option<String>,
    node_state: impl Fn(&str) -> String,
) -> BTreeMap<String, String> {
    let mut by_user: BTreeMap<String, Vec<Task>> = BTreeMap::new();
    for task in tasks {
        if let Some(user) = user_of(task) {
            by_user.entry(user).or_default().push(task.clone());
        }
    }
    by_user
        .into_iter()
        .map(|(user, tasks)| {
            let live = tasks.iter().filter(|t| is_live(state_of(t))).count();
            let print = current_task(&tasks).map_or_else(String::new, |t| {
                format!(
                    "{}/{}/{:?}/{}/{live}/{}",
                    t.id.as_deref().unwrap_or_default(),
                    stage(state_of(t)),
                    t.desired_state,
                    t.status
                        .as_ref()
                        .and_then(|s| s.err.as_deref())
                        .unwrap_or_default(),
                    node_state(t.node_id.as_deref().unwrap_or_default()),
                )
            });
            (user, print)
        })
        .collect()
}

/// A task state as far as the reconciler's decision goes.
fn stage(state: TaskState) -> String {
    match state {
        TaskState::ASSIGNED
        | TaskState::ACCEPTED
        | TaskState::PREPARING
        | TaskState::READY
        | TaskState::STARTING => "on its way".to_owned(),
        other => other.to_string(),
    }
}

/// The users whose fingerprint differs between `before` and `after`
/// (appeared, changed or gone).
pub(super) fn changed_users(
    before: &BTreeMap<String, String>,
    after: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut users: Vec<String> = after
        .iter()
        .filter(|(user, print)| before.get(*user) != Some(*print))
        .map(|(user, _)| user.clone())
        .collect();
    users.extend(before.keys().filter(|u| !after.contains_key(*u)).cloned());
    users
}

/// Tasks by their state's name, for the tasks-by-state gauge: the current
/// task of each user only.
pub(super) fn count_states<'a>(current: impl Iterator<Item = &'a Task>) -> BTreeMap<String, u64> {
    let mut counts = BTreeMap::new();
    for task in current {
        *counts.entry(state_of(task).to_string()).or_default() += 1;
    }
    counts
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn task(id: &str, created: &str, desired: &str, state: &str, err: &str, exit: i64) -> Task {
        serde_json::from_value(json!({
            "ID": id,
            "CreatedAt": created,
            "NodeID": "n1",
            "DesiredState": desired,
            "Status": {
                "Timestamp": "2026-11-30T12:00:10Z",
                "State": state,
                "Message": state,
                "Err": err,
                "ContainerStatus": { "ExitCode": exit }
            }
        }))
        .unwrap()
    }

    fn service(replicas: i64, constraints: &[&str]) -> Service {
        serde_json::from_value(json!({
            "ID": "s1",
            "Spec": {
                "Name": "mosaic-user-alice",
                "Labels": { "io.clawfleet.user-id": "alice" },
                "Mode": { "Replicated": { "Replicas": replicas } },
                "TaskTemplate": {
                    "ContainerSpec": { "Image": "agent:1@sha256:abc", "Env": ["A=1"] },
                    "Placement": { "Constraints": constraints }
                },
                "EndpointSpec": { "Ports": [ { "TargetPort": 18789, "PublishedPort": 19000 } ] }
            }
        }))
        .unwrap()
    }

    fn node(state: &str, availability: &str) -> NodeView {
        NodeView {
            id: "n1".into(),
            hostname: "worker-1".into(),
            addr: Some("10.0.0.2".into()),
            state: state.into(),
            availability: availability.into(),
        }
    }

    const T0: &str = "2026-11-30T12:00:00Z";
    const T1: &str = "2026-11-30T12:00:05Z";

    #[test]
    fn a_service_and_its_tasks_read_as_one_container() {
        let ready = node("ready", "active");
        let down = node("down", "active");
        let drained = node("ready", "drain");
        let running = task("t1", T0, "running", "running", "", 0);
        let preparing = task("t2", T1, "running", "preparing", "", 0);
        let crashed = task("t1", T0, "shutdown", "failed", "task: non-zero exit (1)", 1);
        let config = task(
            "t1",
            T0,
            "shutdown",
            "failed",
            "task: non-zero exit (78)",
            78,
        );
        let unhealthy = task(
            "t1",
            T0,
            "shutdown",
            "failed",
            "task: non-zero exit (137): dockerexec: unhealthy container",
            137,
        );
        let no_node = task(
            "t2",
            T1,
            "running",
            "pending",
            "no suitable node (scheduling constraints not satisfied on 3 nodes)",
            0,
        );
        let stopped = task("t1", T0, "shutdown", "shutdown", "", 137);
        let stopping = task("t1", T0, "shutdown", "running", "", 0);
        type Row<'a> = (
            &'a str,
            i64,
            Vec<Task>,
            Option<&'a NodeView>,
            RunState,
            ContainerHealth,
            Option<&'a str>,
        );
        let table: Vec<Row> = vec![
            ("never ran", 0, vec![], None, RunState::Created, ContainerHealth::None, None),
            ("scaled to zero", 0, vec![stopped.clone()], Some(&ready), RunState::Exited, ContainerHealth::None, None),
            ("on its way out", 0, vec![stopping.clone()], Some(&ready), RunState::Running, ContainerHealth::None, None),
            ("running", 1, vec![running.clone()], Some(&ready), RunState::Running, ContainerHealth::None, None),
            ("replaced, new one preparing", 1, vec![crashed.clone(), preparing.clone()], Some(&ready), RunState::Pending, ContainerHealth::None, Some("Swarm task preparing")),
            ("a replica without a task", 1, vec![], None, RunState::Created, ContainerHealth::None, None),
            ("crashed", 1, vec![crashed.clone()], Some(&ready), RunState::Exited, ContainerHealth::None, Some("Swarm task failed: task: non-zero exit (1)")),
            ("configuration error", 1, vec![config.clone()], Some(&ready), RunState::Exited, ContainerHealth::None, Some("Swarm task failed: task: non-zero exit (78)")),
            ("killed unhealthy", 1, vec![unhealthy.clone()], Some(&ready), RunState::Running, ContainerHealth::Unhealthy, Some("Swarm task failed: task: non-zero exit (137): dockerexec: unhealthy container")),
            ("no suitable node", 1, vec![no_node.clone()], Some(&ready), RunState::Pending, ContainerHealth::None, Some("Swarm task pending: no suitable node (scheduling constraints not satisfied on 3 nodes)")),
            ("its node is down", 1, vec![running.clone()], Some(&down), RunState::Pending, ContainerHealth::None, Some("node worker-1 (n1) is down; this user's volume lives there, so the agent runs again when the node is back")),
            ("its node is drained", 1, vec![no_node.clone()], Some(&drained), RunState::Pending, ContainerHealth::None, Some("node worker-1 (n1) is drained; this user's volume lives there, so the agent runs again when the node is back")),
            ("pinned, node down, no task", 1, vec![], Some(&down), RunState::Pending, ContainerHealth::None, Some("node worker-1 (n1) is down; this user's volume lives there, so the agent runs again when the node is back")),
            ("scaled to zero while its node is down", 0, vec![stopping.clone()], Some(&down), RunState::Exited, ContainerHealth::None, None),
        ];
        for (case, replicas, tasks, node, state, health, waiting) in table {
            let observed = observed(&service(replicas, &["node.id==n1"]), &tasks, node);
            assert_eq!(
                (
                    observed.state,
                    observed.health,
                    observed.placement.waiting.as_deref()
                ),
                (state, health, waiting),
                "{case}"
            );
        }
    }

    #[test]
    fn the_observed_container_carries_exit_code_times_port_image_and_pin() {
        let crashed = task(
            "t1",
            T0,
            "shutdown",
            "failed",
            "task: non-zero exit (78)",
            78,
        );
        let observed = observed(
            &service(1, &["node.id==n1"]),
            &[crashed],
            Some(&node("ready", "active")),
        );
        assert_eq!(observed.exit_code, Some(78));
        assert_eq!(observed.started_at, docker_time(T0));
        assert_eq!(observed.finished_at, docker_time("2026-11-30T12:00:10Z"));
        assert_eq!(observed.host_port, Some(19000));
        assert_eq!(
            observed.image, "agent:1",
            "the digest Swarm added is not a spec change"
        );
        assert_eq!(observed.user_id(), Some("alice"));
        assert_eq!(observed.placement.pinned.as_deref(), Some("n1"));
        assert_eq!(observed.placement.node.as_deref(), Some("n1"));
        assert_eq!(observed.placement.node_addr.as_deref(), Some("10.0.0.2"));
    }

    #[test]
    fn the_watcher_nudges_only_users_whose_current_task_or_its_node_changed() {
        let user = |t: &Task| t.id.as_ref().map(|id| id[..1].to_owned());
        let ready = |_: &str| "ready".to_owned();
        let later = [
            task("a1", T0, "running", "running", "", 0),
            task("b1", T0, "running", "running", "", 0),
            task("d1", T0, "running", "new", "", 0),
        ];
        let before = fingerprints(
            &[
                task("a1", T0, "running", "running", "", 0),
                task("b1", T0, "running", "starting", "", 0),
                task("c1", T0, "running", "running", "", 0),
            ],
            user,
            ready,
        );
        let after = fingerprints(&later, user, ready);
        let mut changed = changed_users(&before, &after);
        changed.sort();
        assert_eq!(changed, ["b", "c", "d"]);
        assert_eq!(changed_users(&after, &after), Vec::<String>::new());
        // The steps of a start are one stage: no nudge between them.
        let preparing = fingerprints(
            &[task("b1", T0, "running", "preparing", "", 0)],
            user,
            ready,
        );
        let starting = fingerprints(&[task("b1", T0, "running", "starting", "", 0)], user, ready);
        assert_eq!(changed_users(&preparing, &starting), Vec::<String>::new());
        // A node going down changes none of its tasks, but nudges their users.
        let down = fingerprints(&later, user, |_| "down".to_owned());
        assert_eq!(changed_users(&after, &down).len(), 3);
    }
}
