//! [`EtcdProvider`]: membership in etcd, the async shell over [`super::members`].
//!
//! A member grants a lease of `ttl`, writes its key bound to it, and keeps the lease alive
//! every `ttl / 3`. Etcd deletes the key when the lease expires, on etcd's clock: nobody else
//! judges a member's liveness. Every node lists the members prefix and watches it from the
//! list's revision + 1; a compacted revision relists and swaps the view at once. Topology
//! versions are etcd revisions and epochs the etcd cluster id, so nodes agree on versions.
//!
//! A member that cannot keep its lease alive for longer than the lease's TTL (less the drift
//! and margin of [`LeaseTiming`]) announces [`crate::ClusterEvent::MembershipLost`]; when etcd
//! says the lease is gone (or its key was deleted) it registers again as a **new
//! incarnation** (new id, new lease, new key), so peers never see a removed id come back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;

use super::api::{EtcdApi, EtcdError, LeaseId, Revision};
use super::members::{EtcdView, encode_member, members_prefix};
use super::metrics::EtcdProviderMetrics;
use crate::cluster::{Description, Member, MemberId};
use crate::placement::PlacementError;
use crate::provider::describe::Descriptions;
use crate::provider::lease::MemberStanding;
use crate::provider::shell::{LeaseSession, Running, Shell};
use crate::provider::{
    Backoff, ClusterProvider, ClusterProviderContext, LeaseTiming, PartitionManagerHandle,
    ProviderError, RenewPacer, remote::GrpcPartitionManager,
};
use crate::runtime::{SharedClock, jitter, sim, timeout};

/// Settings of the etcd provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdProviderConfig {
    /// The key prefix (members live under `<prefix>/<cluster>/members/`).
    pub prefix: String,
    /// The lease TTL: a crashed member's key is gone this long after its last keep-alive.
    /// Whole seconds, at least 2 s (etcd's minimum TTL with default timings).
    pub ttl: Duration,
    /// Time between keep-alives (default a third of the TTL).
    pub keep_alive_interval: Option<Duration>,
    /// Deadline of each call.
    pub request_timeout: Duration,
    /// Pacing of retries (watch reopen, re-join).
    pub backoff: Backoff,
    /// A watch that carries nothing (not even a progress notification) for this long is
    /// reopened.
    pub watch_idle_timeout: Duration,
    /// How long `start_member` waits to see this node in its own topology.
    pub startup_timeout: Duration,
    /// Time left for the application to stop serving before etcd can expire the lease
    /// (default a tenth of the TTL).
    pub lease_margin: Option<Duration>,
    /// The largest clock rate error assumed, in parts per million.
    pub max_clock_drift_ppm: u32,
    /// Deadline of calls to another member's partition service.
    pub partition_rpc_timeout: Duration,
    /// The least time between two topologies this node publishes: a change after a quiet spell
    /// is published at once, and the changes of a burst (a thousand members joining, a relist
    /// storm) are published together at most this often, so a node applies a few topologies
    /// a second instead of one per etcd revision.
    pub publish_interval: Duration,
    /// A relist (after a compacted revision, or a store that lost its data) waits a random
    /// time up to this long first (default 1 s): every member is sent to relist at the same
    /// moment, and their ranges would land on etcd together.
    pub relist_jitter: Duration,
    /// How often (on average: each time a random 50-150% of it) the view is audited: etcd
    /// counts the keys under the prefix at the view's revision, a constant-size read, and a
    /// different number, or a revision etcd no longer has (a snapshot restored with the same
    /// cluster id), lists again. `None`: never. Default 2 min.
    pub audit_every: Option<Duration>,
}

impl Default for EtcdProviderConfig {
    fn default() -> Self {
        Self {
            prefix: "/shoal".into(),
            ttl: Duration::from_secs(10),
            keep_alive_interval: None,
            request_timeout: Duration::from_secs(2),
            backoff: Backoff::default(),
            watch_idle_timeout: Duration::from_secs(30),
            startup_timeout: Duration::from_secs(10),
            lease_margin: None,
            max_clock_drift_ppm: LeaseTiming::DEFAULT_MAX_DRIFT_PPM,
            partition_rpc_timeout: Duration::from_secs(2),
            publish_interval: Duration::from_millis(20),
            relist_jitter: Duration::from_secs(1),
            audit_every: Some(Duration::from_secs(120)),
        }
    }
}

