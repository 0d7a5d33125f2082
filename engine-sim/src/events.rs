//! Docker-style events: the log of recent events that `since` replays, the
//! broadcast to live subscribers, and the subscriptions themselves.
//!
//! Every event is stored and broadcast under the engine's lock, so a
//! subscription's replay and its live events neither miss nor repeat one;
//! event times never decrease. A subscriber that lags, or whose stream is
//! cut, gets one error and its stream ends; the engine never waits for it.

use std::collections::VecDeque;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream, StreamExt};
use tokio::sync::broadcast::{self, error::RecvError};
use tokio::sync::watch;

use super::ids::render_id;
use super::state::State;
use super::{MemoryEngine, HOST};
use clawfleet::docker::Op;
use clawfleet::docker::{ContainerFilter, EngineError, EngineEvent};

/// Events kept for `since` replays, like the real engine.
const RECENT_EVENTS: usize = 256;
/// Events buffered per subscriber before it is dropped as lagging.
pub(super) const DEFAULT_EVENT_CAPACITY: usize = 4096;

impl State {
    pub(super) fn emit(&mut self, slot: u32, action: &'static str, now: DateTime<Utc>) {
        let container = self.container(slot);
        let record = &container.record;
        let event = EngineEvent {
            user_id: record.label(self.known.user_id).map(str::to_owned),
            action: action.to_owned(),
            container_id: render_id(container.key),
            time_nanos: 0,
        };
        let instance = record.label(self.known.instance).map(Box::from);
        let managed = record.label(self.known.managed) == Some("true");
        self.events.publish(event, instance, managed, now);
    }
}

impl MemoryEngine {
    /// How many event subscriptions are open.
    pub fn event_subscribers(&self) -> usize {
        self.lock().events.sender.receiver_count()
    }

    /// Ends every open event subscription with an [`EngineError::Unreachable`]
    /// item, as a cut connection would; later subscriptions work.
    pub fn break_event_streams(&self) {
        self.lock().events.cut_all();
    }

    pub(super) fn subscribe(
        &self,
        filter: &ContainerFilter,
        since_nanos: Option<i64>,
    ) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        let mut state = self.lock();
        match state.admit(Op::Events) {
            Err(error) | Ok(Some(error)) => return stream::iter([Err(error)]).boxed(),
            Ok(None) => {}
        }
        let backlog = since_nanos.map_or_else(VecDeque::new, |since| {
            state
                .events
                .recent
                .iter()
                .filter(|record| record.event.time_nanos >= since && record.matches(filter))
                .map(|record| record.event.clone())
                .collect()
        });
        let subscription = Subscription {
            filter: filter.clone(),
            backlog,
            live: state.events.sender.subscribe(),
            cut: state.events.cut.subscribe(),
        };
        drop(state);
        subscription.into_stream()
    }
}

/// One event as stored and broadcast, with what subscribers filter on.
pub(super) struct Recorded {
    event: EngineEvent,
    instance: Option<Box<str>>,
    managed: bool,
}

impl Recorded {
    fn matches(&self, filter: &ContainerFilter) -> bool {
        self.managed
            && self.instance.as_deref() == Some(filter.instance.as_str())
            && filter
                .user_id
                .as_ref()
                .is_none_or(|user| self.event.user_id.as_ref() == Some(user))
    }
}

pub(super) struct EventLog {
    /// Live subscribers; a lagging one is dropped by the channel, not waited for.
    pub(super) sender: broadcast::Sender<Arc<Recorded>>,
    /// The last [`RECENT_EVENTS`] events, for `since`.
    recent: VecDeque<Arc<Recorded>>,
    /// Bumped to cut every open subscription.
    cut: watch::Sender<u64>,
    last_nanos: i64,
}

impl EventLog {
    pub(super) fn new(capacity: usize) -> Self {
        Self {
            sender: broadcast::channel(capacity).0,
            recent: VecDeque::with_capacity(RECENT_EVENTS),
            cut: watch::Sender::new(0),
            last_nanos: i64::MIN,
        }
    }

