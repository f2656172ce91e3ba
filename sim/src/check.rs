//! The checkers: safety while faults run, liveness after they heal.
//!
//! Every violation names the simulated time, the nodes, and what was expected against what was
//! seen. Per-node version monotonicity is checked by the recorder as each topology is applied.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use madsim::time::{Instant, sleep};
use shoal::{ClusterTopology, Description, MemberId};

use crate::cluster::{KIND, ProviderKind, SimCluster};
use crate::fingerprint::{self, Fingerprint};
use crate::workload::naive_owner_by;

/// Identities whose owners are compared across nodes.
pub fn sample_identities() -> &'static [String] {
    // Immutable, so sharing it across simulated nodes and runs cannot leak state.
    static IDS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (0..48).map(|i| format!("actor-{i}")).collect());
    &IDS
}

/// Owners of the sampled identities.
type Owners = Arc<Vec<Option<MemberId>>>;

fn lock_print(
    p: &std::sync::Mutex<fingerprint::ViewPrint>,
) -> std::sync::MutexGuard<'_, fingerprint::ViewPrint> {
    p.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the safety checker remembers between samples, per node incarnation: the topology it
/// held at the last sample (by `Arc` identity, so a node that applied nothing new costs O(1)),
/// its fingerprint, and the owners of the sampled identities over it.
#[derive(Default)]
pub struct OwnerMemo {
    held: BTreeMap<(String, MemberId), (Arc<ClusterTopology>, Fingerprint, Owners)>,
}

/// One node's view at a sample: its name, topology, fingerprint and owners.
type NodeSample = (String, Arc<ClusterTopology>, Fingerprint, Owners);

/// Agreement, sampled: nodes holding the same topology version hold the same members and agree
/// on the owner of every sampled identity. (Lease timing and history are judged continuously by
/// the [`crate::oracle`]s.) O(nodes) per sample once every node's view was seen: members are
/// compared by fingerprint, owners computed once per view.
pub fn check_safety(cluster: &SimCluster, memo: &mut OwnerMemo) {
    let rec = cluster.recorder();
    let views = cluster.live_views();
    let ids = sample_identities();
    let live: BTreeSet<(String, MemberId)> = views
        .iter()
        .map(|(n, _, inc)| (n.clone(), inc.id.clone()))
        .collect();
    memo.held.retain(|k, _| live.contains(k));
    // By (registry epoch, version): version numbers of two registry runs may coincide. Where
    // each node numbers its own topologies (Kubernetes), by member set instead: nodes that
    // list the same members must place the same way.
    let per_node_versions =
        cluster.provider() == ProviderKind::Kubernetes || !cluster.control().epochs_agree();
    let mut by_version: BTreeMap<(u64, u64, u64), Vec<NodeSample>> = BTreeMap::new();
    for (name, _, inc) in &views {
        let t = inc.manager.topology();
        if t.version() == 0 {
            continue;
        }
        let key = (name.clone(), inc.id.clone());
        let (fp, owners) = match memo.held.get(&key) {
            Some((held, fp, owners)) if Arc::ptr_eq(held, &t) => (*fp, owners.clone()),
            _ => {
                let fp = lock_print(&inc.print).of(&t);
                let owners: Owners = Arc::new(
                    ids.iter()
                        .map(|id| inc.manager.peek_owner(KIND, id).map(|m| m.id.clone()))
                        .collect(),
                );
                memo.held.insert(key, (t.clone(), fp, owners.clone()));
                (fp, owners)
            }
        };
        let group = if per_node_versions {
            (0, 0, fp.full)
        } else {
            (t.epoch(), t.version(), 0)
        };
        by_version
            .entry(group)
            .or_default()
            .push((name.clone(), t, fp, owners));
    }
    for ((_, version, _), nodes) in &by_version {
        let (first_name, first_t, first_fp, first_owners) = &nodes[0];
        let held = if per_node_versions {
            "the same members".to_string()
        } else {
            format!("version {version}")
        };
        for (name, t, fp, owners) in &nodes[1..] {
            if fp.ids != first_fp.ids {
                rec.violation_once(format!("members {version} {first_name} {name}"), format!(
                    "safety: {first_name} and {name} both hold version {version} with different members: {:?} vs {:?}",
                    first_t.member_ids().collect::<Vec<_>>(),
                    t.member_ids().collect::<Vec<_>>()
                ));
            }
            if let Some(i) = (0..ids.len()).find(|&i| owners[i] != first_owners[i]) {
                rec.violation_once(format!("owners {version} {first_name} {name}"), format!(
                    "safety: {first_name} and {name} hold {held} but disagree on the owner of {KIND}/{}: {first_name} says {:?}, {name} says {:?}",
                    ids[i], first_owners[i], owners[i]
                ));
            }
        }
    }
}

/// Runs [`check_safety`] every `every` until `until`.
pub async fn safety_loop(cluster: Arc<SimCluster>, every: Duration, until: Instant) {
    let mut memo = OwnerMemo::default();
    while Instant::now() < until {
        check_safety(&cluster, &mut memo);
        sleep(every).await;
    }
}

/// One view as the liveness checker saw it: the topology, the fingerprint of its (id,
/// description) pairs, and whether its placement is rendezvous over it.
type ConvergeSeen = (Arc<ClusterTopology>, u64, Result<(), String>);

/// What the liveness checker remembers between its polls: per node incarnation, the view it
/// held (by `Arc` identity) with its fingerprint of (id, description) pairs and whether its
/// placement of the sampled identities is rendezvous over it; fresh owners per distinct view.
pub struct ConvergeMemo {
    held: BTreeMap<(String, MemberId), ConvergeSeen>,
    fresh: fingerprint::Memo<Owners>,
}

