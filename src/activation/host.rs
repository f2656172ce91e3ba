//! [`ActivationHost`]: serves calls to the identities this node owns, activating each on first
//! use only once every other member has let go of it, and keeps its [`Activations`] in step
//! with the node's membership. The async shell around the state machine in `registry.rs`.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use super::metrics::{ActivationMetrics, ReasonLabel};
use super::registry::{Activations, Decision, Fence, Phase, Refusal, Release};
use crate::ClusterEvent;
use crate::cluster::{ClusterTopology, Member, MemberId};
use crate::provider::ClusterProviderContext;
use crate::runtime::TaskHandle;

/// The application's actors, as the host drives them.
#[async_trait]
pub trait Actors: Send + Sync + 'static {
    /// `kind/identity` becomes active here; `handed` is the state its previous owner handed
    /// over when it let go, if it kept any.
    fn activate(&self, kind: &str, identity: &str, handed: Option<Vec<u8>>);
    /// Handles one call to an active identity.
    async fn call(&self, kind: &str, identity: &str, payload: Vec<u8>) -> Vec<u8>;
    /// `kind/identity` is no longer active here. The state returned goes to the next owner
    /// when it asks this node to let go (not after a lost membership: peers do not ask).
    fn deactivate(&self, kind: &str, identity: &str, reason: Deactivation) -> Option<Vec<u8>>;
}

/// Why an identity was deactivated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deactivation {
    /// Its owner changed: it drained (or another member asked for it) and moved.
    Moved,
    /// This node lost its membership, or could not prove it held it when asked to serve: peers
    /// may take every identity over.
    MembershipLost,
    /// The node is shutting down ([`ActivationHost::shutdown`]).
    Shutdown,
}

impl Deactivation {
    fn label(self) -> &'static str {
        match self {
            Deactivation::Moved => "moved",
            Deactivation::MembershipLost => "membership_lost",
            Deactivation::Shutdown => "shutdown",
        }
    }
}

/// What a served call returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CallReply {
    /// The member incarnation that served it.
    pub served_by: MemberId,
    /// The fence the identity is active under there.
    pub held: Fence,
    /// Whether this call activated it.
    pub activated: bool,
    /// The actor's answer.
    pub payload: Vec<u8>,
}

/// A member's answer to [`Transport::release`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Whether the identity was active there until asked.
    pub was_active: bool,
    /// State the actor handed over there, if any.
    pub handed: Option<Vec<u8>>,
}

/// A refusal's kind, as it crosses the network.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RefusalCode {
    /// See [`Refusal::NotAMember`].
    NotAMember,
    /// See [`Refusal::NotOwner`].
    NotOwner,
    /// See [`Refusal::StaleFence`].
    StaleFence,
    /// See [`Refusal::Draining`].
    Draining,
    /// See [`Refusal::Full`].
    Full,
    /// See [`Refusal::Activating`].
    Activating,
    /// See [`Refusal::NotReleased`].
    NotReleased,
    /// Asked to let go of an identity its own view says it owns (see [`Release::Refused`]).
    OwnedHere,
}

impl RefusalCode {
    /// A stable name (metrics labels, logs).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::NotAMember => "not_a_member",
            RefusalCode::NotOwner => "not_owner",
            RefusalCode::StaleFence => "stale_fence",
            RefusalCode::Draining => "draining",
            RefusalCode::Full => "full",
            RefusalCode::Activating => "activating",
            RefusalCode::NotReleased => "not_released",
            RefusalCode::OwnedHere => "owned_here",
        }
    }

    /// Whether the same call may succeed soon without looking the owner up again.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            RefusalCode::Draining | RefusalCode::Activating | RefusalCode::NotReleased
        )
    }
}

impl Refusal {
    /// Its kind.
    pub fn code(&self) -> RefusalCode {
        match self {
            Refusal::NotAMember => RefusalCode::NotAMember,
            Refusal::NotOwner { .. } => RefusalCode::NotOwner,
            Refusal::StaleFence { .. } => RefusalCode::StaleFence,
            Refusal::Draining => RefusalCode::Draining,
            Refusal::Full => RefusalCode::Full,
            Refusal::Activating => RefusalCode::Activating,
            Refusal::NotReleased => RefusalCode::NotReleased,
        }
    }
}

