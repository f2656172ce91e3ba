//! The Kubernetes provider's decisions, pure: how a member is written into its Lease, which
//! Leases are live, and which members a node lists.
//!
//! Liveness is judged as client-go's leader election judges a Lease: by when *this observer*
//! last saw the Lease's renewal change, on its own monotonic clock, never by comparing the
//! `renewTime` the holder wrote (on the holder's clock) with local wall time. Clock skew between
//! nodes therefore cannot expire anyone; a holder that stops renewing is dead here one lease
//! duration after this node last saw it renew.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use super::api::{Endpoint, EndpointSlice, Lease, ObjectMeta, ObjectReference};
use crate::cluster::{Member, MemberId, ModelError};
use crate::runtime::Instant;

/// Label on every member Lease: the cluster it belongs to (the watch selects on it).
pub const CLUSTER_LABEL: &str = "shoal.io/cluster";
/// Annotation: the member's address (`host:port`).
pub const ADDRESS_ANNOTATION: &str = "shoal.io/address";
/// Annotation: the kinds the member hosts, comma-separated.
pub const KINDS_ANNOTATION: &str = "shoal.io/kinds";
/// Annotation: the member's zone.
pub const ZONE_ANNOTATION: &str = "shoal.io/zone";
/// Prefix of annotations carrying the member's metadata (`shoal.io/meta.<key>`).
pub const METADATA_PREFIX: &str = "shoal.io/meta.";

/// Checks that `cluster` can name this provider's objects: it is the value of the
/// [`CLUSTER_LABEL`] label (at most 63 characters) and starts every Lease name
/// (`<cluster>-<member id>`, a DNS-1123 subdomain), so it must be lowercase letters, digits,
/// `-` and `.`, each dot-separated part starting and ending with a letter or digit. The API
/// server would refuse anything else with a 422 on the first write; this says why up front.
pub fn check_cluster_name(cluster: &str) -> Result<(), String> {
    let why = if cluster.is_empty() {
        Some("it is empty")
    } else if cluster.len() > 63 {
        Some("a label value has at most 63 characters")
    } else if !cluster
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
    {
        Some("only lowercase letters, digits, '-' and '.' may name Kubernetes objects")
    } else if cluster
        .split('.')
        .any(|part| part.is_empty() || part.starts_with('-') || part.ends_with('-'))
    {
        Some("each '.'-separated part must start and end with a letter or digit")
    } else {
        None
    };
    match why {
        Some(why) => Err(format!(
            "cluster name {cluster:?} cannot name Kubernetes Leases ({CLUSTER_LABEL} label, Lease names): {why}"
        )),
        None => Ok(()),
    }
}

/// Checks that every metadata key of `member` makes a valid annotation key
/// (`shoal.io/meta.<key>`: the part after `/` has at most 63 characters, letters, digits, `-`,
/// `_` and `.`, and ends with a letter or digit). The API server would refuse the Lease write
/// with a 422; this names the key instead.
pub fn check_metadata_keys(member: &Member) -> Result<(), String> {
    let prefix = METADATA_PREFIX
        .split_once('/')
        .map_or(METADATA_PREFIX, |(_, name)| name);
    for key in member.metadata.keys() {
        let name = format!("{prefix}{key}");
        let valid = name.len() <= 63
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            && name
                .bytes()
                .last()
                .is_some_and(|b| b.is_ascii_alphanumeric());
        if !valid {
            return Err(format!(
                "metadata key {key:?} cannot be a Kubernetes annotation key ({METADATA_PREFIX}{key}): at most {} characters of letters, digits, '-', '_' and '.', ending with a letter or digit",
                63 - prefix.len()
            ));
        }
    }
    Ok(())
}

/// The Lease name of `member` in `cluster`: `<cluster>-<member id>`.
pub fn lease_name(cluster: &str, member: &MemberId) -> String {
    format!("{cluster}-{member}")
}

/// The Lease that describes `member` (holder identity = member id), renewed at `now_micros`
/// (the holder's wall clock: informational only, see the module docs).
pub fn member_lease(
    cluster: &str,
    namespace: &str,
    member: &Member,
    duration: Duration,
    now_micros: i64,
    pod: Option<ObjectReference>,
) -> Lease {
    let mut annotations = BTreeMap::new();
    annotations.insert(ADDRESS_ANNOTATION.to_string(), member.address.clone());
    annotations.insert(
        KINDS_ANNOTATION.to_string(),
        member.kinds.iter().cloned().collect::<Vec<_>>().join(","),
    );
    if let Some(zone) = &member.zone {
        annotations.insert(ZONE_ANNOTATION.to_string(), zone.clone());
    }
    for (k, v) in &member.metadata {
        annotations.insert(format!("{METADATA_PREFIX}{k}"), v.clone());
    }
    Lease {
        meta: ObjectMeta {
            name: lease_name(cluster, &member.id),
            namespace: namespace.to_string(),
            labels: [(CLUSTER_LABEL.to_string(), cluster.to_string())].into(),
            annotations,
            owner: pod,
            ..ObjectMeta::default()
        },
        holder_identity: Some(member.id.to_string()),
        lease_duration_seconds: Some(duration.as_secs().clamp(1, i32::MAX as u64) as i32),
        acquire_time_micros: Some(now_micros),
        renew_time_micros: Some(now_micros),
        lease_transitions: Some(0),
    }
}

