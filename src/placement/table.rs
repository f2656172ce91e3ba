//! Rendezvous (highest-random-weight) placement over one topology, without caching.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::hash::{key_hash, member_hash, weight, zone_hash};
use crate::cluster::{ClusterTopology, Member, MemberId, TopologyDiff};

/// One member able to host a kind, with its placement hash precomputed.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Candidate {
    pub(crate) member: Arc<Member>,
    pub(crate) seed: u64,
}

impl Candidate {
    pub(crate) fn new(member: Arc<Member>) -> Self {
        let seed = member_hash(&member.address);
        Self { member, seed }
    }
}

/// The winner of a rendezvous election: who owns a key and with what weight.
#[derive(Clone, Debug)]
pub(crate) struct Choice {
    pub(crate) member: Arc<Member>,
    pub(crate) weight: u64,
}

impl Choice {
    /// Whether `(weight, id)` beats this choice: higher weight, or equal weight and smaller id.
    pub(crate) fn beaten_by(&self, weight: u64, id: &MemberId) -> bool {
        weight > self.weight || (weight == self.weight && *id < self.member.id)
    }
}

/// How an identity's owner is elected among the members hosting its kind. Every node of a
/// cluster must use the same rule (it is part of the placement contract, like the hash).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PlacementRule {
    /// Rendezvous hashing over every member hosting the kind.
    #[default]
    Rendezvous,
    /// Zone affinity: each `(kind, identity)` has a home zone, elected by rendezvous hashing
    /// over the zones of the members hosting the kind (`zone_hash`), and its owner is elected
    /// among that zone's members. Members without a zone form one zone of their own. The
    /// answer depends only on the topology, never on the asking node's zone; when a zone
    /// loses its last member, only the identities homed there move (to their next zone), and
    /// a member joining or leaving a zone moves only identities of that zone.
    ZoneAffinity,
}

/// The members of one zone hosting a kind.
#[derive(Clone, Debug, PartialEq)]
struct Zone {
    seed: u64,
    candidates: Vec<Candidate>,
}

/// Placement of every kind over one topology: the members hosting each kind, in id order, with
/// their hashes precomputed so a lookup is one multiply-and-mix per candidate.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PlacementTable {
    kinds: BTreeMap<String, Vec<Candidate>>,
    rule: PlacementRule,
    /// Per kind, its zones by name (zone affinity only).
    zones: BTreeMap<String, BTreeMap<String, Zone>>,
}

impl PlacementTable {
    /// Builds the table for `topology` (plain rendezvous).
    pub fn new(topology: &ClusterTopology) -> Self {
        Self::with_rule(topology, PlacementRule::Rendezvous)
    }

    /// Builds the table for `topology` under `rule`.
    pub fn with_rule(topology: &ClusterTopology, rule: PlacementRule) -> Self {
        let mut kinds: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
        for member in topology.members() {
            for kind in &member.kinds {
                let c = Candidate::new(member.clone());
                match kinds.get_mut(kind) {
                    Some(list) => list.push(c),
                    None => {
                        kinds.insert(kind.clone(), vec![c]);
                    }
                }
            }
        }
        let mut zones: BTreeMap<String, BTreeMap<String, Zone>> = BTreeMap::new();
        if rule == PlacementRule::ZoneAffinity {
            for (kind, candidates) in &kinds {
                zones.insert(kind.clone(), zones_of(candidates));
            }
        }
        Self { kinds, rule, zones }
    }

