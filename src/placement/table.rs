//! Rendezvous (highest-random-weight) placement over one topology, without caching.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::hash::{key_hash, member_hash, weight};
use crate::cluster::{ClusterTopology, Member, MemberId};

/// One member able to host a kind, with its placement hash precomputed.
#[derive(Clone, Debug)]
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

/// Placement of every kind over one topology: the members hosting each kind, in id order, with
/// their hashes precomputed so a lookup is one multiply-and-mix per candidate.
#[derive(Clone, Debug, Default)]
pub struct PlacementTable {
    kinds: BTreeMap<String, Vec<Candidate>>,
}

impl PlacementTable {
    /// Builds the table for `topology`.
    pub fn new(topology: &ClusterTopology) -> Self {
        let mut kinds: BTreeMap<String, Vec<Candidate>> = BTreeMap::new();
        for member in topology.members() {
            for kind in &member.kinds {
                kinds
                    .entry(kind.clone())
                    .or_default()
                    .push(Candidate::new(member.clone()));
            }
        }
        Self { kinds }
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
        choose_among(self.candidates_of(kind), key)
    }
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
    let key = key_hash(kind, identity);
    let mut best: Option<(&Member, u64)> = None;
    for m in topology.members().iter().filter(|m| m.hosts(kind)) {
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
