//! `RegistryProvider`: joins a registry, heartbeats, watches with reconnect, and heals itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use super::metrics::RegistryProviderMetrics;
use super::pb::registry_client::RegistryClient;
use super::{pb, wire};
use crate::cluster::{ClusterTopology, Description, Member, MemberId};
use crate::placement::PlacementError;
use crate::provider::describe::Descriptions;
use crate::provider::lease::MemberStanding;
use crate::provider::shell::{LeaseSession, Running, Shell};
use crate::provider::{
    Backoff, ClusterProvider, ClusterProviderContext, LeaseTiming, PartitionManagerHandle,
    ProviderError, RenewPacer, remote::GrpcPartitionManager,
};
use crate::runtime::{IdleTimeout, SharedClock, sim, timeout};

/// Settings of a [`RegistryProvider`].
#[derive(Clone)]
pub struct RegistryProviderConfig {
    /// The registry's URL: `http://host:port`, or `https://` with [`Self::tls`].
    pub endpoint: String,
    /// Deadline of every unary call.
    pub rpc_timeout: Duration,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// Reconnect and re-join pacing.
    pub backoff: Backoff,
    /// The cluster's shared secret, if the registry requires one.
    pub cluster_token: Option<String>,
    /// A watch stream that carries nothing (not even progress) for this long is reopened.
    pub watch_idle_timeout: Duration,
    /// How long `start_member`/`start_client` wait for the first topology.
    pub startup_timeout: Duration,
    /// HTTP/2 keepalive ping interval on the channel (dead connections are noticed without
    /// waiting for the TTL).
    pub keepalive_interval: Duration,
    /// Extra room before this member declares its own registration lost, so the application
    /// can stop serving before peers take over (default: a tenth of the registry's TTL). See
    /// [`LeaseTiming`].
    pub lease_margin: Option<Duration>,
    /// The largest clock rate error assumed, for this node's clock and the registry's alike,
    /// in parts per million (default 2%).
    pub max_clock_drift_ppm: u32,
    /// Ask for large snapshots compressed (`WatchRequest.accept_encodings`; default on): a third
    /// of the bytes for a little CPU on each side.
    pub compressed_snapshots: bool,
    /// TLS settings for `https://` endpoints (normal build only; simulated tonic has no TLS).
    #[cfg(not(madsim))]
    pub tls: Option<tonic::transport::ClientTlsConfig>,
}

/// The cluster token is redacted: settings end up in logs and error reports.
impl std::fmt::Debug for RegistryProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("RegistryProviderConfig");
        d.field("endpoint", &self.endpoint)
            .field("rpc_timeout", &self.rpc_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff", &self.backoff)
            .field(
                "cluster_token",
                &self.cluster_token.as_ref().map(|_| "<redacted>"),
            )
            .field("watch_idle_timeout", &self.watch_idle_timeout)
            .field("startup_timeout", &self.startup_timeout)
            .field("keepalive_interval", &self.keepalive_interval)
            .field("lease_margin", &self.lease_margin)
            .field("max_clock_drift_ppm", &self.max_clock_drift_ppm)
            .field("compressed_snapshots", &self.compressed_snapshots);
        #[cfg(not(madsim))]
        d.field("tls", &self.tls.is_some());
        d.finish()
    }
}

impl RegistryProviderConfig {
    /// Defaults for a registry at `endpoint`.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            rpc_timeout: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(2),
            backoff: Backoff::default(),
            cluster_token: None,
            watch_idle_timeout: Duration::from_secs(15),
            startup_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(10),
            lease_margin: None,
            max_clock_drift_ppm: LeaseTiming::DEFAULT_MAX_DRIFT_PPM,
            compressed_snapshots: true,
            #[cfg(not(madsim))]
            tls: None,
        }
    }

    /// The lease timing for a registry TTL.
    fn lease_timing(&self, ttl: Duration) -> LeaseTiming {
        LeaseTiming {
            ttl,
            max_clock_drift_ppm: self.max_clock_drift_ppm,
            margin: self.lease_margin.unwrap_or(ttl / 10),
        }
    }

    fn channel(&self) -> Result<Channel, ProviderError> {
        let endpoint = Endpoint::from_shared(self.endpoint.clone())
            .map_err(|e| {
                ProviderError::Rejected(format!("bad registry endpoint {:?}: {e}", self.endpoint))
            })?
            .connect_timeout(self.connect_timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(self.keepalive_interval)
            .keep_alive_timeout(self.rpc_timeout)
            .keep_alive_while_idle(true);
        #[cfg(not(madsim))]
        let endpoint = match &self.tls {
            Some(tls) => endpoint
                .tls_config(tls.clone())
                .map_err(|e| ProviderError::Rejected(format!("bad TLS settings: {e}")))?,
            None => endpoint,
        };
        Ok(endpoint.connect_lazy())
    }
}