/// Why a call or a release was not done.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The member refused it.
    #[error("refused ({}): {detail}", code.as_str())]
    Refused {
        /// The kind of refusal.
        code: RefusalCode,
        /// What the member said.
        detail: String,
    },
    /// No member hosts the kind in this node's view.
    #[error("no member hosts kind {kind:?}")]
    NoOwner {
        /// The kind.
        kind: String,
    },
    /// The member could not be reached, or did not answer in time.
    #[error("{address}: {message}")]
    Unreachable {
        /// Where the call went.
        address: String,
        /// What failed.
        message: String,
    },
    /// The request is malformed (empty kind or identity, payload too large, wrong cluster).
    #[error("invalid request: {0}")]
    Invalid(String),
}

impl CallError {
    fn refused(r: &Refusal) -> Self {
        let detail = match r {
            Refusal::NotAMember => "this node does not hold its membership".to_string(),
            Refusal::NotOwner { owner } => match owner {
                Some(o) => format!("not the owner here; this member's view names {o}"),
                None => "not the owner here; no member hosts the kind in this view".to_string(),
            },
            Refusal::StaleFence { held } => format!(
                "the call's fence is older than the one held (epoch {:x}, version {})",
                held.epoch, held.version
            ),
            Refusal::Draining => "the identity is moving to another member".to_string(),
            Refusal::Full => "this member holds as many activations as it may".to_string(),
            Refusal::Activating => "the identity is being activated".to_string(),
            Refusal::NotReleased => {
                "another member did not confirm it let go of the identity".to_string()
            }
        };
        CallError::Refused {
            code: r.code(),
            detail,
        }
    }
}

/// How members reach each other: calls to an owner, and asking a member to let go of an
/// identity. [`super::GrpcTransport`] over `shoal.partition.v1`; anything else in tests.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// Calls `kind/identity` on the member at `address`, with `fence`.
    async fn call(
        &self,
        address: &str,
        kind: &str,
        identity: &str,
        fence: &Fence,
        payload: Vec<u8>,
    ) -> Result<CallReply, CallError>;
    /// Asks `member` to let go of `kind/identity`, which this node (reached at `address`)
    /// claims under `claim`.
    async fn release(
        &self,
        member: &Member,
        kind: &str,
        identity: &str,
        claim: &Fence,
        address: &str,
    ) -> Result<Released, CallError>;
}

/// Settings of an [`ActivationHost`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ActivationConfig {
    /// How long a moved identity may finish its in-flight calls before it is deactivated.
    pub drain: Duration,
    /// How long to wait for each member's answer when asking it to let go of an identity.
    pub release_timeout: Duration,
    /// Most identities active (or being activated) at once on this node.
    pub max_activations: usize,
    /// Most handed-over states kept for members that have not asked for them yet.
    pub max_handed_states: usize,
    /// How long after its topology's epoch changed (the backend restarted without its state)
    /// this node activates nothing, when its provider does not announce a lease TTL (the TTL
    /// is used when it does): members missing from the new epoch's first views may still hold
    /// activations until their own lease runs out.
    pub epoch_quarantine: Duration,
}

impl Default for ActivationConfig {
    fn default() -> Self {
        Self {
            drain: Duration::from_secs(2),
            release_timeout: Duration::from_secs(1),
            max_activations: 100_000,
            max_handed_states: 1_024,
            epoch_quarantine: Duration::from_secs(10),
        }
    }
}

/// States handed over by deactivated actors, bounded (oldest dropped first).
#[derive(Debug, Default)]
struct HandedStates {
    by_key: BTreeMap<(String, String), Vec<u8>>,
    order: VecDeque<(String, String)>,
}

