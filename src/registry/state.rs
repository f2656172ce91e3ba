//! The registry's bookkeeping as a state machine: fed requests and the current time, it
//! answers and says which topology changes to broadcast. No I/O, so every rule is unit-tested.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crate::cluster::{ClusterTopology, Member, MemberId, ModelError, check_text};
use crate::runtime::{Instant, sim};

use super::config::RegistryConfig;

/// Whether a registration is part of the topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Hosts kinds; part of the topology.
    Member,
    /// Only watches; expires like a member but is never in the topology.
    Client,
}

/// Why the registry refused a request. Each maps to one gRPC status code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// The id is registered by another incarnation (`AlreadyExists`): a join for a registered
    /// id must present that incarnation's secret.
    #[error(
        "member {id} is already registered in cluster {cluster:?} by another incarnation (the incarnation secret does not match); pick a new member id"
    )]
    AlreadyRegistered {
        /// The cluster.
        cluster: String,
        /// The id.
        id: MemberId,
    },
    /// Malformed input (`InvalidArgument`).
    #[error("{0}")]
    Invalid(String),
    /// Missing or wrong cluster token (`Unauthenticated`).
    #[error("cluster {0:?} requires a valid cluster token")]
    Unauthenticated(String),
    /// Unknown or expired member token (`NotFound`): the caller must join again.
    #[error("registration not found in cluster {0:?} (unknown or expired token); join again")]
    UnknownRegistration(String),
    /// Unknown cluster or member (`NotFound`).
    #[error("{0}")]
    NotFound(String),
    /// A limit was reached (`ResourceExhausted`).
    #[error("{message}")]
    Exhausted {
        /// The setting that sets the limit (as in the settings file; the flag is named alike).
        limit: &'static str,
        /// What the client is told.
        message: String,
    },
    /// The id was removed from the cluster (it expired or left) and cannot come back
    /// (`FailedPrecondition`): peers saw it go, so the caller must join as a new incarnation.
    #[error(
        "member {id} was removed from cluster {cluster:?} (it expired or left); join again as a new incarnation (a new member id)"
    )]
    Removed {
        /// The cluster.
        cluster: String,
        /// The removed id.
        id: MemberId,
    },
}

impl From<ModelError> for RegistryError {
    fn from(e: ModelError) -> Self {
        RegistryError::Invalid(e.to_string())
    }
}

/// A topology change to broadcast to a cluster's watchers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The cluster's topology after the change.
    pub topology: Arc<ClusterTopology>,
    /// The version the change applies to.
    pub previous_version: u64,
    /// Members that joined.
    pub joined: Vec<Member>,
    /// Members whose description changed (as they are now).
    pub changed: Vec<Member>,
    /// Members that left or expired.
    pub left: Vec<Member>,
    /// Whether the members in `left` expired (rather than left).
    pub expired: bool,
}

/// The credentials of one join: the fresh token to hand out, and the caller's incarnation
/// secret (empty: none, and then the id cannot be joined again while registered).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JoinKeys {
    /// The registration token the registry hands out for this join.
    pub token: String,
    /// The secret the joining incarnation chose (sent with every join it makes).
    pub secret: String,
    /// Only change the description of a registration the registry holds; never register the
    /// id anew (see `JoinRequest.update_only`).
    pub update_only: bool,
}

impl From<&str> for JoinKeys {
    fn from(token: &str) -> Self {
        Self {
            token: token.to_string(),
            secret: String::new(),
            update_only: false,
        }
    }
}

impl From<String> for JoinKeys {
    fn from(token: String) -> Self {
        Self {
            token,
            secret: String::new(),
            update_only: false,
        }
    }
}

/// What a successful join returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Joined {
    /// The registration's token.
    pub token: String,
    /// The cluster's topology version after the join.
    pub version: u64,
}

#[derive(Debug)]
struct Registration {
    /// Shared with every topology version that lists it.
    member: Arc<Member>,
    role: Role,
    token: String,
    /// The incarnation secret presented at join (empty: none).
    secret: String,
    expires_at: Instant,
    /// Bytes this member adds to an encoded snapshot (0 for a client).
    encoded: usize,
}

#[derive(Debug)]
struct Cluster {
    topology: Arc<ClusterTopology>,
    /// Members and clients by id.
    registrations: BTreeMap<MemberId, Registration>,
    /// Token -> id, for heartbeat and leave.
    tokens: BTreeMap<String, MemberId>,
    /// Address -> id of the member registered there (members only).
    by_address: BTreeMap<String, MemberId>,
    members: usize,
    clients: usize,
    /// The encoded size of a snapshot of this cluster's members.
    snapshot_bytes: usize,
}

/// All clusters of one registry.
#[derive(Debug)]
pub struct RegistryState {
    config: Arc<RegistryConfig>,
    /// Registry-wide version counter. It starts at the wall-clock time of the start in
    /// microseconds, so a restarted registry's versions continue above the previous run's and
    /// watchers never see a version go backwards.
    version: u64,
    /// This run's epoch, carried by every topology it issues: versions are ordered only within
    /// one epoch (a clock stepped back across a restart makes the floor above meaningless).
    epoch: u64,
    clusters: BTreeMap<String, Cluster>,
    /// Member ids removed (expired or left) and when, so that a late or repeated join cannot
    /// bring them back: by (cluster, id), and in removal order for pruning.
    tombstones: BTreeMap<(String, MemberId), Instant>,
    tombstone_order: std::collections::BTreeSet<(Instant, String, MemberId)>,
    /// Registrations across all clusters.
    registrations: usize,
    /// Open watch streams per cluster (a cluster may be watched before anyone registers).
    watched: BTreeMap<String, usize>,
    /// Open watch streams across all clusters.
    watchers: usize,
}

/// Bytes `member` adds to an encoded `MemberList` (the field's tag, length and body).
fn snapshot_share(member: &Member) -> usize {
    let body = prost::Message::encoded_len(&super::wire::member_to_pb(member));
    1 + prost::encoding::encoded_len_varint(body as u64) + body
}

/// Longest incarnation secret accepted, in bytes.
pub const MAX_SECRET_LEN: usize = 128;

/// How long a removed id is remembered, in TTLs (a join delayed longer than this could bring it
/// back; networks do not hold requests that long).
pub const TOMBSTONE_TTLS: u32 = 10;

