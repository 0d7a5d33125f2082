//! Call counters and injected failures: every trait call is counted, and
//! can be made to fail before its effect ([`MemoryEngine::fail_next`]),
//! after it ([`MemoryEngine::lose_next_reply`]), or all at once while the
//! engine is unreachable.

use super::state::State;
use super::{MemoryEngine, HOST};
use clawfleet::docker::{EngineError, EngineVersion};

use clawfleet::docker::Op;

#[cfg(doc)]
use clawfleet::docker::Engine;

/// The slot of `op` in the per-operation counters and queues.
fn slot(op: Op) -> usize {
    op as usize
}

pub(super) struct Fault {
    error: EngineError,
    after_effect: bool,
}

impl State {
    /// True (and one fewer to come) when a panic is queued for `op`.
    pub(super) fn take_panic(&mut self, op: Op) -> bool {
        let queued = &mut self.panics[slot(op)];
        let panic = *queued > 0;
        *queued = queued.saturating_sub(1);
        panic
    }

    /// Counts a call of `op` and applies unreachability and the next
    /// injected fault: `Err` fails the call now, `Ok(Some)` after its effect.
    pub(super) fn admit(&mut self, op: Op) -> Result<Option<EngineError>, EngineError> {
        self.calls[slot(op)] += 1;
        if self.unreachable {
            return Err(EngineError::Unreachable {
                host: HOST.to_owned(),
                message: "connection refused".to_owned(),
            });
        }
        match self.faults[slot(op)].pop_front() {
            None => Ok(None),
            Some(Fault {
                error,
                after_effect: false,
            }) => Err(error),
            Some(Fault {
                error,
                after_effect: true,
            }) => Ok(Some(error)),
        }
    }
}

impl MemoryEngine {
    /// How many times `op` was called, failed calls included.
    pub fn calls(&self, op: Op) -> u64 {
        self.lock().calls[slot(op)]
    }

    /// Sets every call counter back to zero.
    pub fn reset_calls(&self) {
        self.lock().calls = [0; Op::ALL.len()];
    }

    /// Makes the next call of `op` fail with `error`, without effect.
    /// Several calls queue several failures.
    pub fn fail_next(&self, op: Op, error: EngineError) {
        self.lock().faults[slot(op)].push_back(Fault {
            error,
            after_effect: false,
        });
    }

    /// Makes the next call of `op` panic (not under the engine's lock), as a
    /// bug in the code under test would. Several calls queue several panics.
    /// [`Op::Events`] subscriptions never panic.
    pub fn panic_next(&self, op: Op) {
        self.lock().panics[slot(op)] += 1;
    }

    /// Makes the next call of `op` take effect and then fail with `error`, as
    /// when the engine acts but the reply is lost. A call that fails anyway
    /// uses it up. For [`Op::Events`] it is the same as [`fail_next`](Self::fail_next).
    pub fn lose_next_reply(&self, op: Op, error: EngineError) {
        self.lock().faults[slot(op)].push_back(Fault {
            error,
            after_effect: true,
        });
    }

    /// While `true`, every call fails with [`EngineError::Unreachable`];
    /// turning it on also cuts the open event streams.
    pub fn set_unreachable(&self, unreachable: bool) {
        let mut state = self.lock();
        state.unreachable = unreachable;
        if unreachable {
            state.events.cut_all();
        }
    }

    /// Sets what [`Engine::version`] reports.
    pub fn set_version(&self, version: EngineVersion) {
        self.lock().version = version;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::*;
    use clawfleet::docker::{Engine, RunState};

    #[tokio::test]
    async fn fail_next_fails_only_the_next_call_of_that_op_without_effect() {
        let engine = engine().await;
        engine.fail_next(
            Op::Create,
            EngineError::Api {
                op: "create",
                target: "x".to_owned(),
                status: 500,
                message: "boom".to_owned(),
            },
        );

        let error = engine.create_container(&spec("alice")).await.unwrap_err();
        assert_eq!(api_status(&error), Some(500));
        assert!(engine.containers().is_empty());
        engine.create_container(&spec("alice")).await.unwrap();
        assert_eq!(engine.calls(Op::Create), 2);
    }

    #[tokio::test]
    async fn lose_next_reply_takes_effect_but_reports_the_error() {
        let engine = engine().await;
        let id = engine.create_container(&spec("alice")).await.unwrap();
        engine.lose_next_reply(
            Op::Start,
            EngineError::Unreachable {
                host: HOST.to_owned(),
                message: "connection reset".to_owned(),
            },
        );

        assert!(engine.start_container(&id).await.is_err());
        assert_eq!(inspect(&engine, &id).await.state, RunState::Running);
        engine.start_container(&id).await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_engine_fails_every_call_and_cuts_event_streams() {
        let engine = engine().await;
        let id = engine.create_container(&spec("alice")).await.unwrap();
        let mut open = engine.events(&filter(INSTANCE, None), None);

        engine.set_unreachable(true);

        let unreachable = |error: EngineError| matches!(error, EngineError::Unreachable { .. });
        assert!(unreachable(engine.version().await.unwrap_err()));
        assert!(unreachable(
            engine
                .list_containers(&filter(INSTANCE, None))
                .await
                .unwrap_err()
        ));
        assert!(unreachable(
            engine.inspect_container(&id).await.unwrap_err()
        ));
        assert!(unreachable(engine.start_container(&id).await.unwrap_err()));
        assert!(unreachable(engine.remove_container(&id).await.unwrap_err()));
        assert!(unreachable(engine.image_present(IMAGE).await.unwrap_err()));
        let (items, ended) = ready_items(&mut open);
        assert!(matches!(items[..], [Err(EngineError::Unreachable { .. })]) && ended);
        let (items, ended) = ready_items(&mut engine.events(&filter(INSTANCE, None), None));
        assert!(matches!(items[..], [Err(EngineError::Unreachable { .. })]) && ended);

        engine.set_unreachable(false);
        engine.start_container(&id).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_subscription_yields_its_error_and_ends() {
        let engine = engine().await;
        engine.fail_next(
            Op::Events,
            EngineError::Unreachable {
                host: HOST.to_owned(),
                message: "refused".to_owned(),
            },
        );

        let (items, ended) = ready_items(&mut engine.events(&filter(INSTANCE, None), None));
        assert!(matches!(items[..], [Err(EngineError::Unreachable { .. })]) && ended);
        assert_eq!(engine.calls(Op::Events), 1);
    }

    #[tokio::test]
    async fn calls_count_trait_calls_but_not_out_of_band_actions() {
        let engine = engine().await;
        let id = running(&engine, &spec("alice")).await;
        engine.crash(&id, 1).unwrap();
        engine
            .insert_unlabelled("mosaic-user-old", IMAGE, false)
            .unwrap();
        engine.version().await.unwrap();

        assert_eq!(engine.calls(Op::Create), 1);
        assert_eq!(engine.calls(Op::Start), 1);
        assert_eq!(engine.calls(Op::Version), 1);
        assert_eq!(engine.calls(Op::EnsureNetwork), 1);
        assert_eq!(engine.calls(Op::Stop), 0);

        engine.reset_calls();
        assert!(Op::ALL.iter().all(|&op| engine.calls(op) == 0));
    }

    #[tokio::test]
    async fn version_reports_what_the_test_set() {
        let engine = MemoryEngine::new();
        let old = EngineVersion {
            version: "20.10.24".to_owned(),
            api_version: "1.41".to_owned(),
        };

        engine.set_version(old.clone());

        assert_eq!(engine.version().await.unwrap(), old);
    }
}
