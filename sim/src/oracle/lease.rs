//! The lease oracle: when a registration may and must disappear, judged from the requests the
//! registry accepted (recorded by the observer in front of it), never from its own bookkeeping.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use madsim::time::Instant;
use shoal::placement::hash;
use shoal::{ClusterTopology, MemberId};

use super::{Bounds, POLL};
use crate::record::Recorder;

/// One registration, as the harness saw the registry accept it.
#[derive(Debug)]
struct Registration {
    /// A member (listed in the topology), not a client.
    member: bool,
    /// Where it said it is reached.
    address: String,
    /// The last join or heartbeat the registry accepted.
    renewed_at: Instant,
    /// When a leave was accepted.
    left_at: Option<Instant>,
    /// The newer incarnation that joined at this one's address (not its own leave).
    superseded_by: Option<MemberId>,
    /// How far registry stalls since `renewed_at` pushed the expiry out: at least, at most.
    extended: (Duration, Duration),
    /// Kubernetes, a cluster migrating between heartbeat settings: whether its process uses
    /// sharded heartbeats (`None`: the cluster's setting, [`Bounds::monitors`]).
    sharded: Option<bool>,
    /// Kubernetes: its zone (its own, else its Pod's endpoint's), where monitors are spread.
    zone: Option<String>,
}

impl Registration {
    /// A join of a member (or a client) at `address`, accepted at `at`.
    fn new(member: bool, address: String, at: Instant) -> Self {
        Self {
            member,
            address,
            renewed_at: at,
            left_at: None,
            superseded_by: None,
            extended: (Duration::ZERO, Duration::ZERO),
            sharded: None,
            zone: None,
        }
    }
}

/// What the lease oracle asks the cluster about the nodes (the faults the harness applied).
pub struct Judge<'a> {
    /// Since when a member's path to the registry has been undisturbed (`None`: disturbed now).
    pub healthy_since: &'a dyn Fn(&MemberId) -> Option<Instant>,
    /// Whether the node that registered an id cannot be held to announcing its own expiry
    /// (its last accepted renewal at the given instant): crashed, paused, or on a wild clock.
    pub excused: &'a dyn Fn(&MemberId, Instant) -> bool,
}

/// Registrations of the current registry run and the topology it last published.
#[derive(Debug, Default)]
pub struct Leases {
    /// When each node announced it lost its registration, by the id it lost (all runs).
    lost: BTreeMap<MemberId, Instant>,
    /// Losses announced since the last poll, judged at the next one.
    fresh_losses: Vec<(MemberId, Instant)>,
    /// Ids the registry removed (expired or left), in any run: they must never come back.
    removed: BTreeSet<MemberId>,
    run: u64,
    registrations: BTreeMap<MemberId, Registration>,
    /// Member registrations not yet left or superseded, by address (a join at an address
    /// supersedes the ones there in O(log n)).
    by_address: BTreeMap<String, BTreeSet<MemberId>>,
    published: Option<Arc<ClusterTopology>>,
    /// Membership changes the backend accepted or made, all runs (joins and new descriptions of
    /// members, leaves, removals): the load budget's allowance.
    pub changes: u64,
    /// No listed member can be late before this (renewals only push deadlines later, so an
    /// old value is early, never late; a leave pulls it in).
    next_deadline: Option<Instant>,
    /// Sharded heartbeats: the monitors of each shard as the design specifies them for the
    /// topology last checked (its version), with when each became one.
    monitors: Option<(u64, ShardMonitors)>,
    /// Ids the harness gave up on (start attempts that failed), all runs.
    abandoned: BTreeSet<MemberId>,
}

/// For each shard, its monitors with when each became one.
type ShardMonitors = Vec<Vec<(MemberId, Instant)>>;

/// The design's shard of member `id` (docs/providers/kubernetes.md), from the placement's
/// documented hash primitives, not from the provider's code.
fn spec_shard(id: &MemberId, shards: u32) -> u32 {
    (hash::key_hash("shoal.io/shard", id.as_str()) % u64::from(shards.max(1))) as u32
}

/// Members with their zones (`None`: no zone, which counts as one zone of its own).
pub(crate) type Zoned<'a> = [(&'a MemberId, Option<&'a str>)];

/// The design's monitors of each of `shards` shards among `ids`.
fn spec_monitors(ids: &Zoned<'_>, shards: u32, k: u32) -> Vec<Vec<MemberId>> {
    (0..shards)
        .map(|s| spec_shard_monitors(ids, s, k))
        .collect()
}

