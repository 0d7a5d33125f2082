//! What the reconciler's unit tests share: a fixed instant, containers, a
//! store in a temporary directory, and a stub engine that answers from
//! fixed values and records the calls made on it. (The in-memory engine is
//! a crate of its own that depends on this one, so it cannot serve here.)

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use futures::stream::BoxStream;

use super::{Reconciler, ReconcilerOptions};
use crate::config::PortRange;
use crate::docker::{
    object_labels, ContainerFilter, ContainerSpec, ContainerSummary, Engine, EngineError,
    EngineEvent, EngineVersion, ObservedContainer, ObservedNetwork, RunState,
};
use crate::ports::PortAllocator;
use crate::secrets::{EncryptionKey, KeyRing};
use crate::store::Store;

/// The instant the tests run at.
pub(super) fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 29, 12, 0, 0).unwrap()
}

/// `s` seconds.
pub(super) fn secs(s: i64) -> chrono::Duration {
    chrono::Duration::seconds(s)
}

/// Alice's container, ours, in `state`, last started at `started_at`.
pub(super) fn container(state: RunState, started_at: DateTime<Utc>) -> ObservedContainer {
    ObservedContainer {
        id: "c1".into(),
        name: "mosaic-user-alice".into(),
        labels: object_labels("default", "alice"),
        image: "img".into(),
        state,
        exit_code: (state == RunState::Exited).then_some(1),
        health: crate::docker::ContainerHealth::None,
        started_at: Some(started_at),
        finished_at: None,
        host_port: None,
        env: BTreeMap::new(),
        placement: Default::default(),
    }
}

/// An engine that answers from its fields and records what it is asked to do.
#[derive(Default)]
pub(super) struct StubEngine {
    /// What `list_containers` returns.
    pub labelled: Vec<ContainerSummary>,
    /// What `inspect_container` returns, for any name or id.
    pub inspected: Option<ObservedContainer>,
    /// The labels of every volume; `None`: the labels it is asked to create with.
    pub volume_labels: Option<BTreeMap<String, String>>,
    /// `start_container` refuses with this port taken.
    pub port_taken: Option<u16>,
    /// The calls that change something, in order (`create NAME`, `start ID`, …).
    pub calls: Mutex<Vec<String>>,
}

impl StubEngine {
    fn record(&self, call: String) {
        self.calls.lock().unwrap().push(call);
    }

    fn done(&self, call: String) -> impl Future<Output = Answer<()>> + Send {
        self.record(call);
        ok(())
    }

    /// The calls made so far.
    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }
}

/// What the engine answers.
type Answer<T> = Result<T, EngineError>;

fn ok<T: Send>(value: T) -> impl Future<Output = Answer<T>> + Send {
    std::future::ready(Ok(value))
}

impl Engine for StubEngine {
    fn version(&self) -> impl Future<Output = Answer<EngineVersion>> + Send {
        ok(EngineVersion {
            version: "stub".into(),
            api_version: "1.41".into(),
        })
    }

    fn list_containers(
        &self,
        _: &ContainerFilter,
    ) -> impl Future<Output = Answer<Vec<ContainerSummary>>> + Send {
        ok(self.labelled.clone())
    }

    fn list_by_name_prefix(
        &self,
        _: &str,
    ) -> impl Future<Output = Answer<Vec<ContainerSummary>>> + Send {
        ok(self.labelled.clone())
    }

    fn inspect_container(
        &self,
        _: &str,
    ) -> impl Future<Output = Answer<Option<ObservedContainer>>> + Send {
        ok(self.inspected.clone())
    }

    fn create_container(
        &self,
        spec: &ContainerSpec,
    ) -> impl Future<Output = Answer<String>> + Send {
        self.record(format!("create {}", spec.name));
        ok(format!("id-{}", spec.name))
    }

    fn start_container(&self, id: &str) -> impl Future<Output = Answer<()>> + Send {
        self.record(format!("start {id}"));
        std::future::ready(match self.port_taken {
            Some(port) => Err(EngineError::PortAllocated {
                port: Some(port),
                message: "port is already allocated".into(),
            }),
            None => Ok(()),
        })
    }

