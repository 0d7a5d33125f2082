//! What the reconciler remembers about each user between passes, in memory
//! only: the crash streak, the orphan's first sighting, a failure that needs
//! a human, the wait for a start, a restart not yet written.
//!
//! Invariant: a user with nothing to remember has no entry, so the map holds
//! only users in the middle of something.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::docker::{ObservedContainer, RunState};
use crate::plan::CrashHistory;

/// What is remembered about one user.
#[derive(Clone, Debug, Default)]
struct Memory {
    crash: CrashHistory,
    orphan_since: Option<DateTime<Utc>>,
    /// A failure that needs a human (missing image, exhausted ports) for
    /// this revision of the row: not retried before `until`.
    blocked: Option<Blocked>,
    /// When the user was first seen desired running and not running.
    waiting_since: Option<DateTime<Utc>>,
    /// The restart count to report, when a restart happened but the status
    /// write that would have recorded it failed (database locked or away).
    unrecorded_restarts: Option<i64>,
    /// Why the container taken over for this revision of the row moved to
    /// another host port: reported until the row changes.
    moved: Option<(i64, String)>,
}

impl Memory {
    fn is_empty(&self) -> bool {
        self.crash == CrashHistory::default()
            && self.orphan_since.is_none()
            && self.blocked.is_none()
            && self.waiting_since.is_none()
            && self.unrecorded_restarts.is_none()
            && self.moved.is_none()
    }
}

/// A failure that needs a human, held for one revision of the row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Blocked {
    /// The row's revision it failed for.
    pub revision: i64,
    /// Not retried before this instant.
    pub until: DateTime<Utc>,
    /// What to report meanwhile.
    pub message: String,
}

/// Every user's [`Memory`].
#[derive(Debug, Default)]
pub(super) struct Memories(Mutex<HashMap<String, Memory>>);

impl Memories {
    fn remember<T>(&self, user_id: &str, f: impl FnOnce(&mut Memory) -> T) -> T {
        let mut memory = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = memory.entry(user_id.to_owned()).or_default();
        let out = f(entry);
        if entry.is_empty() {
            memory.remove(user_id);
        }
        out
    }

    /// The restart count to write: `written`, unless a restart counted
    /// since has not reached the table yet.
    pub(super) fn restarts_to_report(&self, user_id: &str, written: i64) -> i64 {
        self.remember(user_id, |m| match m.unrecorded_restarts {
            Some(n) if n > written => n,
            _ => {
                m.unrecorded_restarts = None;
                written
            }
        })
    }

    /// When the user was first seen without a desired row (`now` the first time).
    pub(super) fn orphan_since(&self, user_id: &str, now: DateTime<Utc>) -> DateTime<Utc> {
        self.remember(user_id, |m| *m.orphan_since.get_or_insert(now))
    }

    /// The block on `revision` of a user's row, if one holds at `now`; the
    /// user has a row, so it is no orphan. A changed row or an expired wait
    /// lifts the block.
    pub(super) fn blocked(
        &self,
        user_id: &str,
        revision: i64,
        now: DateTime<Utc>,
    ) -> Option<Blocked> {
        self.remember(user_id, |m| {
            m.orphan_since = None;
            if m.blocked
                .as_ref()
                .is_some_and(|b| b.revision != revision || b.until <= now)
            {
                m.blocked = None;
            }
            m.blocked.clone()
        })
    }

    /// Reports `message` for `revision` of the user's row while no other
    /// message is due (see [`note_for`](Self::note_for)).
    pub(super) fn note(&self, user_id: &str, revision: i64, message: String) {
        self.remember(user_id, |m| m.moved = Some((revision, message)));
    }

    /// The note held for `revision` of the user's row; a changed row drops it.
    pub(super) fn note_for(&self, user_id: &str, revision: i64) -> Option<String> {
        self.remember(user_id, |m| {
            if m.moved.as_ref().is_some_and(|(r, _)| *r != revision) {
                m.moved = None;
            }
            m.moved.as_ref().map(|(_, message)| message.clone())
        })
    }

    /// Holds `blocked` for the user.
    pub(super) fn block(&self, user_id: &str, blocked: Blocked) {
        self.remember(user_id, |m| m.blocked = Some(blocked));
    }

    /// Follows a user desired running until it runs: how long it waited,
    /// on the pass that first sees it running.
    pub(super) fn track_start(
        &self,
        user_id: &str,
        wants_running: bool,
        canonical: Option<&ObservedContainer>,
        now: DateTime<Utc>,
    ) -> Option<Duration> {
        let running = canonical.is_some_and(|c| c.state == RunState::Running);
        let since = self.remember(user_id, |m| match (wants_running, running) {
            (true, true) => m.waiting_since.take(),
            (true, false) => {
                m.waiting_since.get_or_insert(now);
                None
            }
            (false, _) => {
                m.waiting_since = None;
                None
            }
        })?;
        Some((now - since).to_std().unwrap_or_default())
    }

