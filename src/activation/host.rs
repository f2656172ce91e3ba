//! [`ActivationHost`]: serves calls to the identities this node owns, activating each on first
//! use only once every other member has let go of it, and keeps its [`Activations`] in step
//! with the node's membership. The async shell around the state machine in `registry.rs`.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;

use std::collections::BTreeMap;

use super::handoff::{Answer, Chosen, HandOffs, Kept, choose};
use super::metrics::{ActivationMetrics, ReasonLabel};
pub use super::registry::Deactivation;
use super::registry::{Activations, Closed, Decision, Fence, Phase, Refusal, Release};
use crate::ClusterEvent;
use crate::cluster::{ClusterTopology, Member, MemberId};
use crate::provider::ClusterProviderContext;
use crate::runtime::TaskHandle;

/// The application's actors, as the host drives them.
///
/// The host orders the three: `activate` returns before any call of that activation starts,
/// and `deactivate` starts only once every call of it has ended (finished, or cancelled: its
/// future dropped at the drain deadline, at a lost membership or at shutdown). No other member
/// activates an identity that moved until this member's `deactivate` returned, so an actor may
/// load its state in `activate` and persist it in `deactivate`.
#[async_trait]
pub trait Actors: Send + Sync + 'static {
    /// `kind/identity` becomes active here; `handed` is the state its previous owner handed
    /// over when it let go, if it kept any. An error refuses the activation: the call that
    /// asked for it fails (`activation_failed`, not retried by [`super::ActivationClient`]),
    /// and a handed-over state is kept here for the next attempt.
    async fn activate(
        &self,
        kind: &str,
        identity: &str,
        handed: Option<Vec<u8>>,
    ) -> Result<(), ActorError>;
    /// Handles one call to an active identity. Its future is dropped (the call cancelled) if
    /// it is still running when the identity must go: see the trait's docs. Calls to one
    /// activation run one at a time, in the order they were admitted, unless
    /// [`Self::concurrent`] says the kind takes them concurrently.
    async fn call(&self, kind: &str, identity: &str, payload: Vec<u8>) -> Vec<u8>;
    /// Whether the actors of `kind` take several calls at once (reentrant). `false` by default:
    /// the host runs one call per activation at a time (a turn), so an actor needs no lock of
    /// its own around its state.
    fn concurrent(&self, _kind: &str) -> bool {
        false
    }
    /// `kind/identity` is no longer active here. The state returned goes to the next owner
    /// when it asks this node to let go (not after a lost membership: peers do not ask).
    async fn deactivate(&self, kind: &str, identity: &str, reason: Deactivation)
    -> Option<Vec<u8>>;
}

/// An actor refused to activate (its state could not be loaded, say).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ActorError {
    /// What the actor said.
    pub message: String,
}

impl ActorError {
    /// An error saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
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
    /// The activation's generation: one more than the highest any member asked before it
    /// reported, so it grows with every hand-off. After a holder crashed, a later generation
    /// may repeat one it used: storage should still take conditional writes (see
    /// `docs/activation.md`).
    pub generation: u64,
}

/// A member's answer to [`Transport::release`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Released {
    /// Whether the identity was active there until asked.
    pub was_active: bool,
    /// State the actor handed over there, if that member keeps it (a copy: it keeps it until
    /// the claimant settles it, [`Transport::settle`]).
    pub handed: Option<Vec<u8>>,
    /// The newest generation of it that member knows of (0: none).
    pub generation: u64,
    /// The claimant that settled the state ([`Transport::settle`]), and the generation it
    /// activates as.
    pub settled: Option<(MemberId, u64)>,
    /// The topology (epoch, version) that generation was held under last ((0, 0): unknown):
    /// orders two activations that reached one generation without hearing of each other.
    pub under: (u64, u64),
    /// Whether that member dropped the state because it lost its membership after that
    /// generation: a record older than any line begun while it was not listed.
    pub lost: bool,
    /// The incarnation whose records the answer reports, if the answer says (a process asked
    /// as an earlier incarnation answers as its current one, having forgotten the earlier
    /// one's records); `None`: the one asked.
    pub answered_as: Option<MemberId>,
}

