//! clawfleet's controller, reconciler and event watcher against the
//! simulated engine: the tests that need an engine to misbehave on cue
//! (panic, fail a call, break its event stream) and no real Docker.
//!
//! They live here rather than in clawfleet's own unit tests because the
//! simulator depends on clawfleet, and a unit test of clawfleet cannot
//! depend on it in turn.

mod event_watcher;
mod panics;
mod transient_errors;
