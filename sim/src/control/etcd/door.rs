//! The simulated etcd: the library's [`MemoryEtcd`] on its own node, reached over the
//! simulated network, so partitions, crashes and restarts apply to it.
//!
//! [`SimEtcdApi`] is the [`EtcdApi`] a simulated member uses. [`EtcdDoor`] serves it and tells
//! the oracles what etcd *accepted*: a member key written (a join, dated from its lease's
//! grant), a keep-alive of a lease holding member keys (a renewal), a revocation by its holder
//! (a leave). It also records, from the store itself after every change, which members the
//! store held at each revision: the history every node's views must come from. Members are
//! decoded here with the harness's own code, not the provider's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use madsim::time::Instant;
use shoal::etcd::api::{
    EtcdApi, EtcdError, KeyValue, LeaseId, Range, Revision, WatchBatch, WatchStream,
};
use shoal::etcd::memory::{EtcdSnapshot, MemoryEtcd};
use shoal::{ClusterTopology, Member, MemberId};

use crate::cluster::CLUSTER;
use crate::control::delays::Delays;
use crate::control::wire::{Payload, Pool};
use crate::load::LoadMeter;
use crate::oracle::Oracles;
use crate::record::Recorder;

/// The port the simulated etcd listens on.
pub const ETCD_PORT: u16 = 2379;

/// How often the simulated etcd expires leases whose TTL ran out.
pub const EXPIRY_TICK: Duration = Duration::from_millis(100);

/// Revisions the simulated etcd keeps for watches (a watcher cut off for longer relists).
pub const HISTORY: usize = 48;

/// The members prefix of the simulated cluster (the provider's default prefix).
pub fn prefix() -> String {
    format!("/shoal/{CLUSTER}/members/")
}

/// A call on the wire (the door's own protocol).
#[doc(hidden)]
#[derive(Debug)]
pub enum Request {
    Grant(Duration),
    KeepAlive(LeaseId),
    Revoke(LeaseId),
    Put(String, Vec<u8>, LeaseId),
    Delete(String),
    Range(String),
    Count(String, Revision),
    ModRevision(String, Revision),
    Watch(String, Revision),
}

#[derive(Debug)]
enum Reply {
    Granted(LeaseId, Duration),
    Kept(Duration),
    Done,
    Written(Revision),
    Range(Range),
    Count(i64),
    ModRevision(Option<Revision>),
    WatchOpened,
}

type Answer = Result<Reply, EtcdError>;
type Item = Result<WatchBatch, EtcdError>;

fn unavailable(e: impl std::fmt::Display) -> EtcdError {
    EtcdError::Unavailable(format!("etcd: {e}"))
}

/// The [`EtcdApi`] a simulated node uses.
#[derive(Clone, Debug)]
pub struct SimEtcdApi {
    pool: Pool,
}

impl SimEtcdApi {
    /// Talks to the simulated etcd at `server`.
    pub fn new(server: SocketAddr) -> Self {
        Self {
            pool: Pool::new(server),
        }
    }

    fn answer(payload: Payload) -> Answer {
        *payload
            .downcast::<Answer>()
            .map_err(|_| unavailable("malformed reply"))?
    }

    async fn call(&self, request: Request) -> Answer {
        Self::answer(
            self.pool
                .call(Box::new(request))
                .await
                .map_err(unavailable)?,
        )
    }
}

fn unexpected<T>(r: Reply) -> Result<T, EtcdError> {
    Err(unavailable(format!("unexpected reply {r:?}")))
}

