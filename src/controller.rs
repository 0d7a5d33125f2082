//! Wires the loop together: the event watcher, the desired-row feed and the
//! resync timer feed user ids into the work queue; workers reconcile them.
//!
//! ```text
//!  desired feed ──┐
//!  docker events ─┼─▶ work queue (dedup, back-off, timers) ─▶ workers ─▶ Reconciler
//!  resync timer ──┤
//!  API (Nudge) ───┘
//! ```
//!
//! Each source queues its users with its [`Trigger`]; the reconcile span
//! carries it (field `trigger`) and [`ReconcileObserver::triggered`] counts it.
//!
//! Shutting down stops new work, lets in-flight reconciles finish (bounded
//! by a timeout) and leaves every user's container as it is.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tracing::{info, warn, Instrument};

use crate::clock::Clock;
use crate::docker::Engine;
use crate::events::{self, EventObserver};
use crate::feed::{self, FeedOptions};
use crate::progress::{Progress, ProgressSummary};
use crate::queue::{
    run_workers, BackoffPolicy, Lane, NoQueueObserver, QueueObserver, Trigger, WorkOutcome,
    WorkQueue,
};
use crate::reconcile::{Priority, Reconciler};
use crate::resync;
use crate::store::Store;

/// How often progress is logged while something changes.
const PROGRESS_LOG_PERIOD: Duration = Duration::from_secs(10);

/// Reconciles running at once by default (`--concurrency`).
pub const DEFAULT_CONCURRENCY: usize = 16;

/// Settings of the loop around the reconciler.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Reconciles at once.
    pub concurrency: usize,
    /// Period of the full resync.
    pub resync_period: Duration,
    /// The desired-row feed.
    pub feed: FeedOptions,
    /// Retry back-off of failed reconciles.
    pub backoff: BackoffPolicy,
    /// How long shutdown waits for in-flight reconciles.
    pub shutdown_timeout: Duration,
    /// The clock of the queue, the feed and the event subscription; give
    /// the reconciler and its port allocator the same one (client-go's
    /// queue config carries its clock the same way).
    pub clock: Clock,
}

impl Default for ControllerOptions {
    fn default() -> Self {
        Self {
            concurrency: DEFAULT_CONCURRENCY,
            resync_period: Duration::from_secs(300),
            feed: FeedOptions::default(),
            backoff: BackoffPolicy::default(),
            shutdown_timeout: Duration::from_secs(30),
            clock: Clock::system(),
        }
    }
}

/// Hooks for metrics (the defaults do nothing).
#[derive(Clone)]
pub struct Observers {
    /// Work queue events.
    pub queue: Arc<dyn QueueObserver>,
    /// Docker event stream events.
    pub events: Arc<dyn EventObserver>,
    /// Reconcile results.
    pub reconciles: Arc<dyn ReconcileObserver>,
}

impl Default for Observers {
    fn default() -> Self {
        Self {
            queue: Arc::new(NoQueueObserver),
            events: Arc::new(events::NoEventObserver),
            reconciles: Arc::new(NoReconcileObserver),
        }
    }
}

/// Receives reconcile results and resync times.
pub trait ReconcileObserver: Send + Sync {
    /// A reconcile finished after `seconds` with `result` (`success`,
    /// `requeue_after`, `error`) and, on error, its `kind`.
    fn reconciled(&self, _result: &'static str, _error_kind: Option<&'static str>, _seconds: f64) {}
    /// A full resync listed `users` users.
    fn resynced(&self, _users: usize) {}
    /// A reconcile began because of `trigger`.
    fn triggered(&self, _trigger: Trigger) {}
}

/// A reconcile observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReconcileObserver;

impl ReconcileObserver for NoReconcileObserver {}

/// The running loop's shared parts, for the HTTP surface.
#[derive(Clone)]
pub struct Handle {
    /// Convergence bookkeeping.
    pub progress: Arc<Progress>,
    /// The work queue.
    pub queue: Arc<WorkQueue<String>>,
}

/// The controller: a reconciler plus the streams that tell it whom to look at.
pub struct Controller<E: Engine> {
    store: Store,
    reconciler: Arc<Reconciler<E>>,
    options: ControllerOptions,
    observers: Observers,
    handle: Handle,
}

impl<E: Engine> Controller<E> {
    /// A controller around `reconciler`.
    pub fn new(
        store: Store,
        reconciler: Reconciler<E>,
        options: ControllerOptions,
        observers: Observers,
    ) -> Self {
        let queue = Arc::new(WorkQueue::with_clock(
            options.clock,
            options.backoff,
            observers.queue.clone(),
        ));
        Self {
            store,
            reconciler: Arc::new(reconciler),
            options,
            observers,
            handle: Handle {
                progress: Arc::new(Progress::new()),
                queue,
            },
        }
    }

