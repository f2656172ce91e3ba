//! The etcd provider against the in-memory etcd, in simulated time (madsim): the store's
//! semantics (leases, revisions, compaction, restarts), and the provider on top of them.
#![cfg(madsim)]

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use madsim::runtime::{Handle, NodeHandle};
use madsim::time::{Instant, sleep};
use shoal::etcd::api::{Change, EtcdApi, EtcdError, LeaseId, Range, Revision, WatchStream};
use shoal::etcd::memory::{MemoryEtcd, WATCH_BUFFER};
use shoal::etcd::{EtcdProvider, EtcdProviderConfig};
use shoal::{
    ClusterEvent, ClusterProvider, ClusterProviderContext, MemberId, PartitionManager,
    ProviderError, TokioClock,
};

const TTL: Duration = Duration::from_secs(3);

fn store(history: usize) -> MemoryEtcd {
    MemoryEtcd::new(TokioClock::shared(), history)
}

// ---- the store ----

#[madsim::test]
async fn a_lease_that_is_not_kept_alive_deletes_its_keys_at_one_revision() {
    let s = store(100);
    let (lease, ttl) = s.lease_grant(Duration::from_millis(1500)).await.unwrap();
    assert_eq!(ttl, Duration::from_secs(2), "whole seconds, rounded up");
    s.put("/m/a", b"1".to_vec(), lease).await.unwrap();
    s.put("/m/b", b"2".to_vec(), lease).await.unwrap();
    let mut w = s.watch_prefix("/m/", 0).await.unwrap();
    sleep(Duration::from_millis(1900)).await;
    assert_eq!(s.lease_keep_alive(lease).await, Ok(ttl));
    sleep(Duration::from_millis(2100)).await;
    s.expire();
    assert!(s.keys().is_empty());
    let batch = w.next().await.unwrap().unwrap();
    let revisions: BTreeSet<Revision> = batch.changes.iter().map(Change::revision).collect();
    assert_eq!(batch.changes.len(), 2);
    assert_eq!(revisions.len(), 1, "{batch:?}");
    assert_eq!(
        s.lease_keep_alive(lease).await,
        Err(EtcdError::LeaseNotFound(lease))
    );
}

#[madsim::test]
async fn a_watch_resumes_from_a_kept_revision_and_fails_on_a_compacted_one() {
    let s = store(4);
    let first = s.put("/m/a", b"1".to_vec(), 0).await.unwrap();
    for i in 0..3 {
        s.put("/m/b", vec![i], 0).await.unwrap();
    }
    s.put("/other", b"x".to_vec(), 0).await.unwrap();
    let mut w = s.watch_prefix("/m/", first + 1).await.unwrap();
    let batch = w.next().await.unwrap().unwrap();
    assert_eq!(batch.changes.len(), 3, "{batch:?}");
    for _ in 0..4 {
        s.put("/m/c", b"y".to_vec(), 0).await.unwrap();
    }
    assert!(matches!(
        s.watch_prefix("/m/", first + 1).await,
        Err(EtcdError::Compacted { .. })
    ));
    s.compact(s.revision());
    assert!(matches!(
        s.watch_prefix("/m/", s.revision()).await,
        Err(EtcdError::Compacted { .. })
    ));
    assert!(s.watch_prefix("/m/", s.revision() + 1).await.is_ok());
    // Beyond the next revision: the store went back (a restore), which etcd itself would
    // not say (it waits for the revision, and other writes reuse the ones in between).
    assert!(matches!(
        s.watch_prefix("/m/", s.revision() + 2).await,
        Err(EtcdError::WentBack { .. })
    ));
}

#[madsim::test]
async fn a_restart_keeps_or_loses_the_data_and_ends_every_watch() {
    let s = store(100);
    let (lease, _) = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    s.put("/m/a", b"1".to_vec(), lease).await.unwrap();
    let before = s.range_prefix("/m/").await.unwrap();
    let mut w = s.watch_prefix("/m/", 0).await.unwrap();
    sleep(Duration::from_millis(1500)).await;
    s.restart(true);
    assert!(w.next().await.is_none());
    // The TTL starts over at the restart.
    sleep(Duration::from_millis(1500)).await;
    s.expire();
    assert_eq!(s.keys(), vec!["/m/a".to_string()]);
    let kept = s.range_prefix("/m/").await.unwrap();
    assert_eq!(kept.cluster_id, before.cluster_id);
    s.restart(false);
    let lost = s.range_prefix("/m/").await.unwrap();
    assert!(lost.kvs.is_empty());
    assert_ne!(lost.cluster_id, before.cluster_id);
    assert!(lost.revision < kept.revision);
    assert_eq!(
        s.lease_keep_alive(lease).await,
        Err(EtcdError::LeaseNotFound(lease))
    );
}

