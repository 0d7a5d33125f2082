//! The work queue's bookkeeping: which keys are ready, which wait for a
//! deadline, which are being processed.
//!
//! Pure and synchronous: the caller holds the lock, passes `now`, and acts on
//! the returned [`Effects`] (wake waiters, tell the observer) after releasing
//! it. Invariants:
//! - every key has at most one [`Slot`], and a slot is pending in at most one
//!   way: ready or delayed, never both;
//! - `ready` holds exactly the keys that are pending-ready and not being
//!   processed, each once, in the order they became due;
//! - `timers` holds exactly the delayed keys, each once, under its slot's
//!   `(deadline, seq)`;
//! - a key being processed is never in `ready`; if it becomes due meanwhile it
//!   stays pending-ready in its slot ("dirty") and enters `ready` on `done`;
//! - before any operation, the keys whose deadline has passed are moved to
//!   ready in deadline order, so FIFO order is the order keys became due,
//!   however late the queue was looked at.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

use super::QueueStats;

/// How a key waits to be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Not waiting.
    No,
    /// Due since `since`: in `ready`, or dirty while it is processed.
    Ready { since: Instant },
    /// Waiting for `deadline`; `seq` makes its timer entry unique.
    Delayed { deadline: Instant, seq: u64 },
}

/// Everything the queue knows about one key.
#[derive(Debug)]
struct Slot {
    pending: Pending,
    /// When the key was handed out, while it is being processed.
    processing_since: Option<Instant>,
}

impl Slot {
    fn is_idle(&self) -> bool {
        self.pending == Pending::No && self.processing_since.is_none()
    }
}

/// What the caller must do once it has released the lock.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Effects {
    /// Keys that became due (each counts as one add for the observer).
    pub(super) added: usize,
    /// Keys pushed onto `ready`: each may let one waiting worker proceed.
    pub(super) became_ready: usize,
    /// A deadline earlier than every other was set: sleeping workers must
    /// shorten their sleep.
    pub(super) earlier_deadline: bool,
    /// A key was handed out after waiting this long.
    pub(super) handed_out: Option<Duration>,
    /// A key was done after being processed this long.
    pub(super) finished: Option<Duration>,
}

/// The answer to "give me a key".
#[derive(Debug)]
pub(super) enum Take<K> {
    /// This is now being processed.
    Ready(K),
    /// Nothing is ready; wake at this deadline (if any) or when notified.
    Wait(Option<Instant>),
    /// The queue is shut down.
    ShutDown,
}

/// The queue's state; see the module docs for its invariants.
#[derive(Debug)]
pub(super) struct QueueState<K> {
    slots: HashMap<K, Slot>,
    ready: VecDeque<K>,
    timers: BTreeMap<(Instant, u64), K>,
    next_seq: u64,
    shut_down: bool,
}

impl<K: Clone + Eq + Hash> QueueState<K> {
    pub(super) fn new() -> Self {
        Self {
            slots: HashMap::new(),
            ready: VecDeque::new(),
            timers: BTreeMap::new(),
            next_seq: 0,
            shut_down: false,
        }
    }

    /// Makes `key` due now, unless it already is. Cancels a pending delay.
    pub(super) fn add(&mut self, key: K, now: Instant, fx: &mut Effects) {
        if self.shut_down {
            return;
        }
        self.promote_due(now, fx);
        let slot = self.slots.entry(key.clone()).or_insert(Slot {
            pending: Pending::No,
            processing_since: None,
        });
        match slot.pending {
            Pending::Ready { .. } => {}
            Pending::Delayed { deadline, seq } => {
                self.timers.remove(&(deadline, seq));
                make_ready(&mut self.ready, slot, key, now, fx);
            }
            Pending::No => make_ready(&mut self.ready, slot, key, now, fx),
        }
    }

