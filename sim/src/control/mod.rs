//! The simulated control planes, one module each, all behind one trait: [`ControlPlane`].
//!
//! A control plane is what the members' provider talks to: the gRPC registry
//! ([`registry`]), the Kubernetes API server with its endpoints controller ([`apiserver`]),
//! etcd ([`etcd`]), or nothing at all (the in-memory provider, [`memory`]). Each module owns
//! its start, the faults it supports (crash, restart, data loss, freeze, lost renewals, reset
//! watch streams, its clock), the bounds the oracles hold it to, its load meter and budget, and
//! the providers members use to reach it. [`crate::cluster::SimCluster`] only composes nodes,
//! links and one control plane: adding a provider means one new module here and its scenarios.
//!
//! Every control plane but the in-memory one runs on a simulated node of its own at
//! [`ADDRESS`], behind a door that tells the oracles what it *accepted* (the harness's only
//! observation point) and counts what it served ([`crate::load`]).

pub mod apiserver;
pub mod delays;
pub mod etcd;
pub mod memory;
pub mod registry;
pub mod wire;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::runtime::{Handle, NodeHandle};
use madsim::task::NodeId;
use madsim::time::Instant;
use shoal::runtime::SkewedClock;
use shoal::{ClusterProvider, ClusterTopology, MemberId};

use crate::cluster::ProviderKind;
use crate::knobs::Knobs;
use crate::load::{LoadBudget, LoadCounts};
use crate::oracle::{Bounds, Oracles};
use crate::record::Recorder;

/// The control plane's address: every one listens at 10.0.0.1 (on its own port).
pub const ADDRESS: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

/// A member node, as a control plane's faults name it.
#[derive(Clone, Debug)]
pub struct MemberRef {
    /// Its index (`m{index}`).
    pub index: usize,
    /// Its node's address.
    pub ip: IpAddr,
    /// Its current incarnation, if it runs.
    pub id: Option<MemberId>,
}

/// A node about to start its provider.
#[derive(Clone, Debug)]
pub struct NodeInfo {
    /// Node name (`m3`, `client0`).
    pub name: String,
    /// Its address.
    pub ip: IpAddr,
    /// A client (watches, hosts nothing).
    pub is_client: bool,
}

/// What a control plane's store holds when it comes back from a crash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Store {
    /// Its data, as it was.
    #[default]
    Kept,
    /// Nothing: a new store (for etcd another cluster id, revisions from 1).
    Lost,
    /// The copy [`ControlPlane::save_snapshot`] saved last, under the same identity (for etcd
    /// the same cluster id, its revision back at the snapshot's): a restore from a backup.
    Restored,
}

