//! `SimCluster`: a cluster of simulated nodes running the real providers against one simulated
//! control plane ([`crate::control`]), and the fault injectors that act on it.
//!
//! It composes parts that each own their faults and their healing: [`Links`] (clogs), the
//! member and client nodes (crash, restart, graceful leave, pause, clock skew) and the control
//! plane (restart, data loss, freeze, clock, the door in front of it that loses renewals or
//! resets watches). [`Health`] follows every fault so the oracles know which paths were healthy.
//! Nothing here branches on the provider: what differs between them lives in their control
//! plane's module.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use madsim::runtime::{Handle, NodeHandle};
use madsim::task::NodeId;
use madsim::time::{Instant, sleep};
use shoal::activation::{ActivationClient, ActivationNode};
use shoal::metrics::{EventMetrics, PlacementMetrics};
use shoal::runtime::{SharedClock, SkewedClock, TokioClock};
use shoal::{
    ClusterEvent, ClusterProvider, ClusterProviderContext, Description, EventStream, MemberId,
    PartitionConfig, PartitionManager,
};

use crate::activation::{ActivationOracle, SimActors};
use crate::control::apiserver::{EndpointController, PodState, pod_name, pod_zone};
use crate::control::{self, ControlPlane, MemberRef, NodeInfo, Store};
use crate::failover::FailoverMeter;
use crate::faults::Fault;
use crate::fingerprint::ViewPrint;
use crate::flaw::{Flaw, FlawedProvider};
use crate::health::Health;
use crate::knobs::Knobs;
use crate::links::{Links, cut};
use crate::load::LoadCounts;
use crate::oracle::events::EventChain;
use crate::oracle::{DELIVERY, Oracles, POLL};
use crate::record::Recorder;
use crate::workload::{FreshOwners, Workload};

mod inject;
mod judge;
mod node;

use node::NodeSpec;

/// The cluster name every simulated node uses.
pub const CLUSTER: &str = "sim";
/// The kind every member hosts (until a [`Fault::Describe`] drains it).
pub const KIND: &str = "user";
/// A kind members host in some descriptions only ([`description_of`]).
pub const AUX_KIND: &str = "aux";

/// The description a member starts with: it hosts [`KIND`], no zone, no labels.
pub fn base_description() -> Description {
    Description {
        kinds: [KIND.to_string()].into(),
        ..Description::default()
    }
}

/// The description of `generation` ([`Fault::Describe`]): zone `zone-{g % 3}`, a `generation`
/// label, [`AUX_KIND`] added on odd generations, and [`KIND`] dropped (drained) on every
/// fourth, so placement moves both ways.
pub fn description_of(generation: u32) -> Description {
    let mut kinds = BTreeSet::new();
    if generation % 4 != 3 {
        kinds.insert(KIND.to_string());
    }
    if generation % 2 == 1 {
        kinds.insert(AUX_KIND.to_string());
    }
    Description {
        kinds,
        zone: Some(format!("zone-{}", generation % 3)),
        metadata: [("generation".to_string(), generation.to_string())].into(),
    }
}
/// How long a survivor must have been connected before a departure for the failover oracle to
/// judge it: a dead watch stream is noticed after the idle timeout (15 s), reopened within the
/// backoff cap (5 s), and a new registry holds snapshots for its startup grace (3 s).
const CONNECTED_FOR: Duration = Duration::from_secs(25);

/// How long after the endpoints controller withdrew a Pod (not ready, terminating) a node that
/// was connected throughout may still list its member: one watch delivery, plus a watch
/// reopened after a stream reset.
const WITHDRAWAL: Duration =
    Duration::from_millis(DELIVERY.as_millis() as u64 + POLL.as_millis() as u64 + 1_000);

/// The preStop hook's wait before a Pod's process is told to stop
/// (deploy/kubernetes/member-deployment.yaml): its endpoint is terminating meanwhile.
const PRE_STOP: Duration = Duration::from_secs(5);

/// Which membership provider the members run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProviderKind {
    /// [`InMemoryProvider`] over one shared registry.
    InMemory,
    /// [`RegistryProvider`] against a [`RegistryServer`] on its own node.
    Registry,
    /// [`KubernetesProvider`] against a simulated API server on its own node
    /// ([`crate::control::apiserver`]).
    Kubernetes,
    /// [`EtcdProvider`] against a simulated etcd on its own node ([`crate::control::etcd`]).
    Etcd,
}

