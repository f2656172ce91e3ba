//! The partition manager: who owns each virtual-actor identity, and what moves when the
//! topology changes.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustc_hash::FxHashMap;
use serde::Serialize;

use super::hash::{key_hash, weight};
use super::table::{Candidate, Choice, PlacementRule, PlacementTable, choose_among};
use crate::cluster::{ClusterTopology, Member, MemberId, TopologyDiff};
use crate::metrics::PlacementMetrics;
use crate::runtime::sim;

/// Tuning for a [`PartitionManager`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionConfig {
    /// Most identities whose owner is remembered. Past it the oldest entry is forgotten (its
    /// owner is recomputed on the next lookup, and it is no longer reported when it moves).
    pub max_cached_identities: usize,
    /// How owners are elected (every node of the cluster must use the same rule).
    pub rule: PlacementRule,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            max_cached_identities: 1_000_000,
            rule: PlacementRule::Rendezvous,
        }
    }
}

/// Why a topology was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The offered version is not newer than the one applied; it is ignored.
    #[error("stale topology for cluster {cluster}: offered version {offered}, holding {current}")]
    StaleTopology {
        /// Cluster name.
        cluster: String,
        /// Version already applied.
        current: u64,
        /// Version offered.
        offered: u64,
    },
    /// The topology describes another cluster.
    #[error("topology of cluster {offered} offered to the partition manager of cluster {expected}")]
    WrongCluster {
        /// This manager's cluster.
        expected: String,
        /// The topology's cluster.
        offered: String,
    },
}

/// One identity whose owner changed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Moved {
    /// Actor kind.
    pub kind: String,
    /// Identity within the kind.
    pub identity: String,
    /// Previous owner (`None`: no member hosted the kind).
    pub from: Option<MemberId>,
    /// New owner (`None`: no member hosts the kind any more).
    pub to: Option<MemberId>,
}

/// What one applied topology change did to placement.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RebalanceReport {
    /// Version held before.
    pub from_version: u64,
    /// Version applied.
    pub to_version: u64,
    /// Membership change between the two versions.
    pub diff: TopologyDiff,
    /// Every remembered identity whose owner changed, sorted by (kind, identity).
    pub moved: Vec<Moved>,
    /// How many identities were remembered (and so checked) when the change was applied.
    pub tracked: usize,
}

/// Places `(kind, identity)` pairs on the members hosting the kind, by rendezvous hashing.
///
/// Every node holding the same topology version computes the same owner for every identity
/// (the hash is fixed, see [`crate::placement::hash`]). Owners are remembered in a bounded cache,
/// so repeated lookups cost one hash and a map probe, and a topology change re-checks only the
/// remembered identities against the members that joined or left: adding one member to a
/// thousand costs one weight per remembered identity, not a thousand.
#[derive(Debug)]
pub struct PartitionManager {
    cluster_name: String,
    state: RwLock<State>,
    metrics: PlacementMetrics,
}

#[derive(Debug)]
struct State {
    topology: Arc<ClusterTopology>,
    table: PlacementTable,
    cache: OwnerCache,
}

impl PartitionManager {
    /// A manager for `cluster_name` holding the empty topology (version 0).
    pub fn new(cluster_name: impl Into<String>, config: PartitionConfig) -> Self {
        let cluster_name = cluster_name.into();
        let empty = ClusterTopology::empty(cluster_name.clone());
        Self {
            state: RwLock::new(State {
                table: PlacementTable::with_rule(&empty, config.rule),
                topology: Arc::new(empty),
                cache: OwnerCache::new(config.max_cached_identities),
            }),
            cluster_name,
            metrics: PlacementMetrics::default(),
        }
    }

    /// The cluster this manager places for.
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// Metrics handles (register them with a Prometheus registry to export).
    pub fn metrics(&self) -> &PlacementMetrics {
        &self.metrics
    }

    /// The topology currently applied.
    pub fn topology(&self) -> Arc<ClusterTopology> {
        self.read().topology.clone()
    }

    /// The version currently applied.
    pub fn version(&self) -> u64 {
        self.read().topology.version()
    }

    /// How many identities' owners are remembered.
    pub fn tracked(&self) -> usize {
        self.read().cache.len
    }

