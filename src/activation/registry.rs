//! [`Activations`]: the per-node activation state machine (pure: time is an argument).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::cluster::MemberId;
use crate::runtime::Instant;

/// What a request carries, and what an activation is held under: the topology the owner was
/// resolved from (its epoch and version) and the owner incarnation it named.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fence {
    /// The topology's epoch (versions are ordered within one epoch only).
    pub epoch: u64,
    /// The topology's version.
    pub version: u64,
    /// The owner incarnation the topology named.
    pub owner: MemberId,
}

impl Fence {
    /// Whether `self` comes from an older topology than `other` (same epoch, lower version).
    /// Fences of different epochs are not ordered: the newer epoch is judged by ownership.
    pub fn is_older_than(&self, other: &Fence) -> bool {
        self.epoch == other.epoch && self.version < other.version
    }
}

/// Why an identity was deactivated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Deactivation {
    /// Its owner changed: it drained (or another member asked for it) and moved.
    Moved,
    /// This node lost its membership, or could not prove it held it when asked to serve: peers
    /// may take every identity over.
    MembershipLost,
    /// The node is shutting down (`ActivationHost::shutdown`).
    Shutdown,
    /// No longer needed here: idle for `idle_after`, or passivated on request
    /// (`ActivationHost::passivate`). Its state is kept here for the next activation.
    Passivated,
}

impl Deactivation {
    /// A stable name (metrics labels, logs).
    pub fn label(self) -> &'static str {
        match self {
            Deactivation::Moved => "moved",
            Deactivation::MembershipLost => "membership_lost",
            Deactivation::Shutdown => "shutdown",
            Deactivation::Passivated => "passivated",
        }
    }
}

/// Where an identity held here stands. It moves forward only: `Activating` -> `Active` <->
/// `Draining` -> `Closing` -> `Deactivating` -> gone. Nothing is answered "released" and no
/// other activation of it can begin here before it is gone, so the actor's `activate`, its
/// calls and its `deactivate` never overlap another holder's, on any runtime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// The actor's `activate` runs (the claiming request is in flight and waits for it).
    Activating,
    /// Serving.
    Active,
    /// Moved away: no new work; closed once its in-flight work is done, or at `until`, when
    /// the calls still running are cancelled.
    Draining {
        /// The drain deadline.
        until: Instant,
    },
    /// No call may start; the calls in flight are cancelled (if `cancelled`) or finishing;
    /// deactivated (for `why`) once none is left.
    Closing {
        /// Why it is being deactivated.
        why: Deactivation,
        /// Whether the calls still in flight are to be dropped now.
        cancelled: bool,
    },
    /// The actor's `deactivate` runs: the identity counts as held until it returned.
    Deactivating,
}

/// One active identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activation {
    /// The fence it was activated under.
    pub fence: Fence,
    /// Where it stands.
    pub phase: Phase,
    /// Requests being served (including the one activating it).
    pub in_flight: u32,
    /// Which activation of the identity on this node it is (a call checks it still runs
    /// inside the activation it began in).
    pub serial: u64,
    /// Its generation across members (see `handoff.rs`), set once the claim's round chose it.
    pub generation: u64,
    /// When a call last began or ended in it (idle passivation counts from there).
    pub last_used: Option<Instant>,
}

/// An identity closed with nothing left in flight, to deactivate ([`Activations::to_deactivate`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Closed {
    /// Its kind and identity.
    pub key: (String, String),
    /// Why it goes.
    pub why: Deactivation,
    /// The generation it was held under.
    pub generation: u64,
    /// The member incarnation that held it.
    pub incarnation: MemberId,
    /// The topology (epoch, version) it was held under last.
    pub under: (u64, u64),
}

/// Why a request was not served here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// This node does not hold its membership (it announced `MembershipLost`).
    NotAMember,
    /// The request names another owner, or this node's topology does: try `owner`.
    NotOwner {
        /// The owner this node's topology names, if any.
        owner: Option<MemberId>,
    },
    /// The request's fence is older than the one the identity is active under: the caller
    /// routes with a stale topology.
    StaleFence {
        /// The fence held.
        held: Fence,
    },
    /// The identity is moving away.
    Draining,
    /// The node holds as many activations as it may.
    Full,
    /// Another request is activating the identity here (asking the other members to let go
    /// of it): try again shortly.
    Activating,
    /// The other members could not all confirm that they let go of the identity.
    NotReleased,
}

/// The answer to another member asking this one to let go of an identity it is about to
/// activate ([`Activations::release`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Release {
    /// Nothing of it is active here (any claim of it was dropped): go ahead.
    Released,
    /// It was active here and now drains: answer once [`Activations::is_active`] turns false
    /// (at the latest at `until`).
    Draining {
        /// The drain deadline.
        until: Instant,
    },
    /// This node's own topology names it as the owner: the asker's view and this one
    /// disagree, and neither may activate until they agree.
    Refused,
    /// This node remembers as many grants as it may (`max_grants`): it cannot record this one,
    /// so it does not grant it (a grant it forgot would let its lagging view take the identity
    /// back without asking the claimant). Pruned at each topology change.
    Full,
}

