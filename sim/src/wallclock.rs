//! Host wall-clock timing for campaign reports. This runs on the host threads that drive
//! simulations, never inside a simulated node, so it reads the OS clock directly.

/// Measures host wall time.
#[derive(Debug, Clone, Copy)]
pub struct Stopwatch(std::time::Instant);

impl Stopwatch {
    /// Starts now.
    pub fn start() -> Self {
        // Host side only (outside any madsim runtime): see the module docs.
        Stopwatch(std::time::Instant::now())
    }

    /// Seconds since start.
    pub fn secs(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}
