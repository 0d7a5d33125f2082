//! The desired state of one user, as other services wrote it, and the
//! validation that turns a raw row into it.
//!
//! Rows come from writers clawfleet does not control, so every column is
//! first read as a [`RawValue`] (whatever the database holds) and only then
//! checked. A bad row becomes an [`InvalidRow`] naming the user and the field;
//! it never panics and never stops the other rows being read.

use std::fmt;
use std::time::Duration;

use chrono::{DateTime, NaiveDateTime, Utc};

use crate::image_ref::ImageRef;
use crate::quote::quote_short;

/// Longest user id, in bytes.
pub const MAX_USER_ID_BYTES: usize = 128;
/// Longest idle timeout accepted: a year. Anything longer is a unit mistake.
pub const MAX_IDLE_TIMEOUT_SECS: i64 = 365 * 24 * 3600;

/// A column value as the database held it, before validation.
#[derive(Clone, Debug, PartialEq)]
pub enum RawValue {
    /// SQL NULL.
    Null,
    /// An integer.
    Integer(i64),
    /// A floating-point number (SQLite stores overflowing integer literals this way).
    Real(f64),
    /// Text.
    Text(String),
    /// A typed timestamp (PostgreSQL `timestamptz`).
    Timestamp(DateTime<Utc>),
    /// Bytes that are not text, with their length.
    Blob(usize),
}

impl RawValue {
    fn describe(&self) -> String {
        match self {
            Self::Null => "null".into(),
            Self::Integer(i) => format!("integer {i}"),
            Self::Real(r) => format!("number {r}"),
            Self::Text(t) => format!("text {}", quote_short(t)),
            Self::Timestamp(t) => format!("timestamp {}", t.to_rfc3339()),
            Self::Blob(n) => format!("{n} bytes of binary data"),
        }
    }
}

/// A `desired_containers` row with every column as the database held it.
#[derive(Clone, Debug, PartialEq)]
pub struct RawDesiredRow {
    /// The primary key, as text.
    pub user_id: String,
    /// `state`.
    pub state: RawValue,
    /// `idle_timeout_secs`.
    pub idle_timeout_secs: RawValue,
    /// `last_active_at`.
    pub last_active_at: RawValue,
    /// `image`.
    pub image: RawValue,
    /// `restart_nonce`.
    pub restart_nonce: RawValue,
    /// `revision` (assigned by the database's trigger).
    pub revision: i64,
}

/// What a user's container should be doing, before idleness is considered.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum DesiredState {
    /// The container should run.
    Running,
    /// The container should exist but not run.
    Stopped,
}

impl DesiredState {
    /// The value stored in the `state` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
        }
    }

    /// Parses the `state` column (exactly `running` or `stopped`).
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "running" => Some(Self::Running),
            "stopped" => Some(Self::Stopped),
            _ => None,
        }
    }
}

impl fmt::Display for DesiredState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One user's validated desired container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredContainer {
    /// The user.
    pub user_id: String,
    /// `running` or `stopped` as written.
    pub state: DesiredState,
    /// Stop after this long without activity; `None`: never.
    pub idle_timeout: Option<Duration>,
    /// Last activity.
    pub last_active_at: Option<DateTime<Utc>>,
    /// Per-user image; `None`: the configured default.
    pub image: Option<ImageRef>,
    /// Bumped to force a recreate.
    pub restart_nonce: i64,
    /// The database revision of this version of the row.
    pub revision: i64,
}

impl DesiredContainer {
    /// When the container falls idle, if it can: `last_active_at + idle_timeout`,
    /// only for a running row with both set.
    pub fn idle_deadline(&self) -> Option<DateTime<Utc>> {
        if self.state != DesiredState::Running {
            return None;
        }
        let timeout = chrono::Duration::from_std(self.idle_timeout?).ok()?;
        self.last_active_at?.checked_add_signed(timeout)
    }

    /// True when `later` (a later version of this row) differs from it only
    /// by activity that keeps it running: both want the container running
    /// with the same timeout, image and nonce, and this version's idle
    /// deadline, if any, is still more than `margin` after `now`. Such a
    /// change needs no action: the container this version runs is the one
    /// `later` wants.
    pub fn only_touched_into(
        &self,
        later: &DesiredContainer,
        now: DateTime<Utc>,
        margin: Duration,
    ) -> bool {
        let margin = chrono::Duration::from_std(margin).unwrap_or(chrono::Duration::MAX);
        self.user_id == later.user_id
            && self.state == DesiredState::Running
            && later.state == DesiredState::Running
            && self.idle_timeout == later.idle_timeout
            && self.image == later.image
            && self.restart_nonce == later.restart_nonce
            && self
                .idle_deadline()
                .is_none_or(|deadline| now.checked_add_signed(margin).is_some_and(|t| deadline > t))
    }

