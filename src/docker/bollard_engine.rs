//! [`Engine`](super::Engine) on a real Docker engine, through bollard.
//!
//! This module owns three translations and nothing else: a `DOCKER_HOST`
//! string into a connected, version-negotiated client; the project's types
//! into bollard's models and back; and bollard's errors into [`EngineError`].
//!
//! Invariants:
//! - no environment value of a container (the gateway token among them) is
//!   put into an error message or a log event by this module;
//! - lists and events are filtered by label on the engine *and* again here,
//!   so a label value is matched exactly whatever the engine's filter does;
//! - a request path never carries a caller's string that is not a plain Docker
//!   name, id or image reference (bollard joins it into the URL unescaped).
//!
//! bollard itself logs request and response bodies through the `log` crate at
//! `debug`/`trace`, and a create body or an inspect answer holds the token:
//! whoever installs the log subscriber must cap `bollard` at `info`.

use std::collections::{BTreeMap, HashMap};
use std::error::Error as StdError;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, ContainerSummary as BollardSummary,
    EventMessage, HostConfig, HostConfigLogConfig, Mount, MountType, Network, NetworkCreateRequest,
    PortBinding, RestartPolicy, RestartPolicyNameEnum, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    InspectContainerOptions, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    RemoveContainerOptionsBuilder, RenameContainerOptionsBuilder, RestartContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use bollard::{Docker, API_DEFAULT_VERSION};
use chrono::{DateTime, Datelike, Utc};
use futures::stream::{self, BoxStream, StreamExt};

use super::{
    ContainerFilter, ContainerHealth, ContainerSpec, ContainerSummary, Engine, EngineError,
    EngineEvent, EngineVersion, ObservedContainer, ObservedNetwork, RunState, LABEL_INSTANCE,
    LABEL_MANAGED, LABEL_USER_ID,
};
use crate::image_ref::ImageRef;

/// The endpoint used when the configured host (`DOCKER_HOST`) is empty.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// How long an ordinary request may wait for the engine's answer (bollard's default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Port of a plain-HTTP engine endpoint named without one (as the docker CLI assumes).
const DEFAULT_HTTP_PORT: u16 = 2375;
/// Port of a TLS engine endpoint named without one.
const DEFAULT_TLS_PORT: u16 = 2376;
/// What replaces a secret that an engine message happens to echo.
const REDACTED: &str = "<redacted>";
/// How long the networks of one name must stay unchanged, at least, before
/// a caller that raced to create one trusts what it sees (twice its own
/// create's time when that is longer: a racing create is as slow).
const NETWORK_SETTLE_QUIET: Duration = Duration::from_secs(1);
/// How often a settling caller lists the networks of the name.
const NETWORK_SETTLE_POLL: Duration = Duration::from_millis(100);
/// The longest a caller settles; past it, it takes what it sees.
const NETWORK_SETTLE_MAX: Duration = Duration::from_secs(30);

/// A Docker engine reached through bollard. Cheap to clone: clones share one
/// connection pool, the negotiated API version and the network-creation lock.
#[derive(Clone, Debug)]
pub struct DockerEngine {
    docker: Docker,
    host: String,
    /// Makes network creation single-flight among this engine's clones;
    /// across processes, settling on the oldest network makes callers agree.
    network_creation: Arc<tokio::sync::Mutex<()>>,
}

/// Where the engine listens, as parsed from a `DOCKER_HOST` value.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Endpoint {
    /// A Unix socket path.
    Unix(String),
    /// `host:port` over plain HTTP.
    Http(String),
    /// `host:port` over TLS with client certificates.
    Https(String),
}