/// The member a Lease describes (its holder), validated like any member from the outside.
pub fn lease_member(lease: &Lease) -> Result<Member, ModelError> {
    let id = MemberId::parse(lease.holder_identity.as_deref().unwrap_or_default())?;
    let a = &lease.meta.annotations;
    let address = a.get(ADDRESS_ANNOTATION).cloned().unwrap_or_default();
    let kinds = a
        .get(KINDS_ANNOTATION)
        .map(|k| {
            k.split(',')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let mut member = Member::new(id, address, kinds);
    member.zone = a.get(ZONE_ANNOTATION).cloned();
    member.metadata = a
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix(METADATA_PREFIX)?.to_string(), v.clone())))
        .collect();
    member.validate(&crate::cluster::MemberLimits::default())?;
    Ok(member)
}

/// What this observer knows of one Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    /// The renewal as written (time and holder): a change is a renewal.
    renewal: (Option<i64>, Option<String>),
    /// The proven time (see [`Liveness`]) at which this observer saw `renewal` change.
    changed_at: Duration,
    duration: Duration,
    resource_version: String,
}

/// Which Leases are live, judged on this observer's clock, by a member that renews its own
/// Lease.
///
/// A Lease ages on **proven time**: time during which this member's own renewals kept being
/// accepted. Each accepted renewal advances it by the time since the previous one (sent to
/// sent, on this node's monotonic clock) if that gap is at most `continuity`; a longer gap
/// (this member could not write for a while) adds nothing. So when the API server is down,
/// slow to accept writes, or unreachable from here, no Lease ages: nobody is expired because
/// nobody could renew, and a Lease whose renewals this member could not see is not mistaken
/// for a dead one. While its renewals go through, proven time is real time. Expiry is judged
/// at each renewal (proven time moves in steps), so it is seen up to one renew interval late;
/// a change seen between two renewals is dated by the time since the last one, so a Lease
/// never looks older than it is.
#[derive(Clone, Debug)]
pub struct Liveness {
    seen: BTreeMap<String, Seen>,
    /// Ages of Leases this observer stopped watching (sharded heartbeats: a shard it no longer
    /// monitors), with the proven time they were parked at: kept for one Lease duration, so a
    /// shard that comes back soon (monitors flap while members come and go) resumes its ages
    /// instead of aging every heartbeat from first sight again.
    parked: BTreeMap<String, (Seen, Duration)>,
    /// Proven time up to `last_renewal`.
    proven: Duration,
    /// When this member's newest accepted renewal was sent.
    last_renewal: Option<Instant>,
    continuity: Duration,
}

impl Liveness {
    /// Nothing seen yet; renewals more than `continuity` apart prove no time in between.
    pub fn new(continuity: Duration) -> Self {
        Self {
            seen: BTreeMap::new(),
            parked: BTreeMap::new(),
            proven: Duration::ZERO,
            last_renewal: None,
            continuity,
        }
    }

    /// This member's own renewal, sent at `sent_at`, was accepted.
    pub fn renewed_own(&mut self, sent_at: Instant) {
        let Some(last) = self.last_renewal else {
            self.last_renewal = Some(sent_at);
            return;
        };
        if sent_at <= last {
            return; // An older renewal answered late.
        }
        let gap = sent_at.saturating_duration_since(last);
        if gap <= self.continuity || crate::runtime::sim::flaw("k8s-ages-while-silent") {
            self.proven += gap;
        } else {
            // No proven time passed since `last`: changes seen meanwhile were dated as if it
            // had (see `seen_at`); they happened at the proven time of `last`.
            for s in self.seen.values_mut() {
                s.changed_at = s.changed_at.min(self.proven);
            }
            // Parked ages were dated the same way (a restored one must not look younger).
            for (s, parked_at) in self.parked.values_mut() {
                s.changed_at = s.changed_at.min(self.proven);
                *parked_at = (*parked_at).min(self.proven);
            }
        }
        self.last_renewal = Some(sent_at);
    }

    /// The proven time to date a change seen at `now` with: at most the proven time of the
    /// last renewal plus the real time since (proven time never runs faster than real time),
    /// so a Lease never looks older than it is. If the next renewal shows this member could
    /// not write meanwhile, [`Self::renewed_own`] brings it back down.
    fn seen_at(&self, now: Instant) -> Duration {
        match self.last_renewal {
            Some(t) => self.proven + now.saturating_duration_since(t),
            None => self.proven,
        }
    }

    /// Stops judging the Leases `keep` refuses (no longer watched), keeping their ages for one
    /// Lease duration in case they are watched again. Ages parked longer are dropped.
    pub fn park(&mut self, mut keep: impl FnMut(&str) -> bool, now: Instant) {
        let at = self.seen_at(now);
        self.parked
            .retain(|_, (s, parked_at)| at.saturating_sub(*parked_at) < s.duration);
        let seen = std::mem::take(&mut self.seen);
        for (name, s) in seen {
            if keep(&name) {
                self.seen.insert(name, s);
            } else {
                self.parked.insert(name, (s, at));
            }
        }
    }