/// A [`ClusterProvider`] backed by a Shoal registry server.
///
/// One long-lived channel carries every call. Heartbeats follow the interval the server asks
/// for. The member tracks when its last accepted heartbeat was sent and publishes
/// [`crate::ClusterEvent::MembershipLost`] before the registry can expire it (see
/// [`crate::provider::lease`]); a registration the server no longer knows (it expired, or the
/// registry restarted) is re-joined at once as a new incarnation, announced by
/// [`crate::ClusterEvent::MembershipRestored`]. The watch reconnects with backoff and jitter, resumes from the version
/// held, applies only newer versions, and is reopened if it goes quiet for longer than
/// `watch_idle_timeout` (the server sends progress messages while nothing changes).
#[derive(Debug)]
pub struct RegistryProvider {
    config: RegistryProviderConfig,
    shell: Shell<Session>,
    metrics: RegistryProviderMetrics,
}

/// What the heartbeat and watch tasks share.
#[derive(Debug)]
struct Session {
    config: RegistryProviderConfig,
    ctx: ClusterProviderContext,
    /// This node as currently registered (a new incarnation id after each loss).
    member: Mutex<Member>,
    /// This member's own view of its registration (members only).
    standing: MemberStanding,
    /// When the first join attempt of the current id that got no answer was sent.
    unanswered_join: Mutex<Option<crate::runtime::Instant>>,
    /// Sent with every join: proves a retried join comes from this process (see the .proto).
    secret: String,
    role: pb::Role,
    client: RegistryClient<Channel>,
    /// The current registration token (replaced on every re-join).
    token: Mutex<Option<String>>,
    /// Set once the first snapshot arrived (even an empty one at version 0, which the partition
    /// manager does not record).
    synced: std::sync::atomic::AtomicBool,
    metrics: RegistryProviderMetrics,
    /// Held by a join attempt from request to stored token.
    joining: tokio::sync::Mutex<()>,
    /// The description generations (update_member).
    descriptions: Descriptions,
    /// Wakes the heartbeat loop to publish a new description at once.
    describe: tokio::sync::Notify,
}

impl RegistryProvider {
    /// A provider for one node.
    pub fn new(config: RegistryProviderConfig) -> Self {
        Self {
            config,
            shell: Shell::default(),
            metrics: RegistryProviderMetrics::default(),
        }
    }

    /// The running session.
    async fn session(&self) -> Result<Arc<Session>, ProviderError> {
        self.shell.session().await
    }

    /// How often this provider's recovery paths ran (register them to export).
    pub fn metrics(&self) -> &RegistryProviderMetrics {
        &self.metrics
    }

