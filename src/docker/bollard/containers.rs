//! Containers: the create request a spec becomes, and what a list or an
//! inspect answer becomes.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary as BollardSummary, HostConfig,
    HostConfigLogConfig, Mount, MountType, PortBinding, RestartPolicy, RestartPolicyNameEnum,
};
use chrono::{DateTime, Datelike, Utc};

use super::{to_hash_map, REQUEST_TIMEOUT};
use crate::docker::{
    ContainerHealth, ContainerSpec, ContainerSummary, ObservedContainer, Placement, RunState,
    SecretString,
};

/// Our summary of a listed container.
pub(in crate::docker) fn summary_from(container: BollardSummary) -> ContainerSummary {
    let names = container.names.unwrap_or_default();
    ContainerSummary {
        id: container.id.unwrap_or_default(),
        name: primary_name(&names),
        labels: container.labels.unwrap_or_default().into_iter().collect(),
        state: RunState::parse(container.state.as_ref().map_or("", |s| s.as_ref())),
    }
}

/// The container's own name among the names a list shows (link aliases are
/// `/<other>/<alias>`), without the leading `/`.
pub(in crate::docker) fn primary_name(names: &[String]) -> String {
    let stripped = |n: &String| n.strip_prefix('/').unwrap_or(n).to_owned();
    names
        .iter()
        .find(|n| !n.trim_start_matches('/').contains('/'))
        .or(names.first())
        .map(stripped)
        .unwrap_or_default()
}

/// Our view of an inspected container.
pub(in crate::docker) fn observed_from(inspect: ContainerInspectResponse) -> ObservedContainer {
    let name = inspect.name.unwrap_or_default();
    let config = inspect.config.unwrap_or_default();
    let state = inspect.state.unwrap_or_default();
    ObservedContainer {
        id: inspect.id.unwrap_or_default(),
        name: name.strip_prefix('/').unwrap_or(&name).to_owned(),
        labels: config.labels.unwrap_or_default().into_iter().collect(),
        image: config.image.unwrap_or_default(),
        state: RunState::parse(state.status.as_ref().map_or("", |s| s.as_ref())),
        exit_code: state.exit_code,
        health: state
            .health
            .and_then(|h| h.status)
            .map_or(ContainerHealth::None, |s| {
                ContainerHealth::parse(s.as_ref())
            }),
        started_at: state.started_at.as_deref().and_then(docker_time),
        finished_at: state.finished_at.as_deref().and_then(docker_time),
        host_port: inspect.host_config.and_then(|hc| published_host_port(&hc)),
        env: env_map(config.env.unwrap_or_default()),
        placement: Placement::default(),
    }
}

/// `KEY=value` entries as a map, every value kept secret; an entry without
/// `=` is a variable without a value, and a later entry wins, as in Docker.
pub(in crate::docker) fn env_map(entries: Vec<String>) -> BTreeMap<String, SecretString> {
    entries
        .into_iter()
        .map(|entry| match entry.split_once('=') {
            Some((key, value)) => (key.to_owned(), SecretString::new(value)),
            None => (entry, SecretString::new("")),
        })
        .collect()
}

/// The host port published in the container's configuration: a spec
/// publishes one port; should several be bound, the lowest TCP port's.
pub(in crate::docker) fn published_host_port(host_config: &HostConfig) -> Option<u16> {
    host_config
        .port_bindings
        .as_ref()?
        .iter()
        .filter_map(|(key, bindings)| {
            let container_port: u16 = key.strip_suffix("/tcp")?.parse().ok()?;
            let host_port: u16 = bindings
                .as_ref()?
                .first()?
                .host_port
                .as_deref()?
                .parse()
                .ok()?;
            Some((container_port, host_port))
        })
        .min()
        .map(|(_, host_port)| host_port)
}

/// A Docker timestamp; Docker's zero time (`0001-01-01T00:00:00Z`) means never.
pub(in crate::docker) fn docker_time(text: &str) -> Option<DateTime<Utc>> {
    let time = DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc);
    (time.year() > 1).then_some(time)
}

/// `18789/tcp`, Docker's key for a container's TCP port.
pub(in crate::docker) fn tcp_port_key(port: u16) -> String {
    format!("{port}/tcp")
}