    /// Takes back the age of `name` if it was parked less than a Lease duration ago. Safe
    /// because a renewal changes the renewal time: one made while this observer was not
    /// watching shows as a change when the Lease is seen again, and ages it from then.
    fn unpark(&mut self, name: &str, now: Instant) {
        if self.seen.contains_key(name) {
            return;
        }
        if let Some((s, parked_at)) = self.parked.remove(name)
            && self.seen_at(now).saturating_sub(parked_at) < s.duration
            && !crate::runtime::sim::flaw("k8s-parked-ages-dropped")
        {
            self.seen.insert(name.to_string(), s);
        }
    }

    /// The Lease was seen (listed, added or modified) at `now`.
    pub fn observe(&mut self, lease: &Lease, now: Instant) {
        self.unpark(&lease.meta.name, now);
        let renewal = (lease.renew_time_micros, lease.holder_identity.clone());
        let duration = Duration::from_secs(lease.lease_duration_seconds.unwrap_or(0).max(1) as u64);
        let resource_version = lease.meta.resource_version.clone();
        let changed_at = self.seen_at(now);
        match self.seen.get_mut(&lease.meta.name) {
            Some(s) if s.renewal == renewal => {
                s.duration = duration;
                s.resource_version = resource_version;
            }
            _ => {
                self.seen.insert(
                    lease.meta.name.clone(),
                    Seen {
                        renewal,
                        changed_at,
                        duration,
                        resource_version,
                    },
                );
            }
        }
    }

    /// The Lease was deleted.
    pub fn forget(&mut self, name: &str) {
        self.seen.remove(name);
        self.parked.remove(name);
    }

    /// A relist at `now`: exactly `leases` exist; those seen before keep when their renewal
    /// was last seen to change.
    pub fn replace_all<'a>(&mut self, leases: impl IntoIterator<Item = &'a Lease>, now: Instant) {
        let mut before = std::mem::take(&mut self.seen);
        for lease in leases {
            if let Some(s) = before.remove(&lease.meta.name) {
                self.seen.insert(lease.meta.name.clone(), s);
            }
            self.observe(lease, now);
        }
    }

    /// A Lease that should exist and was not seen (sharded heartbeats: a record whose
    /// heartbeat is missing) ages from `now` as one that never renews, unless already known.
    /// Its resource version is empty: whoever deletes on it must first check it is absent.
    pub fn expect(&mut self, name: &str, duration: Duration, now: Instant) {
        self.unpark(name, now);
        if self.seen.contains_key(name) {
            return;
        }
        let changed_at = self.seen_at(now);
        self.seen.insert(
            name.to_string(),
            Seen {
                renewal: (None, None),
                changed_at,
                duration,
                resource_version: String::new(),
            },
        );
    }

    /// Forgets `name` if it is only expected (never seen).
    pub fn forget_expected(&mut self, name: &str) {
        if self
            .seen
            .get(name)
            .is_some_and(|s| s.resource_version.is_empty())
        {
            self.seen.remove(name);
        }
    }

    /// Whether `name` was seen or is expected.
    pub fn knows(&self, name: &str) -> bool {
        self.seen.contains_key(name)
    }

    /// Keeps only the Leases whose name `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        self.seen.retain(|name, _| keep(name));
    }

    /// Whether the Lease named `name` is live: its renewal changed less than a lease duration
    /// of proven time ago.
    pub fn is_live(&self, name: &str) -> bool {
        self.seen
            .get(name)
            .is_some_and(|s| self.proven.saturating_sub(s.changed_at) < s.duration)
    }

    /// Expired Leases, with the resource version seen (a cleaner deletes with it as a
    /// precondition, so two cleaners, or a renewal this member has not seen yet, cannot race).
    pub fn expired(&self) -> Vec<(String, String)> {
        self.seen
            .iter()
            .filter(|(name, _)| !self.is_live(name))
            .map(|(name, s)| (name.clone(), s.resource_version.clone()))
            .collect()
    }
}

/// A Pod an EndpointSlice lists as serving.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServingPod {
    /// The Pod's UID as the endpoint names it (empty when the endpoint gives none): a Pod
    /// recreated under the same name (a StatefulSet's) has another one.
    pub uid: String,
    /// The zone the endpoint gives.
    pub zone: Option<String>,
}

/// Serving Pods by name.
pub type Serving = BTreeMap<String, ServingPod>;

/// The Pods whose endpoints are serving and not terminating, across every slice of the
/// Service (a Pod in several slices counts once), with the zone an endpoint gives.
///
/// The conditions are read as the EndpointSlice API defines them: `serving` unset defers to
/// `ready`, `ready` unset means ready (an unknown state consumers treat as ready), `terminating`
/// unset means not terminating.
pub fn serving_pods<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> Serving {
    serving_of(slices.into_iter().flat_map(|s| &s.endpoints))
}