impl Released {
    /// The incarnation this answer speaks for, given the one that was asked: the one that
    /// gave it. A process asked as an earlier incarnation has forgotten that one's records, and
    /// its "nothing kept" must not read as "that incarnation never activated it" (which would
    /// revive a copy it superseded).
    pub fn speaks_for<'a>(&'a self, asked: &'a MemberId) -> &'a MemberId {
        match &self.answered_as {
            Some(id) if !crate::runtime::sim::flaw("release-answer-as-asked") => id,
            _ => asked,
        }
    }
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
    /// The call was running when its identity had to go (the drain deadline passed, the
    /// membership was lost, the host shut down) and was cancelled: it may have run in part.
    /// Not retried by [`super::ActivationClient`].
    Cancelled,
    /// The actor's `activate` failed ([`ActorError`]). Not retried by
    /// [`super::ActivationClient`].
    ActivationFailed,
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
            RefusalCode::Cancelled => "cancelled",
            RefusalCode::ActivationFailed => "activation_failed",
        }
    }

    /// Whether [`super::ActivationClient`] tries the call again after this refusal: not
    /// when this member is full, nor when the call may have run in part or the actor refused.
    pub fn is_retried(self) -> bool {
        !matches!(
            self,
            RefusalCode::Full | RefusalCode::Cancelled | RefusalCode::ActivationFailed
        )
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
    /// Tells `member`, whose state this node's round chose, that this node (`claimant`)
    /// activates `kind/identity` with it as `generation` (see `handoff.rs`). Returns whether
    /// `member` had an older record to settle.
    async fn settle(
        &self,
        member: &Member,
        kind: &str,
        identity: &str,
        generation: u64,
        claimant: &MemberId,
    ) -> Result<bool, CallError>;
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
    /// Most identities this node remembers having let go of for a claimant its own view may
    /// not list yet (pruned at each topology change). At the bound a release request is
    /// refused (`full`), never granted unrecorded.
    pub max_grants: usize,
    /// How long an activation may go without a call before it is passivated (deactivated, its
    /// state kept here for the next activation); `None`: never.
    pub idle_after: Option<Duration>,
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
            max_handed_states: 100_000,
            max_grants: 100_000,
            idle_after: Some(Duration::from_secs(15 * 60)),
            epoch_quarantine: Duration::from_secs(10),
        }
    }
}

/// How [`ActivationHost::admit`] admitted a call.
enum Admitted {
    /// Served by the activation held here under this fence, with this serial.
    Serve(Fence, u64),
    /// To be activated here first: claimed under this fence, decided on this topology.
    Claim(Arc<ClusterTopology>, Fence),
}

/// The turn calls to one activation take one at a time.
type Turn = Arc<tokio::sync::Mutex<()>>;

