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

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use shoal::kubernetes::api::{
    ApiError, EndpointSlice, KubeApi, LabelSelector, Lease, ListOptions, ObjectList, ObjectMeta,
    WatchEvent, WatchStream,
};
use shoal::kubernetes::members::{ADDRESS_ANNOTATION, ZONE_ANNOTATION};
use shoal::kubernetes::memory::MemoryApiServer;
use shoal::{ClusterTopology, Member, MemberId};

use crate::control::delays::Delays;
use crate::control::wire::{Payload, Pool};
use crate::load::LoadMeter;
use crate::oracle::Oracles;
use crate::record::Recorder;

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
    ListLeases(String, LabelSelector, ListOptions),
    WatchLeases(String, LabelSelector, String),
    ListSlices(String, String, ListOptions),
    WatchSlices(String, String, String),
}

/// A call as the member's end of the wire sent it: the harness stamps it with when it left
/// and with the last `429` the member's end received for the resource it reads, so the door
/// judges `Retry-After` from what the member knew when it sent the call (a call already on
/// its way when the 429 arrived is not a retry).
#[doc(hidden)]
#[derive(Debug)]
pub struct Call {
    request: Request,
    sent_at: madsim::time::Instant,
    /// When the member's end last received a 429 for this call's resource, and its
    /// `Retry-After`.
    shed_seen: Option<(madsim::time::Instant, Duration)>,
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
/// ([`crate::control::wire`]: kept-alive connections, a watch on a connection of its own).
#[derive(Clone, Debug)]
pub struct SimKubeApi {
    pool: Pool,
    /// Per resource read: when the last 429 for it arrived, and its `Retry-After`.
    shed_seen: Arc<Mutex<BTreeMap<&'static str, (madsim::time::Instant, Duration)>>>,
}

impl SimKubeApi {
    /// Talks to the API server at `server`.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            pool: Pool::new(server),
            shed_seen: Arc::default(),
        }
    }

    /// `request`, stamped (see [`Call`]).
    fn stamp(&self, request: Request) -> (Option<&'static str>, Box<Call>) {
        let read = request.read_of();
        let shed_seen = read.and_then(|r| lock(&self.shed_seen).get(r).copied());
        let call = Call {
            request,
            sent_at: madsim::time::Instant::now(),
            shed_seen,
        };
        (read, Box::new(call))
    }

    /// Notes a 429 that answered a read of `read`.
    fn seen<T>(&self, read: Option<&'static str>, answer: &Result<T, ApiError>) {
        if let (Some(r), Err(e)) = (read, answer)
            && let Some(wait) = e.retry_after()
        {
            lock(&self.shed_seen).insert(r, (madsim::time::Instant::now(), wait));
        }
    }

    fn answer(payload: Payload) -> Result<Reply, ApiError> {
        *payload
            .downcast::<Result<Reply, ApiError>>()
            .map_err(|_| unavailable("malformed reply"))?
    }

    async fn unary(&self, request: Request) -> Result<Reply, ApiError> {
        let (read, call) = self.stamp(request);
        let answer = Self::answer(self.pool.call(call).await.map_err(unavailable)?);
        self.seen(read, &answer);
        answer
    }

    async fn watch<T: Send + 'static>(
        &self,
        request: Request,
        unpack: fn(Item) -> Option<Result<WatchEvent<T>, ApiError>>,
    ) -> Result<WatchStream<T>, ApiError> {
        let (read, call) = self.stamp(request);
        let (first, conn) = self.pool.open(call).await.map_err(unavailable)?;
        let first = Self::answer(first);
        self.seen(read, &first);
        first?;
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
        options: &ListOptions,
    ) -> Result<ObjectList<Lease>, ApiError> {
        match self
            .unary(Request::ListLeases(
                ns.into(),
                selector.clone(),
                options.clone(),
            ))
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
        options: &ListOptions,
    ) -> Result<ObjectList<EndpointSlice>, ApiError> {
        match self
            .unary(Request::ListSlices(
                ns.into(),
                service.into(),
                options.clone(),
            ))
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
    /// Whether watches carry out-of-contract events (repeated).
    pub out_of_contract: std::sync::atomic::AtomicBool,
    /// What the API server served.
    pub meter: Arc<LoadMeter>,
    oracles: Arc<Oracles>,
    rec: Recorder,
    /// Renewals from these node addresses are lost (a `HeartbeatLoss` fault).
    lose_renewals: Mutex<BTreeSet<IpAddr>>,
    /// Late answers and lagging watches (faults `slow-answers`, `lagging-watch`).
    pub delays: Delays,
    /// Bumped to end every open watch (a `StreamReset` fault).
    resets: AtomicU64,
    /// While set, lists and watches are shed with 429 and this `Retry-After` (a `Throttle`
    /// fault: API Priority and Fairness with full queues). Writes are not shed: the FlowSchema
    /// shipped in deploy/kubernetes puts renewals in a priority level of their own.
    shed: Mutex<Option<Duration>>,
    /// Per client (IP) and resource: when it was last told to wait, and for how long.
    reset: tokio::sync::Notify,
    /// The members the store's Leases name, by Lease (namespace, name), kept from the writes
    /// the door accepted, and the topology they make (rebuilt only when a member is added,
    /// removed or moved: a renewal changes nothing here).
    members: Mutex<(LeaseHolders, Arc<ClusterTopology>)>,
    /// A cluster migrating between heartbeat settings: whether the process now running on
    /// each node address uses sharded heartbeats (as the harness configured it).
    sharded_at: Mutex<BTreeMap<IpAddr, bool>>,
    /// The zone of the Pod on each node address, as the endpoints controller reports it (with
    /// zones).
    zone_at: Mutex<BTreeMap<IpAddr, String>>,
}