/// What to do with a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Serve it: the identity is active here under this fence.
    Serve(Fence),
    /// Serve it: the identity was just activated here under this fence.
    Activated(Fence),
    /// This node owns the identity but has not activated it: ask every other member to let go
    /// of it first ([`Activations::release`] on each), then report with [`Activations::claimed`].
    Claim(Fence),
    /// Do not.
    Refused(Refusal),
}

/// The identities one node has active: see the module docs.
#[derive(Debug)]
pub struct Activations {
    me: MemberId,
    member: bool,
    limit: usize,
    active: BTreeMap<(String, String), Activation>,
    /// Identities being activated here: the fence each will be held under.
    claims: BTreeMap<(String, String), Fence>,
    /// Members this node let go of an identity for, by identity: asked too before this node
    /// activates it, until its own topology lists them (see [`Self::also_ask`]).
    granted: BTreeMap<(String, String), Vec<Grant>>,
    /// Most identities `granted` may hold: at the bound a release is refused
    /// ([`Release::Full`]) rather than granted unrecorded.
    grant_limit: usize,
    next_serial: u64,
}

impl Grant {
    /// Whether a claim at (`epoch`, `version`) that `listed` names its members by must still
    /// ask this grant's claimant: not once the view lists it (asked anyway), nor once a view
    /// of the same epoch reached the claim's version without it (removed since: it let go of
    /// everything); a grant of another epoch is kept `keep`.
    fn still_needed(
        &self,
        listed: impl Fn(&MemberId) -> bool,
        (epoch, version): (u64, u64),
        now: Instant,
        keep: Duration,
    ) -> bool {
        let (e, v) = self.claimed_at;
        !listed(&self.member)
            && if e == epoch {
                version < v
            } else {
                now.saturating_duration_since(self.at) < keep
            }
    }
}

/// A release this node granted: to whom, where it is reached, and when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Grant {
    /// The member that claimed the identity.
    pub member: MemberId,
    /// The topology (epoch, version) its claim came from.
    pub claimed_at: (u64, u64),
    /// Its address.
    pub address: String,
    /// When the release was granted.
    pub at: Instant,
}

impl Activations {
    /// Nothing active yet, on member incarnation `me`, at most `limit` activations.
    pub fn new(me: MemberId, limit: usize) -> Self {
        Self {
            me,
            member: true,
            limit,
            active: BTreeMap::new(),
            claims: BTreeMap::new(),
            granted: BTreeMap::new(),
            grant_limit: limit,
            next_serial: 0,
        }
    }

    /// At most `limit` identities with grants remembered (see [`Release::Full`]).
    pub fn with_grant_limit(mut self, limit: usize) -> Self {
        self.grant_limit = limit;
        self
    }

    /// A request for `kind/identity` carrying `fence`; `owner` is the owner this node's own
    /// topology (`epoch`, `version`) names. On `Serve`/`Activated` the request counts as in
    /// flight until [`Self::finished`].
    pub fn request(
        &mut self,
        kind: &str,
        identity: &str,
        fence: &Fence,
        owner: Option<&MemberId>,
        epoch: u64,
        version: u64,
    ) -> Decision {
        if !self.member {
            return Decision::Refused(Refusal::NotAMember);
        }
        let key = (kind.to_string(), identity.to_string());
        if let Some(a) = self.active.get_mut(&key) {
            if fence.is_older_than(&a.fence) {
                return Decision::Refused(Refusal::StaleFence {
                    held: a.fence.clone(),
                });
            }
            return match a.phase {
                Phase::Active => {
                    a.in_flight += 1;
                    Decision::Serve(a.fence.clone())
                }
                Phase::Activating => Decision::Refused(Refusal::Activating),
                Phase::Draining { .. } | Phase::Closing { .. } | Phase::Deactivating => {
                    Decision::Refused(Refusal::Draining)
                }
            };
        }
        if fence.owner != self.me || owner != Some(&self.me) {
            return Decision::Refused(Refusal::NotOwner {
                owner: owner.cloned(),
            });
        }
        if self.claims.contains_key(&key) {
            return Decision::Refused(Refusal::Activating);
        }
        if self.active.len() + self.claims.len() >= self.limit {
            return Decision::Refused(Refusal::Full);
        }
        let held = Fence {
            epoch,
            version,
            owner: self.me.clone(),
        };
        self.claims.insert(key, held.clone());
        Decision::Claim(held)
    }

    /// The other members answered the claim [`Decision::Claim`] returned: `released` when every
    /// one let go. The identity is activated (with the request in flight) if the claim still
    /// stands (no member asked for it meanwhile, this node is still a member) and this node's
    /// topology still names it as `owner`.
    pub fn claimed(
        &mut self,
        kind: &str,
        identity: &str,
        fence: &Fence,
        released: bool,
        owner: Option<&MemberId>,
    ) -> Decision {
        let key = (kind.to_string(), identity.to_string());
        let claim = self.claims.remove(&key);
        if claim.as_ref() != Some(fence) || !self.member {
            return Decision::Refused(Refusal::Activating);
        }
        if !released {
            return Decision::Refused(Refusal::NotReleased);
        }
        if owner != Some(&self.me) {
            return Decision::Refused(Refusal::NotOwner {
                owner: owner.cloned(),
            });
        }
        self.next_serial += 1;
        self.active.insert(
            key,
            Activation {
                fence: fence.clone(),
                phase: Phase::Activating,
                in_flight: 1,
                serial: self.next_serial,
                generation: 0,
                last_used: None,
            },
        );
        Decision::Activated(fence.clone())
    }

