//! The clock/runtime boundary: the only place provider code gets time, sleeps, spawns tasks and
//! draws randomness from.
//!
//! [`TokioClock`] is the production implementation. Because `tokio` in this crate is
//! `madsim-tokio`, the very same code runs on simulated time when the crate is built with
//! `--cfg madsim`; nothing in a provider changes between the two worlds. [`SkewedClock`] wraps any
//! clock with a per-node wall-clock offset and a rate drift so the simulator can inject clock skew.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub use tokio::time::Instant;

/// A boxed, sendable future, as taken by [`Clock::spawn`] and returned by [`Clock::sleep`].
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Shared handle to a clock; every provider and context holds one.
pub type SharedClock = Arc<dyn Clock>;

/// Time, timers, task spawning and randomness as seen by one node.
///
/// Everything that runs inside the simulator takes these from a `Clock` rather than from the
/// OS, so that one seed reproduces one run exactly and the harness can skew a node's clock.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Monotonic time: never goes backwards, unaffected by wall-clock offsets.
    fn now(&self) -> Instant;
    /// Wall-clock time: may be offset (skewed) relative to other nodes.
    fn wall(&self) -> SystemTime;
    /// Completes after `duration` has elapsed on this node's monotonic clock.
    fn sleep(&self, duration: Duration) -> BoxFuture<()>;
    /// Runs `future` as a background task on this node.
    fn spawn(&self, name: &'static str, future: BoxFuture<()>) -> TaskHandle;
    /// A uniformly random `u64` from the runtime's (seeded, in simulation) generator.
    fn random_u64(&self) -> u64;
}

/// Handle to a spawned task. Dropping it detaches the task; [`TaskHandle::abort`] cancels it.
#[derive(Debug)]
pub struct TaskHandle {
    inner: tokio::task::JoinHandle<()>,
}

impl TaskHandle {
    /// Cancels the task at its next suspension point.
    pub fn abort(&self) {
        self.inner.abort();
    }

    /// Waits for the task to finish (or to be cancelled).
    pub async fn join(mut self) {
        self.join_ref().await;
    }

    /// Waits for the task to finish (or to be cancelled) without consuming the handle.
    pub async fn join_ref(&mut self) {
        let _ = (&mut self.inner).await;
    }
}

/// A provider's background tasks: all cancelled when the set is dropped (a provider dropped
/// without `shutdown` is a node gone), or stopped and awaited by [`TaskSet::stop`].
#[derive(Debug, Default)]
pub struct TaskSet {
    tasks: Vec<TaskHandle>,
}

impl TaskSet {
    /// Adds a task.
    pub fn push(&mut self, task: TaskHandle) {
        self.tasks.push(task);
    }

    /// Cancels every task and waits until none runs any more.
    pub async fn stop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        for t in &mut self.tasks {
            t.join_ref().await;
        }
    }
}

impl From<Vec<TaskHandle>> for TaskSet {
    fn from(tasks: Vec<TaskHandle>) -> Self {
        Self { tasks }
    }
}

impl Drop for TaskSet {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The production clock: tokio's timers and tasks, or madsim's under `--cfg madsim`.
#[derive(Debug, Default, Clone, Copy)]
pub struct TokioClock;

impl TokioClock {
    /// A shareable production clock.
    pub fn shared() -> SharedClock {
        Arc::new(TokioClock)
    }
}

impl Clock for TokioClock {
    fn now(&self) -> Instant {
        Instant::now()
    }

    fn wall(&self) -> SystemTime {
        // madsim intercepts the OS clock in simulated builds, so this is simulated time there.
        SystemTime::now()
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<()> {
        Box::pin(tokio::time::sleep(duration))
    }

    fn spawn(&self, name: &'static str, future: BoxFuture<()>) -> TaskHandle {
        let span = tracing::debug_span!("task", task = name);
        let inner = tokio::spawn(tracing::Instrument::instrument(future, span));
        TaskHandle { inner }
    }

    fn random_u64(&self) -> u64 {
        #[cfg(madsim)]
        {
            madsim::rand::random()
        }
        #[cfg(not(madsim))]
        {
            rand::random()
        }
    }
}

/// A clock whose wall time is offset and whose rate drifts relative to an inner clock.
///
/// Monotonic time is affected only by drift (it stays monotonic when the offset jumps); wall
/// time by both. Drift is in parts per million: `+1000` runs 0.1% fast. Changing the drift
/// re-bases the clock so time stays continuous.
#[derive(Debug)]
pub struct SkewedClock {
    inner: SharedClock,
    state: Mutex<SkewState>,
}

#[derive(Debug, Clone, Copy)]
struct SkewState {
    base_inner: Instant,
    base_local: Instant,
    drift_ppm: i64,
    wall_offset_ms: i64,
}

/// Largest drift accepted, in ppm (±50%): beyond this timers stop meaning anything.
pub const MAX_DRIFT_PPM: i64 = 500_000;

impl SkewedClock {
    /// Wraps `inner` with no skew yet.
    pub fn new(inner: SharedClock) -> Arc<Self> {
        let now = inner.now();
        Arc::new(Self {
            inner,
            state: Mutex::new(SkewState {
                base_inner: now,
                base_local: now,
                drift_ppm: 0,
                wall_offset_ms: 0,
            }),
        })
    }

    /// Sets the wall-clock offset in milliseconds (positive: this node's wall clock is ahead).
    pub fn set_wall_offset_ms(&self, offset_ms: i64) {
        self.lock().wall_offset_ms = offset_ms;
    }

