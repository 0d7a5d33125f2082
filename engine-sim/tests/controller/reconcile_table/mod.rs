//! Every row of the README's "What a reconcile does" table, one test each,
//! against the whole controller (queue, event watcher, workers, reconciler)
//! on the in-memory engine, in virtual time.
//!
//! Time moves only when a test says so. Tokio's paused clock normally
//! auto-advances to the next timer whenever the runtime is idle, and it is
//! idle whenever SQLite works: sqlx runs SQLite on a thread of its own, not
//! on the runtime. A query in flight would then let the clock jump, even to
//! its own pool's acquire timeout (5 s), which then fails the query. So a
//! [`Fleet`] keeps a blocking task parked for its whole life, which tokio
//! documents as holding auto-advance off (`tokio::time::pause`, "Preventing
//! auto-advance"), and moves the clock with [`Fleet::advance`] only when no
//! reconcile is queued or running. Waiting for the controller is a real-time
//! poll with a generous deadline, never a virtual sleep.
//!
//! The change feed and the full resync poll the database on timers of their
//! own; a poll in flight while the clock moves would be hit the same way,
//! so both are given periods no test reaches, and a test hands a user whose
//! row it changed to the queue itself, as the feed would
//! ([`Fleet::changed`]). Docker events still reach the queue on their own.
//! The feed's first poll may still come after a test's first write and hand
//! that user on once more; a test that must see exactly one reconcile of a
//! row writes it before the controller starts ([`Fleet::start_with_rows`]).

mod crashes;
mod creation;
mod failures;
mod refusals;
mod removal;
mod replacement;
mod stop_start;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use clawfleet::clock::Clock;
use clawfleet::config::ContainerSettings;
use clawfleet::controller::{Controller, ControllerOptions, Handle, Observers, ReconcileObserver};
use clawfleet::docker::ObservedContainer;
use clawfleet::feed::FeedOptions;
use clawfleet::naming::container_name;
use clawfleet::ports::PortAllocator;
use clawfleet::reconcile::{Reconciler, ReconcilerOptions};
use clawfleet::secrets::{EncryptionKey, KeyRing};
use clawfleet::status::ContainerStatus;
use clawfleet::store::{DesiredUpdate, Store};
use clawfleet_engine_sim::MemoryEngine;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{settings, IMAGE};

/// Longer than any test runs in virtual time.
const NEVER: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// How long (real time) a test waits for the controller before it fails.
const PATIENCE: Duration = Duration::from_secs(60);

/// Counts finished reconciles and their results.
#[derive(Default)]
struct Reconciles {
    total: AtomicUsize,
    errors: AtomicUsize,
}

impl ReconcileObserver for Reconciles {
    fn reconciled(&self, result: &'static str, _kind: Option<&'static str>, _seconds: f64) {
        if result == "error" {
            self.errors.fetch_add(1, Ordering::SeqCst);
        }
        self.total.fetch_add(1, Ordering::SeqCst);
    }
}

/// Holds tokio's auto-advance off while it lives (see the module docs).
struct ClockHold {
    release: Option<std::sync::mpsc::Sender<()>>,
}

impl ClockHold {
    fn new() -> Self {
        let (release, parked) = std::sync::mpsc::channel::<()>();
        // Its end is never awaited: dropping the sender lets it return.
        drop(tokio::task::spawn_blocking(move || {
            let _ = parked.recv();
        }));
        Self {
            release: Some(release),
        }
    }
}

impl Drop for ClockHold {
    fn drop(&mut self) {
        self.release.take();
    }
}

/// A running controller on a simulated engine and a SQLite database, in
/// virtual time.
pub(crate) struct Fleet {
    pub store: Store,
    pub engine: Arc<MemoryEngine>,
    pub clock: Clock,
    pub settings: Arc<ContainerSettings>,
    handle: Handle,
    reconciles: Arc<Reconciles>,
    stop: Option<oneshot::Sender<()>>,
    running: Option<JoinHandle<()>>,
    _hold: ClockHold,
    _dir: tempfile::TempDir,
}

