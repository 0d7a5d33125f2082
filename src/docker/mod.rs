//! The Docker engine seam: the few calls the controller makes, behind a small
//! trait so the reconciler runs against the real engine ([`DockerEngine`], bollard)
//! in integration tests and production, and against the in-memory engine of
//! the `clawfleet-engine-sim` crate (engine-sim/) in large simulations and
//! property tests; that fake ships apart, so the release binary never holds it.
//!
//! The trait speaks the project's own types: nothing of bollard leaks out.
//! Its contract, which both implementations keep:
//! - `stop`/`start` of a container already in that state succeed;
//! - `remove` forces removal of a running container, never removes volumes,
//!   and succeeds when the container is already gone;
//! - `inspect` of a missing container is `Ok(None)`, not an error;
//! - `create` of a name in use is [`EngineError::NameConflict`]; of an image
//!   not present locally, [`EngineError::ImageNotFound`] (the caller pulls);
//! - `start` refused because the host port is taken is [`EngineError::PortAllocated`];
//! - lists and events only ever show containers labelled
//!   `io.clawfleet.managed=true` and `io.clawfleet.instance=<instance>`,
//!   but for [`Engine::list_by_name_prefix`], which shows any container
//!   whose name starts with the prefix (a fleet to take over has no labels).

mod bollard;
mod instrumented;
mod op;
mod swarm;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::stream::BoxStream;
use serde::Serialize;
use zeroize::Zeroizing;

pub use bollard::DockerEngine;
pub use instrumented::{EngineObserver, Instrumented};
pub use op::Op;
pub use swarm::{
    parse_constraint, PublishMode, SwarmEngine, SwarmNode, SwarmOptions, DEFAULT_TASK_POLL,
};

/// Label marking every object clawfleet made.
pub const LABEL_MANAGED: &str = "io.clawfleet.managed";
/// Label naming the controller instance that owns an object.
pub const LABEL_INSTANCE: &str = "io.clawfleet.instance";
/// Label holding the raw user id.
pub const LABEL_USER_ID: &str = "io.clawfleet.user-id";
/// Label holding the hash of the container's effective configuration.
pub const LABEL_SPEC_HASH: &str = "io.clawfleet.spec-hash";

/// A container's run state, as Docker reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RunState {
    /// Created, never started.
    Created,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Being restarted by Docker.
    Restarting,
    /// Being removed.
    Removing,
    /// Exited (stopped, crashed or killed).
    Exited,
    /// Dead: removal failed half-way.
    Dead,
    /// A Swarm task on its way: scheduled, preparing or starting, or on a
    /// node that is down (never on the Docker backend). [`Placement::waiting`]
    /// says why.
    Pending,
}

impl RunState {
    /// Parses Docker's state name; unknown names are `Dead` (the safest to leave alone).
    pub fn parse(text: &str) -> Self {
        match text {
            "created" => Self::Created,
            "running" => Self::Running,
            "paused" => Self::Paused,
            "restarting" => Self::Restarting,
            "removing" => Self::Removing,
            "exited" => Self::Exited,
            _ => Self::Dead,
        }
    }
}

/// A container as listed: enough to find a user's containers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerSummary {
    /// Docker's id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// All labels.
    pub labels: BTreeMap<String, String>,
    /// Run state.
    pub state: RunState,
}

impl ContainerSummary {
    /// The `io.clawfleet.user-id` label.
    pub fn user_id(&self) -> Option<&str> {
        self.labels.get(LABEL_USER_ID).map(String::as_str)
    }
}

/// A container as inspected: the truth a reconcile acts on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedContainer {
    /// Docker's id.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// All labels.
    pub labels: BTreeMap<String, String>,
    /// Image reference the container was created from.
    pub image: String,
    /// Run state.
    pub state: RunState,
    /// Exit code of the last run (meaningful when exited).
    pub exit_code: Option<i64>,
    /// Docker health ([`ContainerHealth::None`] for images without a HEALTHCHECK).
    pub health: ContainerHealth,
    /// When the last run started.
    pub started_at: Option<DateTime<Utc>>,
    /// When the last run ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// Host port published for the container (from its configuration): the
    /// one [`ContainerSpec::publish`] bound; should several be bound, the one
    /// of the lowest container port.
    pub host_port: Option<u16>,
    /// The environment of its configuration. Every value is a
    /// [`SecretString`]: the engine does not say which one is a token.
    pub env: BTreeMap<String, SecretString>,
    /// Where it runs, on a cluster; empty on the Docker backend.
    pub placement: Placement,
}

