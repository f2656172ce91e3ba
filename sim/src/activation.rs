//! The activation workload and its checkers: every node keeps calling a rotating set of
//! virtual-actor identities through [`ActivationClient`]; members host them
//! ([`ActivationHost`], served over the simulated network by the real gRPC service). The
//! harness's own actors tell the [`ActivationOracle`] each activation, call and deactivation as
//! it happens, and it judges:
//!
//! * **single activation**, over intervals: a node holds an identity from the moment its actor's
//!   `activate` begins until its `deactivate` returned *and* the last call that began in it
//!   ended (finished or cancelled); when a node activates an identity or a call to it begins,
//!   no other live node may hold it, and no call may run in an activation being deactivated
//!   (a paused node is judged from the moment it acts again; nodes whose clock drifts beyond
//!   the bound providers assume are not judged);
//! * **one call at a time**, continuously: a call to an identity begins on a node only once
//!   the previous call of the same activation ended (the harness's kind is not concurrent);
//! * **state continuity**, continuously: each identity's counter (its actor state) goes up by
//!   one per call; an activation starts from the newest state (handed over) or from nothing
//!   only after a loss the harness knows of (a crash, a lost membership, a shutdown: those
//!   states are documented not to move); a handed state older than the newest is a rollback;
//! * **minimal movement**, continuously: an identity is deactivated because it moved only if
//!   the node's own topology gives it to another member at that moment;
//! * **availability** and **no stale routing**, after the final heal ([`check_final`]): every
//!   node calls every identity; each call succeeds, and its first attempt goes to the owner
//!   rendezvous names over the node's converged topology.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use madsim::time::{Instant, sleep};
use shoal::activation::{
    ActivationClient, ActivationConfig, ActivationHost, ActorError, Actors, CallError, CallReply,
    Deactivation, Fence, GrpcTransport, Released, Transport,
};
use shoal::placement::PlacementRule;
use shoal::{ClusterProviderContext, Member, MemberId};

use crate::cluster::{KIND, SimCluster};
use crate::record::Recorder;
use crate::workload::naive_owner_by;

/// Clusters up to this many members take the harness's calls one at a time per activation (the
/// library's default). Larger ones (the scale scenarios, which measure the control plane) take
/// them concurrently: every node calls the same 24 identities, so at 200 members one identity
/// gets about 25 calls a second, more than one turn at a time of calls up to 150 ms can serve.
pub const TURNS_UP_TO: usize = 20;

/// Identities the activation workload calls.
pub const IDENTITIES: usize = 24;
/// Their names' prefix.
pub const PREFIX: &str = "act-";
/// Calls per round.
const PER_ROUND: usize = 3;
/// Time between rounds (node clock).
const PERIOD: Duration = Duration::from_secs(1);
/// The port every member serves its partition service (and actors) on.
pub const PORT: u16 = 4000;

/// The identities, named once (immutable, so sharing them across simulated nodes is safe).
pub fn identities() -> &'static [String] {
    static IDS: std::sync::LazyLock<Vec<String>> =
        std::sync::LazyLock::new(|| (0..IDENTITIES).map(|i| format!("{PREFIX}{i}")).collect());
    &IDS
}

/// The activation settings simulations use: the library's defaults, but an identity no call
/// used for 5 s is passivated (so passivation, and the state it keeps, meet every fault).
pub fn config() -> ActivationConfig {
    ActivationConfig {
        idle_after: Some(Duration::from_secs(5)),
        ..ActivationConfig::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Debug)]
struct Held {
    incarnation: MemberId,
    since: Instant,
    /// Calls begun in this activation that have not ended (finished or dropped).
    calls: u32,
    /// When its `deactivate` ran, if it did: held until `calls` is zero.
    deactivated: Option<Instant>,
}