#[madsim::test]
async fn a_count_at_a_past_revision_replays_the_history_and_a_restore_goes_back() {
    let s = store(100);
    let r0 = s.revision();
    let r1 = s.put("/m/a", b"1".to_vec(), 0).await.unwrap();
    let r2 = s.put("/m/b", b"2".to_vec(), 0).await.unwrap();
    let r3 = s.put("/m/a", b"3".to_vec(), 0).await.unwrap();
    let r4 = s.delete("/m/b").await.unwrap();
    let r5 = s.put("/other", b"x".to_vec(), 0).await.unwrap();
    for (r, n) in [(r0, 0), (r1, 1), (r2, 2), (r3, 2), (r4, 1), (r5, 1)] {
        assert_eq!(s.count_prefix("/m/", r).await, Ok(n), "at revision {r}");
    }
    assert!(matches!(
        s.count_prefix("/m/", r5 + 1).await,
        Err(EtcdError::WentBack { .. })
    ));
    let cluster = s.range_prefix("/m/").await.unwrap().cluster_id;
    let snapshot = s.snapshot();
    let r6 = s.put("/m/c", b"4".to_vec(), 0).await.unwrap();
    s.put("/m/d", b"5".to_vec(), 0).await.unwrap();
    let mut w = s.watch_prefix("/m/", 0).await.unwrap();
    s.restore(&snapshot);
    assert!(w.next().await.is_none(), "a restore ends every watch");
    let restored = s.range_prefix("/m/").await.unwrap();
    assert_eq!(restored.cluster_id, cluster, "the same cluster id");
    assert_eq!(restored.revision, r5);
    assert_eq!(restored.kvs.len(), 1);
    // When a key was last written as of a revision, from the history.
    assert_eq!(s.mod_revision_at("/m/a", r2).await, Ok(Some(r1)));
    assert_eq!(s.mod_revision_at("/m/a", r3).await, Ok(Some(r3)));
    assert_eq!(s.mod_revision_at("/m/b", r1).await, Ok(None));
    assert_eq!(s.mod_revision_at("/m/b", r4).await, Ok(None));
    assert_eq!(s.mod_revision_at("/m/b", r3).await, Ok(Some(r2)));
    assert_eq!(s.mod_revision_at("/m/c", r5).await, Ok(None));
    // Later writes reuse the revisions the store had reached before: the same count at r6,
    // but another write there.
    assert_eq!(s.put("/m/e", b"6".to_vec(), 0).await.unwrap(), r6);
    assert_eq!(s.count_prefix("/m/", r6).await, Ok(2));
    assert_eq!(s.mod_revision_at("/m/c", r6).await, Ok(None));
    assert_eq!(s.mod_revision_at("/m/e", r6).await, Ok(Some(r6)));
    assert!(matches!(
        s.count_prefix("/m/", r6 + 1).await,
        Err(EtcdError::WentBack { .. })
    ));
    s.compact(r6);
    assert!(matches!(
        s.count_prefix("/m/", r5).await,
        Err(EtcdError::Compacted { .. })
    ));
    // A key last written before the history this store keeps, and changed since: it cannot
    // say when (etcd would), and answers as for a compacted revision (no answer), never with
    // a made-up revision an audit would take for another history.
    assert_eq!(s.mod_revision_at("/m/a", r6).await, Ok(Some(r3)));
    s.delete("/m/a").await.unwrap();
    assert!(matches!(
        s.mod_revision_at("/m/a", r6).await,
        Err(EtcdError::Compacted { .. })
    ));
}

#[madsim::test]
async fn a_watcher_that_falls_behind_is_cancelled_not_buffered_without_end() {
    let s = store(10_000);
    let w = s.watch_prefix("/m/", 0).await.unwrap();
    for i in 0..=WATCH_BUFFER {
        s.put("/m/a", vec![i as u8], 0).await.unwrap();
    }
    let got: Vec<_> = w.collect().await;
    assert_eq!(got.len(), WATCH_BUFFER, "ended after the buffer filled");
}

