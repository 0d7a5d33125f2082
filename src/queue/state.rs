//! The work queue's bookkeeping: which keys are ready, which wait for a
//! deadline, which are being processed.
//!
//! Pure and synchronous: the caller holds the lock, passes `now`, and acts on
//! the returned [`Effects`] (wake waiters, tell the observer) after releasing
//! it. Invariants:
//! - every key has at most one [`Slot`], and a slot is pending in at most one
//!   way: ready or delayed, never both;
//! - the two lanes of `ready` hold exactly the keys that are pending-ready
//!   and not being processed, each once and in the lane its slot names (the
//!   lane of its trigger, [`Lane::of`], unless added to a lane explicitly),
//!   in the order they became due (or were moved to the front lane); `take`
//!   empties the front lane first;
//! - `timers` holds exactly the delayed keys, each once, under its slot's
//!   `(deadline, seq)`;
//! - a key being processed is never in `ready`; if it becomes due meanwhile it
//!   stays pending-ready in its slot ("dirty") and enters `ready` on `done`;
//! - before any operation, the keys whose deadline has passed are moved to
//!   ready in deadline order, so FIFO order is the order keys became due,
//!   however late the queue was looked at;
//! - a pending key carries the [`Trigger`] of the add that makes it due
//!   first, or of the immediate `Api` add that moved it to the front lane
//!   (the merge rule of [`Trigger`]'s module).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

use super::{QueueStats, Trigger};

/// Which line a due key waits in. Keys with an API caller waiting on them
/// (`ensure-running`) go to the front lane and are handed out before any
/// bulk work (resyncs, row changes, events, timers, retries), so a wake is
/// never queued behind a resync of the whole fleet (README "How it works").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Handed out first.
    Front,
    /// Everything else, first in, first out.
    Bulk,
}

impl Lane {
    /// The lane a key due because of `trigger` waits in.
    pub(super) fn of(trigger: Trigger) -> Self {
        match trigger {
            Trigger::Api => Self::Front,
            Trigger::RowChange
            | Trigger::DockerEvent
            | Trigger::Timer
            | Trigger::Retry
            | Trigger::Resync => Self::Bulk,
        }
    }
}

/// The due keys not being processed, each in the lane of its trigger.
#[derive(Debug)]
struct Lanes<K> {
    /// Due keys with an API waiter.
    front: VecDeque<K>,
    /// Every other due key.
    bulk: VecDeque<K>,
}

impl<K> Default for Lanes<K> {
    fn default() -> Self {
        Self {
            front: VecDeque::new(),
            bulk: VecDeque::new(),
        }
    }
}

impl<K> Lanes<K> {
    /// Queues `key` at the back of `lane`.
    fn push_back(&mut self, key: K, lane: Lane) {
        match lane {
            Lane::Front => self.front.push_back(key),
            Lane::Bulk => self.bulk.push_back(key),
        }
    }

    /// The first key of the front lane, else (unless `front_only`) of the
    /// bulk lane.
    fn pop_front(&mut self, front_only: bool) -> Option<K> {
        match self.front.pop_front() {
            Some(key) => Some(key),
            None if front_only => None,
            None => self.bulk.pop_front(),
        }
    }

    fn len(&self) -> usize {
        self.front.len() + self.bulk.len()
    }

    fn clear(&mut self) {
        self.front.clear();
        self.bulk.clear();
    }

    /// Every queued key, front lane first.
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &K> {
        self.front.iter().chain(self.bulk.iter())
    }
}

/// How a key waits to be handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    /// Not waiting.
    No,
    /// Due since `since` because of `trigger`, in `lane`: in that lane of
    /// `ready`, or dirty while it is processed.
    Ready {
        since: Instant,
        trigger: Trigger,
        lane: Lane,
    },
    /// Waiting for `deadline`, set by `trigger`; `seq` makes its timer entry unique.
    Delayed {
        deadline: Instant,
        seq: u64,
        trigger: Trigger,
    },
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
    /// This is now being processed; it was queued because of the trigger,
    /// and waited in the lane.
    Ready(K, Trigger, Lane),
    /// Nothing is ready; wake at this deadline (if any) or when notified.
    Wait(Option<Instant>),
    /// The queue is shut down.
    ShutDown,
}

