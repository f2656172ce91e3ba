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

use super::api::{EndpointSlice, Lease, ObjectMeta, ObjectReference};
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

/// Which Leases are live, judged on this observer's clock.
///
/// A Lease ages only while this observer can *prove* its cache is current: each answer from
/// the API server (a list, a watch event, a bookmark) advances a "proven time" by the time
/// since the previous answer, at most `max_gap`. Leases age on the proven time, so when this
/// observer is cut off from the API server (or the API server is down for everyone), no Lease
/// ages by more than `max_gap`: nobody is expired because nobody could renew, and a Lease
/// whose renewals this observer cannot see is not mistaken for a dead one. While answers keep
/// coming at least every `max_gap` (a member sees its own renewals), proven time is real time
/// on this node's monotonic clock.
#[derive(Clone, Debug)]
pub struct Liveness {
    seen: BTreeMap<String, Seen>,
    /// Proven time up to `last_heard`.
    proven: Duration,
    /// When the API server last answered.
    last_heard: Option<Instant>,
    max_gap: Duration,
}

impl Liveness {
    /// Nothing seen yet; one answer proves at most `max_gap` of time.
    pub fn new(max_gap: Duration) -> Self {
        Self {
            seen: BTreeMap::new(),
            proven: Duration::ZERO,
            last_heard: None,
            max_gap,
        }
    }

    /// The proven time at `now`: what was proven by the last answer, plus the time since, at
    /// most `max_gap`.
    fn proven_at(&self, now: Instant) -> Duration {
        match self.last_heard {
            Some(t) => self.proven + now.saturating_duration_since(t).min(self.max_gap),
            None => self.proven,
        }
    }

    /// The API server answered at `now` (a list, an event or a bookmark of the Lease watch).
    pub fn heard(&mut self, now: Instant) {
        self.proven = self.proven_at(now);
        self.last_heard = Some(self.last_heard.map_or(now, |t| t.max(now)));
    }

    /// The Lease was seen (listed, added or modified) at `now`.
    pub fn observe(&mut self, lease: &Lease, now: Instant) {
        self.heard(now);
        let renewal = (lease.renew_time_micros, lease.holder_identity.clone());
        let duration = Duration::from_secs(lease.lease_duration_seconds.unwrap_or(0).max(1) as u64);
        let resource_version = lease.meta.resource_version.clone();
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
                        changed_at: self.proven,
                        duration,
                        resource_version,
                    },
                );
            }
        }
    }

    /// The Lease was deleted (seen at `now`).
    pub fn forget(&mut self, name: &str, now: Instant) {
        self.heard(now);
        self.seen.remove(name);
    }

    /// A relist at `now`: exactly `leases` exist; those seen before keep when their renewal
    /// was last seen to change.
    pub fn replace_all<'a>(&mut self, leases: impl IntoIterator<Item = &'a Lease>, now: Instant) {
        self.heard(now);
        let mut before = std::mem::take(&mut self.seen);
        for lease in leases {
            if let Some(s) = before.remove(&lease.meta.name) {
                self.seen.insert(lease.meta.name.clone(), s);
            }
            self.observe(lease, now);
        }
    }

    /// Whether the Lease named `name` is live at `now`: its renewal changed less than a lease
    /// duration of proven time ago.
    pub fn is_live(&self, name: &str, now: Instant) -> bool {
        let proven = self.proven_at(now);
        self.seen
            .get(name)
            .is_some_and(|s| proven.saturating_sub(s.changed_at) < s.duration)
    }

    /// Leases expired at `now`, with the resource version seen (a cleaner deletes with it as a
    /// precondition, so two cleaners, or a late renewal, cannot race).
    pub fn expired(&self, now: Instant) -> Vec<(String, String)> {
        self.seen
            .iter()
            .filter(|(name, _)| !self.is_live(name, now))
            .map(|(name, s)| (name.clone(), s.resource_version.clone()))
            .collect()
    }

    /// When the next Lease expires unless renewed, if answers keep coming.
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        let proven = self.proven_at(now);
        self.seen
            .values()
            .map(|s| s.changed_at + s.duration)
            .filter(|at| *at > proven)
            .min()
            .map(|at| now + (at - proven))
    }
}