#[madsim::test]
async fn a_stopped_etcd_expires_nobody_and_restarts_every_ttl() {
    let s = store(100);
    let (lease, _) = s.lease_grant(Duration::from_secs(2)).await.unwrap();
    s.put("/m/a", b"1".to_vec(), lease).await.unwrap();
    s.set_down(true);
    assert!(matches!(
        s.lease_keep_alive(lease).await,
        Err(EtcdError::Unavailable(_))
    ));
    sleep(Duration::from_secs(10)).await;
    s.expire();
    s.set_down(false);
    assert_eq!(s.keys(), vec!["/m/a".to_string()]);
    assert!(s.lease_keep_alive(lease).await.is_ok());
}

// ---- the provider ----

/// The store as one node reaches it: cut off, every call fails and open watches end.
#[derive(Clone)]
struct Link {
    store: MemoryEtcd,
    cut: Arc<AtomicBool>,
    /// Every watch batch is followed by the one before it (out of etcd's contract).
    echo_older: Arc<AtomicBool>,
}

impl Link {
    fn check(&self) -> Result<(), EtcdError> {
        if self.cut.load(Ordering::SeqCst) {
            Err(EtcdError::Unavailable("cut off".into()))
        } else {
            Ok(())
        }
    }
}

#[async_trait]
impl EtcdApi for Link {
    async fn lease_grant(&self, ttl: Duration) -> Result<(LeaseId, Duration), EtcdError> {
        self.check()?;
        self.store.lease_grant(ttl).await
    }
    async fn lease_keep_alive(&self, lease: LeaseId) -> Result<Duration, EtcdError> {
        self.check()?;
        self.store.lease_keep_alive(lease).await
    }
    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), EtcdError> {
        self.check()?;
        self.store.lease_revoke(lease).await
    }
    async fn put(&self, key: &str, value: Vec<u8>, lease: LeaseId) -> Result<Revision, EtcdError> {
        self.check()?;
        self.store.put(key, value, lease).await
    }
    async fn delete(&self, key: &str) -> Result<Revision, EtcdError> {
        self.check()?;
        self.store.delete(key).await
    }
    async fn range_prefix(&self, prefix: &str) -> Result<Range, EtcdError> {
        self.check()?;
        self.store.range_prefix(prefix).await
    }
    async fn count_prefix(&self, prefix: &str, revision: Revision) -> Result<i64, EtcdError> {
        self.check()?;
        self.store.count_prefix(prefix, revision).await
    }
    async fn mod_revision_at(
        &self,
        key: &str,
        revision: Revision,
    ) -> Result<Option<Revision>, EtcdError> {
        self.check()?;
        self.store.mod_revision_at(key, revision).await
    }
    async fn watch_prefix(&self, prefix: &str, from: Revision) -> Result<WatchStream, EtcdError> {
        self.check()?;
        let cut = self.cut.clone();
        let inner = self.store.watch_prefix(prefix, from).await?;
        let echo = self.echo_older.clone();
        let mut previous = None;
        let inner = inner.flat_map(move |item| {
            let mut out = vec![item.clone()];
            if item.is_ok()
                && let Some(p) = previous.replace(item)
                && echo.load(Ordering::SeqCst)
            {
                out.push(p);
            }
            futures::stream::iter(out)
        });
        Ok(Box::pin(inner.take_while(move |_| {
            futures::future::ready(!cut.load(Ordering::SeqCst))
        })))
    }
}

fn config() -> EtcdProviderConfig {
    EtcdProviderConfig {
        ttl: TTL,
        request_timeout: Duration::from_millis(500),
        watch_idle_timeout: Duration::from_secs(5),
        ..EtcdProviderConfig::default()
    }
}

type Views = Arc<Mutex<BTreeMap<usize, (MemberId, Arc<PartitionManager>)>>>;
type Standing = Arc<Mutex<Vec<(usize, Instant, ClusterEvent)>>>;

struct Cluster {
    h: Handle,
    store: MemoryEtcd,
    /// The settings members started from now on get.
    config: EtcdProviderConfig,
    views: Views,
    standing: Standing,
    cuts: BTreeMap<usize, Arc<AtomicBool>>,
    echo_older: Arc<AtomicBool>,
    nodes: BTreeMap<usize, NodeHandle>,
    providers: Arc<Mutex<BTreeMap<usize, Arc<EtcdProvider>>>>,
}