/// What the harness knows of one identity's actor state.
#[derive(Debug, Default)]
struct Lineage {
    /// The newest counter value any activation of it reached.
    newest: u64,
    /// Whether that state was dropped in a way the docs allow (crash, lost membership,
    /// shutdown): a restart from nothing is then expected.
    lost: bool,
    /// The node (and incarnation) that holds the newest state: the one it is active on, or
    /// the one that kept it when its actor was deactivated for a move. A claimant whose view
    /// no longer lists it does not ask it (documented: its state does not move).
    keeper: Option<(String, MemberId)>,
    /// Whether the newest state is parked with its keeper (deactivated for a move, not yet
    /// activated again).
    parked: bool,
    /// Whether, while it was parked, a node crashed, lost its membership or came back as a new
    /// incarnation: that
    /// node may have settled the state and crashed before activating it, which the protocol
    /// cannot tell from one that activated and crashed (documented: the state restarts).
    /// Also set when a node that keeps a record of it lost its membership or came back from a
    /// loss: its states are dropped then, and its generation may outrank a line peers began
    /// without it (documented: the state restarts, never rolls back).
    disturbed: bool,
    /// The nodes that keep a record of it (deactivated it in their current incarnation and
    /// have not activated it since).
    recorders: BTreeSet<String>,
}

#[derive(Debug, Default)]
struct State {
    /// Identity -> node -> its activation there.
    holders: BTreeMap<String, BTreeMap<String, Held>>,
    /// Identity -> its state's history.
    lineage: BTreeMap<String, Lineage>,
    paused: BTreeSet<String>,
    /// When each node last woke from a pause.
    resumed: BTreeMap<String, Instant>,
    wild: BTreeSet<String>,
}

/// What the harness's actors saw, judged as it happens (see the module docs).
#[derive(Debug)]
pub struct ActivationOracle {
    rec: Recorder,
    /// Whether the harness's actors take calls concurrently (see [`TURNS_UP_TO`]).
    concurrent: bool,
    state: Mutex<State>,
}

impl ActivationOracle {
    /// An oracle writing to `rec`; `concurrent`: the harness's actors take calls concurrently.
    pub fn new(rec: Recorder, concurrent: bool) -> Arc<Self> {
        Arc::new(Self {
            rec,
            concurrent,
            state: Mutex::default(),
        })
    }

    /// `node` is paused (its process holds what it held, and does nothing) or resumed.
    pub fn set_paused(&self, node: &str, paused: bool) {
        let mut s = lock(&self.state);
        if paused {
            s.paused.insert(node.to_string());
        } else {
            s.paused.remove(node);
            s.resumed.insert(node.to_string(), Instant::now());
        }
    }

    /// `node`'s clock drifts beyond the bound providers assume: its activations are not judged.
    pub fn set_wild(&self, node: &str) {
        lock(&self.state).wild.insert(node.to_string());
    }

    /// `node` announced it lost its membership: a claimant there may have settled a parked
    /// state and not activated it (see [`Lineage::disturbed`]).
    pub fn membership_lost(&self, node: &str) {
        let mut s = lock(&self.state);
        for l in s.lineage.values_mut() {
            l.disturbed |= l.parked || l.recorders.contains(node);
        }
    }

    /// `node` is a member again as incarnation `id`: if that is a new incarnation, what the
    /// old one kept is gone (documented: peers that removed it took over without asking it).
    pub fn restored(&self, node: &str, id: &MemberId, previous: &MemberId) {
        let mut s = lock(&self.state);
        if id == previous {
            for l in s.lineage.values_mut() {
                l.disturbed |= l.recorders.contains(node);
            }
            return;
        }
        for l in s.lineage.values_mut() {
            l.recorders.remove(node);
            match &l.keeper {
                Some((n, k)) if n == node && k != id => l.lost = true,
                Some((n, k)) if n == node && k == id => {}
                _ => l.disturbed |= l.parked,
            }
        }
    }

    /// `node`'s process died: its actors died with it.
    pub fn crashed(&self, node: &str) {
        let mut s = lock(&self.state);
        s.paused.remove(node);
        let mut dropped = Vec::new();
        for (identity, holders) in s.holders.iter_mut() {
            if holders.remove(node).is_some() {
                dropped.push(identity.clone());
            }
        }
        for identity in dropped {
            s.lineage.entry(identity).or_default().lost = true;
        }
        for l in s.lineage.values_mut() {
            if l.keeper.as_ref().is_some_and(|(n, _)| n == node) {
                l.lost = true;
            }
            l.recorders.remove(node);
            l.disturbed |= l.parked;
        }
    }

