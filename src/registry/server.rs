//! The registry's gRPC service: a thin async shell around [`RegistryState`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::Stream;
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use super::config::RegistryConfig;
use super::metrics::RegistryMetrics;
use super::pb;
use super::state::{Change, JoinKeys, RegistryError, RegistryState, Role};
use super::wire;
use crate::runtime::{Instant, SharedClock, TaskHandle, sim, unix_millis};

/// Concurrent full snapshots per server (see `Shared::snapshot_slots`).
const SNAPSHOT_SLOTS: usize = 8;

/// A registry server: the state, the watchers' feeds, the sweeper and the gRPC service.
///
/// Clone it freely; clones share one registry.
#[derive(Clone, Debug)]
pub struct RegistryServer {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    clock: SharedClock,
    config: Arc<RegistryConfig>,
    ready_at: Instant,
    core: Mutex<Core>,
    metrics: RegistryMetrics,
    /// Snapshot encodings under way at once (the first watchers of a new version build it;
    /// the rest wait for a slot and then find it cached).
    snapshot_slots: tokio::sync::Semaphore,
    /// Woken when a change was held back: the publisher sends it after the publish interval.
    held: tokio::sync::Notify,
}

#[derive(Debug)]
struct Core {
    state: RegistryState,
    feeds: BTreeMap<String, Feed>,
    /// Per watched cluster, the newest snapshot's members encoded once and shared by every
    /// watcher (dropped with the cluster's last watcher).
    packed: BTreeMap<String, PackedSnapshot>,
}

/// One version's members, encoded once and shared by every watcher of that version.
#[derive(Debug)]
struct PackedSnapshot {
    version: u64,
    plain: wire::PackedMembers,
    /// The compressed encoding: `None` until a watcher that accepts it needed it; `Some(None)`
    /// when compression does not pay (small or incompressible members: send them plain).
    zlib: Option<Option<wire::PackedMembers>>,
}

impl PackedSnapshot {
    /// What a watcher gets (`zlib`: it accepts compressed members), if already known.
    fn pick(&self, zlib: bool) -> Option<wire::PackedMembers> {
        if !zlib {
            return Some(self.plain.clone());
        }
        match &self.zlib {
            None => None,
            Some(Some(c)) => Some(c.clone()),
            Some(None) => Some(self.plain.clone()),
        }
    }
}

/// The broadcast of one cluster's changes to its watchers.
#[derive(Debug)]
struct Feed {
    tx: broadcast::Sender<Arc<Change>>,
    /// The topology the watchers were last sent; new watchers start from it, so the updates
    /// they get next apply to what they hold.
    published: Arc<crate::cluster::ClusterTopology>,
    /// When the last update went out.
    published_at: Option<Instant>,
    /// Changes held back since (published together, after the publish interval).
    held: u64,
    /// Whether every held change was an expiry.
    held_expired: bool,
}

impl Feed {
    fn new(capacity: usize, published: Arc<crate::cluster::ClusterTopology>) -> Self {
        Self {
            tx: broadcast::channel(capacity).0,
            published,
            published_at: None,
            held: 0,
            held_expired: true,
        }
    }
}

impl RegistryServer {
    /// A registry with `config`, its versions starting from the wall-clock time (so a restarted
    /// registry never reuses a version).
    pub fn new(config: RegistryConfig, clock: SharedClock) -> Result<Self, String> {
        config.validate()?;
        let config = Arc::new(config);
        let floor = unix_millis(clock.as_ref()).saturating_mul(1000);
        let now = clock.now();
        Ok(Self {
            shared: Arc::new(Shared {
                ready_at: now + config.grace(),
                core: Mutex::new(Core {
                    state: RegistryState::new(config.clone(), floor, clock.random_u64()),
                    feeds: BTreeMap::new(),
                    packed: BTreeMap::new(),
                }),
                config,
                clock,
                metrics: RegistryMetrics::default(),
                snapshot_slots: tokio::sync::Semaphore::new(SNAPSHOT_SLOTS),
                held: tokio::sync::Notify::new(),
            }),
        })
    }

