//! Byte-rate quotas, enforced Kafka-style by delaying answers rather than
//! failing them.
//!
//! Each (principal, direction) has a virtual clock `next_free`: a request
//! of `n` bytes starts at `max(now, next_free)` and moves `next_free` on
//! by `n / rate`. The request is answered only at its start time, so the
//! bytes a principal moves per second converge on its rate however many
//! connections it uses. A burst of up to one second's worth is not
//! delayed after an idle period.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Which quota a request counts against.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    Produce,
    Fetch,
}

/// Longest delay imposed on one request. Below the Rust client's margin
/// for an answer beyond its long-poll wait (`client::REQUEST_TIMEOUT`,
/// 15 s), as Kafka's (11 s) is below its clients' request timeout: an
/// answer held longer would reach no one, its bytes would still be
/// charged, and a consumer whose fetches ask for more than the rate
/// allows in that time would never get one. The clock itself is not
/// capped (what is owed stays owed), and fetches of a throttled principal
/// are cut to what its rate allows in this time, so that a client waiting
/// for each answer reads at its rate.
pub const THROTTLE_MAX: Duration = Duration::from_secs(10);

/// Most (principal, direction) clocks kept; idle ones are dropped first.
const CLOCKS_MAX: usize = 10_000;

/// The throttle clocks of every principal on this broker.
#[derive(Debug, Default)]
pub struct Throttle {
    clocks: Mutex<HashMap<(String, Direction), Instant>>,
}

impl Throttle {
    /// Records `bytes` for `principal` under `rate` bytes/s and returns
    /// how long to hold the answer back.
    pub fn record(
        &self,
        principal: &str,
        direction: Direction,
        bytes: u64,
        rate: u64,
        now: Instant,
    ) -> Duration {
        let rate = rate.max(1);
        let mut clocks = self.clocks.lock().unwrap_or_else(|e| e.into_inner());
        if clocks.len() >= CLOCKS_MAX {
            clocks.retain(|_, next| *next > now);
        }
        let next = clocks
            .entry((principal.to_string(), direction))
            .or_insert(now);
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        (start - now).min(THROTTLE_MAX)
    }

    /// Takes back a charge of `bytes` at `rate` that [`Throttle::record`]
    /// made for a request dropped while held (its deadline passed or its
    /// client went): nothing was moved. Kept, each retry of a client
    /// whose deadline is shorter than its hold would push the clock
    /// further ahead, and none would ever be served.
    pub fn refund(
        &self,
        principal: &str,
        direction: Direction,
        bytes: u64,
        rate: u64,
        now: Instant,
    ) {
        let rate = rate.max(1);
        let mut clocks = self.clocks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(next) = clocks.get_mut(&(principal.to_string(), direction)) {
            let charged = Duration::from_secs_f64(bytes as f64 / rate as f64);
            // Not below now: a clock behind now counts as now anyway.
            *next = next.checked_sub(charged).map_or(now, |n| n.max(now));
        }
    }

    /// How far `principal`'s clock is ahead of `now`.
    fn ahead(&self, principal: &str, direction: Direction, now: Instant) -> Duration {
        let clocks = self.clocks.lock().unwrap_or_else(|e| e.into_inner());
        clocks
            .get(&(principal.to_string(), direction))
            .map_or(Duration::ZERO, |next| next.saturating_duration_since(now))
    }

    /// What `principal` owes: how far its clock is ahead of `now`, at
    /// most [`THROTTLE_MAX`]. A request waits this long before it is
    /// served and charged, so that it holds nothing while it waits.
    pub fn owed(&self, principal: &str, direction: Direction, now: Instant) -> Duration {
        self.ahead(principal, direction, now).min(THROTTLE_MAX)
    }

    /// How long a stream of `principal` should wait before it takes in
    /// more (reads its next request or chunk): until the principal's
    /// clock is at most [`THROTTLE_MAX`] ahead. Each answer is held at
    /// most that long, so streams that took in more while the clock ran
    /// further ahead moved, together, a multiple of the rate (one chunk
    /// per stream every ten seconds); waiting here before taking in more,
    /// they share the rate.
    pub fn admission(&self, principal: &str, direction: Direction, now: Instant) -> Duration {
        self.ahead(principal, direction, now)
            .saturating_sub(THROTTLE_MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_add_up_to_the_rate() {
        let t = Throttle::default();
        let now = Instant::now();
        // 10 requests of 100 bytes at 1000 B/s, all arriving at once:
        // the k-th waits k * 100 ms.
        let delays: Vec<u128> = (0..10)
            .map(|_| {
                t.record("a", Direction::Produce, 100, 1000, now)
                    .as_millis()
            })
            .collect();
        assert_eq!(delays, (0..10).map(|k| k * 100).collect::<Vec<u128>>());
        // Another principal and the other direction are not affected.
        assert_eq!(
            t.record("b", Direction::Produce, 100, 1000, now),
            Duration::ZERO
        );
        assert_eq!(
            t.record("a", Direction::Fetch, 100, 1000, now),
            Duration::ZERO
        );
        // No answer is held longer than THROTTLE_MAX, but what is owed
        // stays owed: after a request worth a minute, the next one is
        // held THROTTLE_MAX, and so is one THROTTLE_MAX later.
        let t2 = Throttle::default();
        assert_eq!(
            t2.record("c", Direction::Fetch, 60_000, 1000, now),
            Duration::ZERO
        );
        assert_eq!(t2.record("c", Direction::Fetch, 1, 1000, now), THROTTLE_MAX);
        let after = now + THROTTLE_MAX;
        assert_eq!(
            t2.record("c", Direction::Fetch, 1, 1000, after),
            THROTTLE_MAX
        );
        // Streams wait to take in more only while the clock is more than
        // THROTTLE_MAX ahead: here it is a minute ahead, less the 10 s.
        assert_eq!(
            t2.admission("c", Direction::Fetch, now),
            Duration::from_millis(60_002) - THROTTLE_MAX
        );
        assert_eq!(t2.admission("c", Direction::Produce, now), Duration::ZERO);
        assert_eq!(
            t2.admission("c", Direction::Fetch, now + Duration::from_secs(60)),
            Duration::ZERO
        );
        // A refunded charge is as if never made: a request held past its
        // deadline leaves the clock where it was, so a retry is not held
        // longer; refunds never put the clock behind now.
        let t3 = Throttle::default();
        t3.record("d", Direction::Produce, 5_000, 1000, now);
        let held = t3.record("d", Direction::Produce, 1_000, 1000, now);
        assert_eq!(held, Duration::from_secs(5));
        t3.refund("d", Direction::Produce, 1_000, 1000, now);
        assert_eq!(t3.record("d", Direction::Produce, 1_000, 1000, now), held);
        t3.refund("d", Direction::Produce, 60_000, 1000, now);
        assert_eq!(
            t3.record("d", Direction::Produce, 1, 1000, now),
            Duration::ZERO
        );
        // What is owed, up to the longest hold.
        assert_eq!(
            t3.owed("d", Direction::Produce, now),
            Duration::from_millis(1)
        );
        assert_eq!(t2.owed("c", Direction::Fetch, now), THROTTLE_MAX);
        assert_eq!(t2.owed("nobody", Direction::Fetch, now), Duration::ZERO);
        // After an idle period nothing is owed.
        let later = now + Duration::from_secs(5);
        assert_eq!(
            t.record("a", Direction::Produce, 100, 1000, later),
            Duration::ZERO
        );
    }
}
