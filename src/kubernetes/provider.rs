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

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::api::{
    ApiError, EndpointSlice, KubeApi, LabelSelector, Lease, ListOptions, Object, ObjectList,
    ObjectReference, WatchEvent, WatchStream,
};
use super::members::{
    ADDRESS_ANNOTATION, CLUSTER_LABEL, Liveness, MemberIndex, check_cluster_name,
    check_metadata_keys, lease_name, member_lease, serving_pods,
};
use super::metrics::KubernetesProviderMetrics;
use super::watch::{Next, Reflector};
use crate::cluster::{ClusterTopology, Description, Member, MemberId};
use crate::placement::PlacementError;
use crate::provider::describe::Descriptions;
use crate::provider::lease::MemberStanding;
use crate::provider::{
    Backoff, ClusterProvider, ClusterProviderContext, LeaseTiming, PartitionManagerHandle,
    ProviderError, RenewPacer, remote::GrpcPartitionManager,
};
use crate::runtime::{SharedClock, TaskSet, jitter, sim, timeout};

/// Settings of a [`KubernetesProvider`].
#[derive(Clone, Debug)]
pub struct KubernetesProviderConfig {
    /// The namespace of the Leases (and of the Service).
    pub namespace: String,
    /// A headless Service whose EndpointSlices gate membership: a member is listed only while
    /// its Pod's endpoint is serving and not terminating. `None`: Leases alone.
    pub service: Option<String>,
    /// How long a member may go without renewing its Lease (whole seconds: the API's unit).
    pub lease_duration: Duration,
    /// How often the Lease is renewed (default: a third of the duration).
    pub renew_interval: Option<Duration>,
    /// Deadline of every API call (a watch: of opening it) but lists.
    pub request_timeout: Duration,
    /// Deadline of a list (default: six request deadlines, at least 30 s): a list of
    /// thousands of Leases is megabytes, and a slow one must not fail for good.
    pub list_timeout: Option<Duration>,
    /// A relist after `410 Gone` waits a random time up to this long (default 1 s), so that
    /// members sent to relist at the same moment (an API-server restart) do not list together.
    pub relist_jitter: Duration,
    /// Objects per list page (`limit`; default 500, client-go's): a list of thousands of
    /// Leases comes in pages under the API server's response limits. `None`: one page.
    pub list_page_size: Option<u32>,
    /// Retry pacing of failed renewals and watches (capped at the renew interval).
    pub backoff: Backoff,
    /// A watch stream that carries nothing (not even a bookmark) for this long is reopened.
    pub watch_idle_timeout: Duration,
    /// How long `start_member`/`start_client` wait for the first topology.
    pub startup_timeout: Duration,
    /// This member's Pod: the Lease's owner (Kubernetes deletes the Lease with the Pod) and the
    /// endpoint that must be serving when a Service is configured.
    pub pod: Option<ObjectReference>,
    /// Extra room before this member declares its own Lease lost (default: a tenth of the
    /// duration). See [`LeaseTiming`].
    pub lease_margin: Option<Duration>,
    /// The largest clock rate error assumed for any node, in parts per million (default 2%).
    pub max_clock_drift_ppm: u32,
    /// Deadline of calls to other members' partition managers.
    pub partition_rpc_timeout: Duration,
}

/// A watch that ends cleanly sooner than this after it opened, with no event, is retried with
/// backoff rather than reopened at once (client-go's "very short watch").
const SHORT_WATCH: Duration = Duration::from_secs(1);

