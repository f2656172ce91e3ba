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
    /// When this observer saw `renewal` change, on its own clock.
    changed_at: Instant,
    duration: Duration,
    resource_version: String,
}

/// Which Leases are live, judged on this observer's clock.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    seen: BTreeMap<String, Seen>,
}

impl Liveness {
    /// Nothing seen yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The Lease was seen (listed, added or modified) at `now`.
    pub fn observe(&mut self, lease: &Lease, now: Instant) {
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
                        changed_at: now,
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
    }

    /// A relist: exactly `leases` exist now; those seen before keep when their renewal was
    /// last seen to change.
    pub fn replace_all<'a>(&mut self, leases: impl IntoIterator<Item = &'a Lease>, now: Instant) {
        let mut before = std::mem::take(&mut self.seen);
        for lease in leases {
            if let Some(s) = before.remove(&lease.meta.name) {
                self.seen.insert(lease.meta.name.clone(), s);
            }
            self.observe(lease, now);
        }
    }

    /// Whether the Lease named `name` is live at `now`: its renewal changed less than a lease
    /// duration ago (as this observer saw it).
    pub fn is_live(&self, name: &str, now: Instant) -> bool {
        self.seen
            .get(name)
            .is_some_and(|s| now.saturating_duration_since(s.changed_at) < s.duration)
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

    /// When the next live Lease expires unless renewed.
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        self.seen
            .values()
            .map(|s| s.changed_at + s.duration)
            .filter(|at| *at > now)
            .min()
    }
}

/// The Pods whose endpoints are serving and not terminating, across every slice of the
/// Service (a Pod in several slices counts once).
pub fn serving_pods<'a>(slices: impl IntoIterator<Item = &'a EndpointSlice>) -> BTreeSet<String> {
    let mut serving = BTreeSet::new();
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
                serving.insert(pod.name.clone());
            }
        }
    }
    // A Pod terminating in any slice is not listed, whatever another slice says.
    serving.retain(|p| !terminating.contains(p));
    serving
}

/// The members of the cluster at `now`: every live Lease's holder, and when a Service is
/// watched (`serving` is `Some`), only those whose Pod is serving.
pub fn members<'a>(
    leases: impl IntoIterator<Item = &'a Lease>,
    liveness: &Liveness,
    serving: Option<&BTreeSet<String>>,
    now: Instant,
) -> Vec<Member> {
    leases
        .into_iter()
        .filter(|l| liveness.is_live(&l.meta.name, now))
        .filter(|l| {
            serving.is_none_or(|s| {
                l.meta
                    .owner
                    .as_ref()
                    .is_some_and(|o| o.kind == "Pod" && s.contains(&o.name))
            })
        })
        .filter_map(|l| lease_member(l).ok())
        .collect()
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
        let d = Duration::from_secs(10);
        let mut l = member_lease("c", "ns", &member("m-1"), d, 5_000_000_000, None);
        l.meta.resource_version = "1".into();
        let mut live = Liveness::new();
        live.observe(&l, t0);
        assert!(live.is_live("c-m-1", t0 + Duration::from_secs(9)));
        assert!(!live.is_live("c-m-1", t0 + d));
        // The same renewal seen again (a relist, a resync) does not extend it...
        live.observe(&l, t0 + Duration::from_secs(5));
        assert!(!live.is_live("c-m-1", t0 + d));
        assert_eq!(
            live.expired(t0 + d),
            vec![("c-m-1".to_string(), "1".to_string())]
        );
        // ...a new renewal does, whatever time the writer's clock put in it (here: earlier).
        l.renew_time_micros = Some(1);
        l.meta.resource_version = "2".into();
        live.observe(&l, t0 + Duration::from_secs(8));
        assert!(live.is_live("c-m-1", t0 + Duration::from_secs(17)));
        assert_eq!(live.next_expiry(t0 + d), Some(t0 + Duration::from_secs(18)));
        // A relist keeps what was seen; a Lease gone from it is forgotten.
        live.replace_all([&l], t0 + Duration::from_secs(9));
        assert!(live.is_live("c-m-1", t0 + Duration::from_secs(17)));
        live.replace_all(std::iter::empty(), t0 + Duration::from_secs(9));
        assert!(!live.is_live("c-m-1", t0 + Duration::from_secs(9)));
    }

    #[tokio::test]
    async fn members_are_live_leases_whose_pods_serve_merged_across_slices() {
        let clock = TokioClock;
        let now = clock.now();
        let d = Duration::from_secs(10);
        let leases: Vec<Lease> = ["a", "b", "c", "d"]
            .iter()
            .map(|n| member_lease("c", "ns", &member(&format!("m-{n}")), d, 0, Some(pod(n))))
            .collect();
        let mut live = Liveness::new();
        for l in &leases[..3] {
            live.observe(l, now);
        }
        let endpoint = |p: &str, serving: bool, terminating: bool| Endpoint {
            addresses: vec!["10.0.0.1".into()],
            ready: Some(serving && !terminating),
            serving: Some(serving),
            terminating: Some(terminating),
            zone: None,
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
            serving.iter().map(String::as_str).collect::<Vec<_>>(),
            ["a"]
        );
        let ids = |ms: Vec<Member>| ms.into_iter().map(|m| m.id.to_string()).collect::<Vec<_>>();
        // Without a Service: every live Lease (d was never seen renewing).
        assert_eq!(
            ids(members(&leases, &live, None, now)),
            ["m-a", "m-b", "m-c"]
        );
        // With one: only live Leases whose Pod serves.
        assert_eq!(ids(members(&leases, &live, Some(&serving), now)), ["m-a"]);
    }
}