    /// What the row asks of its container at `now`: the one place a row's
    /// effective state is decided. `running` until the idle deadline (if any),
    /// [`Intent::Idle`] from the deadline on; `stopped` is always stopped. A
    /// `last_active_at` ahead of `now` (a writer's clock ahead of ours) only
    /// moves the deadline later.
    pub fn intent(&self, now: DateTime<Utc>) -> Intent {
        match (self.state, self.idle_deadline()) {
            (DesiredState::Stopped, _) => Intent::Stopped,
            (DesiredState::Running, Some(deadline)) if deadline <= now => Intent::Idle,
            (DesiredState::Running, _) => Intent::Running,
        }
    }
}

/// A valid row's effective state at a moment: its `state` with idleness
/// applied (see [`DesiredContainer::intent`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Intent {
    /// Should run.
    Running,
    /// The row says `stopped`.
    Stopped,
    /// The row says `running` but its idle deadline has passed.
    Idle,
}

impl Intent {
    /// The state to converge to, as the `state` column spells it: idle is stopped.
    pub fn state(self) -> DesiredState {
        match self {
            Self::Running => DesiredState::Running,
            Self::Stopped | Self::Idle => DesiredState::Stopped,
        }
    }

    /// `running`, `stopped` or `idle`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Stopped => "stopped",
            Self::Idle => "idle",
        }
    }
}

/// A desired row that failed validation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("desired row {}: {field}: {reason}", quote_short(user_id))]
pub struct InvalidRow {
    /// The row's user id (possibly itself the invalid field).
    pub user_id: String,
    /// The column at fault.
    pub field: &'static str,
    /// What is wrong, in words.
    pub reason: String,
    /// The row's revision.
    pub revision: i64,
}

impl InvalidRow {
    /// The text for `container_status.message`.
    pub fn status_message(&self) -> String {
        format!("invalid desired row: {}: {}", self.field, self.reason)
    }
}

/// Checks a user id: 1–128 bytes, no NUL (the id travels in an environment variable).
pub fn validate_user_id(user_id: &str) -> Result<(), String> {
    if user_id.is_empty() {
        return Err("empty; a user id is 1 to 128 bytes".into());
    }
    if user_id.len() > MAX_USER_ID_BYTES {
        return Err(format!(
            "{} bytes long; the limit is {MAX_USER_ID_BYTES}",
            user_id.len()
        ));
    }
    if user_id.contains('\0') {
        return Err("holds a NUL byte".into());
    }
    Ok(())
}

/// Parses a timestamp: RFC 3339 (any offset), or SQLite's `datetime('now')`
/// form `YYYY-MM-DD HH:MM:SS[.fff]`, which is UTC.
pub fn parse_timestamp(text: &str) -> Result<DateTime<Utc>, String> {
    let text = text.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(text) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%dT%H:%M:%S%.f"] {
        if let Ok(t) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(t.and_utc());
        }
    }
    Err(format!(
        "{} is not a timestamp (expected RFC 3339 like 2026-01-02T03:04:05Z, or YYYY-MM-DD HH:MM:SS in UTC)",
        quote_short(text)
    ))
}

