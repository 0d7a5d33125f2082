//! The API's line to the leader's work queue.
//!
//! When this process leads, an API call that changed a user's row queues
//! that user at once, with the trigger `api`, instead of leaving it to the
//! row feed to notice the new revision; the feed's own add then merges into
//! the queued entry (see [`Trigger`]). A standby has no queue: its API's
//! changes reach the leader through the feed, as every other writer's do.
//! Touches are not nudged, so a storm of activity updates stays spaced by
//! the feed (README "Operations").

use std::sync::{Arc, Mutex, PoisonError};

use crate::queue::{Trigger, WorkQueue};

/// The leader's queue while this process leads; nothing otherwise.
#[derive(Debug, Default)]
pub struct Nudge {
    queue: Mutex<Option<Arc<WorkQueue<String>>>>,
}

impl Nudge {
    /// A nudge with no queue yet (a standby).
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts queueing into `queue` (a term of leadership began).
    pub fn attach(&self, queue: Arc<WorkQueue<String>>) {
        *self.queue.lock().unwrap_or_else(PoisonError::into_inner) = Some(queue);
    }

    /// Stops queueing (the term ended).
    pub fn detach(&self) {
        *self.queue.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Queues `user_id` for a reconcile now, if this process leads.
    pub fn user(&self, user_id: &str) {
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(queue) = queue {
            queue.add(user_id.to_owned(), Trigger::Api);
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::FutureExt;

    use super::*;
    use crate::queue::BackoffPolicy;

    #[tokio::test]
    async fn a_nudge_queues_the_user_as_an_api_trigger_only_while_attached() {
        let queue = Arc::new(WorkQueue::new(BackoffPolicy::default()));
        let nudge = Nudge::new();
        nudge.user("before");
        nudge.attach(queue.clone());
        nudge.user("alice");
        nudge.detach();
        nudge.user("after");
        let lease = queue
            .next()
            .now_or_never()
            .flatten()
            .expect("alice is queued");
        assert_eq!(
            (lease.key().as_str(), lease.trigger()),
            ("alice", Trigger::Api)
        );
        drop(lease);
        assert_eq!(queue.stats().ready, 0, "only the attached nudge queued");
    }
}
