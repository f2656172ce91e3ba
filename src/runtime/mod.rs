//! The runtime boundary between provider code and the world (real tokio or the madsim simulator).

mod clock;
mod idle;
#[cfg(not(madsim))]
mod signal;
pub mod sim;

pub use clock::{
    BoxFuture, Clock, Elapsed, Instant, MAX_DRIFT_PPM, SharedClock, SkewedClock, TaskHandle,
    TaskSet, TokioClock, jitter, timeout, unix_millis,
};
pub use idle::IdleTimeout;
#[cfg(not(madsim))]
pub use signal::shutdown_signal;
