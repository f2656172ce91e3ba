//! `KubernetesProvider`: one Lease per member, renewed; Leases (and a Service's EndpointSlices)
//! watched; expired Leases deleted; the member's own standing announced. Written once over
//! [`KubeApi`] and the [`crate::runtime::Clock`], so the same code runs against kube-rs in
//! production and the simulated API server in tests.
//!
//! Who is a member is decided in one place, the API server: a member whose Lease this node
//! finds expired (see [`Liveness`]) deletes that Lease with its resource version as a
//! precondition, so a renewal that got there first wins; every node drops the member when it
//! sees the deletion. A member removed that way can never renew under the same id again (its
//! next renewal finds no Lease, and it comes back as a new incarnation), so "removed" is final
//! for every peer. A node that cannot reach the API server ages no Lease (it cannot tell dead
//! members from a silent server), and its own member announces that it lost its Lease.
//!
//! Here: the provider, its session (start, renewals, the view, reconciling it into topologies,
//! deleting expired Leases). In submodules: `config` (settings), `reflect` (list and watch
//! one kind of object), `watched` (what is watched and what each kind tells the view),
//! `sharded` (sharded heartbeats: record and heartbeat Leases, monitoring shards).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::api::{
    ApiError, EndpointSlice, KubeApi, LabelSelector, Lease, ListOptions, Object, ObjectList,
    ObjectReference, WatchEvent, WatchStream,
};
use super::listing::Listing;
use super::members::{
    ByAddress, CLUSTER_LABEL, Liveness, MemberIndex, check_cluster_name, check_metadata_keys,
    lease_name, member_lease, serving_pods,
};
use super::metrics::KubernetesProviderMetrics;
use super::shards::{
    HEARTBEATS_ANNOTATION, Heartbeats, Monitors, RECORD_DURATION_FACTOR, heartbeat_lease,
    heartbeat_name, heartbeats_mark, is_marked, record_name, shard_of, shard_selector,
};
use super::watch::{Next, Outcome, Reflector};
use crate::cluster::{ClusterTopology, Description, Member, MemberId};
use crate::placement::PlacementError;
use crate::provider::describe::Descriptions;
use crate::provider::lease::MemberStanding;
use crate::provider::shell::{LeaseSession, Running, Shell};
use crate::provider::{
    Backoff, ClusterProvider, ClusterProviderContext, LeaseTiming, PartitionManagerHandle,
    ProviderError, RenewPacer, remote::GrpcPartitionManager,
};
use crate::runtime::{IdleTimeout, Instant, SharedClock, TaskSet, jitter, sim, timeout};

mod config;
mod reflect;
mod sharded;
mod watched;

pub use config::KubernetesProviderConfig;
use watched::{Records, Shard, Slices, Watched};

/// A [`ClusterProvider`] backed by the Kubernetes API: see the module docs.
pub struct KubernetesProvider {
    config: KubernetesProviderConfig,
    api: Arc<dyn KubeApi>,
    shell: Shell<Session>,
    metrics: KubernetesProviderMetrics,
}

impl std::fmt::Debug for KubernetesProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What this node knows of the cluster.
struct View {
    leases: Reflector<Lease>,
    /// `None` without a Service.
    slices: Option<Reflector<EndpointSlice>>,
    liveness: Liveness,
    /// The members the Leases describe, kept up to date one Lease at a time.
    index: MemberIndex,
    /// The members this node lists (the index, filtered by the serving Pods), kept up to date
    /// one change at a time.
    listing: Listing,
    /// Whether the index or the EndpointSlices changed since the last topology.
    dirty: bool,
    /// The newest topology version this node issued.
    version: u64,
    /// The topology this node issued last (`None` before the first).
    applied: Option<ClusterTopology>,
    /// Expired Leases to delete: name -> (resource version seen, when to try).
    cleaning: BTreeMap<String, (String, crate::runtime::Instant)>,
    /// Expired Leases whose deletion was tried at that resource version.
    tried: BTreeMap<String, String>,
    /// Leases already warned about as invalid.
    warned: BTreeSet<String>,
    /// Sharded heartbeats: what this member knows of its own record.
    own_record: OwnRecord,
    /// Sharded heartbeats: the shards this member monitors, with its rank in each (0: the
    /// first monitor, which deletes at once).
    monitored: BTreeMap<u32, usize>,
    /// Sharded heartbeats: the heartbeats of each monitored shard (their ages are in
    /// `liveness`, which then holds heartbeats, not records).
    heartbeats: BTreeMap<u32, Reflector<Lease>>,
    /// When the last topology was issued.
    published_at: Option<Instant>,
    /// The Leases by the address their holder advertises.
    by_address: ByAddress,
    /// Sharded heartbeats: records to look at for a missing heartbeat.
    unbeaten: Unbeaten,
    /// Sharded heartbeats: `(shards, monitors)`; `None`: every member watches every Lease.
    sharding: Option<(u32, u32)>,
    /// Sharded heartbeats: who monitors which shard, as of topology `assigned`.
    monitors: Option<Monitors>,
    /// Sharded heartbeats: members that joined or changed (`Some(zone)`) or left (`None`)
    /// since topology `assigned`.
    moved: Vec<(MemberId, Option<Option<String>>)>,
    assigned: Option<u64>,
    /// Sharded heartbeats: the records without the heartbeats mark, Leases their members
    /// renew ([`Heartbeats::Everyone`], a cluster migrating): aged in `liveness` by their
    /// renewals, as every member with that setting does, and never monitors.
    unmarked: BTreeSet<String>,
    /// Sharded heartbeats: marked records of another setting already warned about.
    mismatched: BTreeSet<String>,
    /// Sharded heartbeats: heartbeats seen deleted while their record stayed (expected, aged
    /// out at once, removed after the cleaners' delay by every monitor alike).
    orphans: BTreeSet<String>,
}

