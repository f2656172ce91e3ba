//! The network in front of the registry, as the harness sees it: a decorator over the registry's
//! gRPC service that records every request the registry *accepted* and every watch message it
//! sent (for the oracles), and that can lose a member's heartbeats, duplicate its leaves, or reset
//! every watch stream (a connection reset: a proxy or NIC in front of the registry restarting).
//!
//! This is the simulator's only hook into the registry: the product serves it through its real
//! `RegistryServer::serve_with` path and never knows.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::{Stream, StreamExt};
use shoal::MemberId;
use shoal::registry::pb::registry_server::Registry;
use shoal::registry::{RegistryService, pb};
use tonic::{Request, Response, Status};

use crate::load::LoadMeter;
use crate::oracle::Oracles;
use crate::record::Recorder;

/// Faults the harness injects at the registry's door; shared by every registry run.
#[derive(Debug, Default)]
pub struct Door {
    state: Mutex<DoorState>,
    /// What the registry served (every run).
    pub meter: LoadMeter,
    /// Woken when every open watch stream is to be reset.
    reset: tokio::sync::Notify,
}

/// The longest a congested proxy holds a join (see [`Door::set_late_requests`]).
pub const MAX_JOIN_HOLD: std::time::Duration = std::time::Duration::from_secs(15);
/// How long a congestion episode lasts.
const EPISODE: std::time::Duration = std::time::Duration::from_secs(10);
/// The quiet time after an episode before another may start.
const EPISODE_GAP: std::time::Duration = std::time::Duration::from_secs(50);

#[derive(Debug, Default)]
struct DoorState {
    /// Members whose heartbeats are lost on the way (never answered).
    lost: BTreeSet<MemberId>,
    /// Every token the registry handed out, with its holder.
    tokens: BTreeMap<String, MemberId>,
    /// Ids that ever joined (a join of one of them again is a re-join).
    seen: BTreeSet<MemberId>,
    /// Whether accepted leaves are delivered a second time, later (a retried request).
    duplicate_leaves: bool,
    /// Whether each member's first Leave is lost on the way (the caller sees Unavailable).
    lose_first_leave: bool,
    /// Members whose first Leave was lost.
    lost_leave: BTreeSet<MemberId>,
    /// Stream resets so far; a stream opened before the latest one is reset.
    resets: u64,
    /// Whether watch streams carry out-of-contract messages (dropped, repeated and older
    /// ones): the clients' defenses must hold.
    out_of_contract: bool,
    /// Whether joins may reach the registry late (buggify seeds, until the heal): see
    /// [`Door::set_late_requests`].
    late_requests: bool,
    /// The end of the congestion episode in progress, if any.
    congested_until: Option<madsim::time::Instant>,
}

impl Door {
    fn lock(&self) -> MutexGuard<'_, DoorState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts or stops losing `id`'s heartbeats.
    pub fn set_heartbeat_loss(&self, id: &MemberId, lost: bool) {
        let mut s = self.lock();
        if lost {
            s.lost.insert(id.clone());
        } else {
            s.lost.remove(id);
        }
    }

    /// Loses no heartbeat any more.
    pub fn clear_heartbeat_loss(&self) {
        self.lock().lost.clear();
    }

    /// Whether accepted leaves are replayed a few seconds later.
    pub fn set_duplicate_leaves(&self, on: bool) {
        self.lock().duplicate_leaves = on;
    }

    /// Whether joins may reach the registry late (buggify seeds: a congested proxy), during
    /// the fault phase only (while madsim's buggify is enabled). One join in ten starts a 10 s
    /// episode in which every join is held 1-15 s, at most one episode a minute: a provider
    /// that gives up on its join and retries sends several joins of one id, and the registry
    /// may apply one, expire the id (no heartbeats follow it) and then receive another. Joins
    /// already held when the fault phase ends still arrive late ([`MAX_JOIN_HOLD`]).
    pub fn set_late_requests(&self, on: bool) {
        let mut s = self.lock();
        s.late_requests = on;
        s.congested_until = None;
    }

    /// How long to hold a join arriving now (see [`Door::set_late_requests`]).
    fn join_delay(&self) -> Option<std::time::Duration> {
        let mut s = self.lock();
        if !s.late_requests || !madsim::buggify::is_enabled() {
            return None;
        }
        let now = madsim::time::Instant::now();
        let congested = match s.congested_until {
            Some(until) if now < until => true,
            Some(until) if now < until + EPISODE_GAP => return None,
            _ => false,
        };
        if !congested {
            if !madsim::rand::random::<u32>().is_multiple_of(10) {
                return None;
            }
            s.congested_until = Some(now + EPISODE);
        }
        let hold = MAX_JOIN_HOLD.as_millis() as u64 - 1_000;
        let ms = 1_000 + madsim::rand::random::<u64>() % hold;
        Some(std::time::Duration::from_millis(ms))
    }

    /// Whether watch streams carry out-of-contract messages (see [`DoorState`]).
    pub fn set_out_of_contract(&self, on: bool) {
        self.lock().out_of_contract = on;
    }