/// [`serving_pods`] of endpoints, in the order the slices (by name) list them. What it says of
/// one Pod depends only on that Pod's endpoints, so it can be computed one Pod at a time.
pub(crate) fn serving_of<'a>(endpoints: impl IntoIterator<Item = &'a Endpoint>) -> Serving {
    let mut serving = Serving::new();
    let mut terminating: BTreeSet<(String, String)> = BTreeSet::new();
    for e in endpoints {
        let Some(pod) = e.target_ref.as_ref().filter(|r| r.kind == "Pod") else {
            continue;
        };
        let is_serving = e.serving.or(e.ready).unwrap_or(true);
        if e.terminating.unwrap_or(false) && !crate::runtime::sim::flaw("k8s-terminating-served") {
            terminating.insert((pod.name.clone(), pod.uid.clone()));
        } else if is_serving {
            let entry = serving
                .entry(pod.name.clone())
                .or_insert_with(|| ServingPod {
                    uid: pod.uid.clone(),
                    zone: None,
                });
            if entry.uid != pod.uid {
                // Two Pods under one name (the old one's endpoint not yet removed): the
                // name alone says nothing; the UID check in `listed` must not pass either.
                entry.uid = CONFLICTING_UIDS.into();
            }
            if entry.zone.is_none() {
                entry.zone.clone_from(&e.zone);
            }
        }
    }
    // A Pod terminating in any slice is not listed, whatever another slice says.
    serving.retain(|p, s| !terminating.contains(&(p.clone(), s.uid.clone())));
    serving
}

/// Stands for the UID of a Pod name that two serving endpoints give different UIDs.
const CONFLICTING_UIDS: &str = "\u{0}conflicting";

/// Whether the Pod a Lease names (`name`, `uid`) is the serving Pod `s`: the same name, and the
/// same UID when both give one.
pub(crate) fn is_same_pod(uid: &str, s: &ServingPod) -> bool {
    uid.is_empty() || s.uid.is_empty() || s.uid == uid
}

/// The members a node lists, and the Leases it skipped (with why).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listed {
    /// The members, by id.
    pub members: Vec<Member>,
    /// Leases of the cluster that describe no valid member: `(lease name, reason)`.
    pub skipped: Vec<(String, String)>,
}

/// The members of `cluster`: the holder of every Lease, and when a Service is watched
/// (`serving` is `Some`), only those whose Pod is serving (the zone comes from the Lease, else
/// from the Pod's endpoint). A Lease that does not describe a valid member under its own name
/// (edited, written by other software, a copy under another name) is skipped, never trusted,
/// and never hides a valid one.
///
/// An expired Lease is listed until it is deleted: removal is decided once for everyone, at
/// the API server, when a member deletes the Lease it found expired (see [`Liveness`]) with a
/// resource version precondition, so a renewal in between wins. A member removed that way can
/// never renew under the same id, so removal is final on every node.
pub fn members<'a>(
    cluster: &str,
    leases: impl IntoIterator<Item = &'a Lease>,
    serving: Option<&Serving>,
) -> Listed {
    let mut index = MemberIndex::new(cluster);
    index.replace_all(leases);
    index.listed(serving)
}

/// Lease names by the address their holder advertises, kept up to date one event at a time,
/// so that a member finds earlier incarnations of itself (Leases at its own address with an
/// older id) without scanning every Lease each time the members change.
#[derive(Clone, Debug, Default)]
pub struct ByAddress {
    names: BTreeMap<String, BTreeSet<String>>,
    address_of: BTreeMap<String, String>,
}

impl ByAddress {
    /// The Lease was added or changed.
    pub fn upsert(&mut self, lease: &Lease) {
        let name = &lease.meta.name;
        let address = lease.meta.annotations.get(ADDRESS_ANNOTATION);
        if self.address_of.get(name) == address {
            return;
        }
        self.remove(name);
        if let Some(address) = address {
            self.address_of.insert(name.clone(), address.clone());
            self.names
                .entry(address.clone())
                .or_default()
                .insert(name.clone());
        }
    }

    /// The Lease named `name` was deleted.
    pub fn remove(&mut self, name: &str) {
        if let Some(address) = self.address_of.remove(name)
            && let Some(names) = self.names.get_mut(&address)
        {
            names.remove(name);
            if names.is_empty() {
                self.names.remove(&address);
            }
        }
    }

    /// A relist: exactly `leases` exist.
    pub fn replace_all<'a>(&mut self, leases: impl IntoIterator<Item = &'a Lease>) {
        *self = Self::default();
        for lease in leases {
            self.upsert(lease);
        }
    }

    /// The names of the Leases at `address`, in order.
    pub fn at(&self, address: &str) -> impl Iterator<Item = &String> {
        self.names.get(address).into_iter().flatten()
    }
}

/// What one Lease says: its member and its Pod, or why it is skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// A member, and its Pod (name, UID) when the Lease is owned by one.
    Member(Member, Option<(String, String)>),
    Skipped(String),
}

/// The members the cluster's Leases describe, kept up to date one Lease at a time: a renewal
/// (only `renewTime` changed) leaves the index as it was, so a node of a large cluster rebuilds
/// its member list only when a member joins, leaves or changes its description, not on each of
/// the renewals that arrive every second. [`members`] is the same, built from scratch.
#[derive(Clone, Debug)]
pub struct MemberIndex {
    cluster: String,
    by_lease: BTreeMap<String, Entry>,
}

impl MemberIndex {
    /// No Leases yet, for `cluster`.
    pub fn new(cluster: &str) -> Self {
        Self {
            cluster: cluster.to_string(),
            by_lease: BTreeMap::new(),
        }
    }