    /// Judges single activation for `node` acting on `identity` now.
    fn judge(&self, s: &State, node: &str, identity: &str, what: &str) {
        let Some(holders) = s.holders.get(identity) else {
            return;
        };
        for (other, held) in holders {
            if other == node || s.paused.contains(other.as_str()) {
                continue;
            }
            if s.wild.contains(node) || s.wild.contains(other.as_str()) {
                self.rec
                    .count("activation: overlap not judged (clock beyond the drift bound)");
                continue;
            }
            self.rec.violation_once(
                format!("single {identity} {node} {other}"),
                match held.deactivated {
                    None => format!(
                        "single activation: {node} {what} {KIND}/{identity} while {other} (as {}) has held it active since {} ms",
                        held.incarnation,
                        self.rec.ms_of(held.since)
                    ),
                    Some(at) => format!(
                        "single activation: {node} {what} {KIND}/{identity} while {other} (as {}) still runs {} call(s) in it (held since {} ms, deactivated at {} ms)",
                        held.incarnation,
                        held.calls,
                        self.rec.ms_of(held.since),
                        self.rec.ms_of(at)
                    ),
                },
            );
        }
    }

    fn activated(
        &self,
        node: &str,
        incarnation: MemberId,
        identity: &str,
        handed: Option<u64>,
        listed: impl Fn(&MemberId) -> bool,
    ) {
        let mut s = lock(&self.state);
        self.judge(&s, node, identity, "activated");
        let wild = s.wild.contains(node);
        let l = s.lineage.entry(identity.to_string()).or_default();
        let broken = match handed {
            Some(v) if v != l.newest => Some(format!(
                "{node} activated {KIND}/{identity} with a handed-over state of {v} calls, the newest had {} ({})",
                l.newest,
                if v < l.newest {
                    "rolled back"
                } else {
                    "a state nobody reached"
                }
            )),
            None if l
                .keeper
                .as_ref()
                .is_some_and(|(_, id)| !listed(id) && id != &incarnation) =>
            {
                self.rec
                    .count("activation: state not moved (its keeper left the claimant's view)");
                None
            }
            None if l.disturbed && !l.lost => {
                self.rec.count(
                    "activation: state not moved (a node crashed or re-joined while it was parked)",
                );
                None
            }
            None if l.newest > 0 && !l.lost => Some(format!(
                "{node} activated {KIND}/{identity} from nothing, but its newest state ({} calls) was lost with no crash, lost membership or shutdown",
                l.newest
            )),
            _ => None,
        };
        l.newest = handed.unwrap_or(0);
        l.lost = false;
        l.parked = false;
        l.disturbed = false;
        l.recorders.remove(node);
        l.keeper = Some((node.to_string(), incarnation.clone()));
        if let Some(what) = broken {
            if wild {
                self.rec.count(
                    "activation: state continuity not judged (clock beyond the drift bound)",
                );
            } else {
                self.rec.violation_once(
                    format!("continuity {identity} {node}"),
                    format!("state continuity: {what}"),
                );
            }
        }
        s.holders.entry(identity.to_string()).or_default().insert(
            node.to_string(),
            Held {
                incarnation,
                since: Instant::now(),
                calls: 0,
                deactivated: None,
            },
        );
        self.rec.count("activation: activations");
    }

    /// A call to `identity` begins on `node`.
    fn served(&self, node: &str, identity: &str) {
        let mut s = lock(&self.state);
        let holding = s
            .holders
            .get(identity)
            .and_then(|h| h.get(node))
            .is_some_and(|h| h.deactivated.is_none());
        if !holding {
            self.rec.violation_once(
                format!("unheld {identity} {node}"),
                format!(
                    "single activation: {node} served {KIND}/{identity} without holding it active"
                ),
            );
        }
        self.judge(&s, node, identity, "served a call to");
        if let Some(h) = s.holders.get_mut(identity).and_then(|h| h.get_mut(node)) {
            if h.calls > 0 && !self.concurrent {
                self.rec.violation_once(
                    format!("turns {identity} {node}"),
                    format!(
                        "one call at a time: a call to {KIND}/{identity} began on {node} while {} other(s) ran in the same activation",
                        h.calls
                    ),
                );
            }
            h.calls += 1;
        }
    }