impl DockerEngine {
    /// Connects to `docker_host` and negotiates the API version down to what
    /// the engine speaks.
    ///
    /// `docker_host` is read as the docker CLI reads `DOCKER_HOST`:
    /// `unix:///path`, `tcp://host[:port]` (plain HTTP, or TLS when
    /// `DOCKER_TLS_VERIFY` is set), `http://host[:port]`, `https://host[:port]`,
    /// a socket path, or empty for [`DEFAULT_DOCKER_HOST`]. TLS takes `ca.pem`,
    /// `cert.pem` and `key.pem` from `DOCKER_CERT_PATH` (default `~/.docker`).
    pub async fn connect(docker_host: &str) -> Result<Self, EngineError> {
        let host = match docker_host.trim() {
            "" => DEFAULT_DOCKER_HOST.to_owned(),
            trimmed => trimmed.to_owned(),
        };
        let invalid = |message: String| EngineError::Unreachable {
            host: host.clone(),
            message,
        };
        let tls_verify = std::env::var_os("DOCKER_TLS_VERIFY").is_some_and(|v| !v.is_empty());
        let endpoint = parse_docker_host(&host, tls_verify).map_err(invalid)?;
        let timeout = REQUEST_TIMEOUT.as_secs();
        let docker = match &endpoint {
            Endpoint::Unix(path) => Docker::connect_with_unix(path, timeout, API_DEFAULT_VERSION),
            Endpoint::Http(authority) => {
                Docker::connect_with_http(authority, timeout, API_DEFAULT_VERSION)
            }
            Endpoint::Https(authority) => {
                let dir = cert_dir().map_err(invalid)?;
                let (ca, cert, key) = tls_files(&dir).map_err(invalid)?;
                Docker::connect_with_ssl(authority, &key, &cert, &ca, timeout, API_DEFAULT_VERSION)
            }
        }
        .map_err(|err| invalid(error_chain(&err)))?;
        let engine = Self {
            docker,
            host,
            network_creation: Arc::default(),
        };
        let docker = engine
            .docker
            .clone()
            .negotiate_version()
            .await
            .map_err(|err| engine.fail("version negotiation", "engine", err))?;
        let engine = Self { docker, ..engine };
        tracing::debug!(
            host = %engine.host,
            api_version = %engine.docker.client_version(),
            "connected to docker engine"
        );
        Ok(engine)
    }

    /// The endpoint as configured (what [`EngineError::Unreachable`] names).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The API version in use after negotiation, e.g. `1.41`.
    pub fn api_version(&self) -> String {
        self.docker.client_version().to_string()
    }

    /// Classifies a failed call `op` on `target` by what went wrong, before
    /// any operation-specific reading of the engine's answer.
    fn fail(&self, op: &'static str, target: &str, err: BollardError) -> EngineError {
        classify(&self.host, op, target, err)
    }

    /// The user an image's entrypoint runs as (`Config.User`, empty for
    /// root); `None` when the image is not present.
    pub async fn image_user(&self, image: &str) -> Result<Option<String>, EngineError> {
        if ImageRef::parse(image).is_err() {
            return Ok(None);
        }
        match self.docker.inspect_image(image).await {
            Ok(inspect) => Ok(Some(
                inspect.config.and_then(|c| c.user).unwrap_or_default(),
            )),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(err) => Err(self.fail("image inspect", image, err)),
        }
    }

    /// The networks called exactly `name`, oldest first.
    async fn networks_named(&self, name: &str) -> Result<Vec<ObservedNetwork>, EngineError> {
        let filters = HashMap::from([("name".to_owned(), vec![name.to_owned()])]);
        let options = ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let networks = self
            .docker
            .list_networks(Some(options))
            .await
            .map_err(|err| self.fail("network list", name, err))?;
        Ok(oldest_first(name, networks))
    }

    /// The network called `name` to use, if any: the only one, or, while
    /// there are several (a race in progress, or duplicates made by hand),
    /// the oldest once they have settled.
    async fn existing_network(&self, name: &str) -> Result<Option<ObservedNetwork>, EngineError> {
        let found = self.networks_named(name).await?;
        if found.len() > 1 {
            return self
                .settle_network(name, None, NETWORK_SETTLE_QUIET)
                .await
                .map(Some);
        }
        Ok(found.into_iter().next())
    }

    /// Lists the networks called `name` until they have stayed the same for
    /// `quiet` (at most [`NETWORK_SETTLE_MAX`]) and picks the oldest, as every
    /// other caller does. `own`, a network this call has just created, is
    /// removed if it lost: nothing is attached to it yet, so controllers
    /// that raced to create the network end up sharing one.
    ///
    /// Engines before API 1.44 check for a duplicate name without a lock, and
    /// a racing create becomes visible only when it is done, possibly older
    /// than a network listed before it: settling waits for it.
    async fn settle_network(
        &self,
        name: &str,
        own: Option<&str>,
        quiet: Duration,
    ) -> Result<ObservedNetwork, EngineError> {
        let ids = |networks: &[ObservedNetwork]| -> Vec<String> {
            networks.iter().map(|n| n.id.clone()).collect()
        };
        let give_up = tokio::time::Instant::now() + NETWORK_SETTLE_MAX;
        let mut seen = self.networks_named(name).await?;
        let mut unchanged_since = tokio::time::Instant::now();
        while unchanged_since.elapsed() < quiet && tokio::time::Instant::now() < give_up {
            tokio::time::sleep(NETWORK_SETTLE_POLL).await;
            let now = self.networks_named(name).await?;
            if ids(&now) != ids(&seen) {
                seen = now;
                unchanged_since = tokio::time::Instant::now();
            }
        }
        let winner = seen.first().cloned().ok_or_else(|| EngineError::NotFound {
            op: "network create",
            target: name.to_owned(),
        })?;
        if let Some(own) =
            own.filter(|own| *own != winner.id && ids(&seen).iter().any(|id| id == own))
        {
            match self.docker.remove_network(own).await {
                Ok(())
                | Err(BollardError::DockerResponseServerError {
                    status_code: 404, ..
                }) => {
                    tracing::info!(network = name, duplicate = own, kept = %winner.id, "removed a duplicate network that lost a creation race");
                }
                Err(err) => {
                    let err = self.fail("network remove", name, err);
                    tracing::warn!(network = name, duplicate = own, kept = %winner.id, error = %err, "could not remove a duplicate network that lost a creation race");
                }
            }
        }
        Ok(winner)
    }