impl KubernetesProviderConfig {
    /// Defaults for Leases in `namespace`: a 15 s duration renewed every 5 s (client-go's
    /// leader-election defaults), no Service.
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            service: None,
            lease_duration: Duration::from_secs(15),
            renew_interval: None,
            request_timeout: Duration::from_secs(5),
            list_timeout: None,
            relist_jitter: Duration::from_secs(1),
            list_page_size: Some(500),
            backoff: Backoff {
                initial: Duration::from_millis(100),
                max: Duration::from_secs(5),
            },
            watch_idle_timeout: Duration::from_secs(90),
            startup_timeout: Duration::from_secs(30),
            pod: None,
            lease_margin: None,
            max_clock_drift_ppm: LeaseTiming::DEFAULT_MAX_DRIFT_PPM,
            partition_rpc_timeout: Duration::from_secs(2),
        }
    }

    /// Settings for a member running in a Pod, from the environment the example Deployment
    /// (`deploy/kubernetes/member-deployment.yaml`) sets through the downward API:
    /// `POD_NAMESPACE` (required), `POD_NAME` and `POD_UID` (the Lease's owner, so Kubernetes
    /// deletes it with the Pod), `SHOAL_SERVICE` (the headless Service gating membership) and
    /// `SHOAL_LEASE_DURATION` (like `15s`). The error names the variable.
    pub fn from_env() -> Result<Self, ProviderError> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`Self::from_env`] over any source of variables.
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self, ProviderError> {
        let bad = |what: String| ProviderError::Rejected(what);
        let namespace = var("POD_NAMESPACE")
            .filter(|v| !v.is_empty())
            .ok_or_else(|| {
                bad("POD_NAMESPACE is not set (the downward API's metadata.namespace)".into())
            })?;
        let mut config = Self::new(namespace.clone());
        config.service = var("SHOAL_SERVICE").filter(|v| !v.is_empty());
        if let Some(d) = var("SHOAL_LEASE_DURATION") {
            config.lease_duration = humantime::parse_duration(&d)
                .map_err(|e| bad(format!("SHOAL_LEASE_DURATION={d:?}: {e}")))?;
        }
        if let Some(d) = var("SHOAL_RENEW_INTERVAL").filter(|v| !v.is_empty()) {
            config.renew_interval = Some(
                humantime::parse_duration(&d)
                    .map_err(|e| bad(format!("SHOAL_RENEW_INTERVAL={d:?}: {e}")))?,
            );
        }
        config.pod = match (var("POD_NAME"), var("POD_UID")) {
            (Some(name), Some(uid)) if !name.is_empty() && !uid.is_empty() => {
                Some(ObjectReference {
                    kind: "Pod".into(),
                    namespace,
                    name,
                    uid,
                })
            }
            (None, None) => None,
            _ => {
                return Err(bad(
                    "POD_NAME and POD_UID go together (the downward API's metadata.name and metadata.uid)"
                        .into(),
                ));
            }
        };
        config.validate()?;
        Ok(config)
    }

    /// This Pod's member address: `POD_IP` (the downward API's `status.podIP`) and `port`.
    pub fn pod_address(port: u16) -> Result<String, ProviderError> {
        let ip: std::net::IpAddr = std::env::var("POD_IP")
            .map_err(|_| {
                ProviderError::Rejected(
                    "POD_IP is not set (the downward API's status.podIP)".into(),
                )
            })?
            .parse()
            .map_err(|e| ProviderError::Rejected(format!("POD_IP is not an IP address: {e}")))?;
        Ok(std::net::SocketAddr::new(ip, port).to_string())
    }

    /// The list deadline in force.
    pub fn list_timeout(&self) -> Duration {
        self.list_timeout
            .unwrap_or((self.request_timeout * 6).max(Duration::from_secs(30)))
    }

    /// The renew interval in force.
    pub fn renew_interval(&self) -> Duration {
        self.renew_interval.unwrap_or(self.lease_duration / 3)
    }

    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), ProviderError> {
        let bad = |what: String| Err(ProviderError::Rejected(what));
        if self.namespace.is_empty() {
            return bad("namespace must not be empty".into());
        }
        if self.lease_duration < Duration::from_secs(1) || self.lease_duration.subsec_nanos() != 0 {
            return bad(format!(
                "lease_duration must be a whole number of seconds, at least 1 s (got {:?})",
                self.lease_duration
            ));
        }
        let renew = self.renew_interval();
        if renew.is_zero() || renew >= self.lease_duration {
            return bad(format!(
                "renew_interval must be above zero and below lease_duration (got {renew:?} for {:?})",
                self.lease_duration
            ));
        }
        Ok(())
    }

    fn lease_timing(&self) -> LeaseTiming {
        LeaseTiming {
            ttl: self.lease_duration,
            max_clock_drift_ppm: self.max_clock_drift_ppm,
            margin: self.lease_margin.unwrap_or(self.lease_duration / 10),
        }
    }

    /// Own renewals further apart than this prove no time in between (see [`Liveness`]): two
    /// renew intervals, so one failed attempt and its retry still count.
    fn continuity(&self) -> Duration {
        self.renew_interval() * 2
    }

    /// How long after the first cleaner the others step in.
    fn cleaner_delay(&self) -> Duration {
        self.lease_duration / 4
    }
}