/// The holder and address each Lease of the cluster names, by (namespace, name).
type LeaseHolders = BTreeMap<(String, String), (MemberId, String)>;

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
            out_of_contract: Default::default(),
            meter: Arc::default(),
            oracles,
            rec,
            lose_renewals: Mutex::default(),
            delays: Delays::default(),
            resets: AtomicU64::new(0),
            reset: tokio::sync::Notify::new(),
            shed: Mutex::new(None),
            members: Mutex::new((
                BTreeMap::new(),
                Arc::new(ClusterTopology::empty(crate::cluster::CLUSTER)),
            )),
            sharded_at: Mutex::default(),
            zone_at: Mutex::default(),
        })
    }

    /// A cluster migrating between heartbeat settings: the process starting on the node at
    /// `ip` uses sharded heartbeats (`true`) or renews its own Lease.
    pub fn set_sharded(&self, ip: IpAddr, sharded: bool) {
        lock(&self.sharded_at).insert(ip, sharded);
    }

    /// The Pod on the node at `ip` is in `zone` (its endpoint says so).
    pub fn set_zone(&self, ip: IpAddr, zone: String) {
        lock(&self.zone_at).insert(ip, zone);
    }

    /// The zone of the member whose record `l` is, written from `from`: its own, else its
    /// Pod's endpoint's (as the provider lists it).
    fn zone_of(&self, l: &Lease, from: IpAddr) -> Option<String> {
        l.meta
            .annotations
            .get(ZONE_ANNOTATION)
            .cloned()
            .or_else(|| lock(&self.zone_at).get(&from).cloned())
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

    /// Starts (`Some(retry_after)`) or stops shedding lists and watches with 429.
    pub fn shed_reads(&self, retry_after: Option<Duration>) {
        *self.shed.lock().unwrap_or_else(|e| e.into_inner()) = retry_after;
    }

    /// A read of `resource` from `from`, sent at `sent_at` by a member that had received a 429
    /// for it at `seen` saying `Retry-After` `wait`: flagged if it left well before the wait
    /// was over (by less than 70% of it: member clocks may run up to 25% fast).
    fn judge_retry(
        &self,
        from: IpAddr,
        request: &Request,
        resource: &'static str,
        sent_at: madsim::time::Instant,
        seen: madsim::time::Instant,
        wait: Duration,
    ) {
        let waited = sent_at.saturating_duration_since(seen);
        if waited < wait.mul_f64(0.7) {
            self.rec.violation_once(
                format!("retry-after {from} {resource}"),
                format!(
                    "apiserver: {from} read {resource} again ({}{}) {:.0} ms after it received a 429 that said Retry-After {} s",
                    request.verb(),
                    if request.is_continuation() { ", a list's next page" } else { "" },
                    waited.as_secs_f64() * 1000.0,
                    wait.as_secs()
                ),
            );
        }
    }

    /// A read of `resource`: shed while the shedding is on. `Some` is the 429 to answer.
    fn pushback(&self, resource: &'static str) -> Option<ApiError> {
        let retry_after = (*self.shed.lock().unwrap_or_else(|e| e.into_inner()))?;
        self.rec.count("apiserver: read shed with 429");
        Some(ApiError::TooManyRequests {
            message: format!("too many requests, please try again later ({resource})"),
            retry_after: Some(retry_after),
        })
    }

    /// Ends every open watch (clients resume from the version they hold).
    pub fn reset_streams(&self) {
        self.resets.fetch_add(1, Ordering::SeqCst);
        self.reset.notify_waiters();
    }

    /// The members the store lists now (one per Lease of the cluster, by holder), as a
    /// topology versioned by the store's resource version at its last change; the same `Arc`
    /// while no member was added, removed or moved.
    pub fn topology(&self) -> Arc<ClusterTopology> {
        self.members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// The store accepted a write of Lease `ns/name`: now `lease` (`None`: deleted).
    fn written(&self, ns: &str, name: &str, lease: Option<&Lease>) {
        let named = lease
            .filter(|l| {
                l.meta
                    .labels
                    .get(shoal::kubernetes::members::CLUSTER_LABEL)
                    .map(String::as_str)
                    == Some(crate::cluster::CLUSTER)
            })
            .and_then(holder);
        let mut guard = self.members.lock().unwrap_or_else(|e| e.into_inner());
        let (members, topology) = &mut *guard;
        let key = (ns.to_string(), name.to_string());
        if members.get(&key) == named.as_ref() {
            return; // A renewal: the same holder at the same address.
        }
        match named {
            Some(m) => members.insert(key, m),
            None => members.remove(&key),
        };
        let version = self.store.resource_version().parse().unwrap_or(0);
        let listed: Vec<Member> = members
            .values()
            .map(|(id, address)| Member::new(id.clone(), address.clone(), Vec::<String>::new()))
            .collect();
        *topology = Arc::new(
            ClusterTopology::new(crate::cluster::CLUSTER, version, listed)
                .unwrap_or_else(|_| ClusterTopology::empty(crate::cluster::CLUSTER)),
        );
    }

    /// Serves calls on this node until it dies.
    pub async fn serve(self: Arc<Self>) {
        if let Err(e) = crate::control::wire::serve(self.clone(), APISERVER_PORT).await {
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
        let verb = request.verb();
        let continuation = request.is_continuation();
        if let Some(resource) = request.read_of()
            && let Some(shed) = self.pushback(resource)
        {
            self.meter
                .request(verb, STATUS_BYTES + shed.to_string().len());
            let _ = tx.send(Box::new(Err::<Reply, _>(shed)) as Payload).await;
            return false;
        }
        let answer: Result<Reply, ApiError> = match request {
            Request::GetLease(ns, name) => s.get_lease(&ns, &name).await.map(Reply::Lease),
            Request::CreateLease(lease) => {
                let r = s.create_lease(lease).await;
                if let Ok(l) = &r {
                    self.written(&l.meta.namespace, &l.meta.name, Some(l));
                    if let Some((id, address)) = holder(l) {
                        let sharded = lock(&self.sharded_at).get(&from.ip()).copied();
                        self.oracles.joined(id.clone(), true, address);
                        if let Some(sharded) = sharded {
                            self.oracles.heartbeats_of(&id, sharded);
                        }
                        self.oracles.zone_of(&id, self.zone_of(l, from.ip()));
                    }
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
                if let Ok(l) = &r {
                    self.written(&l.meta.namespace, &l.meta.name, Some(l));
                    // A member's Lease, or (sharded heartbeats) its heartbeat Lease, which
                    // names no address.
                    if let Some(id) = l
                        .holder_identity
                        .as_deref()
                        .and_then(|h| MemberId::parse(h).ok())
                    {
                        self.oracles.renewed(&id);
                        if l.meta.annotations.contains_key(ADDRESS_ANNOTATION) {
                            // A record: its description (zone) may have changed.
                            self.oracles.zone_of(&id, self.zone_of(l, from.ip()));
                        }
                    }
                }
                r.map(Reply::Written)
            }
            Request::DeleteLease(ns, name, pre) => {
                let before = s.get_lease(&ns, &name).await.ok().flatten();
                let r = s.delete_lease(&ns, &name, pre.as_deref()).await;
                if r.is_ok() {
                    self.written(&ns, &name, None);
                }
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
            Request::ListLeases(ns, sel, options) => {
                s.list_leases(&ns, &sel, &options).await.map(Reply::Leases)
            }
            Request::ListSlices(ns, service, options) => s
                .list_endpoint_slices(&ns, &service, &options)
                .await
                .map(Reply::Slices),
            Request::WatchLeases(ns, sel, rv) => {
                self.meter.request(verb, 0);
                let stream = s.watch_leases(&ns, &sel, &rv).await;
                self.stream(tx, stream, Item::Lease, from.ip()).await;
                return false;
            }
            Request::WatchSlices(ns, service, rv) => {
                self.meter.request(verb, 0);
                let stream = s.watch_endpoint_slices(&ns, &service, &rv).await;
                self.stream(tx, stream, Item::Slice, from.ip()).await;
                return false;
            }
        };
        match &answer {
            Ok(Reply::Leases(l)) => {
                self.meter.request(verb, 0);
                let bytes = l.items.iter().map(lease_bytes).sum::<usize>() + 200;
                if continuation {
                    self.meter.list_page(l.items.len(), bytes);
                } else {
                    self.meter.listed(l.items.len(), bytes);
                }
            }
            Ok(Reply::Slices(l)) => {
                self.meter.request(verb, 0);
                let bytes = l.items.iter().map(slice_bytes).sum::<usize>() + 200;
                if continuation {
                    self.meter.list_page(l.items.len(), bytes);
                } else {
                    self.meter.listed(l.items.len(), bytes);
                }
            }
            Ok(Reply::Lease(Some(l)) | Reply::Written(l)) => {
                self.meter.request(verb, lease_bytes(l))
            }
            Ok(_) => self.meter.request(verb, STATUS_BYTES),
            Err(e) => self.meter.request(verb, STATUS_BYTES + e.to_string().len()),
        }
        // Applied already; only the answer may be late.
        self.delays.hold_answer(from.ip(), &self.rec).await;
        tx.send(Box::new(answer) as Payload).await.is_ok()
    }

    /// Answers a watch call and forwards its events until it fails, times out, is reset, or
    /// the client goes away.
    async fn stream<T: Clone + Send + 'static>(
        &self,
        tx: &madsim::net::Sender,
        stream: Result<WatchStream<T>, ApiError>,
        wrap: fn(Result<WatchEvent<T>, ApiError>) -> Item,
        to: IpAddr,
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
        // In seeds that send out-of-contract messages, an event is sometimes sent twice (the
        // reflector must take the repeat as nothing new).
        let meter = self.meter.clone();
        let misbehave = self.out_of_contract.load(Ordering::SeqCst);
        let rec = self.rec.clone();
        let items = Box::pin(stream.flat_map(move |e| {
            let repeat = misbehave
                && matches!(&e, Ok(WatchEvent::Modified(_) | WatchEvent::Added(_)))
                && madsim::rand::random::<u32>() % 100 < 5;
            let mut out = Vec::with_capacity(2);
            if repeat {
                rec.count("door: watch event sent twice");
                out.push(wrap(e.clone()));
            }
            out.push(wrap(e));
            for i in &out {
                meter.event(i.bytes());
            }
            futures::stream::iter(out)
        }));
        let items = self.delays.lag(items, to, &self.rec);
        crate::control::wire::forward(tx, items, Item::failed, &self.reset, WATCH_TIMEOUT).await;
    }
}

#[async_trait]
impl crate::control::wire::Server for KubeDoor {
    type Request = Call;

    async fn answer(&self, tx: &madsim::net::Sender, call: Call, from: SocketAddr) -> bool {
        if let Some(resource) = call.request.read_of()
            && let Some((seen, wait)) = call.shed_seen
        {
            self.judge_retry(from.ip(), &call.request, resource, call.sent_at, seen, wait);
        }
        self.answer_call(tx, call.request, from).await
    }
}

impl Request {
    /// Whether this is a list page after the first.
    fn is_continuation(&self) -> bool {
        matches!(
            self,
            Request::ListLeases(_, _, o) | Request::ListSlices(_, _, o) if o.continue_token.is_some()
        )
    }

    /// The resource a list or watch reads (`None` for other calls).
    fn read_of(&self) -> Option<&'static str> {
        match self {
            Request::ListLeases(..) | Request::WatchLeases(..) => Some("leases"),
            Request::ListSlices(..) | Request::WatchSlices(..) => Some("endpointslices"),
            _ => None,
        }
    }

    /// The verb and resource, as the API server's metrics name requests.
    fn verb(&self) -> &'static str {
        match self {
            Request::GetLease(..) => "get leases",
            Request::CreateLease(_) => "create leases",
            Request::ReplaceLease(_) => "update leases",
            Request::DeleteLease(..) => "delete leases",
            // A list with no resource version is a quorum read (the real API server goes to
            // etcd for it); one "not older than" a version is served from the watch cache.
            // A continuation page is read from etcd at the list's revision.
            Request::ListLeases(_, _, o) if o.continue_token.is_some() => "list leases (continue)",
            Request::ListLeases(_, _, o) if o.resource_version.is_empty() => "list leases (quorum)",
            Request::ListLeases(..) => "list leases",
            Request::WatchLeases(..) => "watch leases",
            Request::ListSlices(_, _, o) if o.continue_token.is_some() => {
                "list endpointslices (continue)"
            }
            Request::ListSlices(_, _, o) if o.resource_version.is_empty() => {
                "list endpointslices (quorum)"
            }
            Request::ListSlices(..) => "list endpointslices",
            Request::WatchSlices(..) => "watch endpointslices",
        }
    }
}

/// Bytes of a `Status` answer (a delete's, or an error's), as JSON.
const STATUS_BYTES: usize = 180;

/// What the real API server's JSON of an object's metadata costs beyond its strings: the
/// envelope (`apiVersion`, `kind`, field names), `uid`, `creationTimestamp` and one
/// `managedFields` entry (server-side apply tracks the writer of every field), about 700
/// bytes for a Lease on a real cluster.
const META_BYTES: usize = 650;

fn meta_bytes(m: &ObjectMeta) -> usize {
    let pairs = |map: &BTreeMap<String, String>| -> usize {
        map.iter().map(|(k, v)| k.len() + v.len() + 6).sum()
    };
    META_BYTES
        + m.name.len()
        + m.namespace.len()
        + m.resource_version.len()
        + pairs(&m.labels)
        + pairs(&m.annotations)
        + m.owner
            .as_ref()
            .map_or(0, |o| 120 + o.name.len() + o.uid.len())
}

/// An estimate of a Lease's JSON on the wire (the simulation carries no bytes): its metadata
/// and its spec's fields.
pub fn lease_bytes(l: &Lease) -> usize {
    meta_bytes(&l.meta) + 160 + l.holder_identity.as_ref().map_or(0, String::len)
}

/// An estimate of an EndpointSlice's JSON on the wire.
pub fn slice_bytes(s: &EndpointSlice) -> usize {
    meta_bytes(&s.meta)
        + 80
        + s.endpoints
            .iter()
            .map(|e| {
                150 + e.addresses.iter().map(|a| a.len() + 4).sum::<usize>()
                    + e.zone.as_ref().map_or(0, String::len)
                    + e.target_ref
                        .as_ref()
                        .map_or(0, |r| 80 + r.name.len() + r.uid.len())
            })
            .sum::<usize>()
}

impl Item {
    /// Bytes of the watch event on the wire (`{"type":..., "object":...}`).
    fn bytes(&self) -> usize {
        fn event<T>(e: &Result<WatchEvent<T>, ApiError>, size: fn(&T) -> usize) -> usize {
            match e {
                Ok(WatchEvent::Added(o) | WatchEvent::Modified(o) | WatchEvent::Deleted(o)) => {
                    30 + size(o)
                }
                Ok(WatchEvent::Bookmark(rv)) => 120 + rv.len(),
                Err(e) => STATUS_BYTES + e.to_string().len(),
            }
        }
        match self {
            Item::Lease(e) => event(e, lease_bytes),
            Item::Slice(e) => event(e, slice_bytes),
        }
    }

    fn failed(&self) -> bool {
        match self {
            Item::Lease(r) => r.is_err(),
            Item::Slice(r) => r.is_err(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