/// The etcd provider settings simulations use ([`control::etcd::config`]).
pub fn etcd_config() -> shoal::etcd::EtcdProviderConfig {
    control::etcd::config(&crate::knobs::Knobs::default())
}

/// The Kubernetes provider settings simulations use ([`control::apiserver::config`]).
pub fn kubernetes_config(pod: Option<&str>) -> shoal::kubernetes::KubernetesProviderConfig {
    control::apiserver::config(pod, &crate::knobs::Knobs::default())
}

/// How to build a [`SimCluster`].
#[derive(Clone, Debug)]
pub struct SimClusterBuilder {
    provider: ProviderKind,
    members: usize,
    clients: usize,
    flaw: Flaw,
    app: Option<AppFn>,
    knobs: Knobs,
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
            flaw: Flaw::None,
            app: None,
            knobs: Knobs::default(),
        }
    }

    /// Adds client-mode nodes.
    pub fn clients(mut self, n: usize) -> Self {
        self.clients = n;
        self
    }

    /// A deliberate defect (checker self-tests).
    pub fn flaw(mut self, flaw: Flaw) -> Self {
        self.flaw = flaw;
        self
    }

    /// The seed's network and buffer settings.
    pub fn knobs(mut self, knobs: Knobs) -> Self {
        self.knobs = knobs;
        self
    }

    /// Your own code, run on every member and client node once its provider has started (and
    /// again on every restart). It dies with the node.
    pub fn app(mut self, app: AppFn) -> Self {
        self.app = Some(app);
        self
    }

    /// Creates the nodes (inside a madsim runtime) and starts them.
    pub fn build(mut self, recorder: Recorder) -> Arc<SimCluster> {
        if self.provider != ProviderKind::Kubernetes {
            // Services and zones are Kubernetes knobs.
            self.knobs.k8s_service = false;
            self.knobs.k8s_zones = false;
        }
        SimCluster::start(self, recorder)
    }
}

/// A running node's current incarnation, as its init task published it.
#[derive(Clone, Debug)]
pub struct Incarnation {
    /// Member id (clients have one too; they are not in the topology): the current one, after
    /// any re-join as a new incarnation.
    pub id: MemberId,
    /// Ids this process registered under before `id` (it lost them and re-joined).
    pub earlier_ids: Vec<MemberId>,
    /// Ids of starts that failed (the registry may hold them, the process never did).
    pub abandoned_ids: Vec<MemberId>,
    /// The node's partition manager.
    pub manager: Arc<PartitionManager>,
    /// When the incarnation was created.
    pub started_at: Instant,
    /// When its provider finished starting, if it has.
    pub ready_at: Option<Instant>,
    /// The description the harness last asked this process to have (members).
    pub description: Description,
    /// The node's activation client, once its provider started.
    pub activation: Option<Arc<ActivationClient>>,
    /// Where the harness's subscriber to its events is ([`crate::oracle::events`]).
    pub events: Arc<Mutex<EventChain>>,
    /// The fingerprint of the view it last applied, followed change by change.
    pub print: Arc<Mutex<ViewPrint>>,
}

impl Incarnation {
    /// Whether this process registered as `id`, now or before.
    pub fn holds(&self, id: &MemberId) -> bool {
        &self.id == id || self.earlier_ids.contains(id) || self.abandoned_ids.contains(id)
    }
}

/// Counters of the products' own node-side metrics, summed into the run's rare-path counts at
/// the end (the providers' and servers' own are the control plane's).
#[derive(Clone, Debug)]
enum MetricSource {
    Events(EventMetrics),
    Placement(PlacementMetrics),
}

struct Slot {
    name: String,
    ip: IpAddr,
    node: NodeHandle,
    is_client: bool,
    clock: Arc<SkewedClock>,
    current: Arc<Mutex<Option<Incarnation>>>,
    alive: bool,
    paused: bool,
    /// When the node's last pause ended (its timers fired late up to then).
    unpaused_at: Option<Instant>,
    /// Whether the node's clock was ever given a rate drift beyond what providers assume
    /// ([`shoal::provider::LeaseTiming::DEFAULT_MAX_DRIFT_PPM`]): its own lease judgement is
    /// then not held to the bound.
    wild_clock: bool,
    /// A graceful shutdown is under way.
    leaving: bool,
    lost_heartbeats: bool,
    stop: Arc<StopSignal>,
    describe: Arc<DescribeSignal>,
}

