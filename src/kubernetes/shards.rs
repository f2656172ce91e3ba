//! Liveness apart from membership ([`Heartbeats::Sharded`]): each member keeps a *record*
//! Lease that everyone watches and that changes only when the member joins, leaves or changes
//! its description, and a *heartbeat* Lease, renewed every renew interval, that only the few
//! members monitoring its shard watch. Pure functions (names, shards, who monitors what): the
//! provider drives them.
//!
//! A member's shard is `key_hash("shoal.io/shard", id) mod S` (the placement's FNV-1a, see
//! [`crate::placement::hash`]); the monitors of shard `s` are the `k` members with the highest
//! rendezvous weight `weight(key_hash("shoal.io/monitor", s), member_hash(id))`, so every
//! member computes the same monitors from the same records, and a member's arrival or
//! departure moves only the shards it ranks in.

use std::collections::{BTreeMap, BTreeSet};

use super::api::{LabelSelector, Lease, ObjectMeta, ObjectReference};
use crate::cluster::MemberId;
use crate::placement::hash::{key_hash, member_hash, weight};

/// How members learn that a member is alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heartbeats {
    /// One Lease per member, renewed, watched by every member: every renewal is a watch event
    /// to every member (N²/r events a second). Simple; fine to a few hundred members.
    Everyone,
    /// A record Lease per member watched by everyone, and a heartbeat Lease per member watched
    /// by the `monitors` members that monitor its shard (of `shards`): k·N/r events a second.
    /// Members with this setting share a cluster with [`Heartbeats::Everyone`] members while
    /// it migrates (either way); all members with sharded heartbeats must use the same
    /// `shards` and `monitors`.
    Sharded {
        /// Shards the heartbeats are spread over (labelled, so a monitor watches one shard).
        shards: u32,
        /// Members monitoring each shard.
        monitors: u32,
    },
}

impl Heartbeats {
    /// The default sharding: 32 shards, 3 monitors each.
    pub const SHARDED: Heartbeats = Heartbeats::Sharded {
        shards: 32,
        monitors: 3,
    };

    /// The most shards (each is a label value and, on a monitor, a watch).
    pub const MAX_SHARDS: u32 = 4096;
    /// The most monitors per shard.
    pub const MAX_MONITORS: u32 = 16;

    /// Checks the setting; the error names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        match *self {
            Heartbeats::Everyone => Ok(()),
            Heartbeats::Sharded { shards, monitors } => {
                if !(1..=Self::MAX_SHARDS).contains(&shards) {
                    return Err(format!(
                        "heartbeat shards must be 1 to {} (got {shards})",
                        Self::MAX_SHARDS
                    ));
                }
                if !(1..=Self::MAX_MONITORS).contains(&monitors) {
                    return Err(format!(
                        "heartbeat monitors must be 1 to {} (got {monitors})",
                        Self::MAX_MONITORS
                    ));
                }
                Ok(())
            }
        }
    }
}

/// Label naming the cluster a heartbeat Lease belongs to (not [`super::members::CLUSTER_LABEL`]:
/// the members' watch of records must not carry heartbeats).
pub const HEARTBEAT_LABEL: &str = "shoal.io/heartbeat-of";
/// Label carrying a heartbeat's shard.
pub const SHARD_LABEL: &str = "shoal.io/shard";

const HEARTBEAT_SUFFIX: &str = "-hb";

/// Annotation marking the record of a member with sharded heartbeats (its value: the
/// setting, `shards/monitors`). A record without it is a member's only Lease, renewed by its
/// member ([`Heartbeats::Everyone`]): both kinds can share a cluster while it migrates from one
/// setting to the other (docs/providers/kubernetes.md, "Migrating").
pub const HEARTBEATS_ANNOTATION: &str = "shoal.io/heartbeats";

/// A marked record's Lease duration, in Lease durations. Members that renew their own Lease
/// ([`Heartbeats::Everyone`], of any version) age every Lease they watch with the duration it
/// states, so while a cluster migrates they leave a record alone for this long after each
/// change they see; a member with sharded heartbeats touches its record every third of it
/// while such members are listed, and not at all otherwise.
pub const RECORD_DURATION_FACTOR: u32 = 10;

