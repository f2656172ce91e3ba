//! The members a node lists, kept up to date one change at a time.
//!
//! [`MemberIndex::listed`] builds the list from scratch, O(members) for each change, and every
//! node sees every change: a cluster of N members starting up cost each node O(N²) and the
//! cluster O(N³) (at 200 simulated members, 38% of the host's time was that rebuild, and as
//! much again went to copying and dropping the members it built). [`Listing`] refreshes only
//! the Leases that changed and those whose Pod's serving state changed, and hands out the
//! difference, which [`crate::cluster::ClusterTopology::patched`] applies while sharing every
//! unchanged member. Its tests compare it with `listed` after every step of random histories.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use super::api::{Endpoint, EndpointSlice};
use super::members::{Entry, MemberIndex, Serving, is_same_pod, serving_of};
use crate::cluster::{Member, MemberId};

/// What changed in the listing since the last [`Listing::refresh`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListingDelta {
    /// Members no longer listed.
    pub left: Vec<MemberId>,
    /// Members listed now that were not, or listed with another description.
    pub upserts: Vec<Arc<Member>>,
    /// Whether the members withheld (registered, Pod not serving) changed.
    pub withheld_changed: bool,
}

impl ListingDelta {
    /// Whether the listed members are the same.
    pub fn is_empty(&self) -> bool {
        self.left.is_empty() && self.upserts.is_empty()
    }
}

/// The members a node lists, as [`MemberIndex::listed`] gives them, maintained incrementally:
/// tell it which Leases changed ([`Self::lease_changed`], [`Self::all_changed`]) and the
/// serving Pods ([`Self::set_serving`]), then [`Self::refresh`] from the index.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// `None`: no Service is watched, every valid Lease lists its member.
    serving: Option<Serving>,
    /// Listed members (the serving filter and the endpoint's zone applied), by id.
    listed: BTreeMap<MemberId, Arc<Member>>,
    /// Members whose Lease is valid but whose Pod is not serving, by id.
    withheld: BTreeMap<MemberId, Member>,
    /// Leases that describe no valid member: name -> why.
    skipped: BTreeMap<String, String>,
    /// Lease name -> the id of the member it describes.
    ids: BTreeMap<String, MemberId>,
    /// Lease name -> the name of the Pod that owns it.
    pods: BTreeMap<String, String>,
    /// Pod name -> the Leases it owns (a Pod recreated under its name may own two for a while).
    by_pod: BTreeMap<String, BTreeSet<String>>,
    /// Leases to look at again on the next refresh.
    pending: BTreeSet<String>,
    /// Pod name -> the EndpointSlices that list it (when the serving Pods come from
    /// [`Self::slice_event`]).
    pod_slices: BTreeMap<String, BTreeSet<String>>,
    /// Pods whose endpoints changed since [`Self::recompute`].
    touched: BTreeSet<String>,
}

/// The Pod endpoints of `slice`, sorted by Pod name (each Pod's in the slice's order): two
/// allocations at most, where a map of Pods cost one per Pod (this runs for every slice event
/// on every member).
fn by_pod(slice: Option<&EndpointSlice>) -> Vec<(&str, &Endpoint)> {
    let mut pods: Vec<(&str, &Endpoint)> = slice
        .iter()
        .flat_map(|s| &s.endpoints)
        .filter_map(|e| {
            e.target_ref
                .as_ref()
                .filter(|r| r.kind == "Pod")
                .map(|r| (r.name.as_str(), e))
        })
        .collect();
    // Stable: a Pod's endpoints stay in the slice's order.
    pods.sort_by(|a, b| a.0.cmp(b.0));
    pods
}

/// [`by_pod`]'s entries grouped by Pod, in Pod name order.
type PodEndpoints<'a> = (&'a str, &'a [(&'a str, &'a Endpoint)]);

fn pods<'a>(sorted: &'a [(&'a str, &'a Endpoint)]) -> impl Iterator<Item = PodEndpoints<'a>> {
    sorted.chunk_by(|a, b| a.0 == b.0).map(|g| (g[0].0, g))
}

impl Listing {
    /// Nothing listed yet; `with_service`: members are listed only while their Pod serves.
    pub fn new(with_service: bool) -> Self {
        Self {
            serving: with_service.then(Serving::new),
            ..Self::default()
        }
    }

    /// The Lease `name` was added, changed or deleted.
    pub fn lease_changed(&mut self, name: &str) {
        self.pending.insert(name.to_string());
    }