impl Cluster {
    fn new(history: usize) -> Self {
        let h = Handle::current();
        let store = store(history);
        let s = store.clone();
        let etcd = h.create_node().name("etcd").build();
        etcd.spawn(async move { s.run(Duration::from_millis(100)).await });
        let p = store.clone();
        etcd.spawn(async move {
            loop {
                sleep(Duration::from_secs(1)).await;
                p.progress();
            }
        });
        Self {
            h,
            store,
            config: config(),
            views: Views::default(),
            standing: Standing::default(),
            cuts: BTreeMap::new(),
            echo_older: Arc::default(),
            nodes: BTreeMap::new(),
            providers: Arc::default(),
        }
    }

    fn start(&mut self, i: usize) {
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, i as u8));
        let cut = Arc::new(AtomicBool::new(false));
        self.cuts.insert(i, cut.clone());
        let link = Link {
            store: self.store.clone(),
            cut,
            echo_older: self.echo_older.clone(),
        };
        let (views, standing, providers, settings) = (
            self.views.clone(),
            self.standing.clone(),
            self.providers.clone(),
            self.config.clone(),
        );
        let node = self
            .h
            .create_node()
            .name(format!("m{i}"))
            .ip(ip)
            .init(move || {
                let (views, standing, providers, link, settings) = (
                    views.clone(),
                    standing.clone(),
                    providers.clone(),
                    link.clone(),
                    settings.clone(),
                );
                async move {
                    let ctx = ClusterProviderContext::new(
                        "c",
                        format!("{ip}:4000"),
                        ["user"],
                        TokioClock::shared(),
                    )
                    .unwrap();
                    views
                        .lock()
                        .unwrap()
                        .insert(i, (ctx.member.id.clone(), ctx.partition_manager.clone()));
                    common::record_standing(i, &ctx.events, standing.clone());
                    let provider = Arc::new(EtcdProvider::new(settings, Arc::new(link)));
                    providers.lock().unwrap().insert(i, provider.clone());
                    provider.start_member(ctx.clone()).await.unwrap();
                    std::future::pending::<()>().await;
                }
            })
            .build();
        self.nodes.insert(i, node);
    }

    fn cut(&self, i: usize, cut: bool) {
        self.cuts[&i].store(cut, Ordering::SeqCst);
    }

    fn provider(&self, i: usize) -> Arc<EtcdProvider> {
        self.providers.lock().unwrap()[&i].clone()
    }

    fn pm(&self, i: usize) -> Arc<PartitionManager> {
        self.views.lock().unwrap()[&i].1.clone()
    }

    fn view(&self, i: usize) -> Vec<String> {
        let views = self.views.lock().unwrap();
        let Some((_, pm)) = views.get(&i) else {
            return Vec::new();
        };
        pm.topology().member_ids().map(|m| m.to_string()).collect()
    }

    /// Waits until every node in `which` lists exactly `n` members.
    async fn wait_sizes(&self, which: &[usize], n: usize, limit: Duration) -> Duration {
        let start = Instant::now();
        loop {
            let sizes: Vec<usize> = which.iter().map(|i| self.view(*i).len()).collect();
            if sizes.iter().all(|s| *s == n) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < limit,
                "after {limit:?}: nodes {which:?} list {sizes:?} members, not {n}"
            );
            sleep(Duration::from_millis(20)).await;
        }
    }

    fn standing_of(&self, i: usize) -> Vec<(Instant, ClusterEvent)> {
        self.standing
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _, _)| *n == i)
            .map(|(_, t, e)| (*t, e.clone()))
            .collect()
    }
}

