//! The etcd provider's decisions, pure: the key schema of a member, and a node's view of the
//! members as of one etcd revision.
//!
//! A member is the key `<prefix>/<cluster>/members/<member id>`, bound to the member's lease,
//! holding its description as JSON (`address`, `kinds`, `zone`, `metadata`). Etcd removes the
//! key when the lease expires, on etcd's own clock: no member judges another's liveness.
//!
//! [`EtcdView`] holds the members as of a revision and issues topologies whose version *is*
//! that revision (and whose epoch is the etcd cluster id): every node that has seen revision
//! `r` holds the same members under version `r`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::api::{Change, KeyValue, Range, Revision, WatchBatch};
use crate::cluster::{ClusterTopology, Description, Member, MemberId, MemberLimits};

/// The key prefix of a cluster's members.
pub fn members_prefix(prefix: &str, cluster: &str) -> String {
    format!("{}/{cluster}/members/", prefix.trim_end_matches('/'))
}

/// What a member's key holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberRecord {
    /// `host:port` of the member.
    pub address: String,
    /// The kinds it hosts.
    #[serde(default)]
    pub kinds: BTreeSet<String>,
    /// Its zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// Its labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub metadata: BTreeMap<String, String>,
}

/// The value a member writes under its key.
pub fn encode_member(member: &Member) -> Vec<u8> {
    serde_json::to_vec(&MemberRecord {
        address: member.address.clone(),
        kinds: member.kinds.clone(),
        zone: member.zone.clone(),
        metadata: member.metadata.clone(),
    })
    .unwrap_or_default()
}

/// The member a key under `prefix` describes, or why it describes none.
pub fn decode_member(prefix: &str, kv: &KeyValue) -> Result<Member, String> {
    let id = kv
        .key
        .strip_prefix(prefix)
        .ok_or_else(|| format!("key {:?} is not under {prefix:?}", kv.key))?;
    let id = MemberId::parse(id).map_err(|e| format!("key {:?}: {e}", kv.key))?;
    if kv.lease == 0 {
        return Err(format!(
            "key {:?} is bound to no lease: it would never expire",
            kv.key
        ));
    }
    let record: MemberRecord =
        serde_json::from_slice(&kv.value).map_err(|e| format!("key {:?}: {e}", kv.key))?;
    let member = Member::new(id, record.address, Vec::<String>::new()).described(Description {
        kinds: record.kinds,
        zone: record.zone,
        metadata: record.metadata,
    });
    member
        .validate(&MemberLimits::default())
        .map_err(|e| format!("key {:?}: {e}", kv.key))?;
    Ok(member)
}

/// A node's view of the members, as of one etcd revision.
#[derive(Clone, Debug, Default)]
pub struct EtcdView {
    prefix: String,
    /// By key: the member (decoded once, shared by every topology issued while it stays), or
    /// why the key describes none.
    keys: BTreeMap<String, Result<Arc<Member>, String>>,
    /// Keys of valid members by their address (a new incarnation finds its ghosts in O(log n)).
    by_address: BTreeMap<String, BTreeSet<String>>,
    /// How many keys describe no valid member.
    invalid: usize,
    /// The revision the view reflects.
    revision: Revision,
    cluster_id: u64,
    /// The epoch of the topologies issued: the cluster id, changed (see [`Self::relist`])
    /// each time a list shows the same cluster's revision went back.
    epoch: u64,
    synced: bool,
    /// An audit found the view differs from the store at its revision: the next list is of a
    /// store that went back (a new epoch), whatever its revision.
    diverged: bool,
    /// The key of the latest write the view holds, with that write's revision (`None` once a
    /// later delete removed it): what a strong audit asks the store about.
    last_put: Option<(String, Revision)>,
    /// The key the view's latest change deleted, when that change is a delete (`None` once a
    /// write followed): the store must not hold it at the view's revision. (A restore brings
    /// back keys deleted since the snapshot; a view whose writes all predate the snapshot
    /// tells the histories apart only by its deletions.)
    last_delete: Option<(String, Revision)>,
}