    /// The metrics handles (register them to export).
    pub fn metrics(&self) -> &RegistryMetrics {
        &self.shared.metrics
    }

    /// The settings in force.
    pub fn config(&self) -> &RegistryConfig {
        &self.shared.config
    }

    /// The gRPC service, with the request size limit applied.
    pub fn service(&self) -> RegistryGrpcService {
        let limit = self.shared.config.limits.max_message_bytes;
        pb::registry_server::RegistryServer::new(RegistryService {
            shared: self.shared.clone(),
        })
        .max_decoding_message_size(limit)
    }

    /// Starts the registry's background work: the sweeper, which expires silent registrations
    /// every sweep interval, and the publisher, which sends changes held back under load.
    pub fn spawn_tasks(&self) -> TaskHandle {
        let shared = self.shared.clone();
        let publisher = self.shared.clone();
        self.shared.clock.clone().spawn(
            "registry-background",
            Box::pin(async move {
                tokio::join!(shared.sweeper(), publisher.publisher());
            }),
        )
    }

    /// Ends every watch stream (on shutdown): their feeds are dropped, so each stream finishes
    /// after the message it is sending. Clients reconnect with backoff.
    pub fn close_watches(&self) {
        let mut core = self.shared.lock();
        core.feeds.clear();
        core.packed.clear();
    }

    /// The current topology of `cluster` as the registry holds it.
    pub fn topology(&self, cluster: &str) -> Arc<crate::cluster::ClusterTopology> {
        self.shared.lock().state.topology(cluster)
    }

    /// Expires silent registrations now (the sweeper calls this on its interval).
    pub fn sweep(&self) {
        self.shared.sweep();
    }