    /// The generation of activation `serial` of `kind/identity` (0 if it is not held).
    pub fn generation_of(&self, kind: &str, identity: &str, serial: u64) -> u64 {
        self.active
            .get(&(kind.to_string(), identity.to_string()))
            .filter(|a| a.serial == serial)
            .map_or(0, |a| a.generation)
    }

    /// Activation `serial` of `kind/identity` is generation `generation`.
    pub fn set_generation(&mut self, kind: &str, identity: &str, serial: u64, generation: u64) {
        if let Some(a) = self
            .active
            .get_mut(&(kind.to_string(), identity.to_string()))
            .filter(|a| a.serial == serial)
        {
            a.generation = generation;
        }
    }

    /// Which activation of `kind/identity` is held here now (see [`Activation::serial`]).
    pub fn serial_of(&self, kind: &str, identity: &str) -> Option<u64> {
        self.active
            .get(&(kind.to_string(), identity.to_string()))
            .map(|a| a.serial)
    }

    /// The actor's `activate` for activation `serial` returned: it serves, unless it was closed
    /// meanwhile (a lost membership, a shutdown), when the activating request must not run.
    pub fn ready(&mut self, kind: &str, identity: &str, serial: u64) -> bool {
        match self
            .active
            .get_mut(&(kind.to_string(), identity.to_string()))
        {
            Some(a) if a.serial == serial => match a.phase {
                Phase::Activating => {
                    a.phase = Phase::Active;
                    true
                }
                // Admitted before the drain began: it runs like any call in flight.
                Phase::Active | Phase::Draining { .. } => true,
                Phase::Closing { .. } | Phase::Deactivating => false,
            },
            _ => false,
        }
    }

    /// The actor's `activate` for activation `serial` failed: it is forgotten (nothing to
    /// deactivate).
    pub fn failed(&mut self, kind: &str, identity: &str, serial: u64) {
        let key = (kind.to_string(), identity.to_string());
        if self.active.get(&key).is_some_and(|a| a.serial == serial) {
            self.active.remove(&key);
        }
    }

    /// Whether the calls of activation `serial` are to be dropped now, and why.
    pub fn cancelled(&self, kind: &str, identity: &str, serial: u64) -> Option<Deactivation> {
        match self.active.get(&(kind.to_string(), identity.to_string())) {
            Some(a) if a.serial == serial => match a.phase {
                Phase::Closing {
                    why,
                    cancelled: true,
                    ..
                } => Some(why),
                _ => None,
            },
            // Gone: it cannot be while a call runs in it; drop the call all the same.
            _ => Some(Deactivation::MembershipLost),
        }
    }

    /// Another member is about to activate `kind/identity` and asks this one to let go of it;
    /// `owner` is the owner this node's own topology names. Refused while that is this node
    /// (the two views disagree: one of them is behind). Otherwise any claim of it here is
    /// dropped and an active one drains until `now + drain`.
    ///
    /// The claimant (`to`, at `address`) is remembered: this node's topology may not list it
    /// yet (it lags behind), and if that topology later names this node as the owner, the
    /// claimant is asked too before this node activates it ([`Self::also_ask`]).
    #[allow(clippy::too_many_arguments)]
    pub fn release(
        &mut self,
        kind: &str,
        identity: &str,
        owner: Option<&MemberId>,
        now: Instant,
        drain: Duration,
        claim: &Fence,
        address: &str,
    ) -> Release {
        if self.member && owner == Some(&self.me) {
            return Release::Refused;
        }
        let key = (kind.to_string(), identity.to_string());
        // A release this node could not remember would let its lagging view take the identity
        // back without asking the claimant: refused at the bound, never granted unrecorded.
        if self.granted.len() >= self.grant_limit && !self.granted.contains_key(&key) {
            return Release::Full;
        }
        self.claims.remove(&key);
        let grants = self.granted.entry(key.clone()).or_default();
        grants.retain(|g| g.member != claim.owner);
        grants.push(Grant {
            member: claim.owner.clone(),
            claimed_at: (claim.epoch, claim.version),
            address: address.to_string(),
            at: now,
        });
        match self.active.get_mut(&key) {
            None => Release::Released,
            Some(a) => {
                let until = match a.phase {
                    Phase::Draining { until } => until.min(now + drain),
                    Phase::Active | Phase::Activating => now + drain,
                    Phase::Closing { .. } | Phase::Deactivating => now,
                };
                if matches!(
                    a.phase,
                    Phase::Active | Phase::Activating | Phase::Draining { .. }
                ) {
                    a.phase = Phase::Draining { until };
                }
                Release::Draining { until }
            }
        }
    }