/// The design's monitors of shard `shard` among `ids` (docs/providers/kubernetes.md): in
/// order of rendezvous weight (ties: the higher id), one member of each zone not yet taken,
/// up to `k`; then, if fewer, the next by weight whatever their zone; highest weight first.
fn spec_shard_monitors(ids: &Zoned<'_>, shard: u32, k: u32) -> Vec<MemberId> {
    let key = hash::key_hash("shoal.io/monitor", &shard.to_string());
    let mut ranked: Vec<(u64, &MemberId, Option<&str>)> = ids
        .iter()
        .map(|(id, zone)| {
            (
                hash::weight(key, hash::member_hash(id.as_str())),
                *id,
                *zone,
            )
        })
        .collect();
    ranked.sort_by(|a, b| (b.0, b.1).cmp(&(a.0, a.1)));
    let k = k as usize;
    let mut zones_taken: Vec<Option<&str>> = Vec::new();
    let mut chosen: Vec<(u64, &MemberId)> = Vec::new();
    for (w, id, zone) in &ranked {
        if chosen.len() < k && !zones_taken.contains(zone) {
            zones_taken.push(*zone);
            chosen.push((*w, id));
        }
    }
    for (w, id, _) in &ranked {
        if chosen.len() >= k {
            break;
        }
        if !chosen.iter().any(|(_, c)| c == id) {
            chosen.push((*w, id));
        }
    }
    chosen.sort_by(|a, b| b.cmp(a));
    chosen.into_iter().map(|(_, id)| id.clone()).collect()
}

/// The design's monitors of member `id`'s shard among `ids` (the members with sharded
/// heartbeats, `(shards, monitors)`).
pub(crate) fn spec_monitors_of(
    id: &MemberId,
    ids: &Zoned<'_>,
    (shards, k): (u32, u32),
) -> Vec<MemberId> {
    spec_shard_monitors(ids, spec_shard(id, shards), k)
}

impl Leases {
    /// Sharded heartbeats: the monitors of each shard for `t`, keeping when each became one.
    fn update_monitors(&mut self, t: &ClusterTopology, shards: u32, k: u32, now: Instant) {
        if self
            .monitors
            .as_ref()
            .is_some_and(|(v, _)| *v == t.version())
        {
            return;
        }
        // Only members with sharded heartbeats monitor (a cluster migrating between settings).
        let ids: Vec<(&MemberId, Option<&str>)> = t
            .member_ids()
            .filter_map(|id| match self.registrations.get(id) {
                Some(r) if r.sharded == Some(false) => None,
                r => Some((id, r.and_then(|r| r.zone.as_deref()))),
            })
            .collect();
        let before = self.monitors.take().map(|(_, m)| m).unwrap_or_default();
        let after = spec_monitors(&ids, shards, k)
            .into_iter()
            .enumerate()
            .map(|(s, monitors)| {
                monitors
                    .into_iter()
                    .map(|id| {
                        let since = before
                            .get(s)
                            .and_then(|was| was.iter().find(|(m, _)| *m == id))
                            .map_or(now, |(_, since)| *since);
                        (id, since)
                    })
                    .collect()
            })
            .collect();
        self.monitors = Some((t.version(), after));
    }

    /// A registry run started with empty state.
    pub fn started(&mut self, run: u64) {
        self.run = run;
        self.registrations.clear();
        self.by_address.clear();
        self.published = None;
        self.next_deadline = None;
        self.monitors = None;
    }

    /// Sharded heartbeats: the monitors of `id`'s shard (of `shards`) as last checked, each
    /// with when it became one.
    pub fn monitors_since(&self, id: &MemberId, shards: u32) -> Option<Vec<(MemberId, Instant)>> {
        let (_, monitors) = self.monitors.as_ref()?;
        monitors.get(spec_shard(id, shards) as usize).cloned()
    }

    /// The harness gave up on `id` (a failed start attempt).
    pub fn abandoned(&mut self, id: MemberId) {
        self.abandoned.insert(id);
    }

