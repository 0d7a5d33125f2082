//! [`Engine`] on Docker Swarm: one replicated service per user, of one
//! replica when the user runs and none when stopped or idle (README "Running
//! on Docker Swarm"). The reconciler plans for it as for a container; this
//! module says what each call means for a service.
//!
//! One concept per file: `spec` writes the service spec, `observe` reads a
//! service and its tasks back as a container, `plan` decides what a start,
//! stop, restart, update or pin changes, `watch` lists tasks to nudge the
//! users whose task changed, `options` holds the operator's choices. Names,
//! labels, tokens, ports, status and the queue are the Docker backend's.
//!
//! Invariants:
//! - every change is sent with the version it was decided on; when Swarm
//!   answers that the service moved on, it is read again and decided again,
//!   never forced;
//! - a stop or a removal returns once the task is gone, as `docker stop`
//!   does, so a user's volume is never mounted by two tasks, and so a start
//!   that follows never meets Swarm 20.10's race (a scale-up while the
//!   scaled-down task is still being removed gets no task, ever);
//! - a start returns once Swarm has made the task, and nudges it with a
//!   `ForceUpdate` when it has not within 5 s;
//! - volumes are created by the node that first runs the user's task (with
//!   the user's labels), not by the manager.

mod observe;
mod options;
mod plan;
mod spec;
mod watch;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{Service, ServiceSpec, Task};
use bollard::query_parameters::{
    InspectServiceOptions, ListServicesOptionsBuilder, ListTasksOptionsBuilder,
    UpdateServiceOptionsBuilder,
};
use futures::stream::BoxStream;

pub use options::{parse_constraint, PublishMode, SwarmOptions, DEFAULT_TASK_POLL};

use super::bollard::errors::redacted;
use super::bollard::filters::{filter_matches, is_object_ref, label_filters, name_pattern};
use super::{
    ContainerFilter, ContainerSpec, ContainerSummary, DockerEngine, Engine, EngineError,
    EngineEvent, EngineVersion, ObservedContainer, ObservedNetwork, RunState, LABEL_INSTANCE,
    LABEL_USER_ID,
};
use observe::NodeView;

/// A node of the cluster: its id, hostname, address, state and availability.
pub type SwarmNode = NodeView;
use plan::{Change, ServiceState};

/// How often a changed service is read again when Swarm says it moved on.
const UPDATE_ATTEMPTS: usize = 5;
/// How often a stop or removal looks whether the task is gone.
const GONE_POLL: Duration = Duration::from_millis(200);
/// How long a start waits for Swarm to make the task before nudging it.
const TASK_APPEARS: Duration = Duration::from_secs(5);
/// How long a stop or removal waits for the task to go beyond its grace period.
const GONE_SLACK: Duration = Duration::from_secs(30);

/// A Swarm manager reached through bollard. Cheap to clone: clones share
/// the connection and what the task watcher last saw.
#[derive(Clone, Debug)]
pub struct SwarmEngine {
    engine: DockerEngine,
    options: Arc<SwarmOptions>,
    watched: Arc<Mutex<watch::Seen>>,
}

impl SwarmEngine {
    /// The Swarm backend on the manager `engine` talks to.
    pub fn new(engine: DockerEngine, options: SwarmOptions) -> Self {
        Self {
            engine: engine.with_overlay_networks(),
            options: Arc::new(options),
            watched: Arc::default(),
        }
    }

    /// The operator's choices.
    pub fn options(&self) -> &SwarmOptions {
        &self.options
    }

    /// The manager's engine (for `doctor`).
    pub fn manager(&self) -> &DockerEngine {
        &self.engine
    }

    /// This instance's tasks by state, one per user, as the task watcher
    /// last listed them (for `clawfleet_swarm_tasks`).
    pub fn task_states(&self) -> BTreeMap<String, u64> {
        self.watched
            .lock()
            .map(|seen| seen.states.clone())
            .unwrap_or_default()
    }

    /// The cluster's nodes; fails unless the engine is a Swarm manager
    /// (the engine then says so: "This node is not a swarm manager").
    pub async fn nodes(&self) -> Result<Vec<SwarmNode>, EngineError> {
        let nodes = self
            .engine
            .client()
            .list_nodes(None::<bollard::query_parameters::ListNodesOptions>)
            .await
            .map_err(|err| self.fail("node list", "swarm", err))?;
        Ok(nodes.into_iter().map(NodeView::from_node).collect())
    }