    /// Creates the network, asking the engine to refuse a duplicate name;
    /// its id, or `None` when the engine refused (another creator won).
    async fn create_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<Option<String>, EngineError> {
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".to_owned()),
            labels: Some(to_hash_map(labels)),
            options: (!options.is_empty()).then(|| to_hash_map(options)),
            ..Default::default()
        };
        // Engines before API 1.44 create a second network of a taken name
        // unless asked not to, and bollard's model has no `CheckDuplicate`
        // field any more: this one request's body is rewritten to carry it.
        // Newer engines ignore the field (they always refuse duplicates).
        let mut body = serde_json::to_value(&request).map_err(|err| EngineError::Api {
            op: "network create",
            target: name.to_owned(),
            status: 0,
            message: format!("request could not be encoded: {err}"),
        })?;
        if let Some(fields) = body.as_object_mut() {
            fields.insert("CheckDuplicate".to_owned(), serde_json::Value::Bool(true));
        }
        let body = body.to_string();
        let docker = self.docker.clone().with_request_modifier(move |request| {
            if request.uri().path().ends_with("/networks/create") {
                request.map(|_| bollard::body_full(body.clone().into()))
            } else {
                request
            }
        });
        match docker.create_network(request).await {
            Ok(created) => Ok(Some(created.id)),
            // Another creator won the race: the caller re-lists.
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(None),
            Err(err) => Err(self.fail("network create", name, err)),
        }
    }
}

impl Engine for DockerEngine {
    async fn version(&self) -> Result<EngineVersion, EngineError> {
        let version = self
            .docker
            .version()
            .await
            .map_err(|err| self.fail("version", "engine", err))?;
        Ok(EngineVersion {
            version: version.version.unwrap_or_default(),
            api_version: self.api_version(),
        })
    }