/// The epoch after a list showed cluster `cluster_id`'s revision back at `now` from `before`
/// (a restore from a snapshot keeps the cluster id): a fixed mix of the previous epoch and both
/// revisions (SplitMix64's finaliser), so that topologies of the restored store, whose
/// versions start below the ones already issued, are not refused as stale. The same
/// observations give the same epoch.
pub fn epoch_after_going_back(previous: u64, before: Revision, now: Revision) -> u64 {
    let mut z = previous
        ^ (before as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (now as u64).rotate_left(32);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl EtcdView {
    /// An empty, unsynced view of the keys under `prefix`.
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
            ..Self::default()
        }
    }

    /// Whether a list has been applied.
    pub fn is_synced(&self) -> bool {
        self.synced
    }

    /// The revision the view reflects.
    pub fn revision(&self) -> Revision {
        self.revision
    }

    /// The key of the latest write the view holds and that write's revision.
    pub fn last_put(&self) -> Option<(&str, Revision)> {
        self.last_put.as_ref().map(|(k, r)| (k.as_str(), *r))
    }

    /// The key the view's latest change deleted (if that change was a delete) and the
    /// deletion's revision.
    pub fn last_delete(&self) -> Option<(&str, Revision)> {
        self.last_delete.as_ref().map(|(k, r)| (k.as_str(), *r))
    }

    /// The epoch of the topologies it issues (0 before its first list).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The etcd cluster id of its last list.
    pub fn cluster_id(&self) -> u64 {
        self.cluster_id
    }

    /// How many keys under the prefix the view holds (members and keys that describe none).
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Whether `batch` comes from another store than the one listed (another cluster id, or
    /// a store whose revision went back: it lost its data): the view must be listed again.
    pub fn is_foreign(&self, batch: &WatchBatch) -> bool {
        let went_back = if crate::runtime::sim::flaw("etcd-progress-relists") {
            batch.header_revision <= self.revision
        } else {
            batch.header_revision < self.revision
        };
        self.synced && (batch.cluster_id != self.cluster_id || went_back)
    }

    /// The store no longer holds what the view says it held at the view's revision (an
    /// audit): the store went back and its later writes reused revisions the view had seen.
    /// The next [`Self::relist`] gives the view a new epoch, so that no version is issued
    /// twice with different members.
    pub fn diverged(&mut self) {
        self.diverged = true;
    }

    /// Replaces the view with a fresh read (after a start, a compaction, or an etcd that lost
    /// its data); whether the members or the epoch changed.
    pub fn relist(&mut self, range: &Range) -> bool {
        let before = self.members();
        self.keys.clear();
        self.by_address.clear();
        self.invalid = 0;
        for kv in &range.kvs {
            let decoded = decode_member(&self.prefix, kv).map(Arc::new);
            self.insert(kv.key.clone(), decoded);
        }
        self.last_put = range
            .kvs
            .iter()
            .max_by_key(|kv| kv.mod_revision)
            .map(|kv| (kv.key.clone(), kv.mod_revision));
        self.last_delete = None;
        let moved = !self.synced || range.cluster_id != self.cluster_id;
        // The same cluster at a lower revision, or at the same revision with other members (a
        // store's state at one revision never changes): it went back, and writes since reused
        // revisions the view had seen.
        let members = self.members();
        // (Taken whatever the list shows: a mark left by an audit of a store that then turned
        // out to be another cluster must not make a later list of it look restored.)
        let diverged = std::mem::take(&mut self.diverged);
        let went_back = !moved
            && (diverged
                || range.revision < self.revision
                || (range.revision == self.revision && before != members));
        self.epoch = if moved {
            range.cluster_id
        } else if went_back {
            epoch_after_going_back(self.epoch, self.revision, range.revision)
        } else {
            self.epoch
        };
        self.revision = range.revision;
        self.cluster_id = range.cluster_id;
        self.synced = true;
        moved || went_back || before != members
    }

    /// Applies one watch batch; whether the members changed. Changes at or below the view's
    /// revision are ones it already holds (a watch resumed from an earlier revision) and are
    /// skipped. A progress notification (a batch without changes) says every change up to its
    /// revision was delivered: the view moves on to it, so a watch reopened later resumes
    /// from there instead of from the last change of the prefix (long compacted away in a
    /// quiet cluster on a busy etcd, which would mean a relist).
    pub fn apply(&mut self, batch: &WatchBatch) -> bool {
        if batch.changes.is_empty() {
            self.revision = self.revision.max(batch.header_revision);
            return false;
        }
        let mut changed = false;
        for c in &batch.changes {
            if c.revision() <= self.revision {
                continue;
            }
            self.revision = c.revision();
            match c {
                Change::Put(kv) => {
                    self.last_put = Some((kv.key.clone(), kv.mod_revision));
                    self.last_delete = None;
                    let decoded = decode_member(&self.prefix, kv).map(Arc::new);
                    if self.keys.get(&kv.key) != Some(&decoded) {
                        changed = true;
                        self.remove(&kv.key);
                        self.insert(kv.key.clone(), decoded);
                    }
                }
                Change::Delete { key, revision } => {
                    if self.last_put.as_ref().is_some_and(|(k, _)| k == key) {
                        self.last_put = None;
                    }
                    self.last_delete = Some((key.clone(), *revision));
                    if !crate::runtime::sim::flaw("etcd-delete-ignored") {
                        changed |= self.remove(key);
                    }
                }
            }
        }
        changed
    }

    fn insert(&mut self, key: String, entry: Result<Arc<Member>, String>) {
        match &entry {
            Ok(m) => {
                self.by_address
                    .entry(m.address.clone())
                    .or_default()
                    .insert(key.clone());
            }
            Err(_) => self.invalid += 1,
        }
        self.keys.insert(key, entry);
    }

    /// Removes `key`; whether it was there.
    fn remove(&mut self, key: &str) -> bool {
        match self.keys.remove(key) {
            Some(Ok(m)) => {
                if let Some(keys) = self.by_address.get_mut(&m.address) {
                    keys.remove(key);
                    if keys.is_empty() {
                        self.by_address.remove(&m.address);
                    }
                }
                true
            }
            Some(Err(_)) => {
                self.invalid -= 1;
                true
            }
            None => false,
        }
    }

    /// The valid members at `address`.
    pub fn members_at(&self, address: &str) -> Vec<Arc<Member>> {
        self.by_address
            .get(address)
            .into_iter()
            .flatten()
            .filter_map(|k| self.keys.get(k)?.as_ref().ok().cloned())
            .collect()
    }

    /// The valid members, by id (shared, not copied).
    pub fn members(&self) -> Vec<Arc<Member>> {
        let mut members: Vec<Arc<Member>> = self
            .keys
            .values()
            .filter_map(|m| m.as_ref().ok().cloned())
            .collect();
        members.sort_by(|a, b| a.id.cmp(&b.id));
        members
    }

    /// Keys that describe no valid member, with why.
    pub fn skipped(&self) -> Vec<(String, String)> {
        if self.invalid == 0 {
            return Vec::new();
        }
        self.keys
            .iter()
            .filter_map(|(k, m)| m.as_ref().err().map(|e| (k.clone(), e.clone())))
            .collect()
    }

    /// The topology of `cluster` this view stands for: version = its revision, epoch = the
    /// etcd cluster id (another one after a list showed the revision went back, as after a
    /// restore with the same cluster id: the versions start over below the ones issued).
    pub fn topology(&self, cluster: &str) -> Result<ClusterTopology, crate::cluster::ModelError> {
        Ok(ClusterTopology::new(
            cluster.to_string(),
            u64::try_from(self.revision).unwrap_or(0),
            self.members(),
        )?
        .with_epoch(self.epoch))
    }

    /// Whether the view holds `key`.
    pub fn holds(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// The member `key` describes, if the view holds it and it describes a valid one.
    pub fn member_at(&self, key: &str) -> Option<&Arc<Member>> {
        self.keys.get(key).and_then(|m| m.as_ref().ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/shoal/c/members/";

    fn kv(id: &str, rev: Revision, address: &str) -> KeyValue {
        let m = Member::new(MemberId::parse(id).unwrap(), address, ["user"]);
        KeyValue {
            key: format!("{P}{id}"),
            value: encode_member(&m),
            create_revision: rev,
            mod_revision: rev,
            lease: 7,
        }
    }

    #[test]
    fn an_audit_mark_is_spent_by_a_list_of_another_cluster() {
        let mut v = EtcdView::new(P);
        v.relist(&Range {
            kvs: vec![kv("m1", 4, "h:1")],
            revision: 9,
            cluster_id: 1,
        });
        // An audit found the store went back: it was a new cluster (data loss).
        v.diverged();
        v.relist(&Range {
            kvs: vec![kv("m1", 2, "h:1")],
            revision: 2,
            cluster_id: 2,
        });
        assert_eq!(v.epoch(), 2, "another cluster: its id is the epoch");
        // A later list of the same cluster (after a compaction) keeps that epoch.
        v.relist(&Range {
            kvs: vec![kv("m1", 2, "h:1")],
            revision: 5,
            cluster_id: 2,
        });
        assert_eq!(v.epoch(), 2, "the audit's mark was spent by the first list");
    }

    #[test]
    fn the_latest_write_held_is_what_a_strong_audit_asks_about() {
        let mut v = EtcdView::new(P);
        v.relist(&Range {
            kvs: vec![kv("m1", 4, "h:1"), kv("m2", 2, "h:2")],
            revision: 6,
            cluster_id: 9,
        });
        assert_eq!(v.last_put(), Some((format!("{P}m1").as_str(), 4)));
        v.apply(&WatchBatch {
            changes: vec![Change::Put(kv("m3", 7, "h:3"))],
            header_revision: 7,
            cluster_id: 9,
        });
        assert_eq!(v.last_put(), Some((format!("{P}m3").as_str(), 7)));
        // A delete of another key keeps it; of that key, forgets it (nothing to ask about).
        for (key, revision, left) in [("m1", 8, true), ("m3", 9, false)] {
            v.apply(&WatchBatch {
                changes: vec![Change::Delete {
                    key: format!("{P}{key}"),
                    revision,
                }],
                header_revision: revision,
                cluster_id: 9,
            });
            assert_eq!(v.last_put().is_some(), left, "after deleting {key}");
            assert_eq!(
                v.last_delete(),
                Some((format!("{P}{key}").as_str(), revision)),
                "the latest change, a delete"
            );
        }
        // A write after it: the latest change is no longer a delete.
        v.apply(&WatchBatch {
            changes: vec![Change::Put(kv("m4", 10, "h:4"))],
            header_revision: 10,
            cluster_id: 9,
        });
        assert_eq!(v.last_delete(), None);
        assert_eq!(v.last_put(), Some((format!("{P}m4").as_str(), 10)));
        // A list knows no deletes.
        v.apply(&WatchBatch {
            changes: vec![Change::Delete {
                key: format!("{P}m2"),
                revision: 11,
            }],
            header_revision: 11,
            cluster_id: 9,
        });
        assert!(v.last_delete().is_some());
        v.relist(&Range {
            kvs: vec![kv("m4", 10, "h:4")],
            revision: 11,
            cluster_id: 9,
        });
        assert_eq!(v.last_delete(), None);
    }

    #[test]
    fn nodes_that_saw_the_same_revision_hold_the_same_topology() {
        // Node a lists at revision 5; node b listed at 3 and watched the rest.
        let a_kvs = vec![kv("m1", 2, "h:1"), kv("m2", 5, "h:2")];
        let mut a = EtcdView::new(P);
        a.relist(&Range {
            kvs: a_kvs,
            revision: 5,
            cluster_id: 9,
        });
        let mut b = EtcdView::new(P);
        b.relist(&Range {
            kvs: vec![kv("m1", 2, "h:1"), kv("m3", 3, "h:3")],
            revision: 3,
            cluster_id: 9,
        });
        assert!(b.apply(&WatchBatch {
            changes: vec![
                Change::Delete {
                    key: format!("{P}m3"),
                    revision: 4
                },
                Change::Put(kv("m2", 5, "h:2")),
            ],
            header_revision: 5,
            cluster_id: 9,
        }));
        assert_eq!(a.topology("c").unwrap(), b.topology("c").unwrap());
        assert_eq!(a.topology("c").unwrap().version(), 5);
        assert_eq!(a.topology("c").unwrap().epoch(), 9);
    }

    #[test]
    fn a_resumed_watch_does_not_apply_what_the_view_already_holds() {
        let mut v = EtcdView::new(P);
        v.relist(&Range {
            kvs: vec![kv("m1", 4, "h:1")],
            revision: 6,
            cluster_id: 1,
        });
        // A delete at 5 the list already reflects (m2 is not listed) and a put at 4.
        assert!(!v.apply(&WatchBatch {
            changes: vec![
                Change::Put(kv("m1", 4, "h:old")),
                Change::Delete {
                    key: format!("{P}m2"),
                    revision: 5
                }
            ],
            header_revision: 6,
            cluster_id: 1,
        }));
        assert_eq!(v.members()[0].address, "h:1");
        assert_eq!(v.revision(), 6);
    }

    #[test]
    fn keys_that_describe_no_member_are_skipped_and_never_hide_valid_ones() {
        let mut bad_json = kv("m2", 3, "h:2");
        bad_json.value = b"{not json".to_vec();
        let mut no_lease = kv("m3", 3, "h:3");
        no_lease.lease = 0;
        let mut bad_address = kv("m4", 3, "h:4");
        bad_address.value = br#"{"address":"no-port"}"#.to_vec();
        let mut v = EtcdView::new(P);
        v.relist(&Range {
            kvs: vec![kv("m1", 2, "h:1"), bad_json, no_lease, bad_address],
            revision: 3,
            cluster_id: 1,
        });
        let ids: Vec<String> = v.members().iter().map(|m| m.id.to_string()).collect();
        assert_eq!(ids, vec!["m1"]);
        assert_eq!(v.skipped().len(), 3, "{:?}", v.skipped());
    }

    #[test]
    fn an_etcd_that_lost_its_data_is_a_new_epoch_even_at_a_lower_revision() {
        let mut v = EtcdView::new(P);
        v.relist(&Range {
            kvs: vec![kv("m1", 2, "h:1")],
            revision: 90,
            cluster_id: 1,
        });
        let old = v.topology("c").unwrap();
        assert!(v.relist(&Range {
            kvs: vec![kv("m1", 2, "h:1")],
            revision: 3,
            cluster_id: 2,
        }));
        assert!(old.is_superseded_by(&v.topology("c").unwrap()));
    }

    #[test]
    fn a_store_restored_with_the_same_cluster_id_is_a_new_epoch_the_same_for_the_same_history() {
        let listed = |revision| Range {
            kvs: vec![kv("m1", 2, "h:1")],
            revision,
            cluster_id: 1,
        };
        let mut v = EtcdView::new(P);
        v.relist(&listed(90));
        let old = v.topology("c").unwrap();
        // A later list of the same store: the same epoch, nothing to publish.
        assert!(!v.relist(&listed(95)));
        assert_eq!(v.topology("c").unwrap().epoch(), old.epoch());
        // The same cluster id at a lower revision: restored. A new epoch, so the topology of
        // the restored store supersedes the ones issued before it.
        assert!(v.relist(&listed(40)));
        let restored = v.topology("c").unwrap();
        assert_ne!(restored.epoch(), old.epoch());
        assert!(old.is_superseded_by(&restored));
        // At the same revision with other members: it went back too (writes since the restore
        // reused the revisions).
        let mut other = listed(40);
        other.kvs = vec![kv("m2", 2, "h:2")];
        assert!(v.relist(&other));
        let again = v.topology("c").unwrap();
        assert_ne!(again.epoch(), restored.epoch());
        assert!(restored.is_superseded_by(&again));
        // Another view that saw the same thing issues the same epoch.
        let mut w = EtcdView::new(P);
        w.relist(&listed(95));
        w.relist(&listed(40));
        assert_eq!(w.topology("c").unwrap().epoch(), restored.epoch());
    }
}