/// A call admitted to an activation: accounted for when it ends, however it ends (returned,
/// cancelled by the host, or dropped by a caller that went away).
struct InFlight<'a> {
    host: Arc<ActivationHost>,
    kind: &'a str,
    identity: &'a str,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.host.call_done(self.kind, self.identity);
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
    /// What this node knows of the identities it held (see `handoff.rs`).
    handed: Mutex<HandOffs>,
    /// Set by [`Self::shutdown`]: nothing is served again, whatever the membership says.
    stopped: std::sync::atomic::AtomicBool,
    /// The topology epoch last seen, and until when claims wait after it changed.
    epoch: Mutex<(u64, Option<crate::runtime::Instant>)>,
    /// Woken whenever identities are deactivated (release answers wait for it).
    deactivated: tokio::sync::Notify,
    /// Woken whenever calls in flight are to be cancelled (each checks whether it is).
    cancels: tokio::sync::Notify,
    /// The turn of each activation whose kind takes one call at a time, by identity and the
    /// activation's serial (dropped when it is deactivated).
    turns: Mutex<BTreeMap<(String, String), (u64, Turn)>>,
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
        let me = ctx.member.id.clone();
        Arc::new(Self {
            state: Mutex::new(
                Activations::new(ctx.member.id.clone(), config.max_activations)
                    .with_grant_limit(config.max_grants),
            ),
            ctx,
            actors,
            transport,
            config,
            handed: Mutex::new(HandOffs::new(me)),
            stopped: std::sync::atomic::AtomicBool::new(false),
            epoch: Mutex::new((0, None)),
            deactivated: tokio::sync::Notify::new(),
            cancels: tokio::sync::Notify::new(),
            turns: Mutex::default(),
            metrics: ActivationMetrics::default(),
        })
    }

    /// The host's metrics (register them with [`ActivationMetrics::register`]).
    pub fn metrics(&self) -> &ActivationMetrics {
        &self.metrics
    }

    /// The identities held here (activating, active, draining or being deactivated), in
    /// (kind, identity) order.
    pub fn active(&self) -> Vec<(String, String)> {
        lock(&self.state).active().map(|(k, _)| k.clone()).collect()
    }

    /// Serves as incarnation `id` from now on: a start that failed is retried as a new
    /// incarnation before any join succeeded (nothing is held yet). A provider that renews a
    /// lease tells the host its incarnation anyway (`ctx.standing`); one that does not (the
    /// in-memory provider) only through this.
    pub fn begin_as(&self, id: MemberId) {
        lock(&self.handed).adopt(&id);
        lock(&self.state).restored(id);
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
                    let deadline = {
                        let a = lock(&host.state);
                        let idle = host.config.idle_after.and_then(|after| a.next_idle(after));
                        a.next_deadline().into_iter().chain(idle).min()
                    };
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
                            lock(&host.handed).adopt(&member.id);
                            lock(&host.state).restored(member.id);
                        }
                        Some(Ok(ClusterEvent::TopologyChanged { .. }))
                        | Some(Err(crate::SubscriptionError::Lagged { .. })) => {
                            host.standing();
                            let t = host.ctx.partition_manager.topology();
                            host.quarantined(t.epoch());
                            let cancel = {
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
                                let grants = a.prune_grants(
                                    |m| t.member(m).is_some(),
                                    (t.epoch(), t.version()),
                                    now,
                                    host.grant_keep(),
                                );
                                host.metrics.grants.set(grants as i64);
                                a.tick(now)
                            };
                            host.closing(cancel);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(crate::SubscriptionError::Closed)) => return,
                        None => {
                            let cancel = {
                                let mut a = lock(&host.state);
                                if let Some(after) = host.config.idle_after {
                                    a.passivate_idle(now, after);
                                }
                                a.tick(now)
                            };
                            host.closing(cancel);
                        }
                    }
                }
            }),
        )
    }

    /// How long a grant of another epoch is kept: three TTLs (see [`Activations::also_ask`]).
    fn grant_keep(&self) -> Duration {
        3 * self
            .ctx
            .standing
            .ttl()
            .unwrap_or(self.config.epoch_quarantine)
    }

    /// Identities were closed: wakes the calls to cancel (if `cancel`) and deactivates, in a
    /// task of its own (a caller that goes away cannot leave one half done), every closed
    /// identity with no call left.
    fn closing(self: &Arc<Self>, cancel: bool) {
        if cancel {
            self.cancels.notify_waiters();
        }
        let batch = lock(&self.state).to_deactivate();
        if batch.is_empty() {
            return;
        }
        let host = self.clone();
        drop(self.ctx.clock.spawn(
            "deactivate",
            Box::pin(async move { host.deactivate(batch).await }),
        ));
    }

    /// Runs the actors' `deactivate` for `batch`, keeps what they hand over, and only then
    /// lets each go (release answers wait for it).
    async fn deactivate(self: Arc<Self>, batch: Vec<Closed>) {
        for Closed {
            key: (kind, identity),
            why,
            generation,
            incarnation,
            under,
        } in batch
        {
            self.metrics
                .deactivations
                .get_or_create(&ReasonLabel {
                    reason: why.label(),
                })
                .inc();
            tracing::debug!(member = %self.ctx.member.id, kind = %kind, identity = %identity, reason = why.label(), "deactivated");
            let state = self.actors.deactivate(&kind, &identity, why).await;
            // A lost membership drops the state (peers take over without asking). Its
            // generation is kept while this incarnation goes on (it is asked again and must not
            // let an older copy pass for current), and forgotten with the incarnation (see
            // `HandOffs::adopt`).
            let state = state.filter(|_| why != Deactivation::MembershipLost);
            let dropped = lock(&self.handed).put(
                (kind.clone(), identity.clone()),
                Kept {
                    generation,
                    state,
                    settled: None,
                    under,
                    lost: why == Deactivation::MembershipLost,
                },
                self.config.max_handed_states,
                &incarnation,
            );
            if dropped > 0 {
                self.metrics.handed_states_dropped.inc_by(dropped as u64);
                tracing::warn!(member = %self.ctx.member.id, dropped, max_handed_states = self.config.max_handed_states, "hand-off records dropped at the bound: those identities restart from nothing if asked");
            }
            lock(&self.turns).remove(&(kind.clone(), identity.clone()));
            let len = {
                let mut a = lock(&self.state);
                a.deactivated(&kind, &identity);
                a.len()
            };
            self.metrics.active.set(len as i64);
            self.deactivated.notify_waiters();
        }
    }

    /// Closes everything at once (calls in flight are cancelled; each identity is deactivated
    /// once its calls are gone); with `member_no_more`, refuses every call until the
    /// membership is restored.
    fn let_go_of_everything(self: &Arc<Self>, why: Deactivation, member_no_more: bool) {
        if crate::runtime::sim::flaw("actors-kept-on-lost") && why == Deactivation::MembershipLost {
            return;
        }
        if why == Deactivation::MembershipLost {
            let dropped = lock(&self.handed).lost();
            if dropped > 0 {
                tracing::info!(member = %self.ctx.member.id, dropped, "membership lost: kept states dropped (peers may have moved those identities on without asking this member)");
            }
        }
        let cancel = {
            let mut a = lock(&self.state);
            if member_no_more {
                a.lost(why)
            } else {
                a.deactivate_all(why)
            }
        };
        self.closing(cancel);
    }

    /// Stops serving: everything is deactivated (calls in flight cancelled; actor state is
    /// kept for the members that take the identities over and ask for it) and every later
    /// call is refused. Returns once every actor's `deactivate` returned. Call it before the
    /// provider's graceful shutdown, so nothing is active once peers see this member leave.
    pub async fn shutdown(self: &Arc<Self>) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.let_go_of_everything(Deactivation::Shutdown, true);
        loop {
            let woken = self.deactivated.notified();
            if lock(&self.state).is_empty() {
                return;
            }
            tokio::select! {
                biased;
                _ = woken => {}
                _ = self.ctx.clock.sleep(Duration::from_millis(100)) => {}
            }
        }
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether this node can prove it holds its membership now. If not, everything active is
    /// deactivated at once (a process waking from a pause, before its loss is announced).
    fn standing(self: &Arc<Self>) -> bool {
        if self.is_stopped() {
            return false;
        }
        if self.ctx.standing.held_at(self.ctx.clock.now()) {
            // The incarnation the provider renews now (a re-join's event may have been lost
            // to a lagging subscription).
            if let Some(id) = self.ctx.standing.member() {
                let mut a = lock(&self.state);
                if a.me() != &id || !a.is_member() {
                    lock(&self.handed).adopt(&id);
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
        self.refused(CallError::refused(r))
    }

    /// Counts a refusal by its code.
    fn refused(&self, e: CallError) -> CallError {
        if let CallError::Refused { code, .. } = &e {
            self.metrics
                .refusals
                .get_or_create(&ReasonLabel {
                    reason: code.as_str(),
                })
                .inc();
        }
        e
    }

    /// Serves a call to `kind/identity` routed here with `fence`: see the module docs. Its
    /// admission is decided at once; a claim runs in a task of its own (a caller that goes away
    /// does not cut a claim or an activation short); the call then runs in the caller's task, one turn at a time unless the
    /// kind is concurrent, and is dropped if the caller goes away.
    pub async fn call(
        self: &Arc<Self>,
        kind: &str,
        identity: &str,
        fence: &Fence,
        payload: Vec<u8>,
    ) -> Result<CallReply, CallError> {
        // Admission is decided here, at once. A claim (the release round and the actor's
        // `activate`) runs in a task of its own: a caller that goes away cannot cut it short.
        // The call itself runs in the caller's task: a caller that goes away drops it (waiting
        // for its turn or running), and the guard accounts for it.
        let (held, activated, serial) = match self.admit(kind, identity, fence)? {
            Admitted::Serve(held, serial) => (held, false, serial),
            Admitted::Claim(t, claim) => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let host = self.clone();
                let (k, i) = (kind.to_string(), identity.to_string());
                drop(self.ctx.clock.spawn(
                    "claim",
                    Box::pin(async move {
                        let claimed = host.claim(&t, &k, &i, claim).await;
                        if let Err(Ok(_)) = tx.send(claimed) {
                            // The caller went away: nothing of this call will run.
                            host.call_done(&k, &i);
                        }
                    }),
                ));
                let (held, serial) = rx
                    .await
                    .unwrap_or_else(|_| Err(self.refuse(&Refusal::NotAMember)))?;
                (held, true, serial)
            }
        };
        let _in_flight = InFlight {
            host: self.clone(),
            kind,
            identity,
        };
        let answer = {
            let cancelled = self.cancelled(kind, identity, serial);
            let turn = self.turn(kind, identity, serial);
            let run = async {
                // Waiting for its turn counts as in flight: a drain waits for it, and its
                // deadline cancels it like a running call.
                let _turn = match &turn {
                    Some(t) => Some(t.lock().await),
                    None => None,
                };
                // Checked again just before the actor runs, with no await in between: a process
                // paused after admission (or while it waited for its turn) must not begin the
                // call when it wakes past its membership (`swarm` seed 217).
                if !self.standing() {
                    return None;
                }
                Some(self.actors.call(kind, identity, payload).await)
            };
            tokio::select! {
                biased;
                why = cancelled => Err(why),
                answer = run => Ok(answer),
            }
        };
        // Refused, not cancelled: the call never began.
        let answer = match answer {
            Ok(None) => return Err(self.refuse(&Refusal::NotAMember)),
            Ok(Some(payload)) => Ok(payload),
            Err(why) => Err(why),
        };
        let generation = lock(&self.state).generation_of(kind, identity, serial);
        match answer {
            Ok(payload) => Ok(CallReply {
                served_by: held.owner.clone(),
                held,
                activated,
                payload,
                generation,
            }),
            Err(why) => {
                tracing::info!(member = %held.owner, kind, identity, reason = why.label(), "call cancelled: its identity had to go");
                Err(self.refused(CallError::Refused {
                    code: RefusalCode::Cancelled,
                    detail: format!(
                        "the call was cancelled while it ran: the identity was deactivated ({})",
                        why.label()
                    ),
                }))
            }
        }
    }

    /// Admits a call to `kind/identity` with `fence`, without waiting: served by the
    /// activation held here (its fence and serial, the call in flight), or to be claimed first
    /// (under the topology it was decided on), or refused.
    fn admit(
        self: &Arc<Self>,
        kind: &str,
        identity: &str,
        fence: &Fence,
    ) -> Result<Admitted, CallError> {
        if !self.standing() {
            return Err(self.refuse(&Refusal::NotAMember));
        }
        let (t, owner) = self.owner(kind, identity);
        let mut a = lock(&self.state);
        let decision = a.request(
            kind,
            identity,
            fence,
            owner.as_ref(),
            t.epoch(),
            t.version(),
        );
        match (decision, a.serial_of(kind, identity)) {
            (Decision::Serve(held), Some(serial)) => {
                a.touch(kind, identity, self.ctx.clock.now());
                Ok(Admitted::Serve(held, serial))
            }
            (Decision::Refused(r), _) => {
                drop(a);
                Err(self.refuse(&r))
            }
            (Decision::Claim(claim), _) => Ok(Admitted::Claim(t, claim)),
            (Decision::Serve(_) | Decision::Activated(_), _) => {
                unreachable!("request() serves what is held, claims or refuses")
            }
        }
    }

    /// The turn calls of activation `serial` of `kind/identity` take one at a time, unless its
    /// kind is concurrent.
    fn turn(&self, kind: &str, identity: &str, serial: u64) -> Option<Turn> {
        if self.actors.concurrent(kind) || crate::runtime::sim::flaw("turns-ignored") {
            return None;
        }
        let mut turns = lock(&self.turns);
        let slot = turns
            .entry((kind.to_string(), identity.to_string()))
            .or_insert_with(|| (serial, Arc::default()));
        if slot.0 != serial {
            *slot = (serial, Arc::default());
        }
        Some(slot.1.clone())
    }

    /// Resolves when the calls of activation `serial` of `kind/identity` are to be dropped.
    async fn cancelled(&self, kind: &str, identity: &str, serial: u64) -> Deactivation {
        loop {
            let woken = self.cancels.notified();
            if let Some(why) = lock(&self.state).cancelled(kind, identity, serial) {
                return why;
            }
            woken.await;
        }
    }

    /// A call ended (served, failed or cancelled): what drained may be deactivated now.
    fn call_done(self: &Arc<Self>, kind: &str, identity: &str) {
        let now = self.ctx.clock.now();
        let cancel = {
            let mut a = lock(&self.state);
            a.finished(kind, identity);
            a.touch(kind, identity, now);
            a.tick(now)
        };
        self.closing(cancel);
    }

    /// Deactivates `kind/identity` here now if no call runs in it, or once its calls ended
    /// (they are not cancelled); its state is kept for the next activation, here or on the
    /// member that owns it then. Returns whether it was held here.
    pub fn passivate(self: &Arc<Self>, kind: &str, identity: &str) -> bool {
        let held = lock(&self.state).passivate(kind, identity);
        self.closing(false);
        held
    }

    /// Activates `kind/identity`, which this node owns under `claim`: every other member lets
    /// go first, then the actor's `activate` runs. Returns the fence it is held under and the
    /// activation's serial, with the activating request in flight.
    async fn claim(
        self: &Arc<Self>,
        t: &ClusterTopology,
        kind: &str,
        identity: &str,
        claim: Fence,
    ) -> Result<(Fence, u64), CallError> {
        if self.quarantined(t.epoch()) {
            lock(&self.state).claimed(kind, identity, &claim, false, None);
            return Err(self.refuse(&Refusal::Activating));
        }
        let round = self.ask_to_let_go(t, kind, identity, &claim).await;
        if crate::runtime::sim::flaw("claim-not-dropped") {
            round.clone()?;
        }
        if !self.standing() {
            return Err(self.refuse(&Refusal::NotAMember));
        }
        let (_, owner) = self.owner(kind, identity);
        let (decision, serial) = {
            let mut a = lock(&self.state);
            let d = a.claimed(kind, identity, &claim, round.is_ok(), owner.as_ref());
            (d, a.serial_of(kind, identity))
        };
        let (held, serial) = match (decision, serial) {
            (Decision::Activated(held), Some(serial)) => (held, serial),
            (Decision::Refused(r), _) => {
                if let Err(e) = &round {
                    tracing::info!(member = %claim.owner, kind, identity, error = %e, "not activated: a member did not let go");
                    self.metrics.release_rounds_failed.inc();
                }
                return Err(self.refuse(&r));
            }
            _ => unreachable!("claimed() activates or refuses"),
        };
        let Ok((chosen, settle_with)) = round else {
            unreachable!("claimed() activates only after a complete round")
        };
        let key = (kind.to_string(), identity.to_string());
        // The state leaves its keeper's custody before the actor sees it, so the keeper's copy
        // can never pass for current once this activation moved past it.
        if let Some(m) = settle_with {
            let settled = crate::runtime::timeout(
                self.ctx.clock.as_ref(),
                self.config.release_timeout,
                self.transport
                    .settle(&m, kind, identity, chosen.generation, &held.owner),
            )
            .await;
            if !matches!(settled, Ok(Ok(_))) {
                // Whether it settled or not, the keeper keeps the state: this node may take it
                // again, and another claimant too once this node answers it never activated.
                lock(&self.state).failed(kind, identity, serial);
                tracing::info!(member = %held.owner, kind, identity, keeper = %m.id, "not activated: the state's keeper did not confirm the hand-off");
                self.metrics.release_rounds_failed.inc();
                return Err(self.refuse(&Refusal::NotReleased));
            }
        }
        lock(&self.state).set_generation(kind, identity, serial, chosen.generation);
        if chosen.state.is_none() && chosen.generation > 1 {
            self.metrics.handoffs_without_state.inc();
        }
        let handed = chosen.state.is_some();
        if let Err(e) = self
            .actors
            .activate(kind, identity, chosen.state.clone())
            .await
        {
            // The keeper still has the state (settled by this node, which never reached the
            // generation: see `handoff.rs`).
            lock(&self.state).failed(kind, identity, serial);
            self.metrics.activations_failed.inc();
            tracing::warn!(member = %held.owner, kind, identity, error = %e, "the actor refused to activate");
            return Err(self.refused(CallError::Refused {
                code: RefusalCode::ActivationFailed,
                detail: format!("the actor refused to activate: {e}"),
            }));
        }
        // This activation supersedes what this node kept of an earlier one.
        lock(&self.handed).remove(&key);
        self.metrics.activations.inc();
        self.metrics.active.set(lock(&self.state).len() as i64);
        tracing::debug!(member = %held.owner, kind, identity, version = held.version, generation = chosen.generation, handed, "activated");
        if !lock(&self.state).ready(kind, identity, serial) {
            // Closed while the actor activated (a lost membership, a shutdown): it is
            // deactivated now, and this request does not run.
            self.call_done(kind, identity);
            return Err(self.refuse(&Refusal::NotAMember));
        }
        Ok((held, serial))
    }

    /// Asks every other member of `t` to let go of `kind/identity` (concurrently, each within
    /// the release timeout). The newest handed-over state, if any member kept one.
    async fn ask_to_let_go(
        &self,
        t: &ClusterTopology,
        kind: &str,
        identity: &str,
        claim: &Fence,
    ) -> Result<(Chosen, Option<Member>), CallError> {
        let clock = self.ctx.clock.clone();
        let me = &self.ctx.member.address;
        // Members this node let go of it for that its topology does not list yet (grants of
        // another epoch, with no version to compare, are kept three TTLs).
        let keep = self.grant_keep();
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
                            Ok((m, r))
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
        // Nothing is taken from a member that answered: a failed round loses no state.
        let answers = futures::future::join_all(asks)
            .await
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let mine = lock(&self.handed)
            .get(&(kind.to_string(), identity.to_string()))
            .cloned();
        let read: Vec<Answer<'_>> = answers
            .iter()
            .map(|(m, r)| Answer {
                member: r.speaks_for(&m.id),
                generation: r.generation,
                state: r.handed.as_deref(),
                settled: r.settled.as_ref().map(|(by, g)| (by, *g)),
                under: r.under,
                lost: r.lost,
            })
            .chain(mine.iter().map(|k| Answer {
                member: &claim.owner,
                generation: k.generation,
                state: k.state.as_deref(),
                settled: k.settled.as_ref().map(|(by, g)| (by, *g)),
                under: k.under,
                lost: k.lost,
            }))
            .collect();
        let chosen = choose(&claim.owner, &read);
        let settle_with = chosen
            .from
            .as_ref()
            .and_then(|from| answers.iter().find(|(m, r)| r.speaks_for(&m.id) == from))
            .map(|(m, _)| m.clone());
        Ok((chosen, settle_with))
    }

    /// Another member claims `kind/identity` under `claim` and asks this one to let go of it:
    /// answered once nothing of it is held here, its actor's `deactivate` returned included
    /// (see [`Activations::release`]).
    pub async fn release(
        self: &Arc<Self>,
        kind: &str,
        identity: &str,
        claim: &Fence,
        claimant_address: &str,
    ) -> Result<Released, CallError> {
        let key = (kind.to_string(), identity.to_string());
        let now = self.ctx.clock.now();
        // Without a provable membership nothing here counts (it was all closed): let go
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
            Release::Refused => Err(self.refused(CallError::Refused {
                code: RefusalCode::OwnedHere,
                detail: format!(
                    "{} claims it, but this member's view names this member as its owner",
                    claim.owner
                ),
            })),
            Release::Full => {
                self.metrics.grants_full.inc();
                tracing::warn!(member = %self.ctx.member.id, claimant = %claim.owner, kind, identity, max_grants = self.config.max_grants, "release refused: as many grants remembered as max_grants allows");
                Err(self.refused(CallError::Refused {
                    code: RefusalCode::Full,
                    detail: format!(
                        "this member remembers {} released identities (max_grants) and cannot record another until its view catches up",
                        self.config.max_grants
                    ),
                }))
            }
            Release::Released => Ok(self.hand_over(&key, &claim.owner, false)),
            Release::Draining { .. } => {
                while !crate::runtime::sim::flaw("release-before-drained") {
                    let woken = self.deactivated.notified();
                    let cancel = lock(&self.state).tick(self.ctx.clock.now());
                    self.closing(cancel);
                    let phase = lock(&self.state).phase_of(kind, identity);
                    let wait = match phase {
                        None => break,
                        Some(Phase::Draining { until }) => {
                            until.saturating_duration_since(self.ctx.clock.now())
                        }
                        // Its calls are being cancelled, or its actor deactivates: woken when
                        // it is gone.
                        Some(Phase::Closing { .. } | Phase::Deactivating) => {
                            Duration::from_millis(100)
                        }
                        // It came back to this member before it was let go.
                        Some(Phase::Active | Phase::Activating) => {
                            return Err(CallError::Refused {
                                code: RefusalCode::OwnedHere,
                                detail: format!(
                                    "{} claims it, but it moved back to this member",
                                    claim.owner
                                ),
                            });
                        }
                    };
                    tokio::select! {
                        biased;
                        _ = woken => {}
                        _ = self.ctx.clock.sleep(wait) => {}
                    }
                }
                Ok(self.hand_over(&key, &claim.owner, true))
            }
        }
    }

    /// The answer to claimant `to`: a copy of what this node kept of `key` (it keeps it: see
    /// `handoff.rs`).
    fn hand_over(&self, key: &(String, String), to: &MemberId, was_active: bool) -> Released {
        let (kept, answered_as) = {
            let handed = lock(&self.handed);
            (
                handed.get(key).cloned().unwrap_or_default(),
                handed.incarnation().clone(),
            )
        };
        tracing::debug!(member = %answered_as, claimant = %to, kind = %key.0, identity = %key.1, generation = kept.generation, state = kept.state.is_some(), "let go");
        Released {
            answered_as: Some(answered_as),
            was_active,
            handed: kept.state,
            generation: kept.generation,
            settled: kept.settled,
            under: kept.under,
            lost: kept.lost,
        }
    }

    /// `claimant` activates `kind/identity` as `generation` with the state this node keeps
    /// (see `handoff.rs`). Whether there was a record to settle.
    pub fn settle(&self, kind: &str, identity: &str, generation: u64, claimant: &MemberId) -> bool {
        let settled = lock(&self.handed).settle(
            &(kind.to_string(), identity.to_string()),
            generation,
            claimant,
        );
        tracing::debug!(member = %self.ctx.member.id, kind, identity, generation, settled, "settled");
        settled
    }
}