impl RegistryState {
    /// An empty registry whose versions start above `version_floor`, issuing topologies under
    /// `epoch` (a random number per run, never 0).
    pub fn new(config: Arc<RegistryConfig>, version_floor: u64, epoch: u64) -> Self {
        Self {
            config,
            version: version_floor,
            epoch: epoch.max(1),
            clusters: BTreeMap::new(),
            tombstones: BTreeMap::new(),
            tombstone_order: std::collections::BTreeSet::new(),
            registrations: 0,
            watched: BTreeMap::new(),
            watchers: 0,
        }
    }

    /// Whether `cluster` may exist on this registry: one it already holds or serves, one the
    /// operator named, or (unless only named clusters are allowed) a new one while fewer than
    /// `max_clusters` unnamed clusters exist.
    fn admit(&self, cluster: &str) -> Result<(), RegistryError> {
        if self.clusters.contains_key(cluster)
            || self.watched.contains_key(cluster)
            || self.config.is_named(cluster)
        {
            return Ok(());
        }
        if self.config.only_named_clusters {
            return Err(RegistryError::NotFound(format!(
                "cluster {cluster:?} is not configured on this registry"
            )));
        }
        let unnamed = self
            .clusters
            .keys()
            .chain(
                self.watched
                    .keys()
                    .filter(|c| !self.clusters.contains_key(*c)),
            )
            .filter(|c| !self.config.is_named(c))
            .count();
        let max = self.config.limits.max_clusters;
        if unnamed >= max {
            return Err(RegistryError::Exhausted {
                limit: "max_clusters",
                message: format!(
                    "the registry holds {unnamed} clusters, its limit (named clusters are exempt)"
                ),
            });
        }
        Ok(())
    }

    /// A watch stream of `cluster` opens (authorized with `token`): counted against the
    /// per-cluster and global limits.
    pub fn watch_opened(&mut self, cluster: &str, token: &str) -> Result<(), RegistryError> {
        self.authorize(cluster, token)?;
        self.admit(cluster)?;
        let limits = &self.config.limits;
        let here = self.watched.get(cluster).copied().unwrap_or(0);
        if here >= limits.max_watchers_per_cluster {
            return Err(RegistryError::Exhausted {
                limit: "max_watchers_per_cluster",
                message: format!("cluster {cluster:?} has {here} watchers, its limit"),
            });
        }
        if self.watchers >= limits.max_watchers {
            return Err(RegistryError::Exhausted {
                limit: "max_watchers",
                message: format!(
                    "the registry serves {} watch streams, its limit",
                    self.watchers
                ),
            });
        }
        *self.watched.entry(cluster.to_string()).or_default() += 1;
        self.watchers += 1;
        Ok(())
    }

    /// A watch stream of `cluster` closed; returns how many remain on it.
    pub fn watch_closed(&mut self, cluster: &str) -> usize {
        let Some(n) = self.watched.get_mut(cluster) else {
            return 0;
        };
        *n -= 1;
        self.watchers -= 1;
        let left = *n;
        if left == 0 {
            self.watched.remove(cluster);
        }
        left
    }

    /// Open watch streams across all clusters.
    pub fn watchers(&self) -> usize {
        self.watchers
    }

    /// Registrations across all clusters.
    pub fn registrations(&self) -> usize {
        self.registrations
    }

    /// Clusters held: registered or watched.
    pub fn cluster_count(&self) -> usize {
        self.clusters.len()
            + self
                .watched
                .keys()
                .filter(|c| !self.clusters.contains_key(*c))
                .count()
    }

    /// The encoded size of a snapshot of `cluster` (0 when unknown).
    pub fn snapshot_bytes(&self, cluster: &str) -> usize {
        self.clusters.get(cluster).map_or(0, |c| c.snapshot_bytes)
    }

    /// Remembers that `id` left `cluster` at `now` (bounded: the oldest are forgotten first).
    fn bury(&mut self, cluster: &str, id: &MemberId, now: Instant) {
        let key = (cluster.to_string(), id.clone());
        if let Some(old) = self.tombstones.insert(key, now) {
            self.tombstone_order
                .remove(&(old, cluster.to_string(), id.clone()));
        }
        self.tombstone_order
            .insert((now, cluster.to_string(), id.clone()));
        let cap = self.config.limits.max_tombstones;
        while self.tombstones.len() > cap {
            let Some((_, c, i)) = self.tombstone_order.pop_first() else {
                break;
            };
            self.tombstones.remove(&(c, i));
        }
    }

    /// Forgets tombstones older than [`TOMBSTONE_TTLS`] TTLs.
    fn prune_tombstones(&mut self, now: Instant) {
        let keep = self.config.ttl * TOMBSTONE_TTLS;
        while let Some((at, _, _)) = self.tombstone_order.first() {
            if now.saturating_duration_since(*at) < keep {
                break;
            }
            let (_, c, i) = self.tombstone_order.pop_first().expect("peeked");
            self.tombstones.remove(&(c, i));
        }
    }

    /// This run's epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The settings in force.
    pub fn config(&self) -> &RegistryConfig {
        &self.config
    }

    /// Checks a cluster name and, when the cluster has a token, the presented one.
    pub fn authorize(&self, cluster: &str, token: &str) -> Result<(), RegistryError> {
        check_text(
            "cluster name",
            cluster,
            self.config.limits.max_cluster_name_len,
        )?;
        match self.config.cluster_tokens.get(cluster) {
            Some(expected) if !constant_time_eq(expected.as_bytes(), token.as_bytes()) => {
                Err(RegistryError::Unauthenticated(cluster.to_string()))
            }
            _ => Ok(()),
        }
    }