impl EtcdProviderConfig {
    /// The keep-alive interval in force.
    pub fn keep_alive_interval(&self) -> Duration {
        self.keep_alive_interval.unwrap_or(self.ttl / 3)
    }

    /// Checks the settings; the error names the setting.
    pub fn validate(&self) -> Result<(), ProviderError> {
        let bad = |what: String| Err(ProviderError::Rejected(what));
        if !self.prefix.starts_with('/') || self.prefix.len() < 2 {
            return bad(format!(
                "prefix must start with '/' and name something (got {:?})",
                self.prefix
            ));
        }
        if self.ttl < Duration::from_secs(2) || self.ttl.subsec_nanos() != 0 {
            return bad(format!(
                "ttl must be a whole number of seconds, at least 2 s (got {:?})",
                self.ttl
            ));
        }
        let every = self.keep_alive_interval();
        if every.is_zero() || every >= self.ttl {
            return bad(format!(
                "keep_alive_interval must be above zero and below ttl (got {every:?} for {:?})",
                self.ttl
            ));
        }
        if self.request_timeout.is_zero() {
            return bad("request_timeout must be above zero".into());
        }
        if self.audit_every.is_some_and(|a| a < Duration::from_secs(1)) {
            return bad(format!(
                "audit_every must be at least 1 s, or None (got {:?})",
                self.audit_every
            ));
        }
        if self.publish_interval >= self.keep_alive_interval() {
            return bad(format!(
                "publish_interval must be below the keep-alive interval (got {:?} for {every:?})",
                self.publish_interval
            ));
        }
        Ok(())
    }

    fn lease_timing(&self, ttl: Duration) -> LeaseTiming {
        LeaseTiming {
            ttl,
            max_clock_drift_ppm: self.max_clock_drift_ppm,
            margin: self.lease_margin.unwrap_or(ttl / 10),
        }
    }
}

/// A [`ClusterProvider`] backed by etcd: see the module docs.
pub struct EtcdProvider {
    config: EtcdProviderConfig,
    api: Arc<dyn EtcdApi>,
    shell: Shell<Session>,
    metrics: EtcdProviderMetrics,
}

impl std::fmt::Debug for EtcdProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdProvider")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One start of the provider: what its tasks share.
struct Session {
    api: Arc<dyn EtcdApi>,
    config: EtcdProviderConfig,
    ctx: ClusterProviderContext,
    member_mode: bool,
    prefix: String,
    /// This node as registered (its id changes with each new incarnation).
    member: Mutex<Member>,
    /// The lease this incarnation's key is bound to.
    lease: Mutex<Option<LeaseId>>,
    /// The revision of this incarnation's last write of its key.
    written_at: Mutex<Revision>,
    /// Set when the view, past `written_at`, holds this member's key with another value than
    /// the member's (written again at the next keep-alive round).
    key_stale: std::sync::atomic::AtomicBool,
    /// Set when the view, past `written_at`, no longer holds this member's key.
    key_deleted: std::sync::atomic::AtomicBool,
    /// Keys of earlier incarnations at this member's address (a process restarted in place),
    /// to delete: their leases would keep them listed for up to a TTL, owning what this
    /// incarnation should.
    ghosts: Mutex<std::collections::BTreeSet<String>>,
    standing: MemberStanding,
    descriptions: Descriptions,
    view: Mutex<EtcdView>,
    metrics: EtcdProviderMetrics,
    /// Wakes the keep-alive loop (a new description to write, this member's key deleted).
    poke: tokio::sync::Notify,
    /// Serializes writes of this member's key and lease.
    writing: tokio::sync::Mutex<()>,
}

/// How a watch stream ended.
enum WatchEnd {
    /// The view must be listed again.
    Relist(&'static str),
    /// The stream failed or ended: reopen it where it left off.
    Reopen(EtcdError),
}

impl From<EtcdError> for WatchEnd {
    fn from(e: EtcdError) -> Self {
        match e {
            EtcdError::Compacted { .. } if !sim::flaw("etcd-compacted-not-relisted") => {
                WatchEnd::Relist("the watch's revision is compacted")
            }
            EtcdError::WentBack { .. } => {
                WatchEnd::Relist("etcd's revision went back (restored from a snapshot?)")
            }
            other => WatchEnd::Reopen(other),
        }
    }
}

/// Why a call failed, with what was being done.
#[derive(Debug)]
struct CallError {
    what: String,
    error: EtcdError,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.what, self.error)
    }
}

