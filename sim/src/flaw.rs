//! Deliberately broken providers and registries, to prove every checker fires.
//!
//! Most flaws are one-line bugs planted in the real code (`shoal::runtime::sim::flaw`, compiled
//! out of the normal build): the kind of mistake a colleague could make, in the registry's state
//! machine, its server, the provider or the partition manager. A few wrap the real provider of
//! member `m0` instead: the wrapped provider feeds a private partition manager and event stream,
//! and a relay forwards what it learns to the node's real context — faithfully, or with the flaw.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use shoal::provider::{
    ClusterProvider, ClusterProviderContext, PartitionManagerHandle, ProviderError,
};
use shoal::runtime::TaskHandle;
use shoal::{
    ClusterEvent, ClusterTopology, Description, EventStream, MemberId, PartitionConfig,
    RebalanceReport,
};

/// A deliberate defect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Flaw {
    /// No defect.
    #[default]
    None,
    /// Planted in the activation host: a lost membership does not deactivate the actors (a
    /// cut-off member keeps serving what peers take over).
    ActorsKeptOnLost,
    /// Planted in the activation host: every topology change drains every active identity,
    /// not only the ones whose owner changed.
    DrainOnAnyChange,
    /// Planted in the activation host: a claim whose release round failed returns early and
    /// is never dropped, so the identity stays "being activated" for good.
    ClaimNotDropped,
    /// Planted in the activation host: a release request is answered as soon as the identity
    /// starts draining, not once it is deactivated.
    ReleaseBeforeDrained,
    /// Planted in the activation state machine: at the drain deadline an identity is
    /// deactivated with its calls still running (they are forgotten, not cancelled).
    CallsOutliveDrain,
    /// Planted in the hand-off's choice: the first state any member kept is used, whatever its
    /// generation (an old copy can win over the newest state).
    HandoffAnyState,
    /// Planted in the claimant's hand-off round: an answer is read as the incarnation asked,
    /// not the one that answered (a process asked as its earlier incarnation answers with its
    /// current one's records: "nothing kept" then reads as "never activated", and a copy that
    /// incarnation superseded passes for the newest state).
    ReleaseAnswerAsAsked,
    /// Planted in the activation host: calls to one activation are not taken in turns (a kind
    /// that did not opt into concurrency gets concurrent calls).
    TurnsIgnored,
    /// `m0` re-publishes the previous topology after each new one (applies stale versions).
    StaleReplay,
    /// `m0` corrupts the address of one member in every topology it applies (same version,
    /// different placement).
    CorruptPlacement,
    /// `m0`'s watch silently stops delivering after 20 simulated seconds.
    FreezeWatch,
    /// Planted in the registry's sweep: expired registrations are never removed.
    NeverExpire,
    /// Planted in the registry's heartbeat: an accepted heartbeat does not extend the lease.
    HeartbeatNoRenew,
    /// Planted in the registry's heartbeat: the lease is extended by half the TTL.
    ShortLease,
    /// Planted in the registry server: expiries are not broadcast to watchers.
    SweepNoBroadcast,
    /// Planted in the registry's leave: the registration is removed but no change published.
    LeaveNoPublish,
    /// Planted in the provider's watch decoding: an update's `left` members are not removed.
    UpdateIgnoresLeft,
    /// Planted in the owner cache: remembered owners ignore members that joined.
    RebalanceIgnoresJoins,
    /// Planted in the owner cache: moved identities are not reported.
    RebalanceUnreported,
    /// Planted in the provider: a heartbeat answered "unknown registration" does not re-join.
    NoRejoin,
    /// Planted in the provider: a graceful shutdown does not send Leave.
    ShutdownSkipsLeave,
    /// Planted in the provider's watch decoding: a snapshot is compared by version alone, so
    /// one from a restarted registry (new epoch, lower versions) is ignored.
    SnapshotIgnoresEpoch,
    /// Planted in the provider's heartbeat: the lease counts from every attempt, not from the
    /// last accepted one, so a cut-off member never notices it lost its registration.
    LeaseRenewedOnAttempt,
    /// Planted in the registry's stall handling: leases are not extended after the registry
    /// itself stalled, so everyone expires when it wakes.
    StallNotExtended,
    /// Planted in the registry's sweep: expired ids are not remembered, so a join of one that
    /// arrives late (sent before the expiry, delayed by the network) brings it back.
    ExpiryNotBuried,
    /// Planted in the registry's publish: a member's new description goes out in the update
    /// but is not patched into the registry's own topology, so later snapshots list the old one.
    ChangedNotPatched,
    /// Planted in the provider's watch decoding: an update's `changed` members are not applied.
    UpdateIgnoresChanged,
    /// Planted in the registry's watch encoding: updates leave out `changed` members (the
    /// registry's own topology and its snapshots have them).
    UpdateOmitsChanged,
    /// Planted in the registry's publisher: an update that coalesces several changes leaves
    /// out the members that left.
    CoalescedDropsLeft,
    /// Planted in the Kubernetes provider's liveness: every gap between this member's own
    /// renewals counts as proven time, however long (client-go's rule), so a member that
    /// could not renew for a while expires everyone when it can again.
    K8sAgesWhileSilent,
    /// Planted in the Kubernetes provider's cleaner: expired Leases are deleted without the
    /// resource-version precondition, so one renewed in between is deleted anyway.
    K8sCleanWithoutPrecondition,
    /// Planted in the Kubernetes provider: a graceful shutdown does not delete the Lease.
    K8sShutdownKeepsLease,
    /// Planted in the Kubernetes provider's renewal: a member whose Lease was deleted
    /// recreates it under the same id, so peers see a removed member come back.
    K8sRecreateSameId,
    /// Planted in the watch state machine: a `410 Gone` does not relist (the watch retries the
    /// compacted version forever).
    K8s410NotRelisted,
    /// Planted in the Kubernetes provider's cleaner: a restarted process does not delete the
    /// Lease of its previous incarnation at the same address.
    K8sGhostKept,
    /// Planted in the Kubernetes provider's renewal: a create of the member's Lease whose
    /// answer never came is simply sent again, though it may have been applied and the Lease
    /// deleted since by a peer: the removed id comes back.
    K8sCreateInDoubtRepeated,
    /// Planted in the Kubernetes provider's shard watch (sharded heartbeats): a monitor
    /// watches every heartbeat of the cluster, not only its shard's (the label selector
    /// without the shard), so heartbeat events grow with N² again.
    K8sHeartbeatsUnsharded,
    /// Planted in the Kubernetes provider's liveness (sharded heartbeats): a monitor that
    /// stops monitoring a shard and takes it back soon after forgets the heartbeats' ages and
    /// ages them from first sight again, so a member that died meanwhile is removed up to a
    /// Lease duration late (monitors flap while members come and go).
    K8sParkedAgesDropped,
    /// Planted in the Kubernetes provider's renewal (sharded heartbeats, a cluster migrating):
    /// a member never touches its record while members that renew their own Lease are
    /// listed, so they find it expired a record duration after they first saw it and remove a
    /// live member.
    K8sRecordUntouched,
    /// Planted in the Kubernetes provider's choice of monitors (sharded heartbeats): zones are
    /// ignored, so all of a shard's monitors can be in one zone, and a zone cut off leaves the
    /// shard's dead members with nobody to remove them.
    K8sMonitorsIgnoreZones,
    /// Planted in the Kubernetes provider's shard watch (sharded heartbeats): a heartbeat
    /// deleted while its record stays (its remover died between the two deletions) ages the
    /// record from then like any record without a heartbeat, a whole Lease duration, instead
    /// of removing it after the cleaners' short delay.
    K8sOrphanRecordAged,
    /// Planted in the Kubernetes provider's record watch (sharded heartbeats, a cluster
    /// migrating): an unmarked record (a member that renews its own Lease) is not aged, so
    /// once no member of that setting is left, nobody removes one that died.
    K8sUnmarkedUnaged,
    /// Planted in the Kubernetes provider's choice of monitors (sharded heartbeats, a cluster
    /// migrating): members that renew their own Lease count as monitors, though they watch no
    /// heartbeats, so a shard whose monitors are such members has nobody to remove its dead.
    K8sUnmarkedMonitors,
    /// Planted in the Kubernetes provider's EndpointSlice watch: a slice change does not wake
    /// the reconciler (as another member's renewal does not), so a Pod that stopped serving
    /// stays listed until some Lease changes.
    K8sSliceChangeIgnored,
    /// Planted in the EndpointSlice merge: an endpoint that is terminating but still serving
    /// (a Pod in its preStop hook) counts as serving.
    K8sTerminatingServed,
    /// Planted in the Kubernetes provider's renewal: a failed renewal counts as one (the
    /// registry's `lease-renewed-on-attempt`), so a member cut off from the API server never
    /// announces that it lost its membership.
    K8sRenewedOnAttempt,
    /// Planted in the Kubernetes API errors: a 429's `Retry-After` is ignored, so a shed list,
    /// watch or renewal is sent again after the usual backoff (feeding the queue that shed it).
    K8sIgnoresRetryAfter,
    /// Planted in the Kubernetes provider's reflector: a 429's `Retry-After` holds back only
    /// the list or watch it answered, so the member's other watches of the resource (sharded
    /// heartbeats: one per monitored shard) go on reading the saturated API server.
    K8sRetryAfterPerWatch,
    /// Planted in the registry server's heartbeat: an accepted heartbeat is published as a
    /// change of the member, so every renewal reaches every watcher (quadratic fan-out).
    HeartbeatPublishes,
    /// Planted in the etcd view: a watch response at the revision the view holds counts as
    /// one from a store that went back, so every progress notification relists (a relist
    /// storm).
    EtcdProgressRelists,
    /// Planted in the event stream: a subscriber that fell behind skips what it missed
    /// without being told it lagged.
    LagUnreported,
    /// Planted in the registry client's watch decoding: an update is applied on top of
    /// whatever version is held, not only the one it names (a gap goes unnoticed).
    UpdateGapIgnored,
    /// Planted in the etcd provider: a restarted process does not delete the key of its
    /// previous incarnation at the same address.
    EtcdGhostKept,
    /// Planted in the etcd provider: a member whose key the store holds with another value
    /// than it wrote (a store restored from an older snapshot) leaves it as it is.
    EtcdStaleKeyKept,
    /// Planted in the etcd provider: the audit before a watch reopens compares only the count
    /// of keys, not the revision of the view's latest write.
    EtcdAuditCountOnly,
    /// Planted in the etcd endpoint policy (shared by the production client): a call refused
    /// for a stale auth token is not authenticated again, its refusal returned as it is.
    EtcdTokenNotRenewed,
    /// Planted in the etcd provider's audit: a view whose latest change is a delete is not
    /// asked about that key (a restore that brought it back passes when the count matches).
    EtcdAuditIgnoresDeletes,
    /// Planted in the etcd endpoint policy: a call abandoned by its caller (its deadline
    /// passed: a frozen etcd member) leaves the client on that endpoint.
    EtcdAbandonedCallStays,
    /// Planted in the etcd provider: after losing its lease a member writes its key again
    /// under the same id (the "renewed lease, key re-put" bug of other etcd providers, inverted).
    EtcdRejoinSameId,
    /// Planted in the etcd provider's watch: a compacted revision is retried instead of
    /// listing again.
    EtcdCompactedNotRelisted,
    /// Planted in the etcd provider's keep-alive: a failed keep-alive counts as one.
    EtcdRenewedOnAttempt,
    /// Planted in the etcd view: a watch's delete events are not applied.
    EtcdDeleteIgnored,
    /// Planted in the etcd provider's keep-alive loop: the lease is kept alive every TTL
    /// instead of every third of it, so healthy members expire.
    EtcdKeepAliveEveryTtl,
    /// Planted in the etcd provider's keep-alive: a keep-alive is dated when its answer came,
    /// not when it was sent, so a late answer stretches the member's standing past its lease.
    EtcdKeepAliveDatedOnAnswer,
    /// Planted in the etcd provider: a member judges its own key gone from a view that has not
    /// reached its own write yet (a lagging watch right after it registered again), so it
    /// registers again and again.
    EtcdOwnKeyJudgedEarly,
    /// Planted in the renewal schedule the lease providers share (`RenewPacer::pause`): the
    /// next round waits a whole interval after the previous answer, so slow answers stretch
    /// renewals apart (the loops of the registry, etcd and Kubernetes providers before).
    RenewAfterAnswer,
    /// Planted in the registry's snapshot cache: compressed members are looked up by cluster
    /// alone, not by version, so a watcher that accepts compression gets an older version's
    /// members under the new version.
    CompressedCacheAnyVersion,
}

