//! The work queue: which user keys need a reconcile, and when.
//!
//! Triggers (desired-row changes, Docker events, idle deadlines, requeues,
//! resyncs) add keys; workers take them with [`WorkQueue::next`] and hold a
//! [`Lease`] while they reconcile. Invariants (each pinned by a test below):
//! - one entry per key: a key already queued, ready or delayed, is not queued
//!   twice;
//! - a key being processed is never handed out again until its lease is done;
//!   an add that arrives meanwhile marks it dirty, and it is queued again as
//!   soon as the lease is done, so a change arriving mid-reconcile is never
//!   lost;
//! - ready keys wait in two lanes: a key queued by the API
//!   ([`Trigger::Api`]: a caller waits on it, as `ensure-running` does) in
//!   the front lane, every other in the bulk lane. The front lane is emptied
//!   first, so a wake never waits behind a resync of the whole fleet; an
//!   immediate API add to a key waiting in the bulk lane moves it to the
//!   front (and names it `Api`); a key handed out from the front lane whose
//!   reconcile asks to look again at once goes back to the front lane
//!   ([`WorkQueue::add_front`]), so the wake's follow-up passes do not wait
//!   either. Within a lane, keys are handed out first in,
//!   first out, in the order they became due (a delayed key becomes due at
//!   its deadline);
//! - a delayed add never postpones a key: the earliest deadline wins, and an
//!   add to a key that is already due does nothing;
//! - a delayed key is not handed out before its deadline, and there is no
//!   periodic scan and no task of the queue's own: deadlines live in one
//!   ordered timer set, and each idle caller of [`WorkQueue::next`] sleeps
//!   until the earliest deadline or until notified (a new earliest deadline
//!   wakes them all to shorten their sleep);
//! - each key backs off on its own: [`WorkQueue::add_rate_limited`] waits
//!   longer per failure (see [`BackoffPolicy`]), [`WorkQueue::forget`] resets;
//! - concurrent callers of [`WorkQueue::next`] get distinct keys, and a key
//!   that becomes ready always wakes a waiting caller, even if callers are
//!   cancelled mid-wait;
//! - after [`WorkQueue::shutdown`], `next` returns `None`, queued keys are
//!   dropped and adds are ignored; leases already out still finish;
//! - every add says why ([`Trigger`]); a queued key keeps the trigger of the
//!   add that makes it due first, and its [`Lease`] hands that trigger out.
//!
//! The lock is a `std::sync::Mutex` held for a few map operations and never
//! across an `.await`; wakeups and observer callbacks happen after it is
//! released. The bookkeeping itself is in `state` (pure, takes `now`); the
//! per-key backoff in `backoff`; the worker pool in [`runner`].

mod backoff;
mod observer;
pub mod runner;
mod state;
mod trigger;

use std::fmt;
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::{sleep_until, Instant};

use crate::clock::Clock;

pub use backoff::{BackoffPolicy, BackoffPolicyError};
pub use observer::{NoQueueObserver, QueueObserver, QueueStats};
pub use runner::{run_workers, WorkOutcome};
pub use trigger::Trigger;

use backoff::Backoffs;
pub use state::Lane;
use state::{Effects, QueueState, Take};

/// Longest delay the queue schedules; longer ones are cut to it so that
/// `now + delay` cannot overflow (tokio caps its own sleeps the same way).
const FAR_FUTURE: Duration = Duration::from_secs(30 * 365 * 24 * 60 * 60);

/// A deduplicating, delaying, rate-limiting queue of keys (user ids in
/// clawfleet). Share it with `Arc`; every method takes `&self`.
pub struct WorkQueue<K> {
    shared: Arc<Shared<K>>,
}

/// What the queue and its outstanding leases share.
struct Shared<K> {
    state: Mutex<QueueState<K>>,
    backoffs: Mutex<Backoffs<K>>,
    /// Wakes callers of `next`: `notify_one` per key that became ready,
    /// `notify_waiters` when they must recompute their deadline or stop.
    wakeup: Notify,
    /// Wakes callers of `next_front` (`notify_waiters`) whenever a key
    /// waits in the front lane after a change.
    front_wakeup: Notify,
    observer: Arc<dyn QueueObserver>,
    /// Where `now` comes from.
    clock: Clock,
}

/// A key handed out by [`WorkQueue::next`]. The key counts as being processed
/// until the lease is done, explicitly with [`Lease::done`] or by dropping it,
/// so a handler that panics or is cancelled cannot wedge its key.
pub struct Lease<K: Clone + Eq + Hash> {
    key: K,
    trigger: Trigger,
    lane: Lane,
    shared: Arc<Shared<K>>,
}

