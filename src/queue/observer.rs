//! What the work queue tells the outside world: event callbacks for counters
//! and histograms, and a snapshot for gauges.
//!
//! The names follow controller-runtime's workqueue metrics so the Prometheus
//! side can map them one to one: `adds_total` ([`QueueObserver::added`]),
//! `retries_total` ([`QueueObserver::retried`]), `queue_duration_seconds`
//! ([`QueueObserver::handed_out`]), `work_duration_seconds`
//! ([`QueueObserver::finished`]), and `depth`,
//! `longest_running_processor_seconds`, `unfinished_work_seconds` from
//! [`QueueStats`].
//!
//! Callbacks run after the queue has released its lock, so an observer may be
//! slow or even call back into the queue without stalling or deadlocking it.

use std::time::Duration;

/// Receives the queue's events. Every method does nothing by default, so an
/// observer implements only what it counts.
pub trait QueueObserver: Send + Sync {
    /// A key became due to be handed out: an immediate add, a delayed add
    /// whose deadline passed, or an add to a key being processed (which runs
    /// again after it is done). Adds of a key already due are not counted.
    fn added(&self) {}

    /// A key failed and was scheduled with backoff.
    fn retried(&self) {}

    /// A key was handed out after waiting `waited` since it became due (or,
    /// for a key added while it was processed, since that processing ended).
    fn handed_out(&self, waited: Duration) {
        let _ = waited;
    }

    /// A key's processing ended after `worked`.
    fn finished(&self, worked: Duration) {
        let _ = worked;
    }
}

/// A queue observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoQueueObserver;

impl QueueObserver for NoQueueObserver {}

/// A snapshot of the queue, computed on demand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Keys due and waiting for a worker (the queue's depth). A key added
    /// while it is being processed is not counted until it is done.
    pub ready: usize,
    /// Keys waiting for their deadline (requeues, backoffs, idle deadlines).
    pub delayed: usize,
    /// Keys handed out and not yet done.
    pub processing: usize,
    /// How long the oldest key being processed has been at it.
    pub longest_running: Duration,
    /// Sum over the keys being processed of how long each has been at it.
    pub unfinished_work: Duration,
}