    /// Makes `key` due at `deadline`, unless it is already due or due sooner.
    pub(super) fn add_at(&mut self, key: K, deadline: Instant, now: Instant, fx: &mut Effects) {
        if deadline <= now {
            return self.add(key, now, fx);
        }
        if self.shut_down {
            return;
        }
        self.promote_due(now, fx);
        let slot = self.slots.entry(key.clone()).or_insert(Slot {
            pending: Pending::No,
            processing_since: None,
        });
        match slot.pending {
            Pending::Ready { .. } => return,
            Pending::Delayed { deadline: old, .. } if old <= deadline => return,
            Pending::Delayed { deadline: old, seq } => {
                self.timers.remove(&(old, seq));
            }
            Pending::No => {}
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        slot.pending = Pending::Delayed { deadline, seq };
        self.timers.insert((deadline, seq), key);
        if self.timers.keys().next() == Some(&(deadline, seq)) {
            fx.earlier_deadline = true;
        }
    }

    /// Hands out the first ready key, marking it as being processed.
    pub(super) fn take(&mut self, now: Instant, fx: &mut Effects) -> Take<K> {
        if self.shut_down {
            return Take::ShutDown;
        }
        self.promote_due(now, fx);
        while let Some(key) = self.ready.pop_front() {
            let Some(slot) = self.slots.get_mut(&key) else {
                debug_assert!(false, "a ready key has no slot");
                continue;
            };
            let Pending::Ready { since } = slot.pending else {
                debug_assert!(false, "a key in `ready` is not pending-ready");
                continue;
            };
            slot.pending = Pending::No;
            slot.processing_since = Some(now);
            fx.handed_out = Some(now.saturating_duration_since(since));
            return Take::Ready(key);
        }
        Take::Wait(self.timers.keys().next().map(|&(deadline, _)| deadline))
    }

    /// Ends the processing of `key`; a dirty key goes to the back of `ready`.
    pub(super) fn done(&mut self, key: &K, now: Instant, fx: &mut Effects) {
        self.promote_due(now, fx);
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        let Some(started) = slot.processing_since.take() else {
            return;
        };
        fx.finished = Some(now.saturating_duration_since(started));
        match slot.pending {
            Pending::Ready { .. } => {
                // The wait that counts is the one behind other ready keys,
                // not the one behind this key's own previous run.
                slot.pending = Pending::Ready { since: now };
                self.ready.push_back(key.clone());
                fx.became_ready += 1;
            }
            Pending::Delayed { .. } => {}
            Pending::No => {}
        }
        if slot.is_idle() {
            self.slots.remove(key);
        }
    }

    /// Drops every pending key; keys being processed may still finish.
    pub(super) fn shut_down(&mut self) {
        self.shut_down = true;
        self.ready.clear();
        self.timers.clear();
        self.slots.retain(|_, slot| {
            slot.pending = Pending::No;
            slot.processing_since.is_some()
        });
    }

    pub(super) fn is_shut_down(&self) -> bool {
        self.shut_down
    }

    /// Counts the keys in each state (after moving due keys to ready, so a
    /// busy pool's backlog shows as depth, not as delayed work).
    pub(super) fn stats(&mut self, now: Instant, fx: &mut Effects) -> QueueStats {
        self.promote_due(now, fx);
        let mut stats = QueueStats {
            ready: self.ready.len(),
            delayed: self.timers.len(),
            ..QueueStats::default()
        };
        for since in self.slots.values().filter_map(|s| s.processing_since) {
            let running = now.saturating_duration_since(since);
            stats.processing += 1;
            stats.longest_running = stats.longest_running.max(running);
            stats.unfinished_work += running;
        }
        stats
    }

    /// Moves every key whose deadline has passed to ready, earliest first,
    /// each counted as due from its deadline rather than from now.
    fn promote_due(&mut self, now: Instant, fx: &mut Effects) {
        while let Some(entry) = self.timers.first_entry() {
            let (deadline, _) = *entry.key();
            if deadline > now {
                break;
            }
            let key = entry.remove();
            let Some(slot) = self.slots.get_mut(&key) else {
                debug_assert!(false, "a delayed key has no slot");
                continue;
            };
            make_ready(&mut self.ready, slot, key, deadline, fx);
        }
    }

    /// Panics if an invariant of the module docs does not hold.
    #[cfg(test)]
    pub(super) fn check_invariants(&self) {
        use std::collections::HashSet;
        let ready: HashSet<&K> = self.ready.iter().collect();
        assert_eq!(ready.len(), self.ready.len(), "a key is in `ready` twice");
        for (key, slot) in &self.slots {
            assert!(!slot.is_idle(), "an idle slot was kept");
            let in_ready = ready.contains(key);
            match slot.pending {
                Pending::Ready { .. } => {
                    assert_eq!(in_ready, slot.processing_since.is_none())
                }
                Pending::Delayed { deadline, seq } => {
                    assert!(!in_ready);
                    assert!(self.timers.get(&(deadline, seq)) == Some(key));
                }
                Pending::No => assert!(!in_ready),
            }
        }
        assert!(self.timers.values().all(|k| self.slots.contains_key(k)));
        assert!(self.ready.iter().all(|k| self.slots.contains_key(k)));
    }
}

/// Marks `slot` due since `since`; queues it unless it is being processed.
fn make_ready<K>(
    ready: &mut VecDeque<K>,
    slot: &mut Slot,
    key: K,
    since: Instant,
    fx: &mut Effects,
) {
    slot.pending = Pending::Ready { since };
    fx.added += 1;
    if slot.processing_since.is_none() {
        ready.push_back(key);
        fx.became_ready += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    fn take(state: &mut QueueState<&'static str>, now: Instant) -> Option<&'static str> {
        match state.take(now, &mut Effects::default()) {
            Take::Ready(key) => Some(key),
            Take::Wait(_) | Take::ShutDown => None,
        }
    }

    #[test]
    fn due_keys_join_ready_in_deadline_order_however_late_they_are_seen() {
        let t0 = Instant::now();
        let mut state = QueueState::new();
        let mut fx = Effects::default();
        state.add_at("late", at(t0, 20), t0, &mut fx);
        state.add_at("early", at(t0, 10), t0, &mut fx);
        state.add("now", at(t0, 30), &mut fx);
        state.check_invariants();
        assert_eq!(take(&mut state, at(t0, 30)), Some("early"));
        assert_eq!(take(&mut state, at(t0, 30)), Some("late"));
        assert_eq!(take(&mut state, at(t0, 30)), Some("now"));
    }

    #[test]
    fn a_promoted_key_has_waited_since_its_deadline() {
        let t0 = Instant::now();
        let mut state = QueueState::new();
        state.add_at("a", at(t0, 10), t0, &mut Effects::default());
        let mut fx = Effects::default();
        assert!(matches!(state.take(at(t0, 25), &mut fx), Take::Ready("a")));
        assert_eq!(fx.handed_out, Some(Duration::from_millis(15)));
        assert_eq!(fx.added, 1);
    }

    #[test]
    fn only_a_new_earliest_deadline_asks_sleepers_to_wake() {
        let t0 = Instant::now();
        let mut state = QueueState::new();
        let mut fx = Effects::default();
        state.add_at("a", at(t0, 10), t0, &mut fx);
        assert!(fx.earlier_deadline);
        let mut fx = Effects::default();
        state.add_at("b", at(t0, 20), t0, &mut fx);
        assert!(!fx.earlier_deadline);
        state.add_at("b", at(t0, 5), t0, &mut fx);
        assert!(fx.earlier_deadline);
        state.check_invariants();
    }

    #[test]
    fn a_finished_key_with_nothing_pending_leaves_no_trace() {
        let t0 = Instant::now();
        let mut state = QueueState::new();
        state.add("a", t0, &mut Effects::default());
        assert_eq!(take(&mut state, t0), Some("a"));
        state.done(&"a", t0, &mut Effects::default());
        assert!(state.slots.is_empty());
    }
}
