//! An [`Engine`] wrapper that reports every call's operation, outcome and
//! latency to an [`EngineObserver`] (the metrics), and otherwise passes
//! everything through untouched.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::BoxStream;
use futures::StreamExt;

use super::{
    ContainerFilter, ContainerSpec, ContainerSummary, Engine, EngineError, EngineEvent,
    EngineVersion, ObservedContainer, ObservedNetwork, Op,
};

/// Receives one report per engine call.
pub trait EngineObserver: Send + Sync {
    /// `op` finished (`ok` or not) after `seconds`.
    fn request(&self, op: Op, ok: bool, seconds: f64);
}

/// `E` with every call reported to an observer.
pub struct Instrumented<E> {
    inner: E,
    observer: Arc<dyn EngineObserver>,
}

impl<E: Engine> Instrumented<E> {
    /// Wraps `inner`.
    pub fn new(inner: E, observer: Arc<dyn EngineObserver>) -> Self {
        Self { inner, observer }
    }

    /// The wrapped engine.
    pub fn inner(&self) -> &E {
        &self.inner
    }

    async fn timed<T>(
        &self,
        op: Op,
        call: impl std::future::Future<Output = Result<T, EngineError>>,
    ) -> Result<T, EngineError> {
        let started = Instant::now();
        let result = call.await;
        self.observer
            .request(op, result.is_ok(), started.elapsed().as_secs_f64());
        result
    }
}

impl<E: Engine> Engine for Instrumented<E> {
    async fn version(&self) -> Result<EngineVersion, EngineError> {
        self.timed(Op::Version, self.inner.version()).await
    }

    async fn list_containers(
        &self,
        filter: &ContainerFilter,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        self.timed(Op::List, self.inner.list_containers(filter))
            .await
    }

    async fn list_by_name_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        self.timed(Op::List, self.inner.list_by_name_prefix(prefix))
            .await
    }

    async fn inspect_container(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ObservedContainer>, EngineError> {
        self.timed(Op::Inspect, self.inner.inspect_container(name_or_id))
            .await
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        self.timed(Op::Create, self.inner.create_container(spec))
            .await
    }

    async fn start_container(&self, id: &str) -> Result<(), EngineError> {
        self.timed(Op::Start, self.inner.start_container(id)).await
    }

    async fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        self.timed(Op::Stop, self.inner.stop_container(id, timeout))
            .await
    }

    async fn restart_container(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        self.timed(Op::Restart, self.inner.restart_container(id, timeout))
            .await
    }

    async fn remove_container(&self, id: &str) -> Result<(), EngineError> {
        self.timed(Op::Remove, self.inner.remove_container(id))
            .await
    }

    async fn rename_container(&self, id: &str, new_name: &str) -> Result<(), EngineError> {
        self.timed(Op::Rename, self.inner.rename_container(id, new_name))
            .await
    }

    fn updates_in_place(&self) -> bool {
        self.inner.updates_in_place()
    }

    async fn update_container(
        &self,
        id: &str,
        spec: &ContainerSpec,
    ) -> Result<String, EngineError> {
        self.timed(Op::Update, self.inner.update_container(id, spec))
            .await
    }

    fn pins_volumes(&self) -> bool {
        self.inner.pins_volumes()
    }

    async fn pin_container(&self, id: &str, node: &str) -> Result<(), EngineError> {
        self.timed(Op::Pin, self.inner.pin_container(id, node))
            .await
    }

    async fn ensure_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, EngineError> {
        self.timed(Op::EnsureVolume, self.inner.ensure_volume(name, labels))
            .await
    }

    async fn inspect_volume(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, EngineError> {
        self.timed(Op::InspectVolume, self.inner.inspect_volume(name))
            .await
    }

    async fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<ObservedNetwork, EngineError> {
        self.timed(
            Op::EnsureNetwork,
            self.inner.ensure_network(name, labels, options),
        )
        .await
    }

    async fn inspect_network(&self, name: &str) -> Result<Option<ObservedNetwork>, EngineError> {
        self.timed(Op::InspectNetwork, self.inner.inspect_network(name))
            .await
    }

    async fn image_present(&self, image: &str) -> Result<bool, EngineError> {
        self.timed(Op::ImagePresent, self.inner.image_present(image))
            .await
    }

    async fn pull_image(&self, image: &str) -> Result<(), EngineError> {
        self.timed(Op::Pull, self.inner.pull_image(image)).await
    }

    fn events(
        &self,
        filter: &ContainerFilter,
        since_nanos: Option<i64>,
    ) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        let observer = self.observer.clone();
        let mut reported = false;
        self.inner
            .events(filter, since_nanos)
            .inspect(move |item| {
                // One request per subscription: reported at its first item or failure.
                if !reported {
                    reported = true;
                    observer.request(Op::Events, item.is_ok(), 0.0);
                }
            })
            .boxed()
    }
}
