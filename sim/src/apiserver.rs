//! The simulated Kubernetes API server: the library's [`MemoryApiServer`] (resource versions,
//! 409, bookmarks, 410 after compaction) on its own simulated node, reached over madsim's
//! reliable connections, so partitions, crashes and pauses apply to it as to the registry.
//!
//! One connection per call (a watch keeps its connection and streams events on it), like HTTP/1
//! requests to a real API server. Its store survives a restart of the node (the API server's
//! state is in etcd); watches end when the node dies, and each watch ends on its own after
//! [`WATCH_TIMEOUT`], as the real server's `timeoutSeconds` does.
//!
//! The door in front of the store ([`KubeDoor`]) is the harness's observation point: it tells
//! the lease oracle which Lease writes the API server *accepted* (a create is a join, a
//! renewal by its holder a heartbeat, a delete by the holder's own node a leave), and applies
//! the door faults (renewals of one member lost, watch streams reset).

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use shoal::kubernetes::api::{
    ApiError, Endpoint as SliceEndpoint, EndpointSlice, KubeApi, LabelSelector, Lease, ObjectList,
    ObjectMeta, ObjectReference, SERVICE_NAME_LABEL, WatchEvent, WatchStream,
};
use shoal::kubernetes::members::ADDRESS_ANNOTATION;
use shoal::kubernetes::memory::MemoryApiServer;
use shoal::{ClusterTopology, Member, MemberId};

use crate::oracle::Oracles;
use crate::record::Recorder;
use crate::wire::{Payload, Pool};

/// The API server's port.
pub const APISERVER_PORT: u16 = 6443;

/// A watch ends after this long (the client resumes from the version it holds).
pub const WATCH_TIMEOUT: Duration = Duration::from_secs(60);

/// One call.
/// A call on the wire (the door's own protocol).
#[doc(hidden)]
#[derive(Debug)]
pub enum Request {
    GetLease(String, String),
    CreateLease(Lease),
    ReplaceLease(Lease),
    DeleteLease(String, String, Option<String>),
    ListLeases(String, LabelSelector),
    WatchLeases(String, LabelSelector, String),
    ListSlices(String, String),
    WatchSlices(String, String, String),
}

/// The answer to a call (a watch: `WatchOpened`, then [`Item`]s on the same connection).
#[derive(Debug)]
enum Reply {
    Lease(Option<Lease>),
    Written(Lease),
    Deleted,
    Leases(ObjectList<Lease>),
    Slices(ObjectList<EndpointSlice>),
    WatchOpened,
}

#[derive(Debug)]
enum Item {
    Lease(Result<WatchEvent<Lease>, ApiError>),
    Slice(Result<WatchEvent<EndpointSlice>, ApiError>),
}

fn unavailable(e: impl std::fmt::Display) -> ApiError {
    ApiError::Unavailable(format!("API server: {e}"))
}

/// The [`KubeApi`] a simulated node uses: calls over the simulated network
/// ([`crate::wire`]: kept-alive connections, a watch on a connection of its own).
#[derive(Clone, Debug)]
pub struct SimKubeApi {
    pool: Pool,
}

impl SimKubeApi {
    /// Talks to the API server at `server`.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            pool: Pool::new(server),
        }
    }

    fn answer(payload: Payload) -> Result<Reply, ApiError> {
        *payload
            .downcast::<Result<Reply, ApiError>>()
            .map_err(|_| unavailable("malformed reply"))?
    }

    async fn unary(&self, request: Request) -> Result<Reply, ApiError> {
        Self::answer(
            self.pool
                .call(Box::new(request))
                .await
                .map_err(unavailable)?,
        )
    }

    async fn watch<T: Send + 'static>(
        &self,
        request: Request,
        unpack: fn(Item) -> Option<Result<WatchEvent<T>, ApiError>>,
    ) -> Result<WatchStream<T>, ApiError> {
        let (first, conn) = self
            .pool
            .open(Box::new(request))
            .await
            .map_err(unavailable)?;
        Self::answer(first)?;
        Ok(Box::pin(futures::stream::unfold(
            conn,
            move |mut conn| async move {
                let payload = conn.next().await?;
                let item = payload.downcast::<Item>().ok()?;
                unpack(*item).map(|event| (event, conn))
            },
        )))
    }
}

fn unexpected<T>(reply: Reply) -> Result<T, ApiError> {
    Err(unavailable(format!("unexpected reply {reply:?}")))
}

#[async_trait]
impl KubeApi for SimKubeApi {
    async fn get_lease(&self, ns: &str, name: &str) -> Result<Option<Lease>, ApiError> {
        match self
            .unary(Request::GetLease(ns.into(), name.into()))
            .await?
        {
            Reply::Lease(l) => Ok(l),
            r => unexpected(r),
        }
    }