/// Validates a raw row.
pub fn validate(raw: RawDesiredRow) -> Result<DesiredContainer, InvalidRow> {
    let invalid = |field: &'static str, reason: String| InvalidRow {
        user_id: raw.user_id.clone(),
        field,
        reason,
        revision: raw.revision,
    };
    validate_user_id(&raw.user_id).map_err(|r| invalid("user_id", r))?;

    let state = match &raw.state {
        RawValue::Text(text) => DesiredState::parse(text).ok_or_else(|| {
            invalid(
                "state",
                format!("{} is not 'running' or 'stopped'", quote_short(text)),
            )
        })?,
        other => {
            return Err(invalid(
                "state",
                format!("expected 'running' or 'stopped', got {}", other.describe()),
            ))
        }
    };

    let idle_timeout = match &raw.idle_timeout_secs {
        RawValue::Null | RawValue::Integer(0) => None,
        RawValue::Integer(secs) if *secs < 0 => {
            return Err(invalid(
                "idle_timeout_secs",
                format!("{secs} is negative; use null or 0 for no idle timeout"),
            ))
        }
        RawValue::Integer(secs) if *secs > MAX_IDLE_TIMEOUT_SECS => {
            return Err(invalid(
                "idle_timeout_secs",
                format!("{secs} seconds is more than a year (limit {MAX_IDLE_TIMEOUT_SECS})"),
            ))
        }
        RawValue::Integer(secs) => Some(Duration::from_secs(*secs as u64)),
        other => {
            return Err(invalid(
                "idle_timeout_secs",
                format!("expected whole seconds, got {}", other.describe()),
            ))
        }
    };

    let last_active_at = match &raw.last_active_at {
        RawValue::Null => None,
        RawValue::Timestamp(t) => Some(*t),
        RawValue::Text(text) => {
            Some(parse_timestamp(text).map_err(|r| invalid("last_active_at", r))?)
        }
        other => {
            return Err(invalid(
                "last_active_at",
                format!("expected an RFC 3339 timestamp, got {}", other.describe()),
            ))
        }
    };

    let image = match &raw.image {
        RawValue::Null => None,
        RawValue::Text(text) if text.is_empty() => {
            return Err(invalid(
                "image",
                "empty; use null for the configured default image".into(),
            ))
        }
        RawValue::Text(text) => Some(ImageRef::parse(text).map_err(|r| invalid("image", r))?),
        other => {
            return Err(invalid(
                "image",
                format!("expected an image reference, got {}", other.describe()),
            ))
        }
    };

    let restart_nonce = match &raw.restart_nonce {
        RawValue::Integer(n) => *n,
        other => {
            return Err(invalid(
                "restart_nonce",
                format!("expected an integer, got {}", other.describe()),
            ))
        }
    };

    Ok(DesiredContainer {
        user_id: raw.user_id,
        state,
        idle_timeout,
        last_active_at,
        image,
        restart_nonce,
        revision: raw.revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn row() -> RawDesiredRow {
        RawDesiredRow {
            user_id: "alice".into(),
            state: RawValue::Text("running".into()),
            idle_timeout_secs: RawValue::Null,
            last_active_at: RawValue::Null,
            image: RawValue::Null,
            restart_nonce: RawValue::Integer(0),
            revision: 7,
        }
    }

    fn error_of(raw: RawDesiredRow) -> InvalidRow {
        validate(raw).unwrap_err()
    }

    fn at(text: &str) -> DateTime<Utc> {
        parse_timestamp(text).unwrap()
    }

    /// A running row with an idle timeout, last active at `last_active_at`.
    fn idling(idle_timeout_secs: i64, last_active_at: &str) -> DesiredContainer {
        validate(RawDesiredRow {
            idle_timeout_secs: RawValue::Integer(idle_timeout_secs),
            last_active_at: RawValue::Text(last_active_at.into()),
            ..row()
        })
        .unwrap()
    }

    #[test]
    fn a_minimal_row_is_running_forever_on_the_default_image() {
        let d = validate(row()).unwrap();
        assert_eq!(d.state, DesiredState::Running);
        assert_eq!(d.idle_timeout, None);
        assert_eq!(d.image, None);
        assert_eq!(d.idle_deadline(), None);
        assert_eq!(d.intent(Utc::now()), Intent::Running);
    }

    #[test]
    fn unknown_states_name_the_state_field() {
        for state in ["RUNNING", "banana", "", "running "] {
            let err = error_of(RawDesiredRow {
                state: RawValue::Text(state.into()),
                ..row()
            });
            assert_eq!(err.field, "state");
            assert!(err
                .status_message()
                .starts_with("invalid desired row: state: "));
        }
        let err = error_of(RawDesiredRow {
            state: RawValue::Integer(1),
            ..row()
        });
        assert_eq!(err.reason, "expected 'running' or 'stopped', got integer 1");
    }

    #[test]
    fn negative_absurd_and_non_integer_timeouts_name_the_timeout_field() {
        for value in [
            RawValue::Integer(-1),
            RawValue::Integer(MAX_IDLE_TIMEOUT_SECS + 1),
            RawValue::Integer(i64::MAX),
            RawValue::Real(1e20),
            RawValue::Text("30m".into()),
        ] {
            let err = error_of(RawDesiredRow {
                idle_timeout_secs: value.clone(),
                ..row()
            });
            assert_eq!(err.field, "idle_timeout_secs", "{value:?}");
        }
    }

    #[test]
    fn zero_or_null_timeout_means_never_idle() {
        for value in [RawValue::Null, RawValue::Integer(0)] {
            let d = validate(RawDesiredRow {
                idle_timeout_secs: value,
                last_active_at: RawValue::Text("2000-01-01T00:00:00Z".into()),
                ..row()
            })
            .unwrap();
            assert_eq!(d.intent(Utc::now()), Intent::Running);
        }
    }

    #[test]
    fn empty_long_and_nul_user_ids_name_the_user_id_field() {
        for id in [String::new(), "x".repeat(129), "a\0b".into()] {
            let err = error_of(RawDesiredRow {
                user_id: id.clone(),
                ..row()
            });
            assert_eq!(err.field, "user_id");
            assert!(err.to_string().len() < 300, "message stays short");
        }
        assert!(validate(RawDesiredRow {
            user_id: "é".repeat(64),
            ..row()
        })
        .is_ok());
    }

    #[test]
    fn invalid_images_name_the_image_field() {
        for image in ["", "../x", "UPPER", &"a".repeat(500)] {
            let err = error_of(RawDesiredRow {
                image: RawValue::Text(image.into()),
                ..row()
            });
            assert_eq!(err.field, "image", "{image}");
        }
        let d = validate(RawDesiredRow {
            image: RawValue::Text("clawfleet-agent-stub:dev".into()),
            ..row()
        })
        .unwrap();
        assert_eq!(d.image.unwrap().as_str(), "clawfleet-agent-stub:dev");
    }

    #[test]
    fn both_sqlite_timestamp_forms_parse_as_utc() {
        let rfc = at("2026-11-29T10:20:30Z");
        assert_eq!(at("2026-11-29 10:20:30"), rfc);
        assert_eq!(at("2026-11-29T11:20:30+01:00"), rfc);
        assert_eq!(
            at("2026-11-29 10:20:30.250"),
            rfc + chrono::Duration::milliseconds(250)
        );
        assert_eq!(at("2026-11-29T10:20:30.000+00:00"), rfc);
    }

    #[test]
    fn broken_timestamps_name_the_last_active_at_field() {
        for value in [
            RawValue::Text("yesterday".into()),
            RawValue::Text("2026-13-01 00:00:00".into()),
            RawValue::Text("".into()),
            RawValue::Integer(1_700_000_000),
        ] {
            let err = error_of(RawDesiredRow {
                last_active_at: value.clone(),
                ..row()
            });
            assert_eq!(err.field, "last_active_at", "{value:?}");
        }
    }

    #[test]
    fn idle_container_is_stopped_at_its_deadline() {
        let d = idling(1800, "2026-11-29T10:00:00Z");
        assert_eq!(d.idle_deadline(), Some(at("2026-11-29T10:30:00Z")));
        assert_eq!(d.intent(at("2026-11-29T10:29:59Z")), Intent::Running);
        assert_eq!(d.intent(at("2026-11-29T10:30:00Z")), Intent::Idle);
        assert_eq!(
            d.intent(at("2026-11-29T10:30:00Z")).state(),
            DesiredState::Stopped
        );
        assert_eq!(d.intent(at("2026-11-29T11:00:00Z")), Intent::Idle);
    }

    #[test]
    fn a_touch_ahead_of_the_clock_keeps_the_row_running_until_its_later_deadline() {
        // A writer whose clock runs ahead stamps activity in our future.
        let d = idling(60, "2026-11-29T10:05:00Z");
        assert_eq!(d.intent(at("2026-11-29T10:00:00Z")), Intent::Running);
        assert_eq!(d.intent(at("2026-11-29T10:05:59Z")), Intent::Running);
        assert_eq!(d.intent(at("2026-11-29T10:06:00Z")), Intent::Idle);
    }

    #[test]
    fn a_deadline_beyond_the_calendar_never_idles() {
        let d = DesiredContainer {
            idle_timeout: Some(Duration::from_secs(MAX_IDLE_TIMEOUT_SECS as u64)),
            last_active_at: Some(DateTime::<Utc>::MAX_UTC),
            ..validate(row()).unwrap()
        };
        assert_eq!(d.idle_deadline(), None);
        assert_eq!(d.intent(DateTime::<Utc>::MAX_UTC), Intent::Running);
    }

    #[test]
    fn idle_converges_to_stopped_and_each_intent_has_its_label() {
        let cases = [
            (Intent::Running, DesiredState::Running, "running"),
            (Intent::Stopped, DesiredState::Stopped, "stopped"),
            (Intent::Idle, DesiredState::Stopped, "idle"),
        ];
        for (intent, state, label) in cases {
            assert_eq!(intent.state(), state, "{intent:?}");
            assert_eq!(intent.as_str(), label);
        }
    }

    #[test]
    fn a_running_row_never_touched_is_not_idle() {
        let d = validate(RawDesiredRow {
            idle_timeout_secs: RawValue::Integer(60),
            ..row()
        })
        .unwrap();
        assert_eq!(d.idle_deadline(), None);
        assert_eq!(d.intent(Utc::now()), Intent::Running);
    }

    #[test]
    fn a_stopped_row_has_no_deadline_and_stays_stopped() {
        let d = validate(RawDesiredRow {
            state: RawValue::Text("stopped".into()),
            idle_timeout_secs: RawValue::Integer(60),
            last_active_at: RawValue::Text("2026-11-29T10:00:00Z".into()),
            ..row()
        })
        .unwrap();
        assert_eq!(d.idle_deadline(), None);
        assert_eq!(d.intent(at("2030-01-01T00:00:00Z")), Intent::Stopped);
        assert_eq!(d.intent(at("2000-01-01T00:00:00Z")), Intent::Stopped);
    }

    #[test]
    fn a_touch_of_a_running_row_with_time_to_spare_changes_no_container() {
        let margin = Duration::from_secs(2);
        let now = at("2026-11-29T10:10:00Z");
        let version = |last_active: &str, f: fn(&mut RawDesiredRow)| {
            let mut raw = RawDesiredRow {
                idle_timeout_secs: RawValue::Integer(600),
                last_active_at: RawValue::Text(last_active.into()),
                ..row()
            };
            f(&mut raw);
            validate(raw).unwrap()
        };
        let before = version("2026-11-29T10:05:00Z", |_| {});
        let touched = version("2026-11-29T10:10:00Z", |_| {});
        assert!(before.only_touched_into(&touched, now, margin));
        // Anything but the activity changed: the new revision counts.
        for change in [
            (|r: &mut RawDesiredRow| r.state = RawValue::Text("stopped".into()))
                as fn(&mut RawDesiredRow),
            |r| r.idle_timeout_secs = RawValue::Integer(60),
            |r| r.image = RawValue::Text("example/other:1".into()),
            |r| r.restart_nonce = RawValue::Integer(1),
            |r| r.user_id = "bob".into(),
        ] {
            let later = version("2026-11-29T10:10:00Z", change);
            assert!(!before.only_touched_into(&later, now, margin), "{later:?}");
        }
        // A deadline passed, or too close to tell across clocks: the
        // container may be stopping, so the touch is waited for.
        let stale = version("2026-11-29T09:59:00Z", |_| {});
        assert!(!stale.only_touched_into(&touched, now, margin));
        let close = version("2026-11-29T10:00:01Z", |_| {});
        assert!(!close.only_touched_into(&touched, now, margin));
        // A stopped row: the touch starts it, which needs a reconcile.
        let stopped = version("2026-11-29T10:05:00Z", |r| {
            r.state = RawValue::Text("stopped".into())
        });
        assert!(!stopped.only_touched_into(&touched, now, margin));
        // Never idle: any touch is only a touch.
        let forever = version("2026-11-29T10:05:00Z", |r| {
            r.idle_timeout_secs = RawValue::Null
        });
        let forever_touched = version("2026-11-29T10:10:00Z", |r| {
            r.idle_timeout_secs = RawValue::Null
        });
        assert!(forever.only_touched_into(&forever_touched, now, margin));
    }

    fn raw_value() -> impl Strategy<Value = RawValue> {
        prop_oneof![
            Just(RawValue::Null),
            any::<i64>().prop_map(RawValue::Integer),
            any::<f64>().prop_map(RawValue::Real),
            any::<String>().prop_map(RawValue::Text),
            "(running|stopped|[0-9]{4}-[0-9]{2}-[0-9]{2}[ T][0-9:.]{8,12}Z?)"
                .prop_map(RawValue::Text),
            (0usize..100).prop_map(RawValue::Blob),
        ]
    }

    proptest! {
        #[test]
        fn validation_of_any_row_never_panics_and_names_a_real_column(
            user_id in any::<String>(),
            state in raw_value(),
            idle in raw_value(),
            active in raw_value(),
            image in raw_value(),
            nonce in raw_value(),
        ) {
            let raw = RawDesiredRow { user_id, state, idle_timeout_secs: idle, last_active_at: active, image, restart_nonce: nonce, revision: 1 };
            if let Err(e) = validate(raw) {
                prop_assert!(["user_id", "state", "idle_timeout_secs", "last_active_at", "image", "restart_nonce"].contains(&e.field));
                prop_assert!(e.to_string().len() < 1024);
            }
        }

        #[test]
        fn parsing_any_timestamp_text_never_panics(text in any::<String>()) {
            let _ = parse_timestamp(&text);
        }
    }
}
