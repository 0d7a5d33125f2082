//! bollard's errors read as [`EngineError`]: transient or needing a human,
//! the port of a port conflict, and never a secret of the spec.

use std::error::Error as StdError;

use bollard::errors::Error as BollardError;

use crate::docker::{ContainerSpec, EngineError, EnvValue};

/// What replaces a secret that an engine message happens to echo.
pub(super) const REDACTED: &str = "<redacted>";

/// Classifies a failure of `op` on `target` when no operation-specific reading applies.
pub(in crate::docker) fn classify(
    host: &str,
    op: &'static str,
    target: &str,
    err: BollardError,
) -> EngineError {
    match err {
        BollardError::DockerResponseServerError {
            status_code,
            message,
        } => {
            if let Some(port) = port_conflict(&message) {
                EngineError::PortAllocated { port, message }
            } else if status_code == 404 {
                EngineError::NotFound {
                    op,
                    target: target.to_owned(),
                }
            } else {
                EngineError::Api {
                    op,
                    target: target.to_owned(),
                    status: status_code,
                    message,
                }
            }
        }
        err if is_transport(&err) => EngineError::Unreachable {
            host: host.to_owned(),
            message: error_chain(&err),
        },
        // The engine answered, but not in a form this client reads.
        err => EngineError::Api {
            op,
            target: target.to_owned(),
            status: 0,
            message: format!("unreadable answer: {}", error_chain(&err)),
        },
    }
}

/// True for failures of the connection rather than refusals by the engine.
pub(in crate::docker) fn is_transport(err: &BollardError) -> bool {
    matches!(
        err,
        BollardError::HyperLegacyError { .. }
            | BollardError::HyperResponseError { .. }
            | BollardError::HttpClientError { .. }
            | BollardError::IOError { .. }
            | BollardError::RequestTimeoutError
            | BollardError::SocketNotFoundError(_)
    )
}

/// A create failure: the name and image cases the caller acts on, with any
/// secret of the spec scrubbed from what the engine said.
pub(in crate::docker) fn create_failed(
    host: &str,
    spec: &ContainerSpec,
    err: BollardError,
) -> EngineError {
    let err = match err {
        BollardError::DockerResponseServerError {
            status_code: 409, ..
        } => {
            return EngineError::NameConflict {
                name: spec.name.clone(),
            }
        }
        BollardError::DockerResponseServerError {
            status_code: 404,
            message,
        } if is_missing_image(&message) => EngineError::ImageNotFound {
            image: spec.image.clone(),
            message,
        },
        // Any other missing object (the network, say) keeps the engine's words.
        BollardError::DockerResponseServerError {
            status_code: 404,
            message,
        } => EngineError::Api {
            op: "create",
            target: spec.name.clone(),
            status: 404,
            message,
        },
        err => classify(host, "create", &spec.name, err),
    };
    redacted(err, spec)
}

/// `err` with every secret of `spec` scrubbed from what the engine said.
pub(in crate::docker) fn redacted(err: EngineError, spec: &ContainerSpec) -> EngineError {
    match err {
        EngineError::ImageNotFound { image, message } => EngineError::ImageNotFound {
            image,
            message: redact(spec, message),
        },
        EngineError::Api {
            op,
            target,
            status,
            message,
        } => EngineError::Api {
            op,
            target,
            status,
            message: redact(spec, message),
        },
        EngineError::PortAllocated { port, message } => EngineError::PortAllocated {
            port,
            message: redact(spec, message),
        },
        EngineError::Unreachable { host, message } => EngineError::Unreachable {
            host,
            message: redact(spec, message),
        },
        other => other,
    }
}

/// True for the engine's "No such image" answer.
pub(in crate::docker) fn is_missing_image(message: &str) -> bool {
    message.to_ascii_lowercase().contains("no such image")
}

/// `message` with every environment value of `spec` that is a secret removed.
pub(in crate::docker) fn redact(spec: &ContainerSpec, message: String) -> String {
    spec.env
        .iter()
        .filter(|(_, value)| matches!(value, EnvValue::Secret(_)))
        .map(|(_, value)| value.expose())
        .filter(|secret| !secret.is_empty())
        .fold(message, |message, secret| message.replace(secret, REDACTED))
}

/// `Some(port)` when `message` says a host port is taken (with the port when
/// the message names it), `None` for any other message.
///
/// Engine 20.10 says `... Bind for 127.0.0.1:19000 failed: port is already
/// allocated` when another container holds the port, and `... Error starting
/// userland proxy: listen tcp4 127.0.0.1:19000: bind: address already in use`
/// when another process does.
pub(in crate::docker) fn port_conflict(message: &str) -> Option<Option<u16>> {
    const SHAPES: [&str; 2] = [
        " failed: port is already allocated",
        ": bind: address already in use",
    ];
    for marker in SHAPES {
        if let Some(at) = message.find(marker) {
            let address = message[..at].rsplit(' ').next().unwrap_or_default();
            let port = address
                .rsplit_once(':')
                .and_then(|(_, port)| port.parse().ok());
            return Some(port);
        }
    }
    let lower = message.to_ascii_lowercase();
    (lower.contains("port is already allocated") || lower.contains("address already in use"))
        .then_some(None)
}