/// What every control plane offers the harness.
pub trait ControlPlane: Send + Sync + std::fmt::Debug + 'static {
    /// Its name in traces and messages (`registry`, `apiserver`, `etcd`, `memory`).
    fn name(&self) -> &'static str;

    /// The bounds the oracles hold it (and the providers) to.
    fn bounds(&self) -> &Bounds;

    /// How long after the last fault healed every live node must have converged.
    fn liveness_bound(&self) -> Duration;

    /// The simulated node it runs on (`None`: nothing to partition from).
    fn node(&self) -> Option<NodeId>;

    /// The provider node `node` runs against this control plane (called inside the node, on
    /// every start of its process).
    fn provider(&self, node: &NodeInfo) -> Arc<dyn ClusterProvider>;

    /// What the backend lists now, for the lease oracle: the run it belongs to (a backend that
    /// lost its state starts a new run) and the members; `None` while it cannot be judged
    /// (down, frozen).
    fn listed(&self) -> Option<(u64, Arc<ClusterTopology>)>;

    /// Whether it is down or frozen (every path to it is disturbed).
    fn disturbed(&self) -> bool;

    /// Crashes it; `store` says what its restart comes back with. Returns the crash's number,
    /// for [`Self::restart_after`]; `None` if it cannot crash (or cannot come back that way).
    fn crash(&self, store: Store) -> Option<u64>;

    /// Saves a copy of its store now (`etcdctl snapshot save`), for a later crash that comes
    /// back with [`Store::Restored`]; false if it keeps no store of its own.
    fn save_snapshot(&self) -> bool {
        false
    }

    /// Whether nodes that hold the same state of its store label it with the same (epoch,
    /// version), so converged views must agree on both (false where each node numbers its own
    /// topologies, or after a restore that each node reckons a new epoch for).
    fn epochs_agree(&self) -> bool {
        true
    }

    /// Restarts it if crash `crash` is still the latest one (a later crash owns the restart).
    fn restart_after(&self, crash: u64);

    /// Freezes it (a VM pause); false if it cannot be frozen now (down, frozen, or no node).
    fn pause(&self) -> bool;

    /// Every simulated node it runs on (several for a multi-member backend): a partition from
    /// the control plane cuts a member off from all of them.
    fn nodes(&self) -> Vec<NodeId> {
        self.node().into_iter().collect()
    }

    /// Freezes one member of a multi-member backend (`member` modulo how many there are) if
    /// it runs and nothing else is frozen or down; which one it froze.
    fn freeze_member(&self, _member: usize) -> Option<usize> {
        None
    }

    /// Thaws backend member `k` if frozen.
    fn thaw_member(&self, _k: usize) {}

    /// Crashes one member of a multi-member backend (as [`Self::freeze_member`] picks it);
    /// which one, and the crash's number for [`Self::restart_member_after`].
    fn crash_member(&self, _member: usize) -> Option<(usize, u64)> {
        None
    }

    /// Restarts backend member `k` with its data if crash `crash` is still its latest.
    fn restart_member_after(&self, _k: usize, _crash: u64) {}

    /// Until when the view of the node at `ip` may lag, if its watch was open on a backend
    /// member that froze or crashed and that stall lasted past `since`: until the member came
    /// back, the node opened a watch elsewhere, or the time a client that notices silence
    /// needs passed, whichever came first (the failover oracle waits for it). Observed at the
    /// backend's doors, not asked of the provider.
    fn view_stalled_until(&self, _ip: IpAddr, _since: Instant) -> Option<Instant> {
        None
    }

    /// Changes the auth store (every token issued before is refused as old); false where the
    /// backend does not authenticate.
    fn change_auth(&self) -> bool {
        false
    }

    /// Resumes it if frozen.
    fn resume(&self);

    /// Its wall clock, if a fault can skew it (the registry's).
    fn clock(&self) -> Option<Arc<SkewedClock>> {
        None
    }

    /// Starts or stops losing member `m`'s renewals at the door (heartbeats, Lease updates,
    /// keep-alives) while its other traffic flows; false if there is no door.
    fn lose_renewals(&self, m: &MemberRef, lost: bool) -> bool;

    /// Ends every watch stream open at the door (a proxy or NIC in front restarting); false if
    /// there is no door.
    fn reset_streams(&self) -> bool;

    /// The late answers and lagging watches its door applies per member (faults
    /// `slow-answers`, `lagging-watch`); `None` where the door does not model them.
    fn delays(&self) -> Option<&delays::Delays> {
        None
    }

    /// Starts (`Some(retry_after)`) or stops shedding reads (lists and watches) with
    /// `429 Too Many Requests` and that `Retry-After`, as API Priority and Fairness does when a
    /// priority level's queues are full; the door flags a client that sends a shed read again
    /// sooner. False where the control plane has no such pushback.
    fn shed_reads(&self, _retry_after: Option<Duration>) -> bool {
        false
    }

    /// Heals what the faults did to it: restarts it if down, resumes it if frozen, delivers
    /// every renewal again.
    fn heal(&self);

    /// Everything its door counted so far.
    fn load(&self) -> LoadCounts;

    /// What the provider's design says it should carry.
    fn budget(&self) -> LoadBudget;

    /// Adds its own rare-path counters (its providers' and its server's metrics) to the
    /// recorder; once, at the end of a run.
    fn record_path_counts(&self, rec: &Recorder);

    /// The endpoints controller, where members are gated by a Kubernetes Service.
    fn endpoints(&self) -> Option<Arc<apiserver::EndpointController>> {
        None
    }

    /// Drops what it shares with the nodes (end of run).
    fn teardown(&self);
}