    /// A call on `node` that began at `began` moved `identity`'s counter from `old` to
    /// `old + 1`.
    fn stepped(&self, node: &str, identity: &str, old: u64, began: Instant) {
        let mut s = lock(&self.state);
        let across_pause = s.resumed.get(node).is_some_and(|&at| at > began);
        let wild = s.wild.contains(node);
        let l = s.lineage.entry(identity.to_string()).or_default();
        if across_pause {
            // Documented limit: a call running inside an actor when its process paused goes
            // on when it wakes, possibly after peers took the identity over. Not judged; the
            // state moves on only if this node still holds the newest.
            self.rec
                .count("activation: state continuity not judged (call ran across a pause)");
            if l.keeper.as_ref().is_some_and(|(n, _)| n == node) && old == l.newest {
                l.newest = old + 1;
            }
            return;
        }
        if old != l.newest && !wild {
            self.rec.violation_once(
                format!("continuity step {identity} {node}"),
                format!(
                    "state continuity: a call on {node} moved {KIND}/{identity} on from {old} calls, the newest state had {}",
                    l.newest
                ),
            );
        }
        l.newest = old + 1;
    }

    /// A call to `identity` on `node` ended: it returned, or its future was dropped.
    fn call_ended(&self, node: &str, identity: &str) {
        let mut s = lock(&self.state);
        let Some(holders) = s.holders.get_mut(identity) else {
            return;
        };
        if let Some(h) = holders.get_mut(node) {
            h.calls = h.calls.saturating_sub(1);
            if h.calls == 0 && h.deactivated.is_some() {
                holders.remove(node);
            }
        }
    }

    fn deactivated(&self, node: &str, identity: &str, why: Deactivation, still_owner: bool) {
        let mut s = lock(&self.state);
        if let Some(holders) = s.holders.get_mut(identity)
            && let Some(h) = holders.get_mut(node)
        {
            if h.calls > 0 {
                self.rec.violation_once(
                    format!("deactivated running {identity} {node}"),
                    format!(
                        "single activation: {node} deactivated {KIND}/{identity} while {} call(s) still ran in it",
                        h.calls
                    ),
                );
                h.deactivated = Some(Instant::now());
            } else {
                holders.remove(node);
            }
        }
        s.lineage
            .entry(identity.to_string())
            .or_default()
            .recorders
            .insert(node.to_string());
        match why {
            Deactivation::Moved => {
                s.lineage.entry(identity.to_string()).or_default().parked = true;
                self.rec.count("activation: deactivated (moved)");
                if still_owner {
                    self.rec.violation_once(
                        format!("movement {identity} {node}"),
                        format!(
                            "minimal movement: {node} deactivated {KIND}/{identity} as moved while its own topology still names it as the owner"
                        ),
                    );
                }
            }
            Deactivation::MembershipLost => {
                // The node's host drops every state it keeps (also when it finds its standing
                // gone before its provider announces the loss).
                for l in s.lineage.values_mut() {
                    l.disturbed |= l.recorders.contains(node);
                }
                s.lineage.entry(identity.to_string()).or_default().lost = true;
                self.rec.count("activation: deactivated (membership lost)")
            }
            Deactivation::Shutdown => {
                s.lineage.entry(identity.to_string()).or_default().lost = true;
                self.rec.count("activation: deactivated (shutdown)")
            }
            Deactivation::Passivated => {
                s.lineage.entry(identity.to_string()).or_default().parked = true;
                self.rec.count("activation: deactivated (passivated)")
            }
        }
    }
}

/// One call in this many works longer than the drain.
const LONG_CALL_ONE_IN: u64 = 40;

/// Tells the oracle a call ended when dropped: it returned, or the host cancelled it.
struct CallEnds<'a> {
    oracle: &'a ActivationOracle,
    node: &'a str,
    identity: &'a str,
}

impl Drop for CallEnds<'_> {
    fn drop(&mut self) {
        self.oracle.call_ended(self.node, self.identity);
    }
}