    /// Registers `member`. A join for an id that is already registered must present the same
    /// incarnation secret (a retried join: it replaces the token, harmlessly); anything else is
    /// [`RegistryError::AlreadyRegistered`], so nobody can take over another member's id. A
    /// member joining at an address that another member id still holds supersedes it at once
    /// (the older incarnation of a restarted process): one change, the old id left and the new
    /// one joined.
    pub fn join(
        &mut self,
        cluster: &str,
        cluster_token: &str,
        member: Member,
        role: Role,
        keys: JoinKeys,
        now: Instant,
    ) -> Result<(Joined, Option<Change>), RegistryError> {
        self.authorize(cluster, cluster_token)?;
        member.validate(&self.config.limits.member)?;
        if keys.secret.len() > MAX_SECRET_LEN {
            return Err(RegistryError::Invalid(format!(
                "incarnation_secret is {} bytes long, the limit is {MAX_SECRET_LEN}",
                keys.secret.len()
            )));
        }
        if role == Role::Member
            && self
                .tombstones
                .contains_key(&(cluster.to_string(), member.id.clone()))
        {
            return Err(RegistryError::Removed {
                cluster: cluster.to_string(),
                id: member.id,
            });
        }
        self.admit(cluster)?;
        let limits = &self.config.limits;
        let encoded = match role {
            Role::Member => snapshot_share(&member),
            Role::Client => 0,
        };
        if encoded > limits.max_member_bytes {
            return Err(RegistryError::Invalid(format!(
                "the member description is {encoded} bytes encoded, the limit is {}",
                limits.max_member_bytes
            )));
        }
        let registered = self
            .clusters
            .get(cluster)
            .is_some_and(|c| c.registrations.contains_key(&member.id));
        if keys.update_only && !registered {
            return Err(RegistryError::NotFound(format!(
                "{} is not registered in cluster {cluster:?} (expired, or the registry restarted): join under a new id",
                member.id
            )));
        }
        if !registered && self.registrations >= limits.max_registrations {
            return Err(RegistryError::Exhausted {
                limit: "max_registrations",
                message: format!(
                    "the registry holds {} registrations, its limit",
                    self.registrations
                ),
            });
        }
        let expires_at = now + self.config.ttl;
        let epoch = self.epoch;
        let c = self
            .clusters
            .entry(cluster.to_string())
            .or_insert_with(|| Cluster {
                topology: Arc::new(ClusterTopology::empty(cluster).with_epoch(epoch)),
                registrations: BTreeMap::new(),
                tokens: BTreeMap::new(),
                by_address: BTreeMap::new(),
                members: 0,
                clients: 0,
                snapshot_bytes: 0,
            });
        let previous = c.registrations.get(&member.id);
        if let Some(prev) = previous {
            let same_incarnation = !prev.secret.is_empty()
                && constant_time_eq(prev.secret.as_bytes(), keys.secret.as_bytes());
            if !same_incarnation {
                return Err(RegistryError::AlreadyRegistered {
                    cluster: cluster.to_string(),
                    id: member.id,
                });
            }
            if prev.role != role {
                return Err(RegistryError::Invalid(format!(
                    "{} is already registered as a {:?}",
                    member.id, prev.role
                )));
            }
        } else {
            let (count, max, what, limit) = match role {
                Role::Member => (
                    c.members,
                    limits.max_members_per_cluster,
                    "members",
                    "max_members_per_cluster",
                ),
                Role::Client => (
                    c.clients,
                    limits.max_clients_per_cluster,
                    "clients",
                    "max_clients_per_cluster",
                ),
            };
            if count >= max {
                return Err(RegistryError::Exhausted {
                    limit,
                    message: format!("cluster {cluster:?} has {count} {what}, its limit"),
                });
            }
        }
        if role == Role::Member {
            // The snapshot after this join: this member's old description and an older
            // incarnation at its address (superseded) drop out.
            let replaced = previous.map_or(0, |p| p.encoded)
                + c.by_address
                    .get(&member.address)
                    .filter(|id| **id != member.id)
                    .and_then(|id| c.registrations.get(id))
                    .map_or(0, |r| r.encoded);
            let after = c.snapshot_bytes - replaced + encoded;
            if after > limits.max_snapshot_bytes {
                return Err(RegistryError::Exhausted {
                    limit: "max_snapshot_bytes",
                    message: format!(
                        "cluster {cluster:?} would encode to {after} bytes with this member, over its snapshot limit of {}",
                        limits.max_snapshot_bytes
                    ),
                });
            }
        }
        let described_before = previous.map(|p| p.member.clone());
        let mut added = 0usize;
        if let Some(old) = c.registrations.remove(&member.id) {
            c.tokens.remove(&old.token);
            c.snapshot_bytes -= old.encoded;
            if old.role == Role::Member {
                c.by_address.remove(&old.member.address);
            }
        } else {
            added += 1;
            match role {
                Role::Member => c.members += 1,
                Role::Client => c.clients += 1,
            }
        }
        // An older incarnation at the same address is superseded by this one.
        let mut superseded = Vec::new();
        if role == Role::Member {
            if let Some(old_id) = c.by_address.get(&member.address).cloned() {
                let old = c
                    .registrations
                    .remove(&old_id)
                    .expect("address index matches registrations");
                c.tokens.remove(&old.token);
                c.members -= 1;
                c.snapshot_bytes -= old.encoded;
                superseded.push(Member::clone(&old.member));
            }
            c.by_address
                .insert(member.address.clone(), member.id.clone());
        }
        c.tokens.insert(keys.token.clone(), member.id.clone());
        c.registrations.insert(
            member.id.clone(),
            Registration {
                member: Arc::new(member.clone()),
                role,
                token: keys.token.clone(),
                secret: keys.secret,
                expires_at,
                encoded,
            },
        );
        c.snapshot_bytes += encoded;
        self.registrations = self.registrations + added - superseded.len();
        for old in &superseded {
            self.bury(cluster, &old.id, now);
        }
        let change = match (role, described_before) {
            (Role::Client, _) => None,
            (Role::Member, Some(before)) if *before == member && superseded.is_empty() => None,
            (Role::Member, Some(before)) if *before == member => {
                Some((Vec::new(), Vec::new(), superseded))
            }
            (Role::Member, Some(_)) => Some((Vec::new(), vec![member], superseded)),
            (Role::Member, None) => Some((vec![member], Vec::new(), superseded)),
        };
        let change = change
            .map(|(joined, changed, left)| self.publish(cluster, joined, changed, left, false));
        let version = self.clusters[cluster].topology.version();
        self.check_invariants();
        Ok((
            Joined {
                token: keys.token,
                version,
            },
            change,
        ))
    }

    /// Refreshes the registration holding `token`; returns the cluster's topology version.
    pub fn heartbeat(
        &mut self,
        cluster: &str,
        token: &str,
        now: Instant,
    ) -> Result<u64, RegistryError> {
        let ttl = self.config.ttl;
        let c = self.registration_cluster(cluster, token)?;
        let id = c.tokens[token].clone();
        let reg = c
            .registrations
            .get_mut(&id)
            .expect("token index matches registrations");
        if !sim::flaw("heartbeat-no-renew") {
            reg.expires_at = now
                + if sim::flaw("short-lease") {
                    ttl / 2
                } else {
                    ttl
                };
        }
        // Only `expires_at` changed, which no invariant covers: no check on this hot path.
        Ok(c.topology.version())
    }