#[async_trait]
impl EtcdApi for SimEtcdApi {
    async fn lease_grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), EtcdError> {
        match self.call(Request::Grant(ttl)).await? {
            Reply::Granted(id, ttl) => Ok((id, ttl)),
            r => unexpected(r),
        }
    }

    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, EtcdError> {
        match self.call(Request::KeepAlive(lease)).await? {
            Reply::Kept(ttl) => Ok(ttl),
            r => unexpected(r),
        }
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        match self.call(Request::Revoke(lease)).await? {
            Reply::Done => Ok(()),
            r => unexpected(r),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, EtcdError> {
        match self.call(Request::Put(key.into(), value, lease)).await? {
            Reply::Written(r) => Ok(r),
            r => unexpected(r),
        }
    }

    async fn delete(&self, key: &str) -> Result<Revision, EtcdError> {
        match self.call(Request::Delete(key.into())).await? {
            Reply::Written(r) => Ok(r),
            r => unexpected(r),
        }
    }

    async fn range_prefix(&self, prefix: &str) -> Result<Range, EtcdError> {
        match self.call(Request::Range(prefix.into())).await? {
            Reply::Range(r) => Ok(r),
            r => unexpected(r),
        }
    }

    async fn count_prefix(&self, prefix: &str, revision: Revision) -> Result<i64, EtcdError> {
        match self.call(Request::Count(prefix.into(), revision)).await? {
            Reply::Count(n) => Ok(n),
            r => unexpected(r),
        }
    }

    async fn mod_revision_at(
        &self,
        key: &str,
        revision: Revision,
    ) -> Result<Option<Revision>, EtcdError> {
        match self
            .call(Request::ModRevision(key.into(), revision))
            .await?
        {
            Reply::ModRevision(r) => Ok(r),
            r => unexpected(r),
        }
    }

    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, EtcdError> {
        let (first, conn) = self
            .pool
            .open(Box::new(Request::Watch(prefix.into(), from)))
            .await
            .map_err(unavailable)?;
        Self::answer(first)?;
        Ok(Box::pin(futures::stream::unfold(
            conn,
            |mut conn| async move {
                let payload = conn.next().await?;
                let item = payload.downcast::<Item>().ok()?;
                Some((*item, conn))
            },
        )))
    }
}

/// Bytes of a response header (cluster id, member id, revision, raft term), as etcd encodes it.
const HEADER_BYTES: usize = 30;

fn kv_bytes(kv: &KeyValue) -> usize {
    kv.key.len() + kv.value.len() + 30
}

/// Bytes of a range response as etcd encodes it (protobuf).
fn range_bytes(r: &Range) -> usize {
    HEADER_BYTES + r.kvs.iter().map(kv_bytes).sum::<usize>()
}

/// Bytes of one watch response (a batch of events, or a progress notification).
fn batch_bytes(item: &Item) -> usize {
    match item {
        Ok(b) => {
            HEADER_BYTES
                + b.changes
                    .iter()
                    .map(|c| match c {
                        shoal::etcd::api::Change::Put(kv) => kv_bytes(kv) + 4,
                        shoal::etcd::api::Change::Delete { key, .. } => key.len() + 34,
                    })
                    .sum::<usize>()
        }
        Err(e) => HEADER_BYTES + e.to_string().len(),
    }
}

impl Request {
    /// The verb, as etcd's gRPC methods are named.
    fn verb(&self) -> &'static str {
        match self {
            Request::Grant(_) => "lease grant",
            Request::KeepAlive(_) => "lease keep-alive",
            Request::Revoke(_) => "lease revoke",
            Request::Put(..) => "put",
            Request::Delete(_) => "delete",
            Request::Range(_) | Request::Count(..) | Request::ModRevision(..) => "range",
            Request::Watch(..) => "watch",
        }
    }
}