    /// A join of `id` at `address` accepted at `at` that is stale: the harness abandoned `id`
    /// (its start attempt timed out and the process started again under another id) and a
    /// live member is registered there (the join landed late). The stale one is then the one
    /// to go, as soon as the live one can remove it, rather than superseding it. Whether the
    /// join was taken as stale.
    pub fn stale_join(&mut self, id: &MemberId, address: &str, at: Instant) -> bool {
        if !self.abandoned.contains(id) {
            return false;
        }
        let Some(current) = self
            .by_address
            .get(address)
            .and_then(|there| there.iter().rev().find(|other| *other != id))
            .cloned()
        else {
            return false;
        };
        self.changes += 1;
        let mut stale = Registration::new(true, address.to_string(), at);
        stale.left_at = Some(at);
        stale.superseded_by = Some(current);
        self.registrations.insert(id.clone(), stale);
        true
    }

    /// A join was accepted. A member joining at the address of another member id supersedes
    /// it: that one is gone at once, as after a leave.
    pub fn joined(&mut self, id: MemberId, member: bool, address: String, at: Instant) {
        if member {
            self.changes += 1;
            let there = self.by_address.entry(address.clone()).or_default();
            for other in std::mem::take(there) {
                if other == id {
                    continue;
                }
                // (A ghost a restore brought back is superseded already: it may go at
                // any time and must go within its TTL, which a join does not shorten.)
                if let Some(r) = self.registrations.get_mut(&other)
                    && r.left_at.is_none()
                    && r.superseded_by.is_none()
                {
                    r.left_at = Some(at);
                    r.superseded_by = Some(id.clone());
                    self.next_deadline = None;
                }
            }
            self.by_address
                .entry(address.clone())
                .or_default()
                .insert(id.clone());
        }
        self.registrations
            .insert(id, Registration::new(member, address, at));
    }

    /// Kubernetes: `id`'s zone, where the design spreads a shard's monitors.
    pub fn zone_of(&mut self, id: &MemberId, zone: Option<String>) {
        if let Some(r) = self.registrations.get_mut(id)
            && r.zone != zone
        {
            r.zone = zone;
            // Chosen again at the next check, keeping when each monitor became one.
            if let Some((version, _)) = &mut self.monitors {
                *version = u64::MAX;
            }
        }
    }

    /// Kubernetes: `id`'s zone as the oracle knows it.
    pub fn zone(&self, id: &MemberId) -> Option<&str> {
        self.registrations.get(id).and_then(|r| r.zone.as_deref())
    }

    /// Kubernetes, a cluster migrating between heartbeat settings: the process that joined as
    /// `id` uses sharded heartbeats or renews its own Lease.
    pub fn heartbeats_of(&mut self, id: &MemberId, sharded: bool) {
        if let Some(r) = self.registrations.get_mut(id) {
            r.sharded = Some(sharded);
        }
    }

    /// Whether `id` is removed by the monitors of its shard (sharded heartbeats), not by any
    /// member.
    pub fn is_sharded(&self, id: &MemberId, bounds: &Bounds) -> bool {
        bounds.monitors.is_some()
            && self
                .registrations
                .get(id)
                .is_none_or(|r| r.sharded != Some(false))
    }

    /// A heartbeat was accepted.
    pub fn renewed(&mut self, id: &MemberId, at: Instant) {
        if let Some(r) = self.registrations.get_mut(id) {
            r.renewed_at = at;
            r.extended = (Duration::ZERO, Duration::ZERO);
        }
    }

    /// The registry stalled: every registration's expiry moved out by between `at_least` and
    /// `at_most`.
    pub fn stalled(&mut self, at_least: Duration, at_most: Duration) {
        for r in self.registrations.values_mut() {
            r.extended.0 += at_least;
            r.extended.1 += at_most;
        }
        self.next_deadline = None;
    }

    /// The backend restarted with its data and started every lease's TTL over (etcd): every
    /// registration counts as renewed now.
    pub fn refreshed(&mut self, at: Instant, held: impl Fn(&MemberId) -> bool) {
        for (id, r) in self.registrations.iter_mut() {
            if r.left_at.is_none() && held(id) {
                r.renewed_at = at;
                r.extended = (Duration::ZERO, Duration::ZERO);
            }
        }
        self.next_deadline = None;
    }

    /// The newest live registration at each address (no leave accepted).
    pub fn live_by_address(&self) -> BTreeMap<String, MemberId> {
        let mut newest: BTreeMap<String, MemberId> = BTreeMap::new();
        for (id, r) in &self.registrations {
            if r.member && r.left_at.is_none() {
                let n = newest
                    .entry(r.address.clone())
                    .or_insert_with(|| id.clone());
                if *id > *n {
                    *n = id.clone();
                }
            }
        }
        newest
    }