    async fn create_lease(&self, lease: Lease) -> Result<Lease, ApiError> {
        match self.unary(Request::CreateLease(lease)).await? {
            Reply::Written(l) => Ok(l),
            r => unexpected(r),
        }
    }

    async fn replace_lease(&self, lease: Lease) -> Result<Lease, ApiError> {
        match self.unary(Request::ReplaceLease(lease)).await? {
            Reply::Written(l) => Ok(l),
            r => unexpected(r),
        }
    }

    async fn delete_lease(&self, ns: &str, name: &str, pre: Option<&str>) -> Result<(), ApiError> {
        let request = Request::DeleteLease(ns.into(), name.into(), pre.map(String::from));
        match self.unary(request).await? {
            Reply::Deleted => Ok(()),
            r => unexpected(r),
        }
    }

    async fn list_leases(
        &self,
        ns: &str,
        selector: &LabelSelector,
    ) -> Result<ObjectList<Lease>, ApiError> {
        match self
            .unary(Request::ListLeases(ns.into(), selector.clone()))
            .await?
        {
            Reply::Leases(l) => Ok(l),
            r => unexpected(r),
        }
    }

    async fn watch_leases(
        &self,
        ns: &str,
        selector: &LabelSelector,
        rv: &str,
    ) -> Result<WatchStream<Lease>, ApiError> {
        let request = Request::WatchLeases(ns.into(), selector.clone(), rv.into());
        self.watch(request, |item| match item {
            Item::Lease(e) => Some(e),
            Item::Slice(_) => None,
        })
        .await
    }

    async fn list_endpoint_slices(
        &self,
        ns: &str,
        service: &str,
    ) -> Result<ObjectList<EndpointSlice>, ApiError> {
        match self
            .unary(Request::ListSlices(ns.into(), service.into()))
            .await?
        {
            Reply::Slices(l) => Ok(l),
            r => unexpected(r),
        }
    }

    async fn watch_endpoint_slices(
        &self,
        ns: &str,
        service: &str,
        rv: &str,
    ) -> Result<WatchStream<EndpointSlice>, ApiError> {
        let request = Request::WatchSlices(ns.into(), service.into(), rv.into());
        self.watch(request, |item| match item {
            Item::Slice(e) => Some(e),
            Item::Lease(_) => None,
        })
        .await
    }
}

/// The observation point and fault switch in front of the store.
#[derive(Debug)]
pub struct KubeDoor {
    store: MemoryApiServer,
    oracles: Arc<Oracles>,
    rec: Recorder,
    /// Renewals from these node addresses are lost (a `HeartbeatLoss` fault).
    lose_renewals: Mutex<BTreeSet<IpAddr>>,
    /// Bumped to end every open watch (a `StreamReset` fault).
    resets: AtomicU64,
    reset: tokio::sync::Notify,
    /// The topology the store held at the last poll, and its resource version.
    published: Mutex<Option<(String, Arc<ClusterTopology>)>>,
}

/// The member a Lease names: its holder at its address (what the oracles need; the provider's
/// own parsing is not used).
fn holder(lease: &Lease) -> Option<(MemberId, String)> {
    let id = MemberId::parse(lease.holder_identity.as_deref()?).ok()?;
    let address = lease.meta.annotations.get(ADDRESS_ANNOTATION)?.clone();
    Some((id, address))
}

fn host(address: &str) -> Option<IpAddr> {
    address.rsplit_once(':')?.0.parse().ok()
}

impl KubeDoor {
    /// A door in front of `store`, reporting to `oracles`.
    pub fn new(store: MemoryApiServer, oracles: Arc<Oracles>, rec: Recorder) -> Arc<Self> {
        Arc::new(Self {
            store,
            oracles,
            rec,
            lose_renewals: Mutex::default(),
            resets: AtomicU64::new(0),
            reset: tokio::sync::Notify::new(),
            published: Mutex::default(),
        })
    }

    /// The store (the harness compacts it and reads it).
    pub fn store(&self) -> &MemoryApiServer {
        &self.store
    }

    /// Renewals from the node at `ip` are lost (`true`) or delivered again.
    pub fn set_renewal_loss(&self, ip: IpAddr, lost: bool) {
        let mut set = self.lose_renewals.lock().unwrap_or_else(|e| e.into_inner());
        if lost {
            set.insert(ip);
        } else {
            set.remove(&ip);
        }
    }