    /// Sets the rate drift in ppm, clamped to ±[`MAX_DRIFT_PPM`].
    pub fn set_drift_ppm(&self, drift_ppm: i64) {
        let inner_now = self.inner.now();
        let mut s = self.lock();
        let local_now = local_at(&s, inner_now);
        s.base_inner = inner_now;
        s.base_local = local_now;
        s.drift_ppm = drift_ppm.clamp(-MAX_DRIFT_PPM, MAX_DRIFT_PPM);
    }

    /// Current (offset ms, drift ppm).
    pub fn skew(&self) -> (i64, i64) {
        let s = self.lock();
        (s.wall_offset_ms, s.drift_ppm)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SkewState> {
        // A poisoned lock only means another thread panicked mid-update of plain integers.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn scale(d: Duration, num: i64, den: i64) -> Duration {
    let nanos = d.as_nanos() as i128 * num as i128 / den as i128;
    Duration::from_nanos(nanos.clamp(0, u64::MAX as i128) as u64)
}

fn local_at(s: &SkewState, inner_now: Instant) -> Instant {
    let elapsed = inner_now.saturating_duration_since(s.base_inner);
    s.base_local + scale(elapsed, 1_000_000 + s.drift_ppm, 1_000_000)
}

impl Clock for SkewedClock {
    fn now(&self) -> Instant {
        let inner_now = self.inner.now();
        local_at(&self.lock(), inner_now)
    }

    fn wall(&self) -> SystemTime {
        let inner_wall = self.inner.wall();
        let s = *self.lock();
        let inner_now = self.inner.now();
        let elapsed = inner_now.saturating_duration_since(s.base_inner);
        let local_elapsed = scale(elapsed, 1_000_000 + s.drift_ppm, 1_000_000);
        // Drift accumulated since the last re-base, plus the configured offset.
        let drift_ms = local_elapsed.as_millis() as i64 - elapsed.as_millis() as i64;
        let total = s.wall_offset_ms + drift_ms;
        if total >= 0 {
            inner_wall + Duration::from_millis(total as u64)
        } else {
            inner_wall
                .checked_sub(Duration::from_millis(total.unsigned_abs()))
                .unwrap_or(SystemTime::UNIX_EPOCH)
        }
    }

    fn sleep(&self, duration: Duration) -> BoxFuture<()> {
        let drift = self.lock().drift_ppm;
        self.inner
            .sleep(scale(duration, 1_000_000, 1_000_000 + drift))
    }

    fn spawn(&self, name: &'static str, future: BoxFuture<()>) -> TaskHandle {
        self.inner.spawn(name, future)
    }

    fn random_u64(&self) -> u64 {
        self.inner.random_u64()
    }
}

/// Milliseconds since the Unix epoch on `clock`'s wall clock (0 before 1970).
pub fn unix_millis(clock: &dyn Clock) -> u64 {
    clock
        .wall()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A uniformly random duration in `[0, max]` drawn from `clock`, for jittering retries.
pub fn jitter(clock: &dyn Clock, max: Duration) -> Duration {
    let max_ns = max.as_nanos().min(u64::MAX as u128) as u64;
    if max_ns == 0 {
        return Duration::ZERO;
    }
    Duration::from_nanos(clock.random_u64() % (max_ns + 1))
}

/// The deadline of [`timeout`] passed first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline elapsed")]
pub struct Elapsed;

/// Runs `future` until it completes or `duration` passes on `clock`, whichever is first.
pub async fn timeout<F: Future>(
    clock: &dyn Clock,
    duration: Duration,
    future: F,
) -> Result<F::Output, Elapsed> {
    let deadline = clock.sleep(duration);
    tokio::select! {
        biased;
        r = future => Ok(r),
        _ = deadline => Err(Elapsed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drift_scales_monotonic_time_and_sleep() {
        let inner = TokioClock::shared();
        let clock = SkewedClock::new(inner.clone());
        clock.set_drift_ppm(100_000); // 10% fast
        let (i0, l0) = (inner.now(), clock.now());
        clock.sleep(Duration::from_millis(110)).await;
        let (l1, i1) = (clock.now(), inner.now());
        let local = l1 - l0;
        // A sleep never ends early in local time...
        assert!(local >= Duration::from_millis(110), "local {local:?}");
        // ...and local time runs 10% fast relative to the inner clock (read in the same order).
        let expected = scale(i1 - i0, 1_100_000, 1_000_000);
        let diff = expected.abs_diff(local);
        assert!(
            diff < Duration::from_millis(1),
            "local {local:?} expected {expected:?}"
        );
    }

    #[tokio::test]
    async fn wall_offset_moves_wall_time_but_not_monotonic_time() {
        let clock = SkewedClock::new(TokioClock::shared());
        let w0 = unix_millis(clock.as_ref());
        let m0 = clock.now();
        clock.set_wall_offset_ms(-5_000);
        let w1 = unix_millis(clock.as_ref());
        assert!(w1 + 4_000 < w0, "wall {w0} -> {w1}");
        assert!(clock.now() >= m0);
        assert_eq!(clock.skew(), (-5_000, 0));
    }

    #[tokio::test]
    async fn drift_is_clamped() {
        let clock = SkewedClock::new(TokioClock::shared());
        clock.set_drift_ppm(10_000_000);
        assert_eq!(clock.skew().1, MAX_DRIFT_PPM);
    }

    #[tokio::test]
    async fn jitter_stays_in_range() {
        let clock = TokioClock;
        for _ in 0..1000 {
            assert!(jitter(&clock, Duration::from_millis(7)) <= Duration::from_millis(7));
        }
        assert_eq!(jitter(&clock, Duration::ZERO), Duration::ZERO);
    }
}
