//! Fingerprints of topologies, computed by the harness's own code, so checkers compare two
//! views of a thousand members in O(1) instead of member by member, and memoize per distinct
//! topology what only depends on its members (fresh owners, placement checks).
//!
//! A fingerprint is a deterministic 64-bit hash (FxHash, no random keys: the same on every run)
//! over every field of every member. Two topologies with equal fingerprints are treated as
//! equal; a collision would hide a difference with probability about 2^-64 per comparison.
//! Where a checker reports a difference it spells it out member by member (rare, so it can
//! afford O(N)).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

use rustc_hash::FxHasher;
use shoal::{ClusterTopology, Description, Member, MemberId};

/// What a topology's members are, in two grains.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Fingerprint {
    /// Over the member ids only (the member *set*).
    pub ids: u64,
    /// Over every field of every member: id, address, kinds, zone, metadata.
    pub full: u64,
}

fn hash_description(h: &mut FxHasher, kinds: &std::collections::BTreeSet<String>, zone: &Option<String>, metadata: &BTreeMap<String, String>) {
    kinds.len().hash(h);
    for k in kinds {
        k.hash(h);
    }
    zone.hash(h);
    metadata.len().hash(h);
    for (k, v) in metadata {
        k.hash(h);
        v.hash(h);
    }
}

/// The fingerprint of `t`'s members (its epoch and version are not part of it).
pub fn of(t: &ClusterTopology) -> Fingerprint {
    members(t.members().iter().map(|m| &**m))
}

/// The fingerprint of `members`, in the order given (topologies keep members sorted by id).
pub fn members<'a>(members: impl Iterator<Item = &'a Member>) -> Fingerprint {
    let (mut ids, mut full) = (FxHasher::default(), FxHasher::default());
    let mut n = 0usize;
    for m in members {
        n += 1;
        m.id.as_str().hash(&mut ids);
        m.id.as_str().hash(&mut full);
        m.address.hash(&mut full);
        hash_description(&mut full, &m.kinds, &m.zone, &m.metadata);
    }
    n.hash(&mut ids);
    n.hash(&mut full);
    Fingerprint {
        ids: ids.finish(),
        full: full.finish(),
    }
}

/// A fingerprint over (id, description) pairs, in id order: what the members say of
/// themselves, without addresses.
pub fn described<'a>(members: impl Iterator<Item = (&'a MemberId, &'a Description)>) -> u64 {
    let mut h = FxHasher::default();
    let mut n = 0usize;
    for (id, d) in members {
        n += 1;
        id.as_str().hash(&mut h);
        hash_description(&mut h, &d.kinds, &d.zone, &d.metadata);
    }
    n.hash(&mut h);
    h.finish()
}

/// [`described`] of a topology's members.
pub fn described_of(t: &ClusterTopology) -> u64 {
    let mut h = FxHasher::default();
    for m in t.members() {
        m.id.as_str().hash(&mut h);
        hash_description(&mut h, &m.kinds, &m.zone, &m.metadata);
    }
    t.len().hash(&mut h);
    h.finish()
}

/// A bounded memo keyed by a topology's full fingerprint (values that depend only on its
/// members). Cleared when it reaches `capacity` entries, so a long run cannot grow it forever.
#[derive(Debug)]
pub struct Memo<V> {
    capacity: usize,
    entries: BTreeMap<u64, V>,
}

impl<V: Clone> Memo<V> {
    /// A memo of at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            entries: BTreeMap::new(),
        }
    }

    /// The value for fingerprint `key`, computed by `f` the first time.
    pub fn get_or(&mut self, key: u64, f: impl FnOnce() -> V) -> V {
        if let Some(v) = self.entries.get(&key) {
            return v.clone();
        }
        if self.entries.len() >= self.capacity {
            self.entries.clear();
        }
        let v = f();
        self.entries.insert(key, v.clone());
        v
    }
}

/// The fingerprint of the last topology seen per key (a node), recomputed only when the node
/// holds another topology (`Arc` identity): a node that did not change costs O(1).
#[derive(Debug, Default)]
pub struct PerNode<K: Ord> {
    held: BTreeMap<K, (Arc<ClusterTopology>, Fingerprint)>,
}

impl<K: Ord> PerNode<K> {
    /// `t`'s fingerprint, as held by `key`.
    pub fn of(&mut self, key: K, t: &Arc<ClusterTopology>) -> Fingerprint {
        match self.held.get(&key) {
            Some((held, fp)) if Arc::ptr_eq(held, t) => *fp,
            _ => {
                let fp = of(t);
                self.held.insert(key, (t.clone(), fp));
                fp
            }
        }
    }

    /// Forgets keys `keep` rejects.
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.held.retain(|k, _| keep(k));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str, address: &str, zone: Option<&str>) -> Member {
        let mut m = Member::new(
            MemberId::parse(id).unwrap_or_else(|_| panic!("id {id}")),
            address,
            ["user"],
        );
        m.zone = zone.map(String::from);
        m
    }

    #[test]
    fn equal_members_equal_fingerprints_and_any_field_changes_it() {
        let a = "10-0-1-1-4000-0000000000000001-00000001";
        let b = "10-0-1-2-4000-0000000000000002-00000002";
        let t = |members: Vec<Member>| ClusterTopology::new("c", 1, members).unwrap();
        let base = of(&t(vec![member(a, "10.0.1.1:4000", None), member(b, "x:1", None)]));
        let again = of(&ClusterTopology::new("c", 9, vec![member(b, "x:1", None), member(a, "10.0.1.1:4000", None)]).unwrap());
        assert_eq!(base, again, "version and input order do not matter");
        let moved = of(&t(vec![member(a, "10.0.1.1:4001", None), member(b, "x:1", None)]));
        assert_eq!(moved.ids, base.ids);
        assert_ne!(moved.full, base.full);
        let zoned = of(&t(vec![member(a, "10.0.1.1:4000", Some("z")), member(b, "x:1", None)]));
        assert_ne!(zoned.full, base.full);
        let fewer = of(&t(vec![member(a, "10.0.1.1:4000", None)]));
        assert_ne!(fewer.ids, base.ids);
    }
}