    /// Delivers every renewal again.
    pub fn clear_renewal_loss(&self) {
        self.lose_renewals
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Ends every open watch (clients resume from the version they hold).
    pub fn reset_streams(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.reset.notify_waiters();
    }

    /// The members the store lists now (one per Lease of the cluster, by holder), as a
    /// topology versioned by the store's resource version; the same `Arc` while nothing was
    /// written.
    pub fn topology(&self, cluster: &str) -> Arc<ClusterTopology> {
        let rv = self.store.resource_version();
        let mut published = self.published.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((seen, t)) = published.as_ref()
            && *seen == rv
        {
            return t.clone();
        }
        let members: Vec<Member> = self
            .store
            .leases()
            .values()
            .filter(|l| {
                l.meta.labels.get(shoal::kubernetes::members::CLUSTER_LABEL)
                    == Some(&cluster.to_string())
            })
            .filter_map(holder)
            .map(|(id, address)| Member::new(id, address, Vec::<String>::new()))
            .collect();
        let version = rv.parse().unwrap_or(0);
        let t = Arc::new(
            ClusterTopology::new(cluster, version, members)
                .unwrap_or_else(|_| ClusterTopology::empty(cluster)),
        );
        *published = Some((rv, t.clone()));
        t
    }

    /// Serves calls on this node until it dies.
    pub async fn serve(self: Arc<Self>) {
        if let Err(e) = crate::wire::serve(self.clone(), APISERVER_PORT).await {
            self.rec.trace("apiserver", format!("cannot bind: {e}"));
        }
    }

    /// Answers one call; whether the connection may carry another.
    async fn answer_call(
        &self,
        tx: &madsim::net::Sender,
        request: Request,
        from: SocketAddr,
    ) -> bool {
        let s = &self.store;
        let answer: Result<Reply, ApiError> = match request {
            Request::GetLease(ns, name) => s.get_lease(&ns, &name).await.map(Reply::Lease),
            Request::CreateLease(lease) => {
                let r = s.create_lease(lease).await;
                if let Ok(l) = &r
                    && let Some((id, address)) = holder(l)
                {
                    self.oracles.joined(id, true, address);
                }
                r.map(Reply::Written)
            }
            Request::ReplaceLease(lease) => {
                if self
                    .lose_renewals
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&from.ip())
                {
                    return false; // Lost: no answer, the connection just closes.
                }
                let r = s.replace_lease(lease).await;
                if let Ok(l) = &r
                    && let Some((id, _)) = holder(l)
                {
                    self.oracles.renewed(&id);
                }
                r.map(Reply::Written)
            }
            Request::DeleteLease(ns, name, pre) => {
                let before = s.get_lease(&ns, &name).await.ok().flatten();
                let r = s.delete_lease(&ns, &name, pre.as_deref()).await;
                if r.is_ok()
                    && let Some((id, address)) = before.as_ref().and_then(holder)
                {
                    if host(&address) == Some(from.ip()) {
                        self.oracles.left(&id);
                    } else {
                        self.rec.trace(
                            "apiserver",
                            format!("{} deleted the Lease of {id}", from.ip()),
                        );
                    }
                }
                r.map(|()| Reply::Deleted)
            }
            Request::ListLeases(ns, sel) => s.list_leases(&ns, &sel).await.map(Reply::Leases),
            Request::ListSlices(ns, service) => s
                .list_endpoint_slices(&ns, &service)
                .await
                .map(Reply::Slices),
            Request::WatchLeases(ns, sel, rv) => {
                let stream = s.watch_leases(&ns, &sel, &rv).await;
                self.stream(tx, stream, Item::Lease).await;
                return false;
            }
            Request::WatchSlices(ns, service, rv) => {
                let stream = s.watch_endpoint_slices(&ns, &service, &rv).await;
                self.stream(tx, stream, Item::Slice).await;
                return false;
            }
        };
        tx.send(Box::new(answer) as Payload).await.is_ok()
    }

    /// Answers a watch call and forwards its events until it fails, times out, is reset, or
    /// the client goes away.
    async fn stream<T: Send + 'static>(
        &self,
        tx: &madsim::net::Sender,
        stream: Result<WatchStream<T>, ApiError>,
        wrap: fn(Result<WatchEvent<T>, ApiError>) -> Item,
    ) {
        let stream = match stream {
            Ok(s) => s,
            Err(e) => {
                let _ = tx.send(Box::new(Err::<Reply, _>(e)) as Payload).await;
                return;
            }
        };
        if tx
            .send(Box::new(Ok::<_, ApiError>(Reply::WatchOpened)) as Payload)
            .await
            .is_err()
        {
            return;
        }
        let items = Box::pin(stream.map(wrap));
        crate::wire::forward(tx, items, Item::failed, &self.reset, WATCH_TIMEOUT).await;
    }
}

#[async_trait]
impl crate::wire::Server for KubeDoor {
    type Request = Request;

    async fn answer(&self, tx: &madsim::net::Sender, request: Request, from: SocketAddr) -> bool {
        self.answer_call(tx, request, from).await
    }
}

impl Item {
    fn failed(&self) -> bool {
        match self {
            Item::Lease(r) => r.is_err(),
            Item::Slice(r) => r.is_err(),
        }
    }
}

/// The headless Service the simulated members are gated by.
pub const SERVICE: &str = "sim-members";