    async fn list_containers(
        &self,
        filter: &ContainerFilter,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&label_filters(filter))
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|err| self.fail("list", &filter.instance, err))?;
        Ok(containers
            .into_iter()
            .map(summary_from)
            .filter(|c| filter_matches(filter, |key| c.labels.get(key).map(String::as_str)))
            .collect())
    }

    async fn inspect_container(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ObservedContainer>, EngineError> {
        if !is_object_ref(name_or_id) {
            // No container can have such a name; never put it into a URL.
            return Ok(None);
        }
        match self
            .docker
            .inspect_container(name_or_id, None::<InspectContainerOptions>)
            .await
        {
            Ok(inspect) => Ok(Some(observed_from(inspect))),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(err) => Err(self.fail("inspect", name_or_id, err)),
        }
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        match self
            .docker
            .create_container(Some(options), create_body(spec))
            .await
        {
            Ok(created) => Ok(created.id),
            Err(err) => Err(create_failed(&self.host, spec, err)),
        }
    }

    async fn start_container(&self, id: &str) -> Result<(), EngineError> {
        check_object_ref("start", id)?;
        // 304 (already running) is a success for bollard.
        self.docker
            .start_container(id, None)
            .await
            .map_err(|err| self.fail("start", id, err))
    }

    async fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        check_object_ref("stop", id)?;
        let seconds = whole_seconds_i32(timeout);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        // The engine answers only once the grace period is over.
        let docker = self
            .docker
            .clone()
            .with_timeout(request_timeout_after(seconds));
        docker
            .stop_container(id, Some(options))
            .await
            .map_err(|err| self.fail("stop", id, err))
    }

    async fn restart_container(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        check_object_ref("restart", id)?;
        let seconds = whole_seconds_i32(timeout);
        let options = RestartContainerOptionsBuilder::default().t(seconds).build();
        let docker = self
            .docker
            .clone()
            .with_timeout(request_timeout_after(seconds));
        docker
            .restart_container(id, Some(options))
            .await
            .map_err(|err| self.fail("restart", id, err))
    }

    async fn remove_container(&self, id: &str) -> Result<(), EngineError> {
        if !is_object_ref(id) {
            return Ok(());
        }
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(false)
            .build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(err) => Err(self.fail("remove", id, err)),
        }
    }

    async fn rename_container(&self, id: &str, new_name: &str) -> Result<(), EngineError> {
        check_object_ref("rename", id)?;
        let options = RenameContainerOptionsBuilder::default()
            .name(new_name)
            .build();
        match self.docker.rename_container(id, options).await {
            Ok(()) => Ok(()),
            Err(BollardError::DockerResponseServerError {
                status_code: 409, ..
            }) => Err(EngineError::NameConflict {
                name: new_name.to_owned(),
            }),
            Err(err) => Err(self.fail("rename", id, err)),
        }
    }

    async fn ensure_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, EngineError> {
        let request = VolumeCreateRequest {
            name: Some(name.to_owned()),
            labels: Some(to_hash_map(labels)),
            ..Default::default()
        };
        // The engine answers with the existing volume, and its own labels,
        // when the name is taken.
        self.docker
            .create_volume(request)
            .await
            .map(|volume| volume.labels.into_iter().collect())
            .map_err(|err| self.fail("volume create", name, err))
    }

    async fn inspect_volume(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, EngineError> {
        if !is_object_ref(name) {
            return Ok(None);
        }
        match self.docker.inspect_volume(name).await {
            Ok(volume) => Ok(Some(volume.labels.into_iter().collect())),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(None),
            Err(err) => Err(self.fail("volume inspect", name, err)),
        }
    }

    async fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<ObservedNetwork, EngineError> {
        if let Some(network) = self.existing_network(name).await? {
            return Ok(network);
        }
        let _single_flight = self.network_creation.lock().await;
        if let Some(network) = self.existing_network(name).await? {
            return Ok(network);
        }
        let started = tokio::time::Instant::now();
        let own = self.create_network(name, labels, options).await?;
        let quiet = NETWORK_SETTLE_QUIET.max(started.elapsed() * 2);
        self.settle_network(name, own.as_deref(), quiet).await
    }

    async fn inspect_network(&self, name: &str) -> Result<Option<ObservedNetwork>, EngineError> {
        Ok(self.networks_named(name).await?.into_iter().next())
    }

    async fn image_present(&self, image: &str) -> Result<bool, EngineError> {
        if ImageRef::parse(image).is_err() {
            return Ok(false);
        }
        match self.docker.inspect_image(image).await {
            Ok(_) => Ok(true),
            Err(BollardError::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(false),
            Err(err) => Err(self.fail("image inspect", image, err)),
        }
    }

    async fn pull_image(&self, image: &str) -> Result<(), EngineError> {
        let reference = ImageRef::parse(image).map_err(|message| EngineError::ImageNotFound {
            image: image.to_owned(),
            message,
        })?;
        let mut options = CreateImageOptionsBuilder::default().from_image(image);
        if reference.is_untagged() {
            // An untagged pull would fetch every tag of the repository.
            options = options.tag("latest");
        }
        let mut progress = self.docker.create_image(Some(options.build()), None, None);
        while let Some(item) = progress.next().await {
            match item {
                Ok(info) => tracing::debug!(
                    image,
                    layer = info.id.as_deref(),
                    status = info.status.as_deref(),
                    "image pull progress"
                ),
                Err(err) => return Err(pull_failed(&self.host, image, err)),
            }
        }
        Ok(())
    }

    fn events(
        &self,
        filter: &ContainerFilter,
        since_nanos: Option<i64>,
    ) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        let mut filters = label_filters(filter);
        filters.insert("type".to_owned(), vec!["container".to_owned()]);
        let mut options = EventsOptionsBuilder::default().filters(&filters);
        if let Some(nanos) = since_nanos {
            options = options.since(&docker_timestamp(nanos));
        }
        let host = self.host.clone();
        let filter = filter.clone();
        let messages = self.docker.events(Some(options.build())).boxed();
        // After the first error the connection is gone: end the stream there,
        // without polling the dead body again, so the caller resubscribes.
        stream::unfold(Some(messages), |messages| async move {
            let mut messages = messages?;
            let item = messages.next().await?;
            let rest = item.is_ok().then_some(messages);
            Some((item, rest))
        })
        .filter_map(move |item| {
            let mapped = match item {
                Ok(message) => event_from(&filter, message).map(Ok),
                Err(err) => Some(Err(classify(&host, "events", &filter.instance, err))),
            };
            futures::future::ready(mapped)
        })
        .boxed()
    }
}

