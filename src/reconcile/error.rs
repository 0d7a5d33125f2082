//! What can make a reconcile fail, and whether a retry may fix it.

use crate::docker::EngineError;
use crate::isolation::NetworkMismatch;
use crate::ports::PortError;
use crate::secrets::SecretsError;
use crate::store::StoreError;

/// A reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    /// The database failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// A token could not be generated, sealed or opened.
    #[error("gateway token: {0}")]
    Secrets(#[from] SecretsError),
    /// No port could be allocated.
    #[error(transparent)]
    Ports(#[from] PortError),
    /// The agents' network disagrees with `--network-isolation`.
    #[error(transparent)]
    Network(#[from] NetworkMismatch),
    /// The user's state volume belongs to another user or instance.
    #[error(
        "volume {volume} is labelled for {holder}: it is never mounted into another user's container; remove it (docker volume rm) if it is unwanted, or give this instance another --name-prefix"
    )]
    ForeignVolume {
        /// The volume's name.
        volume: String,
        /// Whose it is, per its labels.
        holder: String,
    },
}

impl ReconcileError {
    /// True when a retry with back-off may fix it; false when it needs a
    /// human (bad image, exhausted port range, unopenable token).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Store(e) => e.is_transient(),
            Self::Engine(e) => e.is_transient(),
            Self::Secrets(_) => false,
            Self::Ports(PortError::Exhausted { .. }) => false,
            Self::Ports(PortError::Store(e)) => e.is_transient(),
            Self::Network(_) | Self::ForeignVolume { .. } => false,
        }
    }

    /// The words for `container_status.message`: the error and, for an
    /// image the engine has not and cannot pull, what to do about it (issue
    /// 11: a new operator met a bare registry error on every user).
    /// `row_names_image`: the user's row names its own image, rather than
    /// taking the configured default.
    pub fn status_message(&self, row_names_image: bool) -> String {
        let Self::Engine(EngineError::ImageNotFound { image, .. }) = self else {
            return self.to_string();
        };
        let remedy = if row_names_image {
            "`docker load` it, or set the user's image to one this engine has"
        } else {
            "set OPENCLAW_IMAGE (or --image) to an image this engine has, or `docker load` this one; to try clawfleet out, `make agent-image` builds the README's stand-in image clawfleet-agent-stub:dev"
        };
        format!("{self}. This engine has no image {image} and cannot pull it: {remedy}")
    }

    /// A short bounded label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Store(_) => "database",
            Self::Engine(e) => e.kind(),
            Self::Secrets(_) => "secrets",
            Self::Ports(PortError::Exhausted { .. }) => "ports_exhausted",
            Self::Ports(PortError::Store(_)) => "database",
            Self::Network(_) | Self::ForeignVolume { .. } => "isolation",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_a_human_must_fix_is_told_apart_from_what_a_retry_may_fix() {
        let foreign = ReconcileError::ForeignVolume {
            volume: "v".into(),
            holder: "user \"bob\" of instance \"default\"".into(),
        };
        assert!(!foreign.is_transient());
        assert_eq!(foreign.kind(), "isolation");
        let taken = ReconcileError::Engine(EngineError::PortAllocated {
            port: Some(19000),
            message: "port is already allocated".into(),
        });
        assert!(taken.is_transient());
        assert_eq!(taken.kind(), "port_allocated");
    }

    #[test]
    fn a_missing_image_says_what_to_do_about_it() {
        let missing = ReconcileError::Engine(EngineError::ImageNotFound {
            image: "alpine/openclaw:latest".into(),
            message: "Get https://registry-1.docker.io/v2/: dial tcp: no such host".into(),
        });
        let default = missing.status_message(false);
        assert!(default.starts_with(&missing.to_string()), "{default}");
        for remedy in [
            "OPENCLAW_IMAGE",
            "--image",
            "`docker load`",
            "make agent-image",
            "clawfleet-agent-stub:dev",
        ] {
            assert!(default.contains(remedy), "{default} lacks {remedy}");
        }
        let own = missing.status_message(true);
        assert!(own.contains("`docker load` it"), "{own}");
        assert!(!own.contains("OPENCLAW_IMAGE"), "a row's own image: {own}");

        let other = ReconcileError::ForeignVolume {
            volume: "v".into(),
            holder: "h".into(),
        };
        assert_eq!(other.status_message(false), other.to_string());
    }
}