    /// Any Lease may have changed (a relist): every Lease of `index` and every one listed is
    /// looked at again.
    pub fn all_changed(&mut self, index: &MemberIndex) {
        self.pending.extend(index.names().cloned());
        self.pending.extend(self.ids.keys().cloned());
        self.pending.extend(self.skipped.keys().cloned());
    }

    /// The EndpointSlice `name` changes from `before` to `after` (`None`: absent): the Pods
    /// whose endpoints in it differ are marked, for [`Self::recompute`] once the change is in
    /// the slices. O(the slice's endpoints), with no copy of them.
    pub fn slice_event(
        &mut self,
        name: &str,
        before: Option<&EndpointSlice>,
        after: Option<&EndpointSlice>,
    ) {
        if self.serving.is_none() {
            return;
        }
        let (before, after) = (by_pod(before), by_pod(after));
        let before: Vec<PodEndpoints<'_>> = pods(&before).collect();
        let after: Vec<PodEndpoints<'_>> = pods(&after).collect();
        // Both in Pod name order: merged.
        let (mut i, mut j) = (0, 0);
        while i < before.len() || j < after.len() {
            let order = match (before.get(i), after.get(j)) {
                (Some((b, _)), Some((a, _))) => b.cmp(a),
                (Some(_), None) => std::cmp::Ordering::Less,
                _ => std::cmp::Ordering::Greater,
            };
            match order {
                // Gone from this slice.
                std::cmp::Ordering::Less => {
                    let pod = before[i].0;
                    i += 1;
                    self.touched.insert(pod.to_string());
                    if let Some(slices) = self.pod_slices.get_mut(pod) {
                        slices.remove(name);
                        if slices.is_empty() {
                            self.pod_slices.remove(pod);
                        }
                    }
                }
                // New in this slice.
                std::cmp::Ordering::Greater => {
                    let pod = after[j].0;
                    j += 1;
                    self.touched.insert(pod.to_string());
                    self.pod_slices
                        .entry(pod.to_string())
                        .or_default()
                        .insert(name.to_string());
                }
                std::cmp::Ordering::Equal => {
                    let ((pod, was), (_, is)) = (before[i], after[j]);
                    (i, j) = (i + 1, j + 1);
                    if was.len() != is.len() || was.iter().zip(is).any(|(w, i)| w.1 != i.1) {
                        self.touched.insert(pod.to_string());
                    }
                }
            }
        }
    }

    /// A relist of the EndpointSlices: exactly `slices` (by name) exist; every Pod is computed
    /// again.
    pub fn slices_replaced(&mut self, slices: &BTreeMap<String, EndpointSlice>) {
        let Some(serving) = &self.serving else {
            return;
        };
        self.touched.extend(serving.keys().cloned());
        self.pod_slices.clear();
        for (name, slice) in slices {
            for (pod, _) in pods(&by_pod(Some(slice))) {
                self.pod_slices
                    .entry(pod.to_string())
                    .or_default()
                    .insert(name.clone());
            }
        }
        self.touched.extend(self.pod_slices.keys().cloned());
        self.recompute(slices);
    }

    /// Computes the serving state of the Pods marked by [`Self::slice_event`] again from their
    /// endpoints in `slices` (every slice, by name, after the change; read in that order, as
    /// [`super::members::serving_pods`] reads them), and marks the Leases of those whose state
    /// changed.
    pub fn recompute(&mut self, slices: &BTreeMap<String, EndpointSlice>) {
        for pod in std::mem::take(&mut self.touched) {
            let endpoints = self
                .pod_slices
                .get(&pod)
                .into_iter()
                .flatten()
                .filter_map(|s| slices.get(s))
                .flat_map(|s| &s.endpoints)
                .filter(|e| e.target_ref.as_ref().is_some_and(|r| r.name == pod));
            let now = serving_of(endpoints).remove(&pod);
            let Some(serving) = self.serving.as_mut() else {
                return;
            };
            let changed = match now {
                Some(now) => serving.insert(pod.clone(), now.clone()) != Some(now),
                None => serving.remove(&pod).is_some(),
            };
            if changed && let Some(leases) = self.by_pod.get(&pod) {
                self.pending.extend(leases.iter().cloned());
            }
        }
    }