/// Where a user's agent runs on a Swarm cluster (README "Running on Docker
/// Swarm"), and why it is not running yet. All `None` on the Docker backend.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement {
    /// The node its current task runs (or last ran) on.
    pub node: Option<String>,
    /// The address of [`Self::node`] when the user's port answers only
    /// there (host publish mode), for `host_url`.
    pub node_addr: Option<String>,
    /// The node it is pinned to (a `node.id==` placement constraint).
    pub pinned: Option<String>,
    /// Why its task is not running: the task's state and error, or the
    /// pinned node being down, for `container_status.message`.
    pub waiting: Option<String>,
}

impl ObservedContainer {
    /// The `io.clawfleet.user-id` label.
    pub fn user_id(&self) -> Option<&str> {
        self.labels.get(LABEL_USER_ID).map(String::as_str)
    }

    /// The `io.clawfleet.instance` label.
    pub fn instance(&self) -> Option<&str> {
        self.labels.get(LABEL_INSTANCE).map(String::as_str)
    }

    /// The `io.clawfleet.spec-hash` label.
    pub fn spec_hash(&self) -> Option<&str> {
        self.labels.get(LABEL_SPEC_HASH).map(String::as_str)
    }

    /// True when labelled `io.clawfleet.managed=true`.
    pub fn is_managed(&self) -> bool {
        self.labels.get(LABEL_MANAGED).is_some_and(|v| v == "true")
    }
}

/// A container's health, as Docker reports it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ContainerHealth {
    /// No health check: the image has no HEALTHCHECK (Docker's `none`).
    #[default]
    None,
    /// Within the start period, or no result yet.
    Starting,
    /// The last checks passed.
    Healthy,
    /// The checks failed `retries` times in a row.
    Unhealthy,
}

impl ContainerHealth {
    /// Parses Docker's health status; anything unknown is [`Self::None`].
    pub fn parse(text: &str) -> Self {
        match text {
            "starting" => Self::Starting,
            "healthy" => Self::Healthy,
            "unhealthy" => Self::Unhealthy,
            _ => Self::None,
        }
    }
}

/// A value the engine must be given but no log may show: `Debug` redacts
/// it, it serializes as the same placeholder (so a spec can be hashed whole
/// without it), and its memory is wiped when dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(Zeroizing<String>);

impl SecretString {
    /// What `Debug` and serialization show instead of the value.
    pub const REDACTED: &'static str = "<redacted>";

    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Self(Zeroizing::new(value.into()))
    }

    /// The value itself, for the engine request only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(Self::REDACTED)
    }
}

impl Serialize for SecretString {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(Self::REDACTED)
    }
}

/// An environment variable's value; secrets are redacted in `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub enum EnvValue {
    /// An ordinary value.
    Plain(String),
    /// A secret (the gateway token).
    Secret(SecretString),
}

impl EnvValue {
    /// The value as the container sees it.
    pub fn expose(&self) -> &str {
        match self {
            Self::Plain(v) => v,
            Self::Secret(t) => t.expose(),
        }
    }
}

impl fmt::Debug for EnvValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Plain(v) => write!(f, "{v:?}"),
            Self::Secret(secret) => write!(f, "{secret:?}"),
        }
    }
}

/// Optional resource limits of a container.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ResourceLimits {
    /// Memory limit in bytes.
    pub memory_bytes: Option<i64>,
    /// CPU limit in billionths of a CPU (Docker's NanoCpus).
    pub nano_cpus: Option<i64>,
    /// Maximum number of processes.
    pub pids: Option<i64>,
}

/// Label-independent option of a bridge network: `false` disables traffic
/// between the network's containers (README "Security").
pub const OPTION_ENABLE_ICC: &str = "com.docker.network.bridge.enable_icc";

/// How far a container is confined beyond its resource limits (README "Security").
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct Confinement {
    /// Drop every capability (`--cap-drop ALL`) before adding [`Self::cap_add`].
    pub drop_all_capabilities: bool,
    /// Capabilities given back, by their name without `CAP_` (`CHOWN`).
    pub cap_add: Vec<String>,
    /// `no-new-privileges`: setuid binaries and file capabilities grant nothing.
    pub no_new_privileges: bool,
    /// Log rotation of the `json-file` driver; `None` leaves the engine's default.
    pub log: Option<LogLimits>,
}