impl HandedStates {
    fn put(&mut self, key: (String, String), state: Vec<u8>, limit: usize) {
        if self.by_key.insert(key.clone(), state).is_none() {
            self.order.push_back(key);
        }
        while self.by_key.len() > limit {
            let Some(old) = self.order.pop_front() else {
                break;
            };
            self.by_key.remove(&old);
        }
    }

    fn take(&mut self, key: &(String, String)) -> Option<Vec<u8>> {
        let state = self.by_key.remove(key)?;
        self.order.retain(|k| k != key);
        Some(state)
    }
}

/// Serves this node's share of the virtual actors: see the module docs and
/// `docs/activation.md`.
pub struct ActivationHost {
    ctx: ClusterProviderContext,
    state: Mutex<Activations>,
    actors: Arc<dyn Actors>,
    transport: Arc<dyn Transport>,
    config: ActivationConfig,
    handed: Mutex<HandedStates>,
    /// Set by [`Self::shutdown`]: nothing is served again, whatever the membership says.
    stopped: std::sync::atomic::AtomicBool,
    /// The topology epoch last seen, and until when claims wait after it changed.
    epoch: Mutex<(u64, Option<crate::runtime::Instant>)>,
    /// Woken whenever identities are deactivated (release answers wait for it).
    deactivated: tokio::sync::Notify,
    metrics: ActivationMetrics,
}