    /// Serves the registry (plaintext, no health service) on `addr` until `shutdown` completes,
    /// with HTTP/2 keepalive so dead connections are noticed; on shutdown every watch stream is
    /// ended so the server can drain. The `shoal-registry` binary adds TLS, health and metrics;
    /// this is what tests and simulations use.
    pub async fn serve(
        self,
        addr: SocketAddr,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<(), tonic::transport::Error> {
        self.serve_with(addr, shutdown, |service| service).await
    }

    /// [`Self::serve`] with the service wrapped by `wrap` first: an interceptor, an audit log,
    /// or the simulator's network observer (which sees every request the registry accepts).
    pub async fn serve_with<S>(
        self,
        addr: SocketAddr,
        shutdown: impl std::future::Future<Output = ()>,
        wrap: impl FnOnce(RegistryService) -> S,
    ) -> Result<(), tonic::transport::Error>
    where
        S: pb::registry_server::Registry,
    {
        let sweeper = self.spawn_tasks();
        let limit = self.shared.config.limits.max_message_bytes;
        let service = pb::registry_server::RegistryServer::new(wrap(RegistryService {
            shared: self.shared.clone(),
        }))
        .max_decoding_message_size(limit);
        let this = self.clone();
        let shutdown = async move {
            shutdown.await;
            // Open watch streams would keep the server from draining.
            this.close_watches();
        };
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .http2_keepalive_timeout(Some(Duration::from_secs(5)))
            .add_service(service)
            .serve_with_shutdown(addr, shutdown)
            .await;
        sweeper.abort();
        result
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Core> {
        // State transitions complete before anything can panic, so a poisoned lock is consistent.
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sweep(&self) {
        let now = self.clock.now();
        let mut expired = Vec::new();
        {
            let mut core = self.lock();
            for change in core.state.sweep(now) {
                self.metrics.expiries.inc_by(change.left.len() as u64);
                let version = change.topology.version();
                let cluster = change.topology.cluster_name().to_string();
                expired.extend(
                    change
                        .left
                        .iter()
                        .map(|m| (cluster.clone(), m.id.clone(), version)),
                );
                if !sim::flaw("sweep-no-broadcast") {
                    self.broadcast(&mut core, change);
                }
            }
            self.metrics.observe(&core.state);
        }
        // Logged after the lock is released: a mass expiry must not hold up heartbeats.
        for (cluster, member, version) in expired {
            tracing::info!(%cluster, %member, version, "registration expired");
        }
    }

    fn token(&self) -> String {
        format!(
            "{:016x}{:016x}",
            self.clock.random_u64(),
            self.clock.random_u64()
        )
    }

    fn fail(&self, op: &'static str, e: RegistryError) -> Status {
        let status = wire::status(&e);
        self.metrics.rejected(op, status.code());
        if let RegistryError::Exhausted { limit, .. } = &e {
            self.metrics.limit_reached(limit);
        }
        tracing::debug!(op, error = %e, "request rejected");
        status
    }
}

impl Shared {
    /// Expires silent registrations every sweep interval.
    async fn sweeper(&self) {
        let interval = self.config.sweep_interval;
        loop {
            let due = self.clock.now() + interval;
            self.clock.sleep(interval).await;
            // Woken more than an interval late: the process stalled (a VM pause, a long GC) and
            // nobody could renew meanwhile. The stall does not count against anyone's TTL.
            let late = self.clock.now().saturating_duration_since(due);
            if late > interval {
                self.metrics.stalls.inc();
                tracing::warn!(stalled = ?late, "the registry stalled; extending every lease by the stall before sweeping");
                self.lock().state.extend_leases(late);
            }
            self.sweep();
        }
    }

    /// Sends the changes held back under load, one publish interval after they were held.
    async fn publisher(&self) {
        loop {
            self.held.notified().await;
            self.clock.sleep(self.config.publish_interval).await;
            let now = self.clock.now();
            let mut core = self.lock();
            let held: Vec<String> = core
                .feeds
                .iter()
                .filter(|(_, f)| f.held > 0)
                .map(|(c, _)| c.clone())
                .collect();
            for cluster in held {
                core.flush(&cluster, now, &self.metrics);
            }
        }
    }

    /// Sends `change` to its cluster's watchers now, or (under load: an update went out less
    /// than a publish interval ago) holds it for the publisher, which sends everything held
    /// as one update. Holding drops the change's topology, so the state patches the next
    /// version in place instead of copying it.
    fn broadcast(&self, core: &mut Core, change: Change) {
        let now = self.clock.now();
        let interval = self.config.publish_interval;
        let Some(feed) = core.feeds.get_mut(change.topology.cluster_name()) else {
            return;
        };
        let quiet = feed.held == 0 && feed.published_at.is_none_or(|t| now >= t + interval);
        if quiet || interval.is_zero() {
            feed.published = change.topology.clone();
            feed.published_at = Some(now);
            self.metrics.publishes.inc();
            if sim::buggify(0.02) {
                // Fault point: a broadcast lost on its way to the watchers; the progress tick
                // must notice that they are behind and send a snapshot.
                return;
            }
            // No receiver only means every watcher is gone; the feed is dropped with the last.
            let _ = feed.tx.send(Arc::new(change));
            return;
        }
        feed.held += 1;
        feed.held_expired &= change.expired;
        self.held.notify_one();
    }
}

impl Core {
    /// Sends what `cluster`'s watchers were held back from: one update from the topology they
    /// were last sent to the state's current one.
    fn flush(&mut self, cluster: &str, now: Instant, metrics: &RegistryMetrics) {
        let latest = self.state.topology(cluster);
        let Some(feed) = self.feeds.get_mut(cluster) else {
            return;
        };
        if feed.held == 0 {
            return;
        }
        let diff = feed.published.diff(&latest);
        let change = Change {
            previous_version: feed.published.version(),
            joined: diff.joined,
            changed: diff.changed.into_iter().map(|c| c.after).collect(),
            left: if sim::flaw("coalesced-drops-left") {
                Vec::new()
            } else {
                diff.left
            },
            expired: feed.held_expired,
            topology: latest.clone(),
        };
        metrics.coalesced.inc_by(feed.held - 1);
        metrics.publishes.inc();
        tracing::debug!(
            cluster,
            changes = feed.held,
            from_version = change.previous_version,
            to_version = latest.version(),
            "coalesced changes published"
        );
        feed.published = latest;
        feed.published_at = Some(now);
        feed.held = 0;
        feed.held_expired = true;
        let _ = feed.tx.send(Arc::new(change));
    }
}

/// The registry as a gRPC service to add to a tonic server (the generated server type, whose
/// generics differ between real and simulated tonic).
#[cfg(not(madsim))]
pub type RegistryGrpcService = pb::registry_server::RegistryServer<RegistryService>;
/// The registry as a gRPC service to add to a tonic server (the generated server type, whose
/// generics differ between real and simulated tonic).
#[cfg(madsim)]
pub type RegistryGrpcService =
    pb::registry_server::RegistryServer<RegistryService, tonic::codegen::IdentityInterceptor>;

/// The generated gRPC trait's implementation; obtain it from [`RegistryServer::service`].
#[derive(Debug, Clone)]
pub struct RegistryService {
    shared: Arc<Shared>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::registry_server::Registry for RegistryService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let s = &self.shared;
        let req = request.into_inner();
        let role = match pb::Role::try_from(req.role) {
            Ok(pb::Role::Member) => Role::Member,
            Ok(pb::Role::Client) => Role::Client,
            Ok(pb::Role::Unspecified) => {
                return Err(s.fail(
                    "join",
                    RegistryError::Invalid(
                        "role is ROLE_UNSPECIFIED: set ROLE_MEMBER to host actors or ROLE_CLIENT to only watch".into(),
                    ),
                ));
            }
            Err(_) => {
                return Err(s.fail(
                    "join",
                    RegistryError::Invalid(format!("unknown role {}", req.role)),
                ));
            }
        };
        let member = req
            .member
            .ok_or_else(|| RegistryError::Invalid("member is required".into()))
            .and_then(|m| wire::member_from_pb(m).map_err(RegistryError::from))
            .map_err(|e| s.fail("join", e))?;
        let id = member.id.clone();
        let keys = JoinKeys {
            token: s.token(),
            secret: req.incarnation_secret,
            update_only: req.update_only,
        };
        let now = s.clock.now();
        let mut core = s.lock();
        let (joined, change) = core
            .state
            .join(&req.cluster, &req.cluster_token, member, role, keys, now)
            .map_err(|e| s.fail("join", e))?;
        if let Some(change) = change {
            for old in &change.left {
                s.metrics.superseded.inc();
                tracing::info!(cluster = %req.cluster, member = %old.id, by = %id, address = %old.address, "superseded by a newer incarnation at its address");
            }
            s.broadcast(&mut core, change);
        }
        s.metrics.joins.inc();
        s.metrics.observe(&core.state);
        drop(core);
        tracing::info!(cluster = %req.cluster, member = %id, ?role, version = joined.version, "joined");
        Ok(Response::new(pb::JoinResponse {
            member_token: joined.token,
            ttl_ms: s.config.ttl.as_millis() as u64,
            heartbeat_interval_ms: s.config.heartbeat().as_millis() as u64,
            topology_version: joined.version,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let s = &self.shared;
        let req = request.into_inner();
        let now = s.clock.now();
        let mut core = s.lock();
        let version = core
            .state
            .heartbeat(&req.cluster, &req.member_token, now)
            .map_err(|e| s.fail("heartbeat", e))?;
        if sim::flaw("heartbeat-publishes")
            && let Some(change) = core.state.republish(&req.cluster, &req.member_token)
        {
            s.broadcast(&mut core, change);
        }
        drop(core);
        s.metrics.heartbeats.inc();
        Ok(Response::new(pb::HeartbeatResponse {
            topology_version: version,
        }))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let s = &self.shared;
        let req = request.into_inner();
        let now = s.clock.now();
        let mut core = s.lock();
        let change = core
            .state
            .leave(&req.cluster, &req.member_token, now)
            .map_err(|e| s.fail("leave", e))?;
        if let Some(change) = change {
            for m in &change.left {
                tracing::info!(cluster = %req.cluster, member = %m.id, version = change.topology.version(), "left");
            }
            s.broadcast(&mut core, change);
        }
        s.metrics.leaves.inc();
        s.metrics.observe(&core.state);
        Ok(Response::new(pb::LeaveResponse {}))
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let s = &self.shared;
        let req = request.into_inner();
        let guard = {
            let mut core = s.lock();
            core.state
                .watch_opened(&req.cluster, &req.cluster_token)
                .map_err(|e| s.fail("watch", e))?;
            let capacity = s.config.limits.watch_buffer.max(1);
            if !core.feeds.contains_key(&req.cluster) {
                let published = core.state.topology(&req.cluster);
                core.feeds
                    .insert(req.cluster.clone(), Feed::new(capacity, published));
            }
            s.metrics.watchers.set(core.state.watchers() as i64);
            s.metrics.clusters.set(core.state.cluster_count() as i64);
            WatcherGuard {
                shared: s.clone(),
                cluster: req.cluster.clone(),
            }
        };
        tracing::debug!(cluster = %req.cluster, from_version = req.from_version, "watch opened");
        let fragment_bytes = if req.fragments {
            s.config.limits.snapshot_fragment_bytes
        } else {
            0
        };
        let zlib = s.config.limits.snapshot_compress_bytes > 0
            && req
                .accept_encodings
                .contains(&(pb::MembersEncoding::Zlib as i32));
        let cursor = Cursor {
            shared: s.clone(),
            rx: None,
            version: 0,
            resume_from: (req.epoch, req.from_version),
            epoch: 0,
            fragment_bytes,
            zlib,
            pending: None,
            _guard: guard,
        };
        Ok(Response::new(Box::pin(futures::stream::unfold(
            cursor,
            Cursor::next,
        ))))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let s = &self.shared;
        let req = request.into_inner();
        let core = s.lock();
        core.state
            .authorize(&req.cluster, &req.cluster_token)
            .map_err(|e| s.fail("resolve", e))?;
        let (member, version) = core
            .state
            .resolve(&req.cluster, &req.member_id)
            .map_err(|e| s.fail("resolve", e))?;
        Ok(Response::new(pb::ResolveResponse {
            member: Some(wire::member_to_pb(&member)),
            topology_version: version,
        }))
    }
}

/// Counts a watcher for its cluster's limit; drops the cluster's feed with the last watcher.
#[derive(Debug)]
struct WatcherGuard {
    shared: Arc<Shared>,
    cluster: String,
}

impl Drop for WatcherGuard {
    fn drop(&mut self) {
        let mut core = self.shared.lock();
        if core.state.watch_closed(&self.cluster) == 0 {
            core.feeds.remove(&self.cluster);
            core.packed.remove(&self.cluster);
        }
        self.shared
            .metrics
            .watchers
            .set(core.state.watchers() as i64);
        self.shared
            .metrics
            .clusters
            .set(core.state.cluster_count() as i64);
        tracing::debug!(cluster = %self.cluster, "watch closed");
    }
}

/// One watch stream's position.
struct Cursor {
    shared: Arc<Shared>,
    rx: Option<broadcast::Receiver<Arc<Change>>>,
    version: u64,
    /// The registry's epoch (set with the first message).
    epoch: u64,
    /// The (epoch, version) the watcher said it holds; if it is current, no snapshot is needed.
    resume_from: (u64, u64),
    /// Snapshots larger than this go in fragments of this size (0: whole; the watcher did not
    /// ask for fragments).
    fragment_bytes: usize,
    /// The watcher accepts compressed members (and the server compresses).
    zlib: bool,
    /// The rest of a snapshot being sent in fragments: (epoch, version, the shared encoded
    /// members, the offset of the next fragment). One fragment is cut per message the
    /// transport asks for, so a watcher that reads slowly holds no copy of the rest.
    pending: Option<(u64, u64, wire::PackedMembers, usize)>,
    _guard: WatcherGuard,
}

impl Cursor {
    /// A snapshot message of `topology`. Its members are encoded once per version and the
    /// bytes shared by every watcher; building holds one of the server's snapshot slots (not
    /// while the transport sends: a watcher that stops reading must not block the others).
    async fn snapshot(&mut self, topology: &crate::cluster::ClusterTopology) -> pb::WatchResponse {
        let (epoch, version) = (topology.epoch(), topology.version());
        let packed = self.packed(topology).await;
        if self.fragment_bytes == 0 || packed.bytes.len() <= self.fragment_bytes {
            return wire::snapshot_encoded(epoch, version, packed);
        }
        self.pending = Some((epoch, version, packed, 0));
        self.next_fragment().expect("a pending snapshot")
    }

    /// The next fragment of the pending snapshot, if one is being sent.
    fn next_fragment(&mut self) -> Option<pb::WatchResponse> {
        let (epoch, version, packed, offset) = self.pending.take()?;
        let end = (offset + self.fragment_bytes).min(packed.bytes.len());
        let more = end < packed.bytes.len();
        let piece = packed.bytes.slice(offset..end);
        let encoding = packed.encoding;
        if more {
            self.pending = Some((epoch, version, packed, end));
        }
        self.shared.metrics.snapshot_fragments.inc();
        Some(wire::snapshot_fragment(
            epoch, version, encoding, piece, more,
        ))
    }

    /// The members of `topology` as this watcher gets them (compressed if it accepts that and
    /// it pays), encoded (and compressed) once per version and shared (see [`Self::snapshot`]).
    async fn packed(&mut self, topology: &crate::cluster::ClusterTopology) -> wire::PackedMembers {
        let s = &self.shared;
        let cluster = topology.cluster_name();
        let version = topology.version();
        let zlib = self.zlib;
        let cached = |core: &Core| {
            core.packed
                .get(cluster)
                .filter(|p| {
                    p.version == version || (zlib && sim::flaw("compressed-cache-any-version"))
                })
                .and_then(|p| p.pick(zlib))
        };
        s.metrics.snapshots.inc();
        if let Some(packed) = cached(&s.lock()) {
            return packed;
        }
        let _slot = s.snapshot_slots.acquire().await;
        if sim::buggify(0.1) {
            // Fault point: slow snapshot encoding (a large cluster on a busy registry).
            s.clock.sleep(Duration::from_millis(300)).await;
        }
        if let Some(packed) = cached(&s.lock()) {
            return packed;
        }
        // Another watcher may have encoded this version already, only not compressed it.
        let plain = s
            .lock()
            .packed
            .get(cluster)
            .filter(|p| p.version == version)
            .map(|p| p.plain.clone())
            .unwrap_or_else(|| wire::PackedMembers::plain(wire::pack_members(topology)));
        let compressed = zlib.then(|| {
            let limit = s.config.limits.snapshot_compress_bytes;
            let c = (plain.bytes.len() > limit)
                .then(|| plain.compressed())
                .flatten();
            if let Some(c) = &c {
                s.metrics.snapshot_compressions.inc();
                tracing::debug!(
                    cluster,
                    version,
                    plain_bytes = plain.bytes.len(),
                    compressed_bytes = c.bytes.len(),
                    "snapshot compressed"
                );
            }
            c
        });
        let mut core = s.lock();
        if core.feeds.contains_key(cluster) {
            match core.packed.get_mut(cluster) {
                Some(p) if p.version == version => {
                    if compressed.is_some() {
                        p.zlib = compressed.clone();
                    }
                }
                Some(p) if p.version > version => {}
                _ => {
                    core.packed.insert(
                        cluster.to_string(),
                        PackedSnapshot {
                            version,
                            plain: plain.clone(),
                            zlib: compressed.clone(),
                        },
                    );
                }
            }
        }
        compressed.flatten().unwrap_or(plain)
    }

    async fn next(mut self) -> Option<(Result<pb::WatchResponse, Status>, Self)> {
        if let Some(fragment) = self.next_fragment() {
            return Some((Ok(fragment), self));
        }
        let s = self.shared.clone();
        let cluster = self._guard.cluster.clone();
        if self.rx.is_none() {
            // First message: wait out the startup grace, then subscribe and snapshot atomically.
            let now = s.clock.now();
            if now < s.ready_at {
                s.clock.sleep(s.ready_at - now).await;
            }
            let (topology, rx) = {
                let core = s.lock();
                // No feed: the server is shutting down (close_watches); end the stream.
                let feed = core.feeds.get(&cluster)?;
                (feed.published.clone(), feed.tx.subscribe())
            };
            self.rx = Some(rx);
            self.version = topology.version();
            self.epoch = topology.epoch();
            // Versions are unique across the clusters of one epoch, so a watcher that already
            // holds this version of this epoch holds this topology: it needs only the news.
            if self.resume_from.1 != 0 && self.resume_from == (self.epoch, self.version) {
                return Some((Ok(wire::progress(self.epoch, self.version)), self));
            }
            let msg = self.snapshot(&topology).await;
            return Some((Ok(msg), self));
        }
        loop {
            let event = {
                let rx = self.rx.as_mut().expect("subscribed above");
                tokio::select! {
                    biased;
                    r = rx.recv() => Some(r),
                    _ = s.clock.sleep(s.config.progress_interval) => None,
                }
            };
            match event {
                None => {
                    // Quiet for a progress interval: if this watcher is behind what was
                    // published (an update it never heard of), it gets a snapshot; otherwise
                    // progress.
                    // No feed: the server is shutting down; end the stream.
                    let current = s.lock().feeds.get(&cluster).map(|f| f.published.clone())?;
                    if current.version() > self.version {
                        self.version = current.version();
                        let msg = self.snapshot(&current).await;
                        return Some((Ok(msg), self));
                    }
                    let (epoch, version) = (self.epoch, self.version);
                    return Some((Ok(wire::progress(epoch, version)), self));
                }
                Some(Ok(change)) => {
                    let version = change.topology.version();
                    if version <= self.version {
                        continue; // Already covered by the snapshot this watcher got.
                    }
                    let msg = if change.previous_version == self.version {
                        wire::update(&change)
                    } else {
                        self.snapshot(&change.topology).await
                    };
                    self.version = version;
                    return Some((Ok(msg), self));
                }
                Some(Err(broadcast::error::RecvError::Lagged(missed))) => {
                    s.metrics.watch_lagged.inc();
                    tracing::debug!(cluster = %cluster, missed, "watcher lagged; sending a snapshot");
                    // No feed: the server is shutting down; end the stream.
                    let topology = s.lock().feeds.get(&cluster).map(|f| f.published.clone())?;
                    self.version = topology.version();
                    let msg = self.snapshot(&topology).await;
                    return Some((Ok(msg), self));
                }
                Some(Err(broadcast::error::RecvError::Closed)) => return None,
            }
        }
    }
}

/// How long a watch client should wait for any message before deciding the stream is dead:
/// three progress intervals.
pub fn watch_idle_timeout(progress_interval: Duration) -> Duration {
    progress_interval * 3
}
