//! Oracles: judges that are independent of the code they judge.
//!
//! They are fed what the harness itself observed (the requests the registry accepted and the
//! watch messages it sent, seen by the control planes' doors, [`crate::control`]; the faults the harness applied, kept in
//! [`crate::health`]; every topology a node applied) and check it on every observation, not by
//! sampling at the end. None of them asks the registry or a provider for its own opinion:
//!
//! * [`history`]: every topology a node holds is one the registry issued, member for member;
//!   the registry never issues two topologies under one version; from a join's version on, it
//!   lists the member as that join described it.
//! * [`lease`]: a registration disappears no sooner than a TTL after the last heartbeat the
//!   registry accepted, no later than a TTL plus a sweep, at once after an accepted leave; a
//!   member whose path to the registry was healthy is never expired; a member the registry
//!   expires has said so itself first (`MembershipLost`); an id once removed never comes back.
//! * failover (in [`crate::cluster`]): a departed member is gone from every connected survivor
//!   within a bound derived from the settings.
//! * [`events`]: every subscriber of a node's events sees each topology change the node
//!   applied, in order, or is told it lagged.
//! * [`budget`]: what the control plane served in each window of the fault phase stays within
//!   the provider's load budget.

pub mod budget;
pub mod events;
pub mod history;
pub mod lease;

pub use lease::Judge;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

// Simulated time: the oracles run only inside the simulator.
use madsim::time::Instant;
use shoal::kubernetes::KubernetesProviderConfig;
use shoal::registry::{RegistryConfig, pb};
use shoal::{ClusterTopology, MemberId};

use crate::faults::REGISTRY_MAX_DRIFT_PPM;
use crate::record::Recorder;

/// The settings the oracles derive their bounds from.
#[derive(Clone, Debug)]
pub struct Bounds {
    /// Registry TTL.
    pub ttl: Duration,
    /// Registry sweep interval.
    pub sweep: Duration,
    /// Heartbeat interval the registry asks for.
    pub heartbeat: Duration,
    /// Whether the seed runs with buggify (network delays of seconds, late sweeps): paths are
    /// then never "healthy", and sweeps may be three intervals late.
    pub degraded: bool,
    /// Whether a registry issues the topologies (the history oracle has nothing to compare
    /// with otherwise).
    pub registry: bool,
    /// How long after a newer incarnation joined at its address an old registration may still
    /// be listed (the registry replaces it at once; a Kubernetes member deletes its ghost's
    /// Lease once its own watch shows both).
    pub supersede: Duration,
    /// Whether members remove each other (Kubernetes: a member deletes the Lease it finds
    /// expired) rather than a registry on its own clock: a removal is then due only while
    /// some other member can reach the API server.
    pub cleaned_by_peers: bool,
    /// What removes members, for messages: "registry" or "API server".
    pub backend: &'static str,
    /// How much later than one delivery a watcher may learn of a change because the door
    /// dropped a message on its stream (out-of-contract seeds): until the next progress
    /// message shows it the gap and it reopens; or how long a provider may hold a change to
    /// coalesce a burst (etcd's publish interval).
    pub late_delivery: Duration,
    /// Kubernetes with sharded heartbeats, `(shards, monitors)`: a member is cleaned only by
    /// the monitors of its shard, as the design specifies them (docs/providers/kubernetes.md:
    /// the shard is FNV-1a of the id mod S, the monitors the k highest rendezvous weights over
    /// the listed members), so an expiry is due only while one of those can reach the API
    /// server, counted from when it became one.
    pub monitors: Option<(u32, u32)>,
}

impl Bounds {
    /// Bounds for a registry with `config`.
    pub fn new(config: &RegistryConfig, degraded: bool, registry: bool) -> Self {
        Self {
            registry,
            ttl: config.ttl,
            sweep: config.sweep_interval,
            heartbeat: config.heartbeat(),
            degraded,
            supersede: Duration::ZERO,
            cleaned_by_peers: false,
            backend: "registry",
            late_delivery: Duration::ZERO,
            monitors: None,
        }
    }

    /// Bounds for the etcd provider with `config`: etcd expires a lease on its own clock a TTL
    /// after its last keep-alive (checked every [`crate::control::etcd::EXPIRY_TICK`]); the topologies
    /// are the store's content at each revision, so the history oracle judges every view; a
    /// newer incarnation at a member's address deletes the old key at its next keep-alive
    /// round.
    pub fn etcd(config: &shoal::etcd::EtcdProviderConfig, degraded: bool) -> Self {
        Self {
            registry: true,
            ttl: config.ttl,
            sweep: crate::control::etcd::EXPIRY_TICK * 2,
            heartbeat: config.keep_alive_interval(),
            degraded,
            supersede: config.request_timeout * 2 + DELIVERY,
            cleaned_by_peers: false,
            backend: "etcd",
            // A change inside a burst is published at most one publish interval late; a relist
            // waits up to the relist jitter first.
            late_delivery: config.publish_interval + config.relist_jitter,
            monitors: None,
        }
    }