impl View {
    fn sharded(&self) -> bool {
        self.sharding.is_some()
    }
}

/// Records whose heartbeat may be missing (sharded heartbeats): a record that appeared, one
/// whose heartbeat was deleted, or all of them after a list or a change of monitored shards.
#[derive(Debug, Default)]
struct Unbeaten {
    all: bool,
    records: BTreeSet<String>,
}

impl Unbeaten {
    fn pending(&self) -> bool {
        self.all || !self.records.is_empty()
    }
}

/// This member's record Lease as its record watch saw it (sharded heartbeats).
#[derive(Debug, Default)]
struct OwnRecord {
    /// Its name, once written.
    name: Option<String>,
    /// The record watch listed it since.
    seen: bool,
    /// ... and then saw it deleted (by a monitor or by hand): this incarnation is gone.
    deleted: bool,
}

struct Session {
    config: KubernetesProviderConfig,
    api: Arc<dyn KubeApi>,
    ctx: ClusterProviderContext,
    member_mode: bool,
    /// This node as currently registered (a new incarnation id after its Lease was deleted).
    member: Mutex<Member>,
    /// This member's Lease as last written (its resource version is the next write's
    /// precondition); `None` until created, and after it was found deleted. With sharded
    /// heartbeats, its heartbeat Lease.
    own: Mutex<Option<Lease>>,
    /// Sharded heartbeats: this member's record Lease as last written.
    own_record: Mutex<Option<Lease>>,
    /// Sharded heartbeats: when this member's record was last written (touched while members
    /// that renew their own Lease are listed).
    record_written_at: Mutex<Option<Instant>>,
    /// A create of this member's Lease (heartbeat) got no answer: it may have been applied.
    create_in_doubt: std::sync::atomic::AtomicBool,
    /// Sharded heartbeats: the shards this member monitors changed.
    shards_changed: tokio::sync::Notify,
    standing: MemberStanding,
    descriptions: Descriptions,
    /// Wakes the renew loop (a new description to write).
    renew_now: tokio::sync::Notify,
    view: Mutex<View>,
    view_changed: tokio::sync::Notify,
    /// Deletions due, for the cleaner task.
    to_clean: Mutex<Vec<(String, String)>>,
    clean_now: tokio::sync::Notify,
    /// Held by a write of this member's Lease, so shutdown deletes the Lease that exists.
    writing: tokio::sync::Mutex<()>,
    synced: std::sync::atomic::AtomicBool,
    /// The newest refusal (403, 422...) of a list or watch: a start fails with it at once.
    refused: Mutex<Option<String>>,
    /// Per resource read (`leases`, `endpointslices`): no list or watch of it before this
    /// instant (the latest `Retry-After` of a 429 to any of them).
    read_gates: Mutex<BTreeMap<&'static str, Instant>>,
    metrics: KubernetesProviderMetrics,
}

impl KubernetesProvider {
    /// A provider for one node, talking to the API through `api`.
    pub fn new(config: KubernetesProviderConfig, api: Arc<dyn KubeApi>) -> Self {
        Self {
            config,
            api,
            shell: Shell::default(),
            metrics: KubernetesProviderMetrics::default(),
        }
    }

    /// This provider's counters (register them to export).
    pub fn metrics(&self) -> &KubernetesProviderMetrics {
        &self.metrics
    }

    async fn session(&self) -> Result<Arc<Session>, ProviderError> {
        self.shell.session().await
    }