/// Reads a `DOCKER_HOST` value (already defaulted when empty).
fn parse_docker_host(host: &str, tls_verify: bool) -> Result<Endpoint, String> {
    let Some((scheme, rest)) = host.split_once("://") else {
        // The docker CLI reads a bare value as TCP; a value with a slash can
        // only be meant as a socket path.
        return if host.contains('/') {
            Ok(Endpoint::Unix(host.to_owned()))
        } else {
            tcp_endpoint(host, tls_verify)
        };
    };
    match scheme {
        "unix" if rest.is_empty() => Err("unix:// needs a socket path".to_owned()),
        "unix" => Ok(Endpoint::Unix(rest.to_owned())),
        "tcp" => tcp_endpoint(rest, tls_verify),
        "http" => Ok(Endpoint::Http(authority(rest, DEFAULT_HTTP_PORT)?)),
        "https" => Ok(Endpoint::Https(authority(rest, DEFAULT_TLS_PORT)?)),
        other => Err(format!(
            "unsupported DOCKER_HOST scheme `{other}://` (use unix://, tcp://, http://, https:// or a socket path)"
        )),
    }
}

/// A `tcp://` endpoint: TLS when `DOCKER_TLS_VERIFY` asks for it, as the docker CLI does.
fn tcp_endpoint(rest: &str, tls_verify: bool) -> Result<Endpoint, String> {
    if tls_verify {
        Ok(Endpoint::Https(authority(rest, DEFAULT_TLS_PORT)?))
    } else {
        Ok(Endpoint::Http(authority(rest, DEFAULT_HTTP_PORT)?))
    }
}

/// `host:port` from what follows the scheme, with the default port added when missing.
fn authority(rest: &str, default_port: u16) -> Result<String, String> {
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() {
        return Err("no host given".to_owned());
    }
    if rest.contains(['/', '?', '#', '@']) || rest.contains(char::is_whitespace) {
        return Err(format!("`{rest}` is not a host[:port]"));
    }
    // A colon after an IPv6 literal's closing bracket (or in a name) starts the port.
    let host_end = rest.rfind(']').map_or(0, |i| i + 1);
    match rest[host_end..].rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(rest.to_owned()),
        Some((_, port)) => Err(format!("`{port}` is not a port number")),
        None => Ok(format!("{rest}:{default_port}")),
    }
}

/// The folder holding the TLS files, as the docker CLI finds it.
fn cert_dir() -> Result<PathBuf, String> {
    if let Some(dir) = std::env::var_os("DOCKER_CERT_PATH").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir));
    }
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(|home| PathBuf::from(home).join(".docker"))
        .ok_or_else(|| "TLS needs DOCKER_CERT_PATH (or HOME for ~/.docker)".to_owned())
}

/// `ca.pem`, `cert.pem` and `key.pem` of `dir`, each checked to exist, so a
/// missing file is named now rather than surfacing as a handshake failure.
fn tls_files(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf), String> {
    let file = |name: &str| {
        let path = dir.join(name);
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "TLS needs {} (ca.pem, cert.pem and key.pem in DOCKER_CERT_PATH)",
                path.display()
            ))
        }
    };
    Ok((file("ca.pem")?, file("cert.pem")?, file("key.pem")?))
}

/// True for a plain Docker name (optionally with its leading `/`) or id: the
/// only strings put into a request path.
fn is_object_ref(text: &str) -> bool {
    let name = text.strip_prefix('/').unwrap_or(text);
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

/// [`EngineError::NotFound`] for a string that cannot name a container.
fn check_object_ref(op: &'static str, id: &str) -> Result<(), EngineError> {
    if is_object_ref(id) {
        Ok(())
    } else {
        Err(EngineError::NotFound {
            op,
            target: id.to_owned(),
        })
    }
}

/// The engine-side label filters of `filter`.
fn label_filters(filter: &ContainerFilter) -> HashMap<String, Vec<String>> {
    let mut labels = vec![
        format!("{LABEL_MANAGED}=true"),
        format!("{LABEL_INSTANCE}={}", filter.instance),
    ];
    if let Some(user_id) = &filter.user_id {
        labels.push(format!("{LABEL_USER_ID}={user_id}"));
    }
    HashMap::from([("label".to_owned(), labels)])
}

/// True when `labels` match `filter` exactly: the check that does not depend
/// on how the engine parses its filter syntax.
fn filter_matches<'a>(
    filter: &ContainerFilter,
    mut label: impl FnMut(&str) -> Option<&'a str>,
) -> bool {
    label(LABEL_MANAGED) == Some("true")
        && label(LABEL_INSTANCE) == Some(filter.instance.as_str())
        && filter
            .user_id
            .as_deref()
            .is_none_or(|user_id| label(LABEL_USER_ID) == Some(user_id))
}