    /// The backend was restored from a snapshot that holds `id` at `address`: registered
    /// again from `at` (its lease's TTL starts over), even if the backend had removed it
    /// since. `superseded_by`: a newer incarnation lives at its address, so it is a ghost that
    /// process may delete at any time (it still expires within its TTL if none does).
    pub fn restored(
        &mut self,
        id: MemberId,
        address: String,
        at: Instant,
        superseded_by: Option<MemberId>,
    ) {
        self.removed.remove(&id);
        self.changes += 1;
        self.by_address
            .entry(address.clone())
            .or_default()
            .insert(id.clone());
        let mut r = Registration::new(true, address, at);
        r.superseded_by = superseded_by;
        self.registrations.insert(id, r);
    }

    /// A leave was accepted.
    pub fn left(&mut self, id: &MemberId, at: Instant) {
        if let Some(r) = self.registrations.get_mut(id) {
            if r.left_at.is_none() {
                self.changes += 1;
            }
            r.left_at.get_or_insert(at);
            if let Some(there) = self.by_address.get_mut(&r.address) {
                there.remove(id);
            }
        }
        self.next_deadline = None;
    }

    /// The node registered as `id` announced it lost its registration.
    pub fn lost(&mut self, id: &MemberId, at: Instant) {
        if let std::collections::btree_map::Entry::Vacant(e) = self.lost.entry(id.clone()) {
            e.insert(at);
            self.fresh_losses.push((id.clone(), at));
        }
    }

    /// A member that announces it lost its registration while the backend still holds it and
    /// its path to the backend has been healthy for a whole window gave up a live membership:
    /// its actors were deactivated and its identities moved for nothing (a keep-alive loop
    /// that waits too long between renewals, a member that judges its own key gone from a view
    /// that lags its own write).
    fn judge_losses(
        &mut self,
        t: &ClusterTopology,
        bounds: &Bounds,
        judge: &Judge<'_>,
        rec: &Recorder,
    ) {
        let backend = bounds.backend;
        for (id, at) in std::mem::take(&mut self.fresh_losses) {
            let Some(reg) = self.registrations.get(&id) else {
                continue;
            };
            if reg.left_at.is_some()
                || t.member(&id).is_none()
                || (judge.excused)(&id, reg.renewed_at)
            {
                continue;
            }
            if let Some(h) = (judge.healthy_since)(&id) {
                let healthy = at.saturating_duration_since(h);
                if healthy >= bounds.healthy_window() + POLL {
                    rec.violation_once(
                        format!("false loss {id}"),
                        format!(
                            "lease: {id} announced MembershipLost although the {backend} still holds its registration and its path there had been healthy for {} ms (window {} ms): a live, connected member must keep its membership",
                            healthy.as_millis(),
                            bounds.healthy_window().as_millis()
                        ),
                    );
                }
            }
        }
    }

