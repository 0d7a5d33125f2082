//! What the controller knows about convergence: per user, the phase last
//! written and whether the last reconcile had anything left to do; and
//! whether the first full sync has finished (readiness).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use crate::status::Phase;

/// A summary for logs and metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgressSummary {
    /// Users seen.
    pub users: usize,
    /// Users whose last reconcile found nothing to do.
    pub converged: usize,
    /// Users in phase `failed`.
    pub failed: usize,
    /// Users by phase.
    pub by_phase: BTreeMap<Phase, usize>,
    /// Users by the effective state of their desired row.
    pub by_desired: BTreeMap<&'static str, usize>,
    /// True once every user of the first full sync was reconciled once.
    pub synced: bool,
}

#[derive(Clone, Copy, Default)]
struct UserProgress {
    phase: Option<Phase>,
    converged: bool,
    desired: Option<&'static str>,
}

#[derive(Default)]
struct State {
    users: HashMap<String, UserProgress>,
    first_sync: Option<HashSet<String>>,
    synced: bool,
}

/// Convergence bookkeeping shared by the workers, the logger and the HTTP surface.
#[derive(Default)]
pub struct Progress {
    state: Mutex<State>,
}

impl Progress {
    /// Empty bookkeeping; not synced.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The users of the first full sync; readiness waits for each to be reconciled once.
    pub fn begin_first_sync(&self, users: impl IntoIterator<Item = String>) {
        let mut state = self.lock();
        let pending: HashSet<String> = users.into_iter().collect();
        state.synced = pending.is_empty();
        state.first_sync = Some(pending);
    }

    /// Records a finished reconcile: `phase` written (`None`: user gone),
    /// `converged` or not, and the row's effective state.
    pub fn record(
        &self,
        user: &str,
        phase: Option<Phase>,
        converged: bool,
        desired: Option<&'static str>,
    ) {
        let mut state = self.lock();
        match phase {
            Some(phase) => {
                let progress = UserProgress {
                    phase: Some(phase),
                    converged,
                    desired,
                };
                state.users.insert(user.to_owned(), progress);
            }
            None => {
                state.users.remove(user);
            }
        }
        Self::first_sync_done(&mut state, user);
    }

    /// Records a failed reconcile (it will be retried).
    pub fn record_error(&self, user: &str) {
        let mut state = self.lock();
        state.users.entry(user.to_owned()).or_default().converged = false;
        Self::first_sync_done(&mut state, user);
    }

    fn first_sync_done(state: &mut State, user: &str) {
        if let Some(pending) = state.first_sync.as_mut() {
            pending.remove(user);
            if pending.is_empty() {
                state.first_sync = None;
                state.synced = true;
            }
        }
    }

    /// True once every user of the first full sync was reconciled once.
    pub fn synced(&self) -> bool {
        self.lock().synced
    }

    /// Counts for logs and metrics.
    pub fn summary(&self) -> ProgressSummary {
        let state = self.lock();
        let mut summary = ProgressSummary {
            users: state.users.len(),
            synced: state.synced,
            ..Default::default()
        };
        for user in state.users.values() {
            if user.converged {
                summary.converged += 1;
            }
            if let Some(phase) = user.phase {
                *summary.by_phase.entry(phase).or_default() += 1;
                if phase == Phase::Failed {
                    summary.failed += 1;
                }
            }
            if let Some(desired) = user.desired {
                *summary.by_desired.entry(desired).or_default() += 1;
            }
        }
        summary
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_sync_is_done_when_every_user_was_reconciled_once() {
        let p = Progress::new();
        p.begin_first_sync(["a".to_owned(), "b".to_owned()]);
        assert!(!p.synced());
        p.record("a", Some(Phase::Running), true, Some("running"));
        assert!(!p.synced());
        p.record_error("b");
        assert!(p.synced());
    }

    #[test]
    fn an_empty_first_sync_is_done_at_once() {
        let p = Progress::new();
        p.begin_first_sync([]);
        assert!(p.synced());
    }

    #[test]
    fn the_summary_counts_phases_and_forgets_removed_users() {
        let p = Progress::new();
        p.record("a", Some(Phase::Running), true, Some("running"));
        p.record("b", Some(Phase::Failed), false, Some("invalid"));
        p.record("c", Some(Phase::Running), false, Some("running"));
        p.record("c", None, true, None);
        let s = p.summary();
        assert_eq!((s.users, s.converged, s.failed), (2, 1, 1));
        assert_eq!(s.by_phase[&Phase::Running], 1);
        assert_eq!(s.by_desired["invalid"], 1);
    }
}