/// The value of [`HEARTBEATS_ANNOTATION`] for `shards` shards of `monitors` monitors.
pub fn heartbeats_mark(shards: u32, monitors: u32) -> String {
    format!("{shards}/{monitors}")
}

/// Whether `record` is the record of a member with sharded heartbeats (marked), not a Lease
/// its member renews.
pub fn is_marked(record: &Lease) -> bool {
    record.meta.annotations.contains_key(HEARTBEATS_ANNOTATION)
}

/// The heartbeat Lease name of the member whose record is `record_name`.
pub fn heartbeat_name(record_name: &str) -> String {
    format!("{record_name}{HEARTBEAT_SUFFIX}")
}

/// The record Lease name of heartbeat `heartbeat_name`.
pub fn record_name(heartbeat_name: &str) -> &str {
    heartbeat_name
        .strip_suffix(HEARTBEAT_SUFFIX)
        .unwrap_or(heartbeat_name)
}

/// The shard of member `id`.
pub fn shard_of(id: &MemberId, shards: u32) -> u32 {
    (key_hash("shoal.io/shard", id.as_str()) % u64::from(shards.max(1))) as u32
}

/// The selector of one shard's heartbeats.
pub fn shard_selector(cluster: &str, shard: u32) -> LabelSelector {
    [
        (HEARTBEAT_LABEL.to_string(), cluster.to_string()),
        (SHARD_LABEL.to_string(), shard.to_string()),
    ]
    .into()
}

/// The heartbeat Lease of member `id` (holder identity = id), renewed at `now_micros`.
pub fn heartbeat_lease(
    cluster: &str,
    namespace: &str,
    id: &MemberId,
    shards: u32,
    duration_secs: i32,
    now_micros: i64,
    pod: Option<ObjectReference>,
) -> Lease {
    Lease {
        meta: ObjectMeta {
            name: heartbeat_name(&super::members::lease_name(cluster, id)),
            namespace: namespace.to_string(),
            labels: [
                (HEARTBEAT_LABEL.to_string(), cluster.to_string()),
                (SHARD_LABEL.to_string(), shard_of(id, shards).to_string()),
            ]
            .into(),
            owner: pod,
            ..ObjectMeta::default()
        },
        holder_identity: Some(id.to_string()),
        lease_duration_seconds: Some(duration_secs),
        acquire_time_micros: Some(now_micros),
        renew_time_micros: Some(now_micros),
        lease_transitions: Some(0),
    }
}

/// A member's zone, as the topology gives it (`None`: no zone; members without one count as one
/// zone of their own).
type Zone = Option<String>;

/// Who monitors which shard, kept up to date as members come and go: a member's arrival costs
/// O(shards × monitors), a departure the same plus, for each shard it was among the best of its
/// zone in, a pass over the members of its zone, so a large cluster's churn does not cost
/// O(shards × members) on every member at every change.
///
/// The monitors of a shard are spread over zones: ranked by rendezvous weight, the best member
/// of each zone first (the k zones whose best members weigh the most), then, if there are
/// fewer zones than k, the next members by weight whatever their zone. So a zone outage takes
/// at most one monitor of a shard while there are k zones, and without zones (every member in
/// none) the monitors are simply the k highest weights.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Monitors {
    k: usize,
    /// Each shard's rendezvous key.
    keys: Vec<u64>,
    /// The members, with their hash and zone.
    members: BTreeMap<MemberId, (u64, Zone)>,
    /// The members of each zone.
    zones: BTreeMap<Zone, BTreeSet<MemberId>>,
    /// For each shard and zone, the zone's k best members with their weights, highest first
    /// (ties: higher id): all a shard's choice can need.
    best: Vec<BTreeMap<Zone, Vec<(u64, MemberId)>>>,
    /// For each shard, its monitors with their weights, highest first (ties: higher id).
    top: Vec<Vec<(u64, MemberId)>>,
}

