//! The worker pool: runs a handler for each key the [`WorkQueue`] hands out
//! and turns the handler's [`WorkOutcome`] into the queue call that follows.
//!
//! Invariants (pinned by the tests below):
//! - at most `concurrency` handlers run at once, and one key's handler never
//!   runs twice at once (the key's [`Lease`] is held until its handler ends);
//! - a key's outcome is applied before its lease is done: [`WorkOutcome::Done`]
//!   forgets its failures, [`WorkOutcome::RequeueAfter`] forgets them and queues
//!   it after the delay (a [`Trigger::Timer`]; at once in the front lane when
//!   the delay is zero and the key came from the front lane, so a wake's
//!   follow-up pass does not queue behind bulk work), [`WorkOutcome::Retry`]
//!   queues it with backoff (a [`Trigger::Retry`]);
//! - a handler is told why its key was queued (the lease's [`Trigger`]);
//! - a handler that panics is logged with its key and counts as a retry; the
//!   pool carries on;
//! - after [`WorkQueue::shutdown`], nothing new starts and [`run_workers`]
//!   returns once every handler in flight has finished. Dropping the
//!   `run_workers` future instead aborts the handlers in flight (their keys
//!   are released all the same).
//!
//! Nothing is logged per key at info level: a reconcile logs for itself.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::{Id, JoinError, JoinSet};

use super::{Lane, Lease, Trigger, WorkQueue};

/// What a handler wants done with its key next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkOutcome {
    /// Converged: forget the key's failures; it runs again when next added.
    Done,
    /// Converged for now: forget its failures and look again after this long
    /// (an idle deadline, a pending transition).
    RequeueAfter(Duration),
    /// Failed: retry after the key's next backoff delay.
    Retry,
}

/// Runs `handler` on the keys `queue` hands out, with the trigger each was
/// queued for and the lane it waited in, at most `concurrency` at a time (a
/// `concurrency` of 0 counts as 1), plus up to `concurrency` more of the
/// front lane while the others are all taken, so a wake never waits for a
/// slot behind bulk work; until the queue is shut down and the handlers in
/// flight have finished.
///
/// Each handler runs as its own tokio task, so a panic is caught at its join
/// handle instead of unwinding through the pool.
pub async fn run_workers<K, F, Fut>(queue: Arc<WorkQueue<K>>, concurrency: usize, handler: F)
where
    K: Clone + Eq + Hash + Send + Sync + fmt::Debug + 'static,
    F: Fn(K, Trigger, Lane) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = WorkOutcome> + Send + 'static,
{
    let concurrency = concurrency.max(1);
    let handler = Arc::new(handler);
    let mut running = JoinSet::new();
    // The leases stay here, not in the tasks, so a panicking handler's key
    // can still be retried before it is released.
    let mut leases: HashMap<Id, Lease<K>> = HashMap::new();
    loop {
        tokio::select! {
            // Settle finished handlers first so their slots free up.
            biased;
            Some(joined) = running.join_next_with_id() => settle(&queue, &mut leases, joined),
            lease = queue.next(), if running.len() < concurrency => {
                let Some(lease) = lease else { break };
                spawn(&mut running, &mut leases, &handler, lease);
            }
            lease = queue.next_front(),
                if (concurrency..2 * concurrency).contains(&running.len()) =>
            {
                let Some(lease) = lease else { break };
                spawn(&mut running, &mut leases, &handler, lease);
            }
        }
    }
    while let Some(joined) = running.join_next_with_id().await {
        settle(&queue, &mut leases, joined);
    }
}

/// Runs `handler` on `lease`'s key as a task of `running`, keeping the lease.
fn spawn<K, F, Fut>(
    running: &mut JoinSet<WorkOutcome>,
    leases: &mut HashMap<Id, Lease<K>>,
    handler: &Arc<F>,
    lease: Lease<K>,
) where
    K: Clone + Eq + Hash + Send + Sync + fmt::Debug + 'static,
    F: Fn(K, Trigger, Lane) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = WorkOutcome> + Send + 'static,
{
    let handler = Arc::clone(handler);
    let (key, trigger, lane) = (lease.key().clone(), lease.trigger(), lease.lane());
    let id = running
        .spawn(async move { handler(key, trigger, lane).await })
        .id();
    leases.insert(id, lease);
}