#[madsim::test]
async fn members_agree_on_versions_and_a_crashed_member_is_gone_within_the_ttl() {
    let mut c = Cluster::new(1000);
    for i in 1..=3 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2, 3], 3, Duration::from_secs(10)).await;
    sleep(Duration::from_millis(200)).await;
    // Same revision, same topology, on every node.
    let t1 = c.pm(1).topology();
    for i in [2, 3] {
        let t = c.pm(i).topology();
        assert_eq!((t.version(), t.epoch()), (t1.version(), t1.epoch()));
        assert_eq!(*t, *t1);
    }
    c.h.kill(c.nodes[&3].id());
    let took = c.wait_sizes(&[1, 2], 2, Duration::from_secs(20)).await;
    // Its last keep-alive was at most a keep-alive interval before the crash; etcd's expiry
    // runs every 100 ms; then one watch delivery.
    assert!(took >= TTL - TTL / 3, "removed too early: {took:?}");
    assert!(
        took <= TTL + Duration::from_millis(300),
        "removed late: {took:?}"
    );
    assert_eq!(c.pm(1).topology().version(), c.pm(2).topology().version());
}

#[madsim::test]
async fn a_graceful_shutdown_revokes_the_lease_and_peers_drop_it_at_once() {
    let mut c = Cluster::new(1000);
    for i in 1..=3 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2, 3], 3, Duration::from_secs(10)).await;
    let p = c.provider(3);
    let h = c.nodes[&3].clone();
    h.spawn(async move { p.shutdown(true).await.unwrap() })
        .await
        .unwrap();
    let took = c.wait_sizes(&[1, 2], 2, Duration::from_secs(5)).await;
    assert!(took < Duration::from_millis(100), "took {took:?}");
    assert_eq!(c.store.keys().len(), 2);
    assert_eq!(c.store.leases().len(), 2);
}

#[madsim::test]
async fn a_member_cut_off_past_its_ttl_knows_it_and_comes_back_as_a_new_incarnation() {
    let mut c = Cluster::new(1000);
    for i in 1..=3 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2, 3], 3, Duration::from_secs(10)).await;
    let old = c
        .view(1)
        .into_iter()
        .find(|id| id.starts_with("10-0-1-3"))
        .unwrap();
    let cut_at = Instant::now();
    c.cut(3, true);
    c.wait_sizes(&[1, 2], 2, Duration::from_secs(10)).await;
    let expired_at = Instant::now();
    // It said so itself, before etcd expired its key.
    let lost = c.standing_of(3);
    let (lost_at, event) = lost.first().expect("MembershipLost announced");
    assert!(
        matches!(event, ClusterEvent::MembershipLost { member, .. } if member.to_string() == old)
    );
    assert!(
        *lost_at < expired_at,
        "announced at {lost_at:?}, expired at {expired_at:?}"
    );
    assert!(*lost_at > cut_at);
    c.cut(3, false);
    let start = Instant::now();
    while !(c.view(3) == c.view(1) && c.view(1) == c.view(2) && c.view(1).len() == 3) {
        assert!(start.elapsed() < Duration::from_secs(10), "not converged");
        sleep(Duration::from_millis(20)).await;
    }
    for i in 1..=3 {
        assert!(!c.view(i).contains(&old), "the removed id came back on {i}");
    }
    let standing = c.standing_of(3);
    assert!(
        standing
            .iter()
            .any(|(_, e)| matches!(e, ClusterEvent::MembershipRestored { previous, .. } if previous.to_string() == old)),
        "{standing:?}"
    );
    assert_eq!(c.provider(3).metrics().rejoins.get(), 1);
}

#[madsim::test]
async fn nobody_is_removed_while_etcd_is_down_and_members_say_they_cannot_vouch() {
    let mut c = Cluster::new(1000);
    for i in 1..=3 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2, 3], 3, Duration::from_secs(10)).await;
    let before: Vec<String> = c.view(1);
    c.store.set_down(true);
    sleep(TTL * 3).await;
    // Every member announced the loss (it cannot prove it holds its lease) ...
    for i in 1..=3 {
        assert!(
            c.standing_of(i)
                .iter()
                .any(|(_, e)| matches!(e, ClusterEvent::MembershipLost { .. })),
            "{i} did not announce"
        );
    }
    c.store.set_down(false);
    sleep(TTL).await;
    // ... and nobody was removed: the same incarnations, restored.
    for i in 1..=3 {
        assert_eq!(c.view(i), before, "node {i}");
        assert!(
            c.standing_of(i)
                .iter()
                .any(|(_, e)| matches!(e, ClusterEvent::MembershipRestored { .. })),
            "{i} did not announce the restore"
        );
    }
}