/// The queue's state; see the module docs for its invariants.
#[derive(Debug)]
pub(super) struct QueueState<K> {
    slots: HashMap<K, Slot>,
    ready: Lanes<K>,
    timers: BTreeMap<(Instant, u64), K>,
    next_seq: u64,
    shut_down: bool,
}

impl<K: Clone + Eq + Hash> QueueState<K> {
    pub(super) fn new() -> Self {
        Self {
            slots: HashMap::new(),
            ready: Lanes::default(),
            timers: BTreeMap::new(),
            next_seq: 0,
            shut_down: false,
        }
    }

    /// Makes `key` due now because of `trigger`, in the lane of `trigger`;
    /// see [`add_in`](Self::add_in).
    pub(super) fn add(&mut self, key: K, trigger: Trigger, now: Instant, fx: &mut Effects) {
        self.add_in(key, trigger, Lane::of(trigger), now, fx);
    }

    /// Makes `key` due now in `lane` because of `trigger`, unless it already
    /// is (then it keeps its trigger, unless `lane` is the front lane and its
    /// own is not: then it moves to the front lane and takes `trigger`).
    /// Cancels a pending delay (and takes its place).
    pub(super) fn add_in(
        &mut self,
        key: K,
        trigger: Trigger,
        lane: Lane,
        now: Instant,
        fx: &mut Effects,
    ) {
        if self.shut_down {
            return;
        }
        self.promote_due(now, fx);
        let slot = self.slots.entry(key.clone()).or_insert(Slot {
            pending: Pending::No,
            processing_since: None,
        });
        match slot.pending {
            Pending::Ready {
                since,
                lane: Lane::Bulk,
                ..
            } if lane == Lane::Front => {
                slot.pending = Pending::Ready {
                    since,
                    trigger,
                    lane,
                };
                if slot.processing_since.is_none() {
                    // A linear search, but only for an API call whose user
                    // already waits in the bulk lane (a wake during a resync).
                    self.ready.bulk.retain(|k| *k != key);
                    self.ready.front.push_back(key);
                }
            }
            Pending::Ready { .. } => {}
            Pending::Delayed { deadline, seq, .. } => {
                self.timers.remove(&(deadline, seq));
                make_ready(&mut self.ready, slot, key, now, trigger, lane, fx);
            }
            Pending::No => make_ready(&mut self.ready, slot, key, now, trigger, lane, fx),
        }
    }