impl std::fmt::Debug for ActivationHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivationHost")
            .field("member", &self.ctx.member.id)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ActivationHost {
    /// A host for the member of `ctx`. Call [`Self::start`] before its provider starts, so no
    /// membership event is missed.
    pub fn new(
        ctx: ClusterProviderContext,
        actors: Arc<dyn Actors>,
        transport: Arc<dyn Transport>,
        config: ActivationConfig,
    ) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(Activations::new(
                ctx.member.id.clone(),
                config.max_activations,
            )),
            ctx,
            actors,
            transport,
            config,
            handed: Mutex::default(),
            stopped: std::sync::atomic::AtomicBool::new(false),
            epoch: Mutex::new((0, None)),
            deactivated: tokio::sync::Notify::new(),
            metrics: ActivationMetrics::default(),
        })
    }

    /// The host's metrics (register them with [`ActivationMetrics::register`]).
    pub fn metrics(&self) -> &ActivationMetrics {
        &self.metrics
    }

    /// The identities active (or draining) here, in (kind, identity) order.
    pub fn active(&self) -> Vec<(String, String)> {
        lock(&self.state).active().map(|(k, _)| k.clone()).collect()
    }

    /// The member incarnation this host serves as now.
    pub fn member_id(&self) -> MemberId {
        lock(&self.state).me().clone()
    }

    /// Keeps the activations in step with the node's membership events: identities this node
    /// no longer owns drain for the configured time; a lost membership deactivates everything;
    /// a restored one takes the new incarnation. Runs until the node's event stream closes or
    /// the returned handle is aborted.
    pub fn start(self: &Arc<Self>) -> TaskHandle {
        let mut events = self.ctx.events.subscribe();
        let host = self.clone();
        let clock = self.ctx.clock.clone();
        self.ctx.clock.clone().spawn(
            "activation",
            Box::pin(async move {
                loop {
                    let deadline = lock(&host.state).next_deadline();
                    let wait = deadline.map(|d| d.saturating_duration_since(clock.now()));
                    let event = tokio::select! {
                        biased;
                        e = events.recv() => Some(e),
                        _ = clock.sleep(wait.unwrap_or(Duration::from_secs(3600))) => None,
                    };
                    let now = clock.now();
                    match event {
                        Some(Ok(ClusterEvent::MembershipLost { .. })) => {
                            host.let_go_of_everything(Deactivation::MembershipLost, true);
                        }
                        Some(Ok(ClusterEvent::MembershipRestored { member, .. }))
                            if !host.is_stopped() =>
                        {
                            lock(&host.state).restored(member.id);
                        }
                        Some(Ok(ClusterEvent::TopologyChanged { .. }))
                        | Some(Err(crate::SubscriptionError::Lagged { .. })) => {
                            host.standing();
                            host.quarantined(host.ctx.partition_manager.topology().epoch());
                            let gone = {
                                let pm = &host.ctx.partition_manager;
                                let mut a = lock(&host.state);
                                let every = crate::runtime::sim::flaw("drain-on-any-change");
                                a.reconcile(
                                    |kind, identity| {
                                        pm.peek_owner(kind, identity)
                                            .filter(|_| !every)
                                            .map(|m| m.id.clone())
                                    },
                                    now,
                                    host.config.drain,
                                );
                                a.tick(now)
                            };
                            host.finish(gone, Deactivation::Moved);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(crate::SubscriptionError::Closed)) => return,
                        None => {
                            let gone = lock(&host.state).tick(now);
                            host.finish(gone, Deactivation::Moved);
                        }
                    }
                }
            }),
        )
    }

    /// Tells the actors `gone` are deactivated, keeps what they hand over, wakes waiters.
    fn finish(&self, gone: Vec<(String, String)>, why: Deactivation) {
        if gone.is_empty() {
            return;
        }
        for (kind, identity) in gone {
            self.metrics
                .deactivations
                .get_or_create(&ReasonLabel {
                    reason: why.label(),
                })
                .inc();
            tracing::debug!(member = %self.ctx.member.id, kind = %kind, identity = %identity, reason = why.label(), "deactivated");
            let state = self.actors.deactivate(&kind, &identity, why);
            if let (Some(state), Deactivation::Moved | Deactivation::Shutdown) = (state, why) {
                lock(&self.handed).put((kind, identity), state, self.config.max_handed_states);
            }
        }
        self.metrics.active.set(lock(&self.state).len() as i64);
        self.deactivated.notify_waiters();
    }

    /// Deactivates everything at once; with `member_no_more`, refuses every call until the
    /// membership is restored.
    fn let_go_of_everything(&self, why: Deactivation, member_no_more: bool) {
        if crate::runtime::sim::flaw("actors-kept-on-lost") && why == Deactivation::MembershipLost {
            return;
        }
        let gone = {
            let mut a = lock(&self.state);
            if member_no_more {
                a.lost()
            } else {
                a.deactivate_all()
            }
        };
        self.finish(gone, why);
    }

    /// Stops serving: everything is deactivated (actor state is kept for the members that
    /// take the identities over and ask for it) and every later call is refused. Call it
    /// before the provider's graceful shutdown, so nothing is active once peers see this member
    /// leave.
    pub fn shutdown(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.let_go_of_everything(Deactivation::Shutdown, true);
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this node can prove it holds its membership now. If not, everything active is
    /// deactivated at once (a process waking from a pause, before its loss is announced).
    fn standing(&self) -> bool {
        if self.is_stopped() {
            return false;
        }
        if self.ctx.standing.held_at(self.ctx.clock.now()) {
            // The incarnation the provider renews now (a re-join's event may have been lost
            // to a lagging subscription).
            if let Some(id) = self.ctx.standing.member() {
                let mut a = lock(&self.state);
                if a.me() != &id || !a.is_member() {
                    a.restored(id);
                }
            }
            return true;
        }
        self.let_go_of_everything(Deactivation::MembershipLost, false);
        false
    }

    /// Whether claims must wait: the topology's epoch changed from a known one less than a
    /// TTL ago (the backend lost its state: a member missing from the new views may still
    /// hold activations until its own lease runs out, and it is not asked).
    fn quarantined(&self, epoch: u64) -> bool {
        let now = self.ctx.clock.now();
        let mut e = lock(&self.epoch);
        if e.0 != epoch {
            let wait = self
                .ctx
                .standing
                .ttl()
                .unwrap_or(self.config.epoch_quarantine);
            *e = (epoch, (e.0 != 0).then(|| now + wait));
        }
        e.1.is_some_and(|until| now < until)
    }

    fn owner(&self, kind: &str, identity: &str) -> (Arc<ClusterTopology>, Option<MemberId>) {
        let pm = &self.ctx.partition_manager;
        let t = pm.topology();
        let owner = pm.peek_owner(kind, identity).map(|m| m.id.clone());
        (t, owner)
    }

    fn refuse(&self, r: &Refusal) -> CallError {
        self.metrics
            .refusals
            .get_or_create(&ReasonLabel {
                reason: r.code().as_str(),
            })
            .inc();
        CallError::refused(r)
    }

    /// Serves a call to `kind/identity` routed here with `fence`: see the module docs.
    pub async fn call(
        &self,
        kind: &str,
        identity: &str,
        fence: &Fence,
        payload: Vec<u8>,
    ) -> Result<CallReply, CallError> {
        if !self.standing() {
            return Err(self.refuse(&Refusal::NotAMember));
        }
        let (t, owner) = self.owner(kind, identity);
        let decision = lock(&self.state).request(
            kind,
            identity,
            fence,
            owner.as_ref(),
            t.epoch(),
            t.version(),
        );
        let (held, activated) = match decision {
            Decision::Serve(held) => (held, false),
            Decision::Activated(held) => (held, true),
            Decision::Refused(r) => return Err(self.refuse(&r)),
            Decision::Claim(claim) => {
                if self.quarantined(t.epoch()) {
                    lock(&self.state).claimed(kind, identity, &claim, false, None);
                    return Err(self.refuse(&Refusal::Activating));
                }
                let round = self.ask_to_let_go(&t, kind, identity, &claim).await;
                if crate::runtime::sim::flaw("claim-not-dropped") {
                    round.clone()?;
                }
                if !self.standing() {
                    return Err(self.refuse(&Refusal::NotAMember));
                }
                let (_, owner) = self.owner(kind, identity);
                let decision = lock(&self.state).claimed(
                    kind,
                    identity,
                    &claim,
                    round.is_ok(),
                    owner.as_ref(),
                );
                match decision {
                    Decision::Activated(held) => {
                        self.metrics.activations.inc();
                        self.metrics.active.set(lock(&self.state).len() as i64);
                        tracing::debug!(member = %held.owner, kind, identity, version = held.version, "activated");
                        self.actors.activate(kind, identity, round.ok().flatten());
                        (held, true)
                    }
                    Decision::Refused(r) => {
                        if let Err(e) = &round {
                            tracing::info!(member = %claim.owner, kind, identity, error = %e, "not activated: a member did not let go");
                            self.metrics.release_rounds_failed.inc();
                        }
                        return Err(self.refuse(&r));
                    }
                    Decision::Serve(_) | Decision::Claim(_) => {
                        unreachable!("claimed() activates or refuses")
                    }
                }
            }
        };
        let answer = self.actors.call(kind, identity, payload).await;
        let gone = {
            let mut a = lock(&self.state);
            a.finished(kind, identity);
            a.tick(self.ctx.clock.now())
        };
        self.finish(gone, Deactivation::Moved);
        Ok(CallReply {
            served_by: held.owner.clone(),
            held,
            activated,
            payload: answer,
        })
    }

    /// Asks every other member of `t` to let go of `kind/identity` (concurrently, each within
    /// the release timeout). The newest handed-over state, if any member kept one.
    async fn ask_to_let_go(
        &self,
        t: &ClusterTopology,
        kind: &str,
        identity: &str,
        claim: &Fence,
    ) -> Result<Option<Vec<u8>>, CallError> {
        let clock = self.ctx.clock.clone();
        let me = &self.ctx.member.address;
        // Members this node let go of it for that its topology does not list yet (grants of
        // another epoch, with no version to compare, are kept three TTLs).
        let keep = 3 * self
            .ctx
            .standing
            .ttl()
            .unwrap_or(self.config.epoch_quarantine);
        let extra: Vec<Member> = lock(&self.state)
            .also_ask(
                kind,
                identity,
                |m| t.member(m).is_some(),
                (t.epoch(), t.version()),
                clock.now(),
                keep,
            )
            .into_iter()
            .filter(|g| &g.address != me)
            .map(|g| Member::new(g.member, g.address, [kind]))
            .collect();
        // Registered members the provider leaves out of the topology (not serving).
        let withheld: Vec<Member> = self
            .ctx
            .withheld
            .get()
            .iter()
            .filter(|m| t.member(&m.id).is_none() && !extra.iter().any(|x| x.id == m.id))
            .filter(|m| m.id != claim.owner && &m.address != me)
            .cloned()
            .collect();
        let asks = t
            .members()
            .iter()
            // A listed incarnation at this node's own address is this process's past: what
            // it held is in this host already.
            .filter(|m| m.id != claim.owner && &m.address != me)
            .map(|m| (**m).clone())
            .chain(extra)
            .chain(withheld)
            .map(|m| {
                let clock = clock.clone();
                async move {
                    match crate::runtime::timeout(
                        clock.as_ref(),
                        self.config.release_timeout,
                        self.transport.release(&m, kind, identity, claim, me),
                    )
                    .await
                    {
                        Ok(Ok(r)) => {
                            lock(&self.state).released_by(kind, identity, &m.id);
                            Ok(r)
                        }
                        Ok(Err(e)) => Err(e),
                        Err(_) => Err(CallError::Unreachable {
                            address: m.address.clone(),
                            message: format!(
                                "no answer to release within {:?}",
                                self.config.release_timeout
                            ),
                        }),
                    }
                }
            });
        let answers = futures::future::join_all(asks).await;
        let mut handed = None;
        for a in answers {
            let a = a?;
            if a.handed.is_some() {
                handed = a.handed;
            }
        }
        Ok(handed)
    }

    /// Another member claims `kind/identity` under `claim` and asks this one to let go of it:
    /// answered once nothing of it is active here (see [`Activations::release`]).
    pub async fn release(
        &self,
        kind: &str,
        identity: &str,
        claim: &Fence,
        claimant_address: &str,
    ) -> Result<Released, CallError> {
        let key = (kind.to_string(), identity.to_string());
        let now = self.ctx.clock.now();
        // Without a provable membership nothing here counts (it was all deactivated): let go
        // whatever this node's view says, but remember the claimant all the same.
        let owner = if self.standing() {
            self.owner(kind, identity).1
        } else {
            None
        };
        let answer = lock(&self.state).release(
            kind,
            identity,
            owner.as_ref(),
            now,
            self.config.drain,
            claim,
            claimant_address,
        );
        match answer {
            Release::Refused => {
                self.metrics
                    .refusals
                    .get_or_create(&ReasonLabel {
                        reason: RefusalCode::OwnedHere.as_str(),
                    })
                    .inc();
                Err(CallError::Refused {
                    code: RefusalCode::OwnedHere,
                    detail: format!(
                        "{} claims it, but this member's view names this member as its owner",
                        claim.owner
                    ),
                })
            }
            Release::Released => Ok(Released {
                was_active: false,
                handed: lock(&self.handed).take(&key),
            }),
            Release::Draining { .. } => {
                while !crate::runtime::sim::flaw("release-before-drained") {
                    let woken = self.deactivated.notified();
                    let gone = lock(&self.state).tick(self.ctx.clock.now());
                    self.finish(gone, Deactivation::Moved);
                    let phase = lock(&self.state).phase_of(kind, identity);
                    let until = match phase {
                        None => break,
                        Some(Phase::Draining { until }) => until,
                        // It came back to this member before it was let go.
                        Some(Phase::Active) => {
                            return Err(CallError::Refused {
                                code: RefusalCode::OwnedHere,
                                detail: format!(
                                    "{} claims it, but it moved back to this member",
                                    claim.owner
                                ),
                            });
                        }
                    };
                    let wait = until.saturating_duration_since(self.ctx.clock.now());
                    tokio::select! {
                        biased;
                        _ = woken => {}
                        _ = self.ctx.clock.sleep(wait) => {}
                    }
                }
                Ok(Released {
                    was_active: true,
                    handed: lock(&self.handed).take(&key),
                })
            }
        }
    }
}