impl<K> WorkQueue<K>
where
    K: Clone + Eq + Hash + Send + Sync + fmt::Debug + 'static,
{
    /// An empty queue whose failing keys back off by `policy`.
    pub fn new(policy: BackoffPolicy) -> Self {
        Self::with_observer(policy, Arc::new(NoQueueObserver))
    }

    /// An empty queue that reports its events to `observer` (metrics).
    pub fn with_observer(policy: BackoffPolicy, observer: Arc<dyn QueueObserver>) -> Self {
        Self::with_clock(Clock::system(), policy, observer)
    }

    /// An empty queue whose deadlines and delays are read from `clock`
    /// (client-go's `newQueue(clock, …)`), reporting to `observer`.
    pub fn with_clock(
        clock: Clock,
        policy: BackoffPolicy,
        observer: Arc<dyn QueueObserver>,
    ) -> Self {
        Self {
            shared: Arc::new(Shared {
                state: Mutex::new(QueueState::new()),
                backoffs: Mutex::new(Backoffs::new(policy)),
                wakeup: Notify::new(),
                front_wakeup: Notify::new(),
                observer,
                clock,
            }),
        }
    }

    /// Queues `key` now because of `trigger`. Does nothing if it is already
    /// due; cancels its pending delay if it has one; marks it dirty if it is
    /// being processed. See [`Trigger`] for which trigger an entry keeps.
    pub fn add(&self, key: K, trigger: Trigger) {
        self.shared
            .with_state(|state, now, fx| state.add(key, trigger, now, fx));
    }

    /// Queues `key` now in the front lane because of `trigger`, whatever the
    /// trigger: for the next pass of a key handed out from the front lane
    /// (its API caller still waits). Otherwise as [`add`](Self::add).
    pub fn add_front(&self, key: K, trigger: Trigger) {
        self.shared
            .with_state(|state, now, fx| state.add_in(key, trigger, Lane::Front, now, fx));
    }

    /// Queues `key` after `delay` because of `trigger`, unless it is already
    /// due or due sooner.
    pub fn add_after(&self, key: K, delay: Duration, trigger: Trigger) {
        self.shared.with_state(|state, now, fx| {
            state.add_at(key, now + delay.min(FAR_FUTURE), trigger, now, fx);
        });
    }

    /// Records a failure of `key` and queues it after its next backoff delay
    /// (as a [`Trigger::Retry`]), which it returns (for logs and status messages).
    pub fn add_rate_limited(&self, key: K) -> Duration {
        let delay = lock(&self.shared.backoffs).next_delay(key.clone());
        self.shared.observer.retried();
        self.add_after(key, delay, Trigger::Retry);
        delay
    }

    /// Forgets `key`'s failures, so its next failure waits the minimum again.
    /// Call it when the key was processed successfully.
    pub fn forget(&self, key: &K) {
        lock(&self.shared.backoffs).forget(key);
    }

    /// How many times `key` failed since it was last forgotten.
    pub fn retries(&self, key: &K) -> u32 {
        lock(&self.shared.backoffs).failures(key)
    }

    /// Waits for a ready key and hands it out, or returns `None` once the
    /// queue is shut down. Cancel-safe: a cancelled call takes no key and
    /// passes any wakeup it received on to another caller.
    pub async fn next(&self) -> Option<Lease<K>> {
        self.next_of(false).await
    }

    /// Like [`next`](Self::next), but hands out keys of the front lane only
    /// (for slots kept free for wakes while bulk work fills the others).
    pub async fn next_front(&self) -> Option<Lease<K>> {
        self.next_of(true).await
    }

    async fn next_of(&self, front_only: bool) -> Option<Lease<K>> {
        let wakeup = if front_only {
            &self.shared.front_wakeup
        } else {
            &self.shared.wakeup
        };
        loop {
            // Registered before looking at the state, so a key that becomes
            // ready between the look and the wait still wakes us.
            let notified = wakeup.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let taken =
                self.shared
                    .with_state(|state, now, fx| match state.take(now, fx, front_only) {
                        Take::Ready(key, trigger, lane) => Take::Ready(
                            Lease {
                                key,
                                trigger,
                                lane,
                                shared: Arc::clone(&self.shared),
                            },
                            trigger,
                            lane,
                        ),
                        Take::Wait(deadline) => Take::Wait(deadline),
                        Take::ShutDown => Take::ShutDown,
                    });
            match taken {
                Take::Ready(lease, ..) => return Some(lease),
                Take::ShutDown => return None,
                Take::Wait(None) => notified.await,
                Take::Wait(Some(deadline)) => {
                    tokio::select! {
                        () = notified => {}
                        () = sleep_until(deadline) => {}
                    }
                }
            }
        }
    }

    /// Stops handing out keys: pending and future calls of [`next`](Self::next)
    /// return `None`, queued keys are dropped, later adds are ignored. Leases
    /// already out stay valid until done.
    pub fn shutdown(&self) {
        lock(&self.shared.state).shut_down();
        self.shared.wakeup.notify_waiters();
        self.shared.front_wakeup.notify_waiters();
    }

    /// True once [`shutdown`](Self::shutdown) was called.
    pub fn is_shut_down(&self) -> bool {
        lock(&self.shared.state).is_shut_down()
    }

    /// Counts of ready, delayed and processing keys, and how long the current
    /// work has been running.
    pub fn stats(&self) -> QueueStats {
        self.shared
            .with_state(|state, now, fx| state.stats(now, fx))
    }
}

