//! The in-memory provider: every node of a cluster in one process (tests, single-process apps,
//! and simulated clusters, where all madsim nodes share one process).
//!
//! An [`InMemoryRegistry`] plays the membership backend. A member's registration lives as long as
//! its provider's watch task: a graceful shutdown leaves explicitly, and a crash (the task being
//! dropped, as when a simulated node is killed) removes it too, so peers are told at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use tokio::sync::broadcast;

use super::{
    ClusterProvider, ClusterProviderContext, LocalPartitionManager, PartitionManagerHandle,
    ProviderError,
};
use crate::cluster::{ClusterTopology, Description, Member, MemberId, MemberLimits};
use crate::placement::{PartitionManager, PlacementError};
use crate::runtime::TaskHandle;

/// The shared membership backend of the in-memory world. Clone it into every node's provider.
///
/// Each cluster holds its latest topology and a bounded change signal: a watcher that falls
/// behind skips straight to the newest topology instead of queueing every version. (Not
/// `tokio::sync::watch`: its wake-up order comes from tokio's unseeded RNG, which would make
/// simulations irreproducible.)
#[derive(Clone, Debug, Default)]
pub struct InMemoryRegistry {
    inner: Arc<Mutex<Backend>>,
}

#[derive(Debug, Default)]
struct Backend {
    /// Version source shared by every cluster, so a cluster that is dropped and recreated
    /// never reuses a version.
    last_version: u64,
    limits: MemberLimits,
    clusters: BTreeMap<String, ClusterState>,
}

#[derive(Debug)]
struct ClusterState {
    members: BTreeMap<MemberId, Registration>,
    latest: Arc<ClusterTopology>,
    changed: broadcast::Sender<u64>,
}

/// A watcher of one cluster: waits for a change signal, then reads the newest topology.
#[derive(Debug)]
struct Watcher {
    registry: InMemoryRegistry,
    cluster: String,
    rx: broadcast::Receiver<u64>,
}

impl Watcher {
    fn latest(&self) -> Arc<ClusterTopology> {
        self.registry.topology(&self.cluster)
    }

