//! The runtime boundary between provider code and the world (real tokio or the madsim simulator).

mod clock;

pub use clock::{
    BoxFuture, Clock, Elapsed, Instant, MAX_DRIFT_PPM, SharedClock, SkewedClock, TaskHandle,
    TokioClock, jitter, timeout, unix_millis,
};