    /// Publishes the member holding `token` as changed, unchanged: a new version that every
    /// watcher is sent. Nothing in the registry calls this but the simulator's planted
    /// `heartbeat-publishes` flaw (a renewal published as a change), which the load budget
    /// must catch.
    #[doc(hidden)]
    pub fn republish(&mut self, cluster: &str, token: &str) -> Option<Change> {
        let c = self.registration_cluster(cluster, token).ok()?;
        let id = c.tokens[token].clone();
        let reg = c.registrations.get(&id)?;
        if reg.role != Role::Member {
            return None;
        }
        let member = Member::clone(&reg.member);
        let change = self.publish(cluster, Vec::new(), vec![member], Vec::new(), false);
        self.check_invariants();
        Some(change)
    }

    /// Removes the registration holding `token` at `now`.
    pub fn leave(
        &mut self,
        cluster: &str,
        token: &str,
        now: Instant,
    ) -> Result<Option<Change>, RegistryError> {
        let c = self.registration_cluster(cluster, token)?;
        let id = c.tokens.remove(token).expect("checked");
        let reg = c
            .registrations
            .remove(&id)
            .expect("token index matches registrations");
        c.snapshot_bytes -= reg.encoded;
        let change = match reg.role {
            Role::Client => {
                c.clients -= 1;
                None
            }
            Role::Member => {
                c.members -= 1;
                c.by_address.remove(&reg.member.address);
                self.bury(cluster, &id, now);
                (!sim::flaw("leave-no-publish")).then(|| {
                    self.publish(
                        cluster,
                        Vec::new(),
                        Vec::new(),
                        vec![Member::clone(&reg.member)],
                        false,
                    )
                })
            }
        };
        self.registrations -= 1;
        self.drop_if_empty(cluster);
        self.check_invariants();
        Ok(change)
    }

    /// Removes every registration whose TTL ran out by `now`; returns one change per cluster
    /// that lost members, in cluster-name order.
    pub fn sweep(&mut self, now: Instant) -> Vec<Change> {
        let mut changes = Vec::new();
        let never_expire = sim::flaw("never-expire");
        let names: Vec<String> = self.clusters.keys().cloned().collect();
        for name in names {
            let c = self.clusters.get_mut(&name).expect("listed");
            let expired: Vec<MemberId> = c
                .registrations
                .iter()
                .filter(|(_, r)| r.expires_at <= now && !never_expire)
                .map(|(id, _)| id.clone())
                .collect();
            let mut left = Vec::new();
            let mut removed = 0;
            for id in expired {
                let reg = c.registrations.remove(&id).expect("listed");
                c.tokens.remove(&reg.token);
                c.snapshot_bytes -= reg.encoded;
                removed += 1;
                match reg.role {
                    Role::Member => {
                        c.members -= 1;
                        c.by_address.remove(&reg.member.address);
                        left.push(Member::clone(&reg.member));
                    }
                    Role::Client => c.clients -= 1,
                }
            }
            self.registrations -= removed;
            if !sim::flaw("expiry-not-buried") {
                for m in &left {
                    self.bury(&name, &m.id, now);
                }
            }
            if !left.is_empty() {
                changes.push(self.publish(&name, Vec::new(), Vec::new(), left, true));
            }
            self.drop_if_empty(&name);
        }
        self.prune_tombstones(now);
        self.check_invariants();
        changes
    }

    /// Pushes every registration's expiry `by` later: after the registry itself stalled (a VM
    /// pause, a long GC), members could not renew for that long through no fault of theirs,
    /// so the stall does not count against their TTL (as etcd extends leases after a leader
    /// change).
    pub fn extend_leases(&mut self, by: Duration) {
        if sim::flaw("stall-not-extended") {
            return;
        }
        for c in self.clusters.values_mut() {
            for r in c.registrations.values_mut() {
                r.expires_at += by;
            }
        }
    }

    /// The cluster's current topology (empty at version 0 when nobody is registered).
    pub fn topology(&self, cluster: &str) -> Arc<ClusterTopology> {
        match self.clusters.get(cluster) {
            Some(c) => c.topology.clone(),
            None => Arc::new(ClusterTopology::empty(cluster).with_epoch(self.epoch)),
        }
    }

    /// Looks a member up.
    pub fn resolve(&self, cluster: &str, id: &str) -> Result<(Member, u64), RegistryError> {
        let id = MemberId::parse(id)?;
        let c = self
            .clusters
            .get(cluster)
            .ok_or_else(|| RegistryError::NotFound(format!("unknown cluster {cluster:?}")))?;
        let member = c.topology.member(&id).ok_or_else(|| {
            RegistryError::NotFound(format!("no member {id} in cluster {cluster:?}"))
        })?;
        Ok((member.clone(), c.topology.version()))
    }

    /// (members, clients) per cluster, in name order.
    pub fn counts(&self) -> Vec<(String, usize, usize)> {
        self.clusters
            .iter()
            .map(|(n, c)| (n.clone(), c.members, c.clients))
            .collect()
    }

    fn registration_cluster(
        &mut self,
        cluster: &str,
        token: &str,
    ) -> Result<&mut Cluster, RegistryError> {
        check_text(
            "cluster name",
            cluster,
            self.config.limits.max_cluster_name_len,
        )?;
        match self.clusters.get_mut(cluster) {
            Some(c) if c.tokens.contains_key(token) => Ok(c),
            _ => Err(RegistryError::UnknownRegistration(cluster.to_string())),
        }
    }

