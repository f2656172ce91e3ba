//! The simulated etcd: the library's [`MemoryEtcd`] on its own node, reached over the
//! simulated network, so partitions, crashes and restarts apply to it.
//!
//! A three-member etcd is three such nodes sharing the store (raft's replicated state): each
//! serves its own connections, so a frozen member leaves its calls unanswered and its watches
//! silent while the others serve; the leader expires leases, and losing it costs an election
//! (every member answers `no leader` meanwhile, and the new leader starts every lease's TTL
//! over, as etcd's lessor does when promoted). With authentication on, every call carries a
//! token the member issued; a token expires a TTL after it was issued (as a JWT does; a simple
//! token lives until etcd restarts), is forgotten when its member restarts, and is refused as
//! old once the auth store changed.
//!
//! [`super::SimEtcdApi`] is the client a simulated member uses. [`EtcdDoor`] serves it and tells
//! the oracles what etcd *accepted*: a member key written (a join, dated from its lease's
//! grant), a keep-alive of a lease holding member keys (a renewal), a revocation by its holder
//! (a leave). It also records, from the store itself after every change, which members the
//! store held at each revision: the history every node's views must come from. Members are
//! decoded here with the harness's own code, not the provider's.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
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
use crate::control::wire::Payload;
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
#[derive(Clone, Debug)]
pub enum Request {
    Authenticate(String, String),
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

#[doc(hidden)]
#[derive(Debug)]
pub enum Reply {
    Token(Token),
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

/// An auth token the door issued.
pub type Token = u64;

/// A call on the wire: the request and the token it carries (when authentication is on).
#[doc(hidden)]
#[derive(Debug)]
pub struct Call {
    pub token: Option<Token>,
    pub request: Request,
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
            Request::Authenticate(..) => "authenticate",
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
    /// Authentication, when on: how long a token lives.
    token_ttl: Option<Duration>,
    /// Tokens issued: by which etcd member, until when, under which auth store revision.
    tokens: Mutex<BTreeMap<Token, Issued>>,
    next_token: AtomicU64,
    auth_revision: AtomicU64,
    /// The etcd member that leads (expires leases, compacts).
    leader: AtomicUsize,
    /// Whether an election is under way (every member answers `no leader`).
    electing: AtomicBool,
    /// Who wins the election under way, and when.
    candidate: Mutex<Option<(usize, Instant)>>,
    /// Raised by every change of leader (a leader's tasks run for one term).
    term: AtomicU64,
    /// The etcd member each client's latest watch was opened on (by the client's address).
    watches: Mutex<BTreeMap<IpAddr, usize>>,
    /// Watches stalled on a frozen or crashed etcd member: the member, since when, until
    /// when (`None`: still).
    stalls: Mutex<BTreeMap<IpAddr, Stall>>,
}

/// A watch stalled on a frozen or crashed etcd member: the member, since when, and until when
/// at the latest (the member came back, the client opened a watch elsewhere, or the time a
/// client that notices silence needs to move has passed).
type Stall = (usize, Instant, Instant);

/// A token the door issued.
#[derive(Clone, Copy, Debug)]
struct Issued {
    member: usize,
    until: Instant,
    auth_revision: u64,
}

/// The user simulated members authenticate as, and its password.
pub const USER: (&str, &str) = ("shoal", "shoal-secret");

/// A call as one etcd member's door receives it.
struct MemberDoor {
    door: Arc<EtcdDoor>,
    member: usize,
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
    pub fn new(
        store: MemoryEtcd,
        oracles: Arc<Oracles>,
        rec: Recorder,
        token_ttl: Option<Duration>,
    ) -> Arc<Self> {
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
            token_ttl,
            tokens: Mutex::default(),
            next_token: AtomicU64::new(1),
            auth_revision: AtomicU64::new(1),
            leader: AtomicUsize::new(0),
            electing: AtomicBool::new(false),
            candidate: Mutex::default(),
            term: AtomicU64::new(0),
            watches: Mutex::default(),
            stalls: Mutex::default(),
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

    /// Serves as etcd member `member` on this node until it dies.
    pub async fn serve(self: Arc<Self>, member: usize) {
        let door = Arc::new(MemberDoor {
            door: self.clone(),
            member,
        });
        if let Err(e) = crate::control::wire::serve(door, ETCD_PORT).await {
            self.rec.trace("etcd", format!("cannot bind: {e}"));
        }
    }

    /// The current leader's term.
    pub fn term(&self) -> u64 {
        self.term.load(Ordering::SeqCst)
    }

    /// The etcd member that leads.
    pub fn leader(&self) -> usize {
        self.leader.load(Ordering::SeqCst)
    }

    /// Whether an election is under way.
    pub fn electing(&self) -> bool {
        self.electing.load(Ordering::SeqCst)
    }

    /// An election starts (the leader was lost): every member answers `no leader` until
    /// `candidate` takes over, `takes` from now.
    pub fn start_election(&self, candidate: usize, takes: Duration) {
        *lock(&self.candidate) = Some((candidate, Instant::now() + takes));
        self.electing.store(true, Ordering::SeqCst);
    }

    /// Whether member `k` won the election under way now (it then leads: every lease's TTL
    /// starts over).
    pub fn elected(&self, k: usize) -> bool {
        let mut candidate = lock(&self.candidate);
        match *candidate {
            Some((c, at)) if c == k && Instant::now() >= at => {
                *candidate = None;
                drop(candidate);
                self.set_leader(k, true);
                true
            }
            _ => false,
        }
    }

    /// Member `k` leads from now on; with `promoted`, it won an election and every lease's
    /// TTL starts over (etcd's lessor promotion).
    pub fn set_leader(&self, k: usize, promoted: bool) {
        self.leader.store(k, Ordering::SeqCst);
        self.term.fetch_add(1, Ordering::SeqCst);
        *lock(&self.candidate) = None;
        if promoted {
            self.store.extend_leases();
            self.oracles.leases_extended(&self.topology());
        }
        self.electing.store(false, Ordering::SeqCst);
    }

    /// Etcd member `k` froze or crashed: the watches last opened on it stall from now on, for
    /// `notice` at most (what a client that notices a silent watch needs to move).
    pub fn stall_watchers_of(&self, k: usize, notice: Duration) {
        let now = Instant::now();
        let watches = lock(&self.watches);
        let mut stalls = lock(&self.stalls);
        for (ip, _) in watches.iter().filter(|(_, m)| **m == k) {
            stalls.insert(*ip, (k, now, now + notice));
        }
    }

    /// Etcd member `k` is back (`None`: every member, a whole-etcd restart): the watches
    /// stalled on it stall no more.
    pub fn end_stalls_on(&self, k: Option<usize>) {
        let now = Instant::now();
        for (m, _, until) in lock(&self.stalls).values_mut() {
            if k.is_none_or(|k| k == *m) && *until > now {
                *until = now;
            }
        }
    }

    /// Until when the watch of the client at `ip` stalled, if that stall lasted past `since`.
    pub fn view_stalled_until(&self, ip: IpAddr, since: Instant) -> Option<Instant> {
        lock(&self.stalls)
            .get(&ip)
            .map(|(_, _, until)| *until)
            .filter(|until| *until >= since)
    }

    /// The client at `ip` opened a watch on etcd member `k` (its watch stall, if any, ends).
    fn watch_opened(&self, ip: IpAddr, k: usize) {
        lock(&self.watches).insert(ip, k);
        let now = Instant::now();
        if let Some((_, _, until)) = lock(&self.stalls).get_mut(&ip)
            && *until > now
        {
            *until = now;
        }
    }

    /// Forgets the tokens member `member` issued (`None`: every member's): it restarted.
    pub fn forget_tokens(&self, member: Option<usize>) {
        lock(&self.tokens).retain(|_, t| member.is_some_and(|m| m != t.member));
    }

    /// Changes the auth store: every token issued so far is refused as old. False when
    /// authentication is off.
    pub fn change_auth(&self) -> bool {
        if self.token_ttl.is_none() {
            return false;
        }
        self.auth_revision.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// Why member `member` refuses `call` before looking at it: an election under way, a
    /// token missing, unknown, expired or older than the auth store.
    fn refusal(&self, member: usize, call: &Call) -> Option<EtcdError> {
        if self.electing() {
            return Some(EtcdError::Unavailable("etcdserver: no leader".into()));
        }
        self.token_ttl?;
        if let Request::Authenticate(user, password) = &call.request {
            return ((user.as_str(), password.as_str()) != USER).then(|| {
                EtcdError::Rejected(
                    "etcdserver: authentication failed, invalid user ID or password".into(),
                )
            });
        }
        let now = Instant::now();
        let issued = call
            .token
            .and_then(|t| lock(&self.tokens).get(&t).copied())
            .filter(|t| t.member == member && t.until > now);
        match issued {
            None => Some(EtcdError::Rejected("etcdserver: invalid auth token".into())),
            Some(t) if t.auth_revision < self.auth_revision.load(Ordering::SeqCst) => Some(
                EtcdError::Rejected("etcdserver: revision of auth store is old".into()),
            ),
            Some(_) => None,
        }
    }

    /// A new token from member `member` (expired ones are dropped: the table holds at most
    /// one per connection alive within a TTL).
    fn issue(&self, member: usize) -> Token {
        let token = self.next_token.fetch_add(1, Ordering::SeqCst);
        let now = Instant::now();
        let until = now + self.token_ttl.unwrap_or(Duration::ZERO);
        let mut tokens = lock(&self.tokens);
        tokens.retain(|_, t| t.until > now);
        tokens.insert(
            token,
            Issued {
                member,
                until,
                auth_revision: self.auth_revision.load(Ordering::SeqCst),
            },
        );
        token
    }

    /// Answers one call to etcd member `member`; whether the connection may carry another.
    async fn answer_call(
        &self,
        tx: &madsim::net::Sender,
        call: Call,
        from: SocketAddr,
        member: usize,
    ) -> bool {
        let s = &self.store;
        let refused = self.refusal(member, &call);
        let request = call.request;
        let verb = request.verb();
        let answer: Answer = match (request, refused) {
            (Request::Watch(..), Some(e)) => {
                self.meter.request(verb, 0);
                self.stream(tx, Err(e), from.ip()).await;
                return false;
            }
            (_, Some(e)) => Err(e),
            (request, None) => match request {
                Request::Authenticate(..) => Ok(Reply::Token(self.issue(member))),
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
                    if stream.is_ok() {
                        self.watch_opened(from.ip(), member);
                    }
                    self.stream(tx, stream, from.ip()).await;
                    return false;
                }
            },
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
impl crate::control::wire::Server for MemberDoor {
    type Request = Call;

    async fn answer(&self, tx: &madsim::net::Sender, call: Call, from: SocketAddr) -> bool {
        self.door.answer_call(tx, call, from, self.member).await
    }
}