    /// The next newer topology, or `None` when the cluster's state is gone.
    async fn next(&mut self) -> Option<Arc<ClusterTopology>> {
        match self.rx.recv().await {
            // Lagging only means several changes happened: the newest one covers them.
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => Some(self.latest()),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

#[derive(Debug)]
struct Registration {
    member: Member,
    partition_manager: Arc<PartitionManager>,
}

impl InMemoryRegistry {
    /// An empty registry with default member limits.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty registry enforcing `limits` on joining members.
    pub fn with_limits(limits: MemberLimits) -> Self {
        let registry = Self::default();
        registry.lock().limits = limits;
        registry
    }

    /// The current topology of `cluster` (empty, version 0, if nobody ever joined it).
    pub fn topology(&self, cluster: &str) -> Arc<ClusterTopology> {
        match self.lock().clusters.get(cluster) {
            Some(state) => state.latest.clone(),
            None => Arc::new(ClusterTopology::empty(cluster)),
        }
    }

    /// Names of clusters with members or watchers, sorted.
    pub fn clusters(&self) -> Vec<String> {
        self.lock().clusters.keys().cloned().collect()
    }

    fn lock(&self) -> MutexGuard<'_, Backend> {
        // Every mutation below completes before it can panic, so a poisoned lock is consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn join(
        &self,
        cluster: &str,
        member: Member,
        partition_manager: Arc<PartitionManager>,
    ) -> Result<Watcher, ProviderError> {
        let mut backend = self.lock();
        member.validate(&backend.limits)?;
        let state = backend.cluster(cluster);
        if state.members.contains_key(&member.id) {
            return Err(ProviderError::DuplicateMember(member.id));
        }
        state.members.insert(
            member.id.clone(),
            Registration {
                member,
                partition_manager,
            },
        );
        let rx = state.changed.subscribe();
        backend.publish(cluster);
        Ok(Watcher {
            registry: self.clone(),
            cluster: cluster.to_string(),
            rx,
        })
    }

    fn watch(&self, cluster: &str) -> Watcher {
        let rx = self.lock().cluster(cluster).changed.subscribe();
        Watcher {
            registry: self.clone(),
            cluster: cluster.to_string(),
            rx,
        }
    }

    /// Removes `id` from `cluster`; returns whether it was there.
    fn leave(&self, cluster: &str, id: &MemberId) -> bool {
        let mut backend = self.lock();
        let removed = backend
            .clusters
            .get_mut(cluster)
            .is_some_and(|state| state.members.remove(id).is_some());
        if removed {
            backend.publish(cluster);
        }
        removed
    }

    /// Replaces the description of `id` in `cluster` (a change only when it differs).
    fn describe(
        &self,
        cluster: &str,
        id: &MemberId,
        description: Description,
    ) -> Result<(), ProviderError> {
        let mut backend = self.lock();
        let limits = backend.limits.clone();
        let reg = backend
            .clusters
            .get_mut(cluster)
            .and_then(|state| state.members.get_mut(id))
            .ok_or_else(|| ProviderError::UnknownMember(id.clone()))?;
        let updated = reg.member.clone().described(description);
        updated.validate(&limits)?;
        if updated != reg.member {
            reg.member = updated;
            backend.publish(cluster);
        }
        Ok(())
    }

    /// Drops clusters with neither members nor watchers, so the registry does not grow with
    /// every cluster name ever used.
    fn collect(&self, cluster: &str) {
        let mut backend = self.lock();
        if backend
            .clusters
            .get(cluster)
            .is_some_and(|s| s.members.is_empty() && s.changed.receiver_count() == 0)
        {
            backend.clusters.remove(cluster);
        }
    }

    fn partition_manager(&self, cluster: &str, id: &MemberId) -> Option<Arc<PartitionManager>> {
        let backend = self.lock();
        let reg = backend.clusters.get(cluster)?.members.get(id)?;
        Some(reg.partition_manager.clone())
    }
}

impl Backend {
    fn cluster(&mut self, cluster: &str) -> &mut ClusterState {
        self.clusters
            .entry(cluster.to_string())
            .or_insert_with(|| ClusterState {
                members: BTreeMap::new(),
                latest: Arc::new(ClusterTopology::empty(cluster)),
                changed: broadcast::channel(16).0,
            })
    }

    fn publish(&mut self, cluster: &str) {
        self.last_version += 1;
        let version = self.last_version;
        let state = self
            .clusters
            .get_mut(cluster)
            .expect("cluster exists when publishing");
        let members = state.members.values().map(|r| r.member.clone());
        let topology = ClusterTopology::new(cluster, version, members)
            .expect("member ids are unique map keys");
        tracing::debug!(
            cluster,
            version,
            members = topology.len(),
            "in-memory topology published"
        );
        state.latest = Arc::new(topology);
        // No receiver only means nobody watches this cluster right now.
        let _ = state.changed.send(version);
    }
}

/// Removes its member from the registry when dropped: on graceful shutdown after the explicit
/// leave (then a no-op), and when the watch task is cancelled by a crash.
#[derive(Debug)]
struct RegistrationGuard {
    registry: InMemoryRegistry,
    cluster: String,
    id: MemberId,
}

impl Drop for RegistrationGuard {
    fn drop(&mut self) {
        self.registry.leave(&self.cluster, &self.id);
    }
}

/// A [`ClusterProvider`] backed by an [`InMemoryRegistry`].
#[derive(Debug)]
pub struct InMemoryProvider {
    registry: InMemoryRegistry,
    running: tokio::sync::Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    ctx: ClusterProviderContext,
    member: Option<MemberId>,
    task: TaskHandle,
}

impl Drop for Running {
    /// A provider dropped without `shutdown` is a node gone: stop watching, and (through the
    /// task's registration guard) leave the cluster.
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl InMemoryProvider {
    /// A provider for one node, sharing `registry` with the cluster's other nodes.
    pub fn new(registry: InMemoryRegistry) -> Self {
        Self {
            registry,
            running: tokio::sync::Mutex::new(None),
        }
    }

    /// The registry this provider uses.
    pub fn registry(&self) -> &InMemoryRegistry {
        &self.registry
    }

    async fn start(
        &self,
        ctx: ClusterProviderContext,
        as_member: bool,
    ) -> Result<(), ProviderError> {
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Err(ProviderError::AlreadyStarted);
        }
        let cluster = ctx.cluster_name.clone();
        let (mut watcher, guard) = if as_member {
            let watcher =
                self.registry
                    .join(&cluster, ctx.member.clone(), ctx.partition_manager.clone())?;
            let guard = RegistrationGuard {
                registry: self.registry.clone(),
                cluster: cluster.clone(),
                id: ctx.member.id.clone(),
            };
            (watcher, Some(guard))
        } else {
            (self.registry.watch(&cluster), None)
        };
        // Apply the current topology before returning, so the caller sees itself in it.
        apply(&ctx, watcher.latest());
        let task_ctx = ctx.clone();
        let task = ctx.clock.spawn(
            "in-memory-watch",
            Box::pin(async move {
                let _guard = guard;
                while let Some(topology) = watcher.next().await {
                    apply(&task_ctx, topology);
                }
            }),
        );
        tracing::info!(
            cluster = %cluster,
            member = %ctx.member.id,
            mode = if as_member { "member" } else { "client" },
            "in-memory provider started"
        );
        *running = Some(Running {
            member: as_member.then(|| ctx.member.id.clone()),
            ctx,
            task,
        });
        Ok(())
    }
}

fn apply(ctx: &ClusterProviderContext, topology: Arc<ClusterTopology>) {
    match ctx.apply_topology(topology) {
        Ok(_) => {}
        Err(PlacementError::StaleTopology { .. }) => {}
        Err(e) => tracing::warn!(error = %e, "topology not applied"),
    }
}

#[async_trait]
impl ClusterProvider for InMemoryProvider {
    async fn start_member(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        self.start(ctx, true).await
    }

    async fn start_client(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        self.start(ctx, false).await
    }

    async fn shutdown(&self, graceful: bool) -> Result<(), ProviderError> {
        let Some(mut running) = self.running.lock().await.take() else {
            return Err(ProviderError::NotStarted);
        };
        let cluster = running.ctx.cluster_name.clone();
        if graceful && let Some(id) = &running.member {
            self.registry.leave(&cluster, id);
        }
        // Cancelling the task drops the registration guard: a crash removes the member too.
        running.task.abort();
        running.task.join_ref().await;
        self.registry.collect(&cluster);
        tracing::info!(cluster = %cluster, member = %running.ctx.member.id, graceful, "in-memory provider stopped");
        Ok(())
    }

    async fn update_member(&self, description: Description) -> Result<(), ProviderError> {
        let running = self.running.lock().await;
        let running = running.as_ref().ok_or(ProviderError::NotStarted)?;
        let id = running.member.as_ref().ok_or(ProviderError::NotAMember)?;
        let cluster = &running.ctx.cluster_name;
        self.registry.describe(cluster, id, description)?;
        // The watch task applies it too; applying here makes the change visible on return.
        apply(&running.ctx, self.registry.topology(cluster));
        Ok(())
    }

    async fn resolve_partition_manager(
        &self,
        member: &MemberId,
    ) -> Result<PartitionManagerHandle, ProviderError> {
        let running = self.running.lock().await;
        let ctx = &running.as_ref().ok_or(ProviderError::NotStarted)?.ctx;
        let manager = self
            .registry
            .partition_manager(&ctx.cluster_name, member)
            .ok_or_else(|| ProviderError::UnknownMember(member.clone()))?;
        Ok(Arc::new(LocalPartitionManager::new(
            member.clone(),
            manager,
        )))
    }
}