    /// The table for `topology`, given that this table is for a topology `diff` turns into
    /// it: equal to [`Self::with_rule`] over `topology` with this table's rule, at the cost of
    /// copying the candidate lists and placing the changed members, instead of rebuilding
    /// (and re-hashing) every member. `topology`'s members are shared, not copied.
    pub fn patched(&self, topology: &ClusterTopology, diff: &TopologyDiff) -> Self {
        let mut kinds = self.kinds.clone();
        let mut touched: BTreeSet<String> = BTreeSet::new();
        let mut remove = |kinds: &mut BTreeMap<String, Vec<Candidate>>, m: &Member| {
            for kind in &m.kinds {
                if let Some(list) = kinds.get_mut(kind)
                    && let Ok(i) = list.binary_search_by(|c| c.member.id.cmp(&m.id))
                {
                    list.remove(i);
                    touched.insert(kind.clone());
                }
            }
        };
        for m in &diff.left {
            remove(&mut kinds, m);
        }
        for c in &diff.changed {
            remove(&mut kinds, &c.before);
        }
        let added = diff
            .joined
            .iter()
            .chain(diff.changed.iter().map(|c| &c.after));
        for m in added {
            let Some(shared) = topology
                .members()
                .binary_search_by(|x| x.id.cmp(&m.id))
                .ok()
                .map(|i| topology.members()[i].clone())
            else {
                continue; // Not in the topology: the diff is not from this table's topology.
            };
            for kind in &shared.kinds {
                let list = match kinds.get_mut(kind) {
                    Some(list) => list,
                    None => kinds.entry(kind.clone()).or_default(),
                };
                if let Err(i) = list.binary_search_by(|c| c.member.id.cmp(&shared.id)) {
                    list.insert(i, Candidate::new(shared.clone()));
                }
                touched.insert(kind.clone());
            }
        }
        kinds.retain(|_, list| !list.is_empty());
        let mut zones = BTreeMap::new();
        if self.rule == PlacementRule::ZoneAffinity {
            for (kind, candidates) in &kinds {
                let z = match self.zones.get(kind) {
                    Some(z) if !touched.contains(kind) => z.clone(),
                    _ => zones_of(candidates),
                };
                zones.insert(kind.clone(), z);
            }
        }
        Self {
            kinds,
            rule: self.rule,
            zones,
        }
    }

    /// The rule this table elects owners by.
    pub fn rule(&self) -> PlacementRule {
        self.rule
    }

    /// The owner of `identity` of `kind`, or `None` when no member hosts the kind.
    pub fn owner(&self, kind: &str, identity: &str) -> Option<Arc<Member>> {
        self.choose(kind, key_hash(kind, identity))
            .map(|c| c.member)
    }

    /// Members hosting `kind`, in id order.
    pub fn candidates(&self, kind: &str) -> impl Iterator<Item = &Member> {
        self.kinds
            .get(kind)
            .into_iter()
            .flatten()
            .map(|c| &*c.member)
    }

    pub(crate) fn candidates_of(&self, kind: &str) -> &[Candidate] {
        self.kinds.get(kind).map(Vec::as_slice).unwrap_or(&[])
    }

    pub(crate) fn choose(&self, kind: &str, key: u64) -> Option<Choice> {
        match self.rule {
            PlacementRule::Rendezvous => choose_among(self.candidates_of(kind), key),
            PlacementRule::ZoneAffinity => {
                let zones = self.zones.get(kind)?;
                // Zones in name order: on equal weights the first (smallest name) is kept.
                let mut home: Option<(&Zone, u64)> = None;
                for zone in zones.values() {
                    let w = weight(key, zone.seed);
                    match home {
                        Some((_, hw)) if w <= hw => {}
                        _ => home = Some((zone, w)),
                    }
                }
                choose_among(&home?.0.candidates, key)
            }
        }
    }
}

/// The zones of one kind's candidates (which are in id order, as each zone's stay).
fn zones_of(candidates: &[Candidate]) -> BTreeMap<String, Zone> {
    let mut by_zone: BTreeMap<String, Zone> = BTreeMap::new();
    for c in candidates {
        let zone = c.member.zone.as_deref().unwrap_or_default();
        match by_zone.get_mut(zone) {
            Some(z) => z.candidates.push(c.clone()),
            None => {
                by_zone.insert(
                    zone.to_string(),
                    Zone {
                        seed: zone_hash(zone),
                        candidates: vec![c.clone()],
                    },
                );
            }
        }
    }
    by_zone
}

