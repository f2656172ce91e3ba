//! Retry pacing shared by the providers.

use std::time::Duration;

use crate::runtime::{Clock, jitter};

/// Exponential backoff with jitter for reconnects and re-joins.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The delay before retry number `attempt` (0-based): the capped exponential delay `d`,
    /// drawn uniformly from `[d/2, d]` ("equal jitter"), so a fleet that lost the registry at
    /// the same moment does not reconnect in lockstep.
    pub fn delay(&self, attempt: u32, clock: &dyn Clock) -> Duration {
        let exp = self.uncapped(attempt).min(self.max);
        exp / 2 + jitter(clock, exp / 2)
    }

    /// Whether retry number `attempt` has reached the cap.
    pub fn is_capped(&self, attempt: u32) -> bool {
        self.uncapped(attempt) >= self.max
    }

    fn uncapped(&self, attempt: u32) -> Duration {
        self.initial
            .saturating_mul(2u32.saturating_pow(attempt.min(20)))
    }
}