    /// Checks that the bookkeeping agrees with itself, after every mutation, in debug builds
    /// and in every simulated run (release campaigns included); free in production.
    ///
    /// Per cluster: the token index and the registrations are one-to-one; the member and client
    /// counts match the roles; the topology lists exactly the member registrations, each with the
    /// description registered, at a version no higher than the registry's counter; no cluster is
    /// empty.
    fn check_invariants(&self) {
        if !sim::self_checks() {
            return;
        }
        assert_eq!(
            self.registrations,
            self.clusters
                .values()
                .map(|c| c.registrations.len())
                .sum::<usize>(),
            "registration count"
        );
        assert_eq!(
            self.watchers,
            self.watched.values().sum::<usize>(),
            "watcher count"
        );
        assert!(
            self.watched.values().all(|n| *n > 0),
            "idle watch entry kept"
        );
        for (name, c) in &self.clusters {
            assert!(!c.registrations.is_empty(), "empty cluster {name:?} kept");
            assert_eq!(
                c.snapshot_bytes,
                c.registrations.values().map(|r| r.encoded).sum::<usize>(),
                "cluster {name:?}: snapshot size"
            );
            assert_eq!(
                c.tokens.len(),
                c.registrations.len(),
                "cluster {name:?}: token index and registrations differ in size"
            );
            for (token, id) in &c.tokens {
                let reg = c.registrations.get(id);
                assert!(
                    reg.is_some_and(|r| &r.token == token),
                    "cluster {name:?}: token of {id} does not lead back to its registration"
                );
            }
            let members = c
                .registrations
                .values()
                .filter(|r| r.role == Role::Member)
                .count();
            assert_eq!(
                (c.members, c.clients),
                (members, c.registrations.len() - members),
                "cluster {name:?}: member/client counts"
            );
            assert!(
                c.topology.version() <= self.version,
                "cluster {name:?}: topology version {} above the counter {}",
                c.topology.version(),
                self.version
            );
            assert_eq!(
                c.by_address.len(),
                members,
                "cluster {name:?}: address index and member registrations differ in size"
            );
            for (address, id) in &c.by_address {
                assert!(
                    c.registrations
                        .get(id)
                        .is_some_and(|r| r.role == Role::Member && &r.member.address == address),
                    "cluster {name:?}: address {address} does not lead back to member {id}"
                );
            }
            let listed = c.topology.members();
            assert_eq!(
                listed.len(),
                members,
                "cluster {name:?}: topology lists {} members, {members} registered",
                listed.len()
            );
            for m in listed {
                let reg = c.registrations.get(&m.id);
                assert!(
                    reg.is_some_and(|r| r.role == Role::Member && *r.member == **m),
                    "cluster {name:?}: topology v{} lists {} as it is not registered",
                    c.topology.version(),
                    m.id
                );
            }
        }
    }

    fn drop_if_empty(&mut self, cluster: &str) {
        if self
            .clusters
            .get(cluster)
            .is_some_and(|c| c.registrations.is_empty())
        {
            self.clusters.remove(cluster);
        }
    }