    async fn start(
        &self,
        ctx: ClusterProviderContext,
        member_mode: bool,
    ) -> Result<(), ProviderError> {
        self.config.validate()?;
        check_cluster_name(&ctx.cluster_name).map_err(ProviderError::Rejected)?;
        if member_mode {
            check_metadata_keys(&ctx.member).map_err(ProviderError::Rejected)?;
        }
        let mut running = self.shell.starting().await?;
        let config = self.config.clone();
        let session = Arc::new(Session {
            api: self.api.clone(),
            member_mode,
            member: Mutex::new(ctx.member.clone()),
            own: Mutex::new(None),
            own_record: Mutex::new(None),
            record_written_at: Mutex::new(None),
            create_in_doubt: std::sync::atomic::AtomicBool::new(false),
            shards_changed: tokio::sync::Notify::new(),
            standing: MemberStanding::new(
                config.lease_timing(),
                self.metrics.membership_lost.clone(),
                self.metrics.membership_restored.clone(),
            ),
            descriptions: Descriptions::new(ctx.member.description()),
            renew_now: tokio::sync::Notify::new(),
            view: Mutex::new(View {
                leases: Reflector::new(),
                slices: config.service.as_ref().map(|_| Reflector::new()),
                liveness: Liveness::new(config.continuity()),
                index: MemberIndex::new(&ctx.cluster_name),
                listing: Listing::new(config.service.is_some()),
                dirty: true,
                // Versions go on from the node's partition manager: a start after a failed one
                // (or after a shutdown) must not issue versions it already holds, which it
                // would refuse as stale.
                version: ctx.partition_manager.topology().version(),
                applied: None,
                cleaning: BTreeMap::new(),
                tried: BTreeMap::new(),
                warned: BTreeSet::new(),
                own_record: OwnRecord::default(),
                monitored: BTreeMap::new(),
                heartbeats: BTreeMap::new(),
                published_at: None,
                by_address: ByAddress::default(),
                unbeaten: Unbeaten::default(),
                sharding: match config.heartbeats {
                    Heartbeats::Everyone => None,
                    Heartbeats::Sharded { shards, monitors } => Some((shards, monitors)),
                },
                monitors: None,
                moved: Vec::new(),
                assigned: None,
                unmarked: BTreeSet::new(),
                mismatched: BTreeSet::new(),
                orphans: BTreeSet::new(),
            }),
            view_changed: tokio::sync::Notify::new(),
            to_clean: Mutex::new(Vec::new()),
            clean_now: tokio::sync::Notify::new(),
            writing: tokio::sync::Mutex::new(()),
            synced: std::sync::atomic::AtomicBool::new(false),
            refused: Mutex::new(None),
            read_gates: Mutex::new(BTreeMap::new()),
            metrics: self.metrics.clone(),
            ctx: ctx.clone(),
            config,
        });
        let clock = ctx.clock.clone();
        let mut tasks = vec![
            clock.spawn(
                "kubernetes-leases",
                Box::pin(session.clone().reflect(Records)),
            ),
            clock.spawn(
                "kubernetes-reconcile",
                Box::pin(session.clone().reconcile_loop()),
            ),
        ];
        if self.config.service.is_some() {
            tasks.push(clock.spawn(
                "kubernetes-endpointslices",
                Box::pin(session.clone().reflect(Slices)),
            ));
        }
        if member_mode {
            if let Err(e) = session.renew().await {
                drop(TaskSet::from(tasks));
                return Err(e.into_provider_error());
            }
            tasks.push(clock.spawn("kubernetes-renew", Box::pin(session.clone().renew_loop())));
            tasks.push(clock.spawn(
                "kubernetes-lease",
                Box::pin(session.clone().lease_watchdog()),
            ));
            tasks.push(clock.spawn("kubernetes-cleaner", Box::pin(session.clone().cleaner())));
            if session.sharded().is_some() {
                tasks.push(clock.spawn(
                    "kubernetes-monitor",
                    Box::pin(session.clone().monitor_loop()),
                ));
            }
        }
        let started = Running {
            session: session.clone(),
            tasks: tasks.into(),
        };
        let pm = ctx.partition_manager.clone();
        let ready = ctx
            .wait_until(self.config.startup_timeout, || {
                if lock(&session.refused).is_some() {
                    return true;
                }
                if member_mode {
                    pm.topology().contains(&session.member_id())
                } else {
                    session.synced.load(std::sync::atomic::Ordering::SeqCst)
                }
            })
            .await;
        let refused = lock(&session.refused).take();
        if !ready || refused.is_some() {
            let writing = session.writing.lock().await;
            drop(started);
            drop(writing);
            if member_mode {
                session.delete_own().await;
            }
            if let Some(why) = refused {
                return Err(ProviderError::Rejected(why));
            }
            return Err(ProviderError::Unavailable(format!(
                "this node did not see {} in the cluster's Leases{} within {:?}",
                if member_mode {
                    "itself"
                } else {
                    "a first list"
                },
                self.config
                    .service
                    .as_ref()
                    .map(|s| format!(" (with a serving endpoint of Service {s})"))
                    .unwrap_or_default(),
                self.config.startup_timeout
            )));
        }
        tracing::info!(cluster = %ctx.cluster_name, member = %session.member_id(), member_mode, namespace = %self.config.namespace, service = ?self.config.service, "kubernetes provider started");
        *running = Some(started);
        Ok(())
    }
}

/// What [`Session::create_own`] did.
enum Created {
    /// Created.
    Written(Lease),
    /// An earlier create in doubt had been applied: the Lease is this member's.
    Adopt(Lease),
    /// An earlier create in doubt: the Lease is not there (or not this member's).
    Gone,
    /// The create failed.
    Failed(CallError),
}

/// An API failure, with what was being done.
#[derive(Debug)]
struct CallError {
    what: String,
    error: ApiError,
}

impl CallError {
    fn into_provider_error(self) -> ProviderError {
        let text = format!("{}: {}", self.what, self.error);
        match self.error {
            ApiError::Unavailable(_)
            | ApiError::Conflict(_)
            | ApiError::Gone(_)
            | ApiError::TooManyRequests { .. } => ProviderError::Unavailable(text),
            ApiError::AlreadyExists(_) | ApiError::NotFound(_) | ApiError::Rejected(_) => {
                ProviderError::Rejected(text)
            }
        }
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.error)
    }
}

impl Session {
    fn clock(&self) -> &SharedClock {
        &self.ctx.clock
    }