    fn stop_container(&self, id: &str, _: Duration) -> impl Future<Output = Answer<()>> + Send {
        self.done(format!("stop {id}"))
    }

    fn restart_container(&self, id: &str, _: Duration) -> impl Future<Output = Answer<()>> + Send {
        self.done(format!("restart {id}"))
    }

    fn remove_container(&self, id: &str) -> impl Future<Output = Answer<()>> + Send {
        self.done(format!("remove {id}"))
    }

    fn rename_container(
        &self,
        id: &str,
        new_name: &str,
    ) -> impl Future<Output = Answer<()>> + Send {
        self.done(format!("rename {id} {new_name}"))
    }

    fn ensure_volume(
        &self,
        _: &str,
        labels: &BTreeMap<String, String>,
    ) -> impl Future<Output = Answer<BTreeMap<String, String>>> + Send {
        ok(self.volume_labels.clone().unwrap_or_else(|| labels.clone()))
    }

    fn inspect_volume(
        &self,
        _: &str,
    ) -> impl Future<Output = Answer<Option<BTreeMap<String, String>>>> + Send {
        ok(self.volume_labels.clone())
    }

    fn ensure_network(
        &self,
        _: &str,
        _: &BTreeMap<String, String>,
        options: &BTreeMap<String, String>,
    ) -> impl Future<Output = Answer<ObservedNetwork>> + Send {
        ok(ObservedNetwork {
            id: "net1".into(),
            driver: "bridge".into(),
            attachable: true,
            options: options.clone(),
        })
    }

    fn inspect_network(
        &self,
        _: &str,
    ) -> impl Future<Output = Answer<Option<ObservedNetwork>>> + Send {
        ok(None)
    }

    fn image_present(&self, _: &str) -> impl Future<Output = Answer<bool>> + Send {
        ok(true)
    }

    fn pull_image(&self, _: &str) -> impl Future<Output = Answer<()>> + Send {
        ok(())
    }

    fn events(
        &self,
        _: &ContainerFilter,
        _: Option<i64>,
    ) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        Box::pin(futures::stream::empty())
    }
}

/// The first port of the tests' range.
pub(super) const FIRST_PORT: u16 = 19000;

/// A reconciler over `engine` and a fresh SQLite database (in the returned
/// directory), with ports 19000–19009 and the default settings.
pub(super) async fn reconciler(engine: StubEngine) -> (Reconciler<StubEngine>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/r.db?mode=rwc", dir.path().display());
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    let settings = crate::spec::tests::settings();
    let ports = PortAllocator::new(
        PortRange::new(FIRST_PORT, FIRST_PORT + 9).unwrap(),
        settings.publish_ip,
    )
    .without_probe();
    let keys = KeyRing::new(vec![EncryptionKey::generate("t").unwrap()]).unwrap();
    let reconciler = Reconciler::new(
        store,
        Arc::new(engine),
        Arc::new(settings),
        keys,
        ports,
        ReconcilerOptions::default(),
    );
    (reconciler, dir)
}

/// Alice's valid row at `revision`, wanting `state`.
pub(super) fn desired(
    state: crate::desired::DesiredState,
    revision: i64,
) -> crate::store::DesiredRow {
    Ok(crate::desired::DesiredContainer {
        user_id: "alice".into(),
        state,
        idle_timeout: None,
        last_active_at: None,
        image: None,
        restart_nonce: 0,
        revision,
    })
}

/// A pass over alice at [`now`] with these rows.
pub(super) fn pass(
    desired: Option<crate::store::DesiredRow>,
    previous: Option<crate::status::ContainerStatus>,
) -> super::Pass<'static> {
    super::Pass::begin(
        "alice",
        "mosaic-user-alice".into(),
        desired,
        previous,
        now(),
        super::Priority::Bulk,
    )
}

/// Alice's names today.
pub(super) fn names() -> crate::naming::UserNames {
    crate::naming::UserNames::current("mosaic-user-", "alice")
}