/// The harness's actor: a counter per identity, handed over when it moves.
pub struct SimActors {
    node: String,
    ctx: ClusterProviderContext,
    rule: PlacementRule,
    oracle: Arc<ActivationOracle>,
    rec: Recorder,
    host: Mutex<Option<std::sync::Weak<ActivationHost>>>,
    counters: Mutex<BTreeMap<String, u64>>,
}

impl SimActors {
    /// Actors of `node`.
    pub fn new(
        node: String,
        ctx: ClusterProviderContext,
        rule: PlacementRule,
        oracle: Arc<ActivationOracle>,
        rec: Recorder,
    ) -> Arc<Self> {
        Arc::new(Self {
            node,
            ctx,
            rule,
            oracle,
            rec,
            host: Mutex::default(),
            counters: Mutex::default(),
        })
    }

    /// The host driving these actors (for its current incarnation id).
    pub fn attach(&self, host: &Arc<ActivationHost>) {
        *lock(&self.host) = Some(Arc::downgrade(host));
    }

    fn me(&self) -> MemberId {
        lock(&self.host)
            .as_ref()
            .and_then(|h| h.upgrade())
            .map(|h| h.member_id())
            .unwrap_or_else(|| self.ctx.member.id.clone())
    }
}

#[async_trait]
impl Actors for SimActors {
    async fn activate(
        &self,
        _kind: &str,
        identity: &str,
        handed: Option<Vec<u8>>,
    ) -> Result<(), ActorError> {
        let handed = match handed {
            Some(b) if b.len() == 8 => {
                self.rec.count("activation: state handed over");
                Some(u64::from_le_bytes(b.try_into().expect("8 bytes")))
            }
            _ => None,
        };
        lock(&self.counters).insert(identity.to_string(), handed.unwrap_or(0));
        let t = self.ctx.partition_manager.topology();
        self.oracle
            .activated(&self.node, self.me(), identity, handed, |m| {
                t.member(m).is_some()
            });
        Ok(())
    }

    fn concurrent(&self, _kind: &str) -> bool {
        self.oracle.concurrent
    }

    async fn call(&self, _kind: &str, identity: &str, payload: Vec<u8>) -> Vec<u8> {
        self.oracle.served(&self.node, identity);
        let began = Instant::now();
        let _ended = CallEnds {
            oracle: &self.oracle,
            node: &self.node,
            identity,
        };
        // Work takes a while, so moves meet calls in flight; one call in LONG_CALL_ONE_IN
        // outlasts the drain, so some moves meet a call the drain deadline must cancel.
        let r = madsim::rand::random::<u64>();
        let work = if (r / 150).is_multiple_of(LONG_CALL_ONE_IN) {
            config().drain + Duration::from_millis(500)
        } else {
            Duration::from_millis(r % 150)
        };
        sleep(work).await;
        let mut c = lock(&self.counters);
        let n = c.entry(identity.to_string()).or_default();
        self.oracle.stepped(&self.node, identity, *n, began);
        *n += 1;
        let mut out = n.to_le_bytes().to_vec();
        out.extend_from_slice(&payload);
        out
    }

    async fn deactivate(&self, _kind: &str, identity: &str, why: Deactivation) -> Option<Vec<u8>> {
        let me = self.me();
        let t = self.ctx.partition_manager.topology();
        let still_owner = naive_owner_by(self.rule, &t, KIND, identity).as_ref() == Some(&me);
        self.oracle
            .deactivated(&self.node, identity, why, still_owner);
        lock(&self.counters)
            .remove(identity)
            .map(|n| n.to_le_bytes().to_vec())
    }
}

/// The gRPC transport nodes reach each other's actors with, metered: every member-to-member
/// message the activation layer sends is counted (what activation costs, next to what the
/// control plane serves).
pub fn transport(ctx: &ClusterProviderContext, rec: &Recorder) -> Arc<MeteredTransport> {
    Arc::new(MeteredTransport {
        // Longer than the longest call the harness's actors make (2.5 s) plus a turn's wait:
        // a transport that gives up on calls still running only piles retries onto the queue.
        inner: GrpcTransport::new(
            ctx.cluster_name.clone(),
            ctx.clock.clone(),
            Duration::from_secs(5),
        ),
        rec: rec.clone(),
    })
}

