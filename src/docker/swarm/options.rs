//! What the operator chooses about the Swarm backend (README "Running on
//! Docker Swarm"): placement constraints, a multi-host volume driver, the
//! publish mode, and how often task states are listed.

use std::time::Duration;

/// How a user's gateway port is published on the cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PublishMode {
    /// Swarm's routing mesh: the port answers on every node.
    #[default]
    Ingress,
    /// Only on the node the task runs on (the pinned node).
    Host,
}

impl PublishMode {
    /// The mode as written on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ingress => "ingress",
            Self::Host => "host",
        }
    }
}

/// The Swarm backend's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SwarmOptions {
    /// Placement constraints every user's service carries (`--placement`).
    pub placement: Vec<String>,
    /// A multi-host volume driver (`--volume-driver`); `None`: node-local
    /// volumes, and each user is pinned to the node of their first run.
    pub volume_driver: Option<String>,
    /// How ports are published (`--swarm-publish-mode`).
    pub publish_mode: PublishMode,
    /// How often the task watcher lists this instance's tasks.
    pub task_poll: Duration,
}

/// Default of [`SwarmOptions::task_poll`].
pub const DEFAULT_TASK_POLL: Duration = Duration::from_secs(1);

impl Default for SwarmOptions {
    fn default() -> Self {
        Self {
            placement: Vec::new(),
            volume_driver: None,
            publish_mode: PublishMode::Ingress,
            task_poll: DEFAULT_TASK_POLL,
        }
    }
}

/// Checks one `--placement` constraint's shape (`<key>==<value>` or
/// `<key>!=<value>`), as Swarm would refuse it only at service creation.
pub fn parse_constraint(text: &str) -> Result<String, String> {
    let trimmed = text.trim();
    let operator = ["==", "!="].into_iter().find(|op| trimmed.contains(op));
    let Some(operator) = operator else {
        return Err(format!(
            "placement constraint {trimmed:?} has no == or != (e.g. node.labels.agents==true)"
        ));
    };
    let (key, value) = trimmed.split_once(operator).unwrap_or_default();
    if key.trim().is_empty() || value.trim().is_empty() {
        return Err(format!(
            "placement constraint {trimmed:?} needs a key and a value (e.g. node.role==worker)"
        ));
    }
    Ok(trimmed.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_constraints_are_checked_for_shape() {
        assert_eq!(
            parse_constraint(" node.labels.agents==true ").unwrap(),
            "node.labels.agents==true"
        );
        assert!(parse_constraint("node.role != manager").is_ok());
        assert!(parse_constraint("node.role").unwrap_err().contains("no =="));
        assert!(parse_constraint("==x")
            .unwrap_err()
            .contains("key and a value"));
    }
}
