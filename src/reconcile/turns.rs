//! Turns at the engine for the calls that build a container: creates and
//! starts (README "Configuration", `--engine-concurrency`).
//!
//! The engine shares itself among the calls in flight: with 16 creates and
//! starts in flight, a `docker start` takes about 9 times as long as alone
//! (README "Benchmark"), and a wake's `start` is one of them. Fewer calls in
//! flight keep wakes fast, at the price of bulk throughput (4 at once build
//! a fleet about 1.5 times slower than 16). So the limit depends on whether
//! anyone is waiting:
//! - within [`WAKE_WINDOW`] of the last wake (a pass of a user an API caller
//!   waits for), bulk work (a resync, a thousand new rows) holds at most
//!   `limit` turns at once, and takes none while a wake's turn is held;
//! - otherwise it may hold `burst` (the reconcile concurrency): with no user
//!   waiting, the fleet is built at full speed;
//! - a wake never waits for a turn.
//!
//! Invariants (pinned by the tests below):
//! - at most `burst` bulk turns are held at once, and no new one is given
//!   beyond `limit` within the window of a wake;
//! - a wake's turn is given at once, whatever is held;
//! - no bulk turn is given while a wake's turn is held;
//! - a turn is given back when dropped, also when its future is cancelled.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::clock::Clock;

/// How long after a wake bulk work stays held to `limit` turns.
pub const WAKE_WINDOW: Duration = Duration::from_secs(60);

/// Whose call it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Priority {
    /// A pass of a user an API caller waits for.
    Wake,
    /// Any other pass.
    Bulk,
}

impl Priority {
    /// Every priority, for metric labels.
    pub const ALL: [Self; 2] = [Self::Wake, Self::Bulk];

    /// The `priority` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Wake => "wake",
            Self::Bulk => "bulk",
        }
    }
}

/// The turns of one engine.
#[derive(Debug)]
pub struct EngineTurns {
    limit: usize,
    burst: usize,
    clock: Clock,
    held: Mutex<Held>,
    freed: Notify,
}

#[derive(Debug, Default)]
struct Held {
    bulk: usize,
    wake: usize,
    /// When the last wake took its turn.
    last_wake: Option<Instant>,
}

impl EngineTurns {
    /// Turns allowing `limit` bulk calls at once near a wake and `burst`
    /// (at least `limit`) otherwise; 0 counts as 1. Time is read from `clock`.
    pub fn new(limit: usize, burst: usize, clock: Clock) -> Self {
        let limit = limit.max(1);
        Self {
            limit,
            burst: burst.max(limit),
            clock,
            held: Mutex::new(Held::default()),
            freed: Notify::new(),
        }
    }

    /// The bulk limit near a wake.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// The bulk limit right now.
    fn bulk_limit(&self, held: &Held) -> usize {
        match held.last_wake {
            Some(at) if self.clock.now().duration_since(at) < WAKE_WINDOW => self.limit,
            _ => self.burst,
        }
    }

