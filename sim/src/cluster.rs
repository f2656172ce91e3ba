//! `SimCluster`: a cluster of simulated nodes running the real providers, and the fault
//! injectors that act on it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};
use madsim::task::NodeId;
use madsim::time::sleep;
use serde::{Deserialize, Serialize};
use shoal::provider::memory::{InMemoryProvider, InMemoryRegistry};
use shoal::registry::{RegistryConfig, RegistryProvider, RegistryProviderConfig, RegistryServer};
use shoal::runtime::{SharedClock, SkewedClock, TokioClock};
use shoal::{ClusterEvent, ClusterProvider, ClusterProviderContext, MemberId, PartitionManager};

use crate::faults::Fault;
use crate::flaw::{Flaw, FlawedProvider};
use crate::record::Recorder;

/// The cluster name every simulated node uses.
pub const CLUSTER: &str = "sim";
/// The kind every member hosts.
pub const KIND: &str = "user";
const REGISTRY_PORT: u16 = 7600;

/// Which membership provider the members run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// [`InMemoryProvider`] over one shared registry.
    InMemory,
    /// [`RegistryProvider`] against a [`RegistryServer`] on its own node.
    Registry,
}

/// How to build a [`SimCluster`].
#[derive(Clone, Debug)]
pub struct SimClusterBuilder {
    provider: ProviderKind,
    members: usize,
    clients: usize,
    registry: RegistryConfig,
    flaw: Flaw,
    app: Option<AppFn>,
}

/// What your per-node code gets: the node's name, its provider context (partition manager,
/// events, clock, member description) and the recorder (for trace lines and violations).
#[derive(Clone, Debug)]
pub struct NodeApp {
    /// Node name (`m0`, `client0`).
    pub name: String,
    /// Whether the node is a client (hosts no kinds).
    pub is_client: bool,
    /// The node's provider context.
    pub ctx: ClusterProviderContext,
    /// The run's recorder.
    pub recorder: Recorder,
}

/// Per-node application code run inside the simulation (see [`SimClusterBuilder::app`]).
pub type AppFn = fn(NodeApp) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl SimClusterBuilder {
    /// `members` members on `provider`, no clients, the simulator's registry settings.
    pub fn new(provider: ProviderKind, members: usize) -> Self {
        Self {
            provider,
            members,
            clients: 0,
            registry: default_registry_config(),
            flaw: Flaw::None,
            app: None,
        }
    }

    /// Adds client-mode nodes.
    pub fn clients(mut self, n: usize) -> Self {
        self.clients = n;
        self
    }

    /// Registry settings.
    pub fn registry_config(mut self, c: RegistryConfig) -> Self {
        self.registry = c;
        self
    }

    /// A deliberate defect (checker self-tests).
    pub fn flaw(mut self, flaw: Flaw) -> Self {
        self.flaw = flaw;
        self
    }

    /// Your own code, run on every member and client node once its provider has started (and
    /// again on every restart). It dies with the node.
    pub fn app(mut self, app: AppFn) -> Self {
        self.app = Some(app);
        self
    }

    /// Creates the nodes (inside a madsim runtime) and starts them.
    pub fn build(self, recorder: Recorder) -> Arc<SimCluster> {
        SimCluster::start(self, recorder)
    }
}

/// The registry settings simulations use: production defaults.
pub fn default_registry_config() -> RegistryConfig {
    RegistryConfig::default()
}

/// A running node's current incarnation, as its init task published it.
#[derive(Clone, Debug)]
pub struct Incarnation {
    /// Member id (clients have one too; they are not in the topology).
    pub id: MemberId,
    /// The node's partition manager.
    pub manager: Arc<PartitionManager>,
}

struct Slot {
    name: String,
    node: NodeHandle,
    is_client: bool,
    clock: Arc<SkewedClock>,
    current: Arc<Mutex<Option<Incarnation>>>,
    alive: bool,
    paused: bool,
}

