//! The event-stream oracle: a subscriber of a node's events sees every topology change the node
//! applied, in order, or is told it lagged. Judged from the subscriber's side alone: each
//! `TopologyChanged` must start from the version the previous one ended at (`from_version` of
//! the report), unless a `Lagged` came in between; and once the cluster converged, the last
//! change the subscriber saw is the topology its node holds.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::time::{Instant, sleep};
use shoal::{ClusterTopology, RebalanceReport};

use crate::cluster::SimCluster;
use crate::record::Recorder;

/// One subscriber's position in its node's event stream.
#[derive(Debug, Default)]
pub struct EventChain {
    /// The version the last `TopologyChanged` it saw applied (0: none yet, as the node starts).
    last: u64,
    /// Whether it was told it lagged since.
    lagged: bool,
    /// Changes seen.
    seen: u64,
}

impl EventChain {
    /// A chain shared between the subscriber and the final check.
    pub fn shared() -> Arc<Mutex<EventChain>> {
        Arc::default()
    }

    /// The subscriber received a `TopologyChanged` of `t` with `report`.
    pub fn changed(
        &mut self,
        node: &str,
        t: &ClusterTopology,
        report: &RebalanceReport,
        rec: &Recorder,
    ) {
        if !self.lagged && report.from_version != self.last {
            rec.violation_once(
                format!("event chain {node} {}", t.version()),
                format!(
                    "events: {node}'s subscriber received the change to v{} from v{}, but the last change it received ended at v{} and it was not told it lagged: a change was dropped silently",
                    t.version(),
                    report.from_version,
                    self.last
                ),
            );
        }
        self.last = t.version();
        self.lagged = false;
        self.seen += 1;
    }

    /// The subscriber was told it lagged.
    pub fn lagged(&mut self) {
        self.lagged = true;
    }
}

/// After convergence: every live node's subscriber caught up with the topology its node holds
/// (within `grace`, for events still in flight), or was told it lagged.
pub async fn check_caught_up(cluster: &SimCluster, grace: Duration) {
    let deadline = Instant::now() + grace;
    loop {
        let behind: Vec<(String, u64, u64)> = cluster
            .live_views()
            .into_iter()
            .filter_map(|(name, _, inc)| {
                let held = inc.manager.topology().version();
                let c = inc.events.lock().unwrap_or_else(|e| e.into_inner());
                (held != 0 && !c.lagged && c.last != held).then(|| (name, c.last, held))
            })
            .collect();
        if behind.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            let (name, last, held) = &behind[0];
            cluster.recorder().violation(format!(
                "events: {name}'s subscriber last received a change to v{last}, its node holds v{held} {} ms after convergence, and it was not told it lagged ({} nodes so)",
                grace.as_millis(),
                behind.len()
            ));
            return;
        }
        sleep(Duration::from_millis(50)).await;
    }
}