impl Fleet {
    /// A fleet with the shared test settings. Call from a test with paused time.
    pub async fn start() -> Self {
        Self::start_with(settings(), |_| {}).await
    }

    /// A fleet with `settings`, whose engine `prepare` sets up before the
    /// controller's first full sync.
    pub async fn start_with(
        settings: ContainerSettings,
        prepare: impl FnOnce(&MemoryEngine),
    ) -> Self {
        Self::launch(settings, prepare, &[]).await
    }

    /// A fleet with the shared test settings whose database holds `rows`
    /// before the controller starts: its first full sync reconciles them,
    /// and the change feed, which starts from the newest revision, never
    /// hands them on a second time.
    pub async fn start_with_rows(rows: &[DesiredUpdate]) -> Self {
        Self::launch(settings(), |_| {}, rows).await
    }

    async fn launch(
        settings: ContainerSettings,
        prepare: impl FnOnce(&MemoryEngine),
        rows: &[DesiredUpdate],
    ) -> Self {
        let hold = ClockHold::new();
        let clock = Clock::starting_at(Utc::now().trunc_subsecs(0));
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}/table.db?mode=rwc", dir.path().display());
        let store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        for row in rows {
            store.upsert_desired(row).await.unwrap();
        }
        let engine = Arc::new(MemoryEngine::new().with_clock(move || clock.wall()));
        engine.add_image(IMAGE);
        prepare(&engine);
        let settings = Arc::new(settings);
        let reconciler = Reconciler::new(
            store.clone(),
            engine.clone(),
            settings.clone(),
            KeyRing::new(vec![EncryptionKey::generate("table").unwrap()]).unwrap(),
            PortAllocator::new(settings.port_range, settings.publish_ip)
                .without_probe()
                .with_clock(clock),
            ReconcilerOptions::default(),
        )
        .with_clock(clock);
        let reconciles = Arc::new(Reconciles::default());
        let observers = Observers {
            reconciles: reconciles.clone(),
            ..Observers::default()
        };
        let options = ControllerOptions {
            resync_period: NEVER,
            feed: FeedOptions {
                poll_interval: NEVER,
                ..FeedOptions::default()
            },
            clock,
            ..ControllerOptions::default()
        };
        let controller = Controller::new(store.clone(), reconciler, options, observers);
        let handle = controller.handle();
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(controller.run(async {
            let _ = stopped.await;
        }));
        let fleet = Self {
            store,
            engine,
            clock,
            settings,
            handle,
            reconciles,
            stop: Some(stop),
            running: Some(running),
            _hold: hold,
            _dir: dir,
        };
        fleet
            .until("the first full sync", || fleet.handle.progress.synced())
            .await;
        fleet.settle().await;
        fleet
    }

    /// Stops the controller and waits for it (in-flight reconciles finish).
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(running) = self.running.take() {
            running.await.unwrap();
        }
    }

    /// The container name of `user`.
    pub fn name(&self, user: &str) -> String {
        container_name(&self.settings.name_prefix, user)
    }

    /// The state volume name of `user`.
    pub fn volume(&self, user: &str) -> String {
        clawfleet::naming::volume_name(&self.settings.name_prefix, user)
    }

    /// `user`'s container as the engine holds it.
    pub fn container(&self, user: &str) -> Option<ObservedContainer> {
        self.engine.container(&self.name(user))
    }

    /// `user`'s status row.
    pub async fn status(&self, user: &str) -> Option<ContainerStatus> {
        self.store.status(user).await.unwrap()
    }

    /// The virtual wall time now.
    pub fn now(&self) -> DateTime<Utc> {
        self.clock.wall()
    }

    /// Reconciles that ended in an error so far.
    pub fn errors(&self) -> usize {
        self.reconciles.errors.load(Ordering::SeqCst)
    }

    /// Writes `update` and hands the user to the queue, as the change feed
    /// does, then waits until that reconcile and all it caused are done.
    pub async fn write(&self, update: DesiredUpdate) {
        self.store.upsert_desired(&update).await.unwrap();
        self.changed(&update.user_id).await;
    }

    /// Sets `user`'s desired state and hands the user to the queue.
    pub async fn set_state(&self, user: &str, state: clawfleet::desired::DesiredState) {
        self.store.set_state(user, state).await.unwrap();
        self.changed(user).await;
    }

    /// Hands `user` to the queue, as the change feed does for a changed
    /// row, and waits until the reconcile and all it caused are done.
    pub async fn changed(&self, user: &str) {
        let before = self.reconciles.total.load(Ordering::SeqCst);
        self.handle
            .queue
            .add(user.to_owned(), clawfleet::queue::Trigger::RowChange);
        self.reconciled_since(before).await;
    }

    /// Waits until a reconcile finished after `before` were counted, then
    /// until the controller is idle.
    pub async fn reconciled_since(&self, before: usize) {
        self.until("a reconcile", || {
            self.reconciles.total.load(Ordering::SeqCst) > before
        })
        .await;
        self.settle().await;
    }

    /// Reconciles finished so far (to pass to [`reconciled_since`](Self::reconciled_since)).
    pub fn reconciles(&self) -> usize {
        self.reconciles.total.load(Ordering::SeqCst)
    }

    /// Runs `act` (something done to the engine behind the controller's
    /// back) and waits until the reconcile its Docker event causes is done.
    pub async fn behind_its_back(&self, act: impl FnOnce(&MemoryEngine)) {
        let before = self.reconciles();
        act(&self.engine);
        self.reconciled_since(before).await;
    }

    /// Moves virtual time on by `by`, once no reconcile is queued or
    /// running, and waits until every reconcile that came due is done.
    pub async fn advance(&self, by: Duration) {
        self.settle().await;
        // No await between the idle check and the jump: nothing can start
        // a query in between.
        tokio::time::advance(by).await;
        self.settle().await;
    }

    /// Waits until no key is ready or being processed (due keys count as ready).
    pub async fn settle(&self) {
        self.until("the controller to be idle", || {
            let stats = self.handle.queue.stats();
            stats.ready == 0 && stats.processing == 0
        })
        .await;
    }

    /// Waits (in real time, up to [`PATIENCE`]) until `done` holds.
    pub async fn until(&self, what: &str, mut done: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + PATIENCE;
        while !done() {
            assert!(
                std::time::Instant::now() < deadline,
                "gave up waiting for {what}"
            );
            real_pause().await;
        }
    }
}