/// A simulated cluster: member and client nodes, and (for the registry provider) a registry
/// node. Faults are applied through it; the checkers read the nodes' views through it.
pub struct SimCluster {
    handle: Handle,
    provider: ProviderKind,
    registry_config: RegistryConfig,
    recorder: Recorder,
    registry_node: Option<NodeHandle>,
    registry_server: Arc<Mutex<Option<RegistryServer>>>,
    lost_heartbeats: Arc<Mutex<BTreeSet<MemberId>>>,
    slots: Mutex<Vec<Slot>>,
    /// Directed links currently clogged, with how many active faults clog each.
    clogged: Mutex<BTreeMap<(NodeId, NodeId), u32>>,
    /// Set by [`SimCluster::heal_all`]: pending fault actions are dropped from then on.
    healed: AtomicBool,
    /// Registry crashes so far; a restart belongs to the latest crash only (overlapping
    /// registry-restart faults must not restart a running registry).
    registry_epoch: AtomicU64,
    registry_down: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimCluster {
    fn start(b: SimClusterBuilder, recorder: Recorder) -> Arc<Self> {
        let handle = Handle::current();
        let registry_server: Arc<Mutex<Option<RegistryServer>>> = Arc::default();
        let lost: Arc<Mutex<BTreeSet<MemberId>>> = Arc::default();
        let registry_node = (b.provider == ProviderKind::Registry).then(|| {
            let (config, server_slot, lost, rec, flaw) = (
                b.registry.clone(),
                registry_server.clone(),
                lost.clone(),
                recorder.clone(),
                b.flaw,
            );
            handle
                .create_node()
                .name("registry")
                .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)))
                .init(move || {
                    let (config, server_slot, lost, rec) = (
                        config.clone(),
                        server_slot.clone(),
                        lost.clone(),
                        rec.clone(),
                    );
                    async move {
                        let server = RegistryServer::new(config, TokioClock::shared())
                            .expect("valid registry settings");
                        let lost_for_filter = lost.clone();
                        server.set_heartbeat_loss(Arc::new(move |id: &MemberId| {
                            lock(&lost_for_filter).contains(id)
                        }));
                        *lock(&server_slot) = Some(server.clone());
                        rec.trace("registry", "started");
                        let sweeper = (flaw != Flaw::NeverExpire).then(|| server.spawn_sweeper());
                        let addr: SocketAddr = ([0, 0, 0, 0], REGISTRY_PORT).into();
                        let result = tonic::transport::Server::builder()
                            .add_service(server.service())
                            .serve(addr)
                            .await;
                        drop(sweeper);
                        if let Err(e) = result {
                            rec.trace("registry", format!("server ended: {e}"));
                        }
                    }
                })
                .build()
        });
        let memory = InMemoryRegistry::new();
        let mut slots = Vec::new();
        for i in 0..b.members + b.clients {
            let is_client = i >= b.members;
            let name = if is_client {
                format!("client{}", i - b.members)
            } else {
                format!("m{i}")
            };
            let ip = if is_client {
                IpAddr::V4(Ipv4Addr::new(10, 0, 2, (i - b.members + 1) as u8))
            } else {
                IpAddr::V4(Ipv4Addr::new(10, 0, 1, (i + 1) as u8))
            };
            let clock = SkewedClock::new(TokioClock::shared());
            let current: Arc<Mutex<Option<Incarnation>>> = Arc::default();
            let spec = NodeSpec {
                name: name.clone(),
                ip,
                is_client,
                provider: b.provider,
                memory: memory.clone(),
                flaw: if i == 0 { b.flaw } else { Flaw::None },
                app: b.app,
                clock: clock.clone(),
                current: current.clone(),
                recorder: recorder.clone(),
            };
            let node = handle
                .create_node()
                .name(&name)
                .ip(ip)
                .init(move || spec.clone().run())
                .build();
            slots.push(Slot {
                name,
                node,
                is_client,
                clock,
                current,
                alive: true,
                paused: false,
            });
        }
        Arc::new(SimCluster {
            handle,
            provider: b.provider,
            registry_config: b.registry,
            recorder,
            registry_node,
            registry_server,
            lost_heartbeats: lost,
            slots: Mutex::new(slots),
            clogged: Mutex::new(BTreeMap::new()),
            healed: AtomicBool::new(false),
            registry_epoch: AtomicU64::new(0),
            registry_down: AtomicBool::new(false),
        })
    }

    /// The provider the members run.
    pub fn provider(&self) -> ProviderKind {
        self.provider
    }

    /// The registry settings in force.
    pub fn registry_config(&self) -> &RegistryConfig {
        &self.registry_config
    }

    /// The recorder.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// Number of member nodes.
    pub fn member_count(&self) -> usize {
        lock(&self.slots).iter().filter(|s| !s.is_client).count()
    }

    /// Views of running, unpaused nodes: (name, is_client, incarnation).
    pub fn live_views(&self) -> Vec<(String, bool, Incarnation)> {
        lock(&self.slots)
            .iter()
            .filter(|s| s.alive && !s.paused)
            .filter_map(|s| {
                lock(&s.current)
                    .clone()
                    .map(|inc| (s.name.clone(), s.is_client, inc))
            })
            .collect()
    }

    /// Running nodes whose new incarnation has not published itself yet (just restarted).
    pub fn starting_nodes(&self) -> Vec<String> {
        lock(&self.slots)
            .iter()
            .filter(|s| s.alive && lock(&s.current).is_none())
            .map(|s| s.name.clone())
            .collect()
    }

    /// Ids of the members whose node is running (paused included: they are alive).
    pub fn live_member_ids(&self) -> BTreeSet<MemberId> {
        lock(&self.slots)
            .iter()
            .filter(|s| s.alive && !s.is_client)
            .filter_map(|s| lock(&s.current).as_ref().map(|i| i.id.clone()))
            .collect()
    }

    /// The current incarnation of member `i`.
    pub fn member_id(&self, i: usize) -> Option<MemberId> {
        lock(&self.slots)
            .get(i)
            .and_then(|s| lock(&s.current).as_ref().map(|c| c.id.clone()))
    }

    /// The running registry server, if any.
    pub fn registry(&self) -> Option<RegistryServer> {
        lock(&self.registry_server).clone()
    }

    fn node_id(&self, i: usize) -> NodeId {
        lock(&self.slots)[i].node.id()
    }

    fn all_node_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = lock(&self.slots).iter().map(|s| s.node.id()).collect();
        if let Some(r) = &self.registry_node {
            ids.push(r.id());
        }
        ids
    }

    fn clog(&self, links: &[(NodeId, NodeId)]) {
        let net = NetSim::current();
        let mut clogged = lock(&self.clogged);
        for &(a, b) in links {
            let n = clogged.entry((a, b)).or_insert(0);
            if *n == 0 {
                net.clog_link(a, b);
            }
            *n += 1;
        }
    }

    fn unclog(&self, links: &[(NodeId, NodeId)]) {
        let net = NetSim::current();
        let mut clogged = lock(&self.clogged);
        for link in links {
            if let Some(n) = clogged.get_mut(link) {
                *n -= 1;
                if *n == 0 {
                    clogged.remove(link);
                    net.unclog_link(link.0, link.1);
                }
            }
        }
    }

    /// Clogs `links` now and unclogs them (healing fault `idx`) after `duration`.
    fn clog_for(self: &Arc<Self>, links: Vec<(NodeId, NodeId)>, duration: Duration, idx: usize) {
        self.clog(&links);
        self.later(duration, move |c| {
            c.unclog(&links);
            c.recorder.fault_healed(idx);
        });
    }

    /// Both directions between every node of `group` and every node outside it.
    fn cut(&self, group: &BTreeSet<NodeId>) -> Vec<(NodeId, NodeId)> {
        let all = self.all_node_ids();
        let mut links = Vec::new();
        for &a in group {
            for &b in all.iter().filter(|b| !group.contains(b)) {
                links.push((a, b));
                links.push((b, a));
            }
        }
        links
    }

    /// Crashes member `i` (its process dies; peers learn through the provider).
    pub fn crash(&self, i: usize) {
        let (id, name) = {
            let mut slots = lock(&self.slots);
            let s = &mut slots[i];
            if !s.alive {
                return;
            }
            s.alive = false;
            s.paused = false;
            (lock(&s.current).take().map(|c| c.id), s.name.clone())
        };
        self.handle.kill(self.node_id(i));
        self.recorder.node_down(&name);
        self.recorder.trace(
            &name,
            format!(
                "crashed ({})",
                id.as_ref().map_or("-".into(), |i| i.to_string())
            ),
        );
        if let Some(id) = id {
            self.spawn_failover_watch(name, id);
        }
    }

    /// Restarts member `i` as a new incarnation (a no-op when it is running).
    pub fn restart(&self, i: usize) {
        let mut slots = lock(&self.slots);
        let s = &mut slots[i];
        if s.alive {
            return;
        }
        s.alive = true;
        let id = s.node.id();
        let name = s.name.clone();
        drop(slots);
        self.handle.restart(id);
        self.recorder.trace(&name, "restarted");
    }

    /// Measures how long until no surviving node lists the crashed incarnation.
    fn spawn_failover_watch(&self, name: String, id: MemberId) {
        let start = madsim::time::Instant::now();
        let probe = self.failover_probe();
        let rec = self.recorder.clone();
        let _ = name;
        self.background(async move {
            for _ in 0..(120_000 / 20) {
                if !probe.any_lists(&id) {
                    let d = start.elapsed();
                    rec.failover(d);
                    rec.trace(
                        "harness",
                        format!("failover of {id} complete after {} ms", d.as_millis()),
                    );
                    return;
                }
                sleep(Duration::from_millis(20)).await;
            }
        });
    }

    fn failover_probe(&self) -> FailoverProbe {
        let slots = lock(&self.slots);
        FailoverProbe {
            currents: slots.iter().map(|s| s.current.clone()).collect(),
        }
    }

    /// Applies `fault` now; faults with a duration heal themselves in background tasks.
    pub fn apply(self: &Arc<Self>, fault: &Fault) {
        let names = |ms: &[usize]| ms.iter().map(|i| format!("m{i}")).collect::<Vec<_>>();
        let members = self.member_count();
        match fault.clone() {
            Fault::Partition {
                members: group,
                with_registry,
                duration,
            } => {
                let group: Vec<usize> = group.into_iter().filter(|&i| i < members).collect();
                let mut ids: BTreeSet<NodeId> = group.iter().map(|&i| self.node_id(i)).collect();
                if with_registry && let Some(r) = &self.registry_node {
                    ids.insert(r.id());
                }
                let links = self.cut(&ids);
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&group));
                self.clog_for(links, duration, idx);
            }
            Fault::Split { groups, duration } => {
                let mut group_of: BTreeMap<NodeId, usize> = BTreeMap::new();
                for (k, g) in groups.iter().enumerate() {
                    for &i in g.iter().filter(|&&i| i < members) {
                        group_of.entry(self.node_id(i)).or_insert(k + 1);
                    }
                }
                let all = self.all_node_ids();
                let mut links = Vec::new();
                for &a in &all {
                    for &b in &all {
                        if a != b
                            && group_of.get(&a).unwrap_or(&0) != group_of.get(&b).unwrap_or(&0)
                        {
                            links.push((a, b));
                        }
                    }
                }
                let hit: Vec<usize> = groups
                    .iter()
                    .flatten()
                    .copied()
                    .filter(|&i| i < members)
                    .collect();
                let idx = self.recorder.fault_started(fault.to_string(), names(&hit));
                self.clog_for(links, duration, idx);
            }
            Fault::OneWay { from, duration } => {
                let (Some(r), true) = (&self.registry_node, from < members) else {
                    return;
                };
                let links = vec![(self.node_id(from), r.id())];
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[from]));
                self.clog_for(links, duration, idx);
            }
            Fault::HeartbeatLoss { member, duration } => {
                let Some(id) = (member < members).then(|| self.member_id(member)).flatten() else {
                    return;
                };
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                lock(&self.lost_heartbeats).insert(id.clone());
                self.later(duration, move |c| {
                    lock(&c.lost_heartbeats).remove(&id);
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::Crash {
                member,
                restart_after,
            } => {
                if member >= members {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                self.crash(member);
                if let Some(d) = restart_after {
                    self.later(d, move |c| {
                        c.restart(member);
                        c.recorder.fault_healed(idx);
                    });
                }
            }
            Fault::Pause { member, duration } => {
                if member >= members || !lock(&self.slots)[member].alive {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                lock(&self.slots)[member].paused = true;
                self.handle.pause(self.node_id(member));
                self.later(duration, move |c| {
                    c.resume(member);
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::ClockSkew {
                member,
                offset_ms,
                drift_ppm,
            } => {
                if member >= members {
                    return;
                }
                self.recorder
                    .fault_started(fault.to_string(), names(&[member]));
                let clock = lock(&self.slots)[member].clock.clone();
                clock.set_wall_offset_ms(offset_ms);
                clock.set_drift_ppm(drift_ppm);
            }
            Fault::RegistryRestart { down_for } => {
                let Some(r) = &self.registry_node else { return };
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), vec!["registry".into()]);
                lock(&self.registry_server).take();
                self.handle.kill(r.id());
                self.registry_down.store(true, Ordering::SeqCst);
                let epoch = self.registry_epoch.fetch_add(1, Ordering::SeqCst) + 1;
                self.recorder.trace("registry", "crashed");
                self.later(down_for, move |c| {
                    // Only the latest crash's restart brings the registry back.
                    if c.registry_epoch.load(Ordering::SeqCst) == epoch {
                        c.restart_registry();
                    }
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::RollingRestart { gap } => {
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&(0..members).collect::<Vec<_>>()));
                let c = self.clone();
                self.background(async move {
                    for i in 0..members {
                        if c.is_healed() {
                            return;
                        }
                        c.crash(i);
                        sleep(Duration::from_millis(200)).await;
                        c.restart(i);
                        sleep(gap).await;
                    }
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::Flap {
                member,
                times,
                period,
            } => {
                if member >= members {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                let links = self.cut(&BTreeSet::from([self.node_id(member)]));
                let c = self.clone();
                self.background(async move {
                    for _ in 0..times {
                        if c.is_healed() {
                            return;
                        }
                        c.clog(&links);
                        sleep(period).await;
                        c.unclog(&links);
                        sleep(period).await;
                    }
                    c.recorder.fault_healed(idx);
                });
            }
        }
    }

    /// Restarts the registry if it is down.
    fn restart_registry(&self) {
        if let Some(r) = &self.registry_node
            && self.registry_down.swap(false, Ordering::SeqCst)
        {
            self.handle.kill(r.id());
            self.handle.restart(r.id());
        }
    }

    fn resume(&self, i: usize) {
        let mut slots = lock(&self.slots);
        if slots[i].paused {
            slots[i].paused = false;
            let id = slots[i].node.id();
            drop(slots);
            self.handle.resume(id);
        }
    }

    /// Heals everything: links, pauses, heartbeat loss, clock skew; restarts crashed members
    /// and the registry. After this, only the providers' own recovery is left.
    pub fn heal_all(&self) {
        self.healed.store(true, Ordering::SeqCst);
        let net = NetSim::current();
        for ((a, b), _) in std::mem::take(&mut *lock(&self.clogged)) {
            net.unclog_link(a, b);
        }
        lock(&self.lost_heartbeats).clear();
        let n = lock(&self.slots).len();
        for i in 0..n {
            self.resume(i);
            lock(&self.slots)[i].clock.set_wall_offset_ms(0);
            lock(&self.slots)[i].clock.set_drift_ppm(0);
            self.restart(i);
        }
        self.restart_registry();
        self.recorder.trace("harness", "HEAL ALL");
    }

    /// Runs `f` after `d` (on a harness node that no fault touches).
    fn later(self: &Arc<Self>, d: Duration, f: impl FnOnce(&Arc<SimCluster>) + Send + 'static) {
        let c = self.clone();
        self.background(async move {
            sleep(d).await;
            if !c.is_healed() {
                f(&c);
            }
        });
    }

    fn is_healed(&self) -> bool {
        self.healed.load(Ordering::SeqCst)
    }

    fn background(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        // Tasks of the node that runs the scenario survive every fault.
        madsim::task::spawn(fut);
    }
}

/// Reads every node's current incarnation without locking the cluster.
struct FailoverProbe {
    currents: Vec<Arc<Mutex<Option<Incarnation>>>>,
}

impl FailoverProbe {
    fn any_lists(&self, id: &MemberId) -> bool {
        self.currents
            .iter()
            .filter_map(|c| lock(c).clone())
            .any(|inc| inc.manager.topology().contains(id))
    }
}

/// Everything a node's init task needs (cloned on every (re)start).
#[derive(Clone)]
struct NodeSpec {
    name: String,
    ip: IpAddr,
    is_client: bool,
    provider: ProviderKind,
    memory: InMemoryRegistry,
    flaw: Flaw,
    clock: Arc<SkewedClock>,
    current: Arc<Mutex<Option<Incarnation>>>,
    recorder: Recorder,
    app: Option<AppFn>,
}

impl NodeSpec {
    async fn run(self) {
        // Processes start at different moments (0-2 s apart), so heartbeat phases differ.
        sleep(Duration::from_millis(madsim::rand::random::<u64>() % 2_000)).await;
        let clock: SharedClock = self.clock.clone();
        let kinds: Vec<&str> = if self.is_client { vec![] } else { vec![KIND] };
        let ctx = ClusterProviderContext::new(CLUSTER, format!("{}:4000", self.ip), kinds, clock)
            .expect("valid member");
        let id = ctx.member.id.clone();
        self.recorder
            .trace(&self.name, format!("incarnation {id} starting"));
        // Record every topology the node applies (subscribed before the provider starts).
        let mut events = ctx.events.subscribe();
        let (rec, name, rid) = (self.recorder.clone(), self.name.clone(), id.clone());
        madsim::task::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ClusterEvent::TopologyChanged { topology, .. }) => {
                        rec.observe(&name, &rid, &topology)
                    }
                    Ok(_) => {}
                    Err(shoal::SubscriptionError::Lagged { missed }) => {
                        rec.trace(&name, format!("event stream lagged by {missed}"))
                    }
                    Err(shoal::SubscriptionError::Closed) => break,
                }
            }
        });
        let provider: Box<dyn ClusterProvider> = match self.provider {
            ProviderKind::InMemory => Box::new(InMemoryProvider::new(self.memory.clone())),
            ProviderKind::Registry => {
                let mut config =
                    RegistryProviderConfig::new(format!("http://10.0.0.1:{REGISTRY_PORT}"));
                config.rpc_timeout = Duration::from_secs(1);
                Box::new(RegistryProvider::new(config))
            }
        };
        let provider: Box<dyn ClusterProvider> = if self.flaw.wraps_provider() {
            Box::new(FlawedProvider::new(provider, self.flaw))
        } else {
            provider
        };
        *lock(&self.current) = Some(Incarnation {
            id: id.clone(),
            manager: ctx.partition_manager.clone(),
        });
        let mut attempt = 0u32;
        loop {
            let started = if self.is_client {
                provider.start_client(ctx.clone()).await
            } else {
                provider.start_member(ctx.clone()).await
            };
            match started {
                Ok(()) => break,
                Err(e) => {
                    attempt += 1;
                    self.recorder
                        .trace(&self.name, format!("start failed (attempt {attempt}): {e}"));
                    sleep(Duration::from_secs(1)).await;
                }
            }
        }
        self.recorder.trace(&self.name, "provider started");
        if let Some(app) = self.app {
            app(NodeApp {
                name: self.name.clone(),
                is_client: self.is_client,
                ctx,
                recorder: self.recorder.clone(),
            })
            .await;
        }
        std::future::pending::<()>().await;
    }
}