    /// The member that owns `identity` of `kind`, or `None` when no member hosts the kind.
    /// The answer is remembered so that a later topology change reports it if it moves.
    pub fn owner(&self, kind: &str, identity: &str) -> Option<Arc<Member>> {
        self.metrics.lookups.inc();
        let key = key_hash(kind, identity);
        if let Some(hit) = self.read().cache.get(key, kind, identity) {
            self.metrics.cache_hits.inc();
            return hit;
        }
        let mut state = self.write();
        if let Some(hit) = state.cache.get(key, kind, identity) {
            self.metrics.cache_hits.inc();
            return hit;
        }
        let choice = state.table.choose(kind, key);
        let owner = choice.as_ref().map(|c| c.member.clone());
        if state.cache.insert(key, kind, identity, choice) {
            self.metrics.evictions.inc();
        }
        self.metrics.tracked.set(state.cache.len as i64);
        owner
    }

    /// The owner of `identity` of `kind` computed from the current topology without remembering
    /// it.
    pub fn peek_owner(&self, kind: &str, identity: &str) -> Option<Arc<Member>> {
        let key = key_hash(kind, identity);
        let state = self.read();
        match state.cache.get(key, kind, identity) {
            Some(hit) => hit,
            None => state.table.choose(kind, key).map(|c| c.member),
        }
    }

