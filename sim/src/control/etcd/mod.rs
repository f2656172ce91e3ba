//! etcd as a simulated control plane: the library's `MemoryEtcd` on a node of its own behind
//! [`door::EtcdDoor`]. It expires leases every [`EXPIRY_TICK`] on its clock, compacts its
//! history every [`COMPACTION`] (a watcher that misses more must list again) and sends progress
//! notifications every [`PROGRESS_EVERY`].
//!
//! With `etcd_members` above 1 it is a multi-member etcd: that many nodes (10.0.0.1, .2, .3)
//! sharing the store, the leader's node expiring leases and compacting; one member can freeze
//! or crash while the others keep the quorum (faults `backend-member-freeze`,
//! `backend-member-crash`), and losing the leader costs an election of [`ELECTION`]. With
//! `etcd_token_ttl`, authentication is on (faults: token expiry, `backend-auth-change`).
//!
//! Faults: a restart keeps the data (every lease's TTL starts over, as after a leader change)
//! or, with data loss, starts a new cluster (another cluster id, revisions from 1), or restores
//! the snapshot saved last with the same cluster id (`etcdctl snapshot restore` with the same
//! cluster token: the revision goes back and later writes reuse revisions members saw); keep-alives
//! of a member lost at the door; every watch reset; a freeze (not in the etcd scenarios: a
//! frozen etcd expires overdue leases when it wakes, which no provider can prevent). Its load: requests by gRPC
//! method, watch responses (progress notifications included), keys returned by ranges, bytes
//! as protobuf would encode them.

pub mod client;
pub mod door;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::time::sleep;
use shoal::etcd::endpoints::EndpointMetrics;
use shoal::etcd::memory::MemoryEtcd;
use shoal::etcd::{EtcdProvider, EtcdProviderConfig, EtcdProviderMetrics};
use shoal::runtime::TokioClock;
use shoal::{ClusterProvider, ClusterTopology};

pub use self::client::SimEtcdApi;
pub use self::door::{DoorSnapshot, ETCD_PORT, EXPIRY_TICK, EtcdDoor, HISTORY, USER};
use super::{ControlNode, ControlPlane, Env, MemberRef, NodeInfo, Store};
use crate::knobs::Knobs;
use crate::load::{LoadBudget, LoadCounts};
use crate::oracle::{Bounds, Oracles};
use crate::record::Recorder;

/// How often the simulated etcd compacts its history to the current revision
/// (`--auto-compaction-mode=periodic`).
pub const COMPACTION: Duration = Duration::from_secs(5);

/// How often the simulated etcd sends a progress notification on every watch.
pub const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// How long an election takes once the leader is lost (etcd's default election timeout).
pub const ELECTION: Duration = Duration::from_secs(1);

/// The address of etcd member `k`: 10.0.0.{k + 1} (the first one is the control plane's
/// [`super::ADDRESS`]).
pub fn member_address(k: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + k as u8))
}

/// How often, on average, a simulated member audits its view (a count and a point read).
pub const AUDIT_EVERY: Duration = Duration::from_secs(20);

/// The etcd provider settings simulations use: a 6 s lease (the registry's TTL) kept alive
/// every 2 s, requests given 1 s (or what the scenario's knobs say).
pub fn config(knobs: &Knobs) -> EtcdProviderConfig {
    EtcdProviderConfig {
        ttl: Duration::from_secs(6),
        request_timeout: knobs.request_timeout.unwrap_or(Duration::from_secs(1)),
        watch_idle_timeout: Duration::from_secs(10),
        startup_timeout: Duration::from_secs(10),
        // Three or four audits per member in a 75 s fault phase.
        audit_every: Some(AUDIT_EVERY),
        ..EtcdProviderConfig::default()
    }
}

/// The bounds of the etcd provider with the simulation's settings.
pub fn bounds(knobs: &Knobs) -> Bounds {
    Bounds::etcd(&config(knobs), knobs.buggify)
}

