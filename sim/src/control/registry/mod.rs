//! The gRPC registry as a simulated control plane: the real [`RegistryServer`] on a node of its
//! own, served through its real `serve_with` path behind the harness's [`door::Observed`].
//!
//! Faults: a crash loses its state (the next run is a new epoch), a clock stepped back before
//! a restart, a freeze (its leases are extended by the stall when it wakes), heartbeats lost at
//! the door, every watch stream reset. Its load: requests by RPC, watch messages (a snapshot
//! sent in fragments counts once), members sent in snapshots, bytes as protobuf encodes them.

pub mod door;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal::registry::{
    RegistryConfig, RegistryMetrics, RegistryProvider, RegistryProviderConfig,
    RegistryProviderMetrics, RegistryServer,
};
use shoal::runtime::{SharedClock, SkewedClock, TokioClock};
use shoal::{ClusterProvider, ClusterTopology};

use self::door::{Door, Observed};
use super::{ADDRESS, ControlNode, ControlPlane, Env, MemberRef, NodeInfo};
use crate::cluster::CLUSTER;
use crate::knobs::Knobs;
use crate::load::{LoadBudget, LoadCounts};
use crate::oracle::{Bounds, Oracles};
use crate::record::Recorder;

/// The registry's port.
pub const PORT: u16 = 7600;

/// The registry settings simulations use: production defaults, with the seed's buffer,
/// fragment, compression and publish settings.
pub fn config(knobs: &Knobs) -> RegistryConfig {
    let mut c = RegistryConfig::default();
    c.limits.watch_buffer = knobs.watch_buffer;
    c.limits.snapshot_fragment_bytes = knobs.snapshot_fragment_bytes;
    c.limits.snapshot_compress_bytes = knobs.snapshot_compress_bytes;
    c.publish_interval = knobs.publish_interval.min(c.sweep_interval);
    c
}

/// The bounds of a registry with the seed's settings.
pub fn bounds(knobs: &Knobs) -> Bounds {
    let config = config(knobs);
    let mut b = Bounds::new(&config, knobs.buggify, true);
    if knobs.out_of_contract {
        // The door drops updates: the next progress message shows the watcher the gap, and it
        // reopens its stream.
        b.late_delivery = config.progress_interval + Duration::from_secs(2);
    }
    b
}

/// The registry's load budget (the arithmetic is in docs/simulation.md): a heartbeat per
/// member per heartbeat interval; a progress message per quiet watcher per progress interval;
/// one update per membership change per watcher; a reconnect (or a member joining again)
/// costs a join, a watch and a snapshot. Where watchers may lag (a tiny watch buffer) or
/// broadcasts are lost (buggify's fault points), every change may cost every watcher a
/// snapshot: the repair the design makes.
pub fn budget(config: &RegistryConfig, knobs: &Knobs) -> LoadBudget {
    let lagging = config.limits.watch_buffer < 8 || knobs.buggify;
    LoadBudget {
        requests_per_node_per_s: 1.0 / config.heartbeat().as_secs_f64(),
        requests_per_change: 3.0,
        requests_per_reconnect: 6.0,
        events_per_watcher_per_s: 1.0 / config.progress_interval.as_secs_f64(),
        events_per_watcher_per_member_per_s: 0.0,
        events_per_change_per_watcher: if lagging { 3.0 } else { 1.5 },
        events_per_reconnect: 4.0,
        lists_per_node_per_s: 0.0,
        lists_per_change: 1.0,
        lists_per_change_per_watcher: if lagging { 2.0 } else { 0.0 },
        lists_per_reconnect: 3.0,
        spread_watches: (0.0, 0.0),
        per_spread_watch_per_s: (0.0, 0.0, 0.0),
        per_spread_watch_reconnect: (0.0, 0.0, 0.0),
        slack: if knobs.buggify { 4.0 } else { 2.0 },
        why: "registry: a heartbeat per node per heartbeat interval, a progress message per watcher per progress interval, an update per change per watcher, a join, a watch and a snapshot per reconnect",
    }
}