#[madsim::test]
async fn a_watcher_behind_a_compaction_relists_without_members_vanishing() {
    let mut c = Cluster::new(1000);
    for i in 1..=3 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2, 3], 3, Duration::from_secs(10)).await;
    c.cut(1, true);
    // Changes while 1 is cut off, then compacted away.
    let p = c.provider(3);
    let h = c.nodes[&3].clone();
    h.spawn(async move { p.shutdown(true).await.unwrap() })
        .await
        .unwrap();
    c.start(4);
    let start = Instant::now();
    while !(c.view(2).len() == 3
        && c.view(2).iter().any(|id| id.starts_with("10-0-1-4"))
        && !c.view(2).iter().any(|id| id.starts_with("10-0-1-3")))
    {
        assert!(start.elapsed() < Duration::from_secs(10), "{:?}", c.view(2));
        sleep(Duration::from_millis(20)).await;
    }
    assert_ne!(c.view(1), c.view(2), "node 1 is cut off");
    c.store.compact(c.store.revision());
    // Back before its own lease runs out.
    c.cut(1, false);
    let relists_before = c.provider(1).metrics().relists.get();
    let start = Instant::now();
    loop {
        let v = c.view(1);
        assert!(v.len() >= 2, "members vanished during the relist: {v:?}");
        if v == c.view(2) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "never caught up");
        sleep(Duration::from_millis(10)).await;
    }
    let m = c.provider(1).metrics().clone();
    assert!(
        m.relists.get() > relists_before,
        "relists {} reopens {} rejoins {} took {:?}",
        m.relists.get(),
        m.watch_reopens.get(),
        m.rejoins.get(),
        start.elapsed()
    );
}

/// etcd is shared: other software's writes move its revision on while this cluster is quiet,
/// and compaction follows. A member's view moves on with every progress notification, so a
/// watch that breaks later resumes from there, not from the cluster's last change (compacted
/// away): no relist. (Before, every member relisted after every break.)
#[madsim::test]
async fn a_quiet_cluster_on_a_busy_etcd_resumes_from_progress_without_relisting() {
    let mut c = Cluster::new(1000);
    for i in 1..=2 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2], 2, Duration::from_secs(10)).await;
    for k in 0..50 {
        c.store
            .put(&format!("/other/{k}"), b"x".to_vec(), 0)
            .await
            .unwrap();
    }
    // Progress notifications (every second here) carry the new revision to the watchers.
    sleep(Duration::from_secs(3)).await;
    c.store.compact(c.store.revision());
    let before = c.provider(1).metrics().clone();
    let (relists, reopens) = (before.relists.get(), before.watch_reopens.get());
    // Cut past a progress notification: the stream ends on it.
    c.cut(1, true);
    sleep(Duration::from_millis(1500)).await;
    c.cut(1, false);
    sleep(Duration::from_secs(3)).await;
    let m = c.provider(1).metrics().clone();
    assert!(
        m.watch_reopens.get() > reopens,
        "the watch broke and reopened"
    );
    assert_eq!(
        m.relists.get(),
        relists,
        "resumed from the progress revision"
    );
    assert_eq!(c.view(1), c.view(2));
}

#[madsim::test]
async fn an_older_batch_repeated_on_a_stream_is_skipped_without_a_relist() {
    let mut c = Cluster::new(1000);
    c.echo_older.store(true, Ordering::SeqCst);
    for i in 1..=3 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2, 3], 3, Duration::from_secs(10)).await;
    let relists: Vec<u64> = (1..=3)
        .map(|i| c.provider(i).metrics().relists.get())
        .collect();
    c.start(4);
    c.start(5);
    c.wait_sizes(&[1, 2, 3, 4, 5], 5, Duration::from_secs(10))
        .await;
    let p = c.provider(5);
    let h = c.nodes[&5].clone();
    h.spawn(async move { p.shutdown(true).await.unwrap() })
        .await
        .unwrap();
    c.wait_sizes(&[1, 2, 3, 4], 4, Duration::from_secs(10))
        .await;
    sleep(Duration::from_secs(3)).await;
    for i in 1..=3 {
        let m = c.provider(i).metrics().clone();
        assert_eq!(
            m.relists.get(),
            relists[i - 1],
            "node {i} listed again on a repeated batch"
        );
        assert!(
            m.batches_out_of_order.get() > 0,
            "node {i} saw no older batch"
        );
        assert_eq!(c.view(i), c.view(4), "node {i}");
    }
}

