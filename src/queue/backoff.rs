//! Per-key exponential backoff for keys whose handler failed.
//!
//! Owns each key's failure count and the sequence of delays it waits before
//! its next retry. Invariants (pinned by the tests below and in the queue):
//! - a key's failure count grows by one per failure and goes back to zero on
//!   [`Backoffs::forget`]; keys never share a count;
//! - without jitter, a key's delays grow from `min` by `factor` and then stay
//!   at `max`; with jitter, each delay is that base plus a random part of up
//!   to 100% of it (so concurrent failures spread out instead of retrying in
//!   step, even at the cap).
//!
//! The delays come from `backon`; its types stay behind [`BackoffPolicy`] so a
//! change of crate does not ripple into callers.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

/// How long a failing key waits before each retry.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BackoffPolicy {
    /// Delay before the first retry.
    pub min: Duration,
    /// Longest delay before jitter; delays stop growing here.
    pub max: Duration,
    /// Growth of the delay per failure (at least 1).
    pub factor: f32,
    /// Add a random part of up to 100% of each delay.
    pub jitter: bool,
}

impl Default for BackoffPolicy {
    /// 500 ms, doubling up to 5 minutes, with jitter.
    fn default() -> Self {
        Self {
            min: Duration::from_millis(500),
            max: Duration::from_secs(5 * 60),
            factor: 2.0,
            jitter: true,
        }
    }
}

/// Why a [`BackoffPolicy`] was rejected.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BackoffPolicyError {
    /// A zero first delay would never grow: failures would retry in a hot loop.
    #[error("backoff min delay must be above zero")]
    ZeroMin,
    /// The first delay is longer than the cap.
    #[error("backoff min delay {min:?} is longer than its max delay {max:?}")]
    MinAboveMax {
        /// The policy's first delay.
        min: Duration,
        /// The policy's cap.
        max: Duration,
    },
    /// The growth factor is below 1 or not a number.
    #[error("backoff factor {0} is not a finite number of at least 1")]
    Factor(f32),
}

impl BackoffPolicy {
    /// Checks the policy makes sense; configuration code calls this so a bad
    /// setting is reported instead of silently corrected.
    pub fn validate(&self) -> Result<(), BackoffPolicyError> {
        if self.min.is_zero() {
            return Err(BackoffPolicyError::ZeroMin);
        }
        if self.min > self.max {
            return Err(BackoffPolicyError::MinAboveMax {
                min: self.min,
                max: self.max,
            });
        }
        if !(self.factor.is_finite() && self.factor >= 1.0) {
            return Err(BackoffPolicyError::Factor(self.factor));
        }
        Ok(())
    }

    /// The policy made usable whatever its fields say, so the queue never
    /// panics or hot-loops on an unvalidated policy: a zero `min` becomes
    /// 1 ms, a `max` below `min` becomes `min`, a bad factor becomes 1.
    fn normalized(self) -> Self {
        let min = self.min.max(Duration::from_millis(1));
        let factor = if self.factor.is_finite() && self.factor >= 1.0 {
            self.factor
        } else {
            1.0
        };
        Self {
            min,
            max: self.max.max(min),
            factor,
            jitter: self.jitter,
        }
    }

    fn delays(&self) -> ExponentialBackoff {
        let builder = ExponentialBuilder::default()
            .with_min_delay(self.min)
            .with_max_delay(self.max)
            .with_factor(self.factor)
            .without_max_times();
        if self.jitter {
            builder.with_jitter().build()
        } else {
            builder.build()
        }
    }
}

/// One key's failures so far and the delays still to come.
struct KeyBackoff {
    failures: u32,
    delays: ExponentialBackoff,
}

/// Failure counts and delay sequences of the keys that are failing.
pub(super) struct Backoffs<K> {
    policy: BackoffPolicy,
    keys: HashMap<K, KeyBackoff>,
}

impl<K: Eq + Hash> Backoffs<K> {
    pub(super) fn new(policy: BackoffPolicy) -> Self {
        Self {
            policy: policy.normalized(),
            keys: HashMap::new(),
        }
    }

    /// Records one more failure of `key` and returns how long it waits.
    pub(super) fn next_delay(&mut self, key: K) -> Duration {
        let policy = self.policy;
        let entry = self.keys.entry(key).or_insert_with(|| KeyBackoff {
            failures: 0,
            delays: policy.delays(),
        });
        entry.failures = entry.failures.saturating_add(1);
        // Unbounded in attempts, so the sequence only ends if backon changes
        // its mind; the cap is the right answer then.
        entry.delays.next().unwrap_or(policy.max)
    }

    /// Forgets `key`'s failures: its next failure waits `min` again.
    pub(super) fn forget(&mut self, key: &K) {
        self.keys.remove(key);
    }

    /// Failures of `key` since it was last forgotten.
    pub(super) fn failures(&self, key: &K) -> u32 {
        self.keys.get(key).map_or(0, |k| k.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steady(min_ms: u64, max_ms: u64) -> BackoffPolicy {
        BackoffPolicy {
            min: Duration::from_millis(min_ms),
            max: Duration::from_millis(max_ms),
            factor: 2.0,
            jitter: false,
        }
    }

    #[test]
    fn the_default_policy_is_half_a_second_doubling_to_five_minutes_with_jitter() {
        let policy = BackoffPolicy::default();
        assert_eq!(policy.min, Duration::from_millis(500));
        assert_eq!(policy.max, Duration::from_secs(300));
        assert_eq!(policy.factor, 2.0);
        assert!(policy.jitter);
        assert_eq!(policy.validate(), Ok(()));
    }

    #[test]
    fn validation_rejects_policies_that_would_hot_loop_or_never_grow() {
        assert_eq!(steady(0, 10).validate(), Err(BackoffPolicyError::ZeroMin));
        assert!(matches!(
            steady(20, 10).validate(),
            Err(BackoffPolicyError::MinAboveMax { .. })
        ));
        let shrinking = BackoffPolicy {
            factor: 0.5,
            ..steady(1, 10)
        };
        assert_eq!(shrinking.validate(), Err(BackoffPolicyError::Factor(0.5)));
        let nan = BackoffPolicy {
            factor: f32::NAN,
            ..steady(1, 10)
        };
        assert!(nan.validate().is_err());
    }

    #[test]
    fn delays_double_from_min_and_stay_at_max() {
        let mut backoffs = Backoffs::new(steady(100, 1000));
        let delays: Vec<u64> = (0..7)
            .map(|_| backoffs.next_delay("a").as_millis() as u64)
            .collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000, 1000]);
        assert_eq!(backoffs.failures(&"a"), 7);
    }

    #[test]
    fn an_unvalidated_policy_still_backs_off() {
        let broken = BackoffPolicy {
            min: Duration::ZERO,
            max: Duration::ZERO,
            factor: f32::NAN,
            jitter: false,
        };
        let mut backoffs = Backoffs::new(broken);
        assert_eq!(backoffs.next_delay("a"), Duration::from_millis(1));
        assert_eq!(backoffs.next_delay("a"), Duration::from_millis(1));
    }

    #[test]
    fn forgetting_a_key_restarts_its_delays_at_min() {
        let mut backoffs = Backoffs::new(steady(100, 1000));
        backoffs.next_delay("a");
        backoffs.next_delay("a");
        backoffs.forget(&"a");
        assert_eq!(backoffs.failures(&"a"), 0);
        assert_eq!(backoffs.next_delay("a"), Duration::from_millis(100));
    }
}