    /// How many nodes can take a task now (ready and not drained); fails
    /// unless the engine is a Swarm manager.
    pub async fn manager_nodes(&self) -> Result<usize, EngineError> {
        let nodes = self.nodes().await?;
        Ok(nodes.iter().filter(|n| n.unusable().is_none()).count())
    }

    fn fail(&self, op: &'static str, target: &str, err: BollardError) -> EngineError {
        self.engine.fail(op, target, err)
    }

    async fn service(&self, id: &str) -> Result<Option<Service>, EngineError> {
        if !is_object_ref(id) {
            return Ok(None);
        }
        match self
            .engine
            .client()
            .inspect_service(id, None::<InspectServiceOptions>)
            .await
        {
            Ok(service) => Ok(Some(service)),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(err) => Err(self.fail("service inspect", id, err)),
        }
    }

    /// The services `filters` lists (the engine's filters only narrow;
    /// the caller checks exactly), as summaries.
    async fn services_where(
        &self,
        target: &str,
        filters: &HashMap<String, Vec<String>>,
    ) -> Result<impl Iterator<Item = ContainerSummary>, EngineError> {
        let options = ListServicesOptionsBuilder::default()
            .filters(filters)
            .build();
        let services = self
            .engine
            .client()
            .list_services(Some(options))
            .await
            .map_err(|err| self.fail("service list", target, err))?;
        Ok(services.into_iter().map(summary))
    }

    async fn tasks_of(&self, service_id: &str) -> Result<Vec<Task>, EngineError> {
        let filters = HashMap::from([("service".to_owned(), vec![service_id.to_owned()])]);
        self.tasks_where(service_id, &filters).await
    }

    async fn tasks_where(
        &self,
        target: &str,
        filters: &HashMap<String, Vec<String>>,
    ) -> Result<Vec<Task>, EngineError> {
        let options = ListTasksOptionsBuilder::default().filters(filters).build();
        self.engine
            .client()
            .list_tasks(Some(options))
            .await
            .map_err(|err| self.fail("task list", target, err))
    }

    /// The node `id`: as the task watcher last listed it (its list is at
    /// most one poll old, and a node's change nudges its users only after the
    /// list is kept), else asked for.
    async fn node(&self, id: &str) -> Result<Option<NodeView>, EngineError> {
        if !is_object_ref(id) {
            return Ok(None);
        }
        let listed = self
            .watched
            .lock()
            .ok()
            .and_then(|seen| seen.nodes.iter().find(|n| n.id == id).cloned());
        if let Some(node) = listed {
            return Ok(Some(node));
        }
        match self.engine.client().inspect_node(id).await {
            Ok(node) => Ok(Some(NodeView::from_node(node))),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(err) => Err(self.fail("node inspect", id, err)),
        }
    }

    /// Reads the service `id` (and its tasks), asks `decide` for its next
    /// spec, and sends it with the version read; again from a fresh read
    /// when Swarm says the service changed meanwhile. `None` from `decide`:
    /// nothing to change.
    async fn modify(
        &self,
        op: &'static str,
        id: &str,
        decide: impl Fn(ServiceSpec, ServiceState) -> Option<ServiceSpec>,
    ) -> Result<(), EngineError> {
        for attempt in 1..=UPDATE_ATTEMPTS {
            let Some(service) = self.service(id).await? else {
                return Err(EngineError::NotFound {
                    op,
                    target: id.to_owned(),
                });
            };
            let tasks = self.tasks_of(id).await?;
            let state = ServiceState {
                replicas: observe::replicas(&service),
                task: observe::current_task(&tasks)
                    .and_then(|t| t.status.as_ref())
                    .and_then(|s| s.state),
            };
            let current = service.spec.clone().unwrap_or_default();
            let Some(next) = decide(current, state) else {
                return Ok(());
            };
            match self.send(op, id, &service, next).await {
                Err(EngineError::Api { message, .. })
                    if is_out_of_sequence(&message) && attempt < UPDATE_ATTEMPTS =>
                {
                    tracing::debug!(
                        service = id,
                        attempt,
                        "service changed meanwhile; reading it again"
                    );
                }
                other => return other,
            }
        }
        unreachable!("the last attempt returns")
    }

    async fn send(
        &self,
        op: &'static str,
        id: &str,
        service: &Service,
        next: ServiceSpec,
    ) -> Result<(), EngineError> {
        let version = service
            .version
            .as_ref()
            .and_then(|v| v.index)
            .unwrap_or_default();
        let options = UpdateServiceOptionsBuilder::default()
            .version(i32::try_from(version).unwrap_or(i32::MAX))
            .build();
        self.engine
            .client()
            .update_service(id, next, options, None)
            .await
            .map(|_| ())
            .map_err(|err| swarm_failed(self.fail(op, id, err)))
    }

