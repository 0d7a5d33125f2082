//! [`Engine`](super::Engine) on a real Docker engine, through bollard.
//!
//! This module owns three translations and nothing else: a `DOCKER_HOST`
//! string into a connected, version-negotiated client ([`connect`]); the
//! project's types into bollard's models and back ([`containers`],
//! [`networks`], [`images`], [`events`], with the label and name checks of
//! [`filters`]); and bollard's errors into [`EngineError`] ([`errors`]). The
//! trait's calls are all here, each a short request and its reading.
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

mod connect;
pub(in crate::docker) mod containers;
pub(in crate::docker) mod errors;
pub(in crate::docker) mod events;
pub(in crate::docker) mod filters;
#[cfg(test)]
pub(in crate::docker) mod fixtures;
mod images;
mod networks;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bollard::errors::Error as BollardError;
use bollard::models::VolumeCreateRequest;
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, EventsOptionsBuilder,
    InspectContainerOptions, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    RenameContainerOptionsBuilder, RestartContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use bollard::Docker;
use futures::stream::{self, BoxStream, StreamExt};

use super::{
    ContainerFilter, ContainerSpec, ContainerSummary, Engine, EngineError, EngineEvent,
    EngineVersion, ObservedContainer, ObservedNetwork,
};
use crate::image_ref::ImageRef;
use containers::{
    create_body, observed_from, request_timeout_after, summary_from, whole_seconds_i32,
};
use errors::{classify, create_failed};
use events::{docker_timestamp, event_from};
use filters::{check_object_ref, filter_matches, is_object_ref, label_filters, name_pattern};
use images::pull_failed;
use networks::NETWORK_SETTLE_QUIET;

/// The endpoint used when the configured host (`DOCKER_HOST`) is empty.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// How long an ordinary request may wait for the engine's answer (bollard's default).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// A Docker engine reached through bollard. Cheap to clone: clones share one
/// connection pool, the negotiated API version and the network-creation lock.
#[derive(Clone, Debug)]
pub struct DockerEngine {
    docker: Docker,
    host: String,
    /// Makes network creation single-flight among this engine's clones;
    /// across processes, settling on the oldest network makes callers agree.
    network_creation: Arc<tokio::sync::Mutex<()>>,
    /// Networks it creates are attachable Swarm overlays, not bridges.
    overlay: bool,
}

impl DockerEngine {
    /// This engine, creating the agents' network as an attachable overlay
    /// (the Swarm backend's; README "Running on Docker Swarm").
    pub fn with_overlay_networks(self) -> Self {
        Self {
            overlay: true,
            ..self
        }
    }

    /// The bollard client, for the Swarm backend's calls.
    pub(in crate::docker) fn client(&self) -> &Docker {
        &self.docker
    }

    /// Classifies a failed call `op` on `target` by what went wrong, before
    /// any operation-specific reading of the engine's answer.
    pub(in crate::docker) fn fail(
        &self,
        op: &'static str,
        target: &str,
        err: BollardError,
    ) -> EngineError {
        classify(&self.host, op, target, err)
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

    async fn list_by_name_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        // The engine's `name` filter matches anywhere in the name, as a
        // pattern: it only narrows the answer, which is checked here exactly.
        let filters = HashMap::from([("name".to_owned(), vec![name_pattern(prefix)])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|err| self.fail("list", prefix, err))?;
        Ok(containers
            .into_iter()
            .map(summary_from)
            .filter(|c| c.name.starts_with(prefix))
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

fn to_hash_map(labels: &BTreeMap<String, String>) -> HashMap<String, String> {
    labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}