    /// The members to ask, besides those of this node's topology (`listed`; at `epoch`,
    /// `version`), before activating `kind/identity`: those it let go of it for that its
    /// topology does not list. A grant is forgotten once the topology lists the claimant (it is
    /// asked anyway), or once the topology of the same epoch reached the claim's version without
    /// listing it (it was removed since: it let go of everything). A grant of another epoch
    /// (a backend restart; Kubernetes nodes number their own topologies) is forgotten after
    /// `keep`.
    #[allow(clippy::too_many_arguments)]
    pub fn also_ask(
        &mut self,
        kind: &str,
        identity: &str,
        listed: impl Fn(&MemberId) -> bool,
        (epoch, version): (u64, u64),
        now: Instant,
        keep: Duration,
    ) -> Vec<Grant> {
        let key = (kind.to_string(), identity.to_string());
        let Some(grants) = self.granted.get_mut(&key) else {
            return Vec::new();
        };
        grants.retain(|g| g.still_needed(&listed, (epoch, version), now, keep));
        let out = grants.clone();
        if grants.is_empty() {
            self.granted.remove(&key);
        }
        out
    }

    /// Forgets every grant [`Self::also_ask`] would forget under this view (run at each
    /// topology change, so the table holds only grants a lagging view still needs). Returns
    /// how many identities still have grants.
    pub fn prune_grants(
        &mut self,
        listed: impl Fn(&MemberId) -> bool,
        (epoch, version): (u64, u64),
        now: Instant,
        keep: Duration,
    ) -> usize {
        self.granted.retain(|_, grants| {
            grants.retain(|g| g.still_needed(&listed, (epoch, version), now, keep));
            !grants.is_empty()
        });
        self.granted.len()
    }

    /// How many identities have grants remembered.
    pub fn grants(&self) -> usize {
        self.granted.len()
    }

    /// `member` answered that it let go of `kind/identity`: it need not be asked again.
    pub fn released_by(&mut self, kind: &str, identity: &str, member: &MemberId) {
        let key = (kind.to_string(), identity.to_string());
        if let Some(grants) = self.granted.get_mut(&key) {
            grants.retain(|g| &g.member != member);
            if grants.is_empty() {
                self.granted.remove(&key);
            }
        }
    }

    /// Where `kind/identity` stands here, if it is active or draining.
    pub fn phase_of(&self, kind: &str, identity: &str) -> Option<Phase> {
        self.active
            .get(&(kind.to_string(), identity.to_string()))
            .map(|a| a.phase)
    }

    /// Whether `kind/identity` is active (or draining) here.
    pub fn is_active(&self, kind: &str, identity: &str) -> bool {
        self.active
            .contains_key(&(kind.to_string(), identity.to_string()))
    }

    /// A request served (or failed, or cancelled) is done: nothing of it runs any more.
    pub fn finished(&mut self, kind: &str, identity: &str) {
        if let Some(a) = self
            .active
            .get_mut(&(kind.to_string(), identity.to_string()))
        {
            a.in_flight = a.in_flight.saturating_sub(1);
        }
    }

    /// Checks every active identity against the owner this node's topology now names
    /// (`owner_of`): those it no longer owns drain until `now + drain`; a draining one it owns
    /// again serves again. It needs no `RebalanceReport`, so it also covers identities the
    /// owner cache never remembered, and a subscriber that lagged. Returns the identities that
    /// began to drain.
    pub fn reconcile(
        &mut self,
        owner_of: impl Fn(&str, &str) -> Option<MemberId>,
        now: Instant,
        drain: Duration,
    ) -> Vec<(String, String)> {
        let mut draining = Vec::new();
        for ((kind, identity), a) in &mut self.active {
            let mine = owner_of(kind, identity).as_ref() == Some(&self.me);
            match a.phase {
                Phase::Active | Phase::Activating if !mine => {
                    a.phase = Phase::Draining { until: now + drain };
                    draining.push((kind.clone(), identity.clone()));
                }
                // Back before it was let go: nobody else can hold it (a member asking for it
                // is answered only once it is gone here), so it serves again.
                Phase::Draining { .. } if mine => a.phase = Phase::Active,
                _ => {}
            }
        }
        draining
    }

    /// A call began or ended in `kind/identity` at `now`.
    pub fn touch(&mut self, kind: &str, identity: &str, now: Instant) {
        if let Some(a) = self
            .active
            .get_mut(&(kind.to_string(), identity.to_string()))
        {
            a.last_used = Some(now);
        }
    }

    /// Closes every active identity with no call in flight that no call used for `after`
    /// (passivation). Returns how many.
    pub fn passivate_idle(&mut self, now: Instant, after: Duration) -> usize {
        let mut n = 0;
        for a in self.active.values_mut() {
            if a.phase == Phase::Active
                && a.in_flight == 0
                && a.last_used
                    .is_some_and(|t| now.saturating_duration_since(t) >= after)
            {
                a.phase = Phase::Closing {
                    why: Deactivation::Passivated,
                    cancelled: false,
                };
                n += 1;
            }
        }
        n
    }

    /// Closes `kind/identity` if it is active with no call in flight, or once its calls end
    /// (they are not cancelled). Returns whether it was held here.
    pub fn passivate(&mut self, kind: &str, identity: &str) -> bool {
        match self
            .active
            .get_mut(&(kind.to_string(), identity.to_string()))
        {
            Some(a) if matches!(a.phase, Phase::Active | Phase::Draining { .. }) => {
                a.phase = Phase::Closing {
                    why: Deactivation::Passivated,
                    cancelled: false,
                };
                true
            }
            _ => false,
        }
    }