    fn entry(&self, lease: &Lease) -> Entry {
        let member = match lease_member(lease) {
            Ok(m) => m,
            Err(e) => return Entry::Skipped(e.to_string()),
        };
        if lease.meta.name != lease_name(&self.cluster, &member.id) {
            return Entry::Skipped(format!(
                "holder {} does not match the Lease name",
                member.id
            ));
        }
        let pod = lease
            .meta
            .owner
            .as_ref()
            .filter(|o| o.kind == "Pod")
            .map(|o| (o.name.clone(), o.uid.clone()));
        Entry::Member(member, pod)
    }

    /// The Lease was added or changed; whether what it describes changed.
    pub fn upsert(&mut self, lease: &Lease) -> bool {
        if self
            .by_lease
            .get(&lease.meta.name)
            .is_some_and(|old| Self::same_description(old, lease))
        {
            return false; // A renewal.
        }
        let entry = self.entry(lease);
        match self.by_lease.get(&lease.meta.name) {
            Some(old) if *old == entry => false,
            _ => {
                self.by_lease.insert(lease.meta.name.clone(), entry);
                true
            }
        }
    }

    /// What the Lease `name` describes, if it is known.
    pub(crate) fn entry_of(&self, name: &str) -> Option<&Entry> {
        self.by_lease.get(name)
    }

    /// How many Leases are known.
    pub fn len(&self) -> usize {
        self.by_lease.len()
    }

    /// Whether no Lease is known.
    pub fn is_empty(&self) -> bool {
        self.by_lease.is_empty()
    }