/// What the endpoints controller says of one Pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodState {
    /// Running and passing its readiness probe.
    Serving,
    /// Being deleted (a graceful shutdown): still serving, but terminating.
    Terminating,
    /// Running but failing its readiness probe (crashed, frozen).
    NotReady,
}

/// The endpoints controller of the simulated cluster: keeps the EndpointSlices of [`SERVICE`]
/// (two slices, a Pod in one of them) in step with the Pods' states, as the harness reports
/// them. A Pod's state changes only with a newer generation (a restart bumps it), so a late
/// "not ready" for a crashed Pod cannot overwrite its restarted successor.
#[derive(Debug)]
pub struct EndpointController {
    store: MemoryApiServer,
    /// By Pod: generation, address, state, and the controller's change counter at its last
    /// change.
    pods: Mutex<std::collections::BTreeMap<String, (u64, IpAddr, PodState, u64)>>,
    changes: std::sync::atomic::AtomicU64,
    zones: bool,
    rec: Recorder,
}

/// The zone the simulated cluster puts Pod `pod` in (`m0` in `zone-a`, `m1` in `zone-b`,
/// `m2` in `zone-c`, `m3` in `zone-a`, ...), reported on its endpoint.
pub fn pod_zone(pod: &str) -> String {
    let n: usize = pod
        .trim_start_matches(|c: char| !c.is_ascii_digit())
        .parse()
        .unwrap_or(0);
    format!("zone-{}", ["a", "b", "c"][n % 3])
}

impl EndpointController {
    /// A controller writing into `store`; with `zones`, each endpoint carries its Pod's zone
    /// ([`pod_zone`]).
    pub fn new(store: MemoryApiServer, rec: Recorder, zones: bool) -> Arc<Self> {
        Arc::new(Self {
            store,
            pods: Mutex::default(),
            changes: std::sync::atomic::AtomicU64::new(0),
            zones,
            rec,
        })
    }

    /// The Pod's generation, address, state and change counter, if it ever started.
    pub fn state(&self, pod: &str) -> Option<(u64, IpAddr, PodState, u64)> {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
            .copied()
    }

    /// The Pod's current generation (0 if unknown).
    pub fn generation(&self, pod: &str) -> u64 {
        self.pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
            .map_or(0, |(g, ..)| *g)
    }

    /// A (re)started Pod at `ip`: a new generation, serving.
    pub fn started(&self, pod: &str, ip: IpAddr) {
        let g = self.generation(pod) + 1;
        self.set(pod, ip, g, PodState::Serving);
    }

    /// The Pod's state, if it is still at generation `generation`; whether it changed.
    pub fn update(&self, pod: &str, generation: u64, state: PodState) -> bool {
        let Some(ip) = self
            .pods
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(pod)
            .filter(|(g, ..)| *g == generation)
            .map(|(_, ip, ..)| *ip)
        else {
            return false;
        };
        self.set(pod, ip, generation, state)
    }

    fn set(&self, pod: &str, ip: IpAddr, generation: u64, state: PodState) -> bool {
        let slice = {
            let mut pods = self.pods.lock().unwrap_or_else(|e| e.into_inner());
            if pods
                .get(pod)
                .is_some_and(|(g, _, s, _)| *g == generation && *s == state)
            {
                return false;
            }
            let change = self
                .changes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            pods.insert(pod.to_string(), (generation, ip, state, change));
            // The Pod's slice, rebuilt from every Pod in it.
            let index = pod.bytes().map(u64::from).sum::<u64>() % 2;
            EndpointSlice {
                meta: ObjectMeta {
                    name: format!("{SERVICE}-{index}"),
                    namespace: "default".into(),
                    labels: [(SERVICE_NAME_LABEL.to_string(), SERVICE.to_string())].into(),
                    ..ObjectMeta::default()
                },
                endpoints: pods
                    .iter()
                    .filter(|(p, _)| p.bytes().map(u64::from).sum::<u64>() % 2 == index)
                    .map(|(p, (_, ip, state, _))| SliceEndpoint {
                        addresses: vec![ip.to_string()],
                        ready: Some(*state == PodState::Serving),
                        serving: Some(*state != PodState::NotReady),
                        terminating: Some(*state == PodState::Terminating),
                        zone: self.zones.then(|| pod_zone(p)),
                        target_ref: Some(ObjectReference {
                            kind: "Pod".into(),
                            namespace: "default".into(),
                            name: p.clone(),
                            uid: format!("uid-{p}"),
                        }),
                    })
                    .collect(),
            }
        };
        self.rec.count(match state {
            PodState::Serving => "endpoints: serving",
            PodState::Terminating => "endpoints: terminating",
            PodState::NotReady => "endpoints: not ready",
        });
        self.store.put_endpoint_slice(slice);
        true
    }
}