/// A [`ClusterProvider`] backed by the Kubernetes API: see the module docs.
pub struct KubernetesProvider {
    config: KubernetesProviderConfig,
    api: Arc<dyn KubeApi>,
    running: tokio::sync::Mutex<Option<Running>>,
    metrics: KubernetesProviderMetrics,
}

impl std::fmt::Debug for KubernetesProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubernetesProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

struct Running {
    session: Arc<Session>,
    tasks: TaskSet,
}

/// What this node knows of the cluster.
struct View {
    leases: Reflector<Lease>,
    /// `None` without a Service.
    slices: Option<Reflector<EndpointSlice>>,
    liveness: Liveness,
    /// The members the Leases describe, kept up to date one Lease at a time.
    index: MemberIndex,
    /// Whether the index or the EndpointSlices changed since the last topology.
    dirty: bool,
    /// The newest topology version this node issued.
    version: u64,
    /// The members of that topology (`None` before the first).
    applied: Option<Vec<Member>>,
    /// Expired Leases to delete: name -> (resource version seen, when to try).
    cleaning: BTreeMap<String, (String, crate::runtime::Instant)>,
    /// Expired Leases whose deletion was tried at that resource version.
    tried: BTreeMap<String, String>,
    /// Leases already warned about as invalid.
    warned: BTreeSet<String>,
}

struct Session {
    config: KubernetesProviderConfig,
    api: Arc<dyn KubeApi>,
    ctx: ClusterProviderContext,
    member_mode: bool,
    /// This node as currently registered (a new incarnation id after its Lease was deleted).
    member: Mutex<Member>,
    /// This member's Lease as last written (its resource version is the next write's
    /// precondition); `None` until created, and after it was found deleted.
    own: Mutex<Option<Lease>>,
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
    metrics: KubernetesProviderMetrics,
}

impl KubernetesProvider {
    /// A provider for one node, talking to the API through `api`.
    pub fn new(config: KubernetesProviderConfig, api: Arc<dyn KubeApi>) -> Self {
        Self {
            config,
            api,
            running: tokio::sync::Mutex::new(None),
            metrics: KubernetesProviderMetrics::default(),
        }
    }

    /// This provider's counters (register them to export).
    pub fn metrics(&self) -> &KubernetesProviderMetrics {
        &self.metrics
    }