    fn out_of_contract(&self) -> bool {
        self.lock().out_of_contract
    }

    /// Whether each member's first Leave is lost on the way (a graceful shutdown must retry).
    pub fn set_lose_first_leave(&self, on: bool) {
        self.lock().lose_first_leave = on;
    }

    /// Resets every watch stream open now: each ends with `Unavailable`, as when the
    /// connection under it is reset.
    pub fn reset_streams(&self) {
        self.lock().resets += 1;
        self.reset.notify_waiters();
    }

    fn resets(&self) -> u64 {
        self.lock().resets
    }

    /// Whether `id`'s heartbeats are being lost.
    pub fn is_lost(&self, id: &MemberId) -> bool {
        self.lock().lost.contains(id)
    }
}

/// The registry service behind the door.
pub struct Observed {
    inner: Arc<RegistryService>,
    door: Arc<Door>,
    oracles: Arc<Oracles>,
    rec: Recorder,
}

impl Observed {
    /// Wraps `inner`.
    pub fn new(
        inner: RegistryService,
        door: Arc<Door>,
        oracles: Arc<Oracles>,
        rec: Recorder,
    ) -> Self {
        Self {
            inner: Arc::new(inner),
            door,
            oracles,
            rec,
        }
    }

    fn holder(&self, token: &str) -> Option<MemberId> {
        self.door.lock().tokens.get(token).cloned()
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl Registry for Observed {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = request.get_ref().clone();
        if let Some(delay) = self.door.join_delay() {
            // Held in a congested proxy: it reaches the registry seconds after it was sent,
            // possibly after the caller gave up on it (and after the id it names expired).
            self.rec.count("registry: join delivered late");
            madsim::time::sleep(delay).await;
        }
        let resp = self.inner.join(request).await;
        self.door.meter.request("join", answer_len(&resp));
        let resp = resp?;
        let address = req.member.as_ref().map(|m| m.address.clone());
        let described = req.member.clone();
        if let Some(id) = req.member.and_then(|m| MemberId::parse(m.id).ok()) {
            let member = req.role != pb::Role::Client as i32;
            let again = {
                let mut s = self.door.lock();
                s.tokens
                    .insert(resp.get_ref().member_token.clone(), id.clone());
                !s.seen.insert(id.clone())
            };
            if again {
                self.rec.count("registry: re-join of a known id");
            }
            if member && let Some(m) = &described {
                self.oracles.described(m, resp.get_ref().topology_version);
            }
            self.oracles.joined(id, member, address.unwrap_or_default());
        }
        Ok(resp)
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let holder = self.holder(&request.get_ref().member_token);
        if holder.as_ref().is_some_and(|id| self.door.is_lost(id)) {
            // Lost on the way: the caller's deadline passes.
            std::future::pending::<()>().await;
        }
        let resp = self.inner.heartbeat(request).await;
        self.door.meter.request("heartbeat", answer_len(&resp));
        let resp = resp?;
        if let Some(id) = holder {
            self.oracles.renewed(&id);
        }
        Ok(resp)
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = request.get_ref().clone();
        let holder = self.holder(&req.member_token);
        let lose = holder.as_ref().is_some_and(|id| {
            let mut s = self.door.lock();
            s.lose_first_leave && s.lost_leave.insert(id.clone())
        });
        if lose {
            self.rec.count("registry: first leave lost on the way");
            return Err(Status::unavailable("leave lost on the way (simulated)"));
        }
        let resp = self.inner.leave(request).await;
        self.door.meter.request("leave", answer_len(&resp));
        let resp = resp?;
        if let Some(id) = holder {
            self.oracles.left(&id);
        }
        if self.door.lock().duplicate_leaves {
            // The same request again, later: its token is spent, so it must change nothing.
            let (inner, rec) = (self.inner.clone(), self.rec.clone());
            madsim::task::spawn(async move {
                madsim::time::sleep(Duration::from_millis(1_500)).await;
                rec.count("registry: duplicated leave");
                if Registry::leave(&*inner, Request::new(req)).await.is_ok() {
                    rec.violation(
                        "registry: a duplicated leave with a spent token was accepted".into(),
                    );
                }
            });
        }
        Ok(resp)
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<pb::WatchRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        if request.get_ref().from_version != 0 {
            self.rec.count("registry: watch resumed from a version");
        }
        let stream = self.inner.watch(request).await;
        self.door.meter.request("watch", 0);
        let stream = stream?.into_inner();
        let watching = Watching {
            stream,
            opened: self.door.resets(),
            door: self.door.clone(),
            oracles: self.oracles.clone(),
            rec: self.rec.clone(),
            pieces: Vec::new(),
            queue: std::collections::VecDeque::new(),
            older: None,
            dropped: false,
            ended: false,
        };
        // Each message the registry sends is recorded for the oracles (a snapshot sent in
        // fragments once all of it is seen, reassembled here by the harness's own code); a
        // reset ends the stream with an error (once), then nothing.
        let observed = futures::stream::unfold(watching, |mut w| async move {
            let item = w.next().await?;
            Some((item, w))
        });
        Ok(Response::new(Box::pin(observed)))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        let resp = self.inner.resolve(request).await;
        self.door.meter.request("resolve", answer_len(&resp));
        resp
    }
}

type Item = Result<pb::WatchResponse, Status>;

/// One watch stream as it passes the door.
struct Watching {
    stream: Pin<Box<dyn Stream<Item = Item> + Send + 'static>>,
    /// The reset count when it opened (a later reset ends it).
    opened: u64,
    door: Arc<Door>,
    oracles: Arc<Oracles>,
    rec: Recorder,
    /// The fragments of a snapshot seen so far.
    pieces: Vec<u8>,
    /// Messages the door sends out of contract before the next one of the registry's.
    queue: std::collections::VecDeque<Item>,
    /// The first whole snapshot of this stream (sent again later: an older snapshot).
    older: Option<pb::WatchResponse>,
    /// Whether this stream dropped an update already: it drops one at most, so the next
    /// progress message shows the gap within a progress interval (a second drop would push
    /// the server's quiet timer on, beyond the late-delivery bound: `graceful-leave` seed 344).
    dropped: bool,
    ended: bool,
}

impl Watching {
    async fn next(&mut self) -> Option<Item> {
        if let Some(item) = self.queue.pop_front() {
            return Some(item);
        }
        loop {
            if self.ended {
                return None;
            }
            let item = {
                let reset = self.door.reset.notified();
                tokio::pin!(reset);
                reset.as_mut().enable();
                if self.door.resets() != self.opened {
                    None
                } else {
                    tokio::select! {
                        biased;
                        _ = &mut reset => None,
                        item = self.stream.next() => Some(item?),
                    }
                }
            };
            let Some(item) = item else {
                self.ended = true;
                return Some(Err(Status::unavailable("connection reset (simulated)")));
            };
            let Ok(msg) = &item else {
                return Some(item);
            };
            self.observe(msg);
            if self.door.out_of_contract() && self.pieces.is_empty() && self.misbehave(msg) {
                continue; // Dropped: the watcher sees a gap.
            }
            return Some(item);
        }
    }