    fn publish(
        &mut self,
        cluster: &str,
        joined: Vec<Member>,
        changed: Vec<Member>,
        left: Vec<Member>,
        expired: bool,
    ) -> Change {
        self.version += 1;
        let version = self.version;
        let c = self
            .clusters
            .get_mut(cluster)
            .expect("publishing for a known cluster");
        let previous_version = c.topology.version();
        // Patch the previous version instead of rebuilding it from every registration: a join
        // into a large cluster costs a copy of the member pointers, not a sort.
        let patched_changes: &[Member] = if sim::flaw("changed-not-patched") {
            &[]
        } else {
            &changed
        };
        let upserts: Vec<Arc<Member>> = joined
            .iter()
            .chain(patched_changes)
            .map(|m| c.registrations[&m.id].member.clone())
            .collect();
        let gone: Vec<&MemberId> = left.iter().map(|m| &m.id).collect();
        // In place when no watcher still holds the previous version; a copy otherwise.
        Arc::make_mut(&mut c.topology).patch(version, &gone, &upserts);
        let topology = c.topology.clone();
        Change {
            topology,
            previous_version,
            joined,
            changed,
            left,
            expired,
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::cluster::MemberLimits;

    fn state() -> RegistryState {
        let mut config = RegistryConfig::default();
        config.limits.max_members_per_cluster = 3;
        config
            .cluster_tokens
            .insert("secret".into(), "s3cr3t".into());
        RegistryState::new(Arc::new(config), 1_000, 7)
    }

    fn m(id: &str) -> Member {
        Member::new(MemberId::parse(id).unwrap(), format!("{id}:1"), ["k"])
    }

    fn now() -> Instant {
        // Test-only: the state machine takes time as an argument; any starting point will do
        // (under madsim this is simulated time anyway).
        Instant::now()
    }

    #[tokio::test]
    async fn a_registry_at_its_cluster_limit_still_serves_the_clusters_it_holds() {
        let mut config = RegistryConfig::default();
        config.limits.max_clusters = 1;
        let mut s = RegistryState::new(Arc::new(config), 0, 7);
        assert_eq!(s.config().limits.max_clusters, 1);
        let t0 = now();
        s.join("c", "", m("a"), Role::Member, "ta".into(), t0)
            .unwrap();
        assert!(matches!(
            s.join("d", "", m("b"), Role::Member, "tb".into(), t0),
            Err(RegistryError::Exhausted { .. })
        ));
        s.join("c", "", m("b"), Role::Member, "tb".into(), t0)
            .unwrap();
        assert_eq!(s.counts(), vec![("c".to_string(), 2, 0)]);
    }

    #[tokio::test]
    async fn clients_are_counted_apart_and_uncounted_when_they_leave() {
        let mut s = state();
        assert_eq!(s.config().limits.max_members_per_cluster, 3);
        let t0 = now();
        s.join("c", "", m("a"), Role::Member, "ta".into(), t0)
            .unwrap();
        let (_, change) = s
            .join("c", "", m("w"), Role::Client, "tw".into(), t0)
            .unwrap();
        assert!(change.is_none(), "a client changes no topology");
        assert_eq!(s.counts(), vec![("c".to_string(), 1, 1)]);
        assert!(s.leave("c", "tw", now()).unwrap().is_none());
        assert_eq!(s.counts(), vec![("c".to_string(), 1, 0)]);
        assert_eq!(s.topology("c").len(), 1);
    }

    #[tokio::test]
    async fn join_heartbeat_leave_and_versions() {
        let mut s = state();
        let t0 = now();
        let (j, change) = s
            .join("c", "", m("a"), Role::Member, "ta".into(), t0)
            .unwrap();
        let change = change.unwrap();
        assert_eq!(j.version, 1_001);
        assert_eq!(
            (change.previous_version, change.topology.version()),
            (0, 1_001)
        );
        assert_eq!(change.joined, vec![m("a")]);
        let (_, change) = s
            .join("c", "", m("b"), Role::Member, "tb".into(), t0)
            .unwrap();
        assert_eq!(change.unwrap().previous_version, 1_001);
        assert_eq!(s.heartbeat("c", "ta", t0).unwrap(), 1_002);
        // b's token cannot remove a.
        let change = s.leave("c", "tb", t0).unwrap().unwrap();
        assert_eq!(change.left, vec![m("b")]);
        assert_eq!(
            s.topology("c")
                .member_ids()
                .map(|i| i.as_str())
                .collect::<Vec<_>>(),
            ["a"]
        );
        assert!(matches!(
            s.leave("c", "tb", t0),
            Err(RegistryError::UnknownRegistration(_))
        ));
        assert!(matches!(
            s.heartbeat("c", "nope", t0),
            Err(RegistryError::UnknownRegistration(_))
        ));
    }

    fn keys(token: &str, secret: &str) -> JoinKeys {
        JoinKeys {
            token: token.into(),
            secret: secret.into(),
            update_only: false,
        }
    }

    #[tokio::test]
    async fn a_retried_join_with_the_secret_replaces_the_token_and_publishes_only_real_changes() {
        let mut s = state();
        let t0 = now();
        s.join("c", "", m("a"), Role::Member, keys("t1", "s"), t0)
            .unwrap();
        let (j, change) = s
            .join("c", "", m("a"), Role::Member, keys("t2", "s"), t0)
            .unwrap();
        assert!(change.is_none(), "same description: nothing to broadcast");
        assert_eq!(j.version, 1_001);
        assert!(s.heartbeat("c", "t1", t0).is_err(), "the old token is void");
        assert!(s.heartbeat("c", "t2", t0).is_ok());
        let moved = m("a").with_zone("z");
        let (_, change) = s
            .join("c", "", moved.clone(), Role::Member, keys("t3", "s"), t0)
            .unwrap();
        assert_eq!(change.unwrap().changed, vec![moved]);
        assert_eq!(s.counts(), vec![("c".to_string(), 1, 0)]);
    }

    /// Every limit admits exactly its value, and the gauges' sources count what is held.
    #[tokio::test]
    async fn limits_admit_exactly_their_value_and_the_counts_are_right() {
        let t0 = now();
        let (a, b, c) = (m("a"), m("b"), m("c"));
        let mut config = RegistryConfig::default();
        config.limits.max_member_bytes = snapshot_share(&a);
        config.limits.max_snapshot_bytes = snapshot_share(&a) + snapshot_share(&b);
        let mut s = RegistryState::new(Arc::new(config), 1_000, 7);
        assert_eq!(s.epoch(), 7);
        assert_eq!((s.registrations(), s.cluster_count()), (0, 0));
        let secret = "s".repeat(MAX_SECRET_LEN);
        s.join("c", "", a, Role::Member, keys("ta", &secret), t0)
            .unwrap();
        let err = s
            .join(
                "c",
                "",
                m("x"),
                Role::Member,
                keys("tx", &format!("{secret}s")),
                t0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("incarnation_secret"), "{err}");
        let mut fat = m("f");
        fat.metadata.insert("k".into(), "v".into());
        let err = s
            .join("c", "", fat, Role::Member, keys("tf", ""), t0)
            .unwrap_err();
        assert!(err.to_string().contains("bytes encoded"), "{err}");
        s.join("c", "", b, Role::Member, keys("tb", ""), t0)
            .unwrap();
        let err = s
            .join("c", "", c, Role::Member, keys("tc", ""), t0)
            .unwrap_err();
        assert!(err.to_string().contains("snapshot limit"), "{err}");
        s.join("d", "", m("cl"), Role::Client, keys("tcl", ""), t0)
            .unwrap();
        assert_eq!((s.registrations(), s.cluster_count()), (3, 2));
    }

    #[tokio::test]
    async fn an_update_only_join_changes_a_held_registration_and_never_registers_an_id() {
        let mut s = state();
        let t0 = now();
        let update = |token: &str| JoinKeys {
            update_only: true,
            ..keys(token, "s")
        };
        // Not held (never joined, or lost with a registry restart): NotFound, nothing added.
        let err = s
            .join("c", "", m("a"), Role::Member, update("t0"), t0)
            .unwrap_err();
        assert!(matches!(err, RegistryError::NotFound(_)), "{err}");
        assert!(err.to_string().contains("new id"), "{err}");
        assert!(s.topology("c").is_empty());
        s.join("c", "", m("a"), Role::Member, keys("t1", "s"), t0)
            .unwrap();
        let drained = m("a").with_zone("z2");
        let (_, change) = s
            .join("c", "", drained.clone(), Role::Member, update("t2"), t0)
            .unwrap();
        assert_eq!(change.unwrap().changed, vec![drained]);
        // Someone else's secret is still refused.
        let err = s
            .join(
                "c",
                "",
                m("a"),
                Role::Member,
                JoinKeys {
                    secret: "x".into(),
                    ..update("t3")
                },
                t0,
            )
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::AlreadyRegistered { .. }),
            "{err}"
        );
        // Expired: removed, and an update cannot bring it back either.
        s.sweep(t0 + Duration::from_secs(60));
        let err = s
            .join(
                "c",
                "",
                m("a"),
                Role::Member,
                update("t4"),
                t0 + Duration::from_secs(60),
            )
            .unwrap_err();
        assert!(matches!(err, RegistryError::Removed { .. }), "{err}");
    }

    #[tokio::test]
    async fn nobody_takes_over_a_registered_id() {
        let mut s = state();
        let t0 = now();
        s.join("c", "", m("a"), Role::Member, keys("ta", "mine"), t0)
            .unwrap();
        s.join("c", "", m("b"), Role::Member, keys("tb", ""), t0)
            .unwrap();
        let mut hijack = m("a");
        hijack.address = "evil:1".into();
        for (id, secret) in [("a", "guess"), ("a", ""), ("b", ""), ("b", "x")] {
            let mut who = hijack.clone();
            who.id = MemberId::parse(id).unwrap();
            let err = s
                .join("c", "", who, Role::Member, keys("stolen", secret), t0)
                .unwrap_err();
            assert!(
                matches!(err, RegistryError::AlreadyRegistered { .. }),
                "{err}"
            );
            assert!(err.to_string().contains(id), "{err}");
        }
        // The victims are untouched: same address, tokens still valid.
        assert_eq!(s.resolve("c", "a").unwrap().0, m("a"));
        assert!(s.heartbeat("c", "ta", t0).is_ok() && s.heartbeat("c", "tb", t0).is_ok());
        assert!(s.leave("c", "stolen", t0).is_err());
    }