    /// Waits until no task `filters` lists is live, at most `limit`.
    async fn until_tasks_gone(
        &self,
        target: &str,
        filters: &HashMap<String, Vec<String>>,
        limit: Duration,
    ) -> Result<(), EngineError> {
        let give_up = tokio::time::Instant::now() + limit;
        loop {
            let tasks = self.tasks_where(target, filters).await?;
            if !watch::any_settling(&tasks) || tokio::time::Instant::now() >= give_up {
                return Ok(());
            }
            tokio::time::sleep(GONE_POLL).await;
        }
    }
}

/// Swarm's answer to a change sent with a stale version.
fn is_out_of_sequence(message: &str) -> bool {
    message.contains("out of sequence")
}

/// A published port held by another service, as Swarm says it:
/// `port '19000' is already in use by service 'x' (id) as an ingress port`.
fn swarm_port_conflict(message: &str) -> Option<u16> {
    let rest = message.split("port '").nth(1)?;
    let (port, tail) = rest.split_once('\'')?;
    tail.trim_start()
        .starts_with("is already in use")
        .then(|| port.parse().ok())
        .flatten()
}

/// Reads Swarm's port conflicts as [`EngineError::PortAllocated`].
fn swarm_failed(err: EngineError) -> EngineError {
    match err {
        EngineError::Api { message, .. } if swarm_port_conflict(&message).is_some() => {
            EngineError::PortAllocated {
                port: swarm_port_conflict(&message),
                message,
            }
        }
        other => other,
    }
}

fn summary(service: Service) -> ContainerSummary {
    let running = observe::replicas(&service) > 0;
    let spec = service.spec.unwrap_or_default();
    ContainerSummary {
        id: service.id.unwrap_or_default(),
        name: spec.name.unwrap_or_default(),
        labels: spec.labels.unwrap_or_default().into_iter().collect(),
        state: if running {
            RunState::Running
        } else {
            RunState::Exited
        },
    }
}

impl Engine for SwarmEngine {
    async fn version(&self) -> Result<EngineVersion, EngineError> {
        self.engine.version().await
    }

    async fn list_containers(
        &self,
        filter: &ContainerFilter,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        let services = self
            .services_where(&filter.instance, &label_filters(filter))
            .await?;
        Ok(services
            .filter(|c| filter_matches(filter, |key| c.labels.get(key).map(String::as_str)))
            .collect())
    }