/// The Pods whose endpoints are serving and not terminating, across every slice of the
/// Service (a Pod in several slices counts once), with the zone an endpoint gives.
pub fn serving_pods<'a>(
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> BTreeMap<String, Option<String>> {
    let mut serving: BTreeMap<String, Option<String>> = BTreeMap::new();
    let mut terminating = BTreeSet::new();
    for slice in slices {
        for e in &slice.endpoints {
            let Some(pod) = e.target_ref.as_ref().filter(|r| r.kind == "Pod") else {
                continue;
            };
            // `serving` defaults to `ready` when absent (older controllers).
            let is_serving = e.serving.or(e.ready).unwrap_or(false);
            if e.terminating.unwrap_or(false) {
                terminating.insert(pod.name.clone());
            } else if is_serving {
                let zone = serving.entry(pod.name.clone()).or_default();
                if zone.is_none() {
                    zone.clone_from(&e.zone);
                }
            }
        }
    }
    // A Pod terminating in any slice is not listed, whatever another slice says.
    serving.retain(|p, _| !terminating.contains(p));
    serving
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
    serving: Option<&BTreeMap<String, Option<String>>>,
) -> Listed {
    let mut listed = Listed::default();
    let mut by_id: BTreeMap<MemberId, Member> = BTreeMap::new();
    for lease in leases {
        let name = &lease.meta.name;
        let member = match lease_member(lease) {
            Ok(m) => m,
            Err(e) => {
                listed.skipped.push((name.clone(), e.to_string()));
                continue;
            }
        };
        if *name != lease_name(cluster, &member.id) {
            listed.skipped.push((
                name.clone(),
                format!("holder {} does not match the Lease name", member.id),
            ));
            continue;
        }
        let member = match serving {
            None => member,
            Some(serving) => {
                let pod = lease.meta.owner.as_ref().filter(|o| o.kind == "Pod");
                match pod.and_then(|p| serving.get(&p.name)) {
                    None => continue,
                    Some(zone) => {
                        let mut member = member;
                        if member.zone.is_none() {
                            member.zone.clone_from(zone);
                        }
                        member
                    }
                }
            }
        };
        by_id.insert(member.id.clone(), member);
    }
    listed.members = by_id.into_values().collect();
    listed
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
        live.observe(&l, t0);
        // Answers keep coming every 2 s (under the gap): proven time is real time.
        for k in 1..=4 {
            live.heard(t0 + s(2 * k));
        }
        assert!(live.is_live("c-m-1", t0 + s(9)));
        assert!(!live.is_live("c-m-1", t0 + d));
        live.heard(t0 + d);
        // The same renewal seen again (a relist, a resync) does not extend it...
        live.observe(&l, t0 + s(10));
        assert!(!live.is_live("c-m-1", t0 + d));
        assert_eq!(
            live.expired(t0 + d),
            vec![("c-m-1".to_string(), "1".to_string())]
        );
        // ...a new renewal does, whatever time the writer's clock put in it (here: earlier).
        l.renew_time_micros = Some(1);
        l.meta.resource_version = "2".into();
        live.observe(&l, t0 + s(10));
        live.heard(t0 + s(12));
        assert!(live.is_live("c-m-1", t0 + s(12)));
        assert_eq!(live.next_expiry(t0 + s(12)), Some(t0 + s(20)));
        // A relist keeps what was seen; a Lease gone from it is forgotten.
        live.replace_all([&l], t0 + s(13));
        assert!(live.is_live("c-m-1", t0 + s(13)));
        live.replace_all(std::iter::empty(), t0 + s(13));
        assert!(!live.is_live("c-m-1", t0 + s(13)));
    }

    #[tokio::test]
    async fn leases_do_not_age_while_the_api_server_is_silent() {
        let clock = TokioClock;
        let t0 = clock.now();
        let s = Duration::from_secs;
        let l = member_lease("c", "ns", &member("m-1"), s(10), 0, None);
        let mut live = Liveness::new(s(3));
        live.observe(&l, t0);
        live.heard(t0 + s(2));
        // Cut off for a minute: the Lease aged by at most the gap (3 s) meanwhile...
        assert!(live.is_live("c-m-1", t0 + s(60)));
        live.heard(t0 + s(62));
        assert!(live.is_live("c-m-1", t0 + s(62)));
        // ...and expires once a full duration of proven time passed without a renewal.
        for k in 0..=3 {
            live.heard(t0 + s(62 + 2 * k));
        }
        assert!(!live.is_live("c-m-1", t0 + s(68)));
        assert_eq!(live.next_expiry(t0 + s(68)), None);
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
            ["c-m-x", "c-broken"]
        );
        // With one: only those whose Pod serves; the zone the Lease lacks comes from the
        // endpoint.
        let served = members("c", &leases, Some(&serving));
        assert_eq!(ids(&served), ["m-a"]);
        assert_eq!(served.members[0].zone.as_deref(), Some("z9"));
    }
}