    fn publish(
        &mut self,
        mut event: EngineEvent,
        instance: Option<Box<str>>,
        managed: bool,
        now: DateTime<Utc>,
    ) {
        // Never backwards, so `since` = the last time seen never skips an event.
        let nanos = now
            .timestamp_nanos_opt()
            .unwrap_or(i64::MAX)
            .max(self.last_nanos);
        self.last_nanos = nanos;
        event.time_nanos = nanos;
        let record = Arc::new(Recorded {
            event,
            instance,
            managed,
        });
        if self.recent.len() == RECENT_EVENTS {
            self.recent.pop_front();
        }
        self.recent.push_back(Arc::clone(&record));
        // No subscriber is not an error.
        let _ = self.sender.send(record);
    }

    pub(super) fn cut_all(&self) {
        self.cut.send_modify(|generation| *generation += 1);
    }
}

/// One open event stream: the replayed backlog, then live events.
struct Subscription {
    filter: ContainerFilter,
    backlog: VecDeque<EngineEvent>,
    live: broadcast::Receiver<Arc<Recorded>>,
    cut: watch::Receiver<u64>,
}

impl Subscription {
    fn into_stream(self) -> BoxStream<'static, Result<EngineEvent, EngineError>> {
        // The stream ends after its first error, like a dropped connection,
        // and stays ended however often it is polled.
        stream::unfold(Some(self), |subscription| async move {
            let mut subscription = subscription?;
            let item = subscription.next_item().await?;
            let open = item.is_ok();
            Some((item, open.then_some(subscription)))
        })
        .fuse()
        .boxed()
    }

    async fn next_item(&mut self) -> Option<Result<EngineEvent, EngineError>> {
        match self.cut.has_changed() {
            Ok(true) => return Some(Err(stream_cut())),
            Ok(false) => {}
            Err(_) => return None,
        }
        if let Some(event) = self.backlog.pop_front() {
            return Some(Ok(event));
        }
        loop {
            tokio::select! {
                biased;
                changed = self.cut.changed() => return changed.ok().map(|()| Err(stream_cut())),
                received = self.live.recv() => match received {
                    Ok(record) if record.matches(&self.filter) => return Some(Ok(record.event.clone())),
                    Ok(_) => {}
                    Err(RecvError::Lagged(missed)) => {
                        return Some(Err(EngineError::Unreachable {
                            host: HOST.to_owned(),
                            message: format!(
                                "event subscriber dropped after falling {missed} events behind"
                            ),
                        }))
                    }
                    Err(RecvError::Closed) => return None,
                },
            }
        }
    }
}

