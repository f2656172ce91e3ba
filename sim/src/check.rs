//! The checkers: safety while faults run, liveness after they heal.
//!
//! Every violation names the simulated time, the nodes, and what was expected against what was
//! seen. Per-node version monotonicity is checked by the recorder as each topology is applied.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use madsim::time::{Instant, sleep};
use shoal::{ClusterTopology, MemberId};

use crate::cluster::{KIND, ProviderKind, SimCluster};
use crate::workload::naive_owner_by;

/// Identities whose owners are compared across nodes.
pub fn sample_identities() -> &'static [String] {
    // Immutable, so sharing it across simulated nodes and runs cannot leak state.
    static IDS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (0..48).map(|i| format!("actor-{i}")).collect());
    &IDS
}

/// Owners of the sampled identities per (node, incarnation, epoch, version), kept between
/// samples. (The epoch matters: a backend that lost its data issues the same version numbers
/// again, found by `etcd-data-loss`.)
pub type OwnerMemo = BTreeMap<(String, MemberId, u64, u64), Arc<Vec<Option<MemberId>>>>;

/// One node's view at a sample: its name, topology and owners of the sampled identities.
type NodeSample = (String, Arc<ClusterTopology>, Arc<Vec<Option<MemberId>>>);

/// Agreement, sampled: nodes holding the same topology version hold the same members and agree
/// on the owner of every sampled identity. (Lease timing and history are judged continuously by
/// the [`crate::oracle`]s.)
pub fn check_safety(cluster: &SimCluster, owners_seen: &mut OwnerMemo) {
    let rec = cluster.recorder();
    let views = cluster.live_views();
    let ids = sample_identities();
    // Owners are a function of (node incarnation, version): compute them once per version.
    owners_seen.retain(|(name, id, e, v), _| {
        views.iter().any(|(n, _, inc)| {
            let t = inc.manager.topology();
            n == name && &inc.id == id && t.epoch() == *e && t.version() == *v
        })
    });
    // By (registry epoch, version): version numbers of two registry runs may coincide. Where
    // each node numbers its own topologies (Kubernetes), by member set instead: nodes that
    // list the same members must place the same way.
    let per_node_versions = cluster.provider() == ProviderKind::Kubernetes;
    let mut by_version: BTreeMap<(u64, u64, Vec<MemberId>), Vec<NodeSample>> = BTreeMap::new();
    for (name, _, inc) in &views {
        let t = inc.manager.topology();
        if t.version() == 0 {
            continue;
        }
        let owners = owners_seen
            .entry((name.clone(), inc.id.clone(), t.epoch(), t.version()))
            .or_insert_with(|| {
                Arc::new(
                    ids.iter()
                        .map(|id| inc.manager.peek_owner(KIND, id).map(|m| m.id.clone()))
                        .collect(),
                )
            })
            .clone();
        let key = if per_node_versions {
            (0, 0, t.member_ids().cloned().collect())
        } else {
            (t.epoch(), t.version(), Vec::new())
        };
        by_version
            .entry(key)
            .or_default()
            .push((name.clone(), t, owners));
    }
    for ((_, version, _), nodes) in &by_version {
        let (first_name, first_t, first_owners) = &nodes[0];
        let held = if per_node_versions {
            "the same members".to_string()
        } else {
            format!("version {version}")
        };
        for (name, t, owners) in &nodes[1..] {
            if !t.member_ids().eq(first_t.member_ids()) {
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
    let mut memo = OwnerMemo::new();
    while Instant::now() < until {
        check_safety(&cluster, &mut memo);
        sleep(every).await;
    }
}

/// What a converged cluster looks like, or why it is not converged yet.
fn converged(cluster: &SimCluster) -> Result<u64, String> {
    let starting = cluster.starting_nodes();
    if !starting.is_empty() {
        return Err(format!("{starting:?} restarted but not started yet"));
    }
    let described = cluster.live_member_descriptions();
    let expected: std::collections::BTreeSet<MemberId> = described.keys().cloned().collect();
    let views = cluster.live_views();
    let mut version = None;
    for (name, _, inc) in &views {
        let t = inc.manager.topology();
        let members: std::collections::BTreeSet<MemberId> = t.member_ids().cloned().collect();
        if members != expected {
            return Err(format!(
                "{name} (v{}) sees {:?}, live members are {:?}",
                t.version(),
                members,
                expected
            ));
        }
        // Every member as its process last described itself (a Describe fault).
        if let Some(m) = t
            .members()
            .iter()
            .find(|m| described.get(&m.id).is_some_and(|d| *d != m.description()))
        {
            return Err(format!(
                "{name} (v{}) sees {} as {:?}, its process describes itself as {:?}",
                t.version(),
                m.id,
                m.description(),
                described[&m.id]
            ));
        }
        match version {
            // Each node numbers its own topologies (no central issuer): equal member sets and
            // placement are what must agree.
            _ if cluster.provider() == ProviderKind::Kubernetes => {
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
        for id in sample_identities() {
            let got = inc.manager.peek_owner(KIND, id).map(|m| m.id.clone());
            let want = naive_owner_by(cluster.placement_rule(), &t, KIND, id);
            if got != want {
                return Err(format!(
                    "{name}: owner of {KIND}/{id} is {got:?}, {:?} over its topology says {want:?}",
                    cluster.placement_rule()
                ));
            }
        }
    }
    Ok(version.map_or(0, |(_, v)| v))
}

/// The liveness bound: how long after the last heal every live node must have converged.
pub fn liveness_bound(cluster: &SimCluster) -> Duration {
    match cluster.provider() {
        ProviderKind::InMemory => Duration::from_secs(5),
        // Restarted members re-join (start retries every 1 s), a restarted registry holds
        // snapshots for its startup grace, an expired member re-joins at its next heartbeat,
        // watches reconnect within the backoff cap, and madsim may deliver messages held by a
        // healed partition up to ~10 s late.
        // Node-side timers run on clocks that may still drift 25% slow, hence the 4/3.
        ProviderKind::Registry => {
            let c = cluster.registry_config();
            (c.grace() + c.ttl + c.heartbeat()) * 4 / 3 + Duration::from_secs(5 + 10 + 4)
        }
        // A dead member's Lease is deleted a duration (plus up to half of one, if the first
        // cleaner is gone too) after its last renewal; a member that lost its Lease creates a
        // new one at its next renewal; a restarted process starts within a few seconds; watches
        // reopen within a renew interval; slow clocks (25%) stretch all of it.
        ProviderKind::Kubernetes => {
            let c = crate::cluster::kubernetes_config(None);
            (c.lease_duration * 2 + c.renew_interval() + c.watch_idle_timeout) * 4 / 3
                + Duration::from_secs(5 + 10 + 4)
        }
        // A dead member's key goes a TTL after its last keep-alive; a member that lost its
        // lease registers again at its next keep-alive round; watches reopen within the idle
        // timeout; slow clocks (25%) stretch all of it.
        ProviderKind::Etcd => {
            let c = crate::cluster::etcd_config();
            (c.ttl * 2 + c.keep_alive_interval() + c.watch_idle_timeout) * 4 / 3
                + Duration::from_secs(5 + 10 + 4)
        }
    }
}

/// Liveness: waits until all live nodes hold one topology containing exactly the live members,
/// with placement equal to rendezvous over it. Returns how long it took, or records a violation.
pub async fn check_liveness(cluster: &SimCluster) -> Option<Duration> {
    let bound = liveness_bound(cluster);
    let start = Instant::now();
    loop {
        match converged(cluster) {
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