    fn member_id(&self) -> MemberId {
        lock(&self.member).id.clone()
    }

    fn namespace(&self) -> &str {
        &self.config.namespace
    }

    /// `(shards, monitors)` with sharded heartbeats.
    fn sharded(&self) -> Option<(u32, u32)> {
        match self.config.heartbeats {
            Heartbeats::Everyone => None,
            Heartbeats::Sharded { shards, monitors } => Some((shards, monitors)),
        }
    }

    /// The shard of the member whose heartbeat Lease is named `heartbeat`.
    fn heartbeat_shard(&self, heartbeat: &str) -> Option<u32> {
        let (shards, _) = self.sharded()?;
        let id = record_name(heartbeat)
            .strip_prefix(self.ctx.cluster_name.as_str())?
            .strip_prefix('-')?;
        Some(shard_of(&MemberId::parse(id).ok()?, shards))
    }

    fn selector(&self) -> LabelSelector {
        [(CLUSTER_LABEL.to_string(), self.ctx.cluster_name.clone())].into()
    }

    /// Runs one API call under the request deadline.
    async fn call<T>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, CallError> {
        self.call_within(self.config.request_timeout, what, fut)
            .await
    }

    /// Runs one list under the list deadline (a list of thousands of Leases is megabytes).
    async fn list_call<T>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, CallError> {
        self.call_within(self.config.list_timeout(), what, fut)
            .await
    }

    async fn call_within<T>(
        &self,
        deadline: Duration,
        what: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<T, CallError> {
        let error = match timeout(self.clock().as_ref(), deadline, fut).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => {
                if matches!(e, ApiError::TooManyRequests { .. }) {
                    self.metrics.throttled.inc();
                }
                e
            }
            Err(_) => ApiError::Unavailable(format!("no answer within {deadline:?}")),
        };
        Err(CallError {
            what: what(),
            error,
        })
    }

    fn wall_micros(&self) -> i64 {
        self.clock()
            .wall()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
    }

    // ---- this member's Lease ----

