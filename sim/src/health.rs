//! Which paths to the registry are healthy, from the faults the harness itself applied.
//!
//! A member's path is disturbed while its node is down, paused or gone, while a link between it
//! and the registry is clogged either way, or while its heartbeats are being lost; every path
//! is disturbed while the registry is down. The oracles ask since when a path has been
//! undisturbed: a member expired after a long enough healthy spell was expired falsely.

use std::sync::{Mutex, MutexGuard};

use madsim::time::Instant;

#[derive(Clone, Copy, Debug)]
struct Path {
    disturbed: bool,
    clear_since: Instant,
}

impl Path {
    fn new(now: Instant) -> Self {
        Self {
            disturbed: false,
            clear_since: now,
        }
    }

    fn set(&mut self, disturbed: bool, now: Instant) {
        if self.disturbed && !disturbed {
            self.clear_since = now;
        }
        self.disturbed = disturbed;
    }

    fn since(&self) -> Option<Instant> {
        (!self.disturbed).then_some(self.clear_since)
    }
}

/// Health of every node's path to the registry.
#[derive(Debug)]
pub struct Health {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    nodes: Vec<Path>,
    registry: Path,
    /// The whole network is degraded (buggify): no path counts as healthy.
    degraded: bool,
}

impl Health {
    /// `nodes` healthy paths from now on (none counts as healthy when `degraded`).
    pub fn new(nodes: usize, degraded: bool) -> Self {
        let now = Instant::now();
        Self {
            inner: Mutex::new(Inner {
                nodes: vec![Path::new(now); nodes],
                registry: Path::new(now),
                degraded,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Node `i`'s path is (or is no longer) disturbed.
    pub fn set_node(&self, i: usize, disturbed: bool) {
        self.lock().nodes[i].set(disturbed, Instant::now());
    }

    /// The registry is (or is no longer) disturbed: down, or just restarted.
    pub fn set_registry(&self, disturbed: bool) {
        self.lock().registry.set(disturbed, Instant::now());
    }

    /// Since when node `i` and the registry have both been undisturbed (`None`: one is
    /// disturbed now, or the network is degraded).
    pub fn healthy_since(&self, i: usize) -> Option<Instant> {
        let s = self.lock();
        if s.degraded {
            return None;
        }
        Some(s.nodes.get(i)?.since()?.max(s.registry.since()?))
    }
}
