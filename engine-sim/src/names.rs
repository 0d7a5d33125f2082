//! Docker's rule for container and local volume names, and the errors the
//! engine gives for a name that breaks it.

use clawfleet::docker::EngineError;

/// Docker's rule for container and local volume names: `[a-zA-Z0-9][a-zA-Z0-9_.-]+`.
pub(super) fn is_valid_object_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() >= 2
        && bytes[0].is_ascii_alphanumeric()
        && bytes[1..]
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

pub(super) fn check_container_name(op: &'static str, name: &str) -> Result<(), EngineError> {
    if is_valid_object_name(name) {
        return Ok(());
    }
    Err(EngineError::Api {
        op,
        target: name.to_owned(),
        status: 400,
        message: format!(
            "Invalid container name ({name}), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"
        ),
    })
}

pub(super) fn check_volume_name(op: &'static str, name: &str) -> Result<(), EngineError> {
    if is_valid_object_name(name) {
        return Ok(());
    }
    Err(EngineError::Api {
        op,
        target: name.to_owned(),
        status: 400,
        message: format!(
            "\"{name}\" includes invalid characters for a local volume name, only \"[a-zA-Z0-9][a-zA-Z0-9_.-]\" are allowed"
        ),
    })
}