fn stream_cut() -> EngineError {
    EngineError::Unreachable {
        host: HOST.to_owned(),
        message: "event stream cut".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures::StreamExt;

    use super::RECENT_EVENTS;
    use crate::fixtures::*;
    use crate::MemoryEngine;
    use clawfleet::docker::{Engine, EngineError, EngineEvent};

    #[tokio::test]
    async fn events_reach_only_subscribers_of_the_container_s_instance() {
        let engine = engine().await;
        let mut mine = engine.events(&filter(INSTANCE, None), None);
        let mut theirs = engine.events(&filter("other", None), None);

        let id = running(&engine, &spec("alice")).await;
        engine
            .insert_unlabelled("mosaic-user-old", IMAGE, true)
            .unwrap();

        let (items, ended) = ready_items(&mut mine);
        assert!(!ended);
        let events: Vec<EngineEvent> = items.into_iter().map(Result::unwrap).collect();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].action, "create");
        assert_eq!(events[1].action, "start");
        assert!(events
            .iter()
            .all(|e| e.user_id.as_deref() == Some("alice") && e.container_id == id));
        assert!(events[0].time_nanos <= events[1].time_nanos);
        assert!(ready_actions(&mut theirs).is_empty());
    }

    #[tokio::test]
    async fn events_filtered_by_user_show_only_that_user() {
        let engine = engine().await;
        let mut alice = engine.events(&filter(INSTANCE, Some("alice")), None);

        running(&engine, &spec("bob")).await;
        running(&engine, &spec("alice")).await;

        let (items, _) = ready_items(&mut alice);
        assert_eq!(items.len(), 2);
        assert!(items
            .iter()
            .all(|item| item.as_ref().unwrap().user_id.as_deref() == Some("alice")));
    }

    #[tokio::test]
    async fn events_since_replay_the_recent_past_then_continue_live() {
        let clock = TestClock::new();
        let engine = ready(clock.engine()).await;
        engine.create_container(&spec("alice")).await.unwrap();
        clock.advance(1);
        engine.create_container(&spec("bob")).await.unwrap();
        let since = clock.now().timestamp_nanos_opt().unwrap();

        let mut events = engine.events(&filter(INSTANCE, None), Some(since));
        engine.create_container(&spec("carol")).await.unwrap();

        let users: Vec<Option<String>> = ready_items(&mut events)
            .0
            .into_iter()
            .map(|item| item.unwrap().user_id)
            .collect();
        assert_eq!(users, [Some("bob".to_owned()), Some("carol".to_owned())]);
    }

    #[tokio::test]
    async fn replay_reaches_back_only_over_the_last_256_events() {
        let engine = engine().await;
        for n in 0..300 {
            engine
                .create_container(&spec(&format!("u{n}")))
                .await
                .unwrap();
        }

        let mut events = engine.events(&filter(INSTANCE, None), Some(0));

        let (items, _) = ready_items(&mut events);
        assert_eq!(items.len(), RECENT_EVENTS);
        assert_eq!(items[0].as_ref().unwrap().user_id.as_deref(), Some("u44"));
    }

    #[tokio::test]
    async fn event_times_never_go_backwards_even_when_the_clock_does() {
        let clock = TestClock::new();
        let engine = ready(clock.engine()).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);

        engine.create_container(&spec("alice")).await.unwrap();
        clock.advance(-3600);
        engine.create_container(&spec("bob")).await.unwrap();

        let times: Vec<i64> = ready_items(&mut events)
            .0
            .into_iter()
            .map(|item| item.unwrap().time_nanos)
            .collect();
        assert_eq!(times.len(), 2);
        assert!(times[0] <= times[1]);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_gets_an_unreachable_error_and_its_stream_ends() {
        let engine = ready(MemoryEngine::new().with_event_capacity(4)).await;
        let mut events = engine.events(&filter(INSTANCE, None), None);

        for n in 0..10 {
            engine
                .create_container(&spec(&format!("u{n}")))
                .await
                .unwrap();
        }

        let (items, ended) = ready_items(&mut events);
        assert_eq!(items.len(), 1);
        assert!(matches!(items[0], Err(EngineError::Unreachable { .. })));
        assert!(ended);
        // The engine never waited for the slow reader.
        assert_eq!(engine.containers().len(), 10);
    }

    #[tokio::test]
    async fn breaking_event_streams_ends_them_with_an_error_and_new_ones_work() {
        let engine = engine().await;
        let mut old = engine.events(&filter(INSTANCE, None), None);
        assert_eq!(engine.event_subscribers(), 1);

        engine.break_event_streams();
        let mut new = engine.events(&filter(INSTANCE, None), None);
        engine.create_container(&spec("alice")).await.unwrap();

        let (items, ended) = ready_items(&mut old);
        assert!(matches!(items[..], [Err(EngineError::Unreachable { .. })]));
        assert!(ended);
        assert_eq!(ready_actions(&mut new), ["create"]);
    }

    #[tokio::test]
    async fn an_event_stream_is_static_and_can_move_to_another_task() {
        let engine = Arc::new(engine().await);
        let mut events = engine.events(&filter(INSTANCE, None), None);
        let reader = tokio::spawn(async move { events.next().await });

        engine.create_container(&spec("alice")).await.unwrap();

        let event = reader.await.unwrap().unwrap().unwrap();
        assert_eq!(event.action, "create");
    }
}