impl Flaw {
    /// The name of the one-line defect this flaw plants in the real code, if it is one.
    pub fn planted(self) -> Option<&'static str> {
        Some(match self {
            Flaw::ActorsKeptOnLost => "actors-kept-on-lost",
            Flaw::DrainOnAnyChange => "drain-on-any-change",
            Flaw::ClaimNotDropped => "claim-not-dropped",
            Flaw::ReleaseBeforeDrained => "release-before-drained",
            Flaw::CallsOutliveDrain => "calls-outlive-drain",
            Flaw::HandoffAnyState => "handoff-any-state",
            Flaw::ReleaseAnswerAsAsked => "release-answer-as-asked",
            Flaw::TurnsIgnored => "turns-ignored",
            Flaw::NeverExpire => "never-expire",
            Flaw::HeartbeatNoRenew => "heartbeat-no-renew",
            Flaw::ShortLease => "short-lease",
            Flaw::SweepNoBroadcast => "sweep-no-broadcast",
            Flaw::LeaveNoPublish => "leave-no-publish",
            Flaw::UpdateIgnoresLeft => "update-ignores-left",
            Flaw::RebalanceIgnoresJoins => "rebalance-ignores-joins",
            Flaw::RebalanceUnreported => "rebalance-unreported",
            Flaw::NoRejoin => "no-rejoin",
            Flaw::ShutdownSkipsLeave => "shutdown-skips-leave",
            Flaw::SnapshotIgnoresEpoch => "snapshot-ignores-epoch",
            Flaw::LeaseRenewedOnAttempt => "lease-renewed-on-attempt",
            Flaw::ExpiryNotBuried => "expiry-not-buried",
            Flaw::StallNotExtended => "stall-not-extended",
            Flaw::ChangedNotPatched => "changed-not-patched",
            Flaw::UpdateIgnoresChanged => "update-ignores-changed",
            Flaw::UpdateOmitsChanged => "update-omits-changed",
            Flaw::CoalescedDropsLeft => "coalesced-drops-left",
            Flaw::K8sAgesWhileSilent => "k8s-ages-while-silent",
            Flaw::K8sCleanWithoutPrecondition => "clean-without-precondition",
            Flaw::K8sShutdownKeepsLease => "shutdown-keeps-lease",
            Flaw::K8sRecreateSameId => "k8s-recreate-same-id",
            Flaw::K8s410NotRelisted => "k8s-410-not-relisted",
            Flaw::K8sGhostKept => "k8s-ghost-kept",
            Flaw::K8sHeartbeatsUnsharded => "k8s-heartbeats-unsharded",
            Flaw::K8sParkedAgesDropped => "k8s-parked-ages-dropped",
            Flaw::K8sRecordUntouched => "k8s-record-untouched",
            Flaw::K8sMonitorsIgnoreZones => "k8s-monitors-ignore-zones",
            Flaw::K8sOrphanRecordAged => "k8s-orphan-record-aged",
            Flaw::K8sUnmarkedUnaged => "k8s-unmarked-unaged",
            Flaw::K8sUnmarkedMonitors => "k8s-unmarked-monitors",
            Flaw::K8sCreateInDoubtRepeated => "k8s-create-in-doubt-repeated",
            Flaw::K8sSliceChangeIgnored => "k8s-slice-change-ignored",
            Flaw::K8sTerminatingServed => "k8s-terminating-served",
            Flaw::K8sRenewedOnAttempt => "k8s-renewed-on-attempt",
            Flaw::K8sRetryAfterPerWatch => "k8s-retry-after-per-watch",
            Flaw::K8sIgnoresRetryAfter => "k8s-ignores-retry-after",
            Flaw::EtcdGhostKept => "etcd-ghost-kept",
            Flaw::EtcdStaleKeyKept => "etcd-stale-key-kept",
            Flaw::EtcdAuditCountOnly => "etcd-audit-count-only",
            Flaw::EtcdTokenNotRenewed => "etcd-token-not-renewed",
            Flaw::EtcdAuditIgnoresDeletes => "etcd-audit-ignores-deletes",
            Flaw::EtcdAbandonedCallStays => "etcd-abandoned-call-stays",
            Flaw::EtcdRejoinSameId => "etcd-rejoin-same-id",
            Flaw::EtcdCompactedNotRelisted => "etcd-compacted-not-relisted",
            Flaw::EtcdRenewedOnAttempt => "etcd-renewed-on-attempt",
            Flaw::EtcdDeleteIgnored => "etcd-delete-ignored",
            Flaw::EtcdKeepAliveEveryTtl => "etcd-keep-alive-every-ttl",
            Flaw::EtcdKeepAliveDatedOnAnswer => "etcd-keep-alive-dated-on-answer",
            Flaw::EtcdOwnKeyJudgedEarly => "etcd-own-key-judged-early",
            Flaw::RenewAfterAnswer => "renew-after-answer",
            Flaw::CompressedCacheAnyVersion => "compressed-cache-any-version",
            Flaw::HeartbeatPublishes => "heartbeat-publishes",
            Flaw::EtcdProgressRelists => "etcd-progress-relists",
            Flaw::LagUnreported => "lag-unreported",
            Flaw::UpdateGapIgnored => "update-gap-ignored",
            Flaw::None | Flaw::StaleReplay | Flaw::CorruptPlacement | Flaw::FreezeWatch => {
                return None;
            }
        })
    }

    /// Whether member `m0`'s provider is wrapped.
    pub fn wraps_provider(self) -> bool {
        matches!(
            self,
            Flaw::StaleReplay | Flaw::CorruptPlacement | Flaw::FreezeWatch
        )
    }
}