impl<K: Clone + Eq + Hash> Shared<K> {
    /// Runs `f` on the state under the lock, then wakes callers and tells the
    /// observer what happened, with the lock released.
    fn with_state<R>(&self, f: impl FnOnce(&mut QueueState<K>, Instant, &mut Effects) -> R) -> R {
        let mut fx = Effects::default();
        let (result, front_waiting) = {
            let mut state = lock(&self.state);
            // Read under the lock so the state sees time move forward only.
            let result = f(&mut state, self.clock.now(), &mut fx);
            (result, state.front_waiting())
        };
        self.apply(fx);
        if front_waiting {
            self.front_wakeup.notify_waiters();
        }
        result
    }

    fn apply(&self, fx: Effects) {
        for _ in 0..fx.became_ready {
            self.wakeup.notify_one();
        }
        if fx.earlier_deadline {
            self.wakeup.notify_waiters();
        }
        for _ in 0..fx.added {
            self.observer.added();
        }
        if let Some(waited) = fx.handed_out {
            self.observer.handed_out(waited);
        }
        if let Some(worked) = fx.finished {
            self.observer.finished(worked);
        }
    }
}

/// Locks `mutex`, carrying on if a thread panicked while holding it: nothing
/// here panics under the lock, short of a key's own `Hash` or `Eq`, and a
/// queue that stops working would wedge every key rather than one.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<K: Clone + Eq + Hash> Lease<K> {
    /// The key to process.
    pub fn key(&self) -> &K {
        &self.key
    }

    /// Why the key was queued (the trigger that made it due first).
    pub fn trigger(&self) -> Trigger {
        self.trigger
    }

    /// The lane the key waited in.
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// True when the key waited in the front lane (an API caller waits on it).
    pub fn from_front_lane(&self) -> bool {
        self.lane == Lane::Front
    }

    /// Marks the key done: it may be handed out again, right away if it was
    /// added while it was being processed. Same as dropping the lease.
    pub fn done(self) {}
}

impl<K: Clone + Eq + Hash> Drop for Lease<K> {
    fn drop(&mut self) {
        let key = &self.key;
        self.shared
            .with_state(|state, now, fx| state.done(key, now, fx));
    }
}

impl<K: Clone + Eq + Hash + fmt::Debug> fmt::Debug for Lease<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("key", &self.key)
            .field("trigger", &self.trigger)
            .finish()
    }
}