    /// Bounds for the Kubernetes provider with `config`: a Lease's duration is the TTL, its
    /// renew interval the heartbeat; the "sweep" is how late after its expiry an expired Lease
    /// may still be deleted: it is judged at the cleaner's next own renewal (one interval),
    /// the cleaners after the first wait up to half a duration, plus one delete call. Expiry is judged on the cleaning member's clock, whose drift the providers
    /// assume is within the same bound as the registry's.
    pub fn kubernetes(config: &KubernetesProviderConfig, degraded: bool) -> Self {
        Self {
            registry: false,
            ttl: config.lease_duration,
            sweep: config.lease_duration / 2 + config.renew_interval() + config.request_timeout,
            heartbeat: config.renew_interval(),
            degraded,
            supersede: config.request_timeout * 2 + DELIVERY,
            cleaned_by_peers: true,
            backend: "API server",
            // A relist after 410 waits up to the relist jitter first.
            late_delivery: config.relist_jitter,
            monitors: match config.heartbeats {
                shoal::kubernetes::Heartbeats::Everyone => None,
                shoal::kubernetes::Heartbeats::Sharded { shards, monitors } => {
                    Some((shards, monitors))
                }
            },
        }
    }

    /// How much later than at once a registration that left may still be listed.
    pub fn leave_allowance(&self, superseded: bool) -> Duration {
        match (superseded, self.degraded) {
            (false, _) => Duration::ZERO,
            (true, false) => self.supersede,
            (true, true) => self.supersede * 4,
        }
    }

    /// The shortest real time a TTL can last on the registry's (possibly fast) clock.
    pub fn ttl_min(&self) -> Duration {
        self.ttl
            .mul_f64(1e6 / (1e6 + REGISTRY_MAX_DRIFT_PPM as f64))
    }

    /// The longest real time a TTL can last on the registry's (possibly slow) clock.
    pub fn ttl_max(&self) -> Duration {
        self.ttl
            .mul_f64(1e6 / (1e6 - REGISTRY_MAX_DRIFT_PPM as f64))
    }

    /// How late after its expiry a registration may still be listed: one sweep interval (four
    /// when sweeps may be delayed), plus the oracle's polling period.
    pub fn sweep_allowance(&self) -> Duration {
        let sweeps = if self.degraded { 4 } else { 1 };
        self.sweep * sweeps + POLL + Duration::from_millis(50)
    }

    /// How long a member's path to the registry must have been healthy before an expiry is
    /// false: a TTL plus one and a half heartbeat intervals (a heartbeat delayed by a slow
    /// member clock, or by the backoff after the last failure, still lands in the window).
    pub fn healthy_window(&self) -> Duration {
        self.ttl + self.heartbeat.mul_f64(1.5) + Duration::from_secs(1)
    }

    /// The failover bound: a crashed member is gone from every connected survivor within a TTL
    /// (on a slow registry clock) after its last heartbeat, plus one sweep and one delivery.
    pub fn failover(&self) -> Duration {
        self.ttl_max() + self.sweep_allowance() + self.delivery()
    }

    /// One watch delivery to a connected watcher, and how late a dropped message can make it.
    pub fn delivery(&self) -> Duration {
        DELIVERY + self.late_delivery
    }
}

/// How often the lease oracle polls the registry's published topology.
pub const POLL: Duration = Duration::from_millis(50);

/// One watch delivery to a connected survivor, with room for latency and packet loss.
pub const DELIVERY: Duration = Duration::from_secs(1);

/// Every oracle of one run, fed by the observers.
#[derive(Debug)]
pub struct Oracles {
    rec: Recorder,
    bounds: Bounds,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    history: history::History,
    lease: lease::Leases,
    /// When the backend last accepted a renewal of each id (kept after the id is gone).
    last_renewal: BTreeMap<MemberId, Instant>,
}

