//! The built-in workload every node runs: owner lookups through the partition manager's cache,
//! each checked against a from-scratch rendezvous computation, and every `RebalanceReport`
//! checked against what really moved.
//!
//! Without it the owner cache (and its rebalancing) would be dead code in simulation: the
//! safety checker only peeks.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use shoal::placement::{Moved, naive_owner};
use shoal::{
    ClusterEvent, ClusterProviderContext, ClusterTopology, RebalanceReport, Subscription,
    SubscriptionError,
};

use crate::cluster::KIND;
use crate::record::Recorder;

/// Identities the workload rotates through.
pub const IDENTITIES: usize = 64;
/// Their names' prefix (an application's own lookups, which share the cache, are not judged).
pub const PREFIX: &str = "workload-";
/// Lookups per round.
const PER_ROUND: usize = 8;
/// Time between rounds (node clock).
const PERIOD: Duration = Duration::from_millis(500);

/// One node's workload.
pub struct Workload {
    name: String,
    ctx: ClusterProviderContext,
    rec: Recorder,
    events: Subscription,
    /// Whether the cache can hold every identity (then reports must be exact, not just sound).
    exact: bool,
    asked: BTreeSet<String>,
    last: Option<Arc<ClusterTopology>>,
    cursor: usize,
}

impl Workload {
    /// A workload for the node `name`; `events` must be subscribed before its provider starts.
    pub fn new(
        name: String,
        ctx: ClusterProviderContext,
        rec: Recorder,
        events: Subscription,
        cache_capacity: usize,
    ) -> Self {
        let last = Some(ctx.partition_manager.topology());
        Self {
            name,
            ctx,
            rec,
            events,
            exact: cache_capacity >= IDENTITIES,
            asked: BTreeSet::new(),
            last,
            cursor: 0,
        }
    }

    /// Runs until the node dies.
    pub async fn run(mut self) {
        loop {
            if !self.drain() {
                return;
            }
            self.ask();
            self.ctx.clock.sleep(PERIOD).await;
        }
    }

    /// Checks every report published since the last round; false once the stream closed.
    fn drain(&mut self) -> bool {
        loop {
            match self.events.try_recv() {
                Ok(Some(ClusterEvent::TopologyChanged { topology, report })) => {
                    self.check_report(&topology, &report);
                    self.last = Some(topology);
                }
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(SubscriptionError::Lagged { .. }) => {
                    self.rec.count("events: workload subscriber lagged");
                    self.last = None;
                }
                Err(SubscriptionError::Closed) => return false,
            }
        }
    }

    /// Asks the owner of the next identities; each answer must be rendezvous over the
    /// topology the node holds.
    fn ask(&mut self) {
        let pm = &self.ctx.partition_manager;
        for k in 0..PER_ROUND {
            let id = format!("{PREFIX}{}", (self.cursor + k) % IDENTITIES);
            let got = pm.owner(KIND, &id).map(|m| m.id.clone());
            let topology = pm.topology();
            let want = naive_owner(&topology, KIND, &id).map(|m| m.id.clone());
            self.rec.count("workload: owner lookups");
            if got != want {
                self.rec.violation_once(
                    format!("owner {} {} {id}", self.name, topology.version()),
                    format!(
                        "placement: {} says {KIND}/{id} is owned by {got:?} at v{}, rendezvous over that topology says {want:?}",
                        self.name,
                        topology.version()
                    ),
                );
            }
            self.asked.insert(id);
        }
        self.cursor = (self.cursor + PER_ROUND) % IDENTITIES;
    }

    /// Compares a report's moves with what a fresh computation says moved among the identities
    /// the cache remembered when the topology was applied.
    fn check_report(&mut self, topology: &ClusterTopology, report: &RebalanceReport) {
        let Some(last) = self
            .last
            .as_ref()
            .filter(|l| l.version() == report.from_version)
        else {
            self.rec.count("workload: report not checked (lagged)");
            return;
        };
        let expected: Vec<Moved> = self
            .asked
            .iter()
            .filter_map(|id| {
                let from = naive_owner(last, KIND, id).map(|m| m.id.clone());
                let to = naive_owner(topology, KIND, id).map(|m| m.id.clone());
                (from != to).then(|| Moved {
                    kind: KIND.to_string(),
                    identity: id.clone(),
                    from,
                    to,
                })
            })
            .collect();
        let reported: Vec<&Moved> = report
            .moved
            .iter()
            .filter(|m| m.kind == KIND && m.identity.starts_with(PREFIX))
            .collect();
        let sound = reported.iter().all(|m| expected.contains(m));
        let ok = if self.exact {
            reported.len() == expected.len() && sound
        } else {
            sound
        };
        self.rec.count("workload: rebalance reports checked");
        if !report.moved.is_empty() {
            self.rec.count("workload: reports with moves");
        }
        if !ok {
            let show = |v: &[Moved]| {
                v.iter()
                    .map(|m| format!("{} {:?}->{:?}", m.identity, m.from, m.to))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            self.rec.violation_once(
                format!("moved {} {}", self.name, topology.version()),
                format!(
                    "placement: {} applied v{} (from v{}) reporting moved [{}], a fresh computation says [{}]",
                    self.name,
                    topology.version(),
                    report.from_version,
                    show(&reported.into_iter().cloned().collect::<Vec<_>>()),
                    show(&expected)
                ),
            );
        }
    }
}