    /// The user's crash streak, ended by a container that has run for
    /// `stable_after`.
    pub(super) fn crash_history(
        &self,
        user_id: &str,
        canonical: Option<&ObservedContainer>,
        now: DateTime<Utc>,
        stable_after: Duration,
    ) -> CrashHistory {
        let stable = canonical.is_some_and(|c| {
            c.state == RunState::Running
                && c.started_at
                    .is_some_and(|at| (now - at).to_std().unwrap_or_default() >= stable_after)
        });
        self.remember(user_id, |m| {
            if stable {
                m.crash = CrashHistory::default();
            }
            m.crash
        })
    }

    /// Counts a restart issued at `now`, the `restarts`-th of the user's
    /// life, until a later pass reads it back from the table.
    pub(super) fn count_restart(&self, user_id: &str, restarts: i64, now: DateTime<Utc>) {
        self.remember(user_id, |m| {
            m.crash.consecutive += 1;
            m.crash.last_restart_at = Some(now);
            m.unrecorded_restarts = Some(restarts);
        });
    }

    /// Forgets the user (its rows are gone).
    pub(super) fn forget(&self, user_id: &str) {
        self.remember(user_id, |m| *m = Memory::default());
    }

    #[cfg(test)]
    fn users(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::testing::{container, now, secs};

    const STABLE: Duration = Duration::from_secs(600);

    #[test]
    fn restarts_build_a_crash_streak_that_a_stable_run_ends() {
        let m = Memories::default();
        m.count_restart("alice", 1, now());
        m.count_restart("alice", 2, now() + secs(1));
        let exited = container(RunState::Exited, now() - secs(5));
        assert_eq!(
            m.crash_history("alice", Some(&exited), now() + secs(2), STABLE),
            CrashHistory {
                consecutive: 2,
                last_restart_at: Some(now() + secs(1)),
            }
        );
        let young = container(RunState::Running, now() - secs(599));
        assert_eq!(
            m.crash_history("alice", Some(&young), now(), STABLE)
                .consecutive,
            2,
            "a run shorter than stable_after keeps the streak"
        );
        let stable = container(RunState::Running, now() - secs(600));
        assert_eq!(
            m.crash_history("alice", Some(&stable), now(), STABLE),
            CrashHistory::default()
        );
    }

    #[test]
    fn an_unwritten_restart_is_reported_until_the_table_shows_it() {
        let m = Memories::default();
        m.count_restart("alice", 4, now());
        assert_eq!(m.restarts_to_report("alice", 3), 4, "the write failed");
        assert_eq!(m.restarts_to_report("alice", 4), 4, "the write landed");
        // Once read back, the table's count is the truth again.
        assert_eq!(m.restarts_to_report("alice", 0), 0);
    }

    #[test]
    fn a_block_holds_for_its_revision_until_it_expires() {
        let m = Memories::default();
        let blocked = Blocked {
            revision: 7,
            until: now() + secs(300),
            message: "image not found".into(),
        };
        m.block("alice", blocked.clone());
        assert_eq!(m.blocked("alice", 7, now()), Some(blocked.clone()));
        assert_eq!(m.blocked("alice", 7, now() + secs(300)), None, "expired");
        m.block("alice", blocked);
        assert_eq!(m.blocked("alice", 8, now()), None, "the row changed");
        assert_eq!(m.blocked("alice", 7, now()), None, "lifted for good");
    }

    #[test]
    fn a_start_is_timed_from_the_first_pass_that_wanted_it() {
        let m = Memories::default();
        let exited = container(RunState::Exited, now());
        assert_eq!(m.track_start("alice", true, None, now()), None);
        assert_eq!(
            m.track_start("alice", true, Some(&exited), now() + secs(2)),
            None
        );
        let running = container(RunState::Running, now());
        assert_eq!(
            m.track_start("alice", true, Some(&running), now() + secs(5)),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            m.track_start("alice", true, Some(&running), now() + secs(6)),
            None,
            "measured once"
        );
        m.track_start("bob", true, None, now());
        m.track_start("bob", false, None, now() + secs(1));
        assert_eq!(
            m.track_start("bob", true, Some(&running), now() + secs(9)),
            None,
            "a wait given up is not measured"
        );
    }

    #[test]
    fn an_orphan_is_dated_by_its_first_sighting_until_a_row_appears() {
        let m = Memories::default();
        assert_eq!(m.orphan_since("alice", now()), now());
        assert_eq!(m.orphan_since("alice", now() + secs(60)), now());
        assert_eq!(m.blocked("alice", 1, now()), None);
        assert_eq!(m.orphan_since("alice", now() + secs(60)), now() + secs(60));
    }

    #[test]
    fn a_user_with_nothing_to_remember_has_no_entry() {
        let m = Memories::default();
        assert_eq!(m.restarts_to_report("alice", 0), 0);
        assert_eq!(m.users(), 0);
        m.count_restart("alice", 1, now());
        m.orphan_since("bob", now());
        assert_eq!(m.users(), 2);
        m.forget("alice");
        m.blocked("bob", 1, now());
        assert_eq!(m.users(), 0);
    }
}
