//! Versioned cluster topologies and their differences.

use std::cmp::Ordering;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Member, MemberId, ModelError};

/// The members of one cluster at one version, as published by one source (a provider).
///
/// Members are kept sorted by id and unique, so two topologies with the same members compare
/// equal and iterate in the same order on every node. The version is monotonic per source
/// *epoch*: a consumer applies a topology if its version is higher than the one it holds, or if
/// it comes from another epoch (the source restarted and lost its history, see [`Self::epoch`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterTopology {
    cluster_name: String,
    #[serde(default)]
    epoch: u64,
    version: u64,
    members: Vec<Arc<Member>>,
}

impl ClusterTopology {
    /// Builds a topology; members are sorted by id. Two members with one id is an error.
    /// Members are shared (`Arc`), so successive versions of a large topology share every
    /// unchanged member instead of copying it.
    pub fn new<M: Into<Arc<Member>>>(
        cluster_name: impl Into<String>,
        version: u64,
        members: impl IntoIterator<Item = M>,
    ) -> Result<Self, ModelError> {
        let mut members: Vec<Arc<Member>> = members.into_iter().map(Into::into).collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        if let Some(pair) = members.windows(2).find(|w| w[0].id == w[1].id) {
            return Err(ModelError::DuplicateMember(pair[0].id.clone()));
        }
        Ok(Self {
            cluster_name: cluster_name.into(),
            epoch: 0,
            version,
            members,
        })
    }

    /// The next version of this topology: `left` removed, `upserts` added or replaced (by id),
    /// in the same epoch. Unchanged members are shared with `self`; the cost is one copy of the
    /// member pointers, so a source that issues many small changes to a large cluster does not
    /// rebuild or re-sort it each time.
    pub fn patched(&self, version: u64, left: &[&MemberId], upserts: &[Arc<Member>]) -> Self {
        let mut next = self.clone();
        next.patch(version, left, upserts);
        next
    }

    /// [`Self::patched`] in place (no copy at all when the caller holds the only reference,
    /// through [`Arc::make_mut`]).
    pub fn patch(&mut self, version: u64, left: &[&MemberId], upserts: &[Arc<Member>]) {
        for id in left {
            if let Ok(i) = self.members.binary_search_by(|m| m.id.cmp(id)) {
                self.members.remove(i);
            }
        }
        for m in upserts {
            match self.members.binary_search_by(|x| x.id.cmp(&m.id)) {
                Ok(i) => self.members[i] = m.clone(),
                Err(i) => self.members.insert(i, m.clone()),
            }
        }
        self.version = version;
    }

    /// The same topology, issued under `epoch`.
    pub fn with_epoch(mut self, epoch: u64) -> Self {
        self.epoch = epoch;
        self
    }

    /// The topology before anything is known: version 0, no members.
    pub fn empty(cluster_name: impl Into<String>) -> Self {
        Self {
            cluster_name: cluster_name.into(),
            epoch: 0,
            version: 0,
            members: Vec::new(),
        }
    }

    /// The cluster this topology describes.
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// The source's version of this topology.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// The run of the source that issued this topology (0: a source without epochs, such as the
    /// in-memory provider). Versions are ordered only within one epoch: a source that restarts
    /// without its history (a registry process, on a host whose clock may be behind) starts a
    /// new epoch, and a consumer takes the new epoch's topology as a reset whatever its version.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a consumer holding `self` should apply `offered`: a newer version of the same
    /// epoch, or any version of another epoch (except that nothing replaces nothing: an empty
    /// version 0 does not replace the empty version 0 a consumer starts with).
    pub fn is_superseded_by(&self, offered: &ClusterTopology) -> bool {
        if offered.epoch != self.epoch {
            self.version != 0 || offered.version != 0
        } else {
            offered.version > self.version
        }
    }

    /// Members sorted by id.
    pub fn members(&self) -> &[Arc<Member>] {
        &self.members
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether there are no members.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// The member with `id`, if present.
    pub fn member(&self, id: &MemberId) -> Option<&Member> {
        self.members
            .binary_search_by(|m| m.id.cmp(id))
            .ok()
            .map(|i| &*self.members[i])
    }

    /// Whether a member with `id` is present.
    pub fn contains(&self, id: &MemberId) -> bool {
        self.member(id).is_some()
    }

    /// Members hosting `kind`, in id order.
    pub fn members_with_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Member> {
        self.members
            .iter()
            .map(|m| &**m)
            .filter(move |m| m.hosts(kind))
    }

    /// Member ids in order.
    pub fn member_ids(&self) -> impl Iterator<Item = &MemberId> {
        self.members.iter().map(|m| &m.id)
    }

    /// What changed from `self` to `newer` (which need not really be newer).
    pub fn diff(&self, newer: &ClusterTopology) -> TopologyDiff {
        let mut diff = TopologyDiff {
            from_version: self.version,
            to_version: newer.version,
            ..TopologyDiff::default()
        };
        let (mut old, mut new) = (
            self.members.iter().peekable(),
            newer.members.iter().peekable(),
        );
        loop {
            match (old.peek(), new.peek()) {
                (None, None) => break,
                (Some(_), None) => diff.left.extend(old.by_ref().map(|m| Member::clone(m))),
                (None, Some(_)) => diff.joined.extend(new.by_ref().map(|m| Member::clone(m))),
                // Successive versions share unchanged members: one pointer compare each.
                (Some(o), Some(n)) if Arc::ptr_eq(o, n) => {
                    old.next();
                    new.next();
                }
                (Some(o), Some(n)) => match o.id.cmp(&n.id) {
                    Ordering::Less => diff.left.push(Member::clone(old.next().expect("peeked"))),
                    Ordering::Greater => {
                        diff.joined.push(Member::clone(new.next().expect("peeked")))
                    }
                    Ordering::Equal => {
                        let (o, n) = (old.next().expect("peeked"), new.next().expect("peeked"));
                        if !Arc::ptr_eq(o, n) && o != n {
                            diff.changed.push(MemberChange {
                                before: Member::clone(o),
                                after: Member::clone(n),
                            });
                        }
                    }
                },
            }
        }
        diff
    }
}

/// A member whose description (address, kinds, zone or metadata) changed between versions.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberChange {
    /// The description before.
    pub before: Member,
    /// The description after.
    pub after: Member,
}

