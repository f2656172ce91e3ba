//! A wait bounded by an idle time that costs one timer per idle period, not one per wait.
//!
//! A watch loop bounds each wait for the next event by the idle timeout (a stream that carries
//! nothing for that long is reopened). Written as [`timeout`](super::timeout) around every
//! `next()`, each event arms a fresh timer. tokio removes a dropped timer from its wheel, but
//! madsim's timer heap keeps it until its deadline: in a thousand-member simulation every
//! member piled up a ten-second timer per watch event (8% of the host time went to expiring
//! them).
//! [`IdleTimeout`] keeps one timer and, when it fires before the current wait's deadline, arms
//! the remainder: the same bound, one timer per idle period.

use std::time::Duration;

use super::clock::{BoxFuture, Elapsed, Instant, SharedClock};

/// Bounds successive waits by `idle` each, reusing one timer across them (see the module docs).
pub struct IdleTimeout {
    clock: SharedClock,
    idle: Duration,
    /// The armed timer and the instant it fires at.
    armed: Option<(Instant, BoxFuture<()>)>,
}

impl std::fmt::Debug for IdleTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleTimeout")
            .field("idle", &self.idle)
            .field("armed", &self.armed.as_ref().map(|(at, _)| at))
            .finish()
    }
}

impl IdleTimeout {
    /// Waits of at most `idle` each, on `clock`.
    pub fn new(clock: SharedClock, idle: Duration) -> Self {
        Self {
            clock,
            idle,
            armed: None,
        }
    }

    /// Runs `future` until it completes or `idle` passes from now, whichever is first (as
    /// [`timeout`](super::timeout) would).
    pub async fn run<F: std::future::Future>(&mut self, future: F) -> Result<F::Output, Elapsed> {
        let deadline = self.clock.now() + self.idle;
        tokio::pin!(future);
        loop {
            if self.armed.as_ref().is_none_or(|(at, _)| *at > deadline) {
                let wait = deadline.saturating_duration_since(self.clock.now());
                self.armed = Some((deadline, self.clock.sleep(wait)));
            }
            let Some((_, timer)) = self.armed.as_mut() else {
                return Err(Elapsed);
            };
            tokio::select! {
                biased;
                r = &mut future => return Ok(r),
                _ = timer => {
                    self.armed = None;
                    if self.clock.now() >= deadline {
                        return Err(Elapsed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::runtime::{Clock, TaskHandle, TokioClock};

    /// The real clock, counting the timers armed on it.
    #[derive(Debug)]
    struct Counting {
        inner: SharedClock,
        sleeps: AtomicUsize,
    }

    impl Clock for Counting {
        fn now(&self) -> Instant {
            self.inner.now()
        }
        fn wall(&self) -> std::time::SystemTime {
            self.inner.wall()
        }
        fn sleep(&self, duration: Duration) -> BoxFuture<()> {
            self.sleeps.fetch_add(1, Ordering::SeqCst);
            self.inner.sleep(duration)
        }
        fn spawn(&self, name: &'static str, future: BoxFuture<()>) -> TaskHandle {
            self.inner.spawn(name, future)
        }
        fn random_u64(&self) -> u64 {
            self.inner.random_u64()
        }
    }

    #[tokio::test]
    async fn waits_share_one_timer_and_each_is_bounded_from_its_own_start() {
        let clock = Arc::new(Counting {
            inner: TokioClock::shared(),
            sleeps: AtomicUsize::new(0),
        });
        let idle_for = Duration::from_millis(300);
        let mut idle = IdleTimeout::new(clock.clone(), idle_for);
        // Ten events 60 ms apart: none reaches the bound, and they share the timers of the
        // two idle periods they span (`timeout` arms one per wait: ten).
        for _ in 0..10 {
            let event = TokioClock::shared().sleep(Duration::from_millis(60));
            assert!(idle.run(event).await.is_ok());
        }
        let armed = clock.sleeps.load(Ordering::SeqCst);
        assert!(armed <= 4, "{armed} timers for ten waits");
        // A wait that nothing ends lasts the whole bound from its own start, not from an
        // earlier wait's (a lower bound: the only one a real clock can promise).
        let start = clock.now();
        let r = idle.run(std::future::pending::<()>()).await;
        assert_eq!(r, Err(Elapsed));
        assert!(clock.now() - start >= idle_for);
    }

    #[tokio::test]
    async fn a_ready_future_wins_over_an_expired_bound() {
        let mut idle = IdleTimeout::new(TokioClock::shared(), Duration::ZERO);
        assert_eq!(idle.run(async { 7 }).await, Ok(7));
    }
}