#[madsim::test]
async fn an_etcd_that_lost_its_data_gets_every_member_back_under_a_new_epoch() {
    let mut c = Cluster::new(1000);
    for i in 1..=3 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2, 3], 3, Duration::from_secs(10)).await;
    let epoch = c.pm(1).topology().epoch();
    let old: BTreeSet<String> = c.view(1).into_iter().collect();
    c.store.restart(false);
    let start = Instant::now();
    loop {
        let fresh = (1..=3).all(|i| {
            let t = c.pm(i).topology();
            t.epoch() != epoch
                && t.len() == 3
                && t.member_ids().all(|id| !old.contains(&id.to_string()))
        });
        if fresh {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "not re-registered"
        );
        sleep(Duration::from_millis(20)).await;
    }
}

/// The member ids etcd holds keys for.
async fn members_in(store: &MemoryEtcd) -> Vec<String> {
    store
        .range_prefix("/shoal/c/members/")
        .await
        .unwrap()
        .kvs
        .iter()
        .map(|kv| kv.key.trim_start_matches("/shoal/c/members/").to_string())
        .collect()
}

/// A snapshot restored with the same cluster id, then writes (elsewhere in etcd) that reach
/// the revisions the members saw before their watches reopen: no watch creation notices the
/// store went back, and the views keep the member the snapshot does not have, for good. An
/// audit counts the keys at the view's revision, finds one too many, and lists again under a
/// new epoch. `audit` is the members' audit period (`None`: no audits).
async fn restore_hidden_by_reused_revisions(audit: Option<Duration>) -> (Vec<String>, Vec<String>) {
    let mut c = Cluster::new(1000);
    c.config.audit_every = audit;
    for i in 1..=2 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2], 2, Duration::from_secs(10)).await;
    let snapshot = c.store.snapshot();
    c.start(3);
    c.wait_sizes(&[1, 2, 3], 3, Duration::from_secs(10)).await;
    let epoch = c.pm(1).topology().epoch();
    let seen = c.store.revision();
    c.store.restore(&snapshot);
    for i in 0..=(seen - snapshot.revision()) {
        c.store
            .put(&format!("/elsewhere/{i}"), vec![], 0)
            .await
            .unwrap();
    }
    // Member 3's lease is not in the snapshot: it registers again, as a new incarnation.
    sleep(Duration::from_secs(12)).await;
    let held = members_in(&c.store).await;
    if audit.is_some() {
        for i in 1..=3 {
            assert_ne!(c.pm(i).topology().epoch(), epoch, "node {i}: a new epoch");
            let m = c.provider(i).metrics().clone();
            assert!(m.audit_mismatches.get() > 0, "node {i} found no mismatch");
        }
    }
    (c.view(1), held)
}

#[madsim::test]
async fn a_restore_hidden_by_reused_revisions_leaves_a_phantom_without_audits() {
    let (view, held) = restore_hidden_by_reused_revisions(None).await;
    assert_eq!(held.len(), 3, "{held:?}");
    assert_eq!(view.len(), 4, "the old incarnation stays listed: {view:?}");
}

#[madsim::test]
async fn a_restore_hidden_by_reused_revisions_is_found_by_an_audit() {
    let (view, held) = restore_hidden_by_reused_revisions(Some(Duration::from_secs(2))).await;
    assert_eq!(view, held, "every view is the store's again");
}