    /// The registry of run `run` publishes `t` at `now` (polled every [`POLL`]).
    pub fn published(
        &mut self,
        run: u64,
        t: &Arc<ClusterTopology>,
        now: Instant,
        bounds: &Bounds,
        judge: &Judge<'_>,
        rec: &Recorder,
    ) {
        if run != self.run {
            return;
        }
        if !self.fresh_losses.is_empty() {
            self.judge_losses(t, bounds, judge, rec);
        }
        let ms = |d: Duration| d.as_millis();
        let previous = self.published.replace(t.clone());
        if previous.as_ref().is_some_and(|p| Arc::ptr_eq(p, t)) {
            // Nothing published since the last poll: only lateness can have changed.
            if self.next_deadline.is_none_or(|d| now >= d) {
                self.check_listed(t, now, bounds, judge, rec);
            }
            return;
        }
        let backend = bounds.backend;
        let before: BTreeSet<&MemberId> = previous.iter().flat_map(|p| p.member_ids()).collect();
        let after: BTreeSet<&MemberId> = t.member_ids().collect();
        for id in before.difference(&after) {
            self.changes += 1;
            self.removed.insert((*id).clone());
            let Some(reg) = self.registrations.get(*id) else {
                continue;
            };
            if reg.left_at.is_some() || reg.superseded_by.is_some() {
                continue;
            }
            // The member must have told its application before the registry could expire it
            // (judged when the expiry is seen, at most one poll after it was published).
            if !self.lost.contains_key(*id) && !(judge.excused)(id, reg.renewed_at) {
                rec.violation_once(
                    format!("unaware {id}"),
                    format!(
                        "lease: the {backend} expired {id} ({} ms after accepting its last heartbeat) but that member had not announced MembershipLost: it may still be serving identities its peers now take over",
                        ms(now.saturating_duration_since(reg.renewed_at))
                    ),
                );
            }
            // An expiry, published at some moment in (now - POLL, now].
            let since_renewal = now.saturating_duration_since(reg.renewed_at);
            if since_renewal < bounds.ttl_min() + reg.extended.0 {
                rec.violation_once(
                    format!("early expiry {id} {}", t.version()),
                    format!(
                        "lease: {id} was expired {} ms after the {backend} accepted its last heartbeat (TTL {} ms, at least {} ms on a fast clock, plus at least {} ms of {backend} stalls since)",
                        ms(since_renewal),
                        ms(bounds.ttl),
                        ms(bounds.ttl_min()),
                        ms(reg.extended.0)
                    ),
                );
            }
            if let Some(h) = (judge.healthy_since)(id) {
                let healthy = now.saturating_duration_since(h);
                if healthy >= bounds.healthy_window() + POLL {
                    rec.violation_once(
                        format!("false expiry {id} {}", t.version()),
                        format!(
                            "lease: {id} was expired although its path to the {backend} had been healthy for {} ms (a live, connected member must never expire; window {} ms)",
                            ms(healthy),
                            ms(bounds.healthy_window())
                        ),
                    );
                }
            }
        }
        for id in after.difference(&before) {
            if self.removed.contains(*id) {
                rec.violation_once(
                    format!("resurrected {id}"),
                    format!(
                        "lease: {id} is listed again in v{} after the {backend} removed it: a member that was removed must come back as a new incarnation",
                        t.version()
                    ),
                );
            }
            if !self.registrations.get(*id).is_some_and(|r| r.member) {
                rec.violation_once(
                    format!("invented member {id}"),
                    format!(
                        "lease: the {backend} lists {id} in v{} but never accepted a join of it as a member in this run",
                        t.version()
                    ),
                );
            }
        }
        self.check_listed(t, now, bounds, judge, rec);
    }

    /// Every member `t` lists must still be entitled to be listed at `now`.
    fn check_listed(
        &mut self,
        t: &ClusterTopology,
        now: Instant,
        bounds: &Bounds,
        judge: &Judge<'_>,
        rec: &Recorder,
    ) {
        let ms = |d: Duration| d.as_millis();
        let backend = bounds.backend;
        let late_after = bounds.ttl_max() + bounds.sweep_allowance();
        self.next_deadline = t
            .member_ids()
            .filter_map(|id| self.registrations.get(id))
            .map(|r| match r.left_at {
                Some(left) => left + POLL * 2 + bounds.leave_allowance(r.superseded_by.is_some()),
                None => r.renewed_at + late_after + r.extended.1,
            })
            .min();
        // Where members clean each other: the two members that have been able to reach the
        // API server the longest (a member is never its own cleaner), found once per check.
        if let Some((shards, k)) = bounds.monitors {
            self.update_monitors(t, shards, k, now);
        }
        let cleaners = if bounds.cleaned_by_peers {
            self.longest_reachable(judge)
        } else {
            Vec::new()
        };
        for id in t.member_ids() {
            let Some(reg) = self.registrations.get(id) else {
                continue;
            };
            if bounds.cleaned_by_peers {
                match (&self.monitors, bounds.monitors) {
                    (Some((_, monitors)), Some((shards, _))) if reg.sharded != Some(false) => {
                        // Only the monitors of its shard clean it, each from when it became
                        // one (a new monitor ages what it finds from then on).
                        let mut by_monitor: Vec<(Instant, &MemberId)> = monitors
                            [spec_shard(id, shards) as usize]
                            .iter()
                            .filter(|(m, _)| m != id)
                            .filter_map(|(m, since)| {
                                Some(((judge.healthy_since)(m)?.max(*since), m))
                            })
                            .collect();
                        by_monitor.sort();
                        self.check_cleaned(id, reg, now, bounds, judge, &by_monitor, rec);
                    }
                    _ => self.check_cleaned(id, reg, now, bounds, judge, &cleaners, rec),
                }
                continue;
            }
            let allowance = bounds.leave_allowance(reg.superseded_by.is_some());
            match reg.left_at {
                Some(left) if now.saturating_duration_since(left) > POLL * 2 + allowance => {
                    rec.violation_once(
                        format!("listed after leave {id}"),
                        format!(
                            "lease: the {backend} still lists {id} in v{} {} ms after it accepted its leave",
                            t.version(),
                            ms(now.saturating_duration_since(left))
                        ),
                    );
                }
                Some(_) => {}
                None => {
                    let late = now.saturating_duration_since(reg.renewed_at);
                    if late > bounds.ttl_max() + bounds.sweep_allowance() + reg.extended.1 {
                        rec.violation_once(
                            format!("overdue {id}"),
                            format!(
                                "lease: the {backend} still lists {id} {} ms after it last accepted a heartbeat of it (TTL {} ms, allowed up to {} ms past it)",
                                ms(late),
                                ms(bounds.ttl),
                                ms(bounds.sweep_allowance())
                            ),
                        );
                    }
                }
            }
        }
    }