    async fn start(
        &self,
        ctx: ClusterProviderContext,
        role: pb::Role,
    ) -> Result<(), ProviderError> {
        let mut running = self.shell.starting().await?;
        let channel = self.config.channel()?;
        let session = Arc::new(Session {
            config: self.config.clone(),
            client: RegistryClient::new(channel).max_decoding_message_size(super::MAX_DECODE_BYTES),
            member: Mutex::new(ctx.member.clone()),
            standing: MemberStanding::new(
                self.config.lease_timing(Duration::from_secs(6)),
                self.metrics.membership_lost.clone(),
                self.metrics.membership_restored.clone(),
            ),
            unanswered_join: Mutex::new(None),
            secret: format!(
                "{:016x}{:016x}",
                ctx.clock.random_u64(),
                ctx.clock.random_u64()
            ),
            ctx: ctx.clone(),
            role,
            token: Mutex::new(None),
            synced: std::sync::atomic::AtomicBool::new(false),
            metrics: self.metrics.clone(),
            joining: tokio::sync::Mutex::new(()),
            descriptions: Descriptions::new(ctx.member.description()),
            describe: tokio::sync::Notify::new(),
        });
        let interval = session.join(false).await?;
        let clock = ctx.clock.clone();
        let mut tasks = vec![
            clock.spawn(
                "registry-heartbeat",
                Box::pin(session.clone().heartbeat_loop(interval)),
            ),
            clock.spawn("registry-watch", Box::pin(session.clone().watch_loop())),
        ];
        if role == pb::Role::Member {
            tasks.push(clock.spawn("registry-lease", Box::pin(session.clone().lease_watchdog())));
        }
        let started = Running {
            session: session.clone(),
            tasks: tasks.into(),
        };
        // Wait for the first topology (one that contains this node, for a member).
        let pm = ctx.partition_manager.clone();
        let ready = ctx
            .wait_until(self.config.startup_timeout, || match role {
                pb::Role::Member => pm.topology().contains(&session.member_id()),
                _ => session.synced.load(std::sync::atomic::Ordering::SeqCst),
            })
            .await;
        if !ready {
            // Stop the tasks first (a re-join in flight finishes), then withdraw the
            // registration this start made: a failed start must leave nothing behind.
            let joining = session.joining.lock().await;
            drop(started);
            drop(joining);
            session.leave().await;
            return Err(ProviderError::Unavailable(format!(
                "no topology from the registry at {} within {:?}",
                self.config.endpoint, self.config.startup_timeout
            )));
        }
        tracing::info!(cluster = %ctx.cluster_name, member = %session.member_id(), role = ?role, registry = %self.config.endpoint, "registry provider started");
        *running = Some(started);
        Ok(())
    }
}

impl Session {
    fn clock(&self) -> &SharedClock {
        &self.ctx.clock
    }

    fn cluster_token(&self) -> String {
        self.config.cluster_token.clone().unwrap_or_default()
    }

