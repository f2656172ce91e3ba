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
use shoal::activation::{ActivationClient, ActivationHost};
use shoal::metrics::{EventMetrics, PlacementMetrics};
use shoal::provider::PartitionService;
use shoal::runtime::{SharedClock, SkewedClock, TokioClock};
use shoal::{
    ClusterEvent, ClusterProvider, ClusterProviderContext, Description, EventStream, MemberId,
    PartitionConfig, PartitionManager,
};

use crate::activation::{ActivationOracle, SimActors};
use crate::control::apiserver::{EndpointController, PodState, pod_name, pod_zone};
use crate::control::{self, ControlPlane, MemberRef, NodeInfo};
use crate::failover::FailoverMeter;
use crate::faults::Fault;
use crate::flaw::{Flaw, FlawedProvider};
use crate::health::Health;
use crate::knobs::Knobs;
use crate::load::LoadCounts;
use crate::links::{Links, cut};
use crate::oracle::events::EventChain;
use crate::oracle::{DELIVERY, Oracles, POLL};
use crate::record::Recorder;
use crate::workload::{FreshOwners, Workload};

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
    control::etcd::config()
}

/// The Kubernetes provider settings simulations use ([`control::apiserver::config`]).
pub fn kubernetes_config(pod: Option<&str>) -> shoal::kubernetes::KubernetesProviderConfig {
    control::apiserver::config(pod)
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
        let activation = ActivationOracle::new(recorder.clone());
        let metrics: Arc<Mutex<Vec<MetricSource>>> = Arc::default();
        let control = control::start(
            b.provider,
            control::Env {
                handle: handle.clone(),
                oracles: oracles.clone(),
                rec: recorder.clone(),
                knobs: b.knobs.clone(),
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
                control: control.clone(),
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

    fn registry_node_id(&self) -> Option<NodeId> {
        self.control.node()
    }

    fn all_node_ids(&self) -> Vec<NodeId> {
        let mut ids: Vec<NodeId> = lock(&self.slots).iter().map(|s| s.node.id()).collect();
        ids.extend(self.registry_node_id());
        ids
    }

    /// Whether a fault disturbs member `i`'s path to the registry now (a graceful shutdown
    /// under way does not count).
    fn path_disturbed(&self, i: usize) -> bool {
        let registry = self.registry_node_id();
        let slots = lock(&self.slots);
        let s = &slots[i];
        let clogged = registry.is_some_and(|r| self.links.either_way(s.node.id(), r));
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

    /// Clogs `links` now and unclogs them (healing fault `idx`) after `duration`; `cut` nodes
    /// lose their control plane, and reconnect when it heals.
    fn clog_for(
        self: &Arc<Self>,
        links: Vec<(NodeId, NodeId)>,
        duration: Duration,
        idx: usize,
        cut: usize,
    ) {
        self.reconnected(cut);
        self.links.clog(&links);
        self.refresh_health();
        self.later(duration, move |c| {
            c.reconnected(cut);
            c.links.unclog(&links);
            c.refresh_health();
            c.recorder.fault_healed(idx);
        });
    }

    /// Crashes member `i` (its process dies; peers learn through the provider).
    pub fn crash(self: &Arc<Self>, i: usize) {
        let (id, name) = {
            let mut slots = lock(&self.slots);
            let s = &mut slots[i];
            if !s.alive {
                return;
            }
            s.alive = false;
            s.paused = false;
            s.leaving = false;
            (lock(&s.current).take().map(|c| c.id), s.name.clone())
        };
        self.handle.kill(self.node_id(i));
        self.activation.crashed(&name);
        self.failover.node_down(i);
        self.refresh_health();
        self.pod_not_ready_later(&name);
        self.recorder.node_down(&name);
        self.recorder.trace(
            &name,
            format!(
                "crashed ({})",
                id.as_ref().map_or("-".into(), |i| i.to_string())
            ),
        );
        if let Some(id) = id {
            let listing = lock(&self.slots)
                .iter()
                .enumerate()
                .filter(|(_, s)| s.alive)
                .filter(|(_, s)| {
                    lock(&s.current)
                        .as_ref()
                        .is_some_and(|c| c.manager.topology().contains(&id))
                })
                .map(|(j, _)| j)
                .collect();
            self.failover.departed(id.clone(), listing);
            self.judge_departure(i, id, self.oracles.bounds().failover(), "crashed");
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
        s.stop.requested.store(false, Ordering::SeqCst);
        *lock(&s.stop.done) = None;
        let id = s.node.id();
        let name = s.name.clone();
        drop(slots);
        self.reconnected(1);
        self.handle.restart(id);
        self.refresh_health();
        self.recorder.trace(&name, "restarted");
    }

    /// Asks member `i` to shut down gracefully; once it has, its node stops and the failover
    /// oracle judges how fast survivors saw it go.
    fn leave(self: &Arc<Self>, i: usize, rejoin_after: Option<Duration>, idx: usize) {
        let stop = {
            let mut slots = lock(&self.slots);
            let s = &mut slots[i];
            if !s.alive || s.paused || s.leaving {
                return;
            }
            s.leaving = true;
            s.stop.clone()
        };
        let c = self.clone();
        self.background(async move {
            if let Some(e) = c.endpoints() {
                // The Pod is being deleted: its endpoint goes terminating at once, and the
                // preStop hook waits before the process is told to stop.
                let (pod, incarnation) = {
                    let slots = lock(&c.slots);
                    let id = lock(&slots[i].current).as_ref().map(|inc| inc.id.clone());
                    (pod_name(&slots[i].name), id)
                };
                c.withdraw(&pod, e.generation(&pod), PodState::Terminating);
                sleep(PRE_STOP).await;
                let slots = lock(&c.slots);
                let s = &slots[i];
                let same = lock(&s.current).as_ref().map(|inc| inc.id.clone()) == incarnation;
                if !s.leaving || !s.alive || s.paused || !same {
                    return; // Crashed, frozen or replaced meanwhile.
                }
            }
            let healthy_at_start = c.health.healthy_since(i).is_some();
            stop.requested.store(true, Ordering::SeqCst);
            stop.notify.notify_one();
            c.refresh_health();
            for _ in 0..3_000 {
                if lock(&stop.done).is_some() {
                    break;
                }
                sleep(Duration::from_millis(10)).await;
            }
            // Healthy at the start of the shutdown and at its end, leaving aside the shutdown
            // itself (a fault that cut the member meanwhile may have lost every Leave attempt).
            let was_healthy = healthy_at_start && !c.path_disturbed(i);
            let id = {
                let mut slots = lock(&c.slots);
                let s = &mut slots[i];
                if !s.leaving || !s.alive {
                    return; // Crashed meanwhile.
                }
                s.leaving = false;
                s.alive = false;
                lock(&s.current).take().map(|inc| inc.id)
            };
            c.handle.kill(c.node_id(i));
            c.failover.node_down(i);
            c.refresh_health();
            let name = format!("m{i}");
            c.activation.crashed(&name);
            c.recorder.node_down(&name);
            c.recorder.trace(&name, "left gracefully; process ended");
            if let Some(id) = id {
                // A leave that reached a healthy registry is seen at once; otherwise the
                // registration expires like a crashed one.
                let bound = if was_healthy {
                    c.oracles.bounds().delivery() + POLL
                } else {
                    c.oracles.bounds().failover()
                };
                c.judge_departure(i, id, bound, "left gracefully");
            }
            if c.is_healed() {
                c.restart(i);
                return;
            }
            match rejoin_after {
                Some(d) => c.later(d, move |c| {
                    c.restart(i);
                    c.recorder.fault_healed(idx);
                }),
                None => c.recorder.fault_healed(idx),
            }
        });
    }

    /// The failover oracle: `bound` after member `departed` (incarnation `id`) crashed or left,
    /// no survivor that was connected throughout may still list it.
    fn judge_departure(
        self: &Arc<Self>,
        departed: usize,
        id: MemberId,
        bound: Duration,
        how: &'static str,
    ) {
        if self.control.node().is_none() {
            return; // In memory: a departure is seen at once, there is nothing to judge.
        }
        let at = Instant::now();
        let c = self.clone();
        self.background(async move {
            sleep(bound).await;
            let views: Vec<(usize, String, Incarnation)> = {
                let slots = lock(&c.slots);
                slots
                    .iter()
                    .enumerate()
                    .filter(|(j, s)| *j != departed && s.alive && !s.paused)
                    .filter_map(|(j, s)| {
                        lock(&s.current).clone().map(|inc| (j, s.name.clone(), inc))
                    })
                    .collect()
            };
            // Kubernetes: a member removes the departed one (deletes its Lease); that needs
            // some other member that could reach the API server the whole time.
            let expiry = bound > c.oracles.bounds().delivery() + POLL;
            if expiry && c.oracles.bounds().cleaned_by_peers {
                let members = c.member_count();
                let cleaner = views.iter().any(|(k, _, inc)| {
                    *k < members
                        && inc.ready_at.is_some_and(|r| r <= at)
                        && c.health.healthy_since(*k).is_some_and(|h| h <= at)
                });
                if !cleaner {
                    c.recorder
                        .count("failover: not judged (no member reached the API server throughout)");
                    return;
                }
            }
            for (_, name, inc) in c.connected_views(at, Some(departed)) {
                if inc.manager.topology().contains(&id) {
                    c.recorder.violation_once(
                        format!("failover {id} {name}"),
                        format!(
                            "failover: {name} still lists {id} {} ms after it {how} (bound {} ms: {}), though {name} was connected throughout",
                            bound.as_millis(),
                            bound.as_millis(),
                            if expiry {
                                "TTL, sweep and delivery"
                            } else {
                                "one delivery after an accepted leave"
                            }
                        ),
                    );
                }
            }
        });
    }

    /// Applies `fault` now; faults with a duration heal themselves in background tasks.
    pub fn apply(self: &Arc<Self>, fault: &Fault) {
        let names = |ms: &[usize]| ms.iter().map(|i| format!("m{i}")).collect::<Vec<_>>();
        let members = self.member_count();
        let registry = self.registry_node_id();
        self.recorder.count(&format!("fault: {}", fault.kind()));
        match fault.clone() {
            Fault::Partition {
                members: group,
                with_registry,
                duration,
            } => {
                let group: Vec<usize> = group.into_iter().filter(|&i| i < members).collect();
                let mut ids: BTreeSet<NodeId> = group.iter().map(|&i| self.node_id(i)).collect();
                let lost = if with_registry {
                    ids.extend(registry);
                    self.node_count().saturating_sub(group.len())
                } else {
                    group.len()
                };
                let links = cut(&ids, &self.all_node_ids());
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&group));
                self.clog_for(links, duration, idx, lost);
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
                self.clog_for(links, duration, idx, hit.len());
            }
            Fault::OneWay {
                from: member,
                duration,
            }
            | Fault::ReplyLost { member, duration } => {
                let (Some(r), true) = (registry, member < members) else {
                    return;
                };
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                let m = self.node_id(member);
                // One-way: the member's requests are lost; reply-lost: the answers are.
                let link = if matches!(fault, Fault::OneWay { .. }) {
                    (m, r)
                } else {
                    (r, m)
                };
                self.clog_for(vec![link], duration, idx, 1);
            }
            Fault::Swizzle {
                members: order,
                step,
                hold,
            } => {
                let Some(r) = registry else { return };
                let order: Vec<usize> = order.into_iter().filter(|&i| i < members).collect();
                self.reconnected(order.len());
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&order));
                let c = self.clone();
                self.background(async move {
                    let link = |i: usize| {
                        let n = c.node_id(i);
                        vec![(n, r), (r, n)]
                    };
                    for &i in &order {
                        if c.is_healed() {
                            return;
                        }
                        c.links.clog(&link(i));
                        c.refresh_health();
                        sleep(step).await;
                    }
                    sleep(hold).await;
                    // Unclog in another order: every other one first, then the rest.
                    let mut again: Vec<usize> = order.iter().copied().step_by(2).collect();
                    again.extend(order.iter().copied().skip(1).step_by(2));
                    for i in again {
                        if c.is_healed() {
                            return;
                        }
                        c.links.unclog(&link(i));
                        c.reconnected(1);
                        c.refresh_health();
                        sleep(step).await;
                    }
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::HeartbeatLoss { member, duration } => {
                if member >= members {
                    return;
                }
                let m = MemberRef {
                    index: member,
                    ip: member_ip(member),
                    id: self.member_id(member),
                };
                if !self.control.lose_renewals(&m, true) {
                    return;
                }
                self.reconnected(1);
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                lock(&self.slots)[member].lost_heartbeats = true;
                self.refresh_health();
                self.later(duration, move |c| {
                    c.control.lose_renewals(&m, false);
                    lock(&c.slots)[member].lost_heartbeats = false;
                    c.reconnected(1);
                    c.refresh_health();
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
            Fault::Leave {
                member,
                rejoin_after,
            } => {
                if member >= members {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                self.leave(member, rejoin_after, idx);
            }
            Fault::Pause { member, duration } => {
                if member >= members || !lock(&self.slots)[member].alive {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                lock(&self.slots)[member].paused = true;
                self.reconnected(1);
                self.handle.pause(self.node_id(member));
                self.refresh_health();
                let name = lock(&self.slots)[member].name.clone();
                self.activation.set_paused(&name, true);
                self.pod_not_ready_later(&name);
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
                let clock = {
                    let mut slots = lock(&self.slots);
                    let bound = i64::from(shoal::provider::LeaseTiming::DEFAULT_MAX_DRIFT_PPM);
                    slots[member].wild_clock |= drift_ppm.abs() > bound;
                    if slots[member].wild_clock {
                        self.activation.set_wild(&slots[member].name);
                    }
                    slots[member].clock.clone()
                };
                clock.set_wall_offset_ms(offset_ms);
                clock.set_drift_ppm(drift_ppm);
            }
            Fault::RegistryClock {
                offset_ms,
                drift_ppm,
            } => {
                let Some(clock) = self.control.clock() else {
                    return;
                };
                self.recorder
                    .fault_started(fault.to_string(), vec![self.control.name().into()]);
                clock.set_wall_offset_ms(offset_ms);
                clock.set_drift_ppm(drift_ppm.clamp(
                    -crate::faults::REGISTRY_MAX_DRIFT_PPM,
                    crate::faults::REGISTRY_MAX_DRIFT_PPM,
                ));
            }
            Fault::RegistryClockStep { back_ms, down_for } => {
                let Some(clock) = self.control.clock() else {
                    return;
                };
                let (offset, _) = clock.skew();
                clock.set_wall_offset_ms(offset - back_ms as i64);
                self.crash_registry(fault, down_for, false);
            }
            Fault::RegistryRestart { down_for } => self.crash_registry(fault, down_for, false),
            Fault::BackendDataLoss { down_for } => self.crash_registry(fault, down_for, true),
            Fault::RegistryPause { duration } => {
                if !self.control.pause() {
                    return;
                }
                self.reconnected(self.node_count());
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), vec![self.control.name().into()]);
                self.refresh_health();
                self.later(duration, move |c| {
                    c.reconnected(c.node_count());
                    c.control.resume();
                    c.refresh_health();
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
                let links = cut(
                    &BTreeSet::from([self.node_id(member)]),
                    &self.all_node_ids(),
                );
                let c = self.clone();
                self.background(async move {
                    for _ in 0..times {
                        if c.is_healed() {
                            return;
                        }
                        c.links.clog(&links);
                        c.reconnected(1);
                        c.refresh_health();
                        sleep(period).await;
                        c.links.unclog(&links);
                        c.reconnected(1);
                        c.refresh_health();
                        sleep(period).await;
                    }
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::StreamReset { times, period } => {
                if self.control.node().is_none() {
                    return;
                }
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), vec![self.control.name().into()]);
                let c = self.clone();
                self.background(async move {
                    for k in 0..times {
                        if c.is_healed() {
                            return;
                        }
                        if k > 0 {
                            sleep(period).await;
                        }
                        c.reconnected(c.node_count());
                        c.control.reset_streams();
                    }
                    c.recorder.fault_healed(idx);
                });
            }
            Fault::Describe { member, generation } => {
                if member >= members {
                    return;
                }
                let signal = {
                    let slots = lock(&self.slots);
                    let s = &slots[member];
                    let running = lock(&s.current)
                        .as_ref()
                        .is_some_and(|i| i.ready_at.is_some());
                    (s.alive && !s.leaving && running).then(|| s.describe.clone())
                };
                let Some(signal) = signal else {
                    self.recorder
                        .count("fault: describe skipped (member not running)");
                    return;
                };
                let idx = self
                    .recorder
                    .fault_started(fault.to_string(), names(&[member]));
                *lock(&signal.generation) = Some(generation);
                signal.notify.notify_one();
                self.recorder.fault_healed(idx);
            }
        }
    }

    /// Crashes the control plane (`lose_data`: with its store) and restarts it after
    /// `down_for`.
    fn crash_registry(self: &Arc<Self>, fault: &Fault, down_for: Duration, lose_data: bool) {
        let Some(crash) = self.control.crash(lose_data) else {
            return;
        };
        let idx = self
            .recorder
            .fault_started(fault.to_string(), vec![self.control.name().into()]);
        self.reconnected(self.node_count());
        self.refresh_health();
        self.recorder.trace(self.control.name(), "crashed");
        self.later(down_for, move |c| {
            // Only the latest crash's restart brings it back.
            c.reconnected(c.node_count());
            c.control.restart_after(crash);
            c.refresh_health();
            c.recorder.fault_healed(idx);
        });
    }

    /// `n` nodes had to reconnect to the control plane (the load budget's allowance).
    fn reconnected(&self, n: usize) {
        self.reconnects.fetch_add(n as u64, Ordering::SeqCst);
    }

    fn resume(&self, i: usize) {
        let mut slots = lock(&self.slots);
        if slots[i].paused {
            slots[i].paused = false;
            slots[i].unpaused_at = Some(Instant::now());
            self.activation.set_paused(&slots[i].name, false);
            let id = slots[i].node.id();
            let pod = pod_name(&slots[i].name);
            drop(slots);
            self.reconnected(1);
            self.handle.resume(id);
            if let Some(e) = self.endpoints() {
                // Its readiness probe passes again.
                e.update(&pod, e.generation(&pod), PodState::Serving);
            }
            self.refresh_health();
        }
    }

    /// The endpoints controller, when members are gated by a Service.
    fn endpoints(&self) -> Option<Arc<EndpointController>> {
        self.control.endpoints()
    }

    /// The endpoints controller withdraws Pod `pod` (generation `generation`): its endpoint
    /// goes `state`; the gating oracle then judges that connected nodes stop listing it.
    fn withdraw(self: &Arc<Self>, pod: &str, generation: u64, state: PodState) {
        let Some(e) = self.endpoints() else { return };
        if !e.update(pod, generation, state) {
            return;
        }
        let Some((_, ip, _, change)) = e.state(pod) else {
            return;
        };
        let at = Instant::now();
        let pod = pod.to_string();
        let c = self.clone();
        self.background(async move {
            sleep(WITHDRAWAL).await;
            // Judged only if the endpoint stayed withdrawn (not restarted, not resumed).
            if e.state(&pod).is_none_or(|(.., now)| now != change) || c.is_healed() {
                return;
            }
            let host = ip.to_string();
            for (_, name, inc) in c.connected_views(at, None) {
                let t = inc.manager.topology();
                let Some(m) = t
                    .members()
                    .iter()
                    .find(|m| m.address.rsplit_once(':').is_some_and(|(h, _)| h == host))
                else {
                    continue;
                };
                c.recorder.violation_once(
                    format!("withdrawn {pod} {change} {name}"),
                    format!(
                        "endpoints: {name} still lists {} ({}) {} ms after the endpoint of its Pod {pod} went {state:?} (bound {} ms: one delivery and a watch reopen), though {name} was connected throughout",
                        m.id,
                        m.address,
                        WITHDRAWAL.as_millis(),
                        WITHDRAWAL.as_millis()
                    ),
                );
            }
        });
    }

    /// Nodes other than `except` that are running, started before `at`, and whose path to the
    /// registry (API server) was healthy from before `at` on (long enough for a watch to have
    /// recovered from any earlier fault): they must have seen whatever was published at `at`.
    fn connected_views(
        &self,
        at: Instant,
        except: Option<usize>,
    ) -> Vec<(usize, String, Incarnation)> {
        let views: Vec<(usize, String, Incarnation)> = {
            let slots = lock(&self.slots);
            slots
                .iter()
                .enumerate()
                .filter(|(j, s)| Some(*j) != except && s.alive && !s.paused)
                .filter_map(|(j, s)| lock(&s.current).clone().map(|inc| (j, s.name.clone(), inc)))
                .collect()
        };
        views
            .into_iter()
            .filter(|(j, _, inc)| {
                let (Some(ready), Some(healthy)) = (inc.ready_at, self.health.healthy_since(*j))
                else {
                    return false;
                };
                ready <= at && (healthy <= inc.started_at || healthy + CONNECTED_FOR <= at)
            })
            .collect()
    }

    /// A Pod that crashed or froze fails its readiness probe: its endpoint is not ready 3 s
    /// later (three probes), unless it was restarted meanwhile.
    fn pod_not_ready_later(self: &Arc<Self>, node: &str) {
        let Some(e) = self.endpoints() else { return };
        let pod = pod_name(node);
        let generation = e.generation(&pod);
        self.later(Duration::from_secs(3), move |c| {
            let still_down = lock(&c.slots)
                .iter()
                .any(|s| pod_name(&s.name) == pod && (!s.alive || s.paused));
            if still_down {
                c.withdraw(&pod, generation, PodState::NotReady);
            }
        });
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

    fn background(&self, fut: impl std::future::Future<Output = ()> + Send + 'static) {
        // Tasks of the node that runs the scenario survive every fault.
        let task = madsim::task::spawn(fut);
        let mut tasks = lock(&self.background);
        tasks.retain(|t| !t.is_finished());
        tasks.push(task.abort_handle());
    }
}

/// Everything a node's init task needs (cloned on every (re)start).
#[derive(Clone)]
struct NodeSpec {
    name: String,
    ip: IpAddr,
    is_client: bool,
    /// The control plane it reaches through its provider.
    control: Arc<dyn ControlPlane>,
    flaw: Flaw,
    clock: Arc<SkewedClock>,
    current: Arc<Mutex<Option<Incarnation>>>,
    recorder: Recorder,
    oracles: Arc<Oracles>,
    knobs: Knobs,
    stop: Arc<StopSignal>,
    describe: Arc<DescribeSignal>,
    metrics: Arc<Mutex<Vec<MetricSource>>>,
    fresh: Arc<FreshOwners>,
    app: Option<AppFn>,
    activation: Arc<ActivationOracle>,
    failover: Arc<FailoverMeter>,
    /// The node's slot.
    index: usize,
}

impl NodeSpec {
    /// Applies each [`Fault::Describe`] addressed to this node through the provider.
    async fn describer(self, provider: Arc<dyn ClusterProvider>) {
        loop {
            self.describe.notify.notified().await;
            let Some(generation) = lock(&self.describe.generation).take() else {
                continue;
            };
            let d = description_of(generation);
            if let Some(inc) = lock(&self.current).as_mut() {
                inc.description = d.clone();
            }
            match provider.update_member(d).await {
                Ok(()) => self.recorder.trace(
                    &self.name,
                    format!("description generation {generation} shown"),
                ),
                Err(e) => {
                    self.recorder
                        .count("node: description update not shown in time");
                    self.recorder.trace(
                        &self.name,
                        format!("description generation {generation}: {e}"),
                    );
                }
            }
        }
    }

    async fn run(self) {
        // Processes start at different moments (0-2 s apart), so heartbeat phases differ.
        sleep(Duration::from_millis(madsim::rand::random::<u64>() % 2_000)).await;
        let clock: SharedClock = self.clock.clone();
        let kinds: Vec<&str> = if self.is_client { vec![] } else { vec![KIND] };
        let mut ctx =
            ClusterProviderContext::new(CLUSTER, format!("{}:4000", self.ip), kinds, clock)
                .expect("valid member")
                .with_events(EventStream::new(self.knobs.event_capacity))
                .with_partition_config(PartitionConfig {
                    max_cached_identities: self.knobs.cache_capacity,
                    rule: self.knobs.placement_rule(),
                });
        let id = ctx.member.id.clone();
        self.recorder
            .trace(&self.name, format!("incarnation {id} starting"));
        {
            let mut m = lock(&self.metrics);
            m.push(MetricSource::Events(ctx.events.metrics().clone()));
            m.push(MetricSource::Placement(
                ctx.partition_manager.metrics().clone(),
            ));
        }
        // Record every topology the node applies (subscribed before the provider starts).
        let mut events = ctx.events.subscribe();
        let workload_events = ctx.events.subscribe();
        let (rec, oracles, name, rid, pm, current) = (
            self.recorder.clone(),
            self.oracles.clone(),
            self.name.clone(),
            id.clone(),
            ctx.partition_manager.clone(),
            self.current.clone(),
        );
        let (failover, index) = (self.failover.clone(), self.index);
        let chain = EventChain::shared();
        let chained = chain.clone();
        madsim::task::spawn(async move {
            loop {
                match events.recv().await {
                    Ok(ClusterEvent::TopologyChanged { topology, report }) => {
                        lock(&chained).changed(&name, &topology, &report, &rec);
                        let fp = crate::fingerprint::of(&topology);
                        rec.observe(&name, &rid, &topology, fp);
                        oracles.applied(&name, &topology, fp);
                        failover.applied(index, &topology);
                    }
                    Ok(ClusterEvent::MembershipLost { member, reason, .. }) => {
                        rec.trace(&name, format!("membership lost as {member}: {reason}"));
                        oracles.lost(&member);
                    }
                    Ok(ClusterEvent::MembershipRestored {
                        member, previous, ..
                    }) => {
                        rec.trace(
                            &name,
                            format!("membership restored as {} (was {previous})", member.id),
                        );
                        if let Some(inc) = lock(&current).as_mut()
                            && inc.id != member.id
                        {
                            let old = std::mem::replace(&mut inc.id, member.id.clone());
                            inc.earlier_ids.push(old);
                        }
                    }
                    Ok(_) => {}
                    Err(shoal::SubscriptionError::Lagged { missed }) => {
                        lock(&chained).lagged();
                        rec.trace(&name, format!("event stream lagged by {missed}"));
                        // The view itself is still judged: the manager holds it.
                        let t = pm.topology();
                        if t.version() > 0 {
                            oracles.applied(&name, &t, crate::fingerprint::of(&t));
                            failover.applied(index, &t);
                        }
                    }
                    Err(shoal::SubscriptionError::Closed) => break,
                }
            }
        });
        let provider = self.control.provider(&NodeInfo {
            name: self.name.clone(),
            ip: self.ip,
            is_client: self.is_client,
        });
        let provider: Arc<dyn ClusterProvider> = if self.flaw.wraps_provider() {
            Arc::new(FlawedProvider::new(provider, self.flaw))
        } else {
            provider
        };
        *lock(&self.current) = Some(Incarnation {
            id: id.clone(),
            earlier_ids: Vec::new(),
            abandoned_ids: Vec::new(),
            manager: ctx.partition_manager.clone(),
            started_at: Instant::now(),
            ready_at: None,
            description: if self.is_client {
                Description::default()
            } else {
                base_description()
            },
            activation: None,
            events: chain,
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
                    self.recorder.count("node: start retried");
                    self.recorder
                        .trace(&self.name, format!("start failed (attempt {attempt}): {e}"));
                    // A failed start withdrew its registration: the next attempt is a new
                    // incarnation (peers may have seen this one come and go).
                    let next = ctx.member.id.successor(self.clock.as_ref());
                    if let Some(inc) = lock(&self.current).as_mut() {
                        let old = std::mem::replace(&mut inc.id, next.clone());
                        inc.abandoned_ids.push(old);
                    }
                    ctx = ctx.with_member_id(next);
                    sleep(Duration::from_secs(1)).await;
                }
            }
        }
        // Actors: members host them (served by the real partition service over the simulated
        // network); every node calls them.
        let host = (!self.is_client).then(|| {
            let actors = SimActors::new(
                self.name.clone(),
                ctx.clone(),
                self.knobs.placement_rule(),
                self.activation.clone(),
                self.recorder.clone(),
            );
            let host = ActivationHost::new(
                ctx.clone(),
                actors.clone(),
                crate::activation::transport(&ctx),
                crate::activation::config(),
            );
            actors.attach(&host);
            host
        });
        if let Some(host) = &host {
            // Detached: it dies with the node.
            drop(host.start());
            let service = PartitionService::new(ctx.partition_manager.clone())
                .with_host(host.clone())
                .server();
            let addr = SocketAddr::new(self.ip, crate::activation::PORT);
            let rec = self.recorder.clone();
            let name = self.name.clone();
            madsim::task::spawn(async move {
                if let Err(e) = tonic::transport::Server::builder()
                    .add_service(service)
                    .serve(addr)
                    .await
                {
                    rec.trace(&name, format!("partition service ended: {e}"));
                }
            });
        }
        let client = crate::activation::client(&ctx, host.clone());
        if let Some(inc) = lock(&self.current).as_mut() {
            inc.ready_at = Some(Instant::now());
            inc.activation = Some(client.clone());
        }
        madsim::task::spawn(crate::activation::workload(client, self.recorder.clone()));
        self.recorder.trace(&self.name, "provider started");
        if !self.is_client {
            madsim::task::spawn(self.clone().describer(provider.clone()));
        }
        madsim::task::spawn(
            Workload::new(
                self.name.clone(),
                ctx.clone(),
                self.recorder.clone(),
                workload_events,
                self.knobs.cache_capacity,
                self.fresh.clone(),
            )
            .run(),
        );
        let app = async {
            if let Some(app) = self.app {
                app(NodeApp {
                    name: self.name.clone(),
                    is_client: self.is_client,
                    ctx: ctx.clone(),
                    recorder: self.recorder.clone(),
                })
                .await;
            }
            std::future::pending::<()>().await;
        };
        let stop = async {
            loop {
                self.stop.notify.notified().await;
                if self.stop.requested.load(Ordering::SeqCst) {
                    return;
                }
            }
        };
        tokio::select! {
            biased;
            _ = stop => {}
            _ = app => {}
        }
        if let Some(host) = &host {
            host.shutdown();
        }
        match provider.shutdown(true).await {
            Ok(()) => self
                .recorder
                .trace(&self.name, "provider shut down gracefully"),
            Err(e) => self
                .recorder
                .trace(&self.name, format!("graceful shutdown failed: {e}")),
        }
        *lock(&self.stop.done) = Some(Instant::now());
        std::future::pending::<()>().await;
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