    /// Writes this member's Lease (creates it if this incarnation has none): a renewal, and
    /// the pending description if any. A Lease found deleted means peers removed this member:
    /// it takes a new incarnation and creates a new Lease at once.
    async fn renew(&self) -> Result<(), CallError> {
        if let Some((shards, monitors)) = self.sharded() {
            return self.renew_sharded(shards, monitors).await;
        }
        let _writing = self.writing.lock().await;
        let mut recreated = false;
        let mut adopted = false;
        loop {
            let (member, generation) = self.descriptions.current(&self.member);
            let name = lease_name(&self.ctx.cluster_name, &member.id);
            let sent_at = self.clock().now();
            let lease = member_lease(
                &self.ctx.cluster_name,
                self.namespace(),
                &member,
                self.config.lease_duration,
                self.wall_micros(),
                self.config.pod.clone(),
            );
            let Some(result) = self.write_own(lease).await? else {
                continue;
            };
            match result {
                Ok(written) => {
                    *lock(&self.own) = Some(written);
                    if self.descriptions.accepted(&member, generation) {
                        self.metrics.description_updates.inc();
                        tracing::info!(member = %member.id, kinds = ?member.kinds, zone = ?member.zone, "this member's Lease carries its new description");
                    }
                    self.metrics.renewals.inc();
                    self.renewed(sent_at);
                    return Ok(());
                }
                Err(e) if matches!(e.error, ApiError::NotFound(_)) && !recreated => {
                    // Deleted: a peer found it expired (or a person deleted it). Peers saw
                    // this incarnation go; come back as a new one.
                    recreated = true;
                    if sim::flaw("k8s-recreate-same-id") {
                        *lock(&self.own) = None;
                    } else {
                        self.revoked("its Lease was deleted");
                    }
                }
                Err(e)
                    if matches!(e.error, ApiError::Conflict(_) | ApiError::AlreadyExists(_))
                        && !adopted =>
                {
                    // Written since the version held: most likely this member's own write
                    // whose answer was lost. Read it back and write on top of it.
                    adopted = true;
                    let what = || format!("get Lease {}/{name}", self.namespace());
                    match self
                        .call(what, self.api.get_lease(self.namespace(), &name))
                        .await?
                    {
                        Some(current)
                            if current.holder_identity.as_deref() == Some(member.id.as_str()) =>
                        {
                            *lock(&self.own) = Some(current);
                        }
                        Some(_) | None if !recreated => {
                            recreated = true;
                            self.revoked("its Lease was deleted or taken over");
                        }
                        _ => return Err(e),
                    }
                }
                Err(e) => {
                    if matches!(e.error, ApiError::Rejected(_)) && self.descriptions.pending() {
                        self.descriptions.refuse(&self.member, e.to_string());
                    }
                    if sim::flaw("k8s-renewed-on-attempt") {
                        self.renewed(sent_at);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// Writes this member's Lease (with sharded heartbeats, its heartbeat): created (see
    /// [`Self::create_own`]) when it holds none, else replaced on top of the version it holds.
    /// `None`: nothing was written, write again (an earlier create in doubt was adopted, or
    /// this member took a new id).
    async fn write_own(
        &self,
        mut lease: Lease,
    ) -> Result<Option<Result<Lease, CallError>>, CallError> {
        let own = lock(&self.own).clone();
        let Some(prev) = own else {
            return Ok(match self.create_own(lease).await? {
                Created::Written(l) => Some(Ok(l)),
                Created::Adopt(l) => {
                    *lock(&self.own) = Some(l);
                    None
                }
                Created::Gone => {
                    self.rotate_id("a create whose answer was lost may have been applied and its Lease deleted since");
                    None
                }
                Created::Failed(e) => Some(Err(e)),
            });
        };
        lease.meta.resource_version = prev.meta.resource_version.clone();
        lease.meta.uid = prev.meta.uid.clone();
        lease.acquire_time_micros = prev.acquire_time_micros;
        let name = lease.meta.name.clone();
        let what = || format!("update Lease {}/{name}", self.namespace());
        Ok(Some(self.call(what, self.api.replace_lease(lease)).await))
    }

    /// Creates this member's Lease (with sharded heartbeats, its heartbeat), unless an earlier
    /// create's answer never came: that one may have been applied and the Lease deleted since
    /// by a peer that found it expired, and creating it again would bring back an id its peers
    /// removed. Then it reads the Lease first: this member's, it is adopted (the next write
    /// renews it); gone, the caller takes a new id.
    async fn create_own(&self, lease: Lease) -> Result<Created, CallError> {
        let ns = self.namespace();
        let name = lease.meta.name.clone();
        if self
            .create_in_doubt
            .load(std::sync::atomic::Ordering::SeqCst)
            && !sim::flaw("k8s-create-in-doubt-repeated")
        {
            let what = || format!("get Lease {ns}/{name}");
            let found = self.call(what, self.api.get_lease(ns, &name)).await?;
            self.create_in_doubt
                .store(false, std::sync::atomic::Ordering::SeqCst);
            return Ok(match found {
                Some(l) if l.holder_identity == lease.holder_identity => Created::Adopt(l),
                _ => Created::Gone,
            });
        }
        let what = || format!("create Lease {ns}/{name}");
        match self.call(what, self.api.create_lease(lease)).await {
            Ok(l) => Ok(Created::Written(l)),
            Err(e) => {
                if matches!(e.error, ApiError::Unavailable(_)) {
                    self.create_in_doubt
                        .store(true, std::sync::atomic::Ordering::SeqCst);
                }
                Ok(Created::Failed(e))
            }
        }
    }

    /// After a 409 on a write of Lease `name`: reads it back and keeps it in `slot` if
    /// `holder` still holds it (most likely this member's own write whose answer was lost);
    /// false if it is gone or someone else's.
    async fn adopt(
        &self,
        slot: &Mutex<Option<Lease>>,
        name: &str,
        holder: &MemberId,
    ) -> Result<bool, CallError> {
        let what = || format!("get Lease {}/{name}", self.namespace());
        match self
            .call(what, self.api.get_lease(self.namespace(), name))
            .await?
        {
            Some(current) if current.holder_identity.as_deref() == Some(holder.as_str()) => {
                *lock(slot) = Some(current);
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn rotate_id(&self, why: &str) {
        *lock(&self.own) = None;
        *lock(&self.own_record) = None;
        lock(&self.view).own_record = OwnRecord::default();
        let mut member = lock(&self.member);
        let old = member.id.clone();
        member.id = old.successor(self.clock().as_ref());
        tracing::info!(old = %old, new = %member.id, why, "taking a new incarnation");
    }

    fn renewed(&self, sent_at: crate::runtime::Instant) {
        let member = lock(&self.member).clone();
        self.standing.renewed(&self.ctx, &member, sent_at);
        lock(&self.view).liveness.renewed_own(sent_at);
        self.view_changed.notify_one();
    }

    fn revoked(&self, why: &str) {
        let member = lock(&self.member).clone();
        self.standing.revoked(&self.ctx, &member);
        self.rotate_id(why);
    }

    async fn lease_watchdog(self: Arc<Self>) {
        self.standing
            .watchdog(&self.ctx, || lock(&self.member).clone())
            .await
    }

    async fn renew_loop(self: Arc<Self>) {
        let interval = self.config.renew_interval();
        let mut pacer = RenewPacer::new(interval, self.clock().now());
        loop {
            let pause = pacer.pause(self.clock().now(), |n| {
                self.config.backoff.delay(n, self.clock().as_ref())
            });
            tokio::select! {
                biased;
                _ = self.renew_now.notified() => {}
                _ = self.clock().sleep(pause) => {}
            }
            pacer.start(self.clock().now());
            match self.renew().await {
                Ok(()) => pacer.succeeded(),
                Err(e) => {
                    self.metrics.renew_failures.inc();
                    // A 429 says when to send again: sooner only feeds the queue that shed it.
                    let asked = Some(e.error.retry_delay(Duration::ZERO)).filter(|d| !d.is_zero());
                    let failures = pacer.failed(asked);
                    if let Some(wait) = e.error.retry_after() {
                        tracing::warn!(member = %self.member_id(), error = %e, retry_after = ?wait, "Lease renewal shed by the API server (429); retrying after Retry-After");
                    } else if failures == 2 {
                        tracing::warn!(member = %self.member_id(), error = %e, failures, "Lease renewals failing");
                    } else {
                        tracing::debug!(member = %self.member_id(), error = %e, failures, "Lease renewal failed");
                    }
                }
            }
        }
    }

    /// Deletes this member's Lease (graceful leave; with sharded heartbeats its record, then
    /// its heartbeat), retrying transient failures a few times.
    async fn delete_own(&self) {
        let record = lock(&self.own_record).take();
        let own = lock(&self.own).take();
        for lease in record.into_iter().chain(own) {
            self.delete_with_retries(&lease.meta.name).await;
        }
    }

    async fn delete_with_retries(&self, name: &str) {
        let name = name.to_string();
        let mut wait = None;
        for attempt in 0..DELETE_ATTEMPTS {
            if attempt > 0 {
                let backoff = self
                    .config
                    .backoff
                    .delay(attempt - 1, self.clock().as_ref());
                let pause = wait
                    .take()
                    .map_or(backoff, |e: ApiError| e.retry_delay(backoff));
                self.clock().sleep(pause).await;
            }
            let what = || format!("delete Lease {}/{name}", self.namespace());
            match self
                .call(what, self.api.delete_lease(self.namespace(), &name, None))
                .await
            {
                Ok(()) => return,
                Err(e) if matches!(e.error, ApiError::NotFound(_)) => return,
                Err(e)
                    if matches!(
                        e.error,
                        ApiError::Unavailable(_) | ApiError::TooManyRequests { .. }
                    ) =>
                {
                    tracing::debug!(error = %e, attempt, "deleting this member's Lease failed; retrying");
                    wait = Some(e.error);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "deleting this member's Lease failed; peers will find it expired");
                    return;
                }
            }
        }
        tracing::warn!(lease = %name, "deleting this member's Lease failed; peers will find it expired");
    }

    // ---- deciding ----

    async fn reconcile_loop(self: Arc<Self>) {
        loop {
            let notified = self.view_changed.notified();
            let wake = self.reconcile();
            match wake {
                Some(at) => {
                    let wait = at.saturating_duration_since(self.clock().now());
                    tokio::select! {
                        biased;
                        _ = notified => {}
                        _ = self.clock().sleep(wait) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// Issues a topology if the members changed, schedules deletions of expired Leases, and
    /// says when to look again.
    fn reconcile(&self) -> Option<crate::runtime::Instant> {
        let now = self.clock().now();
        let mut view = lock(&self.view);
        let view = &mut *view;
        if !view.leases.is_synced() || view.slices.as_ref().is_some_and(|s| !s.is_synced()) {
            return None;
        }
        self.synced.store(true, std::sync::atomic::Ordering::SeqCst);
        // A change after a quiet while is published at once; changes that follow within
        // `min_publish_interval` go out together (a cluster of thousands starting or
        // restarting: each topology costs every node O(members)).
        let mut publish_at = None;
        if view.dirty {
            let interval = self.config.min_publish_interval;
            match view.published_at {
                Some(at) if at + interval > now => {
                    publish_at = Some(at + interval);
                }
                _ => {
                    view.dirty = false;
                    view.published_at = Some(now);
                    self.publish_members(view);
                }
            }
        }
        if !self.member_mode {
            view.unbeaten = Unbeaten::default();
            return publish_at;
        }
        if let Some((shards, monitors)) = self.sharded() {
            self.assign_shards(view, shards, monitors, now);
            self.expect_heartbeats(view, now);
            if view.own_record.deleted {
                self.renew_now.notify_one();
            }
        }
        let clean_at = self.schedule_cleaning(view, now);
        publish_at.into_iter().chain(clean_at).min()
    }

    /// Issues a topology if the members the Leases (and EndpointSlices) describe changed.
    fn publish_members(&self, view: &mut View) {
        let delta = view.listing.refresh(&view.index);
        // Checked against the list built from scratch (small clusters: that is O(members)).
        if sim::self_checks()
            && view.index.len() <= 64
            && let Err(e) = view.listing.check(
                &view.index,
                view.slices
                    .as_ref()
                    .map(|s| serving_pods(s.objects().values()))
                    .as_ref(),
            )
        {
            panic!("self-check of the Kubernetes listing: {e}");
        }
        if delta.withheld_changed {
            // Registered but not serving (terminating, not ready): out of the topology, but
            // possibly still holding activations.
            self.ctx.withheld.set(view.listing.withheld());
        }
        let skipped = view.listing.skipped();
        for (name, why) in skipped {
            if view.warned.insert(name.clone()) {
                self.metrics.leases_skipped.inc();
                tracing::warn!(lease = %name, reason = %why, "skipping a Lease that describes no valid member");
            }
        }
        view.warned.retain(|name| skipped.contains_key(name));
        if view.applied.is_some() && delta.is_empty() {
            return;
        }
        view.version += 1;
        if view.monitors.is_some() {
            let joined = delta
                .upserts
                .iter()
                .map(|m| (m.id.clone(), Some(m.zone.clone())));
            let left = delta.left.iter().map(|id| (id.clone(), None));
            view.moved.extend(left.chain(joined));
        }
        // Each node numbers its own topologies: the epoch names the numbering (this node's),
        // so versions are never compared across nodes (activation fences). Successive
        // topologies share every member that did not change.
        let topology = match &view.applied {
            Some(last) => {
                let left: Vec<&MemberId> = delta.left.iter().collect();
                last.patched(view.version, &left, &delta.upserts)
            }
            None => match ClusterTopology::new(
                self.ctx.cluster_name.clone(),
                view.version,
                view.listing.members().cloned(),
            ) {
                Ok(topology) => topology.with_epoch(node_epoch(&self.ctx)),
                Err(e) => {
                    tracing::warn!(error = %e, "topology not built");
                    return;
                }
            },
        };
        match self.ctx.apply_topology(Arc::new(topology.clone())) {
            Ok(_) | Err(PlacementError::StaleTopology { .. }) => {}
            Err(e) => tracing::warn!(error = %e, "topology not applied"),
        }
        self.metrics.topologies.inc();
        self.metrics.members.set(topology.len() as i64);
        view.applied = Some(topology);
    }

    /// Expired Leases are deleted by the first live member in id order at once, and by the
    /// others if it is still there a while later; the Lease of an earlier incarnation at this
    /// member's own address (a ghost of a process that was restarted in place) is deleted at
    /// once. Returns when the next deletion is due.
    fn schedule_cleaning(
        &self,
        view: &mut View,
        now: crate::runtime::Instant,
    ) -> Option<crate::runtime::Instant> {
        let me = lock(&self.member).clone();
        let sharded = self.sharded().is_some();
        let own_name = lease_name(&self.ctx.cluster_name, &me.id);
        // With sharded heartbeats the ages are of the monitored shards' heartbeats only.
        let own_heartbeat = heartbeat_name(&own_name);
        let expired: BTreeMap<String, String> = view
            .liveness
            .expired()
            .into_iter()
            .filter(|(name, _)| {
                if sharded && !view.unmarked.contains(name) {
                    *name != own_heartbeat
                } else {
                    *name != own_name && view.leases.objects().contains_key(name)
                }
            })
            .collect();
        // Two processes cannot listen on one address: a Lease there with an older id is a
        // previous incarnation of this process. (Found through the Leases by address: a scan
        // of every Lease each time the members change costs O(N²) while a cluster starts.)
        let ghosts: BTreeMap<String, String> = view
            .by_address
            .at(&me.address)
            .filter(|name| {
                view.leases.objects().get(*name).is_some_and(|l| {
                    l.holder_identity
                        .as_deref()
                        .and_then(|h| MemberId::parse(h).ok())
                        .is_some_and(|id| id < me.id)
                })
            })
            .filter(|_| !sim::flaw("k8s-ghost-kept"))
            .filter_map(|name| view.leases.objects().get(name))
            .map(|l| {
                if sharded {
                    // Its heartbeat, deleted without a precondition, then its record.
                    (heartbeat_name(&l.meta.name), UNCONDITIONAL.to_string())
                } else {
                    (l.meta.name.clone(), l.meta.resource_version.clone())
                }
            })
            .collect();
        let liveness = &view.liveness;
        view.orphans.retain(|name| liveness.knows(name));
        let wanted = |name: &String| expired.get(name).or_else(|| ghosts.get(name));
        view.cleaning.retain(|name, _| wanted(name).is_some());
        view.tried.retain(|name, rv| wanted(name) == Some(rv));
        let first = applied_ids(&view.applied).find(|id| {
            expired
                .keys()
                .all(|name| *name != lease_name(&self.ctx.cluster_name, id))
        });
        for (name, rv) in expired.iter().chain(&ghosts) {
            if view.tried.contains_key(name) {
                continue;
            }
            let due = match view.cleaning.get(name) {
                Some((seen, due)) if seen == rv => *due,
                _ => {
                    let at_once = if view.orphans.contains(name) {
                        // Its remover is most likely deleting the record right now.
                        false
                    } else if sharded && !view.unmarked.contains(name) {
                        // The shard's first monitor other than the expired member itself (a
                        // member may monitor its own shard); the others a while later.
                        let expired_id = record_name(name)
                            .strip_prefix(self.ctx.cluster_name.as_str())
                            .and_then(|r| r.strip_prefix('-'));
                        self.heartbeat_shard(name).is_some_and(|s| {
                            view.monitors.as_ref().is_some_and(|m| {
                                m.of(s)
                                    .into_iter()
                                    .find(|id| Some(id.as_str()) != expired_id)
                                    == Some(&me.id)
                            })
                        })
                    } else {
                        first == Some(&me.id)
                    };
                    let delay = if at_once || ghosts.contains_key(name) {
                        Duration::ZERO
                    } else {
                        let d = self.config.cleaner_delay();
                        d + jitter(self.clock().as_ref(), d)
                    };
                    now + delay
                }
            };
            view.cleaning.insert(name.clone(), (rv.clone(), due));
        }
        let due: Vec<(String, String)> = view
            .cleaning
            .iter()
            .filter(|(_, (_, due))| *due <= now)
            .map(|(name, (rv, _))| (name.clone(), rv.clone()))
            .collect();
        for (name, rv) in &due {
            view.cleaning.remove(name);
            view.tried.insert(name.clone(), rv.clone());
        }
        if !due.is_empty() {
            lock(&self.to_clean).extend(due);
            self.clean_now.notify_one();
        }
        view.cleaning.values().map(|(_, due)| *due).min()
    }

    /// Deletes the expired Leases the reconciler hands over.
    async fn cleaner(self: Arc<Self>) {
        loop {
            self.clean_now.notified().await;
            let batch = std::mem::take(&mut *lock(&self.to_clean));
            for (name, rv) in batch {
                // With sharded heartbeats, an unmarked record is deleted like a Lease of
                // members that renew their own (a cluster migrating between settings).
                let heartbeat = self.sharded().is_some()
                    && !lock(&self.view).leases.objects().contains_key(&name);
                let result = if heartbeat {
                    self.clean_member(&name, &rv).await
                } else {
                    let precondition = if sim::flaw("clean-without-precondition") {
                        None
                    } else {
                        Some(rv.as_str())
                    };
                    let what = || format!("delete Lease {}/{name}", self.namespace());
                    self.call(
                        what,
                        self.api.delete_lease(self.namespace(), &name, precondition),
                    )
                    .await
                    .map(|()| true)
                };
                match result {
                    Ok(true) => {
                        self.metrics.leases_cleaned.inc();
                        tracing::info!(lease = %name, resource_version = %rv, "deleted an expired Lease");
                    }
                    Ok(false) => {
                        tracing::debug!(lease = %name, "an expected heartbeat exists after all");
                    }
                    Err(e) if matches!(e.error, ApiError::NotFound(_) | ApiError::Conflict(_)) => {
                        tracing::debug!(lease = %name, error = %e, "expired Lease already deleted or renewed");
                    }
                    Err(e) => {
                        // Tried again a while later (and by the other members anyway).
                        {
                            let retry = self.clock().now()
                                + e.error.retry_delay(self.config.cleaner_delay());
                            let mut view = lock(&self.view);
                            view.tried.remove(&name);
                            view.cleaning.insert(name.clone(), (rv.clone(), retry));
                        }
                        self.view_changed.notify_one();
                        if matches!(e.error, ApiError::Rejected(_)) {
                            tracing::error!(lease = %name, error = %e, "cannot delete an expired Lease: it stays listed until a member can (check the Role: leases need `delete`)");
                        } else {
                            tracing::warn!(lease = %name, error = %e, "deleting an expired Lease failed");
                        }
                    }
                }
            }
        }
    }
}

/// The resource version of a cleaning that deletes without a precondition (the heartbeat of
/// an earlier incarnation at this member's own address).
const UNCONDITIONAL: &str = "*";

/// How many times a graceful shutdown tries to delete the Lease.
const DELETE_ATTEMPTS: u32 = 5;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[async_trait]
impl LeaseSession for Session {
    fn is_member(&self) -> bool {
        self.member_mode
    }

    fn ctx(&self) -> &ClusterProviderContext {
        &self.ctx
    }

    fn member(&self) -> &Mutex<Member> {
        &self.member
    }

    fn descriptions(&self) -> &Descriptions {
        &self.descriptions
    }

    fn writing(&self) -> &tokio::sync::Mutex<()> {
        &self.writing
    }

    /// Annotation keys and values within the API's rules (a 422 otherwise).
    fn check(&self, described: &Member) -> Result<(), ProviderError> {
        check_metadata_keys(described).map_err(ProviderError::Rejected)
    }

    fn write_soon(&self) {
        self.renew_now.notify_one();
    }

    async fn release(&self) {
        if self.member_mode && !sim::flaw("shutdown-keeps-lease") {
            self.delete_own().await;
        }
    }

    fn backend(&self) -> String {
        "the Kubernetes API".into()
    }

    fn provider(&self) -> &'static str {
        "kubernetes provider"
    }
}

#[async_trait]
impl ClusterProvider for KubernetesProvider {
    async fn start_member(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        self.start(ctx, true).await
    }

    async fn start_client(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        self.start(ctx, false).await
    }

    async fn shutdown(&self, graceful: bool) -> Result<(), ProviderError> {
        self.shell.shutdown(graceful).await
    }

    async fn update_member(&self, description: Description) -> Result<(), ProviderError> {
        self.shell
            .update_member(description, self.config.startup_timeout)
            .await
    }

    async fn resolve_partition_manager(
        &self,
        member: &MemberId,
    ) -> Result<PartitionManagerHandle, ProviderError> {
        let session = self.session().await?;
        GrpcPartitionManager::of_listed(&session.ctx, member, session.config.partition_rpc_timeout)
    }
}

/// The ids of the members of the topology this node issued last, in order.
fn applied_ids(applied: &Option<ClusterTopology>) -> impl Iterator<Item = &MemberId> {
    applied.iter().flat_map(|t| t.members()).map(|m| &m.id)
}

/// The members of the topology this node issued last, with their zones.
fn applied_zones(
    applied: &Option<ClusterTopology>,
) -> impl Iterator<Item = (&MemberId, Option<&str>)> {
    applied
        .iter()
        .flat_map(|t| t.members())
        .map(|m| (&m.id, m.zone.as_deref()))
}

/// The epoch of the topologies this node numbers: a fixed hash of the cluster name and the
/// node's address (never 0, the empty topology's), stable for the process.
fn node_epoch(ctx: &ClusterProviderContext) -> u64 {
    crate::placement::hash::key_hash(&ctx.cluster_name, &ctx.member.address) | 1
}
