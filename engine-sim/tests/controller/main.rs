//! clawfleet's controller, reconciler and event watcher against the
//! simulated engine: the tests that need an engine to misbehave on cue
//! (panic, fail a call, break its event stream) and no real Docker.
//!
//! They live here rather than in clawfleet's own unit tests because the
//! simulator depends on clawfleet, and a unit test of clawfleet cannot
//! depend on it in turn.

mod event_watcher;
mod panics;
mod reconcile_table;
mod transient_errors;
mod triggers;

use std::sync::Arc;
use std::time::Duration;

use clawfleet::config::{ContainerSettings, PortRange};
use clawfleet::controller::{Controller, Handle};
use clawfleet::docker::{Confinement, ResourceLimits};
use clawfleet::image_ref::{ImageAllowList, ImageRef};
use clawfleet::isolation::NetworkIsolation;
use clawfleet::ports::PortAllocator;
use clawfleet::reconcile::{Reconciler, ReconcilerOptions};
use clawfleet::secrets::{EncryptionKey, KeyRing};
use clawfleet::store::Store;
use clawfleet_engine_sim::MemoryEngine;

/// The image every user runs.
const IMAGE: &str = "agent:1";

/// Settings of a small fleet: ten ports, a short stop timeout.
fn settings() -> ContainerSettings {
    let image = ImageRef::parse(IMAGE).unwrap();
    ContainerSettings {
        instance: "panics".into(),
        allowed_images: ImageAllowList::of_repository(&image),
        image,
        network: "agents".into(),
        name_prefix: "agent-".into(),
        port_range: PortRange::new(19000, 19009).unwrap(),
        publish_ip: "127.0.0.1".parse().unwrap(),
        mosaic_api_url: "http://mosaic-api:3000/api".into(),
        stop_timeout: Duration::from_secs(1),
        limits: ResourceLimits::default(),
        confinement: Confinement::strict(),
        network_isolation: NetworkIsolation::Shared,
    }
}

/// A migrated SQLite store in a directory of its own (gone with the returned guard).
async fn sqlite_store() -> (Store, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/cf.db?mode=rwc", dir.path().display());
    let store = Store::connect(&url).await.unwrap();
    store.migrate().await.unwrap();
    (store, dir)
}

/// A reconciler of [`settings`] over `store` and `engine`, with a fresh key
/// and no host port probe.
fn reconciler(store: &Store, engine: &Arc<MemoryEngine>) -> Reconciler<MemoryEngine> {
    let settings = Arc::new(settings());
    Reconciler::new(
        store.clone(),
        engine.clone(),
        settings.clone(),
        KeyRing::new(vec![EncryptionKey::generate("t").unwrap()]).unwrap(),
        PortAllocator::new(settings.port_range, settings.publish_ip).without_probe(),
        ReconcilerOptions::default(),
    )
}

/// A controller running on its own task: its handle, the switch that stops
/// it, and the task to await once stopped.
struct Running {
    handle: Handle,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Spawns `controller`.
    fn spawn(controller: Controller<MemoryEngine>) -> Self {
        let handle = controller.handle();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(controller.run(async {
            let _ = stopped.await;
        }));
        Self { handle, stop, task }
    }

    /// Stops it and waits until it has stopped.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}