    /// Applies a newer topology and reports which remembered identities changed owner.
    ///
    /// A topology whose version is not higher than the applied one (in the same epoch) is
    /// ignored and reported as [`PlacementError::StaleTopology`], so replays and out-of-order
    /// deliveries are harmless. A topology of another epoch is applied whatever its version: its
    /// source restarted, and the new run's versions are not comparable with the old ones.
    pub fn update_topology(
        &self,
        topology: Arc<ClusterTopology>,
    ) -> Result<RebalanceReport, PlacementError> {
        if topology.cluster_name() != self.cluster_name {
            return Err(PlacementError::WrongCluster {
                expected: self.cluster_name.clone(),
                offered: topology.cluster_name().to_string(),
            });
        }
        let mut state = self.write();
        let current = state.topology.version();
        if !state.topology.is_superseded_by(&topology) {
            self.metrics.stale_updates.inc();
            return Err(PlacementError::StaleTopology {
                cluster: self.cluster_name.clone(),
                current,
                offered: topology.version(),
            });
        }
        let span = tracing::debug_span!(
            "update_topology",
            cluster = %self.cluster_name,
            from_version = current,
            to_version = topology.version(),
            members = topology.len(),
        );
        let _enter = span.enter();
        let diff = state.topology.diff(&topology);
        // The held table patched with what changed (a large cluster's table is not rebuilt
        // for every change); the same table a rebuild gives (tests/placement_props.rs).
        let table = state.table.patched(&topology, &diff);
        let delta = KindDelta::from_diff(&diff, &table);
        let mut moved = state.cache.rebalance(&table, &delta);
        moved.sort_by(|a, b| (&a.kind, &a.identity).cmp(&(&b.kind, &b.identity)));
        let report = RebalanceReport {
            from_version: current,
            to_version: topology.version(),
            diff,
            moved,
            tracked: state.cache.len,
        };
        state.table = table;
        state.topology = topology;
        state.check_invariants();
        self.metrics.topology_version.set(report.to_version as i64);
        self.metrics.members.set(state.topology.len() as i64);
        self.metrics.moved.inc_by(report.moved.len() as u64);
        tracing::debug!(
            moved = report.moved.len(),
            tracked = report.tracked,
            "topology applied"
        );
        Ok(report)
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        // The state is only replaced whole after every computation succeeded, so a poisoned
        // lock still guards a consistent state.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl State {
    /// Checks, in debug builds and in every simulated run, that the owner cache agrees with the
    /// table: its counts match, it holds no more than its capacity, and every remembered owner
    /// is the owner rendezvous hashing elects over the current topology (checked in full for
    /// caches up to 10,000 entries, so debug builds of large tests stay fast).
    fn check_invariants(&self) {
        if !sim::self_checks() {
            return;
        }
        let cache = &self.cache;
        let chained: usize = cache.map.values().map(Vec::len).sum();
        assert_eq!(chained, cache.len, "owner cache: entries and count differ");
        assert_eq!(
            cache.order.len(),
            cache.len,
            "owner cache: order and count differ"
        );
        assert!(cache.len <= cache.capacity, "owner cache over its capacity");
        // The patched table is the table a rebuild gives (checked at every 16th version: a
        // rebuild costs what the patch saves).
        if self.topology.version().is_multiple_of(16) {
            assert!(
                self.table == PlacementTable::with_rule(&self.topology, self.table.rule()),
                "placement table: patched to v{} differs from one built from it",
                self.topology.version()
            );
        }
        if cache.len > 10_000 {
            return;
        }
        // Every remembered owner re-elected costs a scan of the candidates: at most about
        // 100,000 weights a check, on a rotating share of the entries in large clusters.
        let work = cache.len * self.topology.len().max(1);
        let stride = work.div_ceil(100_000).max(1);
        let turn = (self.topology.version() % stride as u64) as usize;
        for (i, (&key, chain)) in cache.map.iter().enumerate() {
            if i % stride != turn {
                continue;
            }
            for e in chain {
                let want = self.table.choose(&e.kind, key).map(|c| c.member.id.clone());
                let have = e.owner.as_ref().map(|c| c.member.id.clone());
                assert_eq!(
                    have,
                    want,
                    "owner cache: {}/{} remembered on {:?}, v{} elects {:?}",
                    e.kind,
                    e.identity,
                    have,
                    self.topology.version(),
                    want
                );
            }
        }
    }
}

/// Per kind: the candidates that appeared and the member ids that stopped hosting it, plus
/// members whose description changed without affecting placement.
#[derive(Default)]
struct KindDelta {
    added: BTreeMap<String, Vec<Candidate>>,
    removed: BTreeMap<String, BTreeSet<MemberId>>,
    refreshed: BTreeSet<MemberId>,
}

impl KindDelta {
    fn from_diff(diff: &TopologyDiff, table: &PlacementTable) -> Self {
        let mut delta = KindDelta::default();
        let mut remove = |m: &Member, kinds: &mut dyn Iterator<Item = &String>| {
            for k in kinds {
                delta
                    .removed
                    .entry(k.clone())
                    .or_default()
                    .insert(m.id.clone());
            }
        };
        for m in &diff.left {
            remove(m, &mut m.kinds.iter());
        }
        let mut added_ids: BTreeMap<String, BTreeSet<MemberId>> = BTreeMap::new();
        for m in &diff.joined {
            for k in &m.kinds {
                added_ids.entry(k.clone()).or_default().insert(m.id.clone());
            }
        }
        for c in &diff.changed {
            let (before, after) = (&c.before, &c.after);
            if before.address != after.address {
                remove(before, &mut before.kinds.iter());
                for k in &after.kinds {
                    added_ids
                        .entry(k.clone())
                        .or_default()
                        .insert(after.id.clone());
                }
            } else {
                remove(before, &mut before.kinds.difference(&after.kinds));
                for k in after.kinds.difference(&before.kinds) {
                    added_ids
                        .entry(k.clone())
                        .or_default()
                        .insert(after.id.clone());
                }
            }
            delta.refreshed.insert(after.id.clone());
        }
        for (kind, ids) in added_ids {
            // Candidates are in id order: each added one is found by binary search.
            let all = table.candidates_of(&kind);
            let cands = ids
                .iter()
                .filter_map(|id| {
                    all.binary_search_by(|c| c.member.id.cmp(id))
                        .ok()
                        .map(|i| all[i].clone())
                })
                .collect();
            delta.added.insert(kind, cands);
        }
        delta
    }
}

#[derive(Debug)]
struct Entry {
    kind: Arc<str>,
    identity: Box<str>,
    owner: Option<Choice>,
}

/// Remembered owners, keyed by key hash (collisions chained), evicted oldest-first at capacity.
#[derive(Debug)]
struct OwnerCache {
    map: FxHashMap<u64, Vec<Entry>>,
    /// Key hash of every entry in insertion order; an entry is always first in its chain among
    /// those inserted after it, so popping the front removes the oldest entry overall.
    order: VecDeque<u64>,
    len: usize,
    capacity: usize,
}

impl OwnerCache {
    fn new(capacity: usize) -> Self {
        Self {
            map: FxHashMap::default(),
            order: VecDeque::new(),
            len: 0,
            capacity,
        }
    }

    /// `Some(owner)` when remembered (the owner itself may be `None`), `None` when not.
    fn get(&self, key: u64, kind: &str, identity: &str) -> Option<Option<Arc<Member>>> {
        self.map.get(&key)?.iter().find_map(|e| {
            (&*e.kind == kind && &*e.identity == identity)
                .then(|| e.owner.as_ref().map(|c| c.member.clone()))
        })
    }

    /// Remembers an owner; returns whether an older entry was evicted to make room.
    fn insert(&mut self, key: u64, kind: &str, identity: &str, owner: Option<Choice>) -> bool {
        if self.capacity == 0 {
            return false;
        }
        let mut evicted = false;
        if self.len >= self.capacity
            && let Some(old) = self.order.pop_front()
            && let Some(chain) = self.map.get_mut(&old)
        {
            chain.remove(0);
            if chain.is_empty() {
                self.map.remove(&old);
            }
            self.len -= 1;
            evicted = true;
        }
        self.map.entry(key).or_default().push(Entry {
            kind: Arc::from(kind),
            identity: Box::from(identity),
            owner,
        });
        self.order.push_back(key);
        self.len += 1;
        evicted
    }

