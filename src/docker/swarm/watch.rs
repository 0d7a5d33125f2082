//! The nudges of the Swarm backend: task states are not evented across
//! nodes, so a watcher lists this instance's tasks (one call, filtered by
//! label) and the nodes (one more) every `--swarm-task-poll` and nudges only
//! the users whose current task, or its node's state, changed since the
//! last list; the manager's service events
//! (`create`, `update`, `remove`) nudge their user at once and list again.
//!
//! What it last saw is kept by the engine, not the stream, so a stream that
//! broke and was opened again nudges only what changed meanwhile.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bollard::models::{EventMessage, Task};
use bollard::query_parameters::{EventsOptionsBuilder, ListTasksOptionsBuilder};
use chrono::Utc;
use futures::stream::{self, BoxStream, StreamExt};

use super::observe::{changed_users, count_states, current_task, fingerprints, is_live};
use super::SwarmEngine;
use crate::docker::bollard::errors::classify;
use crate::docker::bollard::filters::{filter_matches, label_filters};
use crate::docker::{ContainerFilter, EngineError, EngineEvent, LABEL_USER_ID};

/// What the watcher saw at its last list.
#[derive(Debug, Default)]
pub(super) struct Seen {
    /// Per user, the fingerprint of their current task.
    prints: BTreeMap<String, String>,
    /// Service id → user, for service events (which carry no labels).
    services: HashMap<String, String>,
    /// Current tasks by state.
    pub(super) states: BTreeMap<String, u64>,
    /// The nodes as last listed (a reconcile's inspect reads them here).
    pub(super) nodes: Vec<super::SwarmNode>,
}

/// True when any of `tasks` runs or is on its way to, or is still being
/// removed: Swarm (20.10) never adds a task to a slot whose scaled-down task
/// is still there, so a scale-up sent then would leave the service without one.
pub(super) fn any_settling(tasks: &[Task]) -> bool {
    tasks.iter().any(|t| {
        t.status.as_ref().and_then(|s| s.state).is_some_and(is_live)
            || t.desired_state == Some(bollard::models::TaskState::REMOVE)
    })
}

/// The user a task belongs to: the user label its container carries, when
/// its labels are this instance's.
fn user_of(filter: &ContainerFilter, task: &Task) -> Option<String> {
    let labels = task
        .spec
        .as_ref()
        .and_then(|s| s.container_spec.as_ref())
        .and_then(|c| c.labels.as_ref())?;
    filter_matches(filter, |key| labels.get(key).map(String::as_str))
        .then(|| labels.get(LABEL_USER_ID).cloned())
        .flatten()
}

fn nudge(user_id: String, action: &str, id: String) -> EngineEvent {
    EngineEvent {
        user_id: Some(user_id),
        action: action.to_owned(),
        container_id: id,
        time_nanos: Utc::now().timestamp_nanos_opt().unwrap_or_default(),
    }
}

impl SwarmEngine {
    /// Lists this instance's tasks and returns a nudge per user whose
    /// current task changed since the last list.
    async fn poll_tasks(&self, filter: &ContainerFilter) -> Result<Vec<EngineEvent>, EngineError> {
        let options = ListTasksOptionsBuilder::default()
            .filters(&label_filters(filter))
            .build();
        let tasks = self
            .engine
            .client()
            .list_tasks(Some(options))
            .await
            .map_err(|err| self.fail("task list", &filter.instance, err))?;
        // Nodes are listed too: a node going down changes none of its tasks.
        let nodes = self.nodes().await?;
        let node_state = |id: &str| {
            nodes
                .iter()
                .find(|n| n.id == id)
                .map_or_else(String::new, |n| format!("{}/{}", n.state, n.availability))
        };
        let prints = fingerprints(&tasks, |t| user_of(filter, t), node_state);
        let mut by_user: BTreeMap<String, Vec<Task>> = BTreeMap::new();
        let mut services = HashMap::new();
        for task in &tasks {
            if let Some(user) = user_of(filter, task) {
                if let Some(service) = &task.service_id {
                    services.insert(service.clone(), user.clone());
                }
                by_user.entry(user).or_default().push(task.clone());
            }
        }
        let states = count_states(by_user.values().filter_map(|t| current_task(t)));
        let mut seen = self
            .watched
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = changed_users(&seen.prints, &prints);
        let events = changed
            .into_iter()
            .map(|user| {
                let service = by_user
                    .get(&user)
                    .and_then(|t| current_task(t))
                    .and_then(|t| t.service_id.clone())
                    .unwrap_or_default();
                nudge(user, "task", service)
            })
            .collect();
        seen.prints = prints;
        seen.services.extend(services);
        seen.states = states;
        seen.nodes = nodes;
        Ok(events)
    }

    /// The nudge for a service event, when its service is one of ours.
    fn service_nudge(&self, message: EventMessage) -> Option<EngineEvent> {
        let actor = message.actor?;
        let id = actor.id?;
        let seen = self.watched.lock().ok()?;
        let user = seen.services.get(&id)?.clone();
        let action = format!("service {}", message.action.unwrap_or_default());
        Some(nudge(user, &action, id))
    }
}

struct Watch {
    engine: SwarmEngine,
    filter: ContainerFilter,
    service_events: BoxStream<'static, Result<EventMessage, bollard::errors::Error>>,
    tick: tokio::time::Interval,
    pending: VecDeque<EngineEvent>,
    done: bool,
}

/// The nudges for `filter`'s users: task changes and service events. Ends
/// with an error when a list or the event stream fails; the caller opens it again.
pub(super) fn events(
    engine: SwarmEngine,
    filter: ContainerFilter,
) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
    let filters = HashMap::from([
        ("type".to_owned(), vec!["service".to_owned()]),
        ("scope".to_owned(), vec!["swarm".to_owned()]),
    ]);
    let options = EventsOptionsBuilder::default().filters(&filters).build();
    let service_events = engine.engine.client().events(Some(options)).boxed();
    let mut tick = tokio::time::interval(engine.options.task_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let watch = Watch {
        engine,
        filter,
        service_events,
        tick,
        pending: VecDeque::new(),
        done: false,
    };
    stream::unfold(watch, |mut w| async move {
        loop {
            if let Some(event) = w.pending.pop_front() {
                return Some((Ok(event), w));
            }
            if w.done {
                return None;
            }
            tokio::select! {
                _ = w.tick.tick() => {}
                message = w.service_events.next() => match message {
                    Some(Ok(message)) => w.pending.extend(w.engine.service_nudge(message)),
                    Some(Err(err)) => {
                        w.done = true;
                        let host = w.engine.engine.host().to_owned();
                        return Some((Err(classify(&host, "events", &w.filter.instance, err)), w));
                    }
                    None => {
                        w.done = true;
                        continue;
                    }
                },
            }
            match w.engine.poll_tasks(&w.filter).await {
                Ok(events) => w.pending.extend(events),
                Err(err) => {
                    w.done = true;
                    return Some((Err(err), w));
                }
            }
        }
    })
    .boxed()
}
