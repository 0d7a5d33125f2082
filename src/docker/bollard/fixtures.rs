//! The spec and the engine answers the tests of this module share.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use bollard::errors::Error as BollardError;

use crate::docker::{
    object_labels, Confinement, ContainerSpec, EnvValue, ResourceLimits, SecretString,
};

pub(in crate::docker) const TOKEN: &str = "0123456789abcdef0123456789abcdef";

pub(in crate::docker) fn spec() -> ContainerSpec {
    ContainerSpec {
        name: "mosaic-user-1".to_owned(),
        image: "clawfleet-agent-stub:dev".to_owned(),
        env: vec![
            ("AGENT_ID".to_owned(), EnvValue::Plain("1".to_owned())),
            (
                "OPENCLAW_GATEWAY_TOKEN".to_owned(),
                EnvValue::Secret(SecretString::new(TOKEN)),
            ),
        ],
        labels: object_labels("default", "1"),
        volume: "mosaic-user-1-state".to_owned(),
        mount_path: "/home/node/.openclaw".to_owned(),
        network: "mosaic-internal".to_owned(),
        port: 18789,
        publish: Some((IpAddr::V4(Ipv4Addr::LOCALHOST), 19000)),
        stop_timeout: Duration::from_millis(10_500),
        limits: ResourceLimits {
            memory_bytes: Some(512 << 20),
            nano_cpus: Some(500_000_000),
            pids: Some(256),
        },
        confinement: Confinement {
            cap_add: vec!["CHOWN".to_owned()],
            ..Confinement::strict()
        },
        node: None,
    }
}

pub(in crate::docker) fn server_error(status_code: u16, message: &str) -> BollardError {
    BollardError::DockerResponseServerError {
        status_code,
        message: message.to_owned(),
    }
}