    /// Re-elects owners for the new table; returns the identities whose owner changed.
    fn rebalance(&mut self, table: &PlacementTable, delta: &KindDelta) -> Vec<Moved> {
        let mut moved = Vec::new();
        let (ignore_joins, unreported) = (
            sim::flaw("rebalance-ignores-joins"),
            sim::flaw("rebalance-unreported"),
        );
        for (&key, chain) in self.map.iter_mut() {
            for entry in chain.iter_mut() {
                let kind = &*entry.kind;
                let candidates = table.candidates_of(kind);
                let next = match &entry.owner {
                    // Zone affinity: a join or leave can move a key's home zone; elect again.
                    _ if table.rule() == PlacementRule::ZoneAffinity => table.choose(kind, key),
                    None => choose_among(candidates, key),
                    Some(cur)
                        if delta
                            .removed
                            .get(kind)
                            .is_some_and(|ids| ids.contains(&cur.member.id)) =>
                    {
                        choose_among(candidates, key)
                    }
                    Some(cur) => {
                        let mut best = cur.clone();
                        if delta.refreshed.contains(&cur.member.id)
                            && let Ok(i) =
                                candidates.binary_search_by(|c| c.member.id.cmp(&cur.member.id))
                        {
                            best.member = candidates[i].member.clone();
                        }
                        let added = delta.added.get(kind).filter(|_| !ignore_joins);
                        for cand in added.into_iter().flatten() {
                            let w = weight(key, cand.seed);
                            if best.beaten_by(w, &cand.member.id) {
                                best = Choice {
                                    member: cand.member.clone(),
                                    weight: w,
                                };
                            }
                        }
                        Some(best)
                    }
                };
                let before = entry.owner.as_ref().map(|c| &c.member.id);
                let after = next.as_ref().map(|c| &c.member.id);
                if before != after && !unreported {
                    moved.push(Moved {
                        kind: kind.to_string(),
                        identity: entry.identity.to_string(),
                        from: before.cloned(),
                        to: after.cloned(),
                    });
                }
                entry.owner = next;
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::naive_owner;

    fn member(i: usize, kinds: &[&str]) -> Member {
        Member::new(
            MemberId::parse(format!("m{i:04}")).unwrap(),
            format!("10.0.{}.{}:4000", i / 250, i % 250),
            kinds.iter().copied(),
        )
    }

    fn topo(version: u64, members: impl IntoIterator<Item = Member>) -> Arc<ClusterTopology> {
        Arc::new(ClusterTopology::new("c", version, members).unwrap())
    }

    #[test]
    fn stale_and_foreign_topologies_are_rejected() {
        let pm = PartitionManager::new("c", PartitionConfig::default());
        pm.update_topology(topo(5, [member(1, &["k"])])).unwrap();
        let err = pm
            .update_topology(topo(5, [member(2, &["k"])]))
            .unwrap_err();
        assert!(matches!(
            err,
            PlacementError::StaleTopology {
                current: 5,
                offered: 5,
                ..
            }
        ));
        assert!(pm.update_topology(topo(4, [])).is_err());
        let other = Arc::new(ClusterTopology::new("other", 9, Vec::<Member>::new()).unwrap());
        assert!(matches!(
            pm.update_topology(other),
            Err(PlacementError::WrongCluster { .. })
        ));
        assert_eq!(pm.version(), 5);
        assert_eq!(pm.topology().members()[0].id.as_str(), "m0001");
        assert_eq!(pm.cluster_name(), "c");
    }

    #[test]
    fn a_new_epoch_is_a_reset_whatever_its_version() {
        let pm = PartitionManager::new("c", PartitionConfig::default());
        let epoch = |e: u64, v: u64, members: Vec<Member>| {
            Arc::new(ClusterTopology::new("c", v, members).unwrap().with_epoch(e))
        };
        pm.update_topology(epoch(1, 500, vec![member(1, &["k"]), member(2, &["k"])]))
            .unwrap();
        // The source restarted with its clock behind: lower versions, another epoch.
        let report = pm
            .update_topology(epoch(2, 20, vec![member(2, &["k"])]))
            .unwrap();
        assert_eq!((report.from_version, report.to_version), (500, 20));
        assert_eq!(report.diff.left.len(), 1);
        assert_eq!((pm.topology().epoch(), pm.version()), (2, 20));
        // Within the new epoch, versions are ordered again.
        assert!(matches!(
            pm.update_topology(epoch(2, 19, vec![])),
            Err(PlacementError::StaleTopology { .. })
        ));
        // An empty version 0 of some epoch does not replace a fresh manager's empty start.
        let fresh = PartitionManager::new("c", PartitionConfig::default());
        assert!(fresh.update_topology(epoch(3, 0, vec![])).is_err());
    }

    #[test]
    fn moves_are_reported_exactly_and_match_a_fresh_computation() {
        let pm = PartitionManager::new("c", PartitionConfig::default());
        let t1 = topo(1, (0..10).map(|i| member(i, &["a", "b"])));
        pm.update_topology(t1.clone()).unwrap();
        let ids: Vec<String> = (0..2000).map(|i| format!("id{i}")).collect();
        for id in &ids {
            pm.owner("a", id);
        }
        // Member 3 leaves, member 10 joins, member 4 stops hosting "a", member 5 moves address.
        let mut members: Vec<Member> = (0..11)
            .filter(|&i| i != 3)
            .map(|i| member(i, &["a", "b"]))
            .collect();
        members[3].kinds.remove("a"); // member 4
        members[4].address = "192.168.0.5:1".into(); // member 5
        let t2 = topo(2, members);
        let report = pm.update_topology(t2.clone()).unwrap();
        assert_eq!(report.tracked, 2000);
        let mut expected = Vec::new();
        for id in &ids {
            let before = naive_owner(&t1, "a", id).map(|m| m.id.clone());
            let after = naive_owner(&t2, "a", id).map(|m| m.id.clone());
            assert_eq!(pm.owner("a", id).map(|m| m.id.clone()), after, "{id}");
            if before != after {
                expected.push(id.clone());
            }
        }
        expected.sort();
        let got: Vec<String> = report.moved.iter().map(|m| m.identity.clone()).collect();
        assert_eq!(got, expected);
        assert!(!got.is_empty());
    }

    #[test]
    fn kind_with_no_host_has_no_owner_until_one_joins() {
        let pm = PartitionManager::new("c", PartitionConfig::default());
        pm.update_topology(topo(1, [member(1, &["a"])])).unwrap();
        assert!(pm.owner("b", "x").is_none());
        let report = pm
            .update_topology(topo(2, [member(1, &["a"]), member(2, &["b"])]))
            .unwrap();
        assert_eq!(report.moved.len(), 1);
        assert_eq!(report.moved[0].from, None);
        assert_eq!(report.moved[0].to.as_ref().unwrap().as_str(), "m0002");
        let report = pm.update_topology(topo(3, [member(1, &["a"])])).unwrap();
        assert_eq!(report.moved[0].to, None);
        assert!(pm.owner("b", "x").is_none());
    }

    #[test]
    fn cache_is_bounded_and_lookups_stay_correct_past_the_bound() {
        let pm = PartitionManager::new(
            "c",
            PartitionConfig {
                max_cached_identities: 100,
                ..PartitionConfig::default()
            },
        );
        let t = topo(1, (0..20).map(|i| member(i, &["a"])));
        pm.update_topology(t.clone()).unwrap();
        for i in 0..1000 {
            let id = format!("x{i}");
            let got = pm.owner("a", &id).map(|m| m.id.clone());
            assert_eq!(got, naive_owner(&t, "a", &id).map(|m| m.id.clone()));
            assert!(pm.tracked() <= 100);
        }
        assert_eq!(pm.tracked(), 100);
        assert_eq!(pm.metrics().evictions.get(), 900);
        // The newest 100 are remembered, so a change reports only those.
        let report = pm
            .update_topology(topo(2, (0..19).map(|i| member(i, &["a"]))))
            .unwrap();
        assert!(
            report
                .moved
                .iter()
                .all(|m| m.identity[1..].parse::<usize>().unwrap() >= 900)
        );
    }

    #[test]
    fn metadata_change_refreshes_owner_without_moving() {
        let pm = PartitionManager::new("c", PartitionConfig::default());
        pm.update_topology(topo(1, [member(1, &["a"])])).unwrap();
        assert!(pm.owner("a", "x").unwrap().zone.is_none());
        let report = pm
            .update_topology(topo(2, [member(1, &["a"]).with_zone("z1")]))
            .unwrap();
        assert!(report.moved.is_empty());
        assert_eq!(pm.owner("a", "x").unwrap().zone.as_deref(), Some("z1"));
    }
}