    /// The (up to) two live member registrations whose paths to the backend have been healthy
    /// the longest, earliest first.
    fn longest_reachable<'a>(&'a self, judge: &Judge<'_>) -> Vec<(Instant, &'a MemberId)> {
        let mut best: Vec<(Instant, &MemberId)> = Vec::with_capacity(3);
        for (id, r) in &self.registrations {
            if !r.member || r.left_at.is_some() {
                continue;
            }
            let Some(h) = (judge.healthy_since)(id) else {
                continue;
            };
            best.push((h, id));
            best.sort();
            best.truncate(2);
        }
        best
    }

    /// Where members delete each other's Leases (Kubernetes): a member that left on its own is
    /// gone at once; one superseded by a newer incarnation at its address is gone soon after,
    /// if that incarnation could reach the API server meanwhile; an expired one is gone within
    /// the bound after its last renewal, if some other member could reach the API server the
    /// whole time (a member that cannot renew its own Lease ages nobody: see
    /// `shoal::kubernetes::members::Liveness`).
    #[allow(clippy::too_many_arguments)]
    fn check_cleaned(
        &self,
        id: &MemberId,
        reg: &Registration,
        now: Instant,
        bounds: &Bounds,
        judge: &Judge<'_>,
        cleaners: &[(Instant, &MemberId)],
        rec: &Recorder,
    ) {
        let ms = |d: Duration| d.as_millis();
        // Since when `peer` has been able to reach the API server, from `from` on.
        let reachable_from =
            |peer: &MemberId, from: Instant| (judge.healthy_since)(peer).map(|h| h.max(from));
        if let (Some(left), None) = (reg.left_at, &reg.superseded_by) {
            if now.saturating_duration_since(left) > POLL * 2 {
                rec.violation_once(
                    format!("listed after leave {id}"),
                    format!(
                        "lease: {id} is still listed {} ms after the API server accepted the deletion of its Lease by its own node",
                        ms(now.saturating_duration_since(left))
                    ),
                );
            }
            return;
        }
        if let (Some(left), Some(by)) = (reg.left_at, &reg.superseded_by)
            && let Some(since) = reachable_from(by, left)
            && now.saturating_duration_since(since) > POLL * 2 + bounds.leave_allowance(true)
        {
            rec.violation_once(
                format!("listed after leave {id}"),
                format!(
                    "lease: {id} is still listed {} ms after {by} started at its address and could reach the API server (allowed {} ms)",
                    ms(now.saturating_duration_since(since)),
                    ms(POLL * 2 + bounds.leave_allowance(true))
                ),
            );
            return;
        }
        let window = bounds.ttl_max() + bounds.sweep_allowance() + reg.extended.1;
        // The other member that could reach the API server the longest, counted from the
        // last renewal at the earliest.
        let cleaner = cleaners
            .iter()
            .find(|(_, other)| *other != id)
            .map(|(h, other)| (*other, (*h).max(reg.renewed_at)))
            .filter(|(_, since)| now.saturating_duration_since(*since) > window);
        if let Some((cleaner, since)) = cleaner {
            rec.violation_once(
                format!("overdue {id}"),
                format!(
                    "lease: {id} is still listed {} ms after the API server last accepted a renewal of it, though {cleaner} could reach the API server for the last {} ms (TTL {} ms, allowed up to {} ms past it)",
                    ms(now.saturating_duration_since(reg.renewed_at)),
                    ms(now.saturating_duration_since(since)),
                    ms(bounds.ttl),
                    ms(window.saturating_sub(bounds.ttl))
                ),
            );
        }
    }
}