/// Our summary of a listed container.
fn summary_from(container: BollardSummary) -> ContainerSummary {
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
fn primary_name(names: &[String]) -> String {
    let stripped = |n: &String| n.strip_prefix('/').unwrap_or(n).to_owned();
    names
        .iter()
        .find(|n| !n.trim_start_matches('/').contains('/'))
        .or(names.first())
        .map(stripped)
        .unwrap_or_default()
}

/// Our view of an inspected container.
fn observed_from(inspect: ContainerInspectResponse) -> ObservedContainer {
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
    }
}

/// The host port published in the container's configuration: a spec
/// publishes one port; should several be bound, the lowest TCP port's.
fn published_host_port(host_config: &HostConfig) -> Option<u16> {
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
fn docker_time(text: &str) -> Option<DateTime<Utc>> {
    let time = DateTime::parse_from_rfc3339(text).ok()?.with_timezone(&Utc);
    (time.year() > 1).then_some(time)
}

/// `18789/tcp`, Docker's key for a container's TCP port.
fn tcp_port_key(port: u16) -> String {
    format!("{port}/tcp")
}

/// The create request for `spec`.
fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
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
fn whole_seconds_i32(duration: Duration) -> i32 {
    let seconds = duration
        .as_secs()
        .saturating_add(u64::from(duration.subsec_nanos() > 0));
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

/// The request timeout of a call the engine answers only after `grace_seconds`.
fn request_timeout_after(grace_seconds: i32) -> Duration {
    REQUEST_TIMEOUT + Duration::from_secs(u64::try_from(grace_seconds).unwrap_or(0))
}

fn to_hash_map(labels: &BTreeMap<String, String>) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The networks named exactly `name` (the engine's name filter matches
/// substrings), oldest first, ties broken by id, so every caller picks the
/// same one of duplicates.
fn oldest_first(name: &str, networks: Vec<Network>) -> Vec<ObservedNetwork> {
    let mut named: Vec<(Option<DateTime<Utc>>, ObservedNetwork)> = networks
        .into_iter()
        .filter(|n| n.name.as_deref() == Some(name))
        .filter_map(|n| {
            let created = n.created.as_deref().and_then(docker_time);
            let options = n.options.unwrap_or_default().into_iter().collect();
            Some((created, ObservedNetwork { id: n.id?, options }))
        })
        .collect();
    // An unreadable creation time sorts last rather than winning.
    named.sort_by(|(a_time, a), (b_time, b)| {
        (a_time.is_none(), a_time, &a.id).cmp(&(b_time.is_none(), b_time, &b.id))
    });
    named.into_iter().map(|(_, network)| network).collect()
}

/// Nanoseconds since the epoch as Docker's `seconds.nanoseconds`.
fn docker_timestamp(nanos: i64) -> String {
    const NANOS_PER_SECOND: i64 = 1_000_000_000;
    format!(
        "{}.{:09}",
        nanos.div_euclid(NANOS_PER_SECOND),
        nanos.rem_euclid(NANOS_PER_SECOND)
    )
}

/// Our event for an engine message, or `None` for one outside `filter` (the
/// engine filtered already; this guards against a filter read differently).
fn event_from(filter: &ContainerFilter, message: EventMessage) -> Option<EngineEvent> {
    let actor = message.actor.unwrap_or_default();
    let attributes = actor.attributes.unwrap_or_default();
    if !filter_matches(filter, |key| attributes.get(key).map(String::as_str)) {
        return None;
    }
    let time_nanos = message
        .time_nano
        .or_else(|| message.time.map(|s| s.saturating_mul(1_000_000_000)))
        .unwrap_or_default();
    Some(EngineEvent {
        user_id: attributes.get(LABEL_USER_ID).cloned(),
        action: message.action.unwrap_or_default(),
        container_id: actor.id.unwrap_or_default(),
        time_nanos,
    })
}

/// Classifies a failure of `op` on `target` when no operation-specific reading applies.
fn classify(host: &str, op: &'static str, target: &str, err: BollardError) -> EngineError {
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
fn is_transport(err: &BollardError) -> bool {
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
fn create_failed(host: &str, spec: &ContainerSpec, err: BollardError) -> EngineError {
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
fn is_missing_image(message: &str) -> bool {
    message.to_ascii_lowercase().contains("no such image")
}

/// `message` with every environment value of `spec` that is a secret removed.
fn redact(spec: &ContainerSpec, message: String) -> String {
    spec.env
        .iter()
        .filter(|(_, value)| matches!(value, super::EnvValue::Secret(_)))
        .map(|(_, value)| value.expose())
        .filter(|secret| !secret.is_empty())
        .fold(message, |message, secret| message.replace(secret, REDACTED))
}

/// A pull failure: the engine's refusal, at any point of the pull, means the
/// image cannot be had; only a lost connection is something else.
fn pull_failed(host: &str, image: &str, err: BollardError) -> EngineError {
    match err {
        BollardError::DockerResponseServerError { message, .. }
        | BollardError::DockerStreamError { error: message } => EngineError::ImageNotFound {
            image: image.to_owned(),
            message,
        },
        err if is_transport(&err) => EngineError::Unreachable {
            host: host.to_owned(),
            message: error_chain(&err),
        },
        err => EngineError::ImageNotFound {
            image: image.to_owned(),
            message: error_chain(&err),
        },
    }
}

/// `Some(port)` when `message` says a host port is taken (with the port when
/// the message names it), `None` for any other message.
///
/// Engine 20.10 says `... Bind for 127.0.0.1:19000 failed: port is already
/// allocated` when another container holds the port, and `... Error starting
/// userland proxy: listen tcp4 127.0.0.1:19000: bind: address already in use`
/// when another process does.
fn port_conflict(message: &str) -> Option<Option<u16>> {
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
fn error_chain(err: &dyn StdError) -> String {
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
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::docker::{object_labels, Confinement, EnvValue, ResourceLimits, SecretString};

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn spec() -> ContainerSpec {
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
        }
    }

    fn server_error(status_code: u16, message: &str) -> BollardError {
        BollardError::DockerResponseServerError {
            status_code,
            message: message.to_owned(),
        }
    }

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

    #[test]
    fn a_pull_refusal_at_any_point_is_image_not_found() {
        let refused = pull_failed("h", "a:1", server_error(500, "no such host"));
        assert!(matches!(refused, EngineError::ImageNotFound { .. }));
        let mid_stream = pull_failed(
            "h",
            "a:1",
            BollardError::DockerStreamError {
                error: "manifest unknown".to_owned(),
            },
        );
        assert!(
            matches!(mid_stream, EngineError::ImageNotFound { ref message, .. } if message == "manifest unknown")
        );
        let lost = pull_failed("h", "a:1", BollardError::RequestTimeoutError);
        assert!(matches!(lost, EngineError::Unreachable { .. }));
    }

    #[test]
    fn docker_host_forms_are_read_as_the_docker_cli_reads_them() {
        let unix = |p: &str| Ok(Endpoint::Unix(p.to_owned()));
        let http = |a: &str| Ok(Endpoint::Http(a.to_owned()));
        let https = |a: &str| Ok(Endpoint::Https(a.to_owned()));
        assert_eq!(
            parse_docker_host("unix:///var/run/docker.sock", false),
            unix("/var/run/docker.sock")
        );
        assert_eq!(
            parse_docker_host("/var/run/docker.sock", false),
            unix("/var/run/docker.sock")
        );
        assert_eq!(
            parse_docker_host("tcp://10.0.0.1:2375", false),
            http("10.0.0.1:2375")
        );
        assert_eq!(
            parse_docker_host("tcp://10.0.0.1", false),
            http("10.0.0.1:2375")
        );
        assert_eq!(
            parse_docker_host("tcp://10.0.0.1", true),
            https("10.0.0.1:2376")
        );
        assert_eq!(
            parse_docker_host("http://docker:2375/", false),
            http("docker:2375")
        );
        assert_eq!(
            parse_docker_host("https://docker", false),
            https("docker:2376")
        );
        assert_eq!(
            parse_docker_host("tcp://[::1]:2375", false),
            http("[::1]:2375")
        );
        assert_eq!(parse_docker_host("tcp://[::1]", false), http("[::1]:2375"));
        assert_eq!(
            parse_docker_host("localhost:2375", false),
            http("localhost:2375")
        );
    }

    #[test]
    fn bad_docker_hosts_are_refused_with_a_reason() {
        for bad in [
            "ssh://user@host",
            "npipe:////./pipe/docker_engine",
            "unix://",
            "tcp://",
            "tcp://host:port",
            "tcp://host:0",
            "tcp://host:2375/path",
        ] {
            let err = parse_docker_host(bad, false).expect_err(bad);
            assert!(!err.is_empty(), "{bad}");
        }
        let err = parse_docker_host("ssh://user@host", false).unwrap_err();
        assert!(err.contains("ssh://"), "{err}");
    }

    #[tokio::test]
    async fn connect_names_the_host_it_could_not_use() {
        for host in ["ftp://example", "unix:///nonexistent/docker.sock"] {
            match DockerEngine::connect(host).await {
                Err(EngineError::Unreachable {
                    host: named,
                    message,
                }) => {
                    assert_eq!(named, host);
                    assert!(!message.is_empty());
                }
                other => panic!("{host}: {other:?}"),
            }
        }
    }

    #[test]
    fn missing_tls_files_are_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        let err = tls_files(dir.path()).unwrap_err();
        assert!(err.contains("ca.pem"), "{err}");
        for name in ["ca.pem", "cert.pem"] {
            std::fs::write(dir.path().join(name), "x").expect("write");
        }
        let err = tls_files(dir.path()).unwrap_err();
        assert!(err.contains("key.pem"), "{err}");
        std::fs::write(dir.path().join("key.pem"), "x").expect("write");
        assert!(tls_files(dir.path()).is_ok());
    }

    #[test]
    fn only_plain_names_and_ids_reach_a_request_path() {
        for good in ["mosaic-user-1", "/mosaic-user-1", "abc123", "a_b.c-d"] {
            assert!(is_object_ref(good), "{good}");
        }
        for bad in ["", "../images/json", "a/b", "a b", "-a", "a?b", "é"] {
            assert!(!is_object_ref(bad), "{bad}");
        }
    }

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
            "Config": { "Image": "img:1", "Labels": { "io.clawfleet.user-id": "1" } },
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
    fn oldest_network_of_the_exact_name_wins() {
        let network = |name: &str, id: &str, created: &str| Network {
            name: Some(name.to_owned()),
            id: Some(id.to_owned()),
            created: Some(created.to_owned()),
            ..Default::default()
        };
        let networks = vec![
            network("net", "b", "2024-01-01T00:00:02Z"),
            network("net-2", "z", "2023-01-01T00:00:00Z"),
            network("net", "c", "not a time"),
            network("net", "a", "2024-01-01T00:00:02Z"),
            network("net", "d", "2024-01-01T00:00:01.5+00:00"),
        ];
        let ids: Vec<String> = oldest_first("net", networks)
            .into_iter()
            .map(|n| n.id)
            .collect();
        assert_eq!(ids, ["d", "a", "b", "c"]);
    }

    #[test]
    fn since_is_written_as_seconds_dot_nanoseconds() {
        assert_eq!(
            docker_timestamp(1_700_000_000_000_000_123),
            "1700000000.000000123"
        );
        assert_eq!(docker_timestamp(0), "0.000000000");
    }

    #[test]
    fn events_outside_the_filter_are_dropped_and_ours_carry_the_user() {
        let filter = ContainerFilter {
            instance: "a".to_owned(),
            user_id: None,
        };
        let message = |instance: &str| -> EventMessage {
            serde_json::from_value(serde_json::json!({
                "Type": "container",
                "Action": "start",
                "Actor": { "ID": "abc", "Attributes": {
                    "io.clawfleet.managed": "true",
                    "io.clawfleet.instance": instance,
                    "io.clawfleet.user-id": "u=1, é",
                    "name": "x"
                } },
                "time": 1_700_000_000,
                "timeNano": 1_700_000_000_000_000_001_i64
            }))
            .expect("event json")
        };
        let event = event_from(&filter, message("a")).expect("our event");
        assert_eq!(event.user_id.as_deref(), Some("u=1, é"));
        assert_eq!(event.action, "start");
        assert_eq!(event.container_id, "abc");
        assert_eq!(event.time_nanos, 1_700_000_000_000_000_001);
        assert_eq!(event_from(&filter, message("b")), None);
    }

    #[test]
    fn label_filter_compares_values_exactly() {
        let filter = ContainerFilter {
            instance: "i".to_owned(),
            user_id: Some("1".to_owned()),
        };
        let labels = |user: &str| {
            let mut labels = object_labels("i", user);
            labels.insert("other".to_owned(), "x".to_owned());
            labels
        };
        let check = |l: &BTreeMap<String, String>| {
            filter_matches(&filter, |k| l.get(k).map(String::as_str))
        };
        assert!(check(&labels("1")));
        assert!(!check(&labels("10")));
        assert!(!check(&object_labels("j", "1")));
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