/// The registry on its node.
#[derive(Debug)]
pub struct RegistryPlane {
    node: ControlNode,
    config: RegistryConfig,
    knobs: Knobs,
    bounds: Bounds,
    /// The running server and its run number (`None` while it is down).
    server: Arc<Mutex<Option<(u64, RegistryServer)>>>,
    /// Its clock: survives restarts, so a step taken while it is down is seen by the next run.
    clock: Arc<SkewedClock>,
    door: Arc<Door>,
    oracles: Arc<Oracles>,
    /// Every run's server metrics, and every provider's.
    servers: Arc<Mutex<Vec<RegistryMetrics>>>,
    providers: Mutex<Vec<RegistryProviderMetrics>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RegistryPlane {
    /// Starts the registry node.
    pub fn start(env: Env) -> Arc<dyn ControlPlane> {
        let config = config(&env.knobs);
        let door = Arc::new(Door::default());
        door.set_duplicate_leaves(env.knobs.duplicate_leaves);
        door.set_lose_first_leave(env.knobs.lose_first_leave);
        door.set_out_of_contract(env.knobs.out_of_contract);
        door.set_late_requests(env.knobs.buggify);
        let server: Arc<Mutex<Option<(u64, RegistryServer)>>> = Arc::default();
        let clock = SkewedClock::new(TokioClock::shared());
        let servers: Arc<Mutex<Vec<RegistryMetrics>>> = Arc::default();
        let runs = Arc::new(AtomicU64::new(0));
        let (c, slot, d, o, rec, clk, sm) = (
            config.clone(),
            server.clone(),
            door.clone(),
            env.oracles.clone(),
            env.rec.clone(),
            clock.clone(),
            servers.clone(),
        );
        let node = env
            .handle
            .create_node()
            .name("registry")
            .ip(ADDRESS)
            .init(move || {
                let (config, slot, door, oracles, rec, clock, servers, runs) = (
                    c.clone(),
                    slot.clone(),
                    d.clone(),
                    o.clone(),
                    rec.clone(),
                    clk.clone(),
                    sm.clone(),
                    runs.clone(),
                );
                async move {
                    let run = runs.fetch_add(1, Ordering::SeqCst) + 1;
                    oracles.registry_started(run);
                    let shared: SharedClock = clock;
                    let server =
                        RegistryServer::new(config, shared).expect("valid registry settings");
                    lock(&servers).push(server.metrics().clone());
                    *lock(&slot) = Some((run, server.clone()));
                    rec.trace("registry", format!("started (run {run})"));
                    let addr: SocketAddr = ([0, 0, 0, 0], PORT).into();
                    let wrap = |svc| Observed::new(svc, door, oracles, rec.clone());
                    if let Err(e) = server.serve_with(addr, std::future::pending(), wrap).await {
                        rec.trace("registry", format!("server ended: {e}"));
                    }
                }
            })
            .build();
        Arc::new(RegistryPlane {
            node: ControlNode::new(env.handle.clone(), node),
            bounds: bounds(&env.knobs),
            knobs: env.knobs.clone(),
            config,
            server,
            clock,
            door,
            oracles: env.oracles,
            servers,
            providers: Mutex::default(),
        })
    }
}

impl ControlPlane for RegistryPlane {
    fn name(&self) -> &'static str {
        "registry"
    }

    fn bounds(&self) -> &Bounds {
        &self.bounds
    }

    /// Restarted members re-join (start retries every 1 s), a restarted registry holds
    /// snapshots for its startup grace, an expired member re-joins at its next heartbeat,
    /// watches reconnect within the backoff cap, and madsim may deliver messages held by a
    /// healed partition up to ~10 s late. Node-side timers run on clocks that may still drift
    /// 25% slow, hence the 4/3. On buggify seeds a join held by the door's congested proxy
    /// may arrive after the heal and supersede the member's current incarnation once more.
    fn liveness_bound(&self) -> Duration {
        let c = &self.config;
        let held = if self.knobs.buggify {
            door::MAX_JOIN_HOLD
        } else {
            Duration::ZERO
        };
        (c.grace() + c.ttl + c.heartbeat()) * 4 / 3 + Duration::from_secs(5 + 10 + 4) + held
    }