/// [`GrpcTransport`] with each message counted in the run's rare paths (`activation: sent
/// calls`, `... release requests`, `... settle requests`).
pub struct MeteredTransport {
    inner: GrpcTransport,
    rec: Recorder,
}

#[async_trait]
impl Transport for MeteredTransport {
    async fn call(
        &self,
        address: &str,
        kind: &str,
        identity: &str,
        fence: &Fence,
        payload: Vec<u8>,
    ) -> Result<CallReply, CallError> {
        self.rec.count("activation: sent calls");
        self.inner
            .call(address, kind, identity, fence, payload)
            .await
    }

    async fn release(
        &self,
        member: &Member,
        kind: &str,
        identity: &str,
        claim: &Fence,
        address: &str,
    ) -> Result<Released, CallError> {
        self.rec.count("activation: sent release requests");
        let released = self
            .inner
            .release(member, kind, identity, claim, address)
            .await;
        if let Err(e) = &released {
            // A release round fails on any one of these: at scale they decide how many
            // rounds an activation costs.
            self.rec
                .count(&format!("activation: release not granted ({})", kind_of(e)));
        }
        released
    }

    async fn settle(
        &self,
        member: &Member,
        kind: &str,
        identity: &str,
        generation: u64,
        claimant: &MemberId,
    ) -> Result<bool, CallError> {
        self.rec.count("activation: sent settle requests");
        self.inner
            .settle(member, kind, identity, generation, claimant)
            .await
    }
}

/// One node's workload: calls [`PER_ROUND`] identities every [`PERIOD`], forever.
pub async fn workload(client: Arc<ActivationClient>, rec: Recorder) {
    let mut cursor = madsim::rand::random::<u64>() as usize % IDENTITIES;
    loop {
        sleep(PERIOD).await;
        for _ in 0..PER_ROUND {
            let id = &identities()[cursor];
            cursor = (cursor + 1) % IDENTITIES;
            let called = client.call(KIND, id, Vec::new()).await;
            match &called.result {
                Ok(r) if r.activated => rec.count("activation: calls that activated"),
                Ok(_) => rec.count("activation: calls served"),
                Err(e) => rec.count(&format!("activation: calls failed ({})", kind_of(e))),
            }
            if called.attempts.len() > 1 {
                rec.count("activation: calls retried");
            }
        }
    }
}

fn kind_of(e: &shoal::activation::CallError) -> &'static str {
    use shoal::activation::CallError;
    match e {
        CallError::Refused { code, .. } => code.as_str(),
        CallError::NoOwner { .. } => "no owner",
        CallError::Unreachable { .. } => "unreachable",
        CallError::Invalid(_) => "invalid",
    }
}

/// How long after convergence every identity must be callable: a drain, a release round, the
/// quarantine after an epoch change (at least every simulated provider's TTL), and the
/// client's retries.
pub fn availability_bound() -> Duration {
    let c = config();
    c.drain + c.release_timeout * 2 + c.epoch_quarantine + Duration::from_secs(5)
}

/// After convergence: every live node calls every identity; each call must succeed within
/// [`availability_bound`] (availability), its first attempt must go to the owner rendezvous
/// names over the node's topology, and it must be served by that owner's current incarnation
/// (no stale routing). The calls run on the nodes.
pub async fn check_final(cluster: &Arc<SimCluster>) {
    let rule = cluster.placement_rule();
    let deadline = Instant::now() + availability_bound();
    // Every node probes at once (each its identities one after the other), so the check takes
    // the same simulated time at any size.
    let probes = cluster.live_views().into_iter().map(|(name, _, _)| {
        let (c, node) = (cluster.clone(), name.clone());
        let probe = async move {
            let mut owners = Owners::default();
            for i in 0..identities().len() {
                probe(&c, &node, rule, i, &mut owners, deadline).await;
            }
        };
        async move { cluster.on_node(&name, probe).await }
    });
    for done in futures::future::join_all(probes).await {
        if done.is_none() {
            cluster
                .recorder()
                .count("activation: final calls not run (node gone)");
        }
    }
}