/// The create request for `spec`.
pub(in crate::docker) fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let port_key = tcp_port_key(spec.port);
    let confinement = &spec.confinement;
    let port_bindings = spec.publish.map(|(ip, port)| {
        HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding {
                host_ip: Some(ip.to_string()),
                host_port: Some(port.to_string()),
            }]),
        )])
    });
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        env: Some(
            spec.env
                .iter()
                .map(|(key, value)| format!("{key}={}", value.expose()))
                .collect(),
        ),
        labels: Some(to_hash_map(&spec.labels)),
        exposed_ports: Some(vec![port_key]),
        stop_timeout: Some(i64::from(whole_seconds_i32(spec.stop_timeout))),
        host_config: Some(HostConfig {
            mounts: Some(vec![Mount {
                typ: Some(MountType::VOLUME),
                source: Some(spec.volume.clone()),
                target: Some(spec.mount_path.clone()),
                ..Default::default()
            }]),
            port_bindings,
            network_mode: Some(spec.network.clone()),
            // The controller restarts containers itself, with backoff.
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::NO),
                maximum_retry_count: None,
            }),
            memory: spec.limits.memory_bytes,
            nano_cpus: spec.limits.nano_cpus,
            pids_limit: spec.limits.pids,
            cap_drop: confinement
                .drop_all_capabilities
                .then(|| vec!["ALL".to_owned()]),
            cap_add: (!confinement.cap_add.is_empty()).then(|| confinement.cap_add.clone()),
            security_opt: Some(confinement.security_opt()).filter(|o| !o.is_empty()),
            log_config: confinement.log.map(|log| HostConfigLogConfig {
                typ: Some("json-file".to_owned()),
                config: Some(HashMap::from([
                    ("max-size".to_owned(), log.max_size()),
                    ("max-file".to_owned(), log.max_files.to_string()),
                ])),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// A duration as Docker's whole seconds, a started second counting as one.
pub(in crate::docker) fn whole_seconds_i32(duration: Duration) -> i32 {
    let seconds = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

/// The request timeout of a call the engine answers only after `grace_seconds`.
pub(in crate::docker) fn request_timeout_after(grace_seconds: i32) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs(u64::try_from(grace_seconds).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{spec, TOKEN};
    use super::*;
    use crate::docker::{Confinement, LABEL_USER_ID};

    #[test]
    fn create_body_carries_the_whole_spec() {
        let body = create_body(&spec());
        assert_eq!(
            body.env.as_deref(),
            Some(
                &[
                    "AGENT_ID=1".to_owned(),
                    format!("OPENCLAW_GATEWAY_TOKEN={TOKEN}")
                ][..]
            )
        );
        assert_eq!(body.exposed_ports, Some(vec!["18789/tcp".to_owned()]));
        assert_eq!(body.stop_timeout, Some(11));
        assert_eq!(
            body.labels.as_ref().and_then(|l| l.get(LABEL_USER_ID)),
            Some(&"1".to_owned())
        );
        let host = body.host_config.expect("host config");
        assert_eq!(host.network_mode.as_deref(), Some("mosaic-internal"));
        assert_eq!(
            host.restart_policy.and_then(|p| p.name),
            Some(RestartPolicyNameEnum::NO)
        );
        assert_eq!(host.memory, Some(512 << 20));
        assert_eq!(host.nano_cpus, Some(500_000_000));
        assert_eq!(host.pids_limit, Some(256));
        assert_eq!(host.cap_drop, Some(vec!["ALL".to_owned()]));
        assert_eq!(host.cap_add, Some(vec!["CHOWN".to_owned()]));
        assert_eq!(
            host.security_opt,
            Some(vec!["no-new-privileges:true".to_owned()])
        );
        let log = host.log_config.clone().expect("log config");
        assert_eq!(log.typ.as_deref(), Some("json-file"));
        let log = log.config.expect("log options");
        assert_eq!(log["max-size"], "10m");
        assert_eq!(log["max-file"], "3");
        let mount = &host.mounts.expect("mounts")[0];
        assert_eq!(mount.typ, Some(MountType::VOLUME));
        assert_eq!(mount.source.as_deref(), Some("mosaic-user-1-state"));
        assert_eq!(mount.target.as_deref(), Some("/home/node/.openclaw"));
        let binding = &host.port_bindings.expect("bindings")["18789/tcp"]
            .clone()
            .expect("binding")[0];
        assert_eq!(binding.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(binding.host_port.as_deref(), Some("19000"));
    }

    #[test]
    fn an_unconfined_spec_leaves_the_engine_defaults() {
        let mut spec = spec();
        spec.confinement = Confinement::unconfined();
        let host = create_body(&spec).host_config.expect("host config");
        assert_eq!(host.cap_drop, None);
        assert_eq!(host.cap_add, None);
        assert_eq!(host.security_opt, None);
        assert_eq!(host.log_config, None);
    }

    #[test]
    fn an_unpublished_spec_binds_no_port() {
        let mut spec = spec();
        spec.publish = None;
        let host = create_body(&spec).host_config.expect("host config");
        assert_eq!(host.port_bindings, None);
    }

    #[test]
    fn inspect_answer_becomes_observed_container() {
        let inspect: ContainerInspectResponse = serde_json::from_value(serde_json::json!({
            "Id": "abc",
            "Name": "/mosaic-user-1",
            "State": {
                "Status": "exited",
                "ExitCode": 137,
                "StartedAt": "2024-05-01T10:00:00.123456789Z",
                "FinishedAt": "0001-01-01T00:00:00Z",
                "Health": { "Status": "none" }
            },
            "Config": { "Image": "img:1", "Labels": { "io.clawfleet.user-id": "1" }, "Env": ["AGENT_TOKEN=t0k=en", "EMPTY"] },
            "HostConfig": { "PortBindings": { "18789/tcp": [ { "HostIp": "127.0.0.1", "HostPort": "19000" } ] } }
        }))
        .expect("inspect json");
        let observed = observed_from(inspect);
        assert_eq!(observed.id, "abc");
        assert_eq!(observed.name, "mosaic-user-1");
        assert_eq!(observed.state, RunState::Exited);
        assert_eq!(observed.exit_code, Some(137));
        assert_eq!(observed.health, ContainerHealth::None);
        assert_eq!(
            observed.started_at.map(|t| t.timestamp_subsec_nanos()),
            Some(123_456_789)
        );
        assert_eq!(observed.finished_at, None);
        assert_eq!(observed.host_port, Some(19000));
        assert_eq!(observed.user_id(), Some("1"));
        assert_eq!(observed.image, "img:1");
        assert_eq!(observed.env["AGENT_TOKEN"].expose(), "t0k=en");
        assert_eq!(observed.env["EMPTY"].expose(), "");
        assert!(!format!("{observed:?}").contains("t0k"), "never shown");
    }

    #[test]
    fn the_observed_host_port_is_the_one_of_the_lowest_published_tcp_port() {
        let host_config: HostConfig = serde_json::from_value(serde_json::json!({
            "PortBindings": {
                "9000/tcp": [ { "HostIp": "127.0.0.1", "HostPort": "19001" } ],
                "18789/udp": [ { "HostIp": "127.0.0.1", "HostPort": "19002" } ],
                "8080/tcp": [ { "HostIp": "127.0.0.1", "HostPort": "19003" } ],
                "80/tcp": []
            }
        }))
        .expect("host config json");
        assert_eq!(published_host_port(&host_config), Some(19003));
        assert_eq!(published_host_port(&HostConfig::default()), None);
    }

    #[test]
    fn primary_name_skips_link_aliases() {
        let names = vec!["/other/alias".to_owned(), "/mosaic-user-1".to_owned()];
        assert_eq!(primary_name(&names), "mosaic-user-1");
        assert_eq!(primary_name(&[]), "");
    }

    #[test]
    fn durations_round_up_to_whole_seconds() {
        assert_eq!(whole_seconds_i32(Duration::from_secs(10)), 10);
        assert_eq!(whole_seconds_i32(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds_i32(Duration::ZERO), 0);
        assert_eq!(whole_seconds_i32(Duration::MAX), i32::MAX);
    }
}