    async fn session(&self) -> Result<Arc<Session>, ProviderError> {
        let running = self.running.lock().await;
        Ok(running
            .as_ref()
            .ok_or(ProviderError::NotStarted)?
            .session
            .clone())
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
        let mut running = self.running.lock().await;
        if running.is_some() {
            return Err(ProviderError::AlreadyStarted);
        }
        let config = self.config.clone();
        let session = Arc::new(Session {
            api: self.api.clone(),
            member_mode,
            member: Mutex::new(ctx.member.clone()),
            own: Mutex::new(None),
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
                dirty: true,
                // Versions go on from the node's partition manager: a start after a failed one
                // (or after a shutdown) must not issue versions it already holds, which it
                // would refuse as stale.
                version: ctx.partition_manager.topology().version(),
                applied: None,
                cleaning: BTreeMap::new(),
                tried: BTreeMap::new(),
                warned: BTreeSet::new(),
            }),
            view_changed: tokio::sync::Notify::new(),
            to_clean: Mutex::new(Vec::new()),
            clean_now: tokio::sync::Notify::new(),
            writing: tokio::sync::Mutex::new(()),
            synced: std::sync::atomic::AtomicBool::new(false),
            refused: Mutex::new(None),
            metrics: self.metrics.clone(),
            ctx: ctx.clone(),
            config,
        });
        let clock = ctx.clock.clone();
        let mut tasks = vec![
            clock.spawn(
                "kubernetes-leases",
                Box::pin(session.clone().reflect::<Lease>()),
            ),
            clock.spawn(
                "kubernetes-reconcile",
                Box::pin(session.clone().reconcile_loop()),
            ),
        ];
        if self.config.service.is_some() {
            tasks.push(clock.spawn(
                "kubernetes-endpointslices",
                Box::pin(session.clone().reflect::<EndpointSlice>()),
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
        let _writing = self.writing.lock().await;
        let mut recreated = false;
        let mut adopted = false;
        loop {
            let (member, generation) = self.descriptions.current(&self.member);
            let name = lease_name(&self.ctx.cluster_name, &member.id);
            let sent_at = self.clock().now();
            let mut lease = member_lease(
                &self.ctx.cluster_name,
                self.namespace(),
                &member,
                self.config.lease_duration,
                self.wall_micros(),
                self.config.pod.clone(),
            );
            let own = lock(&self.own).clone();
            let result = match &own {
                None => {
                    let what = || format!("create Lease {}/{name}", self.namespace());
                    self.call(what, self.api.create_lease(lease)).await
                }
                Some(prev) => {
                    lease.meta.resource_version = prev.meta.resource_version.clone();
                    lease.meta.uid = prev.meta.uid.clone();
                    lease.acquire_time_micros = prev.acquire_time_micros;
                    let what = || format!("update Lease {}/{name}", self.namespace());
                    self.call(what, self.api.replace_lease(lease)).await
                }
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

    fn rotate_id(&self, why: &str) {
        *lock(&self.own) = None;
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

    /// Deletes this member's Lease (graceful leave), retrying transient failures a few times.
    async fn delete_own(&self) {
        let Some(own) = lock(&self.own).take() else {
            return;
        };
        let name = own.meta.name.clone();
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

    // ---- watching ----

    /// Lists and watches one kind of object forever, feeding the view.
    async fn reflect<T: Watched>(self: Arc<Self>) {
        let mut attempt = 0u32;
        loop {
            let next = T::reflector(&mut lock(&self.view)).next();
            let result = match next {
                Next::List { resource_version } => self.list::<T>(&resource_version).await,
                Next::Watch { resource_version } => {
                    self.watch::<T>(&resource_version, &mut attempt).await
                }
            };
            let Err(e) = result else {
                attempt = 0;
                continue;
            };
            {
                let mut view = lock(&self.view);
                T::reflector(&mut view).failed(&e.error);
            }
            if matches!(e.error, ApiError::Rejected(_)) {
                tracing::error!(kind = T::KIND, error = %e, "the API server refuses this watch (check the Role and the namespace)");
                *lock(&self.refused) = Some(e.to_string());
            }
            if matches!(e.error, ApiError::Gone(_)) {
                self.metrics.relists.inc();
                // Spread out: an API-server restart or a compaction sends every member here at
                // the same moment, and their lists would land together.
                let spread = jitter(self.clock().as_ref(), self.config.relist_jitter);
                tracing::info!(kind = T::KIND, error = %e, ?spread, "watch version gone; relisting");
                self.clock().sleep(spread).await;
                continue;
            }
            self.metrics.watch_reopens.inc();
            let backoff = self
                .config
                .backoff
                .delay(attempt, self.clock().as_ref())
                .min(self.config.renew_interval());
            // A 429 says when to come back: not sooner (the list or watch would only be shed
            // again, and add to the queue that shed it).
            let delay = e.error.retry_delay(backoff);
            if e.error.retry_after().is_some() {
                tracing::warn!(kind = T::KIND, error = %e, ?delay, "list or watch shed by the API server (429); retrying after Retry-After");
            } else {
                tracing::debug!(kind = T::KIND, error = %e, ?delay, "watch ended; reopening");
            }
            attempt = attempt.saturating_add(1);
            self.clock().sleep(delay).await;
        }
    }

    /// Lists in pages of `list_page_size`, then hands the whole list over at once. A page
    /// whose continuation is gone (`410`) fails the list: the reflector lists again from the
    /// start with a quorum read.
    async fn list<T: Watched>(&self, not_older_than: &str) -> Result<(), CallError> {
        let mut options = ListOptions {
            resource_version: not_older_than.to_string(),
            limit: self.config.list_page_size,
            continue_token: None,
        };
        let mut list = T::list(self, &options).await?;
        let mut pages = 1u32;
        while let Some(token) = list.continue_token.take() {
            pages += 1;
            if pages > MAX_LIST_PAGES {
                return Err(CallError {
                    what: format!("list {}", T::KIND),
                    error: ApiError::Unavailable(format!(
                        "more than {MAX_LIST_PAGES} pages: the server keeps answering with a continue token"
                    )),
                });
            }
            options.resource_version.clear();
            options.continue_token = Some(token);
            let page = T::list(self, &options).await?;
            list.items.extend(page.items);
            list.continue_token = page.continue_token;
        }
        if pages > 1 {
            tracing::debug!(
                kind = T::KIND,
                pages,
                objects = list.items.len(),
                "listed in pages"
            );
        }
        let now = self.clock().now();
        {
            let mut view = lock(&self.view);
            T::listed(&mut view, &list, now);
            T::reflector(&mut view).listed(list);
        }
        self.view_changed.notify_one();
        Ok(())
    }

    async fn watch<T: Watched>(&self, from: &str, attempt: &mut u32) -> Result<(), CallError> {
        let mut stream = T::watch(self, from).await?;
        let opened = self.clock().now();
        let mut events = 0u64;
        loop {
            let event = match timeout(
                self.clock().as_ref(),
                self.config.watch_idle_timeout,
                stream.next(),
            )
            .await
            {
                Err(_) => {
                    return Err(CallError {
                        what: format!("watch {}", T::KIND),
                        error: ApiError::Unavailable(format!(
                            "quiet for {:?}",
                            self.config.watch_idle_timeout
                        )),
                    });
                }
                Ok(None) => {
                    // A watch the server ends at once without a single event (not even a
                    // bookmark) is a server in trouble, not a watch timeout: reopening it at
                    // once would loop. It is retried with backoff, as client-go does.
                    let lasted = self.clock().now().saturating_duration_since(opened);
                    if events == 0 && lasted < SHORT_WATCH {
                        return Err(CallError {
                            what: format!("watch {}", T::KIND),
                            error: ApiError::Unavailable(format!(
                                "very short watch: ended after {lasted:?} with no event"
                            )),
                        });
                    }
                    return Ok(());
                }
                Ok(Some(Err(error))) => {
                    return Err(CallError {
                        what: format!("watch {}", T::KIND),
                        error,
                    });
                }
                Ok(Some(Ok(event))) => event,
            };
            events += 1;
            *attempt = 0;
            let now = self.clock().now();
            // Only a change of what the members are wakes the reconciler: a renewal of another
            // member's Lease changes nothing to publish (expiry is judged at this member's own
            // renewals, which wake it themselves), so a large cluster's stream of renewals
            // costs one index probe each.
            let changed = {
                let mut view = lock(&self.view);
                T::observed(&mut view, &event, now);
                T::reflector(&mut view).event(event);
                view.dirty
            };
            if changed {
                self.view_changed.notify_one();
            }
        }
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
        if view.dirty {
            view.dirty = false;
            self.publish_members(view);
        }
        if self.member_mode {
            self.schedule_cleaning(view, now)
        } else {
            None
        }
    }

    /// Issues a topology if the members the Leases (and EndpointSlices) describe changed.
    fn publish_members(&self, view: &mut View) {
        let serving = view
            .slices
            .as_ref()
            .map(|s| serving_pods(s.objects().values()));
        let listed = view.index.listed(serving.as_ref());
        if serving.is_some() {
            // Registered but not serving (terminating, not ready): out of the topology, but
            // possibly still holding activations.
            let withheld = view
                .index
                .listed(None)
                .members
                .into_iter()
                .filter(|m| {
                    listed
                        .members
                        .binary_search_by(|x| x.id.cmp(&m.id))
                        .is_err()
                })
                .collect();
            self.ctx.withheld.set(withheld);
        }
        for (name, why) in &listed.skipped {
            if view.warned.insert(name.clone()) {
                self.metrics.leases_skipped.inc();
                tracing::warn!(lease = %name, reason = %why, "skipping a Lease that describes no valid member");
            }
        }
        view.warned
            .retain(|name| listed.skipped.iter().any(|(n, _)| n == name));
        if view.applied.as_ref() != Some(&listed.members) {
            view.version += 1;
            match ClusterTopology::new(
                self.ctx.cluster_name.clone(),
                view.version,
                listed.members.iter().cloned(),
            ) {
                // Each node numbers its own topologies: the epoch names the numbering (this
                // node's), so versions are never compared across nodes (activation fences).
                Ok(topology) => match self
                    .ctx
                    .apply_topology(Arc::new(topology.with_epoch(node_epoch(&self.ctx))))
                {
                    Ok(_) | Err(PlacementError::StaleTopology { .. }) => {}
                    Err(e) => tracing::warn!(error = %e, "topology not applied"),
                },
                Err(e) => tracing::warn!(error = %e, "topology not built"),
            }
            self.metrics.topologies.inc();
            self.metrics.members.set(listed.members.len() as i64);
            view.applied = Some(listed.members);
        }
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
        let own_name = lease_name(&self.ctx.cluster_name, &me.id);
        let expired: BTreeMap<String, String> = view
            .liveness
            .expired()
            .into_iter()
            .filter(|(name, _)| *name != own_name && view.leases.objects().contains_key(name))
            .collect();
        // Two processes cannot listen on one address: a Lease there with an older id is a
        // previous incarnation of this process.
        let ghosts: BTreeMap<String, String> = view
            .leases
            .objects()
            .values()
            .filter(|_| !sim::flaw("k8s-ghost-kept"))
            .filter(|l| {
                l.meta.annotations.get(ADDRESS_ANNOTATION) == Some(&me.address)
                    && l.holder_identity
                        .as_deref()
                        .and_then(|h| MemberId::parse(h).ok())
                        .is_some_and(|id| id < me.id)
            })
            .map(|l| (l.meta.name.clone(), l.meta.resource_version.clone()))
            .collect();
        let wanted = |name: &String| expired.get(name).or_else(|| ghosts.get(name));
        view.cleaning.retain(|name, _| wanted(name).is_some());
        view.tried.retain(|name, rv| wanted(name) == Some(rv));
        let first = view.applied.iter().flatten().map(|m| &m.id).find(|id| {
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
                    let delay = if first == Some(&me.id) || ghosts.contains_key(name) {
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
                let precondition = if sim::flaw("clean-without-precondition") {
                    None
                } else {
                    Some(rv.as_str())
                };
                let what = || format!("delete Lease {}/{name}", self.namespace());
                match self
                    .call(
                        what,
                        self.api.delete_lease(self.namespace(), &name, precondition),
                    )
                    .await
                {
                    Ok(()) => {
                        self.metrics.leases_cleaned.inc();
                        tracing::info!(lease = %name, resource_version = %rv, "deleted an expired Lease");
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

/// How many times a graceful shutdown tries to delete the Lease.
const DELETE_ATTEMPTS: u32 = 5;

/// The most pages one list may take (a server that never stops answering with a continue
/// token fails the list instead of growing it forever).
const MAX_LIST_PAGES: u32 = 10_000;

/// A kind of object the provider lists and watches.
#[async_trait]
trait Watched: Object + PartialEq + Sized {
    /// For logs.
    const KIND: &'static str;
    fn reflector(view: &mut View) -> &mut Reflector<Self>;
    async fn list(session: &Session, options: &ListOptions) -> Result<ObjectList<Self>, CallError>;
    async fn watch(session: &Session, from: &str) -> Result<WatchStream<Self>, CallError>;
    /// What a list tells the view besides the objects.
    fn listed(_view: &mut View, _list: &ObjectList<Self>, _now: crate::runtime::Instant) {}
    /// What an event tells the view besides the object.
    fn observed(_view: &mut View, _event: &WatchEvent<Self>, _now: crate::runtime::Instant) {}
}

#[async_trait]
impl Watched for Lease {
    const KIND: &'static str = "Leases";

    fn reflector(view: &mut View) -> &mut Reflector<Self> {
        &mut view.leases
    }

    async fn list(s: &Session, options: &ListOptions) -> Result<ObjectList<Self>, CallError> {
        let what = || {
            format!(
                "list Leases in {} labelled {CLUSTER_LABEL}={}",
                s.namespace(),
                s.ctx.cluster_name
            )
        };
        s.list_call(
            what,
            s.api.list_leases(s.namespace(), &s.selector(), options),
        )
        .await
    }

    async fn watch(s: &Session, from: &str) -> Result<WatchStream<Self>, CallError> {
        let what = || {
            format!(
                "watch Leases in {} labelled {CLUSTER_LABEL}={}",
                s.namespace(),
                s.ctx.cluster_name
            )
        };
        s.call(what, s.api.watch_leases(s.namespace(), &s.selector(), from))
            .await
    }

    fn listed(view: &mut View, list: &ObjectList<Self>, now: crate::runtime::Instant) {
        view.liveness.replace_all(&list.items, now);
        view.dirty |= view.index.replace_all(&list.items) || !view.leases.is_synced();
    }

    fn observed(view: &mut View, event: &WatchEvent<Self>, now: crate::runtime::Instant) {
        if matches!(view.leases.next(), Next::List { .. }) {
            return;
        }
        match event {
            WatchEvent::Added(l) | WatchEvent::Modified(l) => {
                view.liveness.observe(l, now);
                view.dirty |= view.index.upsert(l);
            }
            WatchEvent::Deleted(l) => {
                view.liveness.forget(&l.meta.name);
                view.dirty |= view.index.remove(&l.meta.name);
            }
            WatchEvent::Bookmark(_) => {}
        }
    }
}

#[async_trait]
impl Watched for EndpointSlice {
    const KIND: &'static str = "EndpointSlices";

    fn reflector(view: &mut View) -> &mut Reflector<Self> {
        view.slices
            .as_mut()
            .expect("EndpointSlices are watched only with a Service")
    }

    async fn list(s: &Session, options: &ListOptions) -> Result<ObjectList<Self>, CallError> {
        let service = s.config.service.clone().unwrap_or_default();
        let what = || format!("list EndpointSlices of Service {}/{service}", s.namespace());
        s.list_call(
            what,
            s.api.list_endpoint_slices(s.namespace(), &service, options),
        )
        .await
    }

    async fn watch(s: &Session, from: &str) -> Result<WatchStream<Self>, CallError> {
        let service = s.config.service.clone().unwrap_or_default();
        let what = || {
            format!(
                "watch EndpointSlices of Service {}/{service}",
                s.namespace()
            )
        };
        s.call(
            what,
            s.api.watch_endpoint_slices(s.namespace(), &service, from),
        )
        .await
    }

    fn listed(view: &mut View, _list: &ObjectList<Self>, _now: crate::runtime::Instant) {
        view.dirty = true;
    }

    fn observed(view: &mut View, event: &WatchEvent<Self>, _now: crate::runtime::Instant) {
        view.dirty |=
            !matches!(event, WatchEvent::Bookmark(_)) && !sim::flaw("k8s-slice-change-ignored");
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
        let Some(mut running) = self.running.lock().await.take() else {
            return Err(ProviderError::NotStarted);
        };
        let session = running.session.clone();
        let writing = session.writing.lock().await;
        running.tasks.stop().await;
        drop(writing);
        if graceful && session.member_mode && !sim::flaw("shutdown-keeps-lease") {
            session.delete_own().await;
        }
        tracing::info!(member = %session.member_id(), graceful, "kubernetes provider stopped");
        Ok(())
    }

    async fn update_member(&self, description: Description) -> Result<(), ProviderError> {
        let session = self.session().await?;
        if !session.member_mode {
            return Err(ProviderError::NotAMember);
        }
        let described = lock(&session.member).clone().described(description.clone());
        check_metadata_keys(&described).map_err(ProviderError::Rejected)?;
        let generation = session
            .descriptions
            .set(&session.member, description.clone())?;
        session.renew_now.notify_one();
        session
            .descriptions
            .wait_shown(
                &session.ctx,
                &session.member,
                generation,
                &description,
                self.config.startup_timeout,
                "the Kubernetes API",
            )
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

/// The epoch of the topologies this node numbers: a fixed hash of the cluster name and the
/// node's address (never 0, the empty topology's), stable for the process.
fn node_epoch(ctx: &ClusterProviderContext) -> u64 {
    crate::placement::hash::key_hash(&ctx.cluster_name, &ctx.member.address) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: BTreeMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn settings_come_from_the_downward_api_and_errors_name_the_variable() {
        let c = KubernetesProviderConfig::from_vars(vars(&[
            ("POD_NAMESPACE", "shop"),
            ("POD_NAME", "shop-7d9f-abcde"),
            ("POD_UID", "1234"),
            ("SHOAL_SERVICE", "shop-members"),
            ("SHOAL_LEASE_DURATION", "9s"),
        ]))
        .unwrap();
        assert_eq!(c.namespace, "shop");
        assert_eq!(c.service.as_deref(), Some("shop-members"));
        assert_eq!(c.lease_duration, Duration::from_secs(9));
        assert_eq!(c.renew_interval(), Duration::from_secs(3));
        let pod = c.pod.unwrap();
        assert_eq!(
            (pod.kind.as_str(), pod.name.as_str()),
            ("Pod", "shop-7d9f-abcde")
        );
        let err = |pairs: &[(&str, &str)]| {
            KubernetesProviderConfig::from_vars(vars(pairs))
                .unwrap_err()
                .to_string()
        };
        assert!(err(&[]).contains("POD_NAMESPACE"));
        assert!(err(&[("POD_NAMESPACE", "s"), ("POD_NAME", "p")]).contains("POD_UID"));
        assert!(
            err(&[("POD_NAMESPACE", "s"), ("SHOAL_LEASE_DURATION", "soon")])
                .contains("SHOAL_LEASE_DURATION")
        );
        assert!(
            err(&[("POD_NAMESPACE", "s"), ("SHOAL_LEASE_DURATION", "1500ms")])
                .contains("lease_duration")
        );
        let c = KubernetesProviderConfig::from_vars(vars(&[
            ("POD_NAMESPACE", "s"),
            ("SHOAL_RENEW_INTERVAL", "2s"),
        ]))
        .unwrap();
        assert_eq!(c.renew_interval(), Duration::from_secs(2));
        assert!(
            err(&[("POD_NAMESPACE", "s"), ("SHOAL_RENEW_INTERVAL", "often")])
                .contains("SHOAL_RENEW_INTERVAL")
        );
        assert!(
            err(&[("POD_NAMESPACE", "s"), ("SHOAL_RENEW_INTERVAL", "20s")])
                .contains("renew_interval")
        );
    }
}