/// Rendezvous election of `key` among `candidates` (which are in id order, so on equal weights
/// the first, smallest id, is kept).
pub(crate) fn choose_among(candidates: &[Candidate], key: u64) -> Option<Choice> {
    let mut best: Option<(&Candidate, u64)> = None;
    for c in candidates {
        let w = weight(key, c.seed);
        match best {
            Some((_, bw)) if w <= bw => {}
            _ => best = Some((c, w)),
        }
    }
    best.map(|(c, w)| Choice {
        member: c.member.clone(),
        weight: w,
    })
}

/// The textbook rendezvous scan with nothing precomputed: hashes every member's address together
/// with the key on each call. It is the reference the benchmarks and property tests compare
/// [`PlacementTable`] and the partition manager against.
pub fn naive_owner<'a>(
    topology: &'a ClusterTopology,
    kind: &str,
    identity: &str,
) -> Option<&'a Member> {
    naive_scan(
        topology
            .members()
            .iter()
            .map(|m| &**m)
            .filter(|m| m.hosts(kind)),
        key_hash(kind, identity),
    )
}

/// The rendezvous winner of `key` among `members`, hashing each address on the spot.
fn naive_scan<'a>(members: impl Iterator<Item = &'a Member>, key: u64) -> Option<&'a Member> {
    let mut best: Option<(&Member, u64)> = None;
    for m in members {
        let w = weight(key, member_hash(&m.address));
        let better = match best {
            None => true,
            Some((bm, bw)) => w > bw || (w == bw && m.id < bm.id),
        };
        if better {
            best = Some((m, w));
        }
    }
    best.map(|(m, _)| m)
}

/// [`naive_owner`] under [`PlacementRule::ZoneAffinity`], with nothing precomputed: the home
/// zone by a rendezvous scan over the zone names of the members hosting `kind`, then the owner
/// by a rendezvous scan over that zone's members. The reference for the property tests.
pub fn naive_zone_owner<'a>(
    topology: &'a ClusterTopology,
    kind: &str,
    identity: &str,
) -> Option<&'a Member> {
    let key = key_hash(kind, identity);
    let hosts: Vec<&Member> = topology
        .members()
        .iter()
        .map(|m| &**m)
        .filter(|m| m.hosts(kind))
        .collect();
    let zone_of = |m: &Member| m.zone.clone().unwrap_or_default();
    let mut home: Option<(String, u64)> = None;
    for zone in hosts.iter().map(|m| zone_of(m)) {
        let w = weight(key, zone_hash(&zone));
        let better = match &home {
            None => true,
            Some((hz, hw)) => w > *hw || (w == *hw && zone < *hz),
        };
        if better {
            home = Some((zone, w));
        }
    }
    let (home, _) = home?;
    naive_scan(hosts.into_iter().filter(|m| zone_of(m) == home), key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::MemberId;

    fn member(id: &str, address: &str) -> Member {
        Member::new(MemberId::parse(id).unwrap(), address, ["k"])
    }

    /// Two incarnations at one address hash alike, so every weight ties: the smaller (older) id
    /// owns, in the table, the reference scan and the cache's tie-break alike.
    #[test]
    fn equal_weights_go_to_the_smaller_id() {
        let (old, new) = (
            member("a-1", "10.0.0.1:4000"),
            member("a-2", "10.0.0.1:4000"),
        );
        let t = ClusterTopology::new("c", 1, [new.clone(), old.clone()]).unwrap();
        let table = PlacementTable::new(&t);
        for i in 0..50 {
            let id = format!("x{i}");
            assert_eq!(naive_owner(&t, "k", &id).unwrap().id, old.id);
            assert_eq!(table.owner("k", &id).unwrap().id, old.id);
        }
        let held = Choice {
            member: Arc::new(new.clone()),
            weight: 7,
        };
        assert!(held.beaten_by(7, &old.id), "a tie goes to the smaller id");
        assert!(!held.beaten_by(7, &new.id), "a member does not beat itself");
        assert!(!held.beaten_by(6, &old.id), "a lower weight never wins");
        assert!(held.beaten_by(8, &MemberId::parse("z").unwrap()));
        let listed: Vec<&MemberId> = table.candidates("k").map(|m| &m.id).collect();
        assert_eq!(listed, vec![&old.id, &new.id], "candidates in id order");
        assert_eq!(table.candidates("other").count(), 0);
    }
}
