//! The global history oracle: (epoch, version) -> topology as the registry issued it.
//!
//! Built from the watch messages the registry sent (snapshots, and updates applied to the
//! version they name, by this module's own code, not the provider's), so a node whose view is
//! not in the history holds a topology the registry never issued: invented, mixed from two
//! versions, or applied wrongly. It also holds the registry to the descriptions members sent:
//! once the registry accepted a join (a new description of a registered member, too), every
//! topology it issues at that join's version or later lists the member as that join described
//! it.

use std::collections::BTreeMap;
use std::sync::Arc;

use shoal::registry::pb;
use shoal::{ClusterTopology, Description, Member, MemberId};

use crate::cluster::CLUSTER;
use crate::record::Recorder;

/// Most versions remembered (a run issues a few hundred).
const MAX_VERSIONS: usize = 100_000;

/// Most distinct watch messages remembered as already judged.
const MAX_JUDGED: usize = 200_000;

/// What the registry issued.
#[derive(Debug, Default)]
pub struct History {
    /// By (registry epoch, version): versions of different registry runs may repeat.
    /// With the fingerprint of its members, so a node's view is compared in O(1).
    by_version: BTreeMap<(u64, u64), (Arc<ClusterTopology>, u64)>,
    /// Per member id, in the current registry run: the description of its last accepted join,
    /// and the version that join answered with.
    described: BTreeMap<MemberId, (u64, Description)>,
    /// Digests of the watch messages already judged: the registry sends one message to every
    /// watcher, and a copy judged once needs no second look (a thousand watchers would
    /// otherwise cost a thousand rebuilds of one version).
    /// With the number of members each lists.
    judged: BTreeMap<u64, usize>,
    /// Restores from a snapshot (etcd with the same cluster id): each history epoch restored
    /// from, with the one its revisions are filed under since.
    restored: BTreeMap<u64, u64>,
    /// The epoch of the latest restore: a node reckons its own epoch for a store it saw go
    /// back (`epoch_after_going_back`), which the harness cannot know in advance; the first
    /// unknown epoch a node applies after a restore is bound to it.
    latest_restore: Option<u64>,
    /// Node epochs bound to history epochs, as above.
    aliases: BTreeMap<u64, u64>,
}

impl History {
    /// A registry run started: descriptions accepted by earlier runs no longer bind it.
    pub fn restarted(&mut self) {
        self.described.clear();
    }

    /// The store was restored: the versions it issues from now on are filed under `to`, a
    /// successor of `from`. Called before the restored store is issued: descriptions accepted
    /// since the snapshot no longer bind it (as at [`Self::restarted`]).
    pub fn restored(&mut self, from: u64, to: u64) {
        self.restored.insert(from, to);
        self.latest_restore = Some(to);
        self.described.clear();
    }

    /// Whether any version of `epoch` was issued.
    fn knows(&self, epoch: u64) -> bool {
        self.by_version
            .range((epoch, 0)..=(epoch, u64::MAX))
            .next()
            .is_some()
    }

    /// The history epoch a node's view of `epoch` is judged in: its own, or, for an epoch the
    /// node reckoned for a restored store, the restore's (bound at first sight).
    fn history_of(&mut self, epoch: u64) -> u64 {
        if let Some(e) = self.aliases.get(&epoch) {
            return *e;
        }
        match self.latest_restore {
            Some(r) if !self.knows(epoch) && self.aliases.len() < MAX_VERSIONS => {
                self.aliases.insert(epoch, r);
                r
            }
            _ => epoch,
        }
    }

    /// Whether `t` is, member for member, what a store restored from `epoch`'s history issued
    /// as its version (a node whose watch resumed on the restored store without noticing:
    /// the provider's audits find it).
    fn issued_after_restore(&self, epoch: u64, t: &ClusterTopology, fp: u64) -> bool {
        let mut e = epoch;
        for _ in 0..self.restored.len() {
            let Some(next) = self.restored.get(&e) else {
                return false;
            };
            if matches!(self.by_version.get(&(*next, t.version())), Some((_, f)) if *f == fp) {
                return true;
            }
            e = *next;
        }
        false
    }

