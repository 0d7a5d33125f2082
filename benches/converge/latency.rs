//! A set of latency samples and its percentiles. A sample that never ended
//! (no action within the wait limit) is kept as a timeout, not dropped: it
//! counts as longer than every measured one.

use std::time::Duration;

/// Latencies of one measure.
#[derive(Clone, Debug, Default)]
pub struct Latencies {
    measured: Vec<Duration>,
    timeouts: usize,
}

impl Latencies {
    /// Adds a measured sample.
    pub fn push(&mut self, latency: Duration) {
        self.measured.push(latency);
    }

    /// Adds a sample whose action never came.
    pub fn push_timeout(&mut self) {
        self.timeouts += 1;
    }

    /// Samples taken, timeouts included.
    pub fn count(&self) -> usize {
        self.measured.len() + self.timeouts
    }

    /// Samples whose action never came.
    pub fn timeouts(&self) -> usize {
        self.timeouts
    }

    /// The `p`-th percentile (nearest rank) in milliseconds; infinite when
    /// it falls on a timeout, `NaN` without samples.
    pub fn percentile_ms(&self, p: f64) -> f64 {
        let n = self.count();
        if n == 0 {
            return f64::NAN;
        }
        let mut sorted = self.measured.clone();
        sorted.sort();
        let rank = ((p / 100.0) * n as f64).ceil().max(1.0) as usize;
        sorted
            .get(rank - 1)
            .map_or(f64::INFINITY, |d| d.as_secs_f64() * 1e3)
    }

    /// The median, in milliseconds.
    pub fn p50_ms(&self) -> f64 {
        self.percentile_ms(50.0)
    }

    /// The 99th percentile, in milliseconds.
    pub fn p99_ms(&self) -> f64 {
        self.percentile_ms(99.0)
    }

    /// The longest, in milliseconds (infinite with a timeout).
    pub fn max_ms(&self) -> f64 {
        self.percentile_ms(100.0)
    }
}