    /// Makes `key` due at `deadline` because of `trigger`, unless it is
    /// already due or due as soon (then it keeps its trigger).
    pub(super) fn add_at(
        &mut self,
        key: K,
        deadline: Instant,
        trigger: Trigger,
        now: Instant,
        fx: &mut Effects,
    ) {
        if deadline <= now {
            return self.add(key, trigger, now, fx);
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
            Pending::Delayed {
                deadline: old, seq, ..
            } => {
                self.timers.remove(&(old, seq));
            }
            Pending::No => {}
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        slot.pending = Pending::Delayed {
            deadline,
            seq,
            trigger,
        };
        self.timers.insert((deadline, seq), key);
        if self.timers.keys().next() == Some(&(deadline, seq)) {
            fx.earlier_deadline = true;
        }
    }

    /// Hands out the first ready key (with `front_only`, of the front lane),
    /// marking it as being processed.
    pub(super) fn take(&mut self, now: Instant, fx: &mut Effects, front_only: bool) -> Take<K> {
        if self.shut_down {
            return Take::ShutDown;
        }
        self.promote_due(now, fx);
        while let Some(key) = self.ready.pop_front(front_only) {
            let Some(slot) = self.slots.get_mut(&key) else {
                debug_assert!(false, "a ready key has no slot");
                continue;
            };
            let Pending::Ready {
                since,
                trigger,
                lane,
            } = slot.pending
            else {
                debug_assert!(false, "a key in `ready` is not pending-ready");
                continue;
            };
            slot.pending = Pending::No;
            slot.processing_since = Some(now);
            fx.handed_out = Some(now.saturating_duration_since(since));
            return Take::Ready(key, trigger, lane);
        }
        Take::Wait(self.timers.keys().next().map(|&(deadline, _)| deadline))
    }

    /// True when a key waits in the front lane.
    pub(super) fn front_waiting(&self) -> bool {
        !self.ready.front.is_empty()
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
            Pending::Ready { trigger, lane, .. } => {
                // The wait that counts is the one behind other ready keys,
                // not the one behind this key's own previous run.
                slot.pending = Pending::Ready {
                    since: now,
                    trigger,
                    lane,
                };
                self.ready.push_back(key.clone(), lane);
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
            let Pending::Delayed { trigger, .. } = slot.pending else {
                debug_assert!(false, "a timer's key is not delayed");
                continue;
            };
            make_ready(
                &mut self.ready,
                slot,
                key,
                deadline,
                trigger,
                Lane::of(trigger),
                fx,
            );
        }
    }

    /// Panics if an invariant of the module docs does not hold.
    #[cfg(test)]
    pub(super) fn check_invariants(&self) {
        use std::collections::HashSet;
        let ready: HashSet<&K> = self.ready.iter().collect();
        assert_eq!(ready.len(), self.ready.len(), "a key is in `ready` twice");
        let front: HashSet<&K> = self.ready.front.iter().collect();
        for (key, slot) in &self.slots {
            assert!(!slot.is_idle(), "an idle slot was kept");
            let in_ready = ready.contains(key);
            match slot.pending {
                Pending::Ready { lane, .. } => {
                    assert_eq!(in_ready, slot.processing_since.is_none());
                    if in_ready {
                        assert_eq!(front.contains(key), lane == Lane::Front);
                    }
                }
                Pending::Delayed { deadline, seq, .. } => {
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

/// Marks `slot` due in `lane` since `since` because of `trigger`; queues it
/// unless it is being processed.
fn make_ready<K>(
    ready: &mut Lanes<K>,
    slot: &mut Slot,
    key: K,
    since: Instant,
    trigger: Trigger,
    lane: Lane,
    fx: &mut Effects,
) {
    slot.pending = Pending::Ready {
        since,
        trigger,
        lane,
    };
    fx.added += 1;
    if slot.processing_since.is_none() {
        ready.push_back(key, lane);
        fx.became_ready += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROW: Trigger = Trigger::RowChange;
    const TIMER: Trigger = Trigger::Timer;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    fn take(state: &mut QueueState<&'static str>, now: Instant) -> Option<&'static str> {
        match state.take(now, &mut Effects::default(), false) {
            Take::Ready(key, ..) => Some(key),
            Take::Wait(_) | Take::ShutDown => None,
        }
    }

    #[test]
    fn due_keys_join_ready_in_deadline_order_however_late_they_are_seen() {
        let t0 = Instant::now();
        let mut state = QueueState::new();
        let mut fx = Effects::default();
        state.add_at("late", at(t0, 20), TIMER, t0, &mut fx);
        state.add_at("early", at(t0, 10), TIMER, t0, &mut fx);
        state.add("now", ROW, at(t0, 30), &mut fx);
        state.check_invariants();
        assert_eq!(take(&mut state, at(t0, 30)), Some("early"));
        assert_eq!(take(&mut state, at(t0, 30)), Some("late"));
        assert_eq!(take(&mut state, at(t0, 30)), Some("now"));
    }

    #[test]
    fn a_promoted_key_has_waited_since_its_deadline() {
        let t0 = Instant::now();
        let mut state = QueueState::new();
        state.add_at("a", at(t0, 10), TIMER, t0, &mut Effects::default());
        let mut fx = Effects::default();
        assert!(matches!(
            state.take(at(t0, 25), &mut fx, false),
            Take::Ready("a", TIMER, Lane::Bulk)
        ));
        assert_eq!(fx.handed_out, Some(Duration::from_millis(15)));
        assert_eq!(fx.added, 1);
    }

    #[test]
    fn only_a_new_earliest_deadline_asks_sleepers_to_wake() {
        let t0 = Instant::now();
        let mut state = QueueState::new();
        let mut fx = Effects::default();
        state.add_at("a", at(t0, 10), TIMER, t0, &mut fx);
        assert!(fx.earlier_deadline);
        let mut fx = Effects::default();
        state.add_at("b", at(t0, 20), TIMER, t0, &mut fx);
        assert!(!fx.earlier_deadline);
        state.add_at("b", at(t0, 5), TIMER, t0, &mut fx);
        assert!(fx.earlier_deadline);
        state.check_invariants();
    }

    fn take_with_trigger(
        state: &mut QueueState<&'static str>,
        now: Instant,
    ) -> Option<(&'static str, Trigger)> {
        match state.take(now, &mut Effects::default(), false) {
            Take::Ready(key, trigger, _) => Some((key, trigger)),
            Take::Wait(_) | Take::ShutDown => None,
        }
    }

    #[test]
    fn an_entry_keeps_the_trigger_that_makes_it_due_first() {
        use Trigger::{Api, DockerEvent, Resync, Retry, Timer};
        let t0 = Instant::now();
        let mut state = QueueState::new();
        let fx = &mut Effects::default();
        // Already due: later adds, immediate or delayed, keep its reason.
        state.add("due", DockerEvent, t0, fx);
        state.add("due", Resync, t0, fx);
        state.add_at("due", at(t0, 5), Timer, t0, fx);
        // Delayed: an earlier deadline takes over; a later or equal one does not.
        state.add_at("soon", at(t0, 20), Timer, t0, fx);
        state.add_at("soon", at(t0, 10), Retry, t0, fx);
        state.add_at("soon", at(t0, 15), Timer, t0, fx);
        state.add_at("soon", at(t0, 10), Timer, t0, fx);
        // Delayed, then added now: the immediate add makes it due first.
        state.add_at("now", at(t0, 30), Timer, t0, fx);
        state.add("now", Api, at(t0, 1), fx);
        state.check_invariants();
        // `now`, due because of the API, waits in the front lane.
        assert_eq!(take_with_trigger(&mut state, at(t0, 1)), Some(("now", Api)));
        assert_eq!(
            take_with_trigger(&mut state, at(t0, 1)),
            Some(("due", DockerEvent))
        );
        assert_eq!(take_with_trigger(&mut state, at(t0, 9)), None);
        assert_eq!(
            take_with_trigger(&mut state, at(t0, 10)),
            Some(("soon", Retry))
        );

        // While a key is processed, the add that makes it dirty names the rerun.
        state.add("busy", DockerEvent, at(t0, 40), fx);
        assert_eq!(
            take_with_trigger(&mut state, at(t0, 40)),
            Some(("busy", DockerEvent))
        );
        state.add_at("busy", at(t0, 50), Timer, at(t0, 40), fx);
        state.add("busy", Api, at(t0, 41), fx);
        state.add("busy", Resync, at(t0, 42), fx);
        state.done(&"busy", at(t0, 43), fx);
        state.check_invariants();
        assert_eq!(
            take_with_trigger(&mut state, at(t0, 60)),
            Some(("busy", Api))
        );
    }

    #[test]
    fn a_finished_key_with_nothing_pending_leaves_no_trace() {
        let t0 = Instant::now();
        let mut state = QueueState::new();
        state.add("a", ROW, t0, &mut Effects::default());
        assert_eq!(take(&mut state, t0), Some("a"));
        state.done(&"a", t0, &mut Effects::default());
        assert!(state.slots.is_empty());
    }
}