impl Confinement {
    /// clawfleet's default: every capability dropped, `no-new-privileges`,
    /// logs capped at 3 files of 10 MiB.
    pub fn strict() -> Self {
        Self {
            drop_all_capabilities: true,
            cap_add: Vec::new(),
            no_new_privileges: true,
            log: Some(LogLimits::default()),
        }
    }

    /// Docker's own defaults, as a container made by anyone else has them.
    pub fn unconfined() -> Self {
        Self {
            drop_all_capabilities: false,
            cap_add: Vec::new(),
            no_new_privileges: false,
            log: None,
        }
    }

    /// Docker's `SecurityOpt` entries.
    pub fn security_opt(&self) -> Vec<String> {
        if self.no_new_privileges {
            vec!["no-new-privileges:true".to_owned()]
        } else {
            Vec::new()
        }
    }
}

/// Size rotation of the `json-file` log driver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct LogLimits {
    /// Bytes a log file may grow to before it is rotated.
    pub max_size_bytes: u64,
    /// Log files kept, the current one included.
    pub max_files: u32,
}

impl Default for LogLimits {
    fn default() -> Self {
        Self {
            max_size_bytes: 10 << 20,
            max_files: 3,
        }
    }
}

impl LogLimits {
    /// `max-size` as Docker writes it: `10m`, `512k`, `1g`, or bytes.
    pub fn max_size(&self) -> String {
        let bytes = self.max_size_bytes;
        match bytes {
            0 => "0".to_owned(),
            b if b % (1 << 30) == 0 => format!("{}g", b >> 30),
            b if b % (1 << 20) == 0 => format!("{}m", b >> 20),
            b if b % (1 << 10) == 0 => format!("{}k", b >> 10),
            b => b.to_string(),
        }
    }
}

/// Everything needed to create one user's container. Serializing it never
/// shows a secret ([`SecretString`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerSpec {
    /// Container name.
    pub name: String,
    /// Image reference.
    pub image: String,
    /// Environment, in order.
    pub env: Vec<(String, EnvValue)>,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Named volume mounted at [`Self::mount_path`].
    pub volume: String,
    /// Where the volume is mounted inside the container.
    pub mount_path: String,
    /// Network to join (name or id).
    pub network: String,
    /// The container's TCP port, exposed, and published when [`Self::publish`] says.
    pub port: u16,
    /// Host address and port [`Self::port`] is published on.
    pub publish: Option<(IpAddr, u16)>,
    /// Grace period of `docker stop` (the container's StopTimeout).
    pub stop_timeout: Duration,
    /// Resource limits.
    pub limits: ResourceLimits,
    /// Capabilities, privileges and log rotation.
    pub confinement: Confinement,
    /// The cluster node it must run on (the node holding its volume); only
    /// engines whose volumes are node-local ([`Engine::pins_volumes`]) read
    /// it. Not hashed: pinning a user never recreates their container.
    #[serde(skip)]
    pub node: Option<String>,
}

/// A network as inspected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObservedNetwork {
    /// Docker's id.
    pub id: String,
    /// Its driver (`bridge`, `overlay`).
    pub driver: String,
    /// True when standalone containers may join it (always so for a bridge).
    pub attachable: bool,
    /// The driver options it was created with.
    pub options: BTreeMap<String, String>,
}

impl ObservedNetwork {
    /// False when the network was created with inter-container traffic
    /// disabled ([`OPTION_ENABLE_ICC`] false, read as the engine reads a bool).
    pub fn inter_container_traffic(&self) -> bool {
        !matches!(
            self.options.get(OPTION_ENABLE_ICC).map(String::as_str),
            Some("0" | "f" | "F" | "false" | "FALSE" | "False")
        )
    }
}

/// Which managed containers a list or an event subscription covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerFilter {
    /// The `io.clawfleet.instance` label value; always applied, with `managed=true`.
    pub instance: String,
    /// Only containers labelled with this `io.clawfleet.user-id`.
    pub user_id: Option<String>,
}

