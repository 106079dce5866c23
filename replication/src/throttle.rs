//! A byte-rate limit for replica fetching, so a follower catching up a
//! large backlog does not starve produce traffic. Pure: the caller passes
//! the time and sleeps for the answer.

use std::time::Duration;

/// A token bucket holding at most one second of bytes.
#[derive(Clone, Debug)]
pub struct Throttle {
    /// Bytes per second; 0 means unlimited.
    rate: u64,
    /// Bytes that may pass now (negative: owed).
    tokens: f64,
    /// Last refill, in ms.
    last_ms: i64,
}

impl Throttle {
    /// A limit of `bytes_per_sec` (0 = unlimited), full at `now_ms`.
    pub fn new(bytes_per_sec: u64, now_ms: i64) -> Self {
        Self {
            rate: bytes_per_sec,
            tokens: bytes_per_sec as f64,
            last_ms: now_ms,
        }
    }

    /// Records that `bytes` passed at `now_ms`; returns how long to wait
    /// before the next fetch so the average stays under the rate.
    pub fn record(&mut self, bytes: u64, now_ms: i64) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        let elapsed = (now_ms - self.last_ms).max(0) as f64 / 1000.0;
        self.last_ms = now_ms;
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.rate as f64);
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut t = Throttle::new(0, 0);
        assert_eq!(t.record(u64::MAX / 2, 0), Duration::ZERO);
    }

    #[test]
    fn waits_in_proportion_to_the_excess() {
        let mut t = Throttle::new(1000, 0);
        assert_eq!(t.record(1000, 0), Duration::ZERO);
        assert_eq!(t.record(500, 0), Duration::from_millis(500));
        // Half a second later the debt is paid.
        assert_eq!(t.record(0, 500), Duration::ZERO);
        // The bucket holds at most one second.
        assert_eq!(t.record(1500, 10_000), Duration::from_millis(500));
    }
}
