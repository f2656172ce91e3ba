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

/// Where an active identity stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Serving.
    Active,
    /// Moved away: no new work; deactivated once its in-flight work is done or at `until`.
    Draining {
        /// The drain deadline.
        until: Instant,
    },
}

/// One active identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Activation {
    /// The fence it was activated under.
    pub fence: Fence,
    /// Serving or draining.
    pub phase: Phase,
    /// Requests being served.
    pub in_flight: u32,
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
        }
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
            if matches!(a.phase, Phase::Draining { .. }) {
                return Decision::Refused(Refusal::Draining);
            }
            a.in_flight += 1;
            return Decision::Serve(a.fence.clone());
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
        self.active.insert(
            key,
            Activation {
                fence: fence.clone(),
                phase: Phase::Active,
                in_flight: 1,
            },
        );
        Decision::Activated(fence.clone())
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
        self.claims.remove(&key);
        if self.granted.len() < self.limit || self.granted.contains_key(&key) {
            let grants = self.granted.entry(key.clone()).or_default();
            grants.retain(|g| g.member != claim.owner);
            grants.push(Grant {
                member: claim.owner.clone(),
                claimed_at: (claim.epoch, claim.version),
                address: address.to_string(),
                at: now,
            });
        }
        match self.active.get_mut(&key) {
            None => Release::Released,
            Some(a) => {
                let until = match a.phase {
                    Phase::Draining { until } => until.min(now + drain),
                    Phase::Active => now + drain,
                };
                a.phase = Phase::Draining { until };
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
        grants.retain(|g| {
            let (e, v) = g.claimed_at;
            !listed(&g.member)
                && if e == epoch {
                    version < v
                } else {
                    now.saturating_duration_since(g.at) < keep
                }
        });
        let out = grants.clone();
        if grants.is_empty() {
            self.granted.remove(&key);
        }
        out
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

    /// A request served (or failed) is done.
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
                Phase::Active if !mine => {
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

    /// The earliest drain deadline, if anything drains.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.active
            .values()
            .filter_map(|a| match a.phase {
                Phase::Draining { until } => Some(until),
                Phase::Active => None,
            })
            .min()
    }

    /// Deactivates the draining identities whose work is done or whose deadline passed.
    /// Returns them.
    pub fn tick(&mut self, now: Instant) -> Vec<(String, String)> {
        let done: Vec<(String, String)> = self
            .active
            .iter()
            .filter(|(_, a)| match a.phase {
                Phase::Draining { until } => a.in_flight == 0 || until <= now,
                Phase::Active => false,
            })
            .map(|(k, _)| k.clone())
            .collect();
        for k in &done {
            self.active.remove(k);
        }
        done
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

    /// Everything is deactivated at once and claims are dropped, the membership flag kept
    /// (the node could not prove it holds its membership just now). Returns what was active.
    pub fn deactivate_all(&mut self) -> Vec<(String, String)> {
        self.claims.clear();
        std::mem::take(&mut self.active).into_keys().collect()
    }

    /// This node lost its membership: everything is deactivated at once (peers may take the
    /// identities over as soon as the backend removes this member). Returns what was active.
    pub fn lost(&mut self) -> Vec<(String, String)> {
        self.member = false;
        self.deactivate_all()
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
            Decision::Claim(held) => a.claimed("k", identity, &held, true, Some(&id(owner))),
            other => other,
        }
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
        assert!(a.tick(t0 + Duration::from_secs(1)).is_empty());
        assert_eq!(a.tick(t0 + Duration::from_secs(2)).len(), 1);
        assert_eq!(a.active().count(), 0);
        // Finished work lets it go at once.
        act(&mut a, "y", &fence(6, "a"), "a");
        a.finished("k", "y");
        a.reconcile(|_, _| None, t0, Duration::from_secs(60));
        assert_eq!(a.tick(t0).len(), 1);
    }

    #[test]
    fn a_lost_membership_deactivates_everything_and_refuses_until_restored() {
        let mut a = Activations::new(id("a"), 10);
        act(&mut a, "x", &fence(5, "a"), "a");
        act(&mut a, "y", &fence(5, "a"), "a");
        assert_eq!(a.lost().len(), 2);
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
        assert_eq!(a.tick(t0).len(), 1);
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
}