/// The etcd provider's load budget: a keep-alive per member per keep-alive interval and an
/// audit (a count-only read and one or two keys-only point reads) per member per audit period; a
/// progress notification per watch every 2 s; one watch response per membership change per
/// watcher; a reconnect (or a member registering again) costs a grant, a put, a range (a list
/// of every member) and a watch.
pub fn budget(knobs: &Knobs) -> LoadBudget {
    let c = config(knobs);
    LoadBudget {
        requests_per_node_per_s: 1.0 / c.keep_alive_interval().as_secs_f64()
            + 3.0 / AUDIT_EVERY.as_secs_f64()
            // A refused call, an authentication and the call again per token lifetime, on
            // each etcd member the client used.
            + knobs.etcd_token_ttl.map_or(0.0, |t| {
                3.0 * knobs.etcd_members as f64 / t.as_secs_f64()
            }),
        requests_per_change: 4.0,
        requests_per_reconnect: 8.0,
        events_per_watcher_per_s: 1.0 / PROGRESS_EVERY.as_secs_f64(),
        events_per_watcher_per_member_per_s: 0.0,
        events_per_change_per_watcher: 1.5,
        events_per_reconnect: 4.0,
        lists_per_node_per_s: 0.0,
        lists_per_change: 1.0,
        lists_per_change_per_watcher: 0.0,
        lists_per_reconnect: 3.0,
        spread_watches: (0.0, 0.0),
        per_spread_watch_per_s: (0.0, 0.0, 0.0),
        per_spread_watch_reconnect: (0.0, 0.0, 0.0),
        slack: if knobs.buggify { 4.0 } else { 2.0 },
        why: "etcd: a keep-alive per member per keep-alive interval, an audit (two or three small reads) per member every 20 s, with authentication a refused call, an authentication and a retry per token lifetime, a progress notification per watch every 2 s, a watch response per change per watcher, a grant, a put, a range and a watch per reconnect",
    }
}

/// etcd on its node.
#[derive(Debug)]
pub struct EtcdPlane {
    /// One node per etcd member.
    nodes: Vec<ControlNode>,
    door: Arc<EtcdDoor>,
    oracles: Arc<Oracles>,
    bounds: Bounds,
    knobs: Knobs,
    /// What the next restart comes back with.
    next_store: Mutex<Store>,
    /// The copy `etcdctl snapshot save` would have made last.
    snapshot: Mutex<Option<DoorSnapshot>>,
    /// Runs of the store (a run ends when it loses its data).
    store_runs: AtomicU64,
    providers: Mutex<Vec<EtcdProviderMetrics>>,
    /// The members' clients' endpoint counters.
    clients: Mutex<Vec<EndpointMetrics>>,
    rec: Recorder,
}

/// Member `k` stands for election: on its node, every [`EXPIRY_TICK`], if it is the candidate
/// and the election's time has come, it leads.
fn stand(door: Arc<EtcdDoor>, k: usize, rec: Recorder) {
    madsim::task::spawn(async move {
        loop {
            sleep(EXPIRY_TICK).await;
            if door.elected(k) {
                rec.trace("etcd", format!("etcd{k} leads"));
                lead(door.clone(), k);
            }
        }
    });
}