/// The node's current incarnation with its activation client, waiting (until `deadline`) for
/// a process that is (re)starting; `None` if the node is down.
async fn current_client(
    cluster: &SimCluster,
    name: &str,
    deadline: Instant,
) -> Option<(crate::cluster::Incarnation, Arc<ActivationClient>)> {
    loop {
        let inc = cluster.live_incarnation(name)?;
        if let Some(client) = inc.activation.clone() {
            return Some((inc, client));
        }
        if Instant::now() >= deadline {
            return None;
        }
        sleep(Duration::from_millis(200)).await;
    }
}

/// The owner of each activation identity, by index.
type OwnerList = Arc<Vec<Option<MemberId>>>;

/// Rendezvous owners of the activation identities over one topology, remembered for the last
/// topology a node probed with (computed once per view, not once per call).
#[derive(Default)]
struct Owners {
    held: Option<(Arc<shoal::ClusterTopology>, OwnerList)>,
}

impl Owners {
    fn of(
        &mut self,
        rule: PlacementRule,
        t: &Arc<shoal::ClusterTopology>,
        i: usize,
    ) -> Option<MemberId> {
        match &self.held {
            Some((held, owners)) if Arc::ptr_eq(held, t) => owners[i].clone(),
            _ => {
                let owners: OwnerList = Arc::new(
                    identities()
                        .iter()
                        .map(|id| naive_owner_by(rule, t, KIND, id))
                        .collect(),
                );
                let owner = owners[i].clone();
                self.held = Some((t.clone(), owners));
                owner
            }
        }
    }
}

async fn probe(
    cluster: &SimCluster,
    name: &str,
    rule: PlacementRule,
    i: usize,
    owners: &mut Owners,
    deadline: Instant,
) {
    let id = &identities()[i];
    let rec = cluster.recorder();
    loop {
        // The process running now (a leave that began before the heal may end after it, and
        // the node restarts as a new process).
        let Some((inc, client)) = current_client(cluster, name, deadline).await else {
            rec.count("activation: final calls not run (node gone)");
            return;
        };
        let t = inc.manager.topology();
        let want = owners.of(rule, &t, i);
        let called = client.call(KIND, id, Vec::new()).await;
        let after = inc.manager.topology();
        if let Some(first) = called.attempts.first() {
            let f = &first.to.fence;
            // Judged against the topology the lookup used.
            if (f.epoch, f.version) == (t.epoch(), t.version()) && Some(&f.owner) != want.as_ref() {
                rec.violation_once(
                    format!("stale route {name} {id}"),
                    format!(
                        "no stale routing: after convergence {name} (v{}) routed {KIND}/{id} to {}, rendezvous over its topology says {want:?}",
                        t.version(),
                        f.owner
                    ),
                );
            }
        }
        match called.result {
            Ok(r) => {
                let fine = Some(&r.served_by) == want.as_ref()
                    || Some(&r.served_by) == owners.of(rule, &after, i).as_ref()
                    // The caller's view lags the owner's re-join as a new incarnation.
                    || want
                        .as_ref()
                        .and_then(|w| cluster.process_of(w))
                        .map(|inc| inc.id)
                        .as_ref()
                        == Some(&r.served_by)
                    // The membership moved on during the call (a lease that ran out just
                    // after the heal, a re-join): an intermediate view may have named the
                    // server. Judged only over a view that held throughout the call.
                    || (after.version(), after.epoch()) != (t.version(), t.epoch());
                if !fine {
                    rec.violation_once(
                        format!("stale served {name} {id}"),
                        format!(
                            "no stale routing: after convergence {KIND}/{id} called from {name} was served by {}, rendezvous over {name}'s topology (v{}) says {want:?}",
                            r.served_by,
                            t.version()
                        ),
                    );
                }
                return;
            }
            Err(e) if Instant::now() >= deadline => {
                rec.violation_once(
                    format!("unavailable {name} {id}"),
                    format!(
                        "availability: {KIND}/{id} called from {name} still fails {} s after convergence: {e}",
                        availability_bound().as_secs()
                    ),
                );
                return;
            }
            Err(_) => sleep(Duration::from_millis(200)).await,
        }
    }
}