    /// The shared parts (progress, queue).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// Runs until `shutdown` resolves, then stops taking work, lets in-flight
    /// reconciles finish (up to the shutdown timeout) and returns. A database
    /// or engine that cannot be read at start is retried with back-off (the
    /// process stays up and reports not ready meanwhile).
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let Self {
            store,
            reconciler,
            options,
            observers,
            handle,
        } = self;
        tokio::pin!(shutdown);
        let queue = handle.queue.clone();
        let progress = handle.progress.clone();
        let engine = reconciler.engine().clone();
        let instance = reconciler.settings().instance.clone();
        let mut tasks = JoinSet::new();

        // Subscribe before listing, asking for events from a little before
        // now, so nothing that happens between the list and the subscription
        // is missed.
        let since = options
            .clock
            .wall()
            .timestamp_nanos_opt()
            .map(|n| n - 1_000_000_000);
        let relist = Arc::new(Notify::new());
        {
            let sink_queue = queue.clone();
            let observer: Arc<dyn EventObserver> = Arc::new(RelistOnReconnect {
                inner: observers.events.clone(),
                relist: relist.clone(),
            });
            tasks.spawn(events::run(
                engine.clone(),
                instance.clone(),
                since,
                observer,
                move |user| sink_queue.add(user, Trigger::DockerEvent),
            ));
        }
        let Some(start_revision) = until_ok(&mut shutdown, "read the latest revision", || {
            store.max_revision()
        })
        .await
        else {
            return;
        };
        {
            let sink_queue = queue.clone();
            tasks.spawn(feed::run(
                store.clone(),
                start_revision,
                options.feed,
                options.clock,
                move |user, delay| {
                    if delay.is_zero() {
                        sink_queue.add(user, Trigger::RowChange);
                    } else {
                        sink_queue.add_after(user, delay, Trigger::RowChange);
                    }
                },
            ));
        }

        let Some(users) = until_ok(&mut shutdown, "list users for the first full sync", || {
            resync::all_users(&store, engine.as_ref(), &instance)
        })
        .await
        else {
            return;
        };
        info!(
            users = users.len(),
            "first full sync: reconciling every user"
        );
        observers.reconciles.resynced(users.len());
        progress.begin_first_sync(users.iter().cloned());
        for user in users {
            queue.add(user, Trigger::Resync);
        }
        tasks.spawn(resync_loop(
            store.clone(),
            engine.clone(),
            instance,
            queue.clone(),
            options.resync_period,
            relist,
            observers.reconciles.clone(),
        ));
        tasks.spawn(log_progress(progress.clone(), queue.clone()));
        tasks.spawn(wake_port_waiters(reconciler.clone(), queue.clone()));

        // Polled in place, not spawned: dropping `run` (a lost lease) aborts
        // every reconcile in flight at once.
        let workers = {
            let reconciler = reconciler.clone();
            let progress = progress.clone();
            let observer = observers.reconciles.clone();
            run_workers(
                queue.clone(),
                options.concurrency,
                move |user: String, trigger, lane| {
                    let reconciler = reconciler.clone();
                    let progress = progress.clone();
                    let observer = observer.clone();
                    async move {
                        reconcile_one(
                            &reconciler,
                            &progress,
                            observer.as_ref(),
                            user,
                            trigger,
                            lane,
                        )
                        .await
                    }
                },
            )
        };
        tokio::pin!(workers);
        tokio::select! {
            _ = &mut workers => warn!("the worker pool stopped on its own"),
            _ = &mut shutdown => {}
        }
        info!("shutting down: no new reconciles; waiting for those in flight; containers are left running");
        queue.shutdown();
        tasks.shutdown().await;
        match tokio::time::timeout(options.shutdown_timeout, workers).await {
            Ok(()) => info!("all reconciles finished"),
            Err(_) => warn!(
                timeout_s = options.shutdown_timeout.as_secs(),
                "reconciles still running at the shutdown timeout; abandoning them"
            ),
        }
    }
}