impl Default for ConvergeMemo {
    fn default() -> Self {
        Self {
            held: BTreeMap::new(),
            fresh: fingerprint::Memo::new(1_024),
        }
    }
}

/// What a converged cluster looks like, or why it is not converged yet. O(nodes + members)
/// per call once each view was seen.
fn converged(cluster: &SimCluster, memo: &mut ConvergeMemo) -> Result<u64, String> {
    let starting = cluster.starting_nodes();
    if !starting.is_empty() {
        return Err(format!("{starting:?} restarted but not started yet"));
    }
    let described = cluster.live_member_descriptions();
    let expected = fingerprint::described(described.iter());
    let views = cluster.live_views();
    let rule = cluster.placement_rule();
    let live: BTreeSet<(String, MemberId)> = views
        .iter()
        .map(|(n, _, inc)| (n.clone(), inc.id.clone()))
        .collect();
    memo.held.retain(|k, _| live.contains(k));
    let mut version = None;
    for (name, _, inc) in &views {
        let t = inc.manager.topology();
        let key = (name.clone(), inc.id.clone());
        let (seen, placement) = match memo.held.get(&key) {
            Some((held, seen, placement)) if Arc::ptr_eq(held, &t) => (*seen, placement.clone()),
            _ => {
                let seen = fingerprint::described_of(&t);
                let full = lock_print(&inc.print).of(&t).full;
                let fresh = memo.fresh.get_or(full, || {
                    Arc::new(
                        sample_identities()
                            .iter()
                            .map(|id| naive_owner_by(rule, &t, KIND, id))
                            .collect(),
                    )
                });
                let placement = sample_identities()
                    .iter()
                    .zip(fresh.iter())
                    .find_map(|(id, want)| {
                        let got = inc.manager.peek_owner(KIND, id).map(|m| m.id.clone());
                        (got != *want).then(|| {
                            format!(
                                "{name}: owner of {KIND}/{id} is {got:?}, {rule:?} over its topology says {want:?}"
                            )
                        })
                    })
                    .map_or(Ok(()), Err);
                memo.held.insert(key, (t.clone(), seen, placement.clone()));
                (seen, placement)
            }
        };
        if seen != expected {
            return Err(difference(name, &t, &described));
        }
        match version {
            // Each node numbers its own topologies (no central issuer): equal member sets and
            // placement are what must agree.
            _ if cluster.provider() == ProviderKind::Kubernetes
                || !cluster.control().epochs_agree() =>
            {
                version.get_or_insert((t.epoch(), t.version()));
            }
            None => version = Some((t.epoch(), t.version())),
            Some((e, v)) if (e, v) != (t.epoch(), t.version()) => {
                return Err(format!(
                    "{name} holds v{} of epoch {:x}, others v{v} of epoch {e:x}",
                    t.version(),
                    t.epoch()
                ));
            }
            _ => {}
        }
        placement?;
    }
    Ok(version.map_or(0, |(_, v)| v))
}

/// How node `name`'s view `t` differs from the live members as they describe themselves.
fn difference(
    name: &str,
    t: &ClusterTopology,
    described: &BTreeMap<MemberId, Description>,
) -> String {
    let members: BTreeSet<&MemberId> = t.member_ids().collect();
    let expected: BTreeSet<&MemberId> = described.keys().collect();
    if members != expected {
        let extra: Vec<_> = members.difference(&expected).take(8).collect();
        let missing: Vec<_> = expected.difference(&members).take(8).collect();
        return format!(
            "{name} (v{}) sees {} members, live members are {}: it lists {extra:?} that are not live, misses {missing:?} (at most 8 of each)",
            t.version(),
            members.len(),
            expected.len()
        );
    }
    match t
        .members()
        .iter()
        .find(|m| described.get(&m.id).is_some_and(|d| *d != m.description()))
    {
        // Every member as its process last described itself (a Describe fault).
        Some(m) => format!(
            "{name} (v{}) sees {} as {:?}, its process describes itself as {:?}",
            t.version(),
            m.id,
            m.description(),
            described[&m.id]
        ),
        None => format!(
            "{name} (v{}): fingerprints differ, members do not",
            t.version()
        ),
    }
}

/// The liveness bound: how long after the last heal every live node must have converged (the
/// control plane's: [`crate::control::ControlPlane::liveness_bound`]).
pub fn liveness_bound(cluster: &SimCluster) -> Duration {
    cluster.control().liveness_bound()
}

/// Liveness: waits until all live nodes hold one topology containing exactly the live members,
/// with placement equal to rendezvous over it. Returns how long it took, or records a violation.
pub async fn check_liveness(cluster: &SimCluster) -> Option<Duration> {
    let bound = liveness_bound(cluster);
    let start = Instant::now();
    let mut memo = ConvergeMemo::default();
    loop {
        match converged(cluster, &mut memo) {
            Ok(v) => {
                let took = start.elapsed();
                cluster.recorder().trace(
                    "harness",
                    format!("converged on v{v} after {} ms", took.as_millis()),
                );
                return Some(took);
            }
            Err(why) if start.elapsed() >= bound => {
                cluster.recorder().violation(format!(
                    "liveness: not converged {} s after the last fault healed: {why}",
                    bound.as_secs()
                ));
                return None;
            }
            Err(_) => sleep(Duration::from_millis(100)).await,
        }
    }
}