impl<K> fmt::Debug for WorkQueue<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkQueue").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet, VecDeque};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use futures::FutureExt;
    use proptest::prelude::*;

    use super::*;

    type Queue = WorkQueue<&'static str>;

    const ROW: Trigger = Trigger::RowChange;
    const TIMER: Trigger = Trigger::Timer;

    fn steady_policy() -> BackoffPolicy {
        BackoffPolicy {
            min: Duration::from_secs(1),
            max: Duration::from_secs(30),
            factor: 2.0,
            jitter: false,
        }
    }

    fn queue() -> Queue {
        WorkQueue::new(steady_policy())
    }

    /// The key `next` hands out without waiting, if any.
    fn ready_now<K>(queue: &WorkQueue<K>) -> Option<Lease<K>>
    where
        K: Clone + Eq + Hash + Send + Sync + fmt::Debug + 'static,
    {
        queue.next().now_or_never().flatten()
    }

    fn key_now(queue: &Queue) -> Option<&'static str> {
        ready_now(queue).map(|lease| *lease.key())
    }

    #[tokio::test]
    async fn a_key_queued_twice_is_handed_out_once() {
        let queue = queue();
        queue.add("a", ROW);
        queue.add("a", ROW);
        queue.add("b", ROW);
        assert_eq!(queue.stats().ready, 2);
        assert_eq!(key_now(&queue), Some("a"));
        assert_eq!(key_now(&queue), Some("b"));
        assert_eq!(key_now(&queue), None);
    }

    #[tokio::test]
    async fn an_add_during_processing_requeues_after_done() {
        let queue = queue();
        queue.add("a", ROW);
        let lease = ready_now(&queue).expect("a is ready");
        queue.add("a", ROW);
        queue.add("a", ROW);
        assert!(ready_now(&queue).is_none(), "a is still being processed");
        lease.done();
        let again = ready_now(&queue).expect("the mid-run add is not lost");
        assert_eq!(*again.key(), "a");
        drop(again);
        assert!(ready_now(&queue).is_none(), "the two adds were one");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_key_falling_due_during_processing_waits_for_done() {
        let queue = queue();
        queue.add("a", ROW);
        let lease = ready_now(&queue).expect("a is ready");
        queue.add_after("a", Duration::from_secs(1), TIMER);
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(ready_now(&queue).is_none());
        drop(lease);
        assert_eq!(key_now(&queue), Some("a"));
    }

    #[tokio::test]
    async fn ready_keys_are_handed_out_in_fifo_order() {
        let queue = queue();
        for key in ["c", "a", "b", "a", "c"] {
            queue.add(key, ROW);
        }
        let order: Vec<_> = std::iter::from_fn(|| key_now(&queue)).collect();
        assert_eq!(order, ["c", "a", "b"]);

        // A key added while processed goes behind the keys added before its done.
        queue.add("x", ROW);
        let x = ready_now(&queue).expect("x is ready");
        queue.add("x", ROW);
        queue.add("y", ROW);
        x.done();
        let order: Vec<_> = std::iter::from_fn(|| key_now(&queue)).collect();
        assert_eq!(order, ["y", "x"]);
    }

    #[tokio::test]
    async fn an_api_add_during_a_1000_key_backlog_is_handed_out_next() {
        let queue: WorkQueue<usize> = WorkQueue::new(steady_policy());
        for key in 0..1000 {
            queue.add(key, Trigger::Resync);
        }
        let next = |queue: &WorkQueue<usize>| {
            let lease = ready_now(queue).expect("the backlog is not drained");
            (*lease.key(), lease.trigger())
        };
        assert_eq!(next(&queue), (0, Trigger::Resync));

        // A user the resync has not queued jumps the backlog.
        queue.add(5000, Trigger::Api);
        assert_eq!(next(&queue), (5000, Trigger::Api));

        // So does one the resync queued last: its entry moves to the front.
        queue.add(999, Trigger::Api);
        assert_eq!(queue.stats().ready, 999, "moved, not queued twice");
        assert_eq!(next(&queue), (999, Trigger::Api));

        // One being processed goes to the front once it is done.
        queue.add(7000, Trigger::Api);
        let busy = ready_now(&queue).expect("7000 is ready");
        queue.add(7000, Trigger::Resync);
        queue.add(7000, Trigger::Api);
        busy.done();
        assert_eq!(next(&queue), (7000, Trigger::Api));

        // The backlog then drains in its own order, without the moved key.
        let rest: Vec<usize> = std::iter::from_fn(|| ready_now(&queue).map(|l| *l.key())).collect();
        assert_eq!(rest, (1..999).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_add_keeps_the_earliest_deadline() {
        let queue = queue();
        let start = Instant::now();
        queue.add_after("a", Duration::from_secs(10), TIMER);
        queue.add_after("a", Duration::from_secs(5), TIMER);
        queue.add_after("a", Duration::from_secs(20), TIMER);
        assert_eq!(queue.stats().delayed, 1);

        let lease = queue.next().await.expect("a falls due");
        assert_eq!(*lease.key(), "a");
        assert_eq!(start.elapsed(), Duration::from_secs(5));
        drop(lease);

        tokio::time::advance(Duration::from_secs(30)).await;
        assert_eq!(key_now(&queue), None, "the later deadlines were merged");
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_key_is_not_handed_out_before_its_deadline() {
        let queue = queue();
        let start = Instant::now();
        queue.add_after("a", Duration::from_secs(10), TIMER);
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(key_now(&queue), None);
        assert_eq!(queue.stats().delayed, 1);

        let lease = queue.next().await.expect("a falls due");
        assert_eq!(*lease.key(), "a");
        assert_eq!(start.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_worker_wakes_for_a_new_earlier_deadline() {
        let queue = Arc::new(queue());
        let start = Instant::now();
        queue.add_after("late", Duration::from_secs(60), TIMER);
        let worker = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.next().await.map(|lease| *lease.key()) }
        });
        tokio::task::yield_now().await; // the worker now sleeps until 60 s
        queue.add_after("soon", Duration::from_secs(1), TIMER);
        assert_eq!(worker.await.unwrap(), Some("soon"));
        assert_eq!(start.elapsed(), Duration::from_secs(1));
    }

    #[tokio::test(start_paused = true)]
    async fn an_immediate_add_cancels_a_pending_delay() {
        let queue = queue();
        queue.add_after("a", Duration::from_secs(10), TIMER);
        queue.add("a", ROW);
        let stats = queue.stats();
        assert_eq!((stats.ready, stats.delayed), (1, 0));
        assert_eq!(key_now(&queue), Some("a"));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(key_now(&queue), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_add_of_a_ready_key_does_nothing() {
        let queue = queue();
        queue.add("a", ROW);
        queue.add_after("a", Duration::from_secs(10), TIMER);
        let stats = queue.stats();
        assert_eq!((stats.ready, stats.delayed), (1, 0));
        assert_eq!(key_now(&queue), Some("a"));
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(key_now(&queue), None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_zero_or_huge_delay_is_handled() {
        let queue = queue();
        queue.add_after("now", Duration::ZERO, TIMER);
        queue.add_after("never", Duration::MAX, TIMER);
        assert_eq!(key_now(&queue), Some("now"));
        assert_eq!(queue.stats().delayed, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_per_key_and_resets_on_forget() {
        let queue = queue();
        let delays: Vec<u64> = (0..7)
            .map(|_| queue.add_rate_limited("a").as_secs())
            .collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(queue.retries(&"a"), 7);

        assert_eq!(queue.retries(&"b"), 0, "other keys are unaffected");
        assert_eq!(queue.add_rate_limited("b"), Duration::from_secs(1));
        assert_eq!(queue.retries(&"b"), 1);

        queue.forget(&"a");
        assert_eq!(queue.retries(&"a"), 0);
        assert_eq!(queue.add_rate_limited("a"), Duration::from_secs(1));
        assert_eq!(queue.retries(&"b"), 1, "forgetting a leaves b alone");
    }

    #[tokio::test(start_paused = true)]
    async fn jittered_backoff_stays_between_the_base_delay_and_twice_it() {
        let policy = BackoffPolicy {
            min: Duration::from_millis(100),
            max: Duration::from_secs(2),
            factor: 2.0,
            jitter: true,
        };
        let queue = WorkQueue::new(policy);
        for key in 0..50u32 {
            let mut base = policy.min;
            for _ in 0..8 {
                let delay = queue.add_rate_limited(key);
                assert!(
                    base <= delay && delay < base * 2,
                    "{delay:?} outside [{base:?}, 2 × {base:?})"
                );
                base = (base * 2).min(policy.max);
            }
        }
        let first_delays: HashSet<Duration> = (100..120u32)
            .map(|key| queue.add_rate_limited(key))
            .collect();
        assert!(first_delays.len() > 1, "jitter spreads keys apart");
    }

    #[tokio::test(start_paused = true)]
    async fn a_rate_limited_key_is_handed_out_after_its_backoff() {
        let queue = queue();
        let start = Instant::now();
        queue.add_rate_limited("a");
        queue.add_rate_limited("a");
        assert_eq!(key_now(&queue), None);
        let lease = queue.next().await.expect("a falls due");
        assert_eq!(*lease.key(), "a");
        assert_eq!(
            start.elapsed(),
            Duration::from_secs(1),
            "the earlier retry deadline wins"
        );
    }

    #[tokio::test]
    async fn dropping_a_lease_marks_the_key_done() {
        let queue = Arc::new(queue());
        queue.add("a", ROW);
        let lease = ready_now(&queue).expect("a is ready");
        assert_eq!(queue.stats().processing, 1);
        drop(lease);
        assert_eq!(queue.stats().processing, 0);
        queue.add("a", ROW);
        assert_eq!(key_now(&queue), Some("a"));

        // A handler that panics holding its lease releases the key.
        queue.add("b", ROW);
        let panicking = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move {
                let _lease = queue.next().await;
                panic!("handler blew up");
            }
        });
        assert!(panicking.await.unwrap_err().is_panic());
        queue.add("b", ROW);
        assert_eq!(key_now(&queue), Some("b"));

        // So does one that is cancelled.
        queue.add("c", ROW);
        let lease = ready_now(&queue).expect("c is ready");
        let stuck = tokio::spawn(async move {
            let _lease = lease;
            std::future::pending::<()>().await;
        });
        stuck.abort();
        assert!(stuck.await.unwrap_err().is_cancelled());
        queue.add("c", ROW);
        assert_eq!(key_now(&queue), Some("c"));
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_wakes_waiters_drops_queued_keys_and_lets_leases_finish() {
        let queue = Arc::new(queue());
        queue.add("busy", ROW);
        let busy = ready_now(&queue).expect("busy is ready");
        queue.add_after("later", Duration::from_secs(10), TIMER);
        let start = Instant::now();
        let waiter = tokio::spawn({
            let queue = Arc::clone(&queue);
            async move { queue.next().await.map(|lease| *lease.key()) }
        });
        tokio::task::yield_now().await; // the waiter sleeps until 10 s
        queue.add("dropped", ROW); // wakes the waiter, which has not run yet
        queue.shutdown();
        assert_eq!(waiter.await.unwrap(), None);
        assert_eq!(start.elapsed(), Duration::ZERO, "no waiting for deadlines");
        assert!(queue.is_shut_down());
        let stats = queue.stats();
        assert_eq!((stats.ready, stats.delayed, stats.processing), (0, 0, 1));

        queue.add("busy", ROW);
        queue.add("new", ROW);
        busy.done();
        assert_eq!(queue.stats(), QueueStats::default());
        assert!(queue.next().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn stats_count_ready_delayed_and_processing_keys_and_the_longest_run() {
        let queue = queue();
        queue.add("a", ROW);
        queue.add("b", ROW);
        queue.add("c", ROW);
        queue.add_after("d", Duration::from_secs(60), TIMER);
        let a = ready_now(&queue).expect("a");
        tokio::time::advance(Duration::from_secs(3)).await;
        let b = ready_now(&queue).expect("b");
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(
            queue.stats(),
            QueueStats {
                ready: 1,
                delayed: 1,
                processing: 2,
                longest_running: Duration::from_secs(5),
                unfinished_work: Duration::from_secs(7),
            }
        );
        drop((a, b));
        tokio::time::advance(Duration::from_secs(60)).await;
        let stats = queue.stats();
        assert_eq!((stats.ready, stats.delayed, stats.processing), (2, 0, 0));
    }

    #[derive(Default)]
    struct Counting {
        added: AtomicUsize,
        retried: AtomicUsize,
        waits: Mutex<Vec<Duration>>,
        works: Mutex<Vec<Duration>>,
    }

    impl QueueObserver for Counting {
        fn added(&self) {
            self.added.fetch_add(1, Ordering::SeqCst);
        }
        fn retried(&self) {
            self.retried.fetch_add(1, Ordering::SeqCst);
        }
        fn handed_out(&self, waited: Duration) {
            self.waits.lock().unwrap().push(waited);
        }
        fn finished(&self, worked: Duration) {
            self.works.lock().unwrap().push(worked);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_observer_counts_adds_retries_waits_and_work() {
        let observer = Arc::new(Counting::default());
        let queue = WorkQueue::with_observer(steady_policy(), observer.clone());
        let secs = Duration::from_secs;

        queue.add("a", ROW);
        queue.add("a", ROW); // already due: not an add
        queue.add_after("b", secs(2), TIMER);
        assert_eq!(observer.added.load(Ordering::SeqCst), 1);
        tokio::time::advance(secs(3)).await;

        let a = ready_now(&queue).expect("a"); // waited 3 s
        let b = ready_now(&queue).expect("b"); // due at 2 s: waited 1 s
        assert_eq!(observer.added.load(Ordering::SeqCst), 2);
        tokio::time::advance(secs(4)).await;
        queue.add("a", ROW); // dirty: an add
        a.done(); // worked 4 s, queued again
        assert_eq!(queue.add_rate_limited("b"), secs(1));
        tokio::time::advance(secs(1)).await;
        b.done(); // worked 5 s; its retry fell due meanwhile: an add
        let a = ready_now(&queue).expect("a again"); // waited 1 s since done
        let b = ready_now(&queue).expect("b again"); // waited 0 s
        drop((a, b));

        assert_eq!(observer.added.load(Ordering::SeqCst), 4);
        assert_eq!(observer.retried.load(Ordering::SeqCst), 1);
        assert_eq!(
            *observer.waits.lock().unwrap(),
            [secs(3), secs(1), secs(1), secs(0)]
        );
        assert_eq!(
            *observer.works.lock().unwrap(),
            [secs(4), secs(5), secs(0), secs(0)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_callers_each_get_distinct_keys_and_no_wakeup_is_lost() {
        const KEYS: usize = 4000;
        const PRODUCERS: usize = 4;
        let queue: Arc<WorkQueue<usize>> = Arc::new(WorkQueue::new(steady_policy()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut workers = Vec::new();
        for worker in 0..16 {
            let queue = Arc::clone(&queue);
            let tx = tx.clone();
            workers.push(tokio::spawn(async move {
                loop {
                    // Half the workers keep giving up on `next`, so wakeups
                    // land on cancelled waiters and must be passed on.
                    let lease = if worker % 2 == 0 {
                        queue.next().await
                    } else {
                        tokio::select! {
                            lease = queue.next() => lease,
                            () = tokio::task::yield_now() => continue,
                        }
                    };
                    let Some(lease) = lease else { break };
                    tx.send(*lease.key()).unwrap();
                    tokio::task::yield_now().await;
                }
            }));
        }
        drop(tx);
        for producer in 0..PRODUCERS {
            let queue = Arc::clone(&queue);
            tokio::spawn(async move {
                for key in (producer..KEYS).step_by(PRODUCERS) {
                    if key % 3 == 0 {
                        queue.add_after(key, Duration::from_micros(key as u64 % 500), TIMER);
                    } else {
                        queue.add(key, ROW);
                    }
                    if key % 7 == 0 {
                        tokio::task::yield_now().await;
                    }
                }
            });
        }

        let mut seen = HashSet::new();
        let received = tokio::time::timeout(Duration::from_secs(30), async {
            while seen.len() < KEYS {
                let key = rx.recv().await.expect("workers are alive");
                assert!(seen.insert(key), "key {key} handed out twice");
            }
        })
        .await;
        assert!(
            received.is_ok(),
            "only {} of {KEYS} keys handed out",
            seen.len()
        );

        queue.shutdown();
        for worker in workers {
            worker.await.unwrap();
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn every_ready_key_wakes_a_waiting_worker_even_when_waiters_are_cancelled() {
        let queue: Arc<WorkQueue<usize>> = Arc::new(WorkQueue::new(steady_policy()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Steady workers only ever wait in `next`: they find a key only if
        // its add wakes them, so a lost wakeup leaves a key behind.
        let steady: Vec<_> = (0..4)
            .map(|_| {
                let queue = Arc::clone(&queue);
                let tx = tx.clone();
                tokio::spawn(async move {
                    while let Some(lease) = queue.next().await {
                        tx.send(*lease.key()).unwrap();
                    }
                })
            })
            .collect();

        let mut seen = HashSet::new();
        let rounds = tokio::time::timeout(Duration::from_secs(30), async {
            let mut next_key = 0;
            for round in 0..300 {
                // Fickle waiters are cancelled right after the adds, often
                // holding a wakeup they never act on: it must move on.
                let (cancel, cancelled) = tokio::sync::watch::channel(false);
                let fickle: Vec<_> = (0..4)
                    .map(|_| {
                        let queue = Arc::clone(&queue);
                        let tx = tx.clone();
                        let mut cancelled = cancelled.clone();
                        tokio::spawn(async move {
                            tokio::select! {
                                lease = queue.next() => {
                                    if let Some(lease) = lease {
                                        tx.send(*lease.key()).unwrap();
                                    }
                                }
                                _ = cancelled.wait_for(|&c| c) => {}
                            }
                        })
                    })
                    .collect();
                tokio::task::yield_now().await;
                let batch = 1 + round % 6;
                for _ in 0..batch {
                    queue.add(next_key, ROW);
                    next_key += 1;
                }
                cancel.send_replace(true);
                for _ in 0..batch {
                    let key = rx.recv().await.expect("workers are alive");
                    assert!(seen.insert(key), "key {key} handed out twice");
                }
                for task in fickle {
                    task.await.unwrap();
                }
            }
        })
        .await;
        assert!(
            rounds.is_ok(),
            "a ready key was left with every worker asleep"
        );
        queue.shutdown();
        for task in steady {
            task.await.unwrap();
        }
    }

    /// One step of the property test.
    #[derive(Debug, Clone)]
    enum Step {
        Add(u8, Trigger),
        AddFront(u8, Trigger),
        AddAfter(u8, u64, Trigger),
        Next,
        Done(usize),
        Advance(u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            3 => (0..5u8, trigger()).prop_map(|(k, t)| Step::Add(k, t)),
            1 => (0..5u8, trigger()).prop_map(|(k, t)| Step::AddFront(k, t)),
            3 => (0..5u8, 0..40u64, trigger()).prop_map(|(k, ms, t)| Step::AddAfter(k, ms, t)),
            3 => Just(Step::Next),
            2 => any::<usize>().prop_map(Step::Done),
            2 => (0..25u64).prop_map(Step::Advance),
        ]
    }

    fn trigger() -> impl Strategy<Value = Trigger> {
        prop::sample::select(Trigger::ALL.to_vec())
    }

    /// The queue's contract written as plainly as possible: time in
    /// milliseconds, a linear scan for due keys, a pending key's trigger
    /// kept beside it (set by the add that makes it due first, or by an
    /// immediate `Api` or front-lane add that moves it to the front lane),
    /// and two lanes: keys due because of `Api` or added to the front lane
    /// in `front`, handed out before `ready`.
    #[derive(Default)]
    struct Model {
        now: u64,
        seq: u64,
        /// Key → its deadline and the order its deadline was set in.
        delayed: HashMap<u8, (u64, u64)>,
        /// Pending key (ready, dirty or delayed) → why it is queued.
        triggers: HashMap<u8, Trigger>,
        /// Keys due while being processed.
        dirty: HashSet<u8>,
        /// Due keys with an API waiter.
        front: VecDeque<u8>,
        /// Due keys (ready or dirty) that belong to the front lane.
        in_front: HashSet<u8>,
        /// Every other due key.
        ready: VecDeque<u8>,
        /// Keys handed out, in the order the test holds their leases.
        processing: Vec<u8>,
    }

    impl Model {
        fn promote(&mut self) {
            let mut due: Vec<(u64, u64, u8)> = self
                .delayed
                .iter()
                .filter(|(_, &(deadline, _))| deadline <= self.now)
                .map(|(&key, &(deadline, seq))| (deadline, seq, key))
                .collect();
            due.sort();
            for (_, _, key) in due {
                self.delayed.remove(&key);
                let trigger = self.triggers[&key];
                self.make_due(key, trigger, trigger == Trigger::Api);
            }
        }

        fn make_due(&mut self, key: u8, trigger: Trigger, front: bool) {
            if self.is_due(key) {
                if front && self.in_front.insert(key) {
                    self.triggers.insert(key, trigger);
                    if let Some(at) = self.ready.iter().position(|&k| k == key) {
                        self.ready.remove(at);
                        self.front.push_back(key);
                    }
                }
                return;
            }
            self.triggers.insert(key, trigger);
            if front {
                self.in_front.insert(key);
            }
            if self.processing.contains(&key) {
                self.dirty.insert(key);
            } else {
                self.queue(key);
            }
        }

        /// Puts `key` at the back of its lane.
        fn queue(&mut self, key: u8) {
            if self.in_front.contains(&key) {
                self.front.push_back(key);
            } else {
                self.ready.push_back(key);
            }
        }

        fn is_due(&self, key: u8) -> bool {
            self.front.contains(&key) || self.ready.contains(&key) || self.dirty.contains(&key)
        }

        fn add(&mut self, key: u8, trigger: Trigger) {
            self.add_in(key, trigger, trigger == Trigger::Api);
        }

        fn add_in(&mut self, key: u8, trigger: Trigger, front: bool) {
            self.promote();
            self.delayed.remove(&key);
            self.make_due(key, trigger, front);
        }

        fn add_after(&mut self, key: u8, ms: u64, trigger: Trigger) {
            if ms == 0 {
                return self.add(key, trigger);
            }
            self.promote();
            let deadline = self.now + ms;
            let later = self.delayed.get(&key).is_some_and(|&(d, _)| d <= deadline);
            if !self.is_due(key) && !later {
                self.seq += 1;
                self.delayed.insert(key, (deadline, self.seq));
                self.triggers.insert(key, trigger);
            }
        }

        fn next(&mut self) -> Option<(u8, Trigger, bool)> {
            self.promote();
            let key = self.front.pop_front().or_else(|| self.ready.pop_front())?;
            self.processing.push(key);
            let trigger = self
                .triggers
                .remove(&key)
                .expect("a ready key has a trigger");
            Some((key, trigger, self.in_front.remove(&key)))
        }

        fn done(&mut self, index: usize) {
            self.promote();
            let key = self.processing.remove(index);
            // A dirty key keeps its trigger in `triggers` as it moves to its lane.
            if self.dirty.remove(&key) {
                self.queue(key);
            }
        }
    }

    fn run_steps(steps: Vec<Step>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        runtime.block_on(async {
            let queue: WorkQueue<u8> = WorkQueue::new(steady_policy());
            let mut model = Model::default();
            let mut leases: Vec<Lease<u8>> = Vec::new();
            for step in steps {
                match step {
                    Step::Add(key, trigger) => {
                        queue.add(key, trigger);
                        model.add(key, trigger);
                    }
                    Step::AddFront(key, trigger) => {
                        queue.add_front(key, trigger);
                        model.add_in(key, trigger, true);
                    }
                    Step::AddAfter(key, ms, trigger) => {
                        queue.add_after(key, Duration::from_millis(ms), trigger);
                        model.add_after(key, ms, trigger);
                    }
                    Step::Next => {
                        let lease = ready_now(&queue);
                        assert_eq!(
                            lease
                                .as_ref()
                                .map(|l| (*l.key(), l.trigger(), l.from_front_lane())),
                            model.next()
                        );
                        leases.extend(lease);
                    }
                    Step::Done(i) if !leases.is_empty() => {
                        let index = i % leases.len();
                        leases.remove(index).done();
                        model.done(index);
                    }
                    Step::Done(_) => {}
                    Step::Advance(ms) => {
                        tokio::time::advance(Duration::from_millis(ms)).await;
                        model.now += ms;
                    }
                }
                let held: HashSet<u8> = leases.iter().map(|l| *l.key()).collect();
                assert_eq!(held.len(), leases.len(), "a key is leased twice");
                lock(&queue.shared.state).check_invariants();
                model.promote();
                let stats = queue.stats();
                assert_eq!(stats.ready, model.front.len() + model.ready.len());
                assert_eq!(stats.delayed, model.delayed.len());
                assert_eq!(stats.processing, model.processing.len());
            }
        });
    }

    proptest! {
        #[test]
        fn the_queue_behaves_like_its_model(steps in prop::collection::vec(step(), 1..80)) {
            run_steps(steps);
        }
    }
}
