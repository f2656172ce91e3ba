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

use crate::oracle::Oracles;
use crate::record::Recorder;

/// Faults the harness injects at the registry's door; shared by every registry run.
#[derive(Debug, Default)]
pub struct Door {
    state: Mutex<DoorState>,
    /// Woken when every open watch stream is to be reset.
    reset: tokio::sync::Notify,
}

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
        let resp = self.inner.join(request).await?;
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
        let resp = self.inner.heartbeat(request).await?;
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
        let resp = self.inner.leave(request).await?;
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
        let stream = self.inner.watch(request).await?.into_inner();
        let opened = self.door.resets();
        let state = Some((stream, self.door.clone(), self.oracles.clone(), Vec::new()));
        let rec = self.rec.clone();
        // Each message the registry sends is recorded for the oracles (a snapshot sent in
        // fragments once all of it is seen, reassembled here by the harness's own code); a
        // reset ends the stream with an error (once), then nothing.
        let observed = futures::stream::unfold(state, move |state| {
            let rec = rec.clone();
            async move {
                let (mut stream, door, oracles, mut pieces) = state?;
                let item = {
                    let reset = door.reset.notified();
                    tokio::pin!(reset);
                    reset.as_mut().enable();
                    if door.resets() != opened {
                        None
                    } else {
                        tokio::select! {
                            biased;
                            _ = &mut reset => None,
                            item = stream.next() => Some(item?),
                        }
                    }
                };
                match item {
                    None => Some((
                        Err(Status::unavailable("connection reset (simulated)")),
                        None,
                    )),
                    Some(item) => {
                        if let Ok(msg) = &item {
                            match &msg.event {
                                Some(pb::watch_response::Event::Snapshot(s)) if s.fragment => {
                                    rec.count("registry: snapshot fragments sent");
                                    pieces.extend_from_slice(&s.packed_members);
                                }
                                Some(pb::watch_response::Event::Snapshot(s))
                                    if !pieces.is_empty() =>
                                {
                                    pieces.extend_from_slice(&s.packed_members);
                                    let mut whole = s.clone();
                                    whole.packed_members = std::mem::take(&mut pieces).into();
                                    oracles.sent(&pb::WatchResponse {
                                        event: Some(pb::watch_response::Event::Snapshot(whole)),
                                    });
                                }
                                _ if !pieces.is_empty() => {
                                    rec.violation_once(
                                    "fragments interrupted".into(),
                                    "history: the registry interrupted a fragmented snapshot with another message".into(),
                                );
                                    pieces.clear();
                                }
                                _ => oracles.sent(msg),
                            }
                        }
                        Some((item, Some((stream, door, oracles, pieces))))
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(observed)))
    }

    async fn resolve(
        &self,
        request: Request<pb::ResolveRequest>,
    ) -> Result<Response<pb::ResolveResponse>, Status> {
        self.inner.resolve(request).await
    }
}