    /// When the next identity turns idle for `after`, if any can.
    pub fn next_idle(&self, after: Duration) -> Option<Instant> {
        self.active
            .values()
            .filter(|a| a.phase == Phase::Active && a.in_flight == 0)
            .filter_map(|a| a.last_used.map(|t| t + after))
            .min()
    }

    /// The earliest drain deadline, if anything drains.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.active
            .values()
            .filter_map(|a| match a.phase {
                Phase::Draining { until } => Some(until),
                _ => None,
            })
            .min()
    }

    /// Closes the draining identities whose work is done, and those whose deadline passed
    /// (their calls still running are cancelled). Returns whether any call is to be cancelled.
    pub fn tick(&mut self, now: Instant) -> bool {
        let mut cancel = false;
        for a in self.active.values_mut() {
            if let Phase::Draining { until } = a.phase
                && (a.in_flight == 0 || until <= now)
            {
                if crate::runtime::sim::flaw("calls-outlive-drain") {
                    a.in_flight = 0;
                }
                let cancelled = a.in_flight > 0;
                cancel |= cancelled;
                a.phase = Phase::Closing {
                    why: Deactivation::Moved,
                    cancelled,
                };
            }
        }
        cancel
    }

    /// The identities closed with no call left in flight: each turns `Deactivating` (the
    /// caller runs the actor's `deactivate`, then reports [`Self::deactivated`]). In
    /// (kind, identity) order.
    pub fn to_deactivate(&mut self) -> Vec<Closed> {
        let mut out = Vec::new();
        for (k, a) in &mut self.active {
            if let Phase::Closing { why, .. } = a.phase
                && a.in_flight == 0
            {
                a.phase = Phase::Deactivating;
                out.push(Closed {
                    key: k.clone(),
                    why,
                    generation: a.generation,
                    incarnation: a.fence.owner.clone(),
                    under: (a.fence.epoch, a.fence.version),
                });
            }
        }
        out
    }

    /// The actor's `deactivate` of `kind/identity` returned: it is gone from this node.
    pub fn deactivated(&mut self, kind: &str, identity: &str) {
        let key = (kind.to_string(), identity.to_string());
        if self
            .active
            .get(&key)
            .is_some_and(|a| a.phase == Phase::Deactivating)
        {
            self.active.remove(&key);
        }
    }

    /// This node's member incarnation.
    pub fn me(&self) -> &MemberId {
        &self.me
    }

    /// Whether this node counts itself a member (no loss announced since the last restore).
    pub fn is_member(&self) -> bool {
        self.member
    }

    /// How many identities are active, draining or being activated here.
    pub fn len(&self) -> usize {
        self.active.len() + self.claims.len()
    }

    /// Whether nothing is active, draining or being activated here.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Everything is closed at once (calls in flight cancelled) and claims are dropped, the
    /// membership flag kept (the node could not prove it holds its membership just now).
    /// Returns whether any call is to be cancelled.
    pub fn deactivate_all(&mut self, why: Deactivation) -> bool {
        self.claims.clear();
        let mut cancel = false;
        for a in self.active.values_mut() {
            if a.phase != Phase::Deactivating {
                cancel |= a.in_flight > 0;
                a.phase = Phase::Closing {
                    why,
                    cancelled: true,
                };
            }
        }
        cancel
    }

    /// This node lost its membership: everything is closed at once (peers may take the
    /// identities over as soon as the backend removes this member). Returns whether any call
    /// is to be cancelled.
    pub fn lost(&mut self, why: Deactivation) -> bool {
        self.member = false;
        self.deactivate_all(why)
    }

    /// This node is a member again, as incarnation `me`.
    pub fn restored(&mut self, me: MemberId) {
        self.me = me;
        self.member = true;
    }

    /// The identities active or draining here, in (kind, identity) order.
    pub fn active(&self) -> impl Iterator<Item = (&(String, String), &Activation)> {
        self.active.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> MemberId {
        MemberId::parse(s).unwrap()
    }

    fn fence(version: u64, owner: &str) -> Fence {
        Fence {
            epoch: 1,
            version,
            owner: id(owner),
        }
    }

    /// A request that activates (claim, then every other member released).
    fn act(a: &mut Activations, identity: &str, f: &Fence, owner: &str) -> Decision {
        match a.request("k", identity, f, Some(&id(owner)), f.epoch, f.version) {
            Decision::Claim(held) => {
                let d = a.claimed("k", identity, &held, true, Some(&id(owner)));
                let serial = a.serial_of("k", identity).unwrap();
                assert!(a.ready("k", identity, serial));
                d
            }
            other => other,
        }
    }

    /// Runs the actor's `deactivate` for whatever is closed with nothing in flight: what went.
    fn gone(a: &mut Activations) -> Vec<(String, String)> {
        let out: Vec<_> = a.to_deactivate().into_iter().map(|c| c.key).collect();
        for (k, i) in &out {
            a.deactivated(k, i);
        }
        out
    }

    fn now() -> Instant {
        // Test-only: the state machine takes time as an argument; any starting point will do.
        Instant::now()
    }

    #[test]
    fn only_the_owner_activates_and_a_stale_fence_is_refused() {
        let mut a = Activations::new(id("a"), 10);
        // Another owner named by the caller or by this node's topology: not here.
        assert_eq!(
            a.request("k", "x", &fence(3, "b"), Some(&id("b")), 1, 3),
            Decision::Refused(Refusal::NotOwner {
                owner: Some(id("b"))
            })
        );
        assert_eq!(
            a.request("k", "x", &fence(3, "a"), Some(&id("b")), 1, 4),
            Decision::Refused(Refusal::NotOwner {
                owner: Some(id("b"))
            })
        );
        assert_eq!(
            a.request("k", "x", &fence(5, "a"), Some(&id("a")), 1, 5),
            Decision::Claim(fence(5, "a"))
        );
        // A second request while the other members are asked: not twice.
        assert_eq!(
            a.request("k", "x", &fence(5, "a"), Some(&id("a")), 1, 5),
            Decision::Refused(Refusal::Activating)
        );
        assert_eq!(
            a.claimed("k", "x", &fence(5, "a"), true, Some(&id("a"))),
            Decision::Activated(fence(5, "a"))
        );
        // Nothing is served while the actor activates.
        assert_eq!(
            a.request("k", "x", &fence(5, "a"), Some(&id("a")), 1, 5),
            Decision::Refused(Refusal::Activating)
        );
        let serial = a.serial_of("k", "x").unwrap();
        assert!(a.ready("k", "x", serial));
        assert_eq!(
            a.request("k", "x", &fence(5, "a"), Some(&id("a")), 1, 5),
            Decision::Serve(fence(5, "a"))
        );
        assert_eq!(
            a.request("k", "x", &fence(4, "a"), Some(&id("a")), 1, 5),
            Decision::Refused(Refusal::StaleFence {
                held: fence(5, "a")
            })
        );
    }

    #[test]
    fn a_moved_identity_drains_then_deactivates() {
        let mut a = Activations::new(id("a"), 10);
        let t0 = now();
        act(&mut a, "x", &fence(5, "a"), "a");
        assert_eq!(
            a.reconcile(|_, _| Some(id("b")), t0, Duration::from_secs(2)),
            vec![("k".to_string(), "x".to_string())]
        );
        assert_eq!(
            a.request("k", "x", &fence(6, "a"), Some(&id("b")), 1, 6),
            Decision::Refused(Refusal::Draining)
        );
        // One request still in flight: it stays until the deadline.
        assert!(!a.tick(t0 + Duration::from_secs(1)));
        assert!(gone(&mut a).is_empty());
        // At the deadline the call still running is cancelled; the identity is deactivated
        // only once it is dropped, and counts as held until then.
        let serial = a.serial_of("k", "x").unwrap();
        assert!(a.tick(t0 + Duration::from_secs(2)));
        assert_eq!(a.cancelled("k", "x", serial), Some(Deactivation::Moved));
        assert!(gone(&mut a).is_empty());
        assert!(a.is_active("k", "x"));
        a.finished("k", "x");
        assert_eq!(a.to_deactivate().len(), 1);
        // Deactivating: still held (a release waits) until the actor's deactivate returned.
        assert_eq!(a.phase_of("k", "x"), Some(Phase::Deactivating));
        assert_eq!(
            a.request("k", "x", &fence(7, "a"), Some(&id("a")), 1, 7),
            Decision::Refused(Refusal::Draining)
        );
        a.deactivated("k", "x");
        assert_eq!(a.active().count(), 0);
        // Finished work lets it go at once.
        act(&mut a, "y", &fence(6, "a"), "a");
        a.finished("k", "y");
        a.reconcile(|_, _| None, t0, Duration::from_secs(60));
        assert!(!a.tick(t0));
        assert_eq!(gone(&mut a).len(), 1);
    }

    #[test]
    fn a_lost_membership_deactivates_everything_and_refuses_until_restored() {
        let mut a = Activations::new(id("a"), 10);
        act(&mut a, "x", &fence(5, "a"), "a");
        act(&mut a, "y", &fence(5, "a"), "a");
        a.finished("k", "x");
        // y's call still runs: it is cancelled, and y is deactivated once it is dropped.
        assert!(a.lost(Deactivation::MembershipLost));
        assert_eq!(gone(&mut a).len(), 1);
        a.finished("k", "y");
        assert_eq!(gone(&mut a).len(), 1);
        assert_eq!(
            a.request("k", "x", &fence(5, "a"), Some(&id("a")), 1, 5),
            Decision::Refused(Refusal::NotAMember)
        );
        a.restored(id("a2"));
        // The old incarnation's fences name it, not the new one.
        assert!(matches!(
            a.request("k", "x", &fence(6, "a"), Some(&id("a2")), 1, 6),
            Decision::Refused(Refusal::NotOwner { .. })
        ));
        assert!(matches!(
            act(&mut a, "x", &fence(6, "a2"), "a2"),
            Decision::Activated(_)
        ));
    }

    #[test]
    fn reconcile_drains_what_the_topology_gives_to_another_member() {
        let mut a = Activations::new(id("a"), 10);
        let t0 = now();
        act(&mut a, "x", &fence(5, "a"), "a");
        act(&mut a, "y", &fence(5, "a"), "a");
        let drained = a.reconcile(
            |_, identity| Some(id(if identity == "x" { "b" } else { "a" })),
            t0,
            Duration::from_secs(1),
        );
        assert_eq!(drained, vec![("k".to_string(), "x".to_string())]);
        assert_eq!(a.next_deadline(), Some(t0 + Duration::from_secs(1)));
    }

    #[test]
    fn activations_are_bounded() {
        let mut a = Activations::new(id("a"), 1);
        act(&mut a, "x", &fence(5, "a"), "a");
        assert_eq!(
            a.request("k", "y", &fence(5, "a"), Some(&id("a")), 1, 5),
            Decision::Refused(Refusal::Full)
        );
    }

    #[test]
    fn a_member_lets_go_only_of_what_its_own_view_gives_to_another() {
        let mut a = Activations::new(id("a"), 10);
        let t0 = now();
        let drain = Duration::from_secs(2);
        act(&mut a, "x", &fence(5, "a"), "a");
        // Its own view still names it: the asker is ahead or behind; nobody activates.
        assert_eq!(
            a.release("k", "x", Some(&id("a")), t0, drain, &fence(6, "b"), "b:1"),
            Release::Refused
        );
        // Its view moved x to b: it drains, and answers once it is gone.
        assert_eq!(
            a.release("k", "x", Some(&id("b")), t0, drain, &fence(6, "b"), "b:1"),
            Release::Draining { until: t0 + drain }
        );
        assert!(a.is_active("k", "x"));
        a.finished("k", "x");
        a.tick(t0);
        assert_eq!(gone(&mut a).len(), 1);
        assert!(!a.is_active("k", "x"));
        assert_eq!(
            a.release("k", "x", Some(&id("b")), t0, drain, &fence(6, "b"), "b:1"),
            Release::Released
        );
    }

    #[test]
    fn a_claim_lost_to_another_member_or_not_confirmed_does_not_activate() {
        let mut a = Activations::new(id("a"), 10);
        let t0 = now();
        let f = fence(5, "a");
        // b asked a to let go while a was asking the others: b's claim wins the race here
        // (a's view named b), a's claim is dropped.
        assert_eq!(
            a.request("k", "x", &f, Some(&id("a")), 1, 5),
            Decision::Claim(f.clone())
        );
        assert_eq!(
            a.release(
                "k",
                "x",
                Some(&id("b")),
                t0,
                Duration::from_secs(1),
                &fence(6, "b"),
                "b:1"
            ),
            Release::Released
        );
        assert_eq!(
            a.claimed("k", "x", &f, true, Some(&id("a"))),
            Decision::Refused(Refusal::Activating)
        );
        // A member did not answer: not activated, and the next request claims again.
        assert_eq!(
            a.request("k", "x", &f, Some(&id("a")), 1, 5),
            Decision::Claim(f.clone())
        );
        assert_eq!(
            a.claimed("k", "x", &f, false, Some(&id("a"))),
            Decision::Refused(Refusal::NotReleased)
        );
        assert_eq!(
            a.request("k", "x", &f, Some(&id("a")), 1, 5),
            Decision::Claim(f.clone())
        );
        // The view moved while asking: not activated.
        assert!(matches!(
            a.claimed("k", "x", &f, true, Some(&id("b"))),
            Decision::Refused(Refusal::NotOwner { .. })
        ));
        assert!(!a.is_active("k", "x"));
    }

    #[test]
    fn a_member_that_let_go_asks_the_claimant_before_taking_the_identity_back() {
        let mut a = Activations::new(id("a"), 10);
        let t0 = now();
        let keep = Duration::from_secs(10);
        // a (lagging at v5: its view lists neither b nor c) let go of x for b, claiming at v7.
        assert_eq!(
            a.release("k", "x", Some(&id("r")), t0, keep, &fence(7, "b"), "b:1"),
            Release::Released
        );
        let listed_none = |_: &MemberId| false;
        // However long a's view lags, b is asked.
        let asks = a.also_ask("k", "x", listed_none, (1, 5), t0 + keep * 100, keep);
        assert_eq!(asks.len(), 1);
        assert_eq!(
            (asks[0].member.clone(), asks[0].address.as_str()),
            (id("b"), "b:1")
        );
        // Once a's view lists b, b is asked as a member; the grant is forgotten.
        assert!(
            a.also_ask("k", "x", |m| m == &id("b"), (1, 8), t0, keep)
                .is_empty()
        );
        assert!(
            a.also_ask("k", "x", listed_none, (1, 5), t0, keep)
                .is_empty()
        );
        // A view of the claim's version that does not list b: b was removed since.
        a.release("k", "w", None, t0, keep, &fence(7, "b"), "b:1");
        assert!(
            a.also_ask("k", "w", listed_none, (1, 7), t0, keep)
                .is_empty()
        );
        // A grant answered with a release is forgotten.
        a.release("k", "y", None, t0, keep, &fence(7, "b"), "b:1");
        a.released_by("k", "y", &id("b"));
        assert!(
            a.also_ask("k", "y", listed_none, (1, 5), t0, keep)
                .is_empty()
        );
        // A grant of another epoch is forgotten after `keep`.
        a.release("k", "z", None, t0, keep, &fence(7, "b"), "b:1");
        assert_eq!(a.also_ask("k", "z", listed_none, (2, 1), t0, keep).len(), 1);
        assert!(
            a.also_ask("k", "z", listed_none, (2, 1), t0 + keep, keep)
                .is_empty()
        );
    }

    #[test]
    fn a_full_grants_table_refuses_releases_and_pruning_frees_it() {
        let mut a = Activations::new(id("a"), 10).with_grant_limit(2);
        let t0 = now();
        let keep = Duration::from_secs(10);
        let drain = Duration::from_secs(1);
        for x in ["x", "y"] {
            assert_eq!(
                a.release("k", x, None, t0, drain, &fence(7, "b"), "b:1"),
                Release::Released
            );
        }
        // A third identity cannot be recorded: refused, not granted unrecorded.
        assert_eq!(
            a.release("k", "z", None, t0, drain, &fence(7, "b"), "b:1"),
            Release::Full
        );
        // One already recorded can be granted again (to another claimant too).
        assert_eq!(
            a.release("k", "x", None, t0, drain, &fence(8, "c"), "c:1"),
            Release::Released
        );
        // A view that lists b (and c) no longer needs the grants: pruned, room again.
        assert_eq!(a.prune_grants(|m| m != &id("c"), (1, 5), t0, keep), 1);
        assert_eq!(a.prune_grants(|_| true, (1, 5), t0, keep), 0);
        assert_eq!(
            a.release("k", "z", None, t0, drain, &fence(7, "b"), "b:1"),
            Release::Released
        );
        // Pruned by version too: a view of the claim's version without b.
        assert_eq!(a.prune_grants(|_| false, (1, 6), t0, keep), 1);
        assert_eq!(a.prune_grants(|_| false, (1, 7), t0, keep), 0);
    }

    #[test]
    fn a_membership_lost_while_the_actor_activates_deactivates_it_after_activate_returned() {
        let mut a = Activations::new(id("a"), 10);
        let f = fence(5, "a");
        assert_eq!(
            a.request("k", "x", &f, Some(&id("a")), 1, 5),
            Decision::Claim(f.clone())
        );
        assert_eq!(
            a.claimed("k", "x", &f, true, Some(&id("a"))),
            Decision::Activated(f.clone())
        );
        let serial = a.serial_of("k", "x").unwrap();
        // The actor's activate runs; the membership goes meanwhile.
        a.lost(Deactivation::MembershipLost);
        // Nothing to deactivate before activate returned (the request is in flight) ...
        assert!(a.to_deactivate().is_empty());
        // ... then the request does not run, and the identity is deactivated.
        assert!(!a.ready("k", "x", serial));
        a.finished("k", "x");
        assert_eq!(
            a.to_deactivate(),
            vec![Closed {
                key: ("k".to_string(), "x".to_string()),
                why: Deactivation::MembershipLost,
                generation: 0,
                incarnation: id("a"),
                under: (f.epoch, f.version),
            }]
        );
    }

    #[test]
    fn a_call_of_an_earlier_activation_is_cancelled_not_confused_with_a_later_one() {
        let mut a = Activations::new(id("a"), 10);
        act(&mut a, "x", &fence(5, "a"), "a");
        let first = a.serial_of("k", "x").unwrap();
        assert_eq!(a.cancelled("k", "x", first), None);
        a.finished("k", "x");
        a.lost(Deactivation::MembershipLost);
        gone(&mut a);
        a.restored(id("a2"));
        act(&mut a, "x", &fence(6, "a2"), "a2");
        let second = a.serial_of("k", "x").unwrap();
        assert_ne!(first, second);
        assert_eq!(a.cancelled("k", "x", second), None);
        assert!(a.cancelled("k", "x", first).is_some());
    }

    #[test]
    fn an_idle_identity_is_passivated_and_a_busy_one_is_not() {
        let mut a = Activations::new(id("a"), 10);
        let t0 = now();
        let idle = Duration::from_secs(60);
        act(&mut a, "x", &fence(5, "a"), "a");
        act(&mut a, "y", &fence(5, "a"), "a");
        a.finished("k", "x");
        a.touch("k", "x", t0);
        a.touch("k", "y", t0);
        // y's call still runs; x has been idle for less than a minute.
        assert_eq!(a.next_idle(idle), Some(t0 + idle));
        assert_eq!(a.passivate_idle(t0 + idle / 2, idle), 0);
        assert_eq!(a.passivate_idle(t0 + idle, idle), 1);
        assert_eq!(
            a.to_deactivate()
                .iter()
                .map(|c| (c.key.1.as_str(), c.why))
                .collect::<Vec<_>>(),
            vec![("x", Deactivation::Passivated)]
        );
        // Passivated on request: y goes once its call ended, which is not cancelled.
        assert!(a.passivate("k", "y"));
        let serial = a.serial_of("k", "y").unwrap();
        assert_eq!(a.cancelled("k", "y", serial), None);
        assert!(a.to_deactivate().is_empty());
        a.finished("k", "y");
        assert_eq!(a.to_deactivate().len(), 1);
        assert!(!a.passivate("k", "z"));
    }
}
