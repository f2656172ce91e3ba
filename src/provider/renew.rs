//! When a member's next renewal round starts: the schedule the three lease providers share
//! (registry heartbeats, etcd keep-alives, Kubernetes Lease renewals), as a state machine fed
//! with times and outcomes (no I/O).
//!
//! While renewals succeed, rounds start `interval` after the previous round *started*, not
//! after its answer: the member's standing counts from each renewal's send time, so an answer
//! that comes late (up to the request timeout) must not push the next send later; with one round
//! at a time, renewals are then `max(interval, answer time)` apart. After a failure the next round
//! waits the backoff, at most one interval, and never less than a wait the backend asked for
//! (a `429` with `Retry-After`: sending sooner only feeds the queue that shed the request).

use std::time::Duration;

use crate::runtime::Instant;

/// The renewal schedule of one member.
#[derive(Clone, Debug)]
pub struct RenewPacer {
    interval: Duration,
    started: Instant,
    failures: u32,
    asked: Option<Duration>,
}

impl RenewPacer {
    /// A schedule of one round every `interval`, counting from `now`.
    pub fn new(interval: Duration, now: Instant) -> Self {
        Self {
            interval,
            started: now,
            failures: 0,
            asked: None,
        }
    }

    /// The interval between rounds (the registry's join answer may change it).
    pub fn set_interval(&mut self, interval: Duration) {
        self.interval = interval;
    }

    /// Failures in a row so far.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// How long to wait at `now` before the next round; `backoff(n)` is the delay before retry
    /// number `n` (from 0).
    pub fn pause(&self, now: Instant, backoff: impl FnOnce(u32) -> Duration) -> Duration {
        if self.failures == 0 {
            if crate::runtime::sim::flaw("renew-after-answer") {
                return self.interval;
            }
            return self
                .interval
                .saturating_sub(now.saturating_duration_since(self.started));
        }
        let backoff = backoff(self.failures - 1).min(self.interval);
        self.asked.map_or(backoff, |asked| backoff.max(asked))
    }

    /// A round starts at `now` (a renewal is sent).
    pub fn start(&mut self, now: Instant) {
        self.started = now;
    }

    /// The round renewed.
    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.asked = None;
    }

    /// The round failed; `retry_after` is the wait the backend asked for, if any. Returns the
    /// failures in a row.
    pub fn failed(&mut self, retry_after: Option<Duration>) -> u32 {
        self.failures = self.failures.saturating_add(1);
        self.asked = retry_after;
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn rounds_start_an_interval_apart_however_late_the_answer() {
        let t0 = Instant::now();
        let second = Duration::from_secs(1);
        let mut p = RenewPacer::new(2 * second, t0);
        assert_eq!(p.pause(t0, |_| second), 2 * second);
        // A round starts at 2 s and its answer comes 1.5 s later: the next starts at 4 s.
        p.start(at(t0, 2_000));
        p.succeeded();
        assert_eq!(
            p.pause(at(t0, 3_500), |_| second),
            Duration::from_millis(500)
        );
        // An answer later than the interval: the next round starts at once.
        p.start(at(t0, 4_000));
        p.succeeded();
        assert_eq!(p.pause(at(t0, 6_300), |_| second), Duration::ZERO);
    }

    #[test]
    fn failures_back_off_within_an_interval_and_honour_a_wait_asked_for() {
        let t0 = Instant::now();
        let mut p = RenewPacer::new(Duration::from_secs(2), t0);
        p.start(t0);
        assert_eq!(p.failed(None), 1);
        assert_eq!(
            p.pause(t0, |n| Duration::from_millis(100 << n)),
            Duration::from_millis(100)
        );
        assert_eq!(p.failed(None), 2);
        assert_eq!(
            p.pause(t0, |n| Duration::from_millis(100 << n)),
            Duration::from_millis(200)
        );
        // The backoff never exceeds an interval...
        assert_eq!(
            p.pause(t0, |_| Duration::from_secs(9)),
            Duration::from_secs(2)
        );
        // ...but a wait the backend asked for is honoured.
        p.failed(Some(Duration::from_secs(5)));
        assert_eq!(
            p.pause(t0, |_| Duration::from_millis(10)),
            Duration::from_secs(5)
        );
        p.succeeded();
        assert_eq!(p.failures(), 0);
        assert_eq!(
            p.pause(t0, |_| Duration::from_secs(9)),
            Duration::from_secs(2)
        );
    }
}