/// The member a key of the simulated cluster describes, decoded by the harness.
fn member_of(kv: &KeyValue) -> Option<Member> {
    let id = MemberId::parse(kv.key.strip_prefix(&prefix())?).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
    let kinds: Vec<String> = v["kinds"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|k| k.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let mut m = Member::new(id, v["address"].as_str()?, kinds);
    m.zone = v["zone"].as_str().map(String::from);
    if let Some(meta) = v["metadata"].as_object() {
        m.metadata = meta
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect();
    }
    Some(m)
}

/// The members a store content lists, as the topology of its revision.
fn topology_of(range: &Range) -> ClusterTopology {
    let members: Vec<Member> = range
        .kvs
        .iter()
        .filter(|kv| kv.lease != 0)
        .filter_map(member_of)
        .collect();
    ClusterTopology::new(
        CLUSTER.to_string(),
        u64::try_from(range.revision).unwrap_or(0),
        members,
    )
    .map(|t| t.with_epoch(range.cluster_id))
    .unwrap_or_else(|_| ClusterTopology::empty(CLUSTER))
}

/// The simulated etcd's front door.
pub struct EtcdDoor {
    store: MemoryEtcd,
    /// Whether watches carry out-of-contract batches (repeated, older).
    pub out_of_contract: std::sync::atomic::AtomicBool,
    /// What etcd served.
    pub meter: Arc<LoadMeter>,
    oracles: Arc<Oracles>,
    rec: Recorder,
    /// Member ids written under each lease, and when the lease was granted.
    leases: Mutex<BTreeMap<LeaseId, (Instant, BTreeSet<MemberId>)>>,
    /// Members whose keep-alives are lost at the door (a `heartbeat-loss` fault).
    lose_keep_alives: Mutex<BTreeSet<IpAddr>>,
    /// Late answers and lagging watches (faults `slow-answers`, `lagging-watch`).
    pub delays: Delays,
    /// The store's content now, as the observer last saw it.
    current: Mutex<Arc<ClusterTopology>>,
    /// Snapshots restored so far: the history the store's revisions are judged in (a restore
    /// reuses revisions, so each restore starts another, see [`history_epoch`]).
    restores: AtomicU64,
    reset: tokio::sync::Notify,
}

/// The epoch the harness files the store's history under: the cluster id, mixed with how many
/// snapshots were restored (a restored store reuses revisions it had issued with other
/// members). The harness's own bookkeeping, not what a node computes.
pub fn history_epoch(cluster_id: u64, restores: u64) -> u64 {
    if restores == 0 {
        cluster_id
    } else {
        cluster_id ^ restores.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
    }
}

/// What [`EtcdDoor::snapshot`] saves: the store's copy and the door's record of which members
/// each lease held, taken together.
#[derive(Clone, Debug)]
pub struct DoorSnapshot {
    store: EtcdSnapshot,
    leases: BTreeMap<LeaseId, BTreeSet<MemberId>>,
}

impl std::fmt::Debug for EtcdDoor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdDoor").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EtcdDoor {
    /// A door in front of `store`, recording what the store holds at every revision.
    pub fn new(store: MemoryEtcd, oracles: Arc<Oracles>, rec: Recorder) -> Arc<Self> {
        let door = Arc::new(Self {
            store: store.clone(),
            out_of_contract: Default::default(),
            meter: Arc::default(),
            oracles: oracles.clone(),
            rec,
            leases: Mutex::default(),
            lose_keep_alives: Mutex::default(),
            delays: Delays::default(),
            current: Mutex::new(Arc::new(ClusterTopology::empty(CLUSTER))),
            restores: AtomicU64::new(0),
            reset: tokio::sync::Notify::new(),
        });
        let weak = Arc::downgrade(&door);
        store.set_observer(Arc::new(move |range: &Range| {
            let mut t = topology_of(range);
            if let Some(d) = weak.upgrade() {
                let restores = d.restores.load(Ordering::SeqCst);
                t = t.with_epoch(history_epoch(range.cluster_id, restores));
                *lock(&d.current) = Arc::new(t.clone());
            }
            oracles.issued(t);
        }));
        door
    }

    /// Snapshots restored so far.
    pub fn restores(&self) -> u64 {
        self.restores.load(Ordering::SeqCst)
    }

    /// A copy of the store and of which members its leases hold (`etcdctl snapshot save`).
    pub fn snapshot(&self) -> DoorSnapshot {
        DoorSnapshot {
            store: self.store.snapshot(),
            leases: lock(&self.leases)
                .iter()
                .map(|(lease, (_, ids))| (*lease, ids.clone()))
                .collect(),
        }
    }

    /// Restores `snapshot` into the store with the same cluster id (`etcdctl snapshot
    /// restore`): the history oracle is told the store's revisions start another history,
    /// and the lease oracle that run `run` starts with the snapshot's members, their leases'
    /// TTLs starting over.
    pub fn restore(&self, snapshot: &DoorSnapshot, run: u64) {
        let before = self.topology().epoch();
        let restores = self.restores.fetch_add(1, Ordering::SeqCst) + 1;
        let cluster_id = self.store.cluster_id();
        self.oracles
            .history_restored(before, history_epoch(cluster_id, restores));
        self.store.restore(&snapshot.store);
        let now = Instant::now();
        let listed = self.topology();
        *lock(&self.leases) = snapshot
            .leases
            .iter()
            .map(|(lease, ids)| (*lease, (now, ids.clone())))
            .collect();
        let members: Vec<(MemberId, String)> = listed
            .members()
            .iter()
            .map(|m| (m.id.clone(), m.address.clone()))
            .collect();
        self.oracles.store_restored(run, &members, now);
        self.rec.trace(
            "etcd",
            format!(
                "restored the snapshot of revision {} ({} members)",
                snapshot.store.revision(),
                listed.members().len()
            ),
        );
    }

    /// The store.
    pub fn store(&self) -> &MemoryEtcd {
        &self.store
    }

    /// The members the store holds now (the lease oracle's view of the backend).
    pub fn topology(&self) -> Arc<ClusterTopology> {
        lock(&self.current).clone()
    }

    /// Keep-alives from `ip` are lost at the door (or no longer).
    pub fn set_keep_alive_loss(&self, ip: IpAddr, lost: bool) {
        let mut l = lock(&self.lose_keep_alives);
        if lost {
            l.insert(ip);
        } else {
            l.remove(&ip);
        }
    }

    /// Delivers every keep-alive again.
    pub fn clear_keep_alive_loss(&self) {
        lock(&self.lose_keep_alives).clear();
    }

    /// Ends every open watch (a proxy in front of etcd restarting).
    pub fn reset_streams(&self) {
        self.reset.notify_waiters();
    }

    /// Serves on this node until it dies.
    pub async fn serve(self: Arc<Self>) {
        if let Err(e) = crate::control::wire::serve(self.clone(), ETCD_PORT).await {
            self.rec.trace("etcd", format!("cannot bind: {e}"));
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
        let answer: Answer = match request {
            Request::Grant(ttl) => {
                let r = s.lease_grant(ttl).await;
                if let Ok((id, _)) = &r {
                    lock(&self.leases).insert(*id, (Instant::now(), BTreeSet::new()));
                }
                r.map(|(id, ttl)| Reply::Granted(id, ttl))
            }
            Request::KeepAlive(lease) => {
                if lock(&self.lose_keep_alives).contains(&from.ip()) {
                    return false; // Lost: no answer, the connection just closes.
                }
                let r = s.lease_keep_alive(lease).await;
                if r.is_ok() {
                    let ids = lock(&self.leases)
                        .get(&lease)
                        .map(|(_, ids)| ids.clone())
                        .unwrap_or_default();
                    for id in &ids {
                        self.oracles.renewed(id);
                    }
                }
                r.map(Reply::Kept)
            }
            Request::Revoke(lease) => {
                let r = s.lease_revoke(lease).await;
                if r.is_ok()
                    && let Some((_, ids)) = lock(&self.leases).remove(&lease)
                {
                    for id in ids {
                        self.oracles.left(&id);
                    }
                }
                r.map(|()| Reply::Done)
            }
            Request::Put(key, value, lease) => {
                let kv = KeyValue {
                    key: key.clone(),
                    value: value.clone(),
                    create_revision: 0,
                    mod_revision: 0,
                    lease,
                };
                let r = s.put(&key, value, lease).await;
                if r.is_ok()
                    && let Some(m) = member_of(&kv)
                {
                    let mut leases = lock(&self.leases);
                    let entry = leases
                        .entry(lease)
                        .or_insert_with(|| (Instant::now(), BTreeSet::new()));
                    if entry.1.insert(m.id.clone()) {
                        self.oracles.joined_at(m.id, m.address, entry.0);
                    }
                }
                r.map(Reply::Written)
            }
            Request::Delete(key) => {
                let r = s.delete(&key).await;
                if r.is_ok() {
                    self.rec
                        .trace("etcd", format!("{} deleted {key}", from.ip()));
                }
                r.map(Reply::Written)
            }
            Request::Range(prefix) => s.range_prefix(&prefix).await.map(Reply::Range),
            Request::Count(prefix, revision) => {
                s.count_prefix(&prefix, revision).await.map(Reply::Count)
            }
            Request::ModRevision(key, revision) => s
                .mod_revision_at(&key, revision)
                .await
                .map(Reply::ModRevision),
            Request::Watch(prefix, from_revision) => {
                self.meter.request(verb, 0);
                let stream = s.watch_prefix(&prefix, from_revision).await;
                self.stream(tx, stream, from.ip()).await;
                return false;
            }
        };
        // Applied already; only the answer may be late.
        self.delays.hold_answer(from.ip(), &self.rec).await;
        match &answer {
            Ok(Reply::Range(r)) => {
                self.meter.request(verb, 0);
                self.meter.listed(r.kvs.len(), range_bytes(r));
            }
            Ok(_) => self.meter.request(verb, HEADER_BYTES),
            Err(e) => self.meter.request(verb, HEADER_BYTES + e.to_string().len()),
        }
        tx.send(Box::new(answer) as Payload).await.is_ok()
    }

    async fn stream(
        &self,
        tx: &madsim::net::Sender,
        stream: Result<WatchStream, EtcdError>,
        to: IpAddr,
    ) {
        let stream = match stream {
            Ok(s) => self.delays.lag(s, to, &self.rec),
            Err(e) => {
                let _ = tx.send(Box::new(Err::<Reply, _>(e)) as Payload).await;
                return;
            }
        };
        if tx
            .send(Box::new(Ok::<_, EtcdError>(Reply::WatchOpened)) as Payload)
            .await
            .is_err()
        {
            return;
        }
        // A watch lasts until it fails, is reset, or the client goes away. In seeds that send
        // out-of-contract messages, a batch is sometimes sent twice, or followed by the batch
        // before it (revisions the watcher already holds).
        let meter = self.meter.clone();
        let misbehave = self
            .out_of_contract
            .load(std::sync::atomic::Ordering::SeqCst);
        let rec = self.rec.clone();
        let mut previous: Option<Item> = None;
        let stream = Box::pin(futures::StreamExt::flat_map(stream, move |item: Item| {
            let mut out = vec![item.clone()];
            if misbehave && item.is_ok() {
                match madsim::rand::random::<u32>() % 100 {
                    0..5 => {
                        rec.count("door: watch batch sent twice");
                        out.push(item.clone());
                    }
                    5..10 => {
                        if let Some(p) = previous.clone() {
                            rec.count("door: older watch batch sent again");
                            out.push(p);
                        }
                    }
                    _ => {}
                }
            }
            if item.is_ok() {
                previous = Some(item);
            }
            for i in &out {
                meter.event(batch_bytes(i));
            }
            futures::stream::iter(out)
        }));
        crate::control::wire::forward(
            tx,
            stream,
            Result::is_err,
            &self.reset,
            Duration::from_secs(24 * 3600),
        )
        .await;
    }
}

#[async_trait]
impl crate::control::wire::Server for EtcdDoor {
    type Request = Request;

    async fn answer(&self, tx: &madsim::net::Sender, request: Request, from: SocketAddr) -> bool {
        self.answer_call(tx, request, from).await
    }
}