impl Oracles {
    /// Oracles reporting to `rec`.
    pub fn new(rec: Recorder, bounds: Bounds) -> Arc<Self> {
        Arc::new(Self {
            rec,
            bounds,
            state: Mutex::default(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The bounds in force.
    pub fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// A registry run started (its state is empty).
    pub fn registry_started(&self, run: u64) {
        let mut s = self.lock();
        s.lease.started(run);
        s.history.restarted();
    }

    /// The registry accepted a member's join describing it as `member`, answering `version`.
    pub fn described(&self, member: &pb::Member, version: u64) {
        self.lock().history.described(member, version);
    }

    /// Membership changes the backend accepted or made so far (joins and new descriptions of
    /// members, leaves, removals), as the harness saw them: what the load budget allows for.
    pub fn changes(&self) -> u64 {
        self.lock().lease.changes
    }

    /// The registry accepted a join of `id` at `address`.
    pub fn joined(&self, id: MemberId, member: bool, address: String) {
        let mut state = self.lock();
        // Where members remove each other (Kubernetes), a late join of an id the harness
        // abandoned (a start attempt that timed out) does not supersede the live one there.
        if member
            && self.bounds.cleaned_by_peers
            && state.lease.stale_join(&id, &address, Instant::now())
        {
            return;
        }
        state.lease.joined(id, member, address, Instant::now());
    }

    /// The harness gave up on `id`: a start attempt under it failed and the process tries
    /// again under another id.
    pub fn abandoned(&self, id: MemberId) {
        self.lock().lease.abandoned(id);
    }

    /// The backend accepted a join of `id` at `address` whose lease started at `at` (etcd: the
    /// lease was granted before the key was written).
    pub fn joined_at(&self, id: MemberId, address: String, at: Instant) {
        self.lock().lease.joined(id, true, address, at);
    }

    /// The backend's store was restored from a snapshot (etcd, the same cluster id): run
    /// `run` starts with the snapshot's `members` (id and address) registered from `at`,
    /// their leases' TTLs starting over, even those the backend had removed since. A restored
    /// member at an address where a newer incarnation lives (or was restored) is a ghost that
    /// newer process may delete at any time.
    pub fn store_restored(&self, run: u64, members: &[(MemberId, String)], at: Instant) {
        let mut s = self.lock();
        let mut newest = s.lease.live_by_address();
        for (id, address) in members {
            let n = newest.entry(address.clone()).or_insert_with(|| id.clone());
            if *id > *n {
                *n = id.clone();
            }
        }
        // (The history oracle already forgot the accepted descriptions: `history_restored`
        // runs before the restored store is issued.)
        s.lease.started(run);
        for (id, address) in members {
            let superseded_by = newest.get(address).filter(|n| *n != id).cloned();
            s.lease
                .restored(id.clone(), address.clone(), at, superseded_by);
        }
    }

    /// The backend restarted with its data, starting every lease's TTL over (etcd).
    pub fn leases_refreshed(&self) {
        self.lock().lease.refreshed(Instant::now(), |_| true);
    }

    /// A new leader of the backend started the TTL of every lease it holds over (etcd's lessor
    /// promoted): the members `held` lists count as renewed now (one whose key expired
    /// while the oracle could not look, during the election, is not brought back).
    pub fn leases_extended(&self, held: &ClusterTopology) {
        self.lock()
            .lease
            .refreshed(Instant::now(), |id| held.contains(id));
    }

    /// Kubernetes, a cluster migrating between heartbeat settings: the process that joined as
    /// `id` uses sharded heartbeats (`true`: only the monitors of its shard, among the members
    /// with that setting, remove it) or renews its own Lease (any member removes it), as the
    /// harness configured it.
    pub fn heartbeats_of(&self, id: &MemberId, sharded: bool) {
        self.lock().lease.heartbeats_of(id, sharded);
    }

    /// Kubernetes: the member that joined as `id` is in `zone` (its own, else its Pod's
    /// endpoint's, as the harness placed it).
    pub fn zone_of(&self, id: &MemberId, zone: Option<String>) {
        self.lock().lease.zone_of(id, zone);
    }

    /// Sharded heartbeats: the monitors of member `id`'s shard as the lease oracle last
    /// checked them, each with when it (last) became one; `None` without sharded heartbeats
    /// or before a check.
    pub fn monitors_since(&self, id: &MemberId) -> Option<Vec<(MemberId, Instant)>> {
        let (shards, _) = self.bounds.monitors?;
        self.lock().lease.monitors_since(id, shards)
    }

    /// Sharded heartbeats: the monitors of member `id`'s shard as the design specifies them,
    /// among the members `t` lists that use sharded heartbeats; `None` when `id` renews its own
    /// Lease (or the cluster has no sharded heartbeats).
    pub fn spec_monitors_of(&self, id: &MemberId, t: &ClusterTopology) -> Option<Vec<MemberId>> {
        let sharding = self.bounds.monitors?;
        let state = self.lock();
        let lease = &state.lease;
        if !lease.is_sharded(id, &self.bounds) {
            return None;
        }
        let ids: Vec<(&MemberId, Option<&str>)> = t
            .member_ids()
            .filter(|m| lease.is_sharded(m, &self.bounds))
            .map(|m| (m, lease.zone(m)))
            .collect();
        Some(lease::spec_monitors_of(id, &ids, sharding))
    }

    /// The registry accepted a heartbeat of `id`.
    pub fn renewed(&self, id: &MemberId) {
        let now = Instant::now();
        let mut s = self.lock();
        s.lease.renewed(id, now);
        // Every renewal of every member passes here: no allocation but the first.
        match s.last_renewal.get_mut(id) {
            Some(at) => *at = now,
            None => {
                s.last_renewal.insert(id.clone(), now);
            }
        }
    }

    /// When the backend last accepted a renewal of `id` (a renewal that reached it late, from
    /// a member that died meanwhile, extends its lease: a departure is judged from it).
    pub fn last_renewal(&self, id: &MemberId) -> Option<Instant> {
        self.lock().last_renewal.get(id).copied()
    }

    /// The registry accepted a leave of `id`.
    pub fn left(&self, id: &MemberId) {
        self.lock().lease.left(id, Instant::now());
    }

    /// The registry was frozen for `d` and resumed with its state: every lease it holds is
    /// extended by the stall (less up to a sweep interval, which is how late it can notice).
    pub fn registry_stalled(&self, d: Duration) {
        let sweep = self.bounds.sweep;
        let drift = REGISTRY_MAX_DRIFT_PPM as f64 / 1e6;
        // The registry notices a stall only when its sweeper wakes more than an interval late.
        let at_least = if d > sweep * 2 {
            (d - sweep).mul_f64(1.0 - drift)
        } else {
            Duration::ZERO
        };
        self.lock().lease.stalled(at_least, d.mul_f64(1.0 + drift));
    }

    /// The Kubernetes API server was unreachable for everyone for `d` (down or frozen). A
    /// member counts the time between two of its accepted renewals only if they are at most two
    /// renew intervals apart (see `shoal::kubernetes::members::Liveness`): an outage longer than
    /// that ages no Lease (every expiry moves out by at least `d`, less a renew interval of
    /// margin); a shorter one may count in full.
    pub fn apiserver_silent(&self, d: Duration) {
        let drift = REGISTRY_MAX_DRIFT_PPM as f64 / 1e6;
        let at_least = if d > self.bounds.heartbeat * 2 {
            d.saturating_sub(self.bounds.heartbeat).mul_f64(1.0 - drift)
        } else {
            Duration::ZERO
        };
        self.lock().lease.stalled(at_least, d.mul_f64(1.0 + drift));
    }

    /// The node registered as `id` announced that it lost its registration.
    pub fn lost(&self, id: &MemberId) {
        self.lock().lease.lost(id, Instant::now());
    }

    /// The registry sent `msg` to a watcher; for a snapshot, how many members it lists.
    pub fn sent(&self, msg: &pb::WatchResponse) -> Option<usize> {
        self.lock().history.sent(msg, &self.rec)
    }

    /// The backend's store held `topology` (etcd: at revision `topology.version()`).
    pub fn issued(&self, topology: ClusterTopology) {
        self.lock().history.issued(topology, &self.rec);
    }

    /// The backend's store was restored from a snapshot: its revisions from now on are filed
    /// under history epoch `to`, a successor of `from` (they reuse versions `from` issued).
    pub fn history_restored(&self, from: u64, to: u64) {
        self.lock().history.restored(from, to);
    }

    /// A node applied `topology`, whose fingerprint is `fp` (judged only where a registry
    /// issues the history).
    pub fn applied(
        &self,
        node: &str,
        topology: &ClusterTopology,
        fp: crate::fingerprint::Fingerprint,
    ) {
        if self.bounds.registry {
            self.lock()
                .history
                .applied(node, topology, fp.full, &self.rec);
        }
    }

    /// The registry of run `run` publishes `topology` now; `healthy_since` tells since when a
    /// member's path to the registry has been undisturbed (`None`: disturbed now); `excused`
    /// whether the node that registered an id cannot be held to announcing its own expiry (last
    /// accepted renewal at the given instant).
    pub fn published(
        &self,
        run: u64,
        topology: &Arc<ClusterTopology>,
        healthy_since: &dyn Fn(&MemberId) -> Option<Instant>,
        excused: &dyn Fn(&MemberId, Instant) -> bool,
    ) {
        self.lock().lease.published(
            run,
            topology,
            Instant::now(),
            &self.bounds,
            &Judge {
                healthy_since,
                excused,
            },
            &self.rec,
        );
    }
}