    /// Waits for a turn of `priority`; the call it guards runs while the
    /// returned [`Turn`] lives.
    pub async fn take(&self, priority: Priority) -> Turn<'_> {
        loop {
            // Registered before looking, so a turn given back in between
            // still wakes us.
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            freed.as_mut().enable();
            {
                let mut held = self.held();
                let bulk_limit = self.bulk_limit(&held);
                match priority {
                    Priority::Wake => {
                        held.wake += 1;
                        held.last_wake = Some(self.clock.now());
                        return Turn {
                            turns: self,
                            priority,
                        };
                    }
                    Priority::Bulk if held.wake == 0 && held.bulk < bulk_limit => {
                        held.bulk += 1;
                        return Turn {
                            turns: self,
                            priority,
                        };
                    }
                    Priority::Bulk => {}
                }
            }
            freed.await;
        }
    }

    /// Bulk and wake turns held right now.
    pub fn held_now(&self) -> (usize, usize) {
        let held = self.held();
        (held.bulk, held.wake)
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A turn at the engine; given back on drop.
#[derive(Debug)]
pub struct Turn<'a> {
    turns: &'a EngineTurns,
    priority: Priority,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        {
            let mut held = self.turns.held();
            match self.priority {
                Priority::Wake => held.wake -= 1,
                Priority::Bulk => held.bulk -= 1,
            }
        }
        // Every waiter looks again: the end of the last wake frees them all.
        self.turns.freed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// Turns near a wake (`limit`) and without one (`burst`), on a clock that
    /// moves with tokio's paused time.
    fn turns(limit: usize, burst: usize) -> EngineTurns {
        EngineTurns::new(limit, burst, Clock::starting_at(chrono::Utc::now()))
    }

    /// True when `fut` is still pending after the runtime had time to run it.
    async fn still_waiting<F: std::future::Future>(fut: &mut std::pin::Pin<&mut F>) -> bool {
        tokio::time::timeout(Duration::from_millis(50), fut.as_mut())
            .await
            .is_err()
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_turns_are_bounded_and_given_in_turn_as_they_are_given_back() {
        let turns = turns(2, 2);
        let a = turns.take(Priority::Bulk).await;
        let b = turns.take(Priority::Bulk).await;
        assert_eq!(turns.held_now(), (2, 0));
        let third = turns.take(Priority::Bulk);
        let mut third = std::pin::pin!(third);
        assert!(still_waiting(&mut third).await, "a third bulk turn waits");
        drop(a);
        let _c = third.await;
        assert_eq!(turns.held_now(), (2, 0));
        drop(b);
        assert_eq!(turns.held_now(), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wake_gets_its_turn_at_once_and_holds_bulk_work_back_until_it_is_done() {
        let turns = turns(1, 1);
        let bulk = turns.take(Priority::Bulk).await;
        // Every bulk turn is held: the wake does not wait for one.
        let wake = turns.take(Priority::Wake).await;
        assert_eq!(turns.held_now(), (1, 1));
        drop(bulk);
        let next = turns.take(Priority::Bulk);
        let mut next = std::pin::pin!(next);
        assert!(
            still_waiting(&mut next).await,
            "a bulk turn free but a wake in flight: bulk waits"
        );
        let second_wake = turns.take(Priority::Wake).await;
        drop(wake);
        assert!(still_waiting(&mut next).await, "one wake still in flight");
        drop(second_wake);
        let _bulk = next.await;
        assert_eq!(turns.held_now(), (1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_takes_nothing_and_a_dropped_turn_wakes_every_waiter() {
        let turns = Arc::new(turns(2, 2));
        let wake = turns.take(Priority::Wake).await;
        {
            let cancelled = turns.take(Priority::Bulk);
            let mut cancelled = std::pin::pin!(cancelled);
            assert!(still_waiting(&mut cancelled).await);
        }
        assert_eq!(turns.held_now(), (0, 1), "the cancelled wait holds nothing");
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let turns = turns.clone();
                tokio::spawn(async move {
                    let _turn = turns.take(Priority::Bulk).await;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(wake);
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert_eq!(turns.held_now(), (2, 0), "both waiters got a turn");
        for waiter in waiters {
            waiter.await.unwrap();
        }
        assert_eq!(turns.held_now(), (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn bulk_work_bursts_with_nobody_waiting_and_is_held_to_the_limit_for_a_minute_after_a_wake(
    ) {
        let turns = turns(1, 3);
        let held: Vec<_> =
            futures::future::join_all((0..3).map(|_| turns.take(Priority::Bulk))).await;
        assert_eq!(turns.held_now(), (3, 0), "no wake yet: up to the burst");
        drop(turns.take(Priority::Wake).await);
        drop(held);
        let first = turns.take(Priority::Bulk).await;
        let second = turns.take(Priority::Bulk);
        let mut second = std::pin::pin!(second);
        assert!(
            still_waiting(&mut second).await,
            "within the minute after a wake: one at a time"
        );
        tokio::time::sleep(WAKE_WINDOW).await;
        drop(first);
        let _second = second.await;
        let _third = turns.take(Priority::Bulk).await;
        assert_eq!(turns.held_now(), (2, 0), "a minute on: the burst again");
    }

    #[test]
    fn a_limit_of_zero_counts_as_one_and_the_burst_is_never_below_the_limit() {
        let clock = Clock::system();
        assert_eq!(EngineTurns::new(0, 0, clock).limit(), 1);
        assert_eq!(EngineTurns::new(4, 2, clock).burst, 4);
    }
}