/// The bounds the oracles judge a cluster on `kind` by.
pub fn bounds(kind: ProviderKind, knobs: &Knobs) -> Bounds {
    match kind {
        ProviderKind::Kubernetes => apiserver::bounds(knobs),
        ProviderKind::Etcd => etcd::bounds(knobs),
        ProviderKind::Registry => registry::bounds(knobs),
        ProviderKind::InMemory => memory::bounds(knobs),
    }
}

/// What a control plane is started with.
#[derive(Clone, Debug)]
pub struct Env {
    /// The runtime's handle.
    pub handle: Handle,
    /// The run's oracles.
    pub oracles: Arc<Oracles>,
    /// The run's recorder.
    pub rec: Recorder,
    /// The seed's knobs.
    pub knobs: Knobs,
    /// How many members the cluster runs (the API server sizes its event history by it).
    pub members: usize,
}

/// Starts the control plane of `kind`.
pub fn start(kind: ProviderKind, env: Env) -> Arc<dyn ControlPlane> {
    match kind {
        ProviderKind::Registry => registry::RegistryPlane::start(env),
        ProviderKind::Kubernetes => apiserver::ApiServerPlane::start(env),
        ProviderKind::Etcd => etcd::EtcdPlane::start(env),
        ProviderKind::InMemory => memory::MemoryPlane::start(env),
    }
}

/// The node a control plane runs on, and what the harness keeps of it across crashes: whether
/// it is down or frozen and since when, and which crash is the latest.
pub struct ControlNode {
    handle: Handle,
    node: NodeHandle,
    crashes: AtomicU64,
    down: AtomicBool,
    paused_since: Mutex<Option<Instant>>,
    down_since: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl std::fmt::Debug for ControlNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlNode")
            .field("node", &self.node.id())
            .field("down", &self.is_down())
            .field("paused", &self.is_paused())
            .finish()
    }
}

impl ControlNode {
    /// The control plane's node `node`.
    pub fn new(handle: Handle, node: NodeHandle) -> Self {
        Self {
            handle,
            node,
            crashes: AtomicU64::new(0),
            down: AtomicBool::new(false),
            paused_since: Mutex::new(None),
            down_since: Mutex::new(None),
        }
    }

    /// Its id.
    pub fn id(&self) -> NodeId {
        self.node.id()
    }

    /// Whether it is down (crashed, not restarted yet).
    pub fn is_down(&self) -> bool {
        self.down.load(Ordering::SeqCst)
    }

    /// Whether it is frozen.
    pub fn is_paused(&self) -> bool {
        lock(&self.paused_since).is_some()
    }

    /// Kills it (thawing it first if frozen); returns the crash's number.
    pub fn kill(&self) -> u64 {
        if lock(&self.paused_since).take().is_some() {
            self.handle.resume(self.node.id());
        }
        self.handle.kill(self.node.id());
        if !self.down.swap(true, Ordering::SeqCst) {
            *lock(&self.down_since) = Some(Instant::now());
        }
        self.crashes.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Whether `crash` is the latest crash.
    pub fn is_latest(&self, crash: u64) -> bool {
        self.crashes.load(Ordering::SeqCst) == crash
    }

    /// Restarts it if it is down; how long it was down.
    pub fn revive(&self) -> Option<Duration> {
        if !self.down.swap(false, Ordering::SeqCst) {
            return None;
        }
        self.handle.kill(self.node.id());
        self.handle.restart(self.node.id());
        Some(
            lock(&self.down_since)
                .take()
                .map_or(Duration::ZERO, |t| t.elapsed()),
        )
    }

    /// Freezes it; false if it is down or frozen already.
    pub fn pause(&self) -> bool {
        if self.is_down() || self.is_paused() {
            return false;
        }
        *lock(&self.paused_since) = Some(Instant::now());
        self.handle.pause(self.node.id());
        true
    }

    /// Thaws it; how long it was frozen.
    pub fn resume(&self) -> Option<Duration> {
        let since = lock(&self.paused_since).take()?;
        self.handle.resume(self.node.id());
        Some(since.elapsed())
    }

    /// Kills it for good (end of run: madsim then drops its tasks).
    pub fn teardown(&self) {
        self.handle.kill(self.node.id());
    }
}