    /// Records `msg` for the oracles and the load meter.
    fn observe(&mut self, msg: &pb::WatchResponse) {
        let (door, oracles, rec) = (&self.door, &self.oracles, &self.rec);
        let bytes = prost::Message::encoded_len(msg);
        match &msg.event {
            Some(pb::watch_response::Event::Snapshot(s)) if s.fragment => {
                // One logical message: counted once whole, bytes as sent.
                door.meter.bytes(bytes);
                rec.count("registry: snapshot fragments sent");
                self.pieces.extend_from_slice(&s.packed_members);
            }
            Some(pb::watch_response::Event::Snapshot(s)) if !self.pieces.is_empty() => {
                self.pieces.extend_from_slice(&s.packed_members);
                let mut whole = s.clone();
                whole.packed_members = std::mem::take(&mut self.pieces).into();
                let members = oracles.sent(&pb::WatchResponse {
                    event: Some(pb::watch_response::Event::Snapshot(whole)),
                });
                door.meter.snapshot_sent(members.unwrap_or(0), bytes);
            }
            _ if !self.pieces.is_empty() => {
                rec.violation_once(
                    "fragments interrupted".into(),
                    "history: the registry interrupted a fragmented snapshot with another message"
                        .into(),
                );
                self.pieces.clear();
                door.meter.event(bytes);
            }
            Some(pb::watch_response::Event::Snapshot(_)) => {
                let members = oracles.sent(msg);
                door.meter.snapshot_sent(members.unwrap_or(0), bytes);
                if self.older.is_none() {
                    self.older = Some(msg.clone());
                }
            }
            _ => {
                oracles.sent(msg);
                door.meter.event(bytes);
            }
        }
    }

    /// In seeds that send out-of-contract messages: after an update, sometimes drop it (the
    /// watcher sees the next one across a gap), send it twice, or follow it with this stream's
    /// first snapshot (older than what the watcher holds). Whether `msg` is dropped.
    fn misbehave(&mut self, msg: &pb::WatchResponse) -> bool {
        let Some(pb::watch_response::Event::Update(_)) = &msg.event else {
            return false;
        };
        match madsim::rand::random::<u32>() % 100 {
            0..4 if !self.dropped => {
                self.dropped = true;
                self.rec.count("door: update dropped (a gap)");
                self.door.meter.provoked();
                true
            }
            4..8 => {
                self.rec.count("door: update sent twice");
                self.queue.push_back(Ok(msg.clone()));
                false
            }
            8..12 => {
                if let Some(older) = &self.older {
                    self.rec.count("door: older snapshot sent");
                    self.queue.push_back(Ok(older.clone()));
                }
                false
            }
            _ => false,
        }
    }
}

/// Bytes of an answer as the registry encodes it (a refusal: its message).
fn answer_len<T: prost::Message>(r: &Result<Response<T>, Status>) -> usize {
    match r {
        Ok(r) => r.get_ref().encoded_len(),
        Err(s) => s.message().len() + 16,
    }
}