    /// The Pods serving now (no effect without a Service), given whole: the Leases of every
    /// Pod whose serving state changed are looked at again.
    pub fn set_serving(&mut self, now: Serving) {
        let Some(before) = self.serving.as_mut() else {
            return;
        };
        let mut changed: Vec<&String> = Vec::new();
        let (mut a, mut b) = (before.iter().peekable(), now.iter().peekable());
        loop {
            match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some((pa, _)), None) => {
                    changed.push(pa);
                    a.next();
                }
                (None, Some((pb, _))) => {
                    changed.push(pb);
                    b.next();
                }
                (Some((pa, sa)), Some((pb, sb))) => match pa.cmp(pb) {
                    std::cmp::Ordering::Less => {
                        changed.push(pa);
                        a.next();
                    }
                    std::cmp::Ordering::Greater => {
                        changed.push(pb);
                        b.next();
                    }
                    std::cmp::Ordering::Equal => {
                        if sa != sb {
                            changed.push(pa);
                        }
                        a.next();
                        b.next();
                    }
                },
            }
        }
        for pod in changed {
            if let Some(leases) = self.by_pod.get(pod) {
                self.pending.extend(leases.iter().cloned());
            }
        }
        *before = now;
    }

    /// Looks at the changed Leases again, from `index`, and says what changed.
    pub fn refresh(&mut self, index: &MemberIndex) -> ListingDelta {
        let mut delta = ListingDelta::default();
        // Each touched id with whether (and as what) it was listed before this refresh.
        let mut before: BTreeMap<MemberId, Option<Arc<Member>>> = BTreeMap::new();
        for name in std::mem::take(&mut self.pending) {
            if let Some(id) = self.ids.remove(&name) {
                let was = self.listed.remove(&id);
                before.entry(id.clone()).or_insert(was);
                delta.withheld_changed |= self.withheld.remove(&id).is_some();
            }
            self.skipped.remove(&name);
            if let Some(pod) = self.pods.remove(&name)
                && let Some(leases) = self.by_pod.get_mut(&pod)
            {
                leases.remove(&name);
                if leases.is_empty() {
                    self.by_pod.remove(&pod);
                }
            }
            match index.entry_of(&name) {
                None => {}
                Some(Entry::Skipped(why)) => {
                    self.skipped.insert(name, why.clone());
                }
                Some(Entry::Member(member, pod)) => {
                    before
                        .entry(member.id.clone())
                        .or_insert_with(|| self.listed.get(&member.id).cloned());
                    self.ids.insert(name.clone(), member.id.clone());
                    if let Some((pod, _)) = pod {
                        self.pods.insert(name.clone(), pod.clone());
                        self.by_pod.entry(pod.clone()).or_default().insert(name);
                    }
                    let serving = match &self.serving {
                        None => Some(None),
                        Some(serving) => pod
                            .as_ref()
                            .and_then(|(p, uid)| serving.get(p).filter(|s| is_same_pod(uid, s)))
                            .map(|s| Some(&s.zone)),
                    };
                    match serving {
                        None => {
                            self.withheld.insert(member.id.clone(), member.clone());
                            delta.withheld_changed = true;
                        }
                        Some(zone) => {
                            let mut member = member.clone();
                            if member.zone.is_none()
                                && let Some(zone) = zone
                            {
                                member.zone.clone_from(zone);
                            }
                            self.listed.insert(member.id.clone(), Arc::new(member));
                        }
                    }
                }
            }
        }
        for (id, was) in before {
            match (was, self.listed.get(&id)) {
                (None, None) => {}
                (Some(_), None) => delta.left.push(id),
                (Some(was), Some(now)) if *was == **now => {
                    // The same description: keep sharing the one already published.
                    self.listed.insert(id, was);
                }
                (_, Some(now)) => delta.upserts.push(now.clone()),
            }
        }
        delta
    }

    /// The listed members, by id.
    pub fn members(&self) -> impl Iterator<Item = &Arc<Member>> {
        self.listed.values()
    }

    /// The members whose Lease is valid and whose Pod is not serving, by id.
    pub fn withheld(&self) -> Vec<Member> {
        self.withheld.values().cloned().collect()
    }

    /// Whether this is what [`MemberIndex::listed`] gives from scratch, and the serving Pods
    /// are `serving` when given (what [`super::members::serving_pods`] says of the slices the
    /// node holds): the simulator checks every node's listing of a small cluster this way
    /// after each refresh.
    pub fn check(&self, index: &MemberIndex, serving: Option<&Serving>) -> Result<(), String> {
        if let Some(serving) = serving
            && self.serving.as_ref() != Some(serving)
        {
            return Err(format!(
                "incremental serving Pods {:?} but from scratch {serving:?}",
                self.serving
            ));
        }
        let scratch = index.listed(self.serving.as_ref());
        let listed: Vec<&Member> = self.listed.values().map(|m| &**m).collect();
        if listed.iter().copied().ne(scratch.members.iter()) {
            return Err(format!(
                "incremental listing {:?} but from scratch {:?}",
                self.listed.keys().collect::<Vec<_>>(),
                scratch.members.iter().map(|m| &m.id).collect::<Vec<_>>()
            ));
        }
        if self
            .skipped
            .iter()
            .ne(scratch.skipped.iter().map(|(n, w)| (n, w)))
        {
            return Err(format!(
                "incremental skipped {:?} but from scratch {:?}",
                self.skipped, scratch.skipped
            ));
        }
        Ok(())
    }

    /// The Leases that describe no valid member, with why, by name.
    pub fn skipped(&self) -> &BTreeMap<String, String> {
        &self.skipped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    use crate::kubernetes::api::{Lease, ObjectMeta, ObjectReference};
    use crate::kubernetes::members::{ServingPod, lease_name, member_lease, serving_pods};

    const CLUSTER: &str = "c";

    fn member(i: u32, zone: bool, kinds: &str) -> Member {
        let mut m = Member::new(
            MemberId::parse(format!("10-0-0-{i}-4000-1-{i:08x}")).unwrap(),
            format!("10.0.0.{i}:4000"),
            kinds.split(',').filter(|k| !k.is_empty()),
        );
        if zone {
            m.zone = Some("z-lease".into());
        }
        m
    }

    fn lease(m: &Member, pod: Option<(&str, &str)>) -> Lease {
        let pod = pod.map(|(name, uid)| ObjectReference {
            kind: "Pod".into(),
            namespace: "ns".into(),
            name: name.into(),
            uid: uid.into(),
        });
        member_lease(CLUSTER, "ns", m, Duration::from_secs(15), 0, pod)
    }

    /// Checks the listing against the index's from-scratch list.
    fn check(listing: &mut Listing, index: &MemberIndex, published: &mut Vec<Arc<Member>>) {
        let delta = listing.refresh(index);
        for id in &delta.left {
            let i = published.binary_search_by(|m| m.id.cmp(id)).unwrap();
            published.remove(i);
        }
        for m in &delta.upserts {
            match published.binary_search_by(|x| x.id.cmp(&m.id)) {
                Ok(i) => {
                    assert_ne!(*published[i], **m, "an upsert of an unchanged member");
                    published[i] = m.clone();
                }
                Err(i) => published.insert(i, m.clone()),
            }
        }
        let scratch = index.listed(listing.serving.as_ref());
        let listed: Vec<Member> = listing.members().map(|m| (**m).clone()).collect();
        assert_eq!(listed, scratch.members);
        let patched: Vec<Member> = published.iter().map(|m| (**m).clone()).collect();
        assert_eq!(patched, scratch.members, "the deltas do not add up");
        let skipped: Vec<(String, String)> = listing
            .skipped()
            .iter()
            .map(|(n, w)| (n.clone(), w.clone()))
            .collect();
        assert_eq!(skipped, scratch.skipped);
        if listing.serving.is_some() {
            let all = index.listed(None).members;
            let withheld: Vec<Member> = all
                .into_iter()
                .filter(|m| scratch.members.iter().all(|x| x.id != m.id))
                .collect();
            assert_eq!(listing.withheld(), withheld);
        }
    }

    /// An endpoint of one of a few Pods, in any state the API allows.
    fn endpoint(rng: &mut Rng) -> Endpoint {
        let flag = |rng: &mut Rng| [None, Some(false), Some(true)][rng.below(3) as usize];
        Endpoint {
            addresses: vec!["10.1.0.1".into()],
            ready: flag(rng),
            serving: flag(rng),
            terminating: [None, None, Some(false), Some(true)][rng.below(4) as usize],
            zone: [None, Some("z1".to_string())][rng.below(2) as usize].clone(),
            target_ref: Some(ObjectReference {
                kind: "Pod".into(),
                namespace: "ns".into(),
                name: format!("pod-{}", rng.below(10)),
                uid: ["", "uid-1", "uid-2"][rng.below(3) as usize].into(),
            }),
        }
    }

    /// A small deterministic generator (xorshift), so a failing history can be replayed.
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % n
        }
    }

    #[test]
    fn the_incremental_listing_is_always_the_from_scratch_one() {
        for seed in 1..=60u64 {
            let with_service = seed % 3 != 0;
            // The serving Pods given whole, or (every other seed with a Service) computed
            // from EndpointSlices one slice at a time.
            let by_slice = with_service && seed % 2 == 0;
            let mut slices: BTreeMap<String, EndpointSlice> = BTreeMap::new();
            let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut index = MemberIndex::new(CLUSTER);
            let mut listing = Listing::new(with_service);
            let mut published = Vec::new();
            let mut leases: BTreeMap<String, Lease> = BTreeMap::new();
            let mut serving = Serving::new();
            for step in 0..200 {
                let i = rng.below(12) as u32;
                let pod = format!("pod-{}", rng.below(10));
                match rng.below(9) {
                    // A member's Lease written (a new one, or its description changed).
                    0..=2 => {
                        let kinds = ["user", "user,cart", ""][rng.below(3) as usize];
                        let m = member(i, rng.below(2) == 0, kinds);
                        let owner = (rng.below(4) != 0).then_some((pod.as_str(), "uid-1"));
                        let l = lease(&m, owner);
                        index.upsert(&l);
                        listing.lease_changed(&l.meta.name);
                        leases.insert(l.meta.name.clone(), l);
                    }
                    // A Lease that describes no valid member under its name.
                    3 => {
                        let m = member(i, false, "user");
                        let mut l = lease(&m, None);
                        l.meta.name = format!("{}-copy", lease_name(CLUSTER, &m.id));
                        index.upsert(&l);
                        listing.lease_changed(&l.meta.name);
                        leases.insert(l.meta.name.clone(), l);
                    }
                    // A Lease deleted.
                    4 => {
                        if let Some(name) = leases.keys().nth(rng.below(20) as usize).cloned() {
                            leases.remove(&name);
                            index.remove(&name);
                            listing.lease_changed(&name);
                        }
                    }
                    // A slice written or deleted.
                    5..=6 if by_slice => {
                        let name = format!("s{}", rng.below(3));
                        if rng.below(5) == 0 {
                            listing.slice_event(&name, slices.get(&name), None);
                            slices.remove(&name);
                            listing.recompute(&slices);
                        } else {
                            let endpoints = (0..rng.below(5)).map(|_| endpoint(&mut rng)).collect();
                            let slice = EndpointSlice {
                                meta: ObjectMeta {
                                    name: name.clone(),
                                    ..Default::default()
                                },
                                endpoints,
                            };
                            listing.slice_event(&name, slices.get(&name), Some(&slice));
                            slices.insert(name, slice);
                            listing.recompute(&slices);
                        }
                    }
                    // A Pod's serving state or zone changed.
                    5..=6 => {
                        match rng.below(4) {
                            0 => {
                                serving.remove(&pod);
                            }
                            1 => {
                                serving.insert(
                                    pod.clone(),
                                    ServingPod {
                                        uid: "uid-2".into(),
                                        zone: None,
                                    },
                                );
                            }
                            z => {
                                serving.insert(
                                    pod.clone(),
                                    ServingPod {
                                        uid: ["", "uid-1"][rng.below(2) as usize].into(),
                                        zone: Some(format!("z{z}")),
                                    },
                                );
                            }
                        }
                        listing.set_serving(serving.clone());
                    }
                    // A relist: the index replaced at once.
                    7 => {
                        if rng.below(2) == 0 {
                            let gone = leases.keys().next().cloned();
                            if let Some(gone) = gone {
                                leases.remove(&gone);
                            }
                        }
                        index.replace_all(leases.values());
                        listing.all_changed(&index);
                        if by_slice {
                            if rng.below(2) == 0 {
                                slices.pop_first();
                            }
                            listing.slices_replaced(&slices);
                        }
                    }
                    // Nothing changed: a refresh hands out nothing.
                    _ => {
                        let delta = listing.refresh(&index);
                        assert!(delta.is_empty(), "seed {seed} step {step}: {delta:?}");
                    }
                }
                check(&mut listing, &index, &mut published);
                if by_slice {
                    assert_eq!(listing.serving, Some(serving_pods(slices.values())));
                }
            }
        }
    }

    #[test]
    fn an_unchanged_member_is_shared_not_copied() {
        let mut index = MemberIndex::new(CLUSTER);
        let mut listing = Listing::new(false);
        let (a, b) = (member(1, false, "user"), member(2, false, "user"));
        for m in [&a, &b] {
            let l = lease(m, None);
            index.upsert(&l);
            listing.lease_changed(&l.meta.name);
        }
        let delta = listing.refresh(&index);
        assert_eq!(delta.upserts.len(), 2);
        let first = listing.members().next().unwrap().clone();
        // A relist that changed nothing: no delta, and the member is the same allocation.
        listing.all_changed(&index);
        assert!(listing.refresh(&index).is_empty());
        assert!(Arc::ptr_eq(&first, listing.members().next().unwrap()));
    }
}