/// Retries `op` with back-off until it succeeds; `None` when `shutdown` comes first.
async fn until_ok<T, E: std::fmt::Display, Fut: Future<Output = Result<T, E>>>(
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    what: &str,
    mut op: impl FnMut() -> Fut,
) -> Option<T> {
    let mut delay = Duration::from_millis(200);
    loop {
        tokio::select! {
            result = op() => match result {
                Ok(value) => return Some(value),
                Err(e) => warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot {what} yet; retrying"),
            },
            _ = shutdown.as_mut() => return None,
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = shutdown.as_mut() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// The message a panic was raised with, when it is text.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(not text)")
}

async fn reconcile_one<E: Engine>(
    reconciler: &Reconciler<E>,
    progress: &Progress,
    observer: &dyn ReconcileObserver,
    user: String,
    trigger: Trigger,
    lane: Lane,
) -> WorkOutcome {
    let span = tracing::info_span!(
        "reconcile",
        user_id = %crate::quote::quote_short(&user),
        trigger = trigger.as_str(),
        actions = tracing::field::Empty
    );
    observer.triggered(trigger);
    let started = std::time::Instant::now();
    // A panic is caught here, not only by the worker pool, so that it is
    // counted as the `panic` error kind.
    // A key from the front lane is a wake: its caller waits.
    let priority = match lane {
        Lane::Front => Priority::Wake,
        Lane::Bulk => Priority::Bulk,
    };
    let pass = reconciler.reconcile_as(&user, priority);
    let result = AssertUnwindSafe(pass.instrument(span.clone()))
        .catch_unwind()
        .await;
    let seconds = started.elapsed().as_secs_f64();
    let _entered = span.enter();
    match result {
        Err(panic) => {
            tracing::error!(
                panic = panic_message(panic.as_ref()),
                "reconcile panicked; retrying with back-off"
            );
            observer.reconciled("error", Some("panic"), seconds);
            progress.record_error(&user);
            WorkOutcome::Retry
        }
        Ok(Ok(outcome)) => {
            progress.record(
                &user,
                outcome.phase,
                outcome.converged,
                outcome.desired_state,
            );
            match outcome.requeue_after {
                Some(after) if after.is_zero() => {
                    observer.reconciled("requeue", None, seconds);
                    WorkOutcome::RequeueAfter(after)
                }
                Some(after) => {
                    observer.reconciled("requeue_after", None, seconds);
                    WorkOutcome::RequeueAfter(after)
                }
                None => {
                    observer.reconciled("success", None, seconds);
                    WorkOutcome::Done
                }
            }
        }
        Ok(Err(e)) => {
            warn!(error = %e, "reconcile failed; retrying with back-off");
            observer.reconciled("error", Some(e.kind()), seconds);
            progress.record_error(&user);
            WorkOutcome::Retry
        }
    }
}

struct RelistOnReconnect {
    inner: Arc<dyn EventObserver>,
    relist: Arc<Notify>,
}

impl EventObserver for RelistOnReconnect {
    fn event(&self, event: &crate::docker::EngineEvent) {
        self.inner.event(event)
    }
    fn connected(&self, connected: bool) {
        self.inner.connected(connected)
    }
    fn reconnected(&self) {
        self.inner.reconnected();
        self.relist.notify_one();
    }
}

async fn resync_loop<E: Engine>(
    store: Store,
    engine: Arc<E>,
    instance: String,
    queue: Arc<WorkQueue<String>>,
    period: Duration,
    relist: Arc<Notify>,
    observer: Arc<dyn ReconcileObserver>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = relist.notified() => info!("event stream re-established: relisting"),
        }
        match resync::all_users(&store, engine.as_ref(), &instance).await {
            Ok(users) => {
                observer.resynced(users.len());
                for user in users {
                    queue.add(user, Trigger::Resync);
                }
            }
            Err(e) => warn!(error = %e, "full resync failed; trying again next period"),
        }
    }
}

/// Queues the users refused for a full port range again once a port frees
/// (README, "Operations"): they wait idle, not in a retry loop.
async fn wake_port_waiters<E: Engine>(
    reconciler: Arc<Reconciler<E>>,
    queue: Arc<WorkQueue<String>>,
) {
    loop {
        let users = reconciler.ports().freed().await;
        info!(
            users = users.len(),
            "a host port was freed: trying the users waiting for one"
        );
        // A retry of users that failed for want of a port, not a new cause.
        for user in users {
            queue.add(user, Trigger::Retry);
        }
    }
}

async fn log_progress(progress: Arc<Progress>, queue: Arc<WorkQueue<String>>) {
    let mut last = ProgressSummary::default();
    loop {
        tokio::time::sleep(PROGRESS_LOG_PERIOD).await;
        let now = progress.summary();
        if now != last {
            let stats = queue.stats();
            info!(
                users = now.users,
                converged = now.converged,
                failed = now.failed,
                queued = stats.ready + stats.delayed,
                in_flight = stats.processing,
                synced = now.synced,
                "progress"
            );
            last = now;
        }
    }
}
