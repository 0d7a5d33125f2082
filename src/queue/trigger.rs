//! Why a key was queued: the reason carried with each queue entry, as
//! kube-runtime's `ReconcileRequest` carries its `ReconcileReason`, so a
//! reconcile's span and the `clawfleet_reconcile_triggers_total` counter can
//! say what made it run.
//!
//! One entry per key means several reasons can meet in one entry. The rule:
//! **an entry keeps the reason that makes it due first.** An add to a key
//! that is already due (ready, or due while it is being processed) keeps the
//! reason it has; an add that makes a delayed key due sooner (an immediate
//! add, or an earlier deadline) replaces the reason with its own; an add with
//! a later or equal deadline changes nothing. This is the queue's own merge
//! rule for deadlines ("the earliest deadline wins") applied to the reason,
//! so the reason always names the add whose time the entry runs at.
//!
//! One exception, for the same reason: [`Trigger::Api`] entries wait in the
//! queue's front lane, so an immediate `Api` add to an entry due for another
//! reason moves it there and names it `Api`, the add it now runs for.

use std::fmt;

/// Why a key was queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// A desired row changed (the row feed).
    RowChange,
    /// A Docker event about one of the user's containers.
    DockerEvent,
    /// The reconciler asked to look again later (an idle deadline, a pending
    /// transition, a back-off before a restart).
    Timer,
    /// A failed reconcile retried with back-off, or a user waiting for a
    /// host port tried again once one was freed.
    Retry,
    /// The periodic full resync (or the first full sync, or a relist after
    /// the event stream came back).
    Resync,
    /// An API call that changed the user's row (`PUT`, `ensure-running`).
    /// Its caller may be waiting: it is handed out before every other trigger.
    Api,
}

impl Trigger {
    /// Every trigger, in the order of the metric's label values.
    pub const ALL: [Trigger; 6] = [
        Trigger::RowChange,
        Trigger::DockerEvent,
        Trigger::Timer,
        Trigger::Retry,
        Trigger::Resync,
        Trigger::Api,
    ];

    /// The label value: `row_change`, `docker_event`, `timer`, `retry`, `resync` or `api`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RowChange => "row_change",
            Self::DockerEvent => "docker_event",
            Self::Timer => "timer",
            Self::Retry => "retry",
            Self::Resync => "resync",
            Self::Api => "api",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
