//! The built-in workload every node runs: owner lookups through the partition manager's cache,
//! each checked against a from-scratch rendezvous computation, and every `RebalanceReport`
//! checked against what really moved.
//!
//! Without it the owner cache (and its rebalancing) would be dead code in simulation: the
//! safety checker only peeks.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal::placement::{Moved, PlacementRule, naive_owner, naive_zone_owner};
use shoal::{
    ClusterEvent, ClusterProviderContext, ClusterTopology, MemberId, RebalanceReport, Subscription,
    SubscriptionError,
};

use crate::cluster::KIND;
use crate::fingerprint::ViewPrint;
use crate::oracle::events::EventChain;
use crate::record::Recorder;

/// Identities the workload rotates through.
pub const IDENTITIES: usize = 64;
/// Their names' prefix (an application's own lookups, which share the cache, are not judged).
pub const PREFIX: &str = "workload-";
/// Lookups per round.
const PER_ROUND: usize = 8;
/// Time between rounds (node clock).
const PERIOD: Duration = Duration::from_secs(2);

/// The identities, named once (immutable, so sharing them across simulated nodes is safe).
fn identities() -> &'static [String] {
    static IDS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (0..IDENTITIES).map(|i| format!("{PREFIX}{i}")).collect());
    &IDS
}

/// One node's workload.
pub struct Workload {
    name: String,
    ctx: ClusterProviderContext,
    rec: Recorder,
    events: Subscription,
    /// Whether the cache can hold every identity (then reports must be exact, not just sound).
    exact: bool,
    /// Indexes of the identities asked so far (the cache remembers them).
    asked: BTreeSet<usize>,
    last: Option<Arc<ClusterTopology>>,
    cursor: usize,
    /// Owners computed from scratch, shared by every node of the run.
    fresh: Arc<FreshOwners>,
    /// The last topology asked about and its fresh owners.
    fresh_held: Option<(Arc<ClusterTopology>, Owners)>,
    /// Where this subscriber is in the node's events ([`crate::oracle::events`]).
    chain: EventChain,
    /// The node's view's fingerprint, followed by the harness's subscriber.
    print: Arc<Mutex<ViewPrint>>,
}

/// The owner of every workload identity (by index), computed from scratch.
pub type Owners = Arc<Vec<Option<MemberId>>>;

/// Rendezvous owners of every workload identity computed from scratch over a topology, once per
/// distinct member list of a run (keyed by the harness's fingerprint of every member's fields,
/// not by version: Kubernetes nodes number their own versions, and a node holding a corrupted
/// topology under a known version gets its own entry). Bounded.
#[derive(Debug)]
pub struct FreshOwners {
    /// The rule the members place by.
    rule: PlacementRule,
    memo: Mutex<crate::fingerprint::Memo<Owners>>,
}

/// The owner of `kind/id` in `t` under `rule`, computed from scratch (no cache, no table).
pub fn naive_owner_by(
    rule: PlacementRule,
    t: &ClusterTopology,
    kind: &str,
    id: &str,
) -> Option<MemberId> {
    match rule {
        PlacementRule::Rendezvous => naive_owner(t, kind, id),
        PlacementRule::ZoneAffinity => naive_zone_owner(t, kind, id),
    }
    .map(|m| m.id.clone())
}

impl FreshOwners {
    /// Owners under `rule`.
    pub fn new(rule: PlacementRule) -> Self {
        Self {
            rule,
            memo: Mutex::new(crate::fingerprint::Memo::new(1_024)),
        }
    }

    /// The owners of identity 0..[`IDENTITIES`] over `t`.
    pub fn of(&self, t: &ClusterTopology) -> Owners {
        self.of_printed(t, crate::fingerprint::of(t).full)
    }

    /// [`Self::of`] for a topology whose full fingerprint is `key` (known already).
    pub fn of_printed(&self, t: &ClusterTopology, key: u64) -> Owners {
        let mut memo = self.memo.lock().unwrap_or_else(|e| e.into_inner());
        memo.get_or(key, || {
            Arc::new(
                identities()
                    .iter()
                    .map(|id| naive_owner_by(self.rule, t, KIND, id))
                    .collect(),
            )
        })
    }
}

impl Workload {
    /// A workload for the node `name`; `subscribed` holds its events, subscribed before its
    /// provider starts, and the topology the node held then (the first report starts from it).
    pub fn new(
        name: String,
        ctx: ClusterProviderContext,
        rec: Recorder,
        subscribed: (Subscription, Arc<ClusterTopology>),
        cache_capacity: usize,
        fresh: Arc<FreshOwners>,
        print: Arc<Mutex<ViewPrint>>,
    ) -> Self {
        let (events, subscribed_at) = subscribed;
        let last = Some(subscribed_at);
        Self {
            name,
            ctx,
            rec,
            events,
            exact: cache_capacity >= IDENTITIES,
            asked: BTreeSet::new(),
            last,
            cursor: 0,
            fresh,
            fresh_held: None,
            chain: EventChain::default(),
            print,
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

    /// Fresh owners over `t`, remembered for the last topology asked about.
    fn fresh_of(&mut self, t: &Arc<ClusterTopology>) -> Owners {
        if let Some((held, owners)) = &self.fresh_held
            && Arc::ptr_eq(held, t)
        {
            return owners.clone();
        }
        let key = self
            .print
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .of(t)
            .full;
        let owners = self.fresh.of_printed(t, key);
        self.fresh_held = Some((t.clone(), owners.clone()));
        owners
    }

    /// Checks every report published since the last round; false once the stream closed.
    fn drain(&mut self) -> bool {
        loop {
            match self.events.try_recv() {
                Ok(Some(ClusterEvent::TopologyChanged { topology, report })) => {
                    self.chain
                        .changed(&self.name, &topology, &report, &self.rec);
                    self.check_report(&topology, &report);
                    self.last = Some(topology);
                }
                Ok(Some(_)) => {}
                Ok(None) => return true,
                Err(SubscriptionError::Lagged { .. }) => {
                    self.chain.lagged();
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
        let pm = self.ctx.partition_manager.clone();
        // Nothing can apply a topology during this synchronous loop.
        let topology = pm.topology();
        let fresh = self.fresh_of(&topology);
        for k in 0..PER_ROUND {
            let i = (self.cursor + k) % IDENTITIES;
            let id = &identities()[i];
            let got = pm.owner(KIND, id).map(|m| m.id.clone());
            let want = fresh[i].clone();
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
            self.asked.insert(i);
        }
        self.rec
            .count_n("workload: owner lookups", PER_ROUND as u64);
        self.cursor = (self.cursor + PER_ROUND) % IDENTITIES;
    }

    /// Compares a report's moves with what a fresh computation says moved among the identities
    /// the cache remembered when the topology was applied.
    fn check_report(&mut self, topology: &Arc<ClusterTopology>, report: &RebalanceReport) {
        let Some(last) = self
            .last
            .as_ref()
            .filter(|l| l.version() == report.from_version)
        else {
            self.rec.count("workload: report not checked (lagged)");
            return;
        };
        let last = last.clone();
        let (before, after) = (self.fresh_of(&last), self.fresh_of(topology));
        let expected: Vec<Moved> = self
            .asked
            .iter()
            .filter(|&&i| before[i] != after[i])
            .map(|&i| Moved {
                kind: KIND.to_string(),
                identity: identities()[i].clone(),
                from: before[i].clone(),
                to: after[i].clone(),
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