    async fn list_by_name_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        let filters = HashMap::from([("name".to_owned(), vec![name_pattern(prefix)])]);
        let services = self.services_where(prefix, &filters).await?;
        Ok(services.filter(|c| c.name.starts_with(prefix)).collect())
    }

    async fn inspect_container(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ObservedContainer>, EngineError> {
        let Some(service) = self.service(name_or_id).await? else {
            return Ok(None);
        };
        let id = service.id.clone().unwrap_or_default();
        let tasks = self.tasks_of(&id).await?;
        let node = match observe::node_to_check(&service, &tasks) {
            Some(node) => self.node(&node).await?,
            None => None,
        };
        let mut observed = observe::observed(&service, &tasks, node.as_ref());
        if self.options.publish_mode != PublishMode::Host {
            // The routing mesh answers on every node: `host_url` keeps --publish-ip.
            observed.placement.node_addr = None;
        }
        Ok(Some(observed))
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        let service = spec::service_spec(spec, &self.options, 0, 0);
        match self.engine.client().create_service(service, None).await {
            Ok(created) => Ok(created.id.unwrap_or_default()),
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Err(EngineError::NameConflict {
                name: spec.name.clone(),
            }),
            Err(err) => Err(swarm_failed(redacted(
                self.fail("service create", &spec.name, err),
                spec,
            ))),
        }
    }

    fn updates_in_place(&self) -> bool {
        true
    }

    async fn update_container(
        &self,
        id: &str,
        spec: &ContainerSpec,
    ) -> Result<String, EngineError> {
        let next = spec::service_spec(spec, &self.options, 0, 0);
        self.modify("service update", id, |current, _| {
            Some(plan::updated(&current, next.clone()))
        })
        .await
        .map_err(|err| redacted(err, spec))?;
        Ok(id.to_owned())
    }

    fn pins_volumes(&self) -> bool {
        self.options.volume_driver.is_none()
    }

    async fn pin_container(&self, id: &str, node: &str) -> Result<(), EngineError> {
        self.modify("service pin", id, |current, _| plan::pinned(current, node))
            .await
    }

    async fn start_container(&self, id: &str) -> Result<(), EngineError> {
        self.modify("service start", id, |current, state| {
            plan::start(state).map(|change| plan::changed(current, change))
        })
        .await?;
        // Swarm makes the task asynchronously; returning once it exists
        // keeps the next look from starting it again.
        let give_up = tokio::time::Instant::now() + TASK_APPEARS;
        loop {
            if observe::current_task(&self.tasks_of(id).await?).is_some() {
                return Ok(());
            }
            if tokio::time::Instant::now() >= give_up {
                // No task after all: a service update makes the orchestrator look again.
                return self
                    .modify("service start", id, |current, _| {
                        Some(plan::changed(current, Change::Redeploy))
                    })
                    .await;
            }
            tokio::time::sleep(GONE_POLL).await;
        }
    }

    async fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        self.modify("service stop", id, |current, state| {
            plan::stop(state).map(|change| plan::changed(current, change))
        })
        .await?;
        let of_service = HashMap::from([("service".to_owned(), vec![id.to_owned()])]);
        self.until_tasks_gone(id, &of_service, timeout + GONE_SLACK)
            .await
    }

    async fn restart_container(&self, id: &str, _timeout: Duration) -> Result<(), EngineError> {
        self.modify("service restart", id, |current, state| {
            Some(plan::changed(current, plan::restart(state)))
        })
        .await
    }

    async fn remove_container(&self, id: &str) -> Result<(), EngineError> {
        let Some(service) = self.service(id).await? else {
            return Ok(());
        };
        match self.engine.client().delete_service(id).await {
            Ok(()) => {}
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => return Ok(()),
            Err(err) => return Err(self.fail("service remove", id, err)),
        }
        // A service's tasks outlive it briefly, and are then listed only by
        // the service's labels: wait, so a user made again at once never
        // has two tasks on one volume.
        let labels: BTreeMap<String, String> = service
            .spec
            .and_then(|s| s.labels)
            .unwrap_or_default()
            .into_iter()
            .collect();
        let Some(user_id) = labels.get(LABEL_USER_ID) else {
            return Ok(());
        };
        let filter = ContainerFilter {
            instance: labels.get(LABEL_INSTANCE).cloned().unwrap_or_default(),
            user_id: Some(user_id.clone()),
        };
        self.until_tasks_gone(id, &label_filters(&filter), GONE_SLACK)
            .await
    }

    async fn rename_container(&self, id: &str, new_name: &str) -> Result<(), EngineError> {
        Err(EngineError::Api {
            op: "service rename",
            target: id.to_owned(),
            status: 501,
            message: format!("Swarm services cannot be renamed (to {new_name})"),
        })
    }

    async fn ensure_volume(
        &self,
        _name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, EngineError> {
        // The node that runs the task creates the volume, with these labels.
        Ok(labels.clone())
    }

    async fn inspect_volume(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, EngineError> {
        self.engine.inspect_volume(name).await
    }

    async fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<ObservedNetwork, EngineError> {
        self.engine.ensure_network(name, labels, options).await
    }

    async fn inspect_network(&self, name: &str) -> Result<Option<ObservedNetwork>, EngineError> {
        self.engine.inspect_network(name).await
    }

    async fn image_present(&self, image: &str) -> Result<bool, EngineError> {
        self.engine.image_present(image).await
    }

    async fn pull_image(&self, _image: &str) -> Result<(), EngineError> {
        // Each node pulls the image when a task of it lands there.
        Ok(())
    }

    fn events(
        &self,
        filter: &ContainerFilter,
        _since_nanos: Option<i64>,
    ) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        watch::events(self.clone(), filter.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn swarm_port_conflicts_are_read_with_their_port() {
        let message = "rpc error: code = InvalidArgument desc = port '19000' is already in use by service 'mosaic-user-b' (abc) as an ingress port";
        assert_eq!(swarm_port_conflict(message), Some(19000));
        let err = swarm_failed(EngineError::Api {
            op: "service create",
            target: "x".into(),
            status: 400,
            message: message.into(),
        });
        assert!(
            matches!(
                err,
                EngineError::PortAllocated {
                    port: Some(19000),
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(swarm_port_conflict("port 'x' is fine"), None);
        assert!(is_out_of_sequence(
            "rpc error: code = Unknown desc = update out of sequence"
        ));
    }
}