    /// The registry accepted a member's join describing it as `m`, answering `version`.
    pub fn described(&mut self, m: &pb::Member, version: u64) {
        if let Some(m) = member(m)
            && (self.described.len() < MAX_VERSIONS || self.described.contains_key(&m.id))
        {
            self.described
                .insert(m.id.clone(), (version, m.description()));
        }
    }

    /// The registry sent `msg` to a watcher.
    pub fn sent(&mut self, msg: &pb::WatchResponse, rec: &Recorder) -> Option<usize> {
        let digest = digest(msg)?;
        if let Some(n) = self.judged.get(&digest) {
            return Some(*n);
        }
        if self.judged.len() >= MAX_JUDGED {
            self.judged.clear();
        }
        let topology = match &msg.event {
            Some(pb::watch_response::Event::Snapshot(s)) => snapshot(s),
            Some(pb::watch_response::Event::Update(u)) => {
                let Some((base, _)) = self.by_version.get(&(u.epoch, u.previous_version)) else {
                    // Every watcher got its base from this registry first, so the base is here.
                    if u.previous_version != 0 {
                        rec.violation_once(
                            format!("history base {}", u.version),
                            format!(
                                "history: the registry sent update v{} on top of v{}, which it never sent",
                                u.version, u.previous_version
                            ),
                        );
                    }
                    return None;
                };
                update(base, u)
            }
            _ => return None,
        };
        let Some(t) = topology else {
            rec.violation_once(
                "history malformed".into(),
                "history: the registry sent a watch message with an invalid member".into(),
            );
            return None;
        };
        let n = t.len();
        self.judged.insert(digest, n);
        self.issued(t, rec);
        Some(n)
    }

    /// The backend issued `t` (for etcd: the store held these members at revision
    /// `t.version()`, as the harness read it from the store itself).
    pub fn issued(&mut self, t: ClusterTopology, rec: &Recorder) {
        if let Some((m, (at, d))) = t.members().iter().find_map(|m| {
            self.described
                .get(&m.id)
                .filter(|(at, d)| *at <= t.version() && *d != m.description())
                .map(|e| (m, e))
        }) {
            rec.violation_once(
                format!("history description {} {}", m.id, t.version()),
                format!(
                    "history: the registry issued v{} listing {} as {:?}, but it accepted that member's join as {d:?} at v{at}",
                    t.version(),
                    m.id,
                    m.description()
                ),
            );
        }
        let key = (t.epoch(), t.version());
        match self.by_version.get(&key) {
            Some((known, _)) if known.members() != t.members() => rec.violation_once(
                format!("history conflict {}", t.version()),
                format!(
                    "history: the registry issued two different topologies as v{}: {} and {}",
                    t.version(),
                    describe(known),
                    describe(&t)
                ),
            ),
            Some(_) => {}
            None if self.by_version.len() < MAX_VERSIONS => {
                let fp = crate::fingerprint::of(&t).full;
                self.by_version.insert(key, (Arc::new(t), fp));
            }
            None => {}
        }
    }

    /// A node applied `t` (whose fingerprint is `fp`): it must be exactly what the registry
    /// issued under that version.
    pub fn applied(&mut self, node: &str, t: &ClusterTopology, fp: u64, rec: &Recorder) {
        let epoch = self.history_of(t.epoch());
        let issued = self.by_version.get(&(epoch, t.version()));
        if !matches!(issued, Some((_, f)) if *f == fp) && self.issued_after_restore(epoch, t, fp) {
            rec.count("history: a restored store's version under the epoch before the restore (a process started since, or not aware yet)");
            return;
        }
        match issued {
            None => rec.violation_once(
                format!("history invented {node} {}", t.version()),
                format!(
                    "history: {node} applied v{} {}, a version the registry never issued",
                    t.version(),
                    describe(t)
                ),
            ),
            // Equal fingerprints are equal members (sim/src/fingerprint.rs): O(1) per view.
            Some((issued, issued_fp)) if *issued_fp != fp => rec.violation_once(
                format!("history differs {node} {}", t.version()),
                format!(
                    "history: {node} holds v{} as {} but the registry issued {}{}",
                    t.version(),
                    describe(t),
                    describe(issued),
                    first_difference(t, issued)
                ),
            ),
            Some(_) => {}
        }
    }
}