/// A provider with a [`Flaw`].
pub struct FlawedProvider {
    inner: Arc<dyn ClusterProvider>,
    flaw: Flaw,
    relay: Mutex<Option<TaskHandle>>,
}

impl FlawedProvider {
    /// Wraps `inner`.
    pub fn new(inner: Arc<dyn ClusterProvider>, flaw: Flaw) -> Self {
        Self {
            inner,
            flaw,
            relay: Mutex::new(None),
        }
    }

    fn start_relay(&self, outer: &ClusterProviderContext) -> ClusterProviderContext {
        let inner_ctx = outer
            .clone()
            .with_partition_config(PartitionConfig::default())
            .with_events(EventStream::default());
        let mut events = inner_ctx.events.subscribe();
        let outer = outer.clone();
        let flaw = self.flaw;
        let started = outer.clock.now();
        let task = outer.clock.clone().spawn(
            "flaw-relay",
            Box::pin(async move {
                let mut previous: Option<Arc<ClusterTopology>> = None;
                while let Ok(event) = events.recv().await {
                    let topology = match event {
                        ClusterEvent::TopologyChanged { topology, .. } => topology,
                        // The member's own standing is relayed faithfully.
                        e @ (ClusterEvent::MembershipLost { .. }
                        | ClusterEvent::MembershipRestored { .. }) => {
                            outer.events.publish(e);
                            continue;
                        }
                        ClusterEvent::Topology(_) => continue,
                    };
                    match flaw {
                        Flaw::StaleReplay => {
                            let _ = outer.apply_topology(topology.clone());
                            if let Some(prev) = previous.replace(topology) {
                                outer.events.publish(ClusterEvent::TopologyChanged {
                                    topology: prev,
                                    report: Arc::new(RebalanceReport::default()),
                                });
                            }
                        }
                        Flaw::CorruptPlacement => {
                            let _ = outer.apply_topology(Arc::new(corrupt(&topology)));
                        }
                        Flaw::FreezeWatch => {
                            if outer.clock.now().duration_since(started) < Duration::from_secs(20) {
                                let _ = outer.apply_topology(topology);
                            }
                        }
                        _ => {
                            let _ = outer.apply_topology(topology);
                        }
                    }
                }
            }),
        );
        *self.relay.lock().unwrap() = Some(task);
        inner_ctx
    }
}