/// The difference between two topologies; every list is sorted by member id.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopologyDiff {
    /// Version of the older topology.
    pub from_version: u64,
    /// Version of the newer topology.
    pub to_version: u64,
    /// Members present only in the newer topology.
    pub joined: Vec<Member>,
    /// Members present only in the older topology.
    pub left: Vec<Member>,
    /// Members present in both with a different description.
    pub changed: Vec<MemberChange>,
}

impl TopologyDiff {
    /// Whether membership and every description are unchanged.
    pub fn is_empty(&self) -> bool {
        self.joined.is_empty() && self.left.is_empty() && self.changed.is_empty()
    }

    /// Applies this diff to `base` (the older topology's members), giving the newer members in
    /// id order. Lets a consumer that receives only deltas rebuild the full member list.
    pub fn apply(&self, base: &[Arc<Member>]) -> Vec<Member> {
        let mut out: std::collections::BTreeMap<&MemberId, &Member> =
            base.iter().map(|m| (&m.id, &**m)).collect();
        for m in &self.left {
            out.remove(&m.id);
        }
        for c in &self.changed {
            out.insert(&c.after.id, &c.after);
        }
        for m in &self.joined {
            out.insert(&m.id, m);
        }
        out.into_values().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(id: &str, addr: &str, kinds: &[&str]) -> Member {
        Member::new(MemberId::parse(id).unwrap(), addr, kinds.iter().copied())
    }

    #[test]
    fn a_patched_topology_equals_one_built_from_scratch() {
        let old = ClusterTopology::new(
            "c",
            1,
            [m("a", "x:1", &[]), m("c", "x:3", &[]), m("e", "x:5", &[])],
        )
        .unwrap()
        .with_epoch(9);
        let moved = Arc::new(m("c", "y:3", &["k"]));
        let new = old.patched(
            2,
            &[
                &MemberId::parse("a").unwrap(),
                &MemberId::parse("zz").unwrap(),
            ],
            &[
                Arc::new(m("b", "x:2", &[])),
                moved.clone(),
                Arc::new(m("f", "x:6", &[])),
            ],
        );
        let want = ClusterTopology::new(
            "c",
            2,
            [
                m("b", "x:2", &[]),
                Member::clone(&moved),
                m("e", "x:5", &[]),
                m("f", "x:6", &[]),
            ],
        )
        .unwrap()
        .with_epoch(9);
        assert_eq!(new, want);
        assert!(
            Arc::ptr_eq(&new.members()[2], &old.members()[2]),
            "unchanged members are shared"
        );
    }

    #[test]
    fn members_are_sorted_and_unique() {
        let t = ClusterTopology::new("c", 1, [m("b", "x:1", &[]), m("a", "x:2", &[])]).unwrap();
        let ids: Vec<_> = t.member_ids().map(|i| i.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        let err = ClusterTopology::new("c", 1, [m("a", "x:1", &[]), m("a", "x:2", &[])]);
        assert!(matches!(err, Err(ModelError::DuplicateMember(_))));
    }

    #[test]
    fn diff_reports_joined_left_changed() {
        let old = ClusterTopology::new(
            "c",
            3,
            [
                m("a", "x:1", &["k"]),
                m("b", "x:2", &["k"]),
                m("c", "x:3", &["k"]),
            ],
        )
        .unwrap();
        let new = ClusterTopology::new(
            "c",
            4,
            [
                m("a", "x:1", &["k"]),
                m("c", "x:3", &["k", "j"]),
                m("d", "x:4", &["k"]),
            ],
        )
        .unwrap();
        let d = old.diff(&new);
        assert_eq!((d.from_version, d.to_version), (3, 4));
        assert_eq!(
            d.joined.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["d"]
        );
        assert_eq!(
            d.left.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
            ["b"]
        );
        assert_eq!(d.changed.len(), 1);
        assert_eq!(d.changed[0].after.kinds.len(), 2);
        let expected: Vec<Member> = new.members().iter().map(|m| Member::clone(m)).collect();
        assert_eq!(d.apply(old.members()), expected);
        assert!(new.diff(&new).is_empty());
    }
}