/// The first member listed in both but described differently, spelled out.
fn first_difference(held: &ClusterTopology, issued: &ClusterTopology) -> String {
    held.members()
        .iter()
        .find_map(|m| {
            let other = issued.member(&m.id)?;
            (**m != *other).then(|| {
                format!(
                    "; {} is {:?} in the node's view, {:?} as issued",
                    m.id,
                    m.description(),
                    other.description()
                )
            })
        })
        .unwrap_or_default()
}

fn describe(t: &ClusterTopology) -> String {
    let members: Vec<String> = t
        .members()
        .iter()
        .map(|m| format!("{}@{}", m.id, m.address))
        .collect();
    format!("[{}]", members.join(","))
}

/// A digest of a snapshot or update, over every field (`None` for other messages).
fn digest(msg: &pb::WatchResponse) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let mut h = rustc_hash::FxHasher::default();
    let member = |h: &mut rustc_hash::FxHasher, m: &pb::Member| {
        (&m.id, &m.address, &m.kinds, &m.zone, &m.metadata).hash(h);
    };
    match &msg.event {
        Some(pb::watch_response::Event::Snapshot(s)) => {
            (
                b'S',
                s.epoch,
                s.version,
                s.encoding,
                s.fragment,
                s.members.len(),
            )
                .hash(&mut h);
            for m in &s.members {
                member(&mut h, m);
            }
            s.packed_members[..].hash(&mut h);
        }
        Some(pb::watch_response::Event::Update(u)) => {
            (b'U', u.epoch, u.version, u.previous_version, &u.left).hash(&mut h);
            for m in &u.joined {
                member(&mut h, m);
            }
            u.joined.len().hash(&mut h);
            for m in &u.changed {
                member(&mut h, m);
            }
            u.changed.len().hash(&mut h);
        }
        _ => return None,
    }
    Some(h.finish())
}

/// A wire member as a model member (the oracle's own conversion).
fn member(m: &pb::Member) -> Option<Member> {
    let mut out = Member::new(
        MemberId::parse(&m.id).ok()?,
        m.address.clone(),
        m.kinds.clone(),
    );
    out.zone = (!m.zone.is_empty()).then(|| m.zone.clone());
    out.metadata = m.metadata.clone();
    Some(out)
}

fn snapshot(s: &pb::Snapshot) -> Option<ClusterTopology> {
    let mut members: Vec<Member> = s.members.iter().map(member).collect::<Option<_>>()?;
    if !s.packed_members.is_empty() {
        // Expanded here with the compression library itself, not with the registry's code.
        let packed: prost::bytes::Bytes = match s.encoding {
            0 => s.packed_members.clone(),
            1 => {
                use std::io::Read;
                let mut out = Vec::new();
                flate2::read::ZlibDecoder::new(&s.packed_members[..])
                    .take(64 << 20)
                    .read_to_end(&mut out)
                    .ok()?;
                out.into()
            }
            _ => return None,
        };
        let list: pb::MemberList = prost::Message::decode(packed).ok()?;
        members.extend(
            list.members
                .iter()
                .map(member)
                .collect::<Option<Vec<_>>>()?,
        );
    }
    Some(
        ClusterTopology::new(CLUSTER, s.version, members)
            .ok()?
            .with_epoch(s.epoch),
    )
}

fn update(base: &ClusterTopology, u: &pb::Update) -> Option<ClusterTopology> {
    let mut members: BTreeMap<MemberId, Member> = base
        .members()
        .iter()
        .map(|m| (m.id.clone(), Member::clone(m)))
        .collect();
    for id in &u.left {
        members.remove(&MemberId::parse(id).ok()?);
    }
    for m in u.joined.iter().chain(&u.changed) {
        let m = member(m)?;
        members.insert(m.id.clone(), m);
    }
    Some(
        ClusterTopology::new(CLUSTER, u.version, members.into_values())
            .ok()?
            .with_epoch(u.epoch),
    )
}
