//! An [`Engine`] wrapper that records the instant the controller issues each
//! mutating call (create, start, stop, restart, remove, rename), before the
//! wrapped engine sees it: the end mark of the latency measures.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clawfleet::docker::{
    ContainerFilter, ContainerSpec, ContainerSummary, Engine, EngineError, EngineEvent,
    EngineVersion, ObservedContainer, ObservedNetwork, Op,
};
use futures::stream::BoxStream;
use tokio::sync::mpsc;

/// One mutating call, as issued.
#[derive(Clone, Debug)]
pub struct Call {
    /// Which call.
    pub op: Op,
    /// The container id or name it was issued for (the new name for create).
    pub target: String,
    /// When the controller issued it.
    pub at: Instant,
}

/// `E`, with every mutating call recorded.
pub struct Recording<E> {
    inner: Arc<E>,
    calls: mpsc::UnboundedSender<Call>,
}

/// The calls a [`Recording`] engine saw, in order.
pub struct Calls(mpsc::UnboundedReceiver<Call>);

impl<E: Engine> Recording<E> {
    /// Wraps `inner`; the calls arrive on the returned [`Calls`].
    pub fn new(inner: Arc<E>) -> (Self, Calls) {
        let (calls, receiver) = mpsc::unbounded_channel();
        (Self { inner, calls }, Calls(receiver))
    }

    fn record(&self, op: Op, target: &str) {
        let _ = self.calls.send(Call {
            op,
            target: target.to_owned(),
            at: Instant::now(),
        });
    }
}

impl Calls {
    /// Forgets every call recorded so far; returns how many there were.
    pub fn drain(&mut self) -> usize {
        let mut n = 0;
        while self.0.try_recv().is_ok() {
            n += 1;
        }
        n
    }

    /// The next call, waiting until `deadline`.
    pub async fn next(&mut self, deadline: tokio::time::Instant) -> Option<Call> {
        tokio::time::timeout_at(deadline, self.0.recv())
            .await
            .ok()
            .flatten()
    }

    /// Waits up to `limit` for `op` on `target`; the calls before it are
    /// returned beside it (none is expected: the bench reports them).
    pub async fn wait_for(
        &mut self,
        op: Op,
        target: &str,
        limit: Duration,
    ) -> (Option<Instant>, Vec<Call>) {
        let mut others = Vec::new();
        let deadline = tokio::time::Instant::now() + limit;
        while let Some(call) = self.next(deadline).await {
            if call.op == op && call.target == target {
                return (Some(call.at), others);
            }
            others.push(call);
        }
        (None, others)
    }
}

impl<E: Engine> Engine for Recording<E> {
    async fn version(&self) -> Result<EngineVersion, EngineError> {
        self.inner.version().await
    }

    async fn list_containers(
        &self,
        filter: &ContainerFilter,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        self.inner.list_containers(filter).await
    }

    async fn list_by_name_prefix(
        &self,
        prefix: &str,
    ) -> Result<Vec<ContainerSummary>, EngineError> {
        self.inner.list_by_name_prefix(prefix).await
    }

    async fn inspect_container(
        &self,
        name_or_id: &str,
    ) -> Result<Option<ObservedContainer>, EngineError> {
        self.inner.inspect_container(name_or_id).await
    }

    async fn create_container(&self, spec: &ContainerSpec) -> Result<String, EngineError> {
        self.record(Op::Create, &spec.name);
        self.inner.create_container(spec).await
    }

    async fn start_container(&self, id: &str) -> Result<(), EngineError> {
        self.record(Op::Start, id);
        self.inner.start_container(id).await
    }

    async fn stop_container(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        self.record(Op::Stop, id);
        self.inner.stop_container(id, timeout).await
    }

    async fn restart_container(&self, id: &str, timeout: Duration) -> Result<(), EngineError> {
        self.record(Op::Restart, id);
        self.inner.restart_container(id, timeout).await
    }

    async fn remove_container(&self, id: &str) -> Result<(), EngineError> {
        self.record(Op::Remove, id);
        self.inner.remove_container(id).await
    }

    async fn rename_container(&self, id: &str, new_name: &str) -> Result<(), EngineError> {
        self.record(Op::Rename, id);
        self.inner.rename_container(id, new_name).await
    }

    async fn ensure_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>, EngineError> {
        self.inner.ensure_volume(name, labels).await
    }

    async fn inspect_volume(
        &self,
        name: &str,
    ) -> Result<Option<BTreeMap<String, String>>, EngineError> {
        self.inner.inspect_volume(name).await
    }

    async fn ensure_network(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> Result<ObservedNetwork, EngineError> {
        self.inner.ensure_network(name, labels, options).await
    }

    async fn inspect_network(&self, name: &str) -> Result<Option<ObservedNetwork>, EngineError> {
        self.inner.inspect_network(name).await
    }

    async fn image_present(&self, image: &str) -> Result<bool, EngineError> {
        self.inner.image_present(image).await
    }

    async fn pull_image(&self, image: &str) -> Result<(), EngineError> {
        self.inner.pull_image(image).await
    }

    fn events(
        &self,
        filter: &ContainerFilter,
        since_nanos: Option<i64>,
    ) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        self.inner.events(filter, since_nanos)
    }
}