/// Member `k` leads: on its node, expires leases every [`EXPIRY_TICK`], compacts every
/// [`COMPACTION`] and sends progress notifications every [`PROGRESS_EVERY`], for as long as it
/// leads (an old leader that thaws stops).
fn lead(door: Arc<EtcdDoor>, k: usize) {
    let term = door.term();
    let every = |period: Duration, tick: fn(&MemoryEtcd)| {
        let door = door.clone();
        madsim::task::spawn(async move {
            loop {
                sleep(period).await;
                if door.leader() != k || door.term() != term {
                    return;
                }
                if !door.electing() {
                    tick(door.store());
                }
            }
        });
    };
    every(EXPIRY_TICK, MemoryEtcd::expire);
    every(COMPACTION, |s| s.compact(s.revision()));
    every(PROGRESS_EVERY, MemoryEtcd::progress);
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EtcdPlane {
    /// Starts the etcd member nodes; the store lives outside them, so it survives restarts
    /// (as etcd's data dir and raft log do).
    pub fn start(env: Env) -> Arc<dyn ControlPlane> {
        let store = MemoryEtcd::new(TokioClock::shared(), HISTORY);
        let door = EtcdDoor::new(
            store,
            env.oracles.clone(),
            env.rec.clone(),
            env.knobs.etcd_token_ttl,
        );
        door.out_of_contract
            .store(env.knobs.out_of_contract, Ordering::SeqCst);
        env.oracles.registry_started(1);
        let members = env.knobs.etcd_members.clamp(1, 7);
        let nodes = (0..members)
            .map(|k| {
                let (d, rec) = (door.clone(), env.rec.clone());
                let name = if members == 1 {
                    "etcd".to_string()
                } else {
                    format!("etcd{k}")
                };
                let node = env
                    .handle
                    .create_node()
                    .name(name.clone())
                    .ip(member_address(k))
                    .init(move || {
                        let (door, rec, name) = (d.clone(), rec.clone(), name.clone());
                        async move {
                            rec.trace(&name, "started");
                            if door.leader() == k && !door.electing() {
                                lead(door.clone(), k);
                            }
                            if members > 1 {
                                stand(door.clone(), k, rec.clone());
                            }
                            door.serve(k).await;
                        }
                    })
                    .build();
                ControlNode::new(env.handle.clone(), node)
            })
            .collect();
        Arc::new(EtcdPlane {
            nodes,
            door,
            oracles: env.oracles,
            bounds: bounds(&env.knobs),
            knobs: env.knobs.clone(),
            next_store: Mutex::default(),
            snapshot: Mutex::default(),
            store_runs: AtomicU64::new(1),
            providers: Mutex::default(),
            clients: Mutex::default(),
            rec: env.rec.clone(),
        })
    }

    /// Whether etcd as a whole is down (crashed, every member with it).
    fn is_down(&self) -> bool {
        self.nodes.iter().all(ControlNode::is_down)
    }

    /// Whether etcd as a whole is frozen.
    fn is_paused(&self) -> bool {
        self.nodes.iter().all(ControlNode::is_paused)
    }

    /// Whether a member fault (one member down or frozen) is in force.
    fn member_disturbed(&self) -> bool {
        self.nodes.iter().any(|n| n.is_down() || n.is_paused())
    }

    /// How long a member whose watch went silent (its etcd member froze or crashed) may take
    /// to notice and move: the watch's idle timeout, an abandoned call, a failed audit's
    /// backoff and a reopen (a slow clock stretches it).
    fn notice(&self) -> Duration {
        let c = config(&self.knobs);
        (c.watch_idle_timeout + c.request_timeout * 3) * 4 / 3 + Duration::from_secs(2)
    }

    /// Member `k` (its leader's freeze or crash) is lost: an election, won after [`ELECTION`]
    /// by the next member that runs, on whose node it is held.
    fn lose(&self, k: usize) {
        if self.door.leader() != k || self.door.electing() {
            return;
        }
        let n = self.nodes.len();
        let Some(next) = (1..n)
            .map(|d| (k + d) % n)
            .find(|&j| !self.nodes[j].is_down() && !self.nodes[j].is_paused())
        else {
            return;
        };
        self.door.start_election(next, ELECTION);
        self.rec
            .trace("etcd", format!("leader etcd{k} lost; electing"));
    }

    /// Restarts etcd if it is down: with its data (every lease's TTL starts over), after a
    /// data-loss crash as a new cluster, or restored from the last snapshot.
    fn revive(&self) {
        let mut revived = false;
        for n in &self.nodes {
            revived |= n.revive().is_some();
        }
        if !revived {
            return;
        }
        // A whole-etcd restart: every token forgotten, the leader the one before (its node's
        // start leads again).
        self.door.forget_tokens(None);
        self.door.end_stalls_on(None);
        self.door.set_leader(self.door.leader(), false);
        let store = self.door.store();
        store.set_down(false);
        match std::mem::take(&mut *lock(&self.next_store)) {
            Store::Lost => {
                // A new etcd cluster: no keys, no leases, another cluster id.
                let run = self.store_runs.fetch_add(1, Ordering::SeqCst) + 1;
                store.restart(false);
                self.oracles.registry_started(run);
            }
            Store::Restored => {
                let Some(snapshot) = lock(&self.snapshot).clone() else {
                    self.oracles.leases_refreshed();
                    return;
                };
                // The same cluster id, the snapshot's keys and leases (their TTLs start over
                // now): for the lease oracle a new run whose members are the snapshot's.
                let run = self.store_runs.fetch_add(1, Ordering::SeqCst) + 1;
                self.door.restore(&snapshot, run);
            }
            Store::Kept => self.oracles.leases_refreshed(),
        }
    }
}

impl ControlPlane for EtcdPlane {
    fn name(&self) -> &'static str {
        "etcd"
    }

    fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// A dead member's key goes a TTL after its last keep-alive; a member that lost its lease
    /// registers again at its next keep-alive round; watches reopen within the idle timeout;
    /// slow clocks (25%) stretch all of it.
    fn liveness_bound(&self) -> Duration {
        let c = config(&self.knobs);
        (c.ttl * 2 + c.keep_alive_interval() + c.watch_idle_timeout) * 4 / 3
            + Duration::from_secs(5 + 10 + 4)
    }

    fn node(&self) -> Option<madsim::task::NodeId> {
        Some(self.nodes[0].id())
    }

    fn nodes(&self) -> Vec<madsim::task::NodeId> {
        self.nodes.iter().map(ControlNode::id).collect()
    }

    fn provider(&self, node: &NodeInfo) -> Arc<dyn ClusterProvider> {
        // Each node lists the etcd members starting from its own turn (as operators spread
        // clients over endpoints), and authenticates when etcd asks for it.
        let n = self.nodes.len();
        let first = node.name.bytes().map(usize::from).sum::<usize>() % n;
        let servers = (0..n)
            .map(|d| SocketAddr::new(member_address((first + d) % n), ETCD_PORT))
            .collect();
        let user = self
            .knobs
            .etcd_token_ttl
            .map(|_| (USER.0.to_string(), USER.1.to_string()));
        let api = SimEtcdApi::new(servers, user);
        lock(&self.clients).push(api.metrics().clone());
        let p = EtcdProvider::new(config(&self.knobs), Arc::new(api));
        lock(&self.providers).push(p.metrics().clone());
        Arc::new(p)
    }

    fn listed(&self) -> Option<(u64, Arc<ClusterTopology>)> {
        if self.is_down() || self.is_paused() || self.door.electing() {
            // A stopped etcd expires nobody (its leases start over on restart); a frozen one
            // is not judged (it expires overdue leases when it wakes).
            return None;
        }
        Some((self.store_runs.load(Ordering::SeqCst), self.door.topology()))
    }

    fn disturbed(&self) -> bool {
        self.is_down() || self.is_paused() || self.door.electing()
    }

    fn crash(&self, store: Store) -> Option<u64> {
        if store == Store::Restored && lock(&self.snapshot).is_none() {
            return None;
        }
        *lock(&self.next_store) = store;
        let mut crash = 0;
        for n in &self.nodes {
            crash = n.kill();
        }
        self.door.store().set_down(true);
        Some(crash)
    }

    fn restart_after(&self, crash: u64) {
        if self.nodes[self.nodes.len() - 1].is_latest(crash) {
            self.revive();
        }
    }

    fn freeze_member(&self, member: usize) -> Option<usize> {
        let k = member % self.nodes.len();
        // One member at a time, and not during an election (the candidate is not re-chosen).
        if self.nodes.len() < 2
            || self.member_disturbed()
            || self.door.electing()
            || !self.nodes[k].pause()
        {
            return None;
        }
        self.rec.trace(&format!("etcd{k}"), "frozen");
        self.door.stall_watchers_of(k, self.notice());
        self.lose(k);
        Some(k)
    }

    fn thaw_member(&self, k: usize) {
        if self.nodes[k].resume().is_some() {
            self.door.end_stalls_on(Some(k));
            self.rec.trace(&format!("etcd{k}"), "thawed");
        }
    }

    fn crash_member(&self, member: usize) -> Option<(usize, u64)> {
        let k = member % self.nodes.len();
        if self.nodes.len() < 2 || self.member_disturbed() || self.door.electing() {
            return None;
        }
        let crash = self.nodes[k].kill();
        self.door.stall_watchers_of(k, self.notice());
        self.rec.trace(&format!("etcd{k}"), "crashed");
        self.lose(k);
        Some((k, crash))
    }

    fn restart_member_after(&self, k: usize, crash: u64) {
        if self.nodes[k].is_latest(crash) && !self.is_down() && self.nodes[k].revive().is_some() {
            // Its tokens lived in its memory.
            self.door.forget_tokens(Some(k));
            self.door.end_stalls_on(Some(k));
            self.rec.trace(&format!("etcd{k}"), "restarted");
        }
    }

    fn change_auth(&self) -> bool {
        self.door.change_auth()
    }

    fn view_stalled_until(
        &self,
        ip: IpAddr,
        since: madsim::time::Instant,
    ) -> Option<madsim::time::Instant> {
        self.door.view_stalled_until(ip, since)
    }

    fn save_snapshot(&self) -> bool {
        if self.is_down() {
            return false;
        }
        *lock(&self.snapshot) = Some(self.door.snapshot());
        true
    }

    /// After a restore nodes may label the store's states with different epochs (each reckons
    /// its own from the revisions it saw, see `epoch_after_going_back`).
    fn epochs_agree(&self) -> bool {
        self.door.restores() == 0
    }

    fn pause(&self) -> bool {
        if self.member_disturbed() {
            return false;
        }
        self.nodes.iter().all(ControlNode::pause)
    }

    fn resume(&self) {
        // A frozen etcd extends nothing: it expires overdue leases when it wakes.
        for n in &self.nodes {
            n.resume();
        }
    }

    fn lose_renewals(&self, m: &MemberRef, lost: bool) -> bool {
        self.door.set_keep_alive_loss(m.ip, lost);
        true
    }

    fn reset_streams(&self) -> bool {
        self.door.reset_streams();
        true
    }

    fn delays(&self) -> Option<&crate::control::delays::Delays> {
        Some(&self.door.delays)
    }

    fn heal(&self) {
        self.door.clear_keep_alive_loss();
        self.door.delays.clear();
        for (k, n) in self.nodes.iter().enumerate() {
            n.resume();
            if !self.is_down() && n.revive().is_some() {
                self.door.forget_tokens(Some(k));
            }
            self.door.end_stalls_on(Some(k));
        }
        self.revive();
    }

    fn load(&self) -> LoadCounts {
        self.door.meter.counts()
    }

    fn budget(&self) -> LoadBudget {
        budget(&self.knobs)
    }

    fn record_path_counts(&self, rec: &Recorder) {
        for m in lock(&self.providers).iter() {
            rec.count_n("etcd: keep-alive failures", m.keep_alive_failures.get());
            rec.count_n("etcd: rejoins", m.rejoins.get());
            rec.count_n("etcd: relists", m.relists.get());
            rec.count_n("etcd: audits", m.audits.get());
            rec.count_n(
                "etcd: audits that found the view wrong",
                m.audit_mismatches.get(),
            );
            rec.count_n("etcd: watches reopened", m.watch_reopens.get());
            rec.count_n(
                "etcd: older watch batches skipped",
                m.batches_out_of_order.get(),
            );
            rec.count_n("etcd: membership lost", m.membership_lost.get());
            rec.count_n("etcd: membership restored", m.membership_restored.get());
        }
        for c in lock(&self.clients).iter() {
            rec.count_n("etcd: endpoint failovers", c.failovers.get());
            rec.count_n("etcd: reauthentications", c.reauthentications.get());
        }
    }

    fn teardown(&self) {
        for n in &self.nodes {
            n.teardown();
        }
        lock(&self.providers).clear();
        lock(&self.clients).clear();
    }
}