/// An error and its sources, joined: the transport's cause ("connection
/// refused") is usually only in the source chain.
pub(in crate::docker) fn error_chain(err: &dyn StdError) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::super::fixtures::{server_error, spec, TOKEN};
    use super::*;

    #[test]
    fn port_is_read_from_both_engine_20_10_conflict_messages() {
        let by_container = "driver failed programming external connectivity on endpoint cf1 \
            (0a5c): Bind for 127.0.0.1:19555 failed: port is already allocated";
        let by_process = "driver failed programming external connectivity on endpoint cf3 \
            (16c8): Error starting userland proxy: listen tcp4 127.0.0.1:19556: bind: address already in use";
        assert_eq!(port_conflict(by_container), Some(Some(19555)));
        assert_eq!(port_conflict(by_process), Some(Some(19556)));
    }

    #[test]
    fn port_is_read_from_ipv6_and_wildcard_addresses() {
        assert_eq!(
            port_conflict("Bind for [::1]:19001 failed: port is already allocated"),
            Some(Some(19001))
        );
        assert_eq!(
            port_conflict("Bind for :::19002 failed: port is already allocated"),
            Some(Some(19002))
        );
        assert_eq!(
            port_conflict("listen tcp6 [::]:19003: bind: address already in use"),
            Some(Some(19003))
        );
    }

    #[test]
    fn a_conflict_without_a_readable_port_is_still_a_conflict() {
        assert_eq!(port_conflict("Port is already allocated"), Some(None));
        assert_eq!(
            port_conflict("Ports are not available: address already in use"),
            Some(None)
        );
    }

    #[test]
    fn other_messages_are_not_port_conflicts() {
        assert_eq!(port_conflict("No such container: x"), None);
        assert_eq!(port_conflict("network mosaic-internal not found"), None);
    }

    #[test]
    fn a_port_conflict_from_the_engine_is_classified_port_allocated() {
        let err = classify(
            "unix:///var/run/docker.sock",
            "start",
            "c",
            server_error(
                500,
                "Bind for 127.0.0.1:19000 failed: port is already allocated",
            ),
        );
        assert!(
            matches!(
                err,
                EngineError::PortAllocated {
                    port: Some(19000),
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.is_transient());
    }

    #[test]
    fn engine_answers_are_classified_by_status() {
        let host = "unix:///var/run/docker.sock";
        let not_found = classify(
            host,
            "start",
            "c",
            server_error(404, "No such container: c"),
        );
        assert!(matches!(
            not_found,
            EngineError::NotFound { op: "start", .. }
        ));
        let refused = classify(host, "stop", "c", server_error(500, "oops"));
        assert!(matches!(
            refused,
            EngineError::Api {
                op: "stop",
                status: 500,
                ..
            }
        ));
        let unreadable = classify(
            host,
            "inspect",
            "c",
            BollardError::JsonDataError {
                message: "bad".to_owned(),
                column: 1,
            },
        );
        assert!(matches!(unreadable, EngineError::Api { status: 0, .. }));
        assert!(!unreadable.is_transient());
    }

    #[test]
    fn transport_failures_are_classified_unreachable_with_the_host() {
        let err = classify(
            "tcp://127.0.0.1:1",
            "list",
            "default",
            BollardError::RequestTimeoutError,
        );
        match err {
            EngineError::Unreachable { host, .. } => assert_eq!(host, "tcp://127.0.0.1:1"),
            other => panic!("{other:?}"),
        }
        let io = classify(
            "unix:///x.sock",
            "list",
            "default",
            BollardError::IOError {
                err: std::io::Error::from(std::io::ErrorKind::ConnectionReset),
            },
        );
        assert!(matches!(io, EngineError::Unreachable { .. }));
    }

    #[test]
    fn create_maps_name_conflict_and_missing_image() {
        let spec = spec();
        let conflict = create_failed(
            "h",
            &spec,
            server_error(
                409,
                "Conflict. The container name \"/mosaic-user-1\" is already in use",
            ),
        );
        assert!(
            matches!(conflict, EngineError::NameConflict { ref name } if name == "mosaic-user-1")
        );
        let missing = create_failed("h", &spec, server_error(404, "No such image: nope:1"));
        assert!(
            matches!(missing, EngineError::ImageNotFound { ref image, .. } if image == &spec.image)
        );
        let no_network = create_failed("h", &spec, server_error(404, "network x not found"));
        assert!(
            matches!(no_network, EngineError::Api { status: 404, ref message, .. } if message.contains("network x"))
        );
    }

    #[test]
    fn a_create_error_never_carries_the_token() {
        let spec = spec();
        let err = create_failed(
            "h",
            &spec,
            server_error(400, &format!("invalid env OPENCLAW_GATEWAY_TOKEN={TOKEN}")),
        );
        let text = err.to_string();
        assert!(!text.contains(TOKEN), "{text}");
        assert!(text.contains(REDACTED), "{text}");
    }
}