impl Monitors {
    /// No members yet; `shards` shards of `monitors` monitors each.
    pub fn new(shards: u32, monitors: u32) -> Self {
        Self {
            k: monitors.max(1) as usize,
            keys: (0..shards)
                .map(|s| key_hash("shoal.io/monitor", &s.to_string()))
                .collect(),
            members: BTreeMap::new(),
            zones: BTreeMap::new(),
            best: vec![BTreeMap::new(); shards as usize],
            top: vec![Vec::new(); shards as usize],
        }
    }

    /// The monitors of `members` (id and zone), computed afresh (what the incremental updates
    /// must equal).
    pub fn of_members<'a>(
        members: impl IntoIterator<Item = (&'a MemberId, Option<&'a str>)>,
        shards: u32,
        monitors: u32,
    ) -> Self {
        let mut m = Self::new(shards, monitors);
        for (id, zone) in members {
            m.add(id, zone);
        }
        m
    }

    /// Offers `(w, id)` to a list of the `k` best, highest first.
    fn offer(top: &mut Vec<(u64, MemberId)>, k: usize, w: u64, id: &MemberId) -> bool {
        let pos = top
            .iter()
            .position(|(tw, tid)| (w, id) > (*tw, tid))
            .unwrap_or(top.len());
        if pos < k {
            top.insert(pos, (w, id.clone()));
            top.truncate(k);
            true
        } else {
            false
        }
    }

    /// A shard's monitors from the best of each zone: zone winners by weight, then the rest.
    fn choose(best: &BTreeMap<Zone, Vec<(u64, MemberId)>>, k: usize) -> Vec<(u64, MemberId)> {
        let mut winners: Vec<&(u64, MemberId)> = best.values().filter_map(|b| b.first()).collect();
        winners.sort_by(|a, b| b.cmp(a));
        let mut chosen: Vec<(u64, MemberId)> = winners.into_iter().take(k).cloned().collect();
        if chosen.len() < k {
            let mut rest: Vec<&(u64, MemberId)> = best
                .values()
                .flat_map(|b| b.iter())
                .filter(|c| !chosen.contains(c))
                .collect();
            rest.sort_by(|a, b| b.cmp(a));
            let more = k - chosen.len();
            chosen.extend(rest.into_iter().take(more).cloned());
        }
        chosen.sort_by(|a, b| b.cmp(a));
        chosen
    }

    /// `id` joined in `zone`, or moved to it.
    pub fn add(&mut self, id: &MemberId, zone: Option<&str>) {
        let zone: Zone = zone
            .filter(|_| !crate::runtime::sim::flaw("k8s-monitors-ignore-zones"))
            .map(str::to_string);
        match self.members.get(id) {
            Some((_, z)) if *z == zone => return,
            Some(_) => self.remove(id),
            None => {}
        }
        let h = member_hash(id.as_str());
        self.members.insert(id.clone(), (h, zone.clone()));
        self.zones
            .entry(zone.clone())
            .or_default()
            .insert(id.clone());
        for ((key, best), top) in self.keys.iter().zip(&mut self.best).zip(&mut self.top) {
            let in_zone = best.entry(zone.clone()).or_default();
            if Self::offer(in_zone, self.k, weight(*key, h), id) {
                *top = Self::choose(best, self.k);
            }
        }
    }

    /// `id` left.
    pub fn remove(&mut self, id: &MemberId) {
        let Some((_, zone)) = self.members.remove(id) else {
            return;
        };
        let empty = self.zones.get_mut(&zone).is_some_and(|z| {
            z.remove(id);
            z.is_empty()
        });
        if empty {
            self.zones.remove(&zone);
        }
        for ((key, best), top) in self.keys.iter().zip(&mut self.best).zip(&mut self.top) {
            let Some(in_zone) = best.get_mut(&zone) else {
                continue;
            };
            if !in_zone.iter().any(|(_, t)| t == id) {
                continue;
            }
            in_zone.clear();
            for m in self.zones.get(&zone).into_iter().flatten() {
                let (h, _) = &self.members[m];
                Self::offer(in_zone, self.k, weight(*key, *h), m);
            }
            if in_zone.is_empty() {
                best.remove(&zone);
            }
            *top = Self::choose(best, self.k);
        }
    }

    /// Exactly `members` (id and zone) are the members now: adds, moves and removes the
    /// difference.
    pub fn set<'a>(&mut self, members: impl IntoIterator<Item = (&'a MemberId, Option<&'a str>)>) {
        let now: BTreeMap<&MemberId, Option<&str>> = members.into_iter().collect();
        let gone: Vec<MemberId> = self
            .members
            .keys()
            .filter(|id| !now.contains_key(id))
            .cloned()
            .collect();
        for id in &gone {
            self.remove(id);
        }
        for (id, zone) in now {
            self.add(id, zone);
        }
    }

    /// The monitors of `shard`, highest-ranked first (empty if out of range).
    pub fn of(&self, shard: u32) -> Vec<&MemberId> {
        self.top
            .get(shard as usize)
            .map(|t| t.iter().map(|(_, id)| id).collect())
            .unwrap_or_default()
    }

    /// The shards `me` monitors, with its rank in each (0: first).
    pub fn shards_of(&self, me: &MemberId) -> BTreeMap<u32, usize> {
        self.top
            .iter()
            .enumerate()
            .filter_map(|(s, t)| Some((s as u32, t.iter().position(|(_, id)| id == me)?)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<MemberId> {
        (0..n)
            .map(|i| MemberId::parse(format!("m{i:04}-1")).unwrap())
            .collect()
    }

    /// Members without zones.
    fn z(ids: &[MemberId]) -> impl Iterator<Item = (&MemberId, Option<&str>)> {
        ids.iter().map(|id| (id, None))
    }

    #[test]
    fn every_shard_gets_k_distinct_monitors_and_all_members_agree() {
        let members = ids(50);
        let a = Monitors::of_members(z(&members), 32, 3);
        let mut reversed = members.clone();
        reversed.reverse();
        assert_eq!(
            a,
            Monitors::of_members(z(&reversed), 32, 3),
            "order of the list matters not"
        );
        // Kept up to date through departures and arrivals, the same as computed afresh.
        let mut b = Monitors::of_members(z(&members[..10]), 32, 3);
        b.set(z(&members[5..]));
        assert_eq!(b, Monitors::of_members(z(&members[5..]), 32, 3));
        b.set(z(&members));
        assert_eq!(a, b);
        for s in 0..32 {
            let m = a.of(s);
            assert_eq!(m.len(), 3);
            assert!(m[0] != m[1] && m[1] != m[2] && m[0] != m[2]);
        }
        let total: usize = members.iter().map(|id| a.shards_of(id).len()).sum();
        assert_eq!(total, 32 * 3);
        // Fewer members than monitors: everyone monitors every shard.
        let few = ids(2);
        let f = Monitors::of_members(z(&few), 4, 3);
        assert!(few.iter().all(|id| f.shards_of(id).len() == 4));
    }

    #[test]
    fn a_departure_moves_only_the_shards_the_departed_member_monitored() {
        let members = ids(200);
        let before = Monitors::of_members(z(&members), 64, 3);
        let gone = &members[17];
        let rest: Vec<MemberId> = members.iter().filter(|id| *id != gone).cloned().collect();
        let mut after = before.clone();
        after.remove(gone);
        assert_eq!(after, Monitors::of_members(z(&rest), 64, 3));
        for s in 0..64 {
            let was: Vec<&MemberId> = before.of(s).into_iter().filter(|id| *id != gone).collect();
            // The survivors keep their order; at most one newcomer joins at the end.
            assert_eq!(after.of(s)[..was.len()], was[..]);
            if !before.of(s).contains(&gone) {
                assert_eq!(before.of(s), after.of(s), "shard {s} moved for nothing");
            }
        }
    }

    /// With zones, a shard's monitors are in as many zones as there are (up to k): a zone
    /// outage takes at most one monitor of each shard. Kept incrementally through departures
    /// and zone moves, the same as computed afresh; the k highest weights when no member has a
    /// zone.
    #[test]
    fn monitors_spread_over_zones() {
        let members = ids(90);
        let zone = |i: usize| ["zone-a", "zone-b", "zone-c"][i % 3];
        let zoned: Vec<(&MemberId, Option<&str>)> = members
            .iter()
            .enumerate()
            .map(|(i, id)| (id, Some(zone(i))))
            .collect();
        let m = Monitors::of_members(zoned.iter().copied(), 32, 3);
        let zone_of = |id: &MemberId| members.iter().position(|x| x == id).map(zone).unwrap();
        for s in 0..32 {
            let zones: BTreeSet<&str> = m.of(s).into_iter().map(zone_of).collect();
            assert_eq!(zones.len(), 3, "shard {s}: {:?}", m.of(s));
        }
        // Two zones, k = 3: one of each, then the next by weight.
        let two: Vec<(&MemberId, Option<&str>)> = members
            .iter()
            .enumerate()
            .map(|(i, id)| (id, Some(["zone-a", "zone-b"][i % 2])))
            .collect();
        let m2 = Monitors::of_members(two.iter().copied(), 16, 3);
        for s in 0..16 {
            let zones: BTreeSet<&str> = m2
                .of(s)
                .into_iter()
                .map(|id| two.iter().find(|(x, _)| *x == id).unwrap().1.unwrap())
                .collect();
            assert_eq!((m2.of(s).len(), zones.len()), (3, 2));
        }
        // Incremental: departures and zone moves, against a fresh computation.
        let mut inc = m.clone();
        let mut now = zoned.clone();
        for (step, i) in [3usize, 40, 41, 77, 12].into_iter().enumerate() {
            if step % 2 == 0 {
                inc.remove(&members[i]);
                now.retain(|(id, _)| **id != members[i]);
            } else {
                inc.add(&members[i], Some("zone-d"));
                now.iter_mut()
                    .filter(|(id, _)| **id == members[i])
                    .for_each(|e| e.1 = Some("zone-d"));
            }
            assert_eq!(
                inc,
                Monitors::of_members(now.iter().copied(), 32, 3),
                "step {step}"
            );
        }
        // No zones: the k highest weights, as if zones did not exist.
        let plain = Monitors::of_members(z(&members), 8, 3);
        for s in 0..8 {
            let key = key_hash("shoal.io/monitor", &s.to_string());
            let mut ranked: Vec<(u64, &MemberId)> = members
                .iter()
                .map(|id| (weight(key, member_hash(id.as_str())), id))
                .collect();
            ranked.sort_by(|a, b| b.cmp(a));
            let want: Vec<&MemberId> = ranked.into_iter().take(3).map(|(_, id)| id).collect();
            assert_eq!(plain.of(s), want);
        }
    }

    #[test]
    fn shards_spread_members_evenly_and_names_round_trip() {
        let members = ids(3200);
        let mut counts = [0u32; 32];
        for id in &members {
            counts[shard_of(id, 32) as usize] += 1;
        }
        assert!(
            counts.iter().all(|&c| (60..=140).contains(&c)),
            "{counts:?}"
        );
        let hb = heartbeat_name("shoal-m0001-1");
        assert_eq!(hb, "shoal-m0001-1-hb");
        assert_eq!(record_name(&hb), "shoal-m0001-1");
        let lease = heartbeat_lease("shoal", "ns", &members[0], 32, 6, 1, None);
        assert_eq!(lease.meta.name, "shoal-m0000-1-hb");
        assert_eq!(
            lease.meta.labels.get(SHARD_LABEL).unwrap(),
            &shard_of(&members[0], 32).to_string()
        );
        assert!(
            !lease
                .meta
                .labels
                .contains_key(super::super::members::CLUSTER_LABEL)
        );
        assert!(
            Heartbeats::Sharded {
                shards: 0,
                monitors: 3
            }
            .validate()
            .is_err()
        );
        assert!(
            Heartbeats::Sharded {
                shards: 8,
                monitors: 17
            }
            .validate()
            .is_err()
        );
        assert!(Heartbeats::SHARDED.validate().is_ok());
    }
}