/// Gives the controller's tasks and SQLite's thread a moment of real time
/// without moving virtual time (a blocking task holds auto-advance off).
async fn real_pause() {
    tokio::task::spawn_blocking(|| std::thread::sleep(Duration::from_millis(1)))
        .await
        .unwrap();
}

/// A row for `user` with the default image, desired running.
pub(crate) fn running(user: &str) -> DesiredUpdate {
    DesiredUpdate {
        user_id: user.into(),
        ..DesiredUpdate::default()
    }
}

/// A container `user`'s name would have, made behind the controller's back
/// with `labels`, mounting `user`'s state volume.
pub(crate) fn made_by_hand(
    settings: &ContainerSettings,
    user: &str,
    labels: std::collections::BTreeMap<String, String>,
) -> clawfleet::docker::ContainerSpec {
    clawfleet::docker::ContainerSpec {
        name: container_name(&settings.name_prefix, user),
        image: IMAGE.to_owned(),
        env: Vec::new(),
        labels,
        volume: clawfleet::naming::volume_name(&settings.name_prefix, user),
        mount_path: clawfleet::spec::STATE_PATH.to_owned(),
        network: settings.network.clone(),
        port: clawfleet::spec::GATEWAY_PORT,
        publish: None,
        stop_timeout: Duration::from_secs(10),
        limits: clawfleet::docker::ResourceLimits::default(),
        confinement: clawfleet::docker::Confinement::unconfined(),
        node: None,
    }
}