/// A restore with the same cluster id that only deletions since the snapshot tell apart: the
/// views' latest change is member 3's key going with its lease (member 3 crashed after the
/// snapshot; every write they hold predates it). In the restored history someone deletes member
/// 1's key and writes elsewhere reach the members' revision: at that revision etcd holds as
/// many keys as the views (members 2 and 3 where they hold 1 and 2), so the count agrees. The
/// audit also asks whether the key of the views' latest delete is absent: it is back, and the
/// views are listed again; member 1 then finds its key gone and registers again. `flaws` are
/// planted for the run. Returns node 2's view and etcd's members 2.5 s after the restore
/// (before member 3's restored lease, which starts its 3 s TTL over, expires: that deletion
/// would change the count and give the histories away anyway).
async fn restore_seen_only_by_a_delete(flaws: &[&'static str]) -> (Vec<String>, Vec<String>) {
    shoal::runtime::sim::plant_flaws(flaws);
    let mut c = Cluster::new(1000);
    c.config.audit_every = Some(Duration::from_secs(2));
    for i in 1..=3 {
        c.start(i);
        c.wait_sizes(&[i], i, Duration::from_secs(10)).await;
    }
    c.wait_sizes(&[1, 2, 3], 3, Duration::from_secs(10)).await;
    let snapshot = c.store.snapshot();
    c.h.kill(c.nodes[&3].id());
    c.wait_sizes(&[1, 2], 2, Duration::from_secs(10)).await;
    let seen = c.store.revision();
    let first = c.views.lock().unwrap()[&1].0.to_string();
    c.store.restore(&snapshot);
    c.store
        .delete(&format!("/shoal/c/members/{first}"))
        .await
        .unwrap();
    while c.store.revision() < seen {
        c.store.put("/elsewhere", vec![], 0).await.unwrap();
    }
    sleep(Duration::from_millis(2_500)).await;
    let held = members_in(&c.store).await;
    shoal::runtime::sim::plant_flaws(&[]);
    (c.view(2), held)
}

#[madsim::test]
async fn a_restore_seen_only_by_a_delete_is_found_by_an_audit() {
    let (view, held) = restore_seen_only_by_a_delete(&[]).await;
    assert_eq!(view, held, "node 2's view is etcd's again");
}

#[madsim::test]
async fn a_restore_seen_only_by_a_delete_stays_hidden_from_an_audit_that_ignores_deletes() {
    let (view, held) = restore_seen_only_by_a_delete(&["etcd-audit-ignores-deletes"]).await;
    assert_ne!(
        view, held,
        "the view kept member 1's deleted key: {view:?} {held:?}"
    );
}

#[madsim::test]
async fn a_key_someone_else_wrote_is_skipped_and_a_deleted_own_key_is_rewritten_as_new() {
    let mut c = Cluster::new(1000);
    for i in 1..=2 {
        c.start(i);
    }
    c.wait_sizes(&[1, 2], 2, Duration::from_secs(10)).await;
    c.store
        .put("/shoal/c/members/garbage", b"{not json".to_vec(), 0)
        .await
        .unwrap();
    sleep(Duration::from_millis(200)).await;
    assert_eq!(c.view(1).len(), 2);
    assert!(c.provider(1).metrics().keys_skipped.get() >= 1);
    // A person deletes member 2's key: it registers again as a new incarnation.
    let gone = c.views.lock().unwrap()[&2].0.clone();
    let key = format!(
        "/shoal/c/members/{}",
        c.view(2)
            .into_iter()
            .find(|id| id.starts_with("10-0-1-2"))
            .unwrap()
    );
    let _ = gone;
    c.store.delete(&key).await.unwrap();
    let start = Instant::now();
    loop {
        let v = c.view(1);
        if v.len() == 2 && !v.iter().any(|id| key.ends_with(id.as_str())) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "{v:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

#[madsim::test]
async fn bad_settings_are_refused_naming_the_setting() {
    let h = Handle::current();
    let node = h
        .create_node()
        .name("m")
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 9)))
        .build();
    let err = node
        .spawn(async move {
            let ctx =
                ClusterProviderContext::new("c", "10.0.1.9:4000", ["user"], TokioClock::shared())
                    .unwrap();
            let bad = |c: EtcdProviderConfig| {
                let ctx = ctx.clone();
                async move {
                    EtcdProvider::new(c, Arc::new(store(10)))
                        .start_member(ctx)
                        .await
                        .unwrap_err()
                }
            };
            let ttl = bad(EtcdProviderConfig {
                ttl: Duration::from_millis(1500),
                ..config()
            })
            .await;
            let prefix = bad(EtcdProviderConfig {
                prefix: "shoal".into(),
                ..config()
            })
            .await;
            let audit = bad(EtcdProviderConfig {
                audit_every: Some(Duration::from_millis(10)),
                ..config()
            })
            .await;
            assert!(
                matches!(&audit, ProviderError::Rejected(m) if m.contains("audit_every")),
                "{audit:?}"
            );
            (ttl, prefix)
        })
        .await
        .unwrap();
    assert!(
        matches!(&err.0, ProviderError::Rejected(m) if m.contains("ttl")),
        "{:?}",
        err.0
    );
    assert!(
        matches!(&err.1, ProviderError::Rejected(m) if m.contains("prefix")),
        "{:?}",
        err.1
    );
}
