//! The in-memory provider's "control plane": one [`InMemoryRegistry`] shared by every node's
//! process, with no node, no network and no faults of its own. It carries no load the harness
//! can count (calls are function calls), so its budget is never exceeded.

use std::sync::Arc;
use std::time::Duration;

use shoal::provider::memory::{InMemoryProvider, InMemoryRegistry};
use shoal::registry::RegistryConfig;
use shoal::{ClusterProvider, ClusterTopology};

use super::{ControlPlane, Env, MemberRef, NodeInfo};
use crate::knobs::Knobs;
use crate::load::{LoadBudget, LoadCounts};
use crate::oracle::Bounds;
use crate::record::Recorder;

/// The bounds of the in-memory provider (it has no leases: no lease oracle, no history).
pub fn bounds(knobs: &Knobs) -> Bounds {
    Bounds::new(&RegistryConfig::default(), knobs.buggify, false)
}

/// The shared in-memory registry.
#[derive(Debug)]
pub struct MemoryPlane {
    registry: InMemoryRegistry,
    bounds: Bounds,
}

impl MemoryPlane {
    /// A fresh registry.
    pub fn start(env: Env) -> Arc<dyn ControlPlane> {
        Arc::new(MemoryPlane {
            registry: InMemoryRegistry::new(),
            bounds: bounds(&env.knobs),
        })
    }
}

impl ControlPlane for MemoryPlane {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    fn liveness_bound(&self) -> Duration {
        Duration::from_secs(5)
    }

    fn node(&self) -> Option<madsim::task::NodeId> {
        None
    }

    fn provider(&self, _node: &NodeInfo) -> Arc<dyn ClusterProvider> {
        Arc::new(InMemoryProvider::new(self.registry.clone()))
    }

    fn listed(&self) -> Option<(u64, Arc<ClusterTopology>)> {
        None
    }

    fn disturbed(&self) -> bool {
        false
    }

    fn crash(&self, _store: super::Store) -> Option<u64> {
        None
    }

    fn restart_after(&self, _crash: u64) {}

    fn pause(&self) -> bool {
        false
    }

    fn resume(&self) {}

    fn lose_renewals(&self, _m: &MemberRef, _lost: bool) -> bool {
        false
    }

    fn reset_streams(&self) -> bool {
        false
    }

    fn heal(&self) {}

    fn load(&self) -> LoadCounts {
        LoadCounts::default()
    }

    fn budget(&self) -> LoadBudget {
        LoadBudget {
            requests_per_node_per_s: 0.0,
            requests_per_change: 0.0,
            requests_per_reconnect: 0.0,
            events_per_watcher_per_s: 0.0,
            events_per_watcher_per_member_per_s: 0.0,
            events_per_change_per_watcher: 0.0,
            events_per_reconnect: 0.0,
            lists_per_node_per_s: 0.0,
            lists_per_change: 0.0,
            lists_per_change_per_watcher: 0.0,
            lists_per_reconnect: 0.0,
            spread_watches: (0.0, 0.0),
            per_spread_watch_per_s: (0.0, 0.0, 0.0),
            per_spread_watch_reconnect: (0.0, 0.0, 0.0),
            slack: 1.0,
            why: "in-memory: no control plane",
        }
    }

    fn record_path_counts(&self, _rec: &Recorder) {}

    fn teardown(&self) {}
}