    #[tokio::test]
    async fn a_new_incarnation_at_an_address_supersedes_the_old_one_in_one_change() {
        let mut s = state();
        let t0 = now();
        s.join("c", "", m("old"), Role::Member, keys("to", "1"), t0)
            .unwrap();
        s.join("c", "", m("other"), Role::Member, keys("tx", "2"), t0)
            .unwrap();
        let mut new = m("new");
        new.address = m("old").address;
        let (_, change) = s
            .join("c", "", new.clone(), Role::Member, keys("tn", "3"), t0)
            .unwrap();
        let change = change.unwrap();
        assert_eq!(
            (change.joined.clone(), change.left.clone()),
            (vec![new], vec![m("old")])
        );
        assert!(!change.expired);
        assert_eq!(
            change
                .topology
                .member_ids()
                .map(|i| i.as_str())
                .collect::<Vec<_>>(),
            ["new", "other"]
        );
        assert!(
            s.heartbeat("c", "to", t0).is_err(),
            "the old registration is gone"
        );
        // And it cannot come back.
        assert!(matches!(
            s.join("c", "", m("old"), Role::Member, keys("to2", "1"), t0),
            Err(RegistryError::Removed { .. })
        ));
        assert_eq!(s.counts(), vec![("c".to_string(), 2, 0)]);
    }

    #[tokio::test]
    async fn silent_members_and_clients_expire_after_the_ttl() {
        let mut s = state();
        let t0 = now();
        s.join("c", "", m("a"), Role::Member, "ta".into(), t0)
            .unwrap();
        s.join("c", "", m("b"), Role::Member, "tb".into(), t0)
            .unwrap();
        s.join("c", "", m("cl"), Role::Client, "tc".into(), t0)
            .unwrap();
        let ttl = s.config().ttl;
        assert!(s.sweep(t0 + ttl - Duration::from_millis(1)).is_empty());
        s.heartbeat("c", "ta", t0 + Duration::from_secs(1)).unwrap();
        let changes = s.sweep(t0 + ttl);
        assert_eq!(changes.len(), 1);
        assert!(changes[0].expired);
        assert_eq!(changes[0].left, vec![m("b")]);
        assert_eq!(
            s.counts(),
            vec![("c".to_string(), 1, 0)],
            "the client expired too"
        );
        assert!(matches!(
            s.heartbeat("c", "tb", t0 + ttl),
            Err(RegistryError::UnknownRegistration(_))
        ));
        let changes = s.sweep(t0 + ttl + Duration::from_secs(1));
        assert_eq!(changes[0].topology.len(), 0);
        assert!(s.counts().is_empty(), "an empty cluster is dropped");
    }

    #[tokio::test]
    async fn clients_are_not_in_the_topology() {
        let mut s = state();
        let (j, change) = s
            .join("c", "", m("cl"), Role::Client, "tc".into(), now())
            .unwrap();
        assert!(change.is_none());
        assert_eq!(j.version, 0);
        assert!(s.topology("c").is_empty());
        assert!(
            s.join("c", "", m("cl"), Role::Member, "x".into(), now())
                .is_err()
        );
    }

    #[tokio::test]
    async fn bad_input_and_limits() {
        let mut s = state();
        let t = now();
        let err = s
            .join("", "", m("a"), Role::Member, "t".into(), t)
            .unwrap_err();
        assert!(
            matches!(err, RegistryError::Invalid(ref msg) if msg.contains("cluster name")),
            "{err}"
        );
        let long = "x".repeat(200);
        assert!(matches!(
            s.join(&long, "", m("a"), Role::Member, "t".into(), t),
            Err(RegistryError::Invalid(_))
        ));
        let mut many = m("a");
        many.kinds = (0..=MemberLimits::default().max_kinds)
            .map(|i| format!("k{i}"))
            .collect();
        let err = s
            .join("c", "", many, Role::Member, "t".into(), t)
            .unwrap_err();
        assert!(err.to_string().contains("kinds"), "{err}");
        assert!(matches!(
            s.join("secret", "wrong", m("a"), Role::Member, "t".into(), t),
            Err(RegistryError::Unauthenticated(_))
        ));
        assert!(
            s.join("secret", "s3cr3t", m("a"), Role::Member, "t1".into(), t)
                .is_ok()
        );
        for id in ["b", "c", "d"] {
            s.join("c", "", m(id), Role::Member, format!("t{id}").into(), t)
                .unwrap();
        }
        assert!(matches!(
            s.join("c", "", m("e"), Role::Member, "te".into(), t),
            Err(RegistryError::Exhausted { .. })
        ));
        assert!(matches!(
            s.resolve("c", "zz"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            s.resolve("nope", "b"),
            Err(RegistryError::NotFound(_))
        ));
        assert!(matches!(
            s.resolve("c", "BAD ID"),
            Err(RegistryError::Invalid(_))
        ));
        assert_eq!(s.resolve("c", "b").unwrap().0, m("b"));
        assert_eq!(s.topology("c").len(), 3, "rejections changed nothing");
    }

    #[tokio::test]
    async fn a_removed_member_cannot_come_back_under_its_id() {
        let mut s = state();
        let t0 = now();
        s.join("c", "", m("a"), Role::Member, "ta".into(), t0)
            .unwrap();
        s.join("c", "", m("b"), Role::Member, "tb".into(), t0)
            .unwrap();
        s.leave("c", "ta", t0).unwrap();
        let ttl = s.config().ttl;
        s.heartbeat("c", "tb", t0 + ttl / 2).unwrap();
        assert_eq!(s.sweep(t0 + ttl).len(), 0);
        assert_eq!(s.sweep(t0 + ttl * 2).len(), 1, "b expired");
        for id in ["a", "b"] {
            // A late or repeated join of a removed id is refused, whatever the token.
            let err = s
                .join("c", "", m(id), Role::Member, "late".into(), t0 + ttl * 2)
                .unwrap_err();
            assert!(matches!(err, RegistryError::Removed { .. }), "{err}");
            assert!(err.to_string().contains("new incarnation"), "{err}");
        }
        // Clients are not in the topology: nothing to protect.
        s.join("c", "", m("x"), Role::Client, "tx".into(), t0)
            .unwrap();
        s.leave("c", "tx", t0).unwrap();
        assert!(
            s.join("c", "", m("x"), Role::Client, "tx2".into(), t0)
                .is_ok()
        );
        // Forgotten after ten TTLs.
        let later = t0 + ttl * (TOMBSTONE_TTLS + 3);
        s.sweep(later);
        assert!(
            s.join("c", "", m("a"), Role::Member, "again".into(), later)
                .is_ok()
        );
    }

    #[tokio::test]
    async fn tombstones_are_bounded_oldest_first() {
        let mut config = RegistryConfig::default();
        config.limits.max_tombstones = 2;
        let mut s = RegistryState::new(Arc::new(config), 0, 7);
        let t0 = now();
        for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
            let at = t0 + Duration::from_millis(i as u64);
            s.join("c", "", m(id), Role::Member, format!("t{id}").into(), at)
                .unwrap();
            s.leave("c", &format!("t{id}"), at).unwrap();
        }
        assert!(
            s.join("c", "", m("a"), Role::Member, "ta2".into(), t0)
                .is_ok(),
            "forgotten"
        );
        for id in ["b", "c"] {
            assert!(
                s.join("c", "", m(id), Role::Member, "x".into(), t0)
                    .is_err()
            );
        }
    }