    /// The names of the Leases known, in order.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.by_lease.keys()
    }

    /// The Lease named `name` was deleted; whether it was known.
    pub fn remove(&mut self, name: &str) -> bool {
        self.by_lease.remove(name).is_some()
    }

    /// A relist: exactly `leases` exist; whether anything they describe changed.
    pub fn replace_all<'a>(&mut self, leases: impl IntoIterator<Item = &'a Lease>) -> bool {
        let before = std::mem::take(&mut self.by_lease);
        for lease in leases {
            let entry = match before.get(&lease.meta.name) {
                // Unchanged annotations and holder: the same entry, without parsing again.
                Some(old) if Self::same_description(old, lease) => old.clone(),
                _ => self.entry(lease),
            };
            self.by_lease.insert(lease.meta.name.clone(), entry);
        }
        before != self.by_lease
    }

    /// Whether `lease` still describes what `old` holds (checked cheaply: the holder, the
    /// annotations and the owner, which are all a member's description comes from).
    fn same_description(old: &Entry, lease: &Lease) -> bool {
        let Entry::Member(m, pod) = old else {
            return false;
        };
        lease.holder_identity.as_deref() == Some(m.id.as_str())
            && lease.meta.annotations.get(ADDRESS_ANNOTATION) == Some(&m.address)
            && lease.meta.annotations.get(ZONE_ANNOTATION) == m.zone.as_ref()
            && lease
                .meta
                .owner
                .as_ref()
                .filter(|o| o.kind == "Pod")
                .map(|o| (&o.name, &o.uid))
                == pod.as_ref().map(|(n, u)| (n, u))
            && lease
                .meta
                .annotations
                .get(KINDS_ANNOTATION)
                .is_some_and(|k| {
                    k.split(',')
                        .filter(|s| !s.is_empty())
                        .eq(m.kinds.iter().map(String::as_str))
                })
            && lease
                .meta
                .annotations
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix(METADATA_PREFIX)?, v)))
                .eq(m.metadata.iter().map(|(k, v)| (k.as_str(), v)))
    }

    /// The members, and when a Service is watched (`serving` is `Some`), only those whose Pod
    /// is serving (the zone comes from the Lease, else from the Pod's endpoint); with the
    /// Leases skipped and why.
    pub fn listed(&self, serving: Option<&Serving>) -> Listed {
        let mut listed = Listed::default();
        let mut by_id: BTreeMap<MemberId, Member> = BTreeMap::new();
        for (name, entry) in &self.by_lease {
            let (member, pod) = match entry {
                Entry::Member(m, pod) => (m, pod),
                Entry::Skipped(why) => {
                    listed.skipped.push((name.clone(), why.clone()));
                    continue;
                }
            };
            let member = match serving {
                None => member.clone(),
                Some(serving) => match pod
                    .as_ref()
                    .and_then(|(p, uid)| serving.get(p).filter(|s| is_same_pod(uid, s)))
                {
                    None => continue,
                    Some(s) => {
                        let mut member = member.clone();
                        if member.zone.is_none() {
                            member.zone.clone_from(&s.zone);
                        }
                        member
                    }
                },
            };
            by_id.insert(member.id.clone(), member);
        }
        listed.members = by_id.into_values().collect();
        listed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kubernetes::api::Endpoint;
    use crate::runtime::{Clock, TokioClock};

    fn member(id: &str) -> Member {
        let mut m = Member::new(
            MemberId::parse(id).unwrap(),
            "10.0.0.1:4000",
            ["user", "cart"],
        );
        m.zone = Some("z1".into());
        m.metadata.insert("rack".into(), "r7".into());
        m
    }

    #[test]
    fn leases_are_found_by_address_through_moves_deletions_and_relists() {
        let at = |b: &ByAddress, a: &str| b.at(a).cloned().collect::<Vec<_>>();
        let mut by = ByAddress::default();
        let mut a = member_lease("c", "ns", &member("m-1"), Duration::from_secs(9), 0, None);
        let mut b = member_lease("c", "ns", &member("m-2"), Duration::from_secs(9), 0, None);
        by.upsert(&a);
        by.upsert(&b);
        assert_eq!(at(&by, "10.0.0.1:4000"), ["c-m-1", "c-m-2"]);
        b.meta
            .annotations
            .insert(ADDRESS_ANNOTATION.into(), "10.0.0.2:4000".into());
        by.upsert(&b);
        assert_eq!(at(&by, "10.0.0.1:4000"), ["c-m-1"]);
        assert_eq!(at(&by, "10.0.0.2:4000"), ["c-m-2"]);
        by.remove("c-m-2");
        assert!(at(&by, "10.0.0.2:4000").is_empty());
        a.meta.annotations.remove(ADDRESS_ANNOTATION);
        by.upsert(&a);
        assert!(at(&by, "10.0.0.1:4000").is_empty());
        by.replace_all([&b]);
        assert_eq!(at(&by, "10.0.0.2:4000"), ["c-m-2"]);
        assert!(at(&by, "10.0.0.1:4000").is_empty());
    }

    #[test]
    fn names_the_api_server_would_refuse_are_refused_up_front() {
        for ok in ["c", "shop", "shop-eu.prod", "a1.b2", &"x".repeat(63)] {
            assert!(check_cluster_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "Shop",
            "shop_eu",
            "-shop",
            "shop-",
            "a..b",
            "a.-b",
            &"x".repeat(64),
        ] {
            let e = check_cluster_name(bad).expect_err(bad);
            assert!(
                e.contains("cluster name") && e.contains(CLUSTER_LABEL),
                "{e}"
            );
        }
        let mut m = member("m1");
        assert!(check_metadata_keys(&m).is_ok());
        m.metadata.insert("build_id.v2".into(), "x".into());
        assert!(check_metadata_keys(&m).is_ok());
        for bad in ["has space", "ends-with-", "slash/in", &"k".repeat(59)] {
            let mut m = member("m1");
            m.metadata.insert(bad.into(), "v".into());
            let e = check_metadata_keys(&m).expect_err(bad);
            assert!(e.contains(bad) && e.contains("annotation"), "{e}");
        }
        let mut m = member("m1");
        m.metadata.insert("k".repeat(58), "v".into());
        assert!(check_metadata_keys(&m).is_ok(), "58 characters fit");
    }

    fn pod(name: &str) -> ObjectReference {
        ObjectReference {
            kind: "Pod".into(),
            namespace: "ns".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    #[test]
    fn a_member_round_trips_through_its_lease() {
        let m = member("m-1");
        let l = member_lease(
            "shop",
            "ns",
            &m,
            Duration::from_secs(15),
            1_000,
            Some(pod("p1")),
        );
        assert_eq!(l.meta.name, "shop-m-1");
        assert_eq!(l.meta.labels[CLUSTER_LABEL], "shop");
        assert_eq!(l.lease_duration_seconds, Some(15));
        assert_eq!(lease_member(&l).unwrap(), m);
        // A Lease someone else wrote badly is refused, not trusted.
        let mut bad = l.clone();
        bad.meta
            .annotations
            .insert(ADDRESS_ANNOTATION.into(), "no-port".into());
        assert!(lease_member(&bad).is_err());
        bad.holder_identity = None;
        assert!(lease_member(&bad).is_err());
    }

    // Async tests: the clock reads simulated time under madsim, which needs its runtime.
    #[tokio::test]
    async fn liveness_counts_from_when_this_observer_saw_a_renewal_not_from_the_writers_clock() {
        let clock = TokioClock;
        let t0 = clock.now();
        let s = Duration::from_secs;
        let d = s(10);
        let mut l = member_lease("c", "ns", &member("m-1"), d, 5_000_000_000, None);
        l.meta.resource_version = "1".into();
        let mut live = Liveness::new(s(3));
        live.renewed_own(t0);
        live.observe(&l, t0 + s(1));
        // This member renews every 2 s: proven time is real time, in steps.
        for k in 1..=5 {
            live.renewed_own(t0 + s(2 * k));
        }
        // 10 s proven, the Lease seen changing at 1 s: 9 s old.
        assert!(live.is_live("c-m-1"));
        live.renewed_own(t0 + s(12));
        assert!(!live.is_live("c-m-1"));
        // The same renewal seen again (a relist, a resync) does not extend it...
        live.observe(&l, t0 + s(12));
        assert!(!live.is_live("c-m-1"));
        assert_eq!(live.expired(), vec![("c-m-1".to_string(), "1".to_string())]);
        // ...a new renewal does, whatever time the writer's clock put in it (here: earlier).
        l.renew_time_micros = Some(1);
        l.meta.resource_version = "2".into();
        live.observe(&l, t0 + s(13));
        assert!(live.is_live("c-m-1"));
        // A relist keeps what was seen; a Lease gone from it is forgotten.
        live.replace_all([&l], t0 + s(13));
        assert!(live.is_live("c-m-1"));
        live.replace_all(std::iter::empty(), t0 + s(13));
        assert!(!live.is_live("c-m-1"));
        assert!(live.expired().is_empty());
    }

    #[tokio::test]
    async fn leases_do_not_age_while_this_member_cannot_renew() {
        let clock = TokioClock;
        let t0 = clock.now();
        let s = Duration::from_secs;
        let l = member_lease("c", "ns", &member("m-1"), s(10), 0, None);
        let mut live = Liveness::new(s(3));
        live.renewed_own(t0);
        live.observe(&l, t0);
        live.renewed_own(t0 + s(2));
        // No renewal of its own for a minute (the API server down or refusing writes): the
        // gap proves nothing, however long.
        live.renewed_own(t0 + s(62));
        assert!(live.is_live("c-m-1"));
        // Renewing again: the Lease expires once a full duration of proven time has passed.
        for k in 1..=3 {
            live.renewed_own(t0 + s(62 + 2 * k));
        }
        assert!(live.is_live("c-m-1"), "8 s proven");
        live.renewed_own(t0 + s(70));
        assert!(!live.is_live("c-m-1"), "10 s proven");
        // A change seen between two renewals is dated from when it was seen.
        let mut l2 = member_lease("c", "ns", &member("m-2"), s(10), 0, None);
        l2.meta.name = "c-m-2".into();
        live.observe(&l2, t0 + s(71));
        for k in 1..=5 {
            live.renewed_own(t0 + s(70 + 2 * k));
        }
        assert!(live.is_live("c-m-2"), "9 s old at 80 s");
        live.renewed_own(t0 + s(82));
        assert!(!live.is_live("c-m-2"), "11 s old at 82 s");
    }

    #[tokio::test]
    async fn a_change_seen_while_a_renewal_is_unanswered_is_never_dated_too_early() {
        let clock = TokioClock;
        let t0 = clock.now();
        let s = Duration::from_secs;
        let l = member_lease("c", "ns", &member("m-1"), s(6), 0, None);
        let mut live = Liveness::new(s(4));
        live.renewed_own(t0);
        // The renewal sent at 2 s is answered only at 7 s; the Lease changes at 5 s.
        live.observe(&l, t0 + s(5));
        live.renewed_own(t0 + s(2));
        for k in 2..=5 {
            live.renewed_own(t0 + s(2 * k));
        }
        // 10 s proven; the change was seen at 5 s: 5 s old, live.
        assert!(live.is_live("c-m-1"));
        live.renewed_own(t0 + s(12));
        assert!(!live.is_live("c-m-1"), "7 s old");
        // Seen during a gap that turns out not to count: dated at the gap's start.
        let mut l2 = l.clone();
        l2.meta.name = "c-m-2".into();
        live.observe(&l2, t0 + s(20));
        live.renewed_own(t0 + s(30));
        for k in 1..=2 {
            live.renewed_own(t0 + s(30 + 2 * k));
        }
        assert!(live.is_live("c-m-2"), "4 s proven since");
        live.renewed_own(t0 + s(36));
        assert!(!live.is_live("c-m-2"), "6 s proven since");
    }

    /// A Lease no longer watched (a shard this member stopped monitoring) keeps its age for one
    /// duration: watched again with the same renewal, it expires when it would have; renewed
    /// meanwhile, it ages from when the change is seen; parked longer, from first sight again.
    /// A gap in this member's own renewals dates parked ages like watched ones.
    #[tokio::test]
    async fn a_lease_watched_again_soon_keeps_its_age() {
        let clock = TokioClock;
        let t0 = clock.now();
        let s = Duration::from_secs;
        let l = member_lease("c", "ns", &member("m-1"), s(10), 0, None);
        let mut l2 = l.clone();
        l2.meta.name = "c-m-2".into();
        let mut live = Liveness::new(s(3));
        live.renewed_own(t0);
        live.observe(&l, t0);
        live.observe(&l2, t0);
        for k in 1..=3 {
            live.renewed_own(t0 + s(2 * k));
        }
        live.park(|_| false, t0 + s(6));
        assert!(live.expired().is_empty(), "parked Leases are not judged");
        assert!(!live.knows("c-m-1"));
        // Watched again at 8 s: c-m-1 unchanged keeps its age, c-m-2 renewed meanwhile is
        // fresh.
        live.renewed_own(t0 + s(8));
        live.observe(&l, t0 + s(8));
        let mut renewed = l2.clone();
        renewed.renew_time_micros = Some(42);
        live.observe(&renewed, t0 + s(8));
        live.renewed_own(t0 + s(10));
        assert!(!live.is_live("c-m-1"), "10 s since its renewal was seen");
        assert!(live.is_live("c-m-2"));
        // Parked longer than a duration: first sight again.
        live.park(|_| false, t0 + s(10));
        for k in 6..=11 {
            live.renewed_own(t0 + s(2 * k));
        }
        live.observe(&l, t0 + s(22));
        assert!(live.is_live("c-m-1"), "parked 12 s: aged from now");
        // Parked, then a gap this member could not renew across: the age parked while it was
        // cut off is dated at the gap's start, not later.
        let mut l3 = l.clone();
        l3.meta.name = "c-m-3".into();
        live.renewed_own(t0 + s(24));
        live.observe(&l3, t0 + s(29)); // 5 s into a gap: dated 5 s after the last renewal.
        live.park(|name| name != "c-m-3", t0 + s(29));
        live.renewed_own(t0 + s(40)); // The gap proves nothing.
        live.observe(&l3, t0 + s(40));
        for k in 1..=5 {
            live.renewed_own(t0 + s(40 + 2 * k));
        }
        assert!(!live.is_live("c-m-3"), "10 s proven since the gap's start");
    }

    #[test]
    fn the_index_changes_on_descriptions_not_on_renewals() {
        let d = Duration::from_secs(10);
        let mut a = member_lease("c", "ns", &member("m-a"), d, 0, Some(pod("a")));
        let b = member_lease("c", "ns", &member("m-b"), d, 0, Some(pod("b")));
        let mut index = MemberIndex::new("c");
        assert!(index.replace_all([&a, &b]));
        assert!(!index.replace_all([&a, &b]), "the same list again");
        // A renewal changes nothing the members are made of.
        a.renew_time_micros = Some(99);
        a.meta.resource_version = "7".into();
        assert!(!index.upsert(&a));
        // A new description does.
        a.meta
            .annotations
            .insert(format!("{METADATA_PREFIX}rack"), "r9".into());
        assert!(index.upsert(&a));
        let listed = index.listed(None);
        assert_eq!(listed.members[0].metadata["rack"], "r9");
        assert_eq!(
            listed,
            members("c", [&a, &b], None),
            "the same as from scratch"
        );
        assert!(index.remove(&b.meta.name));
        assert!(!index.remove(&b.meta.name));
        assert_eq!(index.listed(None).members.len(), 1);
    }

    #[test]
    fn members_are_valid_leases_whose_pods_serve_merged_across_slices() {
        let d = Duration::from_secs(10);
        let mut leases: Vec<Lease> = ["a", "b", "c"]
            .iter()
            .map(|n| member_lease("c", "ns", &member(&format!("m-{n}")), d, 0, Some(pod(n))))
            .collect();
        leases[0].meta.annotations.remove(ZONE_ANNOTATION);
        // Edited by hand: a copy of c's Lease under another name, and a Lease with no holder.
        let mut copy = leases[2].clone();
        copy.meta.name = "c-m-x".into();
        let mut broken = leases[1].clone();
        broken.meta.name = "c-broken".into();
        broken.holder_identity = None;
        leases.push(copy);
        leases.push(broken);
        let endpoint = |p: &str, serving: bool, terminating: bool| Endpoint {
            addresses: vec!["10.0.0.1".into()],
            ready: Some(serving && !terminating),
            serving: Some(serving),
            terminating: Some(terminating),
            zone: Some("z9".into()),
            target_ref: Some(pod(p)),
        };
        let slices = [
            EndpointSlice {
                endpoints: vec![endpoint("a", true, false), endpoint("b", true, false)],
                ..EndpointSlice::default()
            },
            EndpointSlice {
                // b is terminating (in another slice): not listed.
                endpoints: vec![endpoint("b", true, true), endpoint("a", true, false)],
                ..EndpointSlice::default()
            },
        ];
        let serving = serving_pods(&slices);
        assert_eq!(
            serving.keys().map(String::as_str).collect::<Vec<_>>(),
            ["a"]
        );
        assert_eq!(serving["a"].uid, "uid-a");
        let ids = |l: &Listed| {
            l.members
                .iter()
                .map(|m| m.id.to_string())
                .collect::<Vec<_>>()
        };
        // Without a Service: every valid Lease; the copy and the broken Lease are skipped.
        let all = members("c", &leases, None);
        assert_eq!(ids(&all), ["m-a", "m-b", "m-c"]);
        assert_eq!(
            all.skipped
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            ["c-broken", "c-m-x"]
        );
        // With one: only those whose Pod serves; the zone the Lease lacks comes from the
        // endpoint.
        let served = members("c", &leases, Some(&serving));
        assert_eq!(ids(&served), ["m-a"]);
        assert_eq!(served.members[0].zone.as_deref(), Some("z9"));
    }

    #[test]
    fn an_endpoint_with_ready_unset_serves_and_a_recreated_pod_is_not_its_predecessor() {
        let d = Duration::from_secs(10);
        let leases: Vec<Lease> = ["a", "b"]
            .iter()
            .map(|n| member_lease("c", "ns", &member(&format!("m-{n}")), d, 0, Some(pod(n))))
            .collect();
        let unset = |p: ObjectReference| Endpoint {
            addresses: vec!["10.0.0.1".into()],
            target_ref: Some(p),
            ..Endpoint::default()
        };
        // Every condition unset: ready (the API's reading of an unknown state).
        let mut recreated = pod("b");
        recreated.uid = "uid-b-2".into();
        let slices = [EndpointSlice {
            endpoints: vec![unset(pod("a")), unset(recreated)],
            ..EndpointSlice::default()
        }];
        let serving = serving_pods(&slices);
        assert_eq!(serving.len(), 2);
        // b's Pod was recreated under its name: the Lease names the old Pod's UID, so the
        // member the old Pod ran is not served by the new one.
        let served = members("c", &leases, Some(&serving));
        let ids: Vec<String> = served.members.iter().map(|m| m.id.to_string()).collect();
        assert_eq!(ids, ["m-a"]);
        // `ready: false` with `serving` unset is not serving.
        let not_ready = Endpoint {
            ready: Some(false),
            ..unset(pod("a"))
        };
        let slices = [EndpointSlice {
            endpoints: vec![not_ready],
            ..EndpointSlice::default()
        }];
        assert!(serving_pods(&slices).is_empty());
    }
}