/// Asks a member to change its description ([`Fault::Describe`]).
#[derive(Debug, Default)]
struct DescribeSignal {
    generation: Mutex<Option<u32>>,
    notify: tokio::sync::Notify,
}

/// Asks a node to shut down gracefully, and hears when it has.
#[derive(Debug, Default)]
struct StopSignal {
    requested: AtomicBool,
    notify: tokio::sync::Notify,
    done: Mutex<Option<Instant>>,
}

/// A simulated cluster: member and client nodes, and (for the registry provider) a registry
/// node. Faults are applied through it; the checkers read the nodes' views through it.
pub struct SimCluster {
    handle: Handle,
    provider: ProviderKind,
    /// The control plane the members' provider talks to.
    control: Arc<dyn ControlPlane>,
    /// The placement rule the members use.
    rule: shoal::placement::PlacementRule,
    recorder: Recorder,
    oracles: Arc<Oracles>,
    health: Health,
    links: Links,
    slots: Mutex<Vec<Slot>>,
    /// Slot index by node name.
    names: BTreeMap<String, usize>,
    /// Set by [`SimCluster::heal_all`]: pending fault actions are dropped from then on.
    healed: AtomicBool,
    metrics: Arc<Mutex<Vec<MetricSource>>>,
    /// Nodes the faults forced to reconnect to the control plane (the load budget's
    /// allowance).
    reconnects: AtomicU64,
    /// Whether the control plane said it was disturbed at the last poll.
    registry_disturbed: AtomicBool,
    /// What the nodes' actors did (the activation checkers).
    activation: Arc<ActivationOracle>,
    /// Crash-to-removal times.
    failover: Arc<FailoverMeter>,
    /// The harness's own tasks on the scenario's node, aborted by [`SimCluster::teardown`].
    background: Mutex<Vec<madsim::task::AbortHandle>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SimCluster {
    fn start(b: SimClusterBuilder, recorder: Recorder) -> Arc<Self> {
        let handle = Handle::current();
        let oracles = Oracles::new(recorder.clone(), control::bounds(b.provider, &b.knobs));
        let activation =
            ActivationOracle::new(recorder.clone(), b.members > crate::activation::TURNS_UP_TO);
        let metrics: Arc<Mutex<Vec<MetricSource>>> = Arc::default();
        let control = control::start(
            b.provider,
            control::Env {
                handle: handle.clone(),
                oracles: oracles.clone(),
                rec: recorder.clone(),
                knobs: b.knobs.clone(),
                members: b.members,
            },
        );
        let fresh = Arc::new(FreshOwners::new(b.knobs.placement_rule()));
        let failover = Arc::new(FailoverMeter::new(recorder.clone()));
        let mut slots = Vec::new();
        for i in 0..b.members + b.clients {
            let is_client = i >= b.members;
            let name = if is_client {
                format!("client{}", i - b.members)
            } else {
                format!("m{i}")
            };
            let ip = if is_client {
                node_ip(2, i - b.members)
            } else {
                member_ip(i)
            };
            let clock = SkewedClock::new(TokioClock::shared());
            let current: Arc<Mutex<Option<Incarnation>>> = Arc::default();
            let stop = Arc::new(StopSignal::default());
            let describe = Arc::new(DescribeSignal::default());
            let spec = NodeSpec {
                control: Arc::downgrade(&control),
                describe: describe.clone(),
                name: name.clone(),
                ip,
                is_client,
                flaw: if i == 0 { b.flaw } else { Flaw::None },
                app: b.app,
                clock: clock.clone(),
                current: current.clone(),
                recorder: recorder.clone(),
                oracles: oracles.clone(),
                knobs: b.knobs.clone(),
                stop: stop.clone(),
                metrics: metrics.clone(),
                fresh: fresh.clone(),
                activation: activation.clone(),
                failover: failover.clone(),
                index: i,
            };
            let node = handle
                .create_node()
                .name(&name)
                .ip(ip)
                .init(move || spec.clone().run())
                .build();
            slots.push(Slot {
                ip,
                name,
                node,
                is_client,
                clock,
                current,
                alive: true,
                paused: false,
                unpaused_at: None,
                wild_clock: false,
                leaving: false,
                lost_heartbeats: false,
                stop,
                describe,
            });
        }
        let n = slots.len();
        let names = slots
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.clone(), i))
            .collect();
        let cluster = Arc::new(SimCluster {
            handle,
            provider: b.provider,
            control,
            rule: b.knobs.placement_rule(),
            recorder,
            oracles,
            health: Health::new(n, b.knobs.buggify),
            links: Links::default(),
            slots: Mutex::new(slots),
            names,
            healed: AtomicBool::new(false),
            metrics,
            reconnects: AtomicU64::new(0),
            registry_disturbed: AtomicBool::new(false),
            activation,
            failover,
            background: Mutex::new(Vec::new()),
        });
        if cluster.control.node().is_some() {
            let c = cluster.clone();
            cluster.background(async move {
                loop {
                    sleep(POLL).await;
                    c.poll_registry();
                }
            });
        }
        cluster
    }

    /// The provider the members run.
    pub fn provider(&self) -> ProviderKind {
        self.provider
    }

    /// The control plane.
    pub fn control(&self) -> &Arc<dyn ControlPlane> {
        &self.control
    }

    /// What the control plane served so far.
    pub fn load(&self) -> LoadCounts {
        self.control.load()
    }

    /// Nodes the faults forced to reconnect to the control plane so far.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::SeqCst)
    }

    /// Running nodes (members and clients).
    pub fn node_count(&self) -> usize {
        lock(&self.slots).iter().filter(|s| s.alive).count()
    }

    /// The recorder.
    pub fn recorder(&self) -> &Recorder {
        &self.recorder
    }

    /// The oracles of this run.
    pub fn oracles(&self) -> &Arc<Oracles> {
        &self.oracles
    }

    /// Number of member nodes.
    pub fn member_count(&self) -> usize {
        lock(&self.slots).iter().filter(|s| !s.is_client).count()
    }

    /// The placement rule the members use (zone affinity when the seed's endpoints carry zones).
    pub fn placement_rule(&self) -> shoal::placement::PlacementRule {
        self.rule
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

    /// Runs `fut` on node `name` (its network, its clock) and waits for it; `None` if there is
    /// no such node or it died meanwhile.
    pub async fn on_node<T: Send + 'static>(
        &self,
        name: &str,
        fut: impl std::future::Future<Output = T> + Send + 'static,
    ) -> Option<T> {
        let i = *self.names.get(name)?;
        let id = lock(&self.slots)[i].node.id();
        // A fresh handle: the slot's own one spawns into the node's first run only.
        self.handle.get_node(id)?.spawn(fut).await.ok()
    }

    /// The current incarnation of the running, unpaused node `name` (`None`: down, paused,
    /// or not started yet).
    pub fn live_incarnation(&self, name: &str) -> Option<Incarnation> {
        let i = *self.names.get(name)?;
        let slots = lock(&self.slots);
        let s = &slots[i];
        if !s.alive || s.paused {
            return None;
        }
        lock(&s.current).clone()
    }

    /// The current incarnation of the running process that registered as `id` (now or
    /// before), if there is one.
    pub fn process_of(&self, id: &MemberId) -> Option<Incarnation> {
        lock(&self.slots)
            .iter()
            .filter(|s| s.alive && !s.paused)
            .find_map(|s| lock(&s.current).as_ref().filter(|c| c.holds(id)).cloned())
    }

    /// Running nodes whose new incarnation has not published itself yet (just restarted).
    pub fn starting_nodes(&self) -> Vec<String> {
        lock(&self.slots)
            .iter()
            .filter(|s| s.alive && lock(&s.current).is_none())
            .map(|s| s.name.clone())
            .collect()
    }

    /// The description each running member's process was last asked to have, by current id.
    pub fn live_member_descriptions(&self) -> BTreeMap<MemberId, Description> {
        lock(&self.slots)
            .iter()
            .filter(|s| s.alive && !s.is_client)
            .filter_map(|s| {
                lock(&s.current).as_ref().map(|i| {
                    let mut d = i.description.clone();
                    // A member that names no zone of its own takes its endpoint's.
                    if self.rule == shoal::placement::PlacementRule::ZoneAffinity
                        && d.zone.is_none()
                    {
                        d.zone = Some(pod_zone(&pod_name(&s.name)));
                    }
                    (i.id.clone(), d)
                })
            })
            .collect()
    }

    /// The current incarnation of member `i`.
    pub fn member_id(&self, i: usize) -> Option<MemberId> {
        lock(&self.slots)
            .get(i)
            .and_then(|s| lock(&s.current).as_ref().map(|c| c.id.clone()))
    }

    fn node_id(&self, i: usize) -> NodeId {
        lock(&self.slots)[i].node.id()
    }

    fn registry_node_ids(&self) -> Vec<NodeId> {
        self.control.nodes()
    }

    /// Until when some node's view may lag because its watch was on a backend member that
    /// froze or crashed, for stalls that lasted past `since` (see
    /// [`ControlPlane::view_stalled_until`]).
    pub(crate) fn views_stalled_until(&self, since: Instant) -> Option<Instant> {
        let ips: Vec<IpAddr> = lock(&self.slots).iter().map(|s| s.ip).collect();
        ips.into_iter()
            .filter_map(|ip| self.control.view_stalled_until(ip, since))
            .max()
    }

    fn all_node_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = lock(&self.slots).iter().map(|s| s.node.id()).collect();
        ids.extend(self.registry_node_ids());
        ids
    }

    /// Whether a fault disturbs member `i`'s path to the registry now (a graceful shutdown
    /// under way does not count).
    fn path_disturbed(&self, i: usize) -> bool {
        let registry = self.registry_node_ids();
        let slots = lock(&self.slots);
        let s = &slots[i];
        // Cut off from every node of the control plane (from some of a multi-member backend,
        // the client moves to another).
        let clogged = !registry.is_empty()
            && registry
                .iter()
                .all(|&r| self.links.either_way(s.node.id(), r));
        !s.alive || s.paused || s.lost_heartbeats || clogged
    }

    /// Recomputes every path's health from the faults in force.
    fn refresh_health(&self) {
        let n = lock(&self.slots).len();
        for i in 0..n {
            let leaving = lock(&self.slots)[i].leaving;
            self.health.set_node(i, leaving || self.path_disturbed(i));
        }
        self.health.set_registry(self.control.disturbed());
    }

    /// Feeds the lease oracle what the control plane lists now.
    fn poll_registry(&self) {
        // The control plane's own disturbances that end by themselves (an election).
        let disturbed = self.control.disturbed();
        if self.registry_disturbed.swap(disturbed, Ordering::SeqCst) != disturbed {
            self.health.set_registry(disturbed);
        }
        let Some((run, topology)) = self.control.listed() else {
            return;
        };
        // Which slot registered an id, built once per poll and only if an oracle asks.
        let index = std::cell::OnceCell::new();
        let slot = |id: &MemberId| index.get_or_init(|| self.id_index()).get(id).copied();
        let healthy = |id: &MemberId| slot(id).and_then(|i| self.health.healthy_since(i));
        let excused = |id: &MemberId, renewed_at: Instant| {
            self.lease_judgement_excused(slot(id), id, renewed_at)
        };
        self.oracles.published(run, &topology, &healthy, &excused);
    }

    /// Whether the node that registered `id` cannot be held to announcing its own expiry
    /// (last accepted renewal at `renewed_at`): its process is gone or shutting down, it was
    /// paused since (its timers fired late), or its clock drifts beyond the bound providers
    /// assume.
    fn lease_judgement_excused(
        &self,
        slot: Option<usize>,
        id: &MemberId,
        renewed_at: Instant,
    ) -> bool {
        let slots = lock(&self.slots);
        let Some(s) = slot.and_then(|i| slots.get(i)) else {
            return true; // That process crashed or left.
        };
        // A start that failed, or one still under way (the application was never told it is
        // a member, so it serves nothing).
        let abandoned = lock(&s.current)
            .as_ref()
            .is_none_or(|c| !c.holds(id) || c.abandoned_ids.contains(id) || c.ready_at.is_none());
        abandoned
            || !s.alive
            || s.leaving
            || s.paused
            || s.wild_clock
            || s.unpaused_at
                .is_some_and(|t| t + Duration::from_secs(1) >= renewed_at)
    }

    /// Every id a running process registered under (now, before, or in a failed start), with
    /// its slot (the first slot holding it).
    fn id_index(&self) -> BTreeMap<MemberId, usize> {
        let mut index = BTreeMap::new();
        for (i, s) in lock(&self.slots).iter().enumerate() {
            if let Some(c) = lock(&s.current).as_ref() {
                for id in std::iter::once(&c.id)
                    .chain(&c.earlier_ids)
                    .chain(&c.abandoned_ids)
                {
                    index.entry(id.clone()).or_insert(i);
                }
            }
        }
        index
    }

    /// Heals what must heal before liveness is judged: links, pauses, heartbeat loss, buggify;
    /// restarts crashed and departed members and the registry. Clock skew and drift, packet loss
    /// and latency stay in force: they must not matter.
    pub fn heal_all(&self) {
        self.healed.store(true, Ordering::SeqCst);
        // The network heals too: no more buggify delays (packet loss and latency stay).
        madsim::buggify::disable();
        self.links.heal();
        let n = lock(&self.slots).len();
        for i in 0..n {
            lock(&self.slots)[i].lost_heartbeats = false;
            self.resume(i);
            self.restart(i);
        }
        self.control.heal();
        self.refresh_health();
        self.recorder.trace("harness", "HEAL ALL");
    }

    /// Ends the run: kills every node so that madsim drops their tasks. madsim does not cancel
    /// tasks when its runtime is dropped (madsim-rs/madsim#242), and a task that holds a handle
    /// to its own node or cluster is a reference cycle, so without this every seed of a
    /// campaign leaked its whole cluster (about 1.3 MB a seed: 6,800 runs held 9 GB).
    pub async fn teardown(&self) {
        for id in self.all_node_ids() {
            self.handle.kill(id);
        }
        for task in lock(&self.background).drain(..) {
            task.abort();
        }
        // The killed nodes' tasks are dropped when the executor next polls them.
        madsim::time::sleep(Duration::from_millis(10)).await;
        // What the nodes' init closures (kept by madsim's node table) share with the cluster.
        for slot in lock(&self.slots).iter() {
            lock(&slot.current).take();
        }
        self.control.teardown();
        lock(&self.metrics).clear();
    }

    /// Adds the products' own counters of rare paths (re-joins, gaps, lag, snapshots) to the
    /// recorder's counts; call once, at the end of a run.
    pub fn record_path_counts(&self) {
        let rec = &self.recorder;
        for source in lock(&self.metrics).iter() {
            match source {
                MetricSource::Events(m) => {
                    rec.count_n("events: missed by lagging subscribers", m.lagged.get());
                }
                MetricSource::Placement(m) => {
                    rec.count_n("placement: owner cache evictions", m.evictions.get());
                    rec.count_n("placement: stale topologies refused", m.stale_updates.get());
                }
            }
        }
        self.control.record_path_counts(rec);
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

    /// Runs `fut` as one of the harness's tasks on the scenario's node (no fault touches it);
    /// [`Self::teardown`] aborts it if it still runs.
    pub fn spawn_background(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        self.background(fut);
    }

    fn background(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        // Tasks of the node that runs the scenario survive every fault.
        let task = madsim::task::spawn(fut);
        let mut tasks = lock(&self.background);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }
}

/// The address of member `i`'s node: `10.0.1.{i + 1}` for the first 254 (the addresses small
/// clusters always had), then `10.1.x.y` (room for 65,534).
pub fn member_ip(i: usize) -> IpAddr {
    node_ip(1, i)
}

/// The address of the `i`-th node of group `group` (1: members, 2: clients): `10.0.{group}.{i
/// + 1}` for the first 254, then `10.{group}.x.y` counting on from `10.{group}.0.255`.
fn node_ip(group: u8, i: usize) -> IpAddr {
    let k = i + 1;
    if k < 255 {
        return IpAddr::V4(Ipv4Addr::new(10, 0, group, k as u8));
    }
    assert!(k < 1 << 16, "at most 65,534 nodes of a kind");
    IpAddr::V4(Ipv4Addr::new(10, group, (k >> 8) as u8, k as u8))
}