    fn limit_of(e: RegistryError) -> &'static str {
        match e {
            RegistryError::Exhausted { limit, .. } => limit,
            other => panic!("expected a limit, got {other}"),
        }
    }

    #[tokio::test]
    async fn named_clusters_are_exempt_from_the_cluster_cap_and_watches_count() {
        let mut config = RegistryConfig::default();
        config.limits.max_clusters = 1;
        config.clusters.insert("named".into());
        let mut s = RegistryState::new(Arc::new(config), 0, 7);
        let t0 = now();
        // A watcher of an unknown cluster takes a cluster slot (it holds a feed).
        s.watch_opened("squat", "").unwrap();
        assert_eq!(s.cluster_count(), 1);
        let err = s
            .join("other", "", m("a"), Role::Member, "ta".into(), t0)
            .unwrap_err();
        assert_eq!(limit_of(err), "max_clusters");
        assert_eq!(
            limit_of(s.watch_opened("other", "").unwrap_err()),
            "max_clusters"
        );
        // The operator's cluster is always admitted.
        s.join("named", "", m("a"), Role::Member, "ta".into(), t0)
            .unwrap();
        s.watch_opened("named", "").unwrap();
        // The squatter leaves: its slot frees.
        assert_eq!(s.watch_closed("squat"), 0);
        s.watch_opened("other", "").unwrap();
        assert_eq!(s.watchers(), 2);
    }

    #[tokio::test]
    async fn only_named_clusters_refuses_the_rest_by_name() {
        let mut config = RegistryConfig {
            only_named_clusters: true,
            ..RegistryConfig::default()
        };
        config.cluster_tokens.insert("secure".into(), "t".into());
        let mut s = RegistryState::new(Arc::new(config), 0, 7);
        let err = s
            .join("elsewhere", "", m("a"), Role::Member, "ta".into(), now())
            .unwrap_err();
        assert!(matches!(err, RegistryError::NotFound(ref msg) if msg.contains("elsewhere")));
        assert!(s.watch_opened("elsewhere", "").is_err());
        assert!(s.watch_opened("secure", "t").is_ok());
    }

    #[tokio::test]
    async fn global_registration_and_watcher_caps() {
        let mut config = RegistryConfig::default();
        config.limits.max_registrations = 2;
        config.limits.max_watchers = 1;
        let mut s = RegistryState::new(Arc::new(config), 0, 7);
        let t0 = now();
        s.join("c1", "", m("a"), Role::Member, "ta".into(), t0)
            .unwrap();
        s.join("c2", "", m("b"), Role::Client, "tb".into(), t0)
            .unwrap();
        let err = s
            .join("c3", "", m("c"), Role::Member, "tc".into(), t0)
            .unwrap_err();
        assert_eq!(limit_of(err), "max_registrations");
        // A retried join of a registered id is not a new registration.
        s.join("c1", "", m("a"), Role::Member, keys("ta2", ""), t0)
            .unwrap_err(); // (refused for the secret, not the cap)
        s.leave("c2", "tb", t0).unwrap();
        s.join("c3", "", m("c"), Role::Member, "tc".into(), t0)
            .unwrap();
        s.watch_opened("c1", "").unwrap();
        assert_eq!(
            limit_of(s.watch_opened("c3", "").unwrap_err()),
            "max_watchers"
        );
    }

    #[tokio::test]
    async fn member_and_snapshot_sizes_are_capped() {
        let mut config = RegistryConfig::default();
        config.limits.max_member_bytes = 200;
        config.limits.max_snapshot_bytes = 300;
        let mut s = RegistryState::new(Arc::new(config), 0, 7);
        let t0 = now();
        let mut big = m("a");
        big.metadata.insert("blob".into(), "x".repeat(300));
        let err = s
            .join("c", "", big, Role::Member, "ta".into(), t0)
            .unwrap_err();
        assert!(err.to_string().contains("bytes encoded"), "{err}");
        let mut fat = m("a");
        fat.metadata.insert("blob".into(), "x".repeat(120));
        s.join("c", "", fat.clone(), Role::Member, keys("ta", "s"), t0)
            .unwrap();
        let mut fat_b = fat.clone();
        fat_b.id = MemberId::parse("b").unwrap();
        fat_b.address = "b:1".into();
        s.join("c", "", fat_b.clone(), Role::Member, keys("tb", "s"), t0)
            .unwrap();
        let mut fat_c = fat_b.clone();
        fat_c.id = MemberId::parse("c").unwrap();
        fat_c.address = "c:1".into();
        let err = s
            .join("c", "", fat_c, Role::Member, keys("tc", "s"), t0)
            .unwrap_err();
        assert_eq!(limit_of(err), "max_snapshot_bytes");
        let err = s
            .join(
                "c",
                "",
                m("d"),
                Role::Member,
                keys("td", &"s".repeat(129)),
                t0,
            )
            .unwrap_err();
        assert!(err.to_string().contains("incarnation_secret"), "{err}");
        // Replacing a description counts the new one instead of the old one.
        assert!(
            s.join("c", "", m("a"), Role::Member, keys("ta2", "s"), t0)
                .is_ok()
        );
        let encoded = prost::Message::encoded_len(&super::super::wire::pb_list(&s.topology("c")));
        assert_eq!(
            s.snapshot_bytes("c"),
            encoded,
            "the tracked size is the real encoding"
        );
    }

    #[test]
    fn constant_time_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