    async fn call<T, F>(&self, fut: F) -> Result<T, Status>
    where
        F: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        match timeout(self.clock().as_ref(), self.config.rpc_timeout, fut).await {
            Ok(r) => r.map(tonic::Response::into_inner),
            Err(_) => Err(Status::deadline_exceeded(format!(
                "no answer from the registry within {:?}",
                self.config.rpc_timeout
            ))),
        }
    }

    /// This node's current incarnation id.
    fn member_id(&self) -> MemberId {
        lock(&self.member).id.clone()
    }

    /// Joins (or re-joins); returns the heartbeat interval the server asks for. `update`: only
    /// publish a new description of the registration this member holds; if the registry no
    /// longer holds it (expired, or restarted and lost it), this is a lost registration: the
    /// member joins again under a new id.
    async fn join(&self, update: bool) -> Result<Duration, ProviderError> {
        self.retire_stale_id();
        // Held until the new token is stored: a shutdown waits for a join in flight instead of
        // cancelling it after the registry applied it (which would leave a registration behind
        // that no Leave can name). One attempt is bounded by the RPC deadline.
        let _joining = self.joining.lock().await;
        let mut refused_as_removed = false;
        let mut update_only = update && self.role == pb::Role::Member;
        loop {
            let (member, generation) = self.descriptions.current(&self.member);
            let req = pb::JoinRequest {
                cluster: self.ctx.cluster_name.clone(),
                member: Some(wire::member_to_pb(&member)),
                role: self.role as i32,
                cluster_token: self.cluster_token(),
                incarnation_secret: self.secret.clone(),
                update_only,
            };
            let mut client = self.client.clone();
            let sent_at = self.clock().now();
            let resp = match self.call(client.join(req)).await {
                Ok(resp) => resp,
                Err(s)
                    if (s.code() == Code::FailedPrecondition
                        || (update_only && s.code() == Code::NotFound))
                        && self.role == pb::Role::Member
                        && !refused_as_removed =>
                {
                    // This id was removed (a join of it arrived late, after its expiry), or
                    // the registry no longer holds it (it restarted): peers saw it go, so it
                    // cannot come back. Join as a new incarnation at once.
                    refused_as_removed = true;
                    update_only = false;
                    *lock(&self.unanswered_join) = None;
                    self.standing
                        .revoked(&self.ctx, &lock(&self.member).clone());
                    self.rotate_id("the registry removed this id");
                    continue;
                }
                Err(s) => {
                    if matches!(s.code(), Code::DeadlineExceeded | Code::Unavailable) {
                        // The registry may have registered this id without the answer arriving.
                        lock(&self.unanswered_join).get_or_insert(sent_at);
                    }
                    return Err(provider_error(s));
                }
            };
            *lock(&self.unanswered_join) = None;
            *lock(&self.token) = Some(resp.member_token);
            if self.descriptions.accepted(&member, generation) {
                self.metrics.description_updates.inc();
                tracing::info!(member = %member.id, version = resp.topology_version, kinds = ?member.kinds, zone = ?member.zone, "the registry accepted this member's new description");
            }
            tracing::debug!(member = %member.id, version = resp.topology_version, "joined the registry");
            if resp.ttl_ms > 0 {
                let timing = self.config.lease_timing(Duration::from_millis(resp.ttl_ms));
                self.standing.set_timing(timing);
            }
            self.renewed(sent_at);
            return Ok(Duration::from_millis(resp.heartbeat_interval_ms.max(1)));
        }
    }

    /// Whether this member's description changed since the registry last accepted it.
    fn description_pending(&self) -> bool {
        self.role == pb::Role::Member && self.descriptions.pending()
    }

    /// Takes a new incarnation id if a join of the current one went unanswered long enough
    /// ago that the registry may have registered it *and* expired it since: joining under that
    /// id again would bring a removed member back.
    fn retire_stale_id(&self) {
        let Some(first) = *lock(&self.unanswered_join) else {
            return;
        };
        let lost_after = self.standing.timing().lost_after();
        if self.clock().now().saturating_duration_since(first) < lost_after {
            return;
        }
        *lock(&self.unanswered_join) = None;
        self.rotate_id("an unanswered join may have registered and expired this id");
    }

    /// Replaces this member's incarnation id (members only), remembering the lost one for the
    /// restore announcement.
    fn rotate_id(&self, why: &str) {
        if self.role != pb::Role::Member {
            return;
        }
        let mut member = lock(&self.member);
        let old = member.id.clone();
        member.id = old.successor(self.clock().as_ref());
        tracing::debug!(old = %old, new = %member.id, why, "joining as a new incarnation");
    }

    /// A join or heartbeat sent at `sent_at` was accepted.
    fn renewed(&self, sent_at: crate::runtime::Instant) {
        if self.role != pb::Role::Member {
            return;
        }
        let member = lock(&self.member).clone();
        self.standing.renewed(&self.ctx, &member, sent_at);
    }

    /// The registration is gone (the registry said so): publish the loss if it was not
    /// already, and take a new incarnation id for the re-join, so peers that saw this member
    /// removed never see it come back.
    fn revoked(&self) {
        if self.role != pb::Role::Member {
            return;
        }
        let member = lock(&self.member).clone();
        self.standing.revoked(&self.ctx, &member);
        self.rotate_id("the registry no longer knows this member");
    }

    /// Publishes [`crate::ClusterEvent::MembershipLost`] when no heartbeat was accepted for the
    /// lease's `lost_after`, measured on this node's monotonic clock.
    async fn lease_watchdog(self: Arc<Self>) {
        self.standing
            .watchdog(&self.ctx, || lock(&self.member).clone())
            .await
    }

    async fn rejoin_until_done(&self) -> Duration {
        let mut attempt = 0;
        loop {
            match self.join(false).await {
                Ok(interval) => return interval,
                Err(e) => {
                    tracing::warn!(member = %self.member_id(), error = %e, attempt, "re-join failed");
                    self.clock().sleep(self.backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
    }

    /// The backoff before retry `attempt`, counting retries that reached the cap.
    fn backoff(&self, attempt: u32) -> Duration {
        let b = &self.config.backoff;
        if b.is_capped(attempt) {
            self.metrics.backoff_capped.inc();
        }
        b.delay(attempt, self.clock().as_ref())
    }

    async fn heartbeat_loop(self: Arc<Self>, interval: Duration) {
        let mut pacer = RenewPacer::new(interval, self.clock().now());
        loop {
            let pause = pacer.pause(self.clock().now(), |n| self.backoff(n));
            tokio::select! {
                biased;
                _ = self.describe.notified() => {}
                _ = self.clock().sleep(pause) => {}
            }
            pacer.start(self.clock().now());
            if self.description_pending() {
                // A join with this incarnation's secret replaces the description (and the
                // token) of the same registration: peers see one `changed` member. It renews
                // the registration too, so it stands in for this heartbeat.
                match self.join(true).await {
                    Ok(i) => {
                        pacer.set_interval(i);
                        pacer.succeeded();
                    }
                    Err(ProviderError::Rejected(why)) => {
                        self.descriptions.refuse(&self.member, why)
                    }
                    Err(e) => {
                        let failures = pacer.failed(None);
                        tracing::warn!(member = %self.member_id(), error = %e, failures, "publishing this member's new description failed; retrying");
                    }
                }
                continue;
            }
            let token = lock(&self.token).clone().unwrap_or_default();
            let req = pb::HeartbeatRequest {
                cluster: self.ctx.cluster_name.clone(),
                member_token: token,
            };
            let mut client = self.client.clone();
            let sent_at = self.clock().now();
            if sim::flaw("lease-renewed-on-attempt") {
                self.renewed(sent_at);
            }
            match self.call(client.heartbeat(req)).await {
                Ok(_) => {
                    pacer.succeeded();
                    self.renewed(sent_at);
                }
                Err(s) if s.code() == Code::NotFound && !sim::flaw("no-rejoin") => {
                    tracing::warn!(member = %self.member_id(), "registry no longer knows this member (expired or restarted); re-joining");
                    self.metrics.rejoins.inc();
                    self.revoked();
                    pacer.set_interval(self.rejoin_until_done().await);
                    // A join renews too: the next heartbeat is due an interval after it.
                    pacer.start(self.clock().now());
                    pacer.succeeded();
                }
                Err(s) => {
                    self.metrics.heartbeat_failures.inc();
                    let failures = pacer.failed(None);
                    let level_warn = failures == 2;
                    if level_warn {
                        tracing::warn!(member = %self.member_id(), code = ?s.code(), message = s.message(), failures, "heartbeats failing");
                    } else {
                        tracing::debug!(member = %self.member_id(), code = ?s.code(), message = s.message(), failures, "heartbeat failed");
                    }
                }
            }
        }
    }

    async fn watch_loop(self: Arc<Self>) {
        let mut held: Option<Arc<ClusterTopology>> = None;
        let mut attempt = 0u32;
        loop {
            let mut delivered = false;
            let err = self.watch_once(&mut held, &mut delivered).await;
            if delivered {
                attempt = 0;
            }
            let metric = match err {
                WatchEnd::Gap(_) => &self.metrics.watch_gaps,
                WatchEnd::Idle(_) => &self.metrics.watch_idle_reopens,
                WatchEnd::Failed(_) => &self.metrics.watch_reopens,
            };
            metric.inc();
            let delay = self.backoff(attempt);
            tracing::debug!(member = %self.member_id(), error = %err, ?delay, "watch ended; reconnecting");
            attempt = attempt.saturating_add(1);
            self.clock().sleep(delay).await;
        }
    }

    /// Runs one watch stream until it fails; returns why.
    async fn watch_once(
        &self,
        held: &mut Option<Arc<ClusterTopology>>,
        delivered: &mut bool,
    ) -> WatchEnd {
        let req = pb::WatchRequest {
            cluster: self.ctx.cluster_name.clone(),
            from_version: held.as_ref().map_or(0, |t| t.version()),
            cluster_token: self.cluster_token(),
            epoch: held.as_ref().map_or(0, |t| t.epoch()),
            fragments: true,
            accept_encodings: if self.config.compressed_snapshots {
                vec![pb::MembersEncoding::Zlib as i32]
            } else {
                Vec::new()
            },
        };
        let mut assembler = wire::SnapshotAssembler::new(super::MAX_DECODE_BYTES);
        let mut client = self.client.clone();
        let mut stream = match self.call(client.watch(req)).await {
            Ok(s) => s,
            Err(s) => {
                return WatchEnd::Failed(format!("watch refused: {:?} {}", s.code(), s.message()));
            }
        };
        // One timer per idle period, not one per message (see `IdleTimeout`).
        let mut idle = IdleTimeout::new(self.clock().clone(), self.config.watch_idle_timeout);
        loop {
            let msg = match idle.run(stream.message()).await {
                Err(_) => {
                    return WatchEnd::Idle(format!(
                        "watch quiet for {:?}",
                        self.config.watch_idle_timeout
                    ));
                }
                Ok(Err(s)) => {
                    return WatchEnd::Failed(format!(
                        "watch failed: {:?} {}",
                        s.code(),
                        s.message()
                    ));
                }
                Ok(Ok(None)) => return WatchEnd::Failed("watch ended by the server".into()),
                Ok(Ok(Some(msg))) => msg,
            };
            let msg = match assembler.feed(msg) {
                Ok(Some(whole)) => whole,
                Ok(None) => {
                    self.metrics.snapshot_fragments.inc();
                    continue;
                }
                Err(e) => return WatchEnd::Failed(e.to_string()),
            };
            match &msg.event {
                Some(pb::watch_response::Event::Progress(p))
                    if !*delivered && held.as_ref().is_some_and(|h| h.version() == p.version) =>
                {
                    self.metrics.watch_resumed.inc();
                }
                Some(pb::watch_response::Event::Snapshot(s)) => {
                    self.metrics.snapshots_applied.inc();
                    if s.encoding == pb::MembersEncoding::Zlib as i32 {
                        self.metrics.compressed_snapshots.inc();
                    }
                    if held.as_ref().is_some_and(|h| h.epoch() != s.epoch) {
                        self.metrics.epoch_changes.inc();
                        tracing::info!(member = %self.member_id(), epoch = format_args!("{:x}", s.epoch), version = s.version, "the registry restarted (new epoch): taking its snapshot as a reset");
                    }
                }
                _ => {}
            }
            *delivered = true;
            self.synced.store(true, std::sync::atomic::Ordering::SeqCst);
            match wire::next_topology(&self.ctx.cluster_name, held.as_ref(), msg) {
                Ok(None) => {}
                Ok(Some(topology)) => {
                    *held = Some(topology.clone());
                    match self.ctx.apply_topology(topology) {
                        Ok(_) | Err(PlacementError::StaleTopology { .. }) => {}
                        Err(e) => tracing::warn!(error = %e, "topology not applied"),
                    }
                }
                Err(
                    e @ (wire::WatchApplyError::Gap { .. }
                    | wire::WatchApplyError::EpochChanged { .. }),
                ) => return WatchEnd::Gap(e.to_string()),
                Err(e) => return WatchEnd::Failed(e.to_string()),
            }
        }
    }

    /// Sends Leave, retrying transient failures a few times (a lost packet must not turn a
    /// graceful shutdown into a TTL expiry). A retry of a Leave that did arrive is answered
    /// NotFound, which is success too.
    async fn leave(&self) {
        let token = lock(&self.token).take();
        let Some(token) = token else { return };
        let req = pb::LeaveRequest {
            cluster: self.ctx.cluster_name.clone(),
            member_token: token,
        };
        let mut last = None;
        for attempt in 0..LEAVE_ATTEMPTS {
            if attempt > 0 {
                self.clock().sleep(self.backoff(attempt - 1)).await;
            }
            let mut client = self.client.clone();
            match self.call(client.leave(req.clone())).await {
                Ok(_) => return,
                Err(s) if s.code() == Code::NotFound && attempt > 0 => return,
                Err(s) if matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                    tracing::debug!(member = %self.member_id(), attempt, code = ?s.code(), message = s.message(), source = ?std::error::Error::source(&s), "leave failed; retrying");
                    last = Some(s);
                }
                Err(s) => {
                    last = Some(s);
                    break;
                }
            }
        }
        if let Some(s) = last {
            tracing::warn!(member = %self.member_id(), code = ?s.code(), message = s.message(), "leave failed; the registry will expire this member");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How many times a graceful shutdown tries to send Leave.
const LEAVE_ATTEMPTS: u32 = 5;

/// Why a watch stream ended (each reopen is counted by reason).
#[derive(Debug)]
enum WatchEnd {
    /// An update did not follow the version held.
    Gap(String),
    /// Nothing arrived for the idle timeout.
    Idle(String),
    /// Refused, failed, malformed, or ended by the server.
    Failed(String),
}

impl std::fmt::Display for WatchEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (WatchEnd::Gap(s) | WatchEnd::Idle(s) | WatchEnd::Failed(s)) = self;
        f.write_str(s)
    }
}

fn provider_error(s: Status) -> ProviderError {
    match s.code() {
        Code::InvalidArgument
        | Code::Unauthenticated
        | Code::PermissionDenied
        | Code::ResourceExhausted
        | Code::NotFound => ProviderError::Rejected(format!("{:?}: {}", s.code(), s.message())),
        _ => ProviderError::Unavailable(format!("{:?}: {}", s.code(), s.message())),
    }
}

#[async_trait]
impl LeaseSession for Session {
    fn is_member(&self) -> bool {
        self.role == pb::Role::Member
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
        &self.joining
    }

    fn write_soon(&self) {
        self.describe.notify_one();
    }

    /// Leaves with the registration token, if there is one (a member's registration).
    async fn release(&self) {
        if !sim::flaw("shutdown-skips-leave") {
            self.leave().await;
        }
    }

    fn backend(&self) -> String {
        format!("the registry at {}", self.config.endpoint)
    }

    fn provider(&self) -> &'static str {
        "registry provider"
    }
}

#[async_trait]
impl ClusterProvider for RegistryProvider {
    async fn start_member(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        self.start(ctx, pb::Role::Member).await
    }

    async fn start_client(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError> {
        self.start(ctx, pb::Role::Client).await
    }

    async fn shutdown(&self, graceful: bool) -> Result<(), ProviderError> {
        // A (re-)join in flight finishes first, so Leave names the registration that exists.
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
        let req = pb::ResolveRequest {
            cluster: session.ctx.cluster_name.clone(),
            member_id: member.to_string(),
            cluster_token: session.cluster_token(),
        };
        let mut client = session.client.clone();
        let resp = session
            .call(client.resolve(req))
            .await
            .map_err(|s| match s.code() {
                Code::NotFound => ProviderError::UnknownMember(member.clone()),
                _ => provider_error(s),
            })?;
        let found = resp
            .member
            .ok_or_else(|| ProviderError::Unavailable("registry answered without a member".into()))
            .and_then(|m| wire::member_from_pb(m).map_err(ProviderError::from))?;
        Ok(Arc::new(GrpcPartitionManager::new(
            session.ctx.cluster_name.clone(),
            found,
            session.config.rpc_timeout,
            session.ctx.clock.clone(),
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::TokioClock;

    #[test]
    fn debug_output_does_not_show_the_cluster_token() {
        let mut c = RegistryProviderConfig::new("http://r:1");
        c.cluster_token = Some("hunter2".into());
        let text = format!("{c:?}");
        assert!(
            text.contains("redacted") && !text.contains("hunter2"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn backoff_grows_caps_and_jitters_within_bounds() {
        let b = Backoff::default();
        let clock = TokioClock;
        for attempt in 0..30 {
            let exp = (b.initial * 2u32.pow(attempt.min(20))).min(b.max);
            let d = b.delay(attempt, &clock);
            assert!(
                d >= exp / 2 && d <= exp,
                "attempt {attempt}: {d:?} not in [{:?}, {exp:?}]",
                exp / 2
            );
        }
        assert!(b.delay(40, &clock) <= b.max);
        // 100 ms doubles to 6.4 s at attempt 6: capped from there on.
        assert!(!b.is_capped(0) && !b.is_capped(5));
        assert!(b.is_capped(6) && b.is_capped(30));
    }
}
