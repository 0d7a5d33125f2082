//! Events: the `since` Docker reads, and the engine's messages read as ours,
//! filtered again exactly.

use bollard::models::EventMessage;

use super::filters::filter_matches;
use crate::docker::{ContainerFilter, EngineEvent, LABEL_USER_ID};

/// Nanoseconds since the epoch as Docker's `seconds.nanoseconds`.
pub(in crate::docker) fn docker_timestamp(nanos: i64) -> String {
    const NANOS_PER_SECOND: i64 = 1_000_000_000;
    format!(
        "{}.{:09}",
        nanos.div_euclid(NANOS_PER_SECOND),
        nanos.rem_euclid(NANOS_PER_SECOND)
    )
}

/// Our event for an engine message, or `None` for one outside `filter` (the
/// engine filtered already; this guards against a filter read differently).
pub(in crate::docker) fn event_from(
    filter: &ContainerFilter,
    message: EventMessage,
) -> Option<EngineEvent> {
    let actor = message.actor.unwrap_or_default();
    let attributes = actor.attributes.unwrap_or_default();
    if !filter_matches(filter, |key| attributes.get(key).map(String::as_str)) {
        return None;
    }
    let time_nanos = message
        .time_nano
        .or_else(|| message.time.map(|s| s.saturating_mul(1_000_000_000)))
        .unwrap_or_default();
    Some(EngineEvent {
        user_id: attributes.get(LABEL_USER_ID).cloned(),
        action: message.action.unwrap_or_default(),
        container_id: actor.id.unwrap_or_default(),
        time_nanos,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_is_written_as_seconds_dot_nanoseconds() {
        assert_eq!(
            docker_timestamp(1_700_000_000_000_000_123),
            "1700000000.000000123"
        );
        assert_eq!(docker_timestamp(0), "0.000000000");
    }

    #[test]
    fn events_outside_the_filter_are_dropped_and_ours_carry_the_user() {
        let filter = ContainerFilter {
            instance: "a".to_owned(),
            user_id: None,
        };
        let message = |instance: &str| -> EventMessage {
            serde_json::from_value(serde_json::json!({
                "Type": "container",
                "Action": "start",
                "Actor": { "ID": "abc", "Attributes": {
                    "io.clawfleet.managed": "true",
                    "io.clawfleet.instance": instance,
                    "io.clawfleet.user-id": "u=1, é",
                    "name": "x"
                } },
                "time": 1_700_000_000,
                "timeNano": 1_700_000_000_000_000_001_i64
            }))
            .expect("event json")
        };
        let event = event_from(&filter, message("a")).expect("our event");
        assert_eq!(event.user_id.as_deref(), Some("u=1, é"));
        assert_eq!(event.action, "start");
        assert_eq!(event.container_id, "abc");
        assert_eq!(event.time_nanos, 1_700_000_000_000_000_001);
        assert_eq!(event_from(&filter, message("b")), None);
    }
}