/// Applies a finished handler's outcome to its key, then releases the key.
fn settle<K>(
    queue: &WorkQueue<K>,
    leases: &mut HashMap<Id, Lease<K>>,
    joined: Result<(Id, WorkOutcome), JoinError>,
) where
    K: Clone + Eq + Hash + Send + Sync + fmt::Debug + 'static,
{
    let (id, outcome, failure) = match joined {
        Ok((id, outcome)) => (id, outcome, None),
        Err(error) => (error.id(), WorkOutcome::Retry, Some(error)),
    };
    let Some(lease) = leases.remove(&id) else {
        return;
    };
    let key = lease.key().clone();
    match outcome {
        WorkOutcome::Done => queue.forget(&key),
        // The next pass of a wake is still the wake: its caller waits.
        WorkOutcome::RequeueAfter(delay) if delay.is_zero() && lease.from_front_lane() => {
            queue.forget(&key);
            queue.add_front(key, Trigger::Timer);
        }
        WorkOutcome::RequeueAfter(delay) => {
            queue.forget(&key);
            queue.add_after(key, delay, Trigger::Timer);
        }
        WorkOutcome::Retry => {
            let delay = queue.add_rate_limited(key.clone());
            if let Some(error) = failure {
                tracing::error!(
                    ?key,
                    %error,
                    retry_in = ?delay,
                    "work queue handler crashed; retrying with backoff"
                );
            }
        }
    }
    lease.done();
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;

    use tokio::sync::mpsc;
    use tokio::time::Instant;

    use super::*;
    use crate::queue::BackoffPolicy;

    fn queue<K>() -> Arc<WorkQueue<K>>
    where
        K: Clone + Eq + Hash + Send + Sync + fmt::Debug + 'static,
    {
        Arc::new(WorkQueue::new(BackoffPolicy {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
            factor: 2.0,
            jitter: false,
        }))
    }

    /// Counts how many of something run at once, and the most ever seen.
    #[derive(Default)]
    struct Gauge {
        now: AtomicUsize,
        max: AtomicUsize,
    }

    impl Gauge {
        fn enter(&self) {
            let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.max.fetch_max(now, Ordering::SeqCst);
        }
        fn leave(&self) {
            self.now.fetch_sub(1, Ordering::SeqCst);
        }
        fn max(&self) -> usize {
            self.max.load(Ordering::SeqCst)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn queue_never_runs_one_key_twice_at_once() {
        let queue = queue::<u32>();
        let per_key: Arc<Vec<Gauge>> = Arc::new((0..8).map(|_| Gauge::default()).collect());
        let all = Arc::new(Gauge::default());
        let hot_runs = Arc::new(AtomicUsize::new(0));
        let pool = tokio::spawn(run_workers(Arc::clone(&queue), 8, {
            let (per_key, all, hot_runs) = (per_key.clone(), all.clone(), hot_runs.clone());
            move |key: u32, _: Trigger, _: Lane| {
                let (per_key, all, hot_runs) = (per_key.clone(), all.clone(), hot_runs.clone());
                async move {
                    let gauge = &per_key[key as usize];
                    gauge.enter();
                    all.enter();
                    if key == 0 {
                        hot_runs.fetch_add(1, Ordering::SeqCst);
                    }
                    for _ in 0..3 {
                        tokio::task::yield_now().await;
                    }
                    all.leave();
                    gauge.leave();
                    WorkOutcome::Done
                }
            }
        }));
        // Key 0 is hot: added all the time, also while it is being processed.
        let producer = async {
            let mut i = 0u32;
            while hot_runs.load(Ordering::SeqCst) < 500 {
                queue.add(0, Trigger::RowChange);
                if i.is_multiple_of(4) {
                    queue.add(1 + i % 7, Trigger::RowChange);
                }
                i += 1;
                tokio::task::yield_now().await;
            }
        };
        let produced = tokio::time::timeout(Duration::from_secs(30), producer).await;
        assert!(produced.is_ok(), "the hot key stalled");
        queue.shutdown();
        pool.await.unwrap();

        for (key, gauge) in per_key.iter().enumerate() {
            assert!(
                gauge.max() <= 1,
                "key {key} ran {} times at once",
                gauge.max()
            );
        }
        assert!(all.max() <= 8);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_bounded() {
        let queue = queue::<u32>();
        let gauge = Arc::new(Gauge::default());
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let pool = tokio::spawn(run_workers(Arc::clone(&queue), 3, {
            let gauge = gauge.clone();
            move |key: u32, _: Trigger, _: Lane| {
                let (gauge, done_tx) = (gauge.clone(), done_tx.clone());
                async move {
                    gauge.enter();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    gauge.leave();
                    done_tx.send(key).unwrap();
                    WorkOutcome::Done
                }
            }
        }));
        for key in 0..10 {
            queue.add(key, Trigger::RowChange);
        }
        for _ in 0..10 {
            done_rx.recv().await.unwrap();
        }
        assert_eq!(gauge.max(), 3);
        assert_eq!(start.elapsed(), Duration::from_secs(4), "3 + 3 + 3 + 1");
        queue.shutdown();
        pool.await.unwrap();
    }

    /// Runs `outcomes` for key "a", one per call, recording when each call
    /// started, the retries the queue counted then and why it was queued.
    async fn run_script(outcomes: Vec<WorkOutcome>) -> (Vec<(Duration, u32, Trigger)>, u32) {
        let queue = queue::<&'static str>();
        let script = Arc::new(Mutex::new(outcomes.into_iter()));
        let calls = Arc::new(Mutex::new(Vec::new()));
        let (finished_tx, mut finished_rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let pool = tokio::spawn(run_workers(Arc::clone(&queue), 2, {
            let (queue, calls) = (Arc::clone(&queue), Arc::clone(&calls));
            move |key, trigger, _: Lane| {
                calls
                    .lock()
                    .unwrap()
                    .push((start.elapsed(), queue.retries(&key), trigger));
                let outcome = script.lock().unwrap().next();
                let finished_tx = finished_tx.clone();
                async move {
                    match outcome {
                        Some(outcome) => outcome,
                        None => {
                            finished_tx.send(()).unwrap();
                            WorkOutcome::Done
                        }
                    }
                }
            }
        }));
        queue.add("a", Trigger::RowChange);
        finished_rx.recv().await.unwrap();
        queue.shutdown();
        pool.await.unwrap();
        let calls = calls.lock().unwrap().clone();
        (calls, queue.retries(&"a"))
    }

    #[tokio::test(start_paused = true)]
    async fn retry_backs_off_per_failure_and_done_forgets() {
        use Trigger::{Retry, RowChange};
        let secs = Duration::from_secs;
        let (calls, retries_after) = run_script(vec![
            WorkOutcome::Retry,
            WorkOutcome::Retry,
            WorkOutcome::Retry,
        ])
        .await;
        assert_eq!(
            calls,
            [
                (secs(0), 0, RowChange),
                (secs(1), 1, Retry),
                (secs(3), 2, Retry),
                (secs(7), 3, Retry)
            ]
        );
        assert_eq!(retries_after, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn requeue_after_forgets_failures_and_runs_the_key_again_after_the_delay() {
        use Trigger::{Retry, RowChange, Timer};
        let secs = Duration::from_secs;
        let (calls, _) = run_script(vec![
            WorkOutcome::Retry,
            WorkOutcome::RequeueAfter(secs(10)),
            WorkOutcome::Retry,
        ])
        .await;
        assert_eq!(
            calls,
            [
                (secs(0), 0, RowChange),
                (secs(1), 1, Retry),
                (secs(11), 0, Timer),
                (secs(12), 1, Retry)
            ]
        );
    }

    #[tokio::test]
    async fn a_wake_that_asks_to_look_again_at_once_stays_ahead_of_the_backlog() {
        let queue: Arc<WorkQueue<usize>> = Arc::new(WorkQueue::new(BackoffPolicy::default()));
        const WAKE: usize = 5000;
        for key in 0..1000 {
            queue.add(key, Trigger::Resync);
        }
        queue.add(WAKE, Trigger::Api);
        let runs = Arc::new(Mutex::new(Vec::new()));
        let pool = tokio::spawn(run_workers(queue.clone(), 1, {
            let (runs, queue) = (runs.clone(), queue.clone());
            move |key, trigger, _: Lane| {
                let (runs, queue) = (runs.clone(), queue.clone());
                async move {
                    let mut runs = runs.lock().unwrap();
                    runs.push((key, trigger));
                    if runs.len() == 1003 {
                        queue.shutdown();
                    }
                    let wake_runs = runs.iter().filter(|(k, _)| *k == WAKE).count();
                    if key == WAKE && wake_runs < 3 {
                        WorkOutcome::RequeueAfter(Duration::ZERO)
                    } else {
                        WorkOutcome::Done
                    }
                }
            }
        }));
        pool.await.unwrap();
        let runs = runs.lock().unwrap();
        assert_eq!(
            runs[..4],
            [
                (WAKE, Trigger::Api),
                (WAKE, Trigger::Timer),
                (WAKE, Trigger::Timer),
                (0, Trigger::Resync)
            ]
        );
    }

    /// A log sink for one test.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_handler_is_retried_and_the_pool_survives() {
        let logs = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer({
                let logs = logs.clone();
                move || logs.clone()
            })
            .with_ansi(false)
            .finish();
        // The runtime has one thread, so the handlers log through this too.
        let _logging = tracing::subscriber::set_default(subscriber);
        let queue = queue::<&'static str>();
        let calls = Arc::new(Mutex::new(HashMap::<&str, Vec<Duration>>::new()));
        let (done_tx, mut done_rx) = mpsc::unbounded_channel();
        let start = Instant::now();
        let pool = tokio::spawn(run_workers(Arc::clone(&queue), 1, {
            let calls = Arc::clone(&calls);
            move |key: &'static str, _: Trigger, _: Lane| {
                let runs = {
                    let mut calls = calls.lock().unwrap();
                    let runs = calls.entry(key).or_default();
                    runs.push(start.elapsed());
                    runs.len()
                };
                let done_tx = done_tx.clone();
                async move {
                    if key == "boom" && runs == 1 {
                        panic!("reconcile of {key} blew up");
                    }
                    done_tx.send(key).unwrap();
                    WorkOutcome::Done
                }
            }
        }));
        queue.add("boom", Trigger::RowChange);
        queue.add("fine", Trigger::RowChange);
        assert_eq!(done_rx.recv().await, Some("fine"));
        assert_eq!(queue.retries(&"boom"), 1, "the panic counted as a failure");
        assert_eq!(done_rx.recv().await, Some("boom"));
        assert_eq!(queue.retries(&"boom"), 0);
        queue.add("after", Trigger::RowChange);
        assert_eq!(done_rx.recv().await, Some("after"), "the pool survived");

        queue.shutdown();
        pool.await.unwrap();
        let calls = calls.lock().unwrap();
        assert_eq!(calls["boom"], [Duration::ZERO, Duration::from_secs(1)]);
        let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
        let crash = logs
            .lines()
            .find(|line| line.contains("handler crashed"))
            .expect("the panic was logged");
        assert!(crash.contains("ERROR"), "{crash}");
        assert!(crash.contains(r#"key="boom""#), "{crash}");
        assert!(crash.contains("reconcile of boom blew up"), "{crash}");
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_lets_in_flight_work_finish_and_drops_the_rest() {
        let queue = queue::<&'static str>();
        let (started_tx, mut started_rx) = mpsc::unbounded_channel();
        let finished = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        let pool = tokio::spawn(run_workers(Arc::clone(&queue), 2, {
            let finished = Arc::clone(&finished);
            move |key: &'static str, _: Trigger, _: Lane| {
                let (started_tx, finished) = (started_tx.clone(), Arc::clone(&finished));
                async move {
                    started_tx.send(key).unwrap();
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    finished.lock().unwrap().push(key);
                    WorkOutcome::Done
                }
            }
        }));
        for key in ["a", "b", "c", "d"] {
            queue.add(key, Trigger::RowChange);
        }
        assert_eq!(started_rx.recv().await, Some("a"));
        assert_eq!(started_rx.recv().await, Some("b"));
        queue.shutdown();
        pool.await.unwrap();

        assert_eq!(start.elapsed(), Duration::from_secs(5));
        assert_eq!(*finished.lock().unwrap(), ["a", "b"]);
        assert!(started_rx.try_recv().is_err(), "c and d never started");
        assert_eq!(queue.stats().processing, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_pool_aborts_its_handlers_and_releases_their_keys() {
        let queue = queue::<&'static str>();
        let (started_tx, mut started_rx) = mpsc::unbounded_channel();
        let pool = tokio::spawn(run_workers(Arc::clone(&queue), 2, move |key, _, _| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.send(key).unwrap();
                std::future::pending::<WorkOutcome>().await
            }
        }));
        queue.add("a", Trigger::RowChange);
        assert_eq!(started_rx.recv().await, Some("a"));
        assert_eq!(queue.stats().processing, 1);
        pool.abort();
        assert!(pool.await.unwrap_err().is_cancelled());
        assert_eq!(queue.stats().processing, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_runs_at_once_while_bulk_work_holds_every_slot_and_bulk_keys_wait() {
        let queue = queue::<&'static str>();
        let (started_tx, mut started_rx) = mpsc::unbounded_channel();
        let pool = tokio::spawn(run_workers(Arc::clone(&queue), 2, move |key, _, lane| {
            let started_tx = started_tx.clone();
            async move {
                started_tx.send((key, lane)).unwrap();
                // Bulk work holds its slot; a wake is over soon.
                match lane {
                    Lane::Bulk => std::future::pending::<WorkOutcome>().await,
                    Lane::Front => WorkOutcome::Done,
                }
            }
        }));
        for key in ["b1", "b2", "b3"] {
            queue.add(key, Trigger::Resync);
        }
        assert_eq!(started_rx.recv().await, Some(("b1", Lane::Bulk)));
        assert_eq!(started_rx.recv().await, Some(("b2", Lane::Bulk)));
        queue.add("wake", Trigger::Api);
        assert_eq!(started_rx.recv().await, Some(("wake", Lane::Front)));
        queue.add("again", Trigger::Api);
        assert_eq!(started_rx.recv().await, Some(("again", Lane::Front)));
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(
            started_rx.try_recv().is_err(),
            "b3 waits for a bulk slot: the wakes' slots are not for it"
        );
        assert_eq!(queue.stats().ready, 1);
        pool.abort();
    }
}
