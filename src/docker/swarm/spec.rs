//! A user's container spec as a Swarm service spec: the same image, env
//! (token opened), labels, volume, port, limits, capabilities and log
//! rotation as the Docker backend's container, in a replicated service of 0
//! or 1 replicas (README "Running on Docker Swarm").
//!
//! Invariants:
//! - Swarm never restarts a task (restart condition `none`): clawfleet does,
//!   with the Docker backend's per-user back-off, exit-78 and restart count;
//! - an update stops the old task before starting the new one
//!   (`stop-first`), so two tasks never mount one user's volume;
//! - the container carries the service's labels, so a task list filtered by
//!   them tells whose each task is.

use std::collections::HashMap;

use bollard::models::{
    EndpointPortConfig, EndpointPortConfigProtocolEnum, EndpointPortConfigPublishModeEnum,
    EndpointSpec, EndpointSpecModeEnum, Limit, Mount, MountType, MountVolumeOptions,
    MountVolumeOptionsDriverConfig, NetworkAttachmentConfig, ServiceSpec, ServiceSpecMode,
    ServiceSpecModeReplicated, ServiceSpecUpdateConfig, ServiceSpecUpdateConfigFailureActionEnum,
    ServiceSpecUpdateConfigOrderEnum, TaskSpec, TaskSpecContainerSpec,
    TaskSpecContainerSpecPrivileges, TaskSpecLogDriver, TaskSpecPlacement, TaskSpecResources,
    TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
};

use super::options::{PublishMode, SwarmOptions};
use crate::docker::{ContainerSpec, LABEL_INSTANCE, LABEL_MANAGED, LABEL_USER_ID};

/// The placement constraint that keeps a task on `node`.
pub(super) fn pin_constraint(node: &str) -> String {
    format!("node.id=={node}")
}

/// The node a constraint list pins to, if any.
pub(super) fn pinned_node(constraints: &[String]) -> Option<String> {
    constraints.iter().find_map(|c| {
        let rest = c.replace(' ', "");
        rest.strip_prefix("node.id==").map(str::to_owned)
    })
}

/// The service spec for `spec` with `replicas` replicas (0 or 1) and the
/// task template's `ForceUpdate` counter at `force_update`.
pub(super) fn service_spec(
    spec: &ContainerSpec,
    options: &SwarmOptions,
    replicas: u64,
    force_update: u64,
) -> ServiceSpec {
    let labels: HashMap<String, String> = spec
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut constraints = options.placement.clone();
    if options.volume_driver.is_none() {
        if let Some(node) = &spec.node {
            constraints.push(pin_constraint(node));
        }
    }
    let confinement = &spec.confinement;
    let container = TaskSpecContainerSpec {
        image: Some(spec.image.clone()),
        labels: Some(labels.clone()),
        env: Some(
            spec.env
                .iter()
                .map(|(key, value)| format!("{key}={}", value.expose()))
                .collect(),
        ),
        mounts: Some(vec![state_mount(spec, options)]),
        stop_grace_period: Some(nanos(spec.stop_timeout)),
        capability_drop: confinement
            .drop_all_capabilities
            .then(|| vec!["ALL".to_owned()]),
        capability_add: (!confinement.cap_add.is_empty()).then(|| confinement.cap_add.clone()),
        privileges: confinement
            .no_new_privileges
            .then(|| TaskSpecContainerSpecPrivileges {
                no_new_privileges: Some(true),
                ..Default::default()
            }),
        ..Default::default()
    };
    let task = TaskSpec {
        container_spec: Some(container),
        resources: Some(TaskSpecResources {
            limits: Some(Limit {
                nano_cpus: spec.limits.nano_cpus,
                memory_bytes: spec.limits.memory_bytes,
                pids: spec.limits.pids,
            }),
            ..Default::default()
        }),
        restart_policy: Some(TaskSpecRestartPolicy {
            condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
            ..Default::default()
        }),
        placement: Some(TaskSpecPlacement {
            constraints: Some(constraints),
            ..Default::default()
        }),
        force_update: Some(force_update),
        networks: Some(vec![NetworkAttachmentConfig {
            target: Some(spec.network.clone()),
            aliases: Some(vec![spec.name.clone()]),
            ..Default::default()
        }]),
        log_driver: confinement.log.map(|log| TaskSpecLogDriver {
            name: Some("json-file".to_owned()),
            options: Some(HashMap::from([
                ("max-size".to_owned(), log.max_size()),
                ("max-file".to_owned(), log.max_files.to_string()),
            ])),
        }),
        ..Default::default()
    };
    ServiceSpec {
        name: Some(spec.name.clone()),
        labels: Some(labels),
        task_template: Some(task),
        mode: Some(ServiceSpecMode {
            replicated: Some(ServiceSpecModeReplicated {
                replicas: Some(i64::try_from(replicas).unwrap_or(1)),
            }),
            ..Default::default()
        }),
        update_config: Some(ServiceSpecUpdateConfig {
            parallelism: Some(1),
            order: Some(ServiceSpecUpdateConfigOrderEnum::STOP_FIRST),
            failure_action: Some(ServiceSpecUpdateConfigFailureActionEnum::CONTINUE),
            ..Default::default()
        }),
        endpoint_spec: Some(EndpointSpec {
            // Without the routing mesh the service name resolves to the
            // task itself: no virtual IP, which needs the kernel's IPVS.
            mode: Some(match options.publish_mode {
                PublishMode::Ingress => EndpointSpecModeEnum::VIP,
                PublishMode::Host => EndpointSpecModeEnum::DNSRR,
            }),
            ports: spec.publish.map(|(_, host_port)| {
                vec![EndpointPortConfig {
                    protocol: Some(EndpointPortConfigProtocolEnum::TCP),
                    target_port: Some(i64::from(spec.port)),
                    published_port: Some(i64::from(host_port)),
                    publish_mode: Some(match options.publish_mode {
                        PublishMode::Ingress => EndpointPortConfigPublishModeEnum::INGRESS,
                        PublishMode::Host => EndpointPortConfigPublishModeEnum::HOST,
                    }),
                    ..Default::default()
                }]
            }),
        }),
        ..Default::default()
    }
}