    fn node(&self) -> Option<madsim::task::NodeId> {
        Some(self.node.id())
    }

    fn provider(&self, _node: &NodeInfo) -> Arc<dyn ClusterProvider> {
        let mut config = RegistryProviderConfig::new(format!("http://{ADDRESS}:{PORT}"));
        config.rpc_timeout = Duration::from_secs(1);
        let p = RegistryProvider::new(config);
        lock(&self.providers).push(p.metrics().clone());
        Arc::new(p)
    }

    fn listed(&self) -> Option<(u64, Arc<ClusterTopology>)> {
        if self.node.is_paused() {
            return None; // A frozen process publishes nothing (and expires nobody).
        }
        let (run, server) = lock(&self.server).clone()?;
        Some((run, server.topology(CLUSTER)))
    }

    fn disturbed(&self) -> bool {
        self.node.is_down() || self.node.is_paused()
    }

    fn crash(&self, _store: super::Store) -> Option<u64> {
        // The registry keeps its state in memory: every crash loses it (a restore too: it
        // keeps no backup).
        lock(&self.server).take();
        Some(self.node.kill())
    }

    fn restart_after(&self, crash: u64) {
        if self.node.is_latest(crash) {
            self.node.revive();
        }
    }

    fn pause(&self) -> bool {
        self.node.pause()
    }

    fn resume(&self) {
        if let Some(d) = self.node.resume() {
            self.oracles.registry_stalled(d);
        }
    }

    fn clock(&self) -> Option<Arc<SkewedClock>> {
        Some(self.clock.clone())
    }

    fn lose_renewals(&self, m: &MemberRef, lost: bool) -> bool {
        if let Some(id) = &m.id {
            self.door.set_heartbeat_loss(id, lost);
        }
        true
    }

    fn reset_streams(&self) -> bool {
        self.door.reset_streams();
        true
    }

    fn heal(&self) {
        self.door.clear_heartbeat_loss();
        self.door.set_late_requests(false);
        self.resume();
        self.node.revive();
    }

    fn load(&self) -> LoadCounts {
        self.door.meter.counts()
    }

    fn budget(&self) -> LoadBudget {
        budget(&self.config, &self.knobs)
    }

    fn record_path_counts(&self, rec: &Recorder) {
        for m in lock(&self.providers).iter() {
            rec.count_n("provider: heartbeat failures", m.heartbeat_failures.get());
            rec.count_n("provider: re-joins", m.rejoins.get());
            rec.count_n("provider: watch gap, reopened", m.watch_gaps.get());
            rec.count_n("provider: watch idle, reopened", m.watch_idle_reopens.get());
            rec.count_n("provider: watch failed, reopened", m.watch_reopens.get());
            rec.count_n("provider: watch resumed by progress", m.watch_resumed.get());
            rec.count_n("provider: snapshots applied", m.snapshots_applied.get());
            rec.count_n(
                "provider: snapshot fragments received",
                m.snapshot_fragments.get(),
            );
            rec.count_n(
                "provider: compressed snapshots received",
                m.compressed_snapshots.get(),
            );
            rec.count_n("provider: backoff at its cap", m.backoff_capped.get());
            rec.count_n("provider: epoch changes", m.epoch_changes.get());
            rec.count_n("provider: membership lost", m.membership_lost.get());
            rec.count_n("provider: membership restored", m.membership_restored.get());
            rec.count_n("provider: description updates", m.description_updates.get());
        }
        for m in lock(&self.servers).iter() {
            rec.count_n(
                "registry: watcher lagged, sent a snapshot",
                m.watch_lagged.get(),
            );
            rec.count_n("registry: expiries", m.expiries.get());
            rec.count_n("registry: leaves", m.leaves.get());
            rec.count_n("registry: stalls", m.stalls.get());
            rec.count_n("registry: superseded", m.superseded.get());
            rec.count_n("registry: changes coalesced", m.coalesced.get());
        }
    }

    fn teardown(&self) {
        self.node.teardown();
        lock(&self.server).take();
        lock(&self.servers).clear();
        lock(&self.providers).clear();
    }
}