/// A container event: a nudge to reconcile a user, never the truth.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineEvent {
    /// The container's `io.clawfleet.user-id` label.
    pub user_id: Option<String>,
    /// Docker's action (`create`, `start`, `die`, `health_status: unhealthy`, ...).
    pub action: String,
    /// The container's id.
    pub container_id: String,
    /// Event time in nanoseconds since the Unix epoch (pass it back as `since`).
    pub time_nanos: i64,
}

/// The engine's version, for `doctor` and logs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineVersion {
    /// Engine version, e.g. `20.10.24`.
    pub version: String,
    /// API version in use after negotiation, e.g. `1.41`.
    pub api_version: String,
}

/// A Docker call failed.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The engine could not be reached (socket missing, connection refused or cut).
    #[error("docker engine unreachable at {host}: {message}")]
    Unreachable {
        /// The endpoint.
        host: String,
        /// What the transport said.
        message: String,
    },
    /// The object does not exist.
    #[error("docker {op} of {target} failed: not found")]
    NotFound {
        /// The operation.
        op: &'static str,
        /// The name or id.
        target: String,
    },
    /// A container of that name already exists.
    #[error("docker create of {name} failed: the name is already in use")]
    NameConflict {
        /// The name.
        name: String,
    },
    /// The image is not present locally (create) or could not be pulled (pull).
    #[error("image {image} is not available: {message}")]
    ImageNotFound {
        /// The image reference.
        image: String,
        /// What the engine said.
        message: String,
    },
    /// Start failed because the host port is held by another container or process.
    #[error("host port {} is already in use: {message}", port.map_or("?".into(), |p| p.to_string()))]
    PortAllocated {
        /// The port, when the engine's message names it.
        port: Option<u16>,
        /// What the engine said.
        message: String,
    },
    /// Any other refusal by the engine.
    #[error("docker {op} of {target} failed ({status}): {message}")]
    Api {
        /// The operation.
        op: &'static str,
        /// The name or id.
        target: String,
        /// HTTP status.
        status: u16,
        /// What the engine said.
        message: String,
    },
}

impl EngineError {
    /// True for failures a retry may fix without a human (engine unreachable
    /// or overloaded, port race); false for those that need a human.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Unreachable { .. } | Self::PortAllocated { .. } | Self::NameConflict { .. } => {
                true
            }
            Self::NotFound { .. } => true,
            Self::ImageNotFound { .. } => false,
            Self::Api { status, .. } => *status >= 500 || *status == 409 || *status == 429,
        }
    }

    /// A short bounded label for metrics (`unreachable`, `not_found`, ...).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Unreachable { .. } => "unreachable",
            Self::NotFound { .. } => "not_found",
            Self::NameConflict { .. } => "name_conflict",
            Self::ImageNotFound { .. } => "image_not_found",
            Self::PortAllocated { .. } => "port_allocated",
            Self::Api { .. } => "api",
        }
    }
}

