//! Fingerprints of topologies, computed by the harness's own code, so checkers compare two
//! views of a thousand members in O(1) instead of member by member, and memoize per distinct
//! topology what only depends on its members (fresh owners, placement checks).
//!
//! A fingerprint is a deterministic 64-bit hash (FxHash, no random keys: the same on every run)
//! over every field of every member: a sum of per-member hashes, so a node's view can be
//! followed change by change ([`ViewPrint`]). Two topologies with equal fingerprints are treated as
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

fn hash_description(
    h: &mut FxHasher,
    kinds: &std::collections::BTreeSet<String>,
    zone: &Option<String>,
    metadata: &BTreeMap<String, String>,
) {
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

/// The fingerprint of `members` (in any order: it is a sum over members).
pub fn members<'a>(members: impl Iterator<Item = &'a Member>) -> Fingerprint {
    let mut p = Print::default();
    for m in members {
        p.add(m);
    }
    p.finish()
}

/// One member's two hashes: of its id, and of every field.
fn member_hashes(m: &Member) -> (u64, u64) {
    let (mut ids, mut full) = (FxHasher::default(), FxHasher::default());
    m.id.as_str().hash(&mut ids);
    m.id.as_str().hash(&mut full);
    m.address.hash(&mut full);
    hash_description(&mut full, &m.kinds, &m.zone, &m.metadata);
    (
        shoal::placement::hash::fmix64(ids.finish()),
        shoal::placement::hash::fmix64(full.finish()),
    )
}

/// A fingerprint being accumulated: sums (wrapping) of per-member hashes, so a member can be
/// added or taken out in O(its size): a node's view is followed change by change instead of
/// rehashed whole.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Print {
    ids: u64,
    full: u64,
    count: u64,
}

impl Print {
    /// Adds `m`.
    pub fn add(&mut self, m: &Member) {
        let (i, f) = member_hashes(m);
        self.ids = self.ids.wrapping_add(i);
        self.full = self.full.wrapping_add(f);
        self.count += 1;
    }

    /// Takes `m` out (it must have been added).
    pub fn remove(&mut self, m: &Member) {
        let (i, f) = member_hashes(m);
        self.ids = self.ids.wrapping_sub(i);
        self.full = self.full.wrapping_sub(f);
        self.count = self.count.wrapping_sub(1);
    }

    /// The fingerprint.
    pub fn finish(&self) -> Fingerprint {
        use shoal::placement::hash::fmix64;
        Fingerprint {
            ids: fmix64(self.ids ^ fmix64(self.count)),
            full: fmix64(self.full ^ fmix64(self.count).rotate_left(17)),
        }
    }
}

/// A node's view, followed change by change: its last applied topology and the accumulated
/// print. Each change costs O(what changed) instead of a rehash of every member; one change in
/// 16 (in a view of more than 64 members, one in a quarter of its size, so the check costs O(1)
/// a change amortized: at 1,000 members the rehash in 16 was 6% of a run's host time) is also
/// rehashed in full and compared, so the incremental path is checked too.
#[derive(Debug, Default)]
pub struct ViewPrint {
    held: Option<(Arc<ClusterTopology>, Print)>,
    applied: u64,
}

impl ViewPrint {
    /// A cell shared by a node's subscriber and the checkers.
    pub fn shared() -> Arc<std::sync::Mutex<ViewPrint>> {
        Arc::default()
    }

    /// The node applied `t`, which `diff` says differs so from the view held (`None`: not
    /// known, after a lag); its fingerprint, and whether the incremental one disagreed with
    /// a full rehash (a wrong diff).
    pub fn advance(
        &mut self,
        t: &Arc<ClusterTopology>,
        diff: Option<&shoal::TopologyDiff>,
    ) -> (Fingerprint, bool) {
        if let Some((held, p)) = &self.held
            && Arc::ptr_eq(held, t)
        {
            return (p.finish(), false); // Seen already (read whole after a lag).
        }
        self.applied += 1;
        let incremental = match (&self.held, diff) {
            // Versions name one topology only within an epoch: across a change of epoch (a
            // backend that lost its data numbers from 1 again), rehash.
            (Some((held, p)), Some(d))
                if held.version() == d.from_version && held.epoch() == t.epoch() =>
            {
                let mut p = *p;
                for m in &d.left {
                    p.remove(m);
                }
                for c in &d.changed {
                    p.remove(&c.before);
                    p.add(&c.after);
                }
                for m in &d.joined {
                    p.add(m);
                }
                Some(p)
            }
            _ => None,
        };
        let mut wrong = false;
        let print = match incremental {
            Some(p) if !self.applied.is_multiple_of((t.len() as u64 / 4).max(16)) => p,
            other => {
                let mut full = Print::default();
                for m in t.members() {
                    full.add(m);
                }
                wrong = other.is_some_and(|p| p != full);
                full
            }
        };
        self.held = Some((t.clone(), print));
        (print.finish(), wrong)
    }

    /// `t`'s fingerprint: O(1) when it is the view last applied, a rehash otherwise.
    pub fn of(&self, t: &Arc<ClusterTopology>) -> Fingerprint {
        match &self.held {
            Some((held, p)) if Arc::ptr_eq(held, t) => p.finish(),
            _ => of(t),
        }
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
        let base = of(&t(vec![
            member(a, "10.0.1.1:4000", None),
            member(b, "x:1", None),
        ]));
        let again = of(&ClusterTopology::new(
            "c",
            9,
            vec![member(b, "x:1", None), member(a, "10.0.1.1:4000", None)],
        )
        .unwrap());
        assert_eq!(base, again, "version and input order do not matter");
        let moved = of(&t(vec![
            member(a, "10.0.1.1:4001", None),
            member(b, "x:1", None),
        ]));
        assert_eq!(moved.ids, base.ids);
        assert_ne!(moved.full, base.full);
        let zoned = of(&t(vec![
            member(a, "10.0.1.1:4000", Some("z")),
            member(b, "x:1", None),
        ]));
        assert_ne!(zoned.full, base.full);
        let fewer = of(&t(vec![member(a, "10.0.1.1:4000", None)]));
        assert_ne!(fewer.ids, base.ids);
    }
}