impl CallError {
    fn into_provider_error(self) -> ProviderError {
        match self.error {
            EtcdError::Rejected(_) => ProviderError::Rejected(self.to_string()),
            _ => ProviderError::Unavailable(self.to_string()),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl EtcdProvider {
    /// A provider talking to etcd through `api`.
    pub fn new(config: EtcdProviderConfig, api: Arc<dyn EtcdApi>) -> Self {
        Self {
            config,
            api,
            shell: Shell::default(),
            metrics: EtcdProviderMetrics::default(),
        }
    }

    /// Replaces the startup timeout (before the start).
    pub fn set_startup_timeout(&mut self, within: Duration) {
        self.config.startup_timeout = within;
    }

    /// This provider's metrics.
    pub fn metrics(&self) -> &EtcdProviderMetrics {
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
        let mut running = self.shell.starting().await?;
        let prefix = members_prefix(&self.config.prefix, &ctx.cluster_name);
        let session = Arc::new(Session {
            api: self.api.clone(),
            config: self.config.clone(),
            member_mode,
            prefix: prefix.clone(),
            member: Mutex::new(ctx.member.clone()),
            lease: Mutex::new(None),
            written_at: Mutex::new(0),
            key_stale: std::sync::atomic::AtomicBool::new(false),
            key_deleted: std::sync::atomic::AtomicBool::new(false),
            ghosts: Mutex::default(),
            standing: MemberStanding::new(
                self.config.lease_timing(self.config.ttl),
                self.metrics.membership_lost.clone(),
                self.metrics.membership_restored.clone(),
            ),
            descriptions: Descriptions::new(ctx.member.description()),
            view: Mutex::new(EtcdView::new(prefix)),
            metrics: self.metrics.clone(),
            poke: tokio::sync::Notify::new(),
            writing: tokio::sync::Mutex::new(()),
            ctx: ctx.clone(),
        });
        let clock = ctx.clock.clone();
        if member_mode {
            session.first_join().await?;
        }
        let mut tasks = vec![clock.spawn("etcd-watch", Box::pin(session.clone().reflect()))];
        if member_mode {
            tasks.push(clock.spawn(
                "etcd-keep-alive",
                Box::pin(session.clone().keep_alive_loop()),
            ));
            tasks.push(clock.spawn("etcd-lease", Box::pin(session.clone().lease_watchdog())));
        }
        let started = Running {
            session: session.clone(),
            tasks: tasks.into(),
        };
        let pm = ctx.partition_manager.clone();
        let ready = ctx
            .wait_until(self.config.startup_timeout, || {
                if member_mode {
                    pm.topology().contains(&session.member_id())
                } else {
                    lock(&session.view).is_synced()
                }
            })
            .await;
        if !ready {
            drop(started);
            if member_mode {
                session.revoke_own().await;
            }
            return Err(ProviderError::Unavailable(format!(
                "this node did not see {} under {} within {:?}",
                if member_mode {
                    "itself"
                } else {
                    "a first list"
                },
                session.prefix,
                self.config.startup_timeout
            )));
        }
        tracing::info!(cluster = %ctx.cluster_name, member = %session.member_id(), member_mode, prefix = %session.prefix, "etcd provider started");
        *running = Some(started);
        Ok(())
    }
}

impl Session {
    fn clock(&self) -> &SharedClock {
        &self.ctx.clock
    }

    fn member_id(&self) -> MemberId {
        lock(&self.member).id.clone()
    }

    fn key(&self, id: &MemberId) -> String {
        format!("{}{id}", self.prefix)
    }

    /// Runs one etcd call under the request deadline.
    async fn call<T>(
        &self,
        what: impl FnOnce() -> String,
        fut: impl std::future::Future<Output = Result<T, EtcdError>>,
    ) -> Result<T, CallError> {
        let error = match timeout(self.clock().as_ref(), self.config.request_timeout, fut).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => e,
            Err(_) => EtcdError::Unavailable(format!(
                "no answer within {:?}",
                self.config.request_timeout
            )),
        };
        Err(CallError {
            what: what(),
            error,
        })
    }

    /// The first registration, tried again (with the backoff) while etcd is unavailable (a
    /// leader election, an etcd member down) until the startup timeout; a refusal (auth,
    /// permission) fails at once.
    async fn first_join(&self) -> Result<(), ProviderError> {
        let deadline = self.clock().now() + self.config.startup_timeout;
        let mut attempt = 0u32;
        loop {
            let writing = self.writing.lock().await;
            let joined = self.join().await;
            drop(writing);
            let Err(e) = joined else {
                return Ok(());
            };
            let retry = !matches!(e.error, EtcdError::Rejected(_)) && self.clock().now() < deadline;
            if !retry {
                return Err(e.into_provider_error());
            }
            tracing::warn!(error = %e, attempt, "registering in etcd failed; trying again");
            self.pause(&mut attempt).await;
        }
    }

    /// Registers this incarnation: a new lease, then its key bound to it. The caller holds
    /// `writing`.
    async fn join(&self) -> Result<(), CallError> {
        let sent_at = self.clock().now();
        let (lease, ttl) = self
            .call(
                || "grant a lease".to_string(),
                self.api.lease_grant(self.config.ttl),
            )
            .await?;
        self.standing.set_timing(self.config.lease_timing(ttl));
        let (member, generation) = self.descriptions.current(&self.member);
        let key = self.key(&member.id);
        let written = self
            .call(
                || format!("put {key}"),
                self.api.put(&key, encode_member(&member), lease),
            )
            .await;
        let revision = match written {
            Ok(r) => r,
            Err(e) => {
                // Do not leave a lease behind (best effort: it expires anyway).
                let _ = self
                    .call(|| "revoke".into(), self.api.lease_revoke(lease))
                    .await;
                return Err(e);
            }
        };
        *lock(&self.written_at) = revision;
        self.key_deleted
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.descriptions.accepted(&member, generation);
        *lock(&self.lease) = Some(lease);
        self.standing.renewed(&self.ctx, &member, sent_at);
        tracing::info!(member = %member.id, lease = format!("{lease:x}"), ttl = ?ttl, key = %key, "registered in etcd");
        Ok(())
    }

    /// The lease is gone (expired, revoked, or the key deleted): announce it and take a new
    /// incarnation, registered at the next keep-alive round.
    fn lost(&self, why: &str) {
        let member = lock(&self.member).clone();
        self.standing.revoked(&self.ctx, &member);
        *lock(&self.lease) = None;
        let mut m = lock(&self.member);
        let old = m.id.clone();
        if !sim::flaw("etcd-rejoin-same-id") {
            m.id = old.successor(self.clock().as_ref());
        }
        tracing::info!(old = %old, new = %m.id, why, "taking a new incarnation");
    }

    /// One round: keep the lease alive (or register again), and write a new description.
    async fn keep_alive_once(&self) -> Result<(), CallError> {
        let _writing = self.writing.lock().await;
        if self
            .key_deleted
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            // Someone deleted this member's key: peers saw this incarnation go.
            let old = lock(&self.lease).take();
            self.lost("its key was deleted");
            if let Some(old) = old {
                let _ = self
                    .call(|| "revoke".into(), self.api.lease_revoke(old))
                    .await;
            }
        }
        let ghosts = std::mem::take(&mut *lock(&self.ghosts));
        for key in ghosts {
            match self
                .call(|| format!("delete {key}"), self.api.delete(&key))
                .await
            {
                Ok(_) => {
                    tracing::info!(key = %key, "deleted the key of an earlier incarnation at this member's address");
                }
                Err(e) => {
                    lock(&self.ghosts).insert(key);
                    return Err(e);
                }
            }
        }
        let lease = *lock(&self.lease);
        let Some(lease) = lease else {
            self.metrics.rejoins.inc();
            return self.join().await;
        };
        let sent_at = self.clock().now();
        match self
            .call(
                || format!("keep lease {lease:x} alive"),
                self.api.lease_keep_alive(lease),
            )
            .await
        {
            Ok(_) => {
                self.metrics.keep_alives.inc();
                let member = lock(&self.member).clone();
                let sent_at = if sim::flaw("etcd-keep-alive-dated-on-answer") {
                    self.clock().now()
                } else {
                    sent_at
                };
                self.standing.renewed(&self.ctx, &member, sent_at);
            }
            Err(CallError {
                error: EtcdError::LeaseNotFound(_),
                ..
            }) => {
                self.lost("its lease expired or was revoked");
                self.metrics.rejoins.inc();
                return self.join().await;
            }
            Err(e) => {
                if sim::flaw("etcd-renewed-on-attempt") {
                    let member = lock(&self.member).clone();
                    self.standing.renewed(&self.ctx, &member, sent_at);
                }
                return Err(e);
            }
        }
        let stale = self
            .key_stale
            .swap(false, std::sync::atomic::Ordering::SeqCst);
        if stale && !self.descriptions.pending() {
            self.metrics.own_key_rewrites.inc();
            tracing::warn!(
                member = %lock(&self.member).id,
                "etcd holds this member's key with another value than it wrote (restored from an older snapshot?); writing it again"
            );
        }
        if self.descriptions.pending() || stale {
            let (member, generation) = self.descriptions.current(&self.member);
            let key = self.key(&member.id);
            match self
                .call(
                    || format!("put {key}"),
                    self.api.put(&key, encode_member(&member), lease),
                )
                .await
            {
                Ok(revision) => {
                    *lock(&self.written_at) = revision;
                    self.descriptions.accepted(&member, generation);
                }
                Err(CallError {
                    error: EtcdError::LeaseNotFound(_),
                    ..
                }) => {
                    self.lost("its lease expired while writing its description");
                }
                Err(e) => {
                    if matches!(e.error, EtcdError::Rejected(_)) {
                        self.descriptions.refuse(&self.member, e.to_string());
                    }
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    async fn keep_alive_loop(self: Arc<Self>) {
        let interval = if sim::flaw("etcd-keep-alive-every-ttl") {
            self.config.ttl
        } else {
            self.config.keep_alive_interval()
        };
        let mut pacer = RenewPacer::new(interval, self.clock().now());
        loop {
            let pause = pacer.pause(self.clock().now(), |n| {
                self.config.backoff.delay(n, self.clock().as_ref())
            });
            tokio::select! {
                biased;
                _ = self.poke.notified() => {}
                _ = self.clock().sleep(pause) => {}
            }
            pacer.start(self.clock().now());
            match self.keep_alive_once().await {
                Ok(()) => pacer.succeeded(),
                Err(e) => {
                    let failures = pacer.failed(None);
                    self.metrics.keep_alive_failures.inc();
                    if !self.refused(&e.error, || e.what.clone()) {
                        if failures >= 2 {
                            tracing::warn!(member = %self.member_id(), error = %e, failures, "etcd keep-alives failing");
                        } else {
                            tracing::debug!(member = %self.member_id(), error = %e, "etcd keep-alive failed");
                        }
                    }
                }
            }
        }
    }

    async fn lease_watchdog(self: Arc<Self>) {
        self.standing
            .watchdog(&self.ctx, || lock(&self.member).clone())
            .await
    }

    /// Revokes this incarnation's lease (its key goes with it).
    async fn revoke_own(&self) {
        let lease = lock(&self.lease).take();
        if let Some(lease) = lease
            && let Err(e) = self
                .call(
                    || format!("revoke lease {lease:x}"),
                    self.api.lease_revoke(lease),
                )
                .await
        {
            tracing::warn!(error = %e, "could not revoke this member's lease: its key stays until the lease expires");
        }
    }

    /// Issues the view's topology to the partition manager.
    fn publish(&self, view: &EtcdView) {
        for (key, why) in view.skipped() {
            self.metrics.keys_skipped.inc();
            tracing::warn!(key = %key, reason = %why, "skipping a key that describes no valid member");
        }
        match view.topology(&self.ctx.cluster_name) {
            Ok(t) => {
                self.metrics.members.set(t.len() as i64);
                self.metrics.topologies.inc();
                match self.ctx.apply_topology(Arc::new(t)) {
                    Ok(_) | Err(PlacementError::StaleTopology { .. }) => {}
                    Err(e) => tracing::warn!(error = %e, "topology not applied"),
                }
            }
            Err(e) => tracing::warn!(error = %e, "topology not built"),
        }
    }

    /// Lists, then watches from the list's revision + 1, forever; a compacted revision lists
    /// again, any other failure reopens the watch where it left off.
    async fn reflect(self: Arc<Self>) {
        let mut attempt = 0u32;
        loop {
            let listed = self
                .call(
                    || format!("list {}", self.prefix),
                    self.api.range_prefix(&self.prefix),
                )
                .await;
            let range = match listed {
                Ok(r) => r,
                Err(e) => {
                    if !self.refused(&e.error, || e.what.clone()) {
                        tracing::debug!(error = %e, "etcd list failed");
                    }
                    self.pause(&mut attempt).await;
                    continue;
                }
            };
            attempt = 0;
            {
                let mut view = lock(&self.view);
                let (cluster, epoch) = (view.cluster_id(), view.epoch());
                if view.relist(&range) {
                    self.publish(&view);
                }
                if view.epoch() != epoch && view.cluster_id() == cluster && epoch != 0 {
                    // The same store went back (a restore): the revision of this member's
                    // last write belongs to a history that is gone; its key, if the store
                    // holds it, is judged against what the member wrote from now on.
                    *lock(&self.written_at) = 0;
                }
            }
            self.check_own_key();
            // Watch until the revision is compacted or the store is another one.
            let mut reopening = false;
            loop {
                let from = lock(&self.view).revision() + 1;
                // A watch that ended may mean etcd restarted, possibly restored from a snapshot
                // with the same cluster id: writes since the restore may already have reached
                // the view's revision, and then the new watch would resume silently on another
                // history. An audit before reopening (a count and a point read at the view's
                // revision) finds it now rather than at the next periodic audit.
                let end = if reopening && self.config.audit_every.is_some() {
                    self.audit(true).await
                } else {
                    None
                };
                reopening = true;
                let end = match end {
                    Some(end) => end,
                    None => self.watch(from).await,
                };
                match end {
                    WatchEnd::Relist(why) => {
                        self.metrics.relists.inc();
                        let spread = jitter(self.clock().as_ref(), self.config.relist_jitter);
                        tracing::info!(prefix = %self.prefix, from, why, ?spread, "listing again");
                        self.clock().sleep(spread).await;
                        break;
                    }
                    WatchEnd::Reopen(e) => {
                        self.metrics.watch_reopens.inc();
                        if !self.refused(&e, || format!("watch {} from {from}", self.prefix)) {
                            tracing::debug!(error = %e, from, "etcd watch ended; reopening");
                        }
                        self.pause(&mut attempt).await;
                    }
                }
            }
        }
    }

    /// If etcd refused the request (authentication, permission: the user's role lost its
    /// grant on the prefix), says so at warn with the counter `etcd_refusals`, and returns
    /// true. The request is retried with the backoff: an operator can fix the role without
    /// restarting members, and each refusal is logged meanwhile.
    fn refused(&self, e: &EtcdError, what: impl FnOnce() -> String) -> bool {
        let EtcdError::Rejected(why) = e else {
            return false;
        };
        self.metrics.refusals.inc();
        tracing::warn!(request = %what(), error = %why, prefix = %self.prefix, "etcd refused this member's request (check the etcd user's role: read and write on the prefix, lease grant and revoke); retrying");
        true
    }

    async fn pause(&self, attempt: &mut u32) {
        let d = self.config.backoff.delay(*attempt, self.clock().as_ref());
        *attempt = attempt.saturating_add(1);
        self.clock().sleep(d).await;
    }

    /// One watch stream from `from`, applied until it fails or ends.
    async fn watch(&self, from: Revision) -> WatchEnd {
        let mut stream = match self
            .call(
                || format!("watch {} from {from}", self.prefix),
                self.api.watch_prefix(&self.prefix, from),
            )
            .await
        {
            Ok(s) => s,
            Err(e) => return WatchEnd::from(e.error),
        };
        // A change after a quiet spell is published at once; during a burst, at most once a
        // publish interval (the view is `pending` meanwhile).
        let mut published_at: Option<crate::runtime::Instant> = None;
        let mut pending = false;
        // The highest header revision this stream delivered. etcd's revisions only rise within
        // one stream (a store that loses its data restarts, which ends the stream), so a batch
        // below it is a repeated or reordered message, not a store that went back: it is
        // skipped, where comparing it with the view would list every member again.
        let mut stream_high: Option<Revision> = None;
        let mut heard_at = self.clock().now();
        let mut audit_at = self.next_audit(heard_at);
        loop {
            let now = self.clock().now();
            let due = published_at
                .map(|at| at + self.config.publish_interval)
                .filter(|_| pending);
            if due.is_some_and(|due| due <= now) {
                self.publish_now(&mut published_at, &mut pending);
                continue;
            }
            if audit_at.is_some_and(|at| at <= now) {
                audit_at = self.next_audit(now);
                if let Some(end) = self.audit(false).await {
                    self.publish_pending(&mut pending);
                    return end;
                }
                continue;
            }
            let quiet_at = heard_at + self.config.watch_idle_timeout;
            if quiet_at <= now {
                self.publish_pending(&mut pending);
                return WatchEnd::Reopen(EtcdError::Unavailable(format!(
                    "quiet for {:?}",
                    self.config.watch_idle_timeout
                )));
            }
            let until = [Some(quiet_at), due, audit_at]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(quiet_at);
            let next = timeout(self.clock().as_ref(), until - now, stream.next()).await;
            let batch = match next {
                // A deadline: publishing, an audit or the idle timeout, at the top.
                Err(_) => continue,
                Ok(None) => {
                    self.publish_pending(&mut pending);
                    return WatchEnd::Reopen(EtcdError::Unavailable("the watch ended".into()));
                }
                Ok(Some(Err(e))) => {
                    self.publish_pending(&mut pending);
                    return WatchEnd::from(e);
                }
                Ok(Some(Ok(batch))) => batch,
            };
            heard_at = self.clock().now();
            if let Some(high) = stream_high.filter(|h| batch.header_revision < *h) {
                self.metrics.batches_out_of_order.inc();
                tracing::debug!(
                    prefix = %self.prefix,
                    revision = batch.header_revision,
                    high,
                    "skipping a watch batch older than one this stream delivered"
                );
                continue;
            }
            stream_high = Some(batch.header_revision);
            let changed = {
                let mut view = lock(&self.view);
                if view.is_foreign(&batch) {
                    // What the view applied before is published first: the relist compares
                    // against it and publishes only if the fresh read differs.
                    if std::mem::take(&mut pending) {
                        self.publish(&view);
                    }
                    return WatchEnd::Relist(
                        "etcd lost its data (another cluster id, or its revision went back)",
                    );
                }
                view.apply(&batch)
            };
            if changed {
                pending = true;
                let quiet = published_at.is_none_or(|at| {
                    self.clock().now().saturating_duration_since(at) >= self.config.publish_interval
                });
                if quiet {
                    self.publish_now(&mut published_at, &mut pending);
                }
                self.check_own_key();
            }
        }
    }

    /// When the next audit of the view is due after `now` (a random 50-150% of the period, so
    /// that members spread their audits out).
    fn next_audit(&self, now: crate::runtime::Instant) -> Option<crate::runtime::Instant> {
        let every = self.config.audit_every?;
        Some(now + every / 2 + jitter(self.clock().as_ref(), every))
    }

    /// Audits the view: etcd counts the keys under the prefix at the view's revision (a
    /// constant-size answer), and says when the key of the view's latest write was last written
    /// as of that revision (a keys-only point read). A different count or write, or a revision
    /// etcd does not have, means the store went back (a snapshot restored with the same cluster
    /// id, whose revisions other writes then reuse, so no watch creation notices it): the view
    /// is wrong and is listed again. A restored history that reached the same revision with as
    /// many keys still differs in the write at the view's latest one, unless that write came
    /// before the snapshot. A compacted revision says nothing. etcd out of reach says nothing
    /// to a periodic audit (the next one tries again); before a watch that ended is reopened
    /// (`reopening`: etcd may have restarted from a snapshot) it ends the attempt, to be retried
    /// after the backoff, since a watch opened unaudited could resume on another history.
    async fn audit(&self, reopening: bool) -> Option<WatchEnd> {
        let (revision, held, last_put, last_delete) = {
            let view = lock(&self.view);
            let put = view.last_put().map(|(k, r)| (k.to_string(), r));
            let delete = view.last_delete().map(|(k, r)| (k.to_string(), r));
            (view.revision(), view.key_count() as i64, put, delete)
        };
        self.metrics.audits.inc();
        let counted = self
            .call(
                || format!("count {} at revision {revision}", self.prefix),
                self.api.count_prefix(&self.prefix, revision),
            )
            .await;
        let went_back = |current| {
            format!(
                "etcd no longer has revision {revision} (it is at {current}: restored from a snapshot?)"
            )
        };
        let why = match counted {
            Ok(n) if n != held => {
                format!("etcd holds {n} keys at revision {revision}, the view {held}")
            }
            Ok(_) => {
                // The latest write the view holds must be the store's at the view's revision,
                // and, when the view's latest change is a delete, the key it deleted must be
                // absent (a restore brings back keys deleted since its snapshot). No write and
                // no delete: the count is all there is.
                let checks = last_put
                    .map(|(key, written)| (key, Some(written)))
                    .into_iter()
                    .chain(
                        last_delete
                            .filter(|_| {
                                !sim::flaw("etcd-audit-ignores-deletes")
                                    && !sim::flaw("etcd-audit-count-only")
                            })
                            .map(|(key, _)| (key, None)),
                    );
                let mut why = None;
                for (key, expected) in checks {
                    let at = self
                        .call(
                            || format!("read {key} at revision {revision}"),
                            self.api.mod_revision_at(&key, revision),
                        )
                        .await;
                    match at {
                        Ok(r) if r == expected => {}
                        Ok(r) if !sim::flaw("etcd-audit-count-only") => {
                            why = Some(format!(
                                "at revision {revision} etcd has {key} last written at {r:?}, the view {}",
                                expected.map_or("saw it deleted".to_string(), |w| format!(
                                    "saw it written at {w}"
                                ))
                            ));
                            break;
                        }
                        Ok(_) => {}
                        Err(e) => match e.error {
                            EtcdError::WentBack { current, .. } => {
                                why = Some(went_back(current));
                                break;
                            }
                            _ => return self.audit_said_nothing(e, reopening),
                        },
                    }
                }
                why?
            }
            Err(e) => match e.error {
                EtcdError::WentBack { current, .. } => went_back(current),
                _ => return self.audit_said_nothing(e, reopening),
            },
        };
        self.metrics.audit_mismatches.inc();
        lock(&self.view).diverged();
        tracing::warn!(prefix = %self.prefix, revision, reason = %why, "the view does not match etcd; listing again");
        Some(WatchEnd::Relist("an audit found the view wrong"))
    }

    /// An audit that got no answer: nothing to act on, except before a reopen, where it ends
    /// the attempt (a compacted revision does not: the watch then fails too, and lists again).
    fn audit_said_nothing(&self, e: CallError, reopening: bool) -> Option<WatchEnd> {
        tracing::debug!(error = %e, "auditing the view said nothing");
        match e.error {
            EtcdError::Compacted { .. } => None,
            error if reopening => Some(WatchEnd::Reopen(error)),
            _ => None,
        }
    }

    /// Publishes the view now.
    fn publish_now(&self, published_at: &mut Option<crate::runtime::Instant>, pending: &mut bool) {
        self.publish(&lock(&self.view));
        *published_at = Some(self.clock().now());
        *pending = false;
    }

    /// Publishes the view if a change is waiting (the watch is ending: a relist or a reopen
    /// may take a while).
    fn publish_pending(&self, pending: &mut bool) {
        if std::mem::take(pending) {
            self.publish(&lock(&self.view));
        }
    }

    /// A member whose key disappeared while it believes its lease alive (someone deleted it)
    /// registers again as a new incarnation, at once.
    fn check_own_key(&self) {
        if !self.member_mode || lock(&self.lease).is_none() {
            return;
        }
        let me = lock(&self.member).clone();
        let key = self.key(&me.id);
        let written_at = *lock(&self.written_at);
        let (gone, stale, ghosts) = {
            let view = lock(&self.view);
            let ghosts: Vec<String> = view
                .members_at(&me.address)
                .into_iter()
                .filter(|m| m.id < me.id)
                .filter(|_| !sim::flaw("etcd-ghost-kept"))
                .map(|m| self.key(&m.id))
                .collect();
            let caught_up = view.is_synced()
                && (view.revision() >= written_at || sim::flaw("etcd-own-key-judged-early"));
            (
                caught_up && !view.holds(&key),
                // The store holds this member's key with another value than it wrote: a store
                // restored from a snapshot taken before its last write (an older description)
                // keeps its lease and key. Peers see the old value until it is written again.
                caught_up
                    && !sim::flaw("etcd-stale-key-kept")
                    && view.member_at(&key).is_some_and(|m| **m != me),
                ghosts,
            )
        };
        if stale
            && !self
                .key_stale
                .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            self.poke.notify_one();
        }
        if !ghosts.is_empty() {
            lock(&self.ghosts).extend(ghosts);
            self.poke.notify_one();
        }
        if gone {
            self.key_deleted
                .store(true, std::sync::atomic::Ordering::SeqCst);
            self.poke.notify_one();
        }
    }
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

    fn write_soon(&self) {
        self.poke.notify_one();
    }

    async fn release(&self) {
        if self.member_mode {
            self.revoke_own().await;
        }
    }

    fn backend(&self) -> String {
        "etcd".into()
    }

    fn provider(&self) -> &'static str {
        "etcd provider"
    }
}

#[async_trait]
impl ClusterProvider for EtcdProvider {
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