/// The calls the controller makes on a Docker engine.
pub trait Engine: Send + Sync + 'static {
    /// Engine and negotiated API version.
    fn version(&self) -> impl Future<Output = Result<EngineVersion, EngineError>> + Send;

    /// Managed containers matching `filter`, running or not.
    fn list_containers(
        &self,
        filter: &ContainerFilter,
    ) -> impl Future<Output = Result<Vec<ContainerSummary>, EngineError>> + Send;

    /// Every container whose name starts with `prefix`, labelled or not,
    /// running or not: the fleet a takeover finds (README "Taking over from
    /// the original service").
    fn list_by_name_prefix(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<Vec<ContainerSummary>, EngineError>> + Send;

    /// One container by exact name or id; `None` when there is none.
    fn inspect_container(
        &self,
        name_or_id: &str,
    ) -> impl Future<Output = Result<Option<ObservedContainer>, EngineError>> + Send;

    /// Creates (does not start) a container; returns its id.
    fn create_container(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, EngineError>> + Send;

    /// Starts a container; a running one is left as it is.
    fn start_container(&self, id: &str) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Stops a container, killing it after `timeout`; a stopped one is left as it is.
    fn stop_container(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Stops (with `timeout`) and starts a container.
    fn restart_container(
        &self,
        id: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Removes a container, running or not, keeping its volumes; a missing one is fine.
    fn remove_container(&self, id: &str) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Renames a container.
    fn rename_container(
        &self,
        id: &str,
        new_name: &str,
    ) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// Creates a named volume with `labels` unless one of that name exists;
    /// returns the labels of the volume now there (an existing volume keeps its own).
    fn ensure_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<BTreeMap<String, String>, EngineError>> + Send;

    /// The labels of the volume called `name`; `None` when there is none.
    fn inspect_volume(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<BTreeMap<String, String>>, EngineError>> + Send;

    /// Returns the network called `name`, creating it (with `labels` and
    /// driver `options`) when missing; an existing one is returned as it is,
    /// whatever its options. When old engines let several networks share
    /// the name, the oldest wins, so every caller agrees.
    fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> impl Future<Output = Result<ObservedNetwork, EngineError>> + Send;

    /// The (oldest) network called `name`; `None` when there is none.
    fn inspect_network(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Option<ObservedNetwork>, EngineError>> + Send;

    /// True when `image` is present locally.
    fn image_present(&self, image: &str) -> impl Future<Output = Result<bool, EngineError>> + Send;

    /// Pulls `image`; [`EngineError::ImageNotFound`] when it cannot be had.
    fn pull_image(&self, image: &str) -> impl Future<Output = Result<(), EngineError>> + Send;

    /// True when [`Self::update_container`] replaces a container's
    /// configuration in place (a Swarm service update), so a changed spec is
    /// applied by one update instead of create, stop, remove and rename.
    fn updates_in_place(&self) -> bool {
        false
    }

    /// Gives the container `id` the whole of `spec`, in place; returns its
    /// id. Only called when [`Self::updates_in_place`].
    fn update_container(
        &self,
        id: &str,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Result<String, EngineError>> + Send {
        let refused = EngineError::Api {
            op: "update",
            target: id.to_owned(),
            status: 501,
            message: format!("this engine cannot update {} in place", spec.name),
        };
        async move { Err(refused) }
    }

    /// True when volumes live on one node of several, so a user must stay on
    /// the node of their first run ([`Self::pin_container`]).
    fn pins_volumes(&self) -> bool {
        false
    }

    /// Keeps the container `id` on `node` from now on, without restarting
    /// it. Only called when [`Self::pins_volumes`].
    fn pin_container(
        &self,
        id: &str,
        node: &str,
    ) -> impl Future<Output = Result<(), EngineError>> + Send {
        let _ = (id, node);
        async { Ok(()) }
    }

    /// Container events of managed containers of `filter.instance` from
    /// `since_nanos` on (or from now). The stream ends or yields an error when
    /// the connection breaks; the caller resubscribes.
    fn events(
        &self,
        filter: &ContainerFilter,
        since_nanos: Option<i64>,
    ) -> BoxStream<'static, Result<EngineEvent, EngineError>>;
}

/// The labels every object made for `user_id` carries.
pub fn object_labels(instance: &str, user_id: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_INSTANCE.to_owned(), instance.to_owned()),
        (LABEL_USER_ID.to_owned(), user_id.to_owned()),
    ])
}

/// The labels of shared objects (the network).
pub fn shared_labels(instance: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_INSTANCE.to_owned(), instance.to_owned()),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_is_redacted_in_debug_and_serialization_and_exposed_only_on_request() {
        let value = EnvValue::Secret(SecretString::new("s3cret-token"));
        assert_eq!(format!("{value:?}"), "<redacted>");
        let json = serde_json::to_string(&value).unwrap();
        assert!(!json.contains("s3cret"), "{json}");
        assert_eq!(value.expose(), "s3cret-token");
        assert_eq!(
            format!("{:?}", EnvValue::Plain("visible".into())),
            "\"visible\""
        );
    }

    #[test]
    fn docker_health_names_are_read_and_anything_else_is_no_health_check() {
        assert_eq!(
            ContainerHealth::parse("starting"),
            ContainerHealth::Starting
        );
        assert_eq!(ContainerHealth::parse("healthy"), ContainerHealth::Healthy);
        assert_eq!(
            ContainerHealth::parse("unhealthy"),
            ContainerHealth::Unhealthy
        );
        assert_eq!(ContainerHealth::parse("none"), ContainerHealth::None);
        assert_eq!(ContainerHealth::parse(""), ContainerHealth::None);
    }
}