/// The state volume, created by the node that first runs the task, with
/// the user's labels and `--volume-driver`'s driver.
fn state_mount(spec: &ContainerSpec, options: &SwarmOptions) -> Mount {
    let volume_labels: HashMap<String, String> = spec
        .labels
        .iter()
        .filter(|(k, _)| [LABEL_MANAGED, LABEL_INSTANCE, LABEL_USER_ID].contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Mount {
        typ: Some(MountType::VOLUME),
        source: Some(spec.volume.clone()),
        target: Some(spec.mount_path.clone()),
        volume_options: Some(MountVolumeOptions {
            labels: Some(volume_labels),
            driver_config: options.volume_driver.as_ref().map(|driver| {
                MountVolumeOptionsDriverConfig {
                    name: Some(driver.clone()),
                    options: None,
                }
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A duration in nanoseconds, as Swarm's specs count time.
pub(super) fn nanos(duration: std::time::Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::bollard::fixtures;

    fn options() -> SwarmOptions {
        SwarmOptions {
            placement: vec!["node.labels.agents==true".to_owned()],
            ..SwarmOptions::default()
        }
    }

    #[test]
    fn a_service_spec_carries_the_whole_container_spec_and_never_lets_swarm_restart() {
        let mut container = fixtures::spec();
        container.node = Some("n1".to_owned());
        let service = service_spec(&container, &options(), 1, 7);
        assert_eq!(service.name.as_deref(), Some(container.name.as_str()));
        let task = service.task_template.unwrap();
        let c = task.container_spec.unwrap();
        assert_eq!(c.image.as_deref(), Some(container.image.as_str()));
        let env = c.env.unwrap();
        assert!(
            env.contains(&format!("OPENCLAW_GATEWAY_TOKEN={}", fixtures::TOKEN)),
            "the token is opened for the engine: {}",
            env.len()
        );
        assert_eq!(c.labels, service.labels, "tasks carry the user's labels");
        let mount = &c.mounts.unwrap()[0];
        assert_eq!(mount.source.as_deref(), Some(container.volume.as_str()));
        assert_eq!(mount.target.as_deref(), Some(container.mount_path.as_str()));
        assert_eq!(c.capability_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(
            task.restart_policy.unwrap().condition,
            Some(TaskSpecRestartPolicyConditionEnum::NONE)
        );
        assert_eq!(task.force_update, Some(7));
        assert_eq!(
            task.placement.unwrap().constraints.unwrap(),
            ["node.labels.agents==true", "node.id==n1"]
        );
        let update = service.update_config.unwrap();
        assert_eq!(
            update.order,
            Some(ServiceSpecUpdateConfigOrderEnum::STOP_FIRST)
        );
        assert_eq!(service.mode.unwrap().replicated.unwrap().replicas, Some(1));
        let port = &service.endpoint_spec.unwrap().ports.unwrap()[0];
        assert_eq!(port.target_port, Some(i64::from(container.port)));
        assert_eq!(
            port.published_port,
            container.publish.map(|(_, p)| i64::from(p))
        );
        assert_eq!(
            port.publish_mode,
            Some(EndpointPortConfigPublishModeEnum::INGRESS)
        );
    }

    #[test]
    fn a_volume_driver_turns_pinning_off_and_names_the_driver() {
        let mut container = fixtures::spec();
        container.node = Some("n1".to_owned());
        let options = SwarmOptions {
            volume_driver: Some("rexray".to_owned()),
            publish_mode: PublishMode::Host,
            ..SwarmOptions::default()
        };
        let service = service_spec(&container, &options, 0, 0);
        let task = service.task_template.unwrap();
        assert_eq!(task.placement.unwrap().constraints, Some(vec![]));
        let mount = &task.container_spec.unwrap().mounts.unwrap()[0];
        let driver = mount
            .volume_options
            .as_ref()
            .unwrap()
            .driver_config
            .as_ref();
        assert_eq!(driver.unwrap().name.as_deref(), Some("rexray"));
        let endpoint = service.endpoint_spec.unwrap();
        assert_eq!(endpoint.mode, Some(EndpointSpecModeEnum::DNSRR));
        let port = &endpoint.ports.unwrap()[0];
        assert_eq!(
            port.publish_mode,
            Some(EndpointPortConfigPublishModeEnum::HOST)
        );
    }

    #[test]
    fn the_pin_is_read_back_from_the_constraints() {
        let constraints = vec!["node.role==worker".to_owned(), pin_constraint("abc")];
        assert_eq!(pinned_node(&constraints).as_deref(), Some("abc"));
        assert_eq!(
            pinned_node(&["node.id == xyz".to_owned()]).as_deref(),
            Some("xyz")
        );
        assert_eq!(pinned_node(&[]), None);
    }
}