/// The same version with one member's placement key (address) changed.
fn corrupt(t: &ClusterTopology) -> ClusterTopology {
    let mut members = t.members().to_vec();
    if let Some(m) = members.first_mut() {
        Arc::make_mut(m).address = "192.0.2.1:1".into();
    }
    ClusterTopology::new(t.cluster_name(), t.version(), members)
        .expect("same ids")
        .with_epoch(t.epoch())
}

#[async_trait]
impl ClusterProvider for FlawedProvider {
    async fn start_member(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        let inner_ctx = self.start_relay(&ctx);
        self.inner.start_member(inner_ctx).await
    }

    async fn start_client(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        let inner_ctx = self.start_relay(&ctx);
        self.inner.start_client(inner_ctx).await
    }

    async fn shutdown(&self, graceful: bool) -> Result<(), ProviderError> {
        if let Some(t) = self.relay.lock().unwrap().take() {
            t.abort();
        }
        self.inner.shutdown(graceful).await
    }

    async fn update_member(&self, description: Description) -> Result<(), ProviderError> {
        self.inner.update_member(description).await
    }

    async fn resolve_partition_manager(
        &self,
        member: &MemberId,
    ) -> Result<PartitionManagerHandle, ProviderError> {
        self.inner.resolve_partition_manager(member).await
    }
}

impl Drop for FlawedProvider {
    fn drop(&mut self) {
        if let Some(t) = self.relay.lock().unwrap_or_else(|e| e.into_inner()).take() {
            t.abort();
        }
    }
}
