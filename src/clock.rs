//! The one clock every deadline, back-off and quarantine reads, injected the
//! way client-go's work queue takes a clock.
//!
//! A [`Clock`] gives two readings that always move together: the monotonic
//! [`Instant`] (queue deadlines, the feed's spacing, port quarantine) and the
//! wall time (idle deadlines, crash back-off, orphan grace, failed-retry, the
//! times written to `container_status`). Both come from tokio's clock, so a
//! test that pauses time (`tokio::time::pause`, `start_paused`) moves all of
//! them with `tokio::time::advance`.
//!
//! Invariant: for one clock, the wall time advances exactly as far as the
//! monotonic time did between two readings, except on the system clock,
//! whose wall time follows the host's (NTP may step it).

use chrono::{DateTime, Utc};
use tokio::time::Instant;

/// A cheap, shareable clock: the system's in production, a virtual one in tests.
#[derive(Clone, Copy, Debug, Default)]
pub struct Clock {
    /// `None`: the system clock; `Some`: wall time derived from tokio's clock.
    origin: Option<Origin>,
}

/// A wall time and the tokio instant it corresponds to.
#[derive(Clone, Copy, Debug)]
struct Origin {
    instant: Instant,
    wall: DateTime<Utc>,
}

impl Clock {
    /// The system clock: tokio's `Instant` and the host's wall time.
    pub fn system() -> Self {
        Self::default()
    }

    /// A clock whose wall time is `start` now and then moves as tokio's
    /// clock does, so pausing and advancing tokio's time moves it too.
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        Self {
            origin: Some(Origin {
                instant: Instant::now(),
                wall: start,
            }),
        }
    }

    /// The monotonic time.
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// The wall time.
    pub fn wall(&self) -> DateTime<Utc> {
        match self.origin {
            None => Utc::now(),
            Some(origin) => {
                let elapsed = Instant::now().saturating_duration_since(origin.instant);
                // Beyond chrono's range only after some 292 billion years.
                origin.wall + chrono::Duration::from_std(elapsed).unwrap_or(chrono::Duration::MAX)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_virtual_clock_moves_its_wall_time_with_tokio_s_paused_time() {
        let start = Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap();
        let clock = Clock::starting_at(start);
        let before = clock.now();
        assert_eq!(clock.wall(), start);
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.wall(), start + chrono::Duration::seconds(90));
        assert_eq!(clock.now() - before, Duration::from_secs(90));
    }

    #[tokio::test(start_paused = true)]
    async fn copies_of_a_virtual_clock_read_the_same_time() {
        let clock = Clock::starting_at(Utc::now());
        let copy = clock;
        tokio::time::advance(Duration::from_millis(1500)).await;
        assert_eq!(clock.wall(), copy.wall());
    }

    #[test]
    fn the_system_clock_reads_the_host_s_wall_time() {
        let before = Utc::now();
        let read = Clock::system().wall();
        assert!(before <= read && read <= Utc::now());
    }
}
