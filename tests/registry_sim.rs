//! The registry provider under madsim (simulated build only): the registry on its own node,
//! members on theirs, partitions and a registry restart. Times asserted here are simulated.
#![cfg(madsim)]

mod common;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::net::NetSim;
use madsim::runtime::{Handle, NodeHandle};
use madsim::time::{Instant, sleep};
use shoal::registry::{
    RegistryConfig, RegistryLimits, RegistryProvider, RegistryProviderConfig, RegistryServer,
};
use shoal::{
    ClusterEvent, ClusterProvider, ClusterProviderContext, MemberId, MemberLimits,
    PartitionManager, TokioClock,
};

type Views = Arc<Mutex<BTreeMap<usize, (MemberId, Arc<PartitionManager>)>>>;

/// Each member's own-standing events (lost, restored), with when they were published.
type Standing = Arc<Mutex<Vec<(usize, Instant, ClusterEvent)>>>;

const REGISTRY_IP: [u8; 4] = [10, 0, 0, 1];

/// The cluster's shared secret: the simulated cluster is token-protected, so a provider that
/// forgot to send it would fail every test here.
const TOKEN: &str = "s3cret";

/// Provider settings for the registry node.
fn provider_config() -> RegistryProviderConfig {
    let mut config = RegistryProviderConfig::new("http://10.0.0.1:7600");
    config.cluster_token = Some(TOKEN.into());
    config
}

fn registry_config() -> RegistryConfig {
    RegistryConfig {
        cluster_tokens: [("c".to_string(), TOKEN.to_string())].into(),
        // Not the default TTL, so a provider that ignored the TTL the registry announces (and
        // judged its lease by the default) would be caught.
        ttl: Duration::from_secs(4),
        heartbeat_interval: Some(Duration::from_secs(1)),
        sweep_interval: Duration::from_millis(500),
        progress_interval: Duration::from_secs(2),
        startup_grace: Some(Duration::from_secs(3)),
        limits: RegistryLimits {
            member: MemberLimits {
                max_metadata_entries: 4,
                ..MemberLimits::default()
            },
            ..RegistryLimits::default()
        },
        ..RegistryConfig::default()
    }
}

fn start_registry(h: &Handle) -> NodeHandle {
    start_registry_with(h, registry_config())
}

fn start_registry_with(h: &Handle, config: RegistryConfig) -> NodeHandle {
    h.create_node()
        .name("registry")
        .ip(IpAddr::V4(Ipv4Addr::from(REGISTRY_IP)))
        .init(move || {
            let config = config.clone();
            async move {
                let server = RegistryServer::new(config, TokioClock::shared()).unwrap();
                let addr: SocketAddr = "0.0.0.0:7600".parse().unwrap();
                server.serve(addr, std::future::pending()).await.unwrap();
            }
        })
        .build()
}

/// Member `i`'s context at `ip`, published in `views`.
fn member_ctx(i: usize, ip: IpAddr, views: &Views) -> ClusterProviderContext {
    let ctx =
        ClusterProviderContext::new("c", format!("{ip}:4000"), ["user"], TokioClock::shared())
            .unwrap();
    views
        .lock()
        .unwrap()
        .insert(i, (ctx.member.id.clone(), ctx.partition_manager.clone()));
    ctx
}

fn start_member(h: &Handle, i: usize, views: Views) -> NodeHandle {
    start_member_recording(h, i, views, Standing::default())
}

fn start_member_recording(h: &Handle, i: usize, views: Views, standing: Standing) -> NodeHandle {
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, i as u8));
    h.create_node()
        .name(format!("m{i}"))
        .ip(ip)
        .init(move || {
            let views = views.clone();
            let standing = standing.clone();
            async move {
                let ctx = member_ctx(i, ip, &views);
                common::record_standing(i, &ctx.events, standing.clone());
                let mut config = provider_config();
                config.rpc_timeout = Duration::from_secs(1);
                config.watch_idle_timeout = Duration::from_secs(6);
                let provider = RegistryProvider::new(config);
                while let Err(e) = provider.start_member(ctx.clone()).await {
                    tracing::warn!(error = %e, "start failed; retrying");
                    sleep(Duration::from_secs(1)).await;
                }
                // The contract: when start_member returns, the node's topology contains it.
                assert!(
                    ctx.partition_manager.topology().contains(&ctx.member.id),
                    "start_member returned before the node's topology contained it"
                );
                std::future::pending::<()>().await;
            }
        })
        .build()
}

fn sizes(views: &Views) -> BTreeMap<usize, usize> {
    views
        .lock()
        .unwrap()
        .iter()
        .map(|(i, (_, pm))| (*i, pm.topology().len()))
        .collect()
}

/// Polls `check` every 50 ms until it gives a value; fails with its last reason after `limit`.
async fn eventually<T>(limit: Duration, mut check: impl FnMut() -> Result<T, String>) -> T {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(why) => assert!(start.elapsed() < limit, "after {limit:?}: {why}"),
        }
        sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_all(views: &Views, which: &[usize], n: usize, limit: Duration) -> Duration {
    let start = Instant::now();
    eventually(limit, || {
        let s = sizes(views);
        if which.iter().all(|i| s.get(i) == Some(&n)) {
            Ok(start.elapsed())
        } else {
            Err(format!(
                "members {which:?} did not reach {n} members: {s:?}"
            ))
        }
    })
    .await
}

#[madsim::test]
async fn partitioned_member_expires_knows_it_and_rejoins_as_a_new_incarnation_after_heal() {
    let h = Handle::current();
    let views: Views = Arc::default();
    let standing: Standing = Arc::default();
    let registry = start_registry(&h);
    let nodes: Vec<NodeHandle> = (1..=3)
        .map(|i| start_member_recording(&h, i, views.clone(), standing.clone()))
        .collect();
    wait_all(&views, &[1, 2, 3], 3, Duration::from_secs(20)).await;
    let old_id = views.lock().unwrap()[&3].0.clone();

    // Cut member 3 off from the registry in both directions.
    let net = NetSim::current();
    net.clog_link(nodes[2].id(), registry.id());
    net.clog_link(registry.id(), nodes[2].id());
    let cut = Instant::now();
    let expired_after = wait_all(&views, &[1, 2], 2, Duration::from_secs(30)).await;
    let cfg = registry_config();
    // The last heartbeat got through at most one interval before the cut; expiry is noticed at
    // the next sweep; then one broadcast.
    assert!(
        expired_after >= cfg.ttl - cfg.heartbeat(),
        "expired too early: {expired_after:?}"
    );
    assert!(
        expired_after <= cfg.ttl + cfg.sweep_interval + Duration::from_millis(200),
        "expired late: {expired_after:?} after the cut"
    );
    // The isolated member still holds its last view (it cannot learn anything), but it told
    // its application it lost its registration before the others saw it go.
    assert_eq!(sizes(&views)[&3], 3);
    let lost_at = standing
        .lock()
        .unwrap()
        .iter()
        .find_map(|(i, at, e)| match e {
            ClusterEvent::MembershipLost { member, .. } if *i == 3 && *member == old_id => {
                Some(*at)
            }
            _ => None,
        })
        .expect("the cut-off member announced MembershipLost");
    assert!(
        lost_at < cut + expired_after,
        "lost announced {:?} after the cut, the survivors saw the expiry after {expired_after:?}",
        lost_at - cut
    );

    net.unclog_link(nodes[2].id(), registry.id());
    net.unclog_link(registry.id(), nodes[2].id());
    let back = wait_all(&views, &[1, 2, 3], 3, Duration::from_secs(30)).await;
    // Re-join happens at the member's next heartbeat (NOT_FOUND, then join): within one
    // heartbeat interval plus the madsim retry delay of held messages (up to about 10 s).
    assert!(
        back <= cfg.heartbeat() + Duration::from_secs(12),
        "rejoined after {back:?}"
    );
    eprintln!(
        "partition: lost announced after {:?}, expired on survivors after {expired_after:?}, back after {back:?}, {:?} since the cut",
        lost_at - cut,
        cut.elapsed()
    );
    // A new incarnation: peers never see the expired id come back. The survivors can see the
    // re-join before the member's own join call returns, so its announcement may come a moment
    // after the views settled.
    let new_id = eventually(Duration::from_secs(5), || {
        let standing = standing.lock().unwrap();
        standing
            .iter()
            .find_map(|(i, _, e)| match e {
                ClusterEvent::MembershipRestored {
                    member, previous, ..
                } if *i == 3 && *previous == old_id => Some(member.id.clone()),
                _ => None,
            })
            .ok_or_else(|| format!("the member did not announce MembershipRestored: {standing:?}"))
    })
    .await;
    assert_ne!(new_id, old_id);
    let start = Instant::now();
    for i in 1..=3 {
        loop {
            let topo = views.lock().unwrap()[&i].1.topology();
            if topo.contains(&new_id) && !topo.contains(&old_id) && topo.len() == 3 {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "m{i} never settled on the new incarnation: {topo:?}"
            );
            sleep(Duration::from_millis(50)).await;
        }
    }
}

#[madsim::test]
async fn registry_restart_loses_no_live_member() {
    let h = Handle::current();
    let views: Views = Arc::default();
    let registry = start_registry(&h);
    let _nodes: Vec<NodeHandle> = (1..=3)
        .map(|i| start_member(&h, i, views.clone()))
        .collect();
    wait_all(&views, &[1, 2, 3], 3, Duration::from_secs(20)).await;
    let before: BTreeMap<usize, u64> = views
        .lock()
        .unwrap()
        .iter()
        .map(|(i, (_, pm))| (*i, pm.version()))
        .collect();

    h.kill(registry.id());
    sleep(Duration::from_secs(1)).await;
    h.restart(registry.id());
    let restarted = Instant::now();
    // Watch every view until each has applied a topology from the new registry run.
    let mut smallest = 3;
    loop {
        let s = sizes(&views);
        smallest = smallest.min(*s.values().min().unwrap());
        let newer = views
            .lock()
            .unwrap()
            .iter()
            .all(|(i, (_, pm))| pm.version() > before[i]);
        if newer && s.values().all(|&n| n == 3) {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(30),
            "not recovered: {s:?}"
        );
        sleep(Duration::from_millis(20)).await;
    }
    let recovered = restarted.elapsed();
    eprintln!("registry restart: recovered after {recovered:?}, smallest view {smallest}");
    let cfg = registry_config();
    // The startup grace holds snapshots back until members have re-joined, so no view ever
    // showed a live member missing.
    assert_eq!(
        smallest, 3,
        "a live member disappeared from some view during the restart"
    );
    assert!(
        recovered <= cfg.grace() + cfg.heartbeat() + Duration::from_secs(12),
        "recovered after {recovered:?}"
    );
}

#[madsim::test]
async fn client_starts_on_an_empty_cluster_and_sees_later_joins() {
    let h = Handle::current();
    let _registry = start_registry(&h);
    let client_pm: Arc<Mutex<Option<Arc<PartitionManager>>>> = Arc::default();
    let slot = client_pm.clone();
    h.create_node()
        .name("client")
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 2, 1)))
        .build()
        .spawn(async move {
            let ctx = ClusterProviderContext::new(
                "c",
                "10.0.2.1:4000",
                Vec::<String>::new(),
                TokioClock::shared(),
            )
            .unwrap();
            let provider = RegistryProvider::new(provider_config());
            // The registry holds the first snapshot for its startup grace (3 s), then sends an
            // empty one at version 0: start_client must accept it.
            provider
                .start_client(ctx.clone())
                .await
                .expect("a client starts on an empty cluster");
            *slot.lock().unwrap() = Some(ctx.partition_manager.clone());
            std::future::pending::<()>().await;
        });
    let start = Instant::now();
    while client_pm.lock().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "client did not start"
        );
        sleep(Duration::from_millis(50)).await;
    }
    let views: Views = Arc::default();
    let _m = start_member(&h, 1, views.clone());
    let pm = client_pm.lock().unwrap().clone().unwrap();
    let start = Instant::now();
    while pm.topology().len() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "client never saw the member"
        );
        sleep(Duration::from_millis(50)).await;
    }
}

/// A `start_member` that fails after its join reached the registry (here: no first topology
/// within a startup timeout shorter than the registry's startup grace) withdraws that
/// registration: peers never see a member whose start failed, instead of seeing it for a TTL.
#[madsim::test]
async fn a_failed_start_leaves_no_registration_behind() {
    let h = Handle::current();
    let _registry = start_registry(&h);
    let failed: Arc<Mutex<Option<(MemberId, String)>>> = Arc::default();
    let slot = failed.clone();
    h.create_node()
        .name("impatient")
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 9)))
        .build()
        .spawn(async move {
            let ctx =
                ClusterProviderContext::new("c", "10.0.1.9:4000", ["user"], TokioClock::shared())
                    .unwrap();
            let mut config = provider_config();
            // The registry holds first snapshots back for its startup grace (3 s).
            config.startup_timeout = Duration::from_secs(1);
            let provider = RegistryProvider::new(config);
            let err = provider.start_member(ctx.clone()).await.unwrap_err();
            *slot.lock().unwrap() = Some((ctx.member.id.clone(), err.to_string()));
        });
    let start = Instant::now();
    let (id, err) = loop {
        if let Some(f) = failed.lock().unwrap().clone() {
            break f;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "start never failed"
        );
        sleep(Duration::from_millis(50)).await;
    };
    assert!(err.contains("no topology"), "{err}");
    // A member that starts now sees the registry's topology without the failed one before the
    // failed registration could have expired.
    let views: Views = Arc::default();
    let _m = start_member(&h, 1, views.clone());
    wait_all(&views, &[1], 1, Duration::from_secs(10)).await;
    let topology = views.lock().unwrap()[&1].1.topology();
    assert!(
        !topology.contains(&id),
        "{id} lingers after its failed start: {topology:?}"
    );
    assert!(
        start.elapsed() < registry_config().ttl,
        "the new member saw a clean topology only after a TTL"
    );
}

/// A process that starts again under an id that already left (the same context reused after a
/// shutdown) is refused by the registry (`FAILED_PRECONDITION`: removed ids never come back) and
/// joins as a new incarnation at once: the start succeeds, under another id.
#[madsim::test]
async fn a_start_under_a_removed_id_joins_as_a_new_incarnation() {
    let h = Handle::current();
    let _registry = start_registry(&h);
    // (the reused id, whether the topology lists it, how many members it lists)
    type Outcome = (MemberId, bool, usize);
    let outcome: Arc<Mutex<Option<Outcome>>> = Arc::default();
    let slot = outcome.clone();
    h.create_node()
        .name("again")
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 1, 8)))
        .build()
        .spawn(async move {
            let ctx =
                ClusterProviderContext::new("c", "10.0.1.8:4000", ["user"], TokioClock::shared())
                    .unwrap();
            let first = RegistryProvider::new(provider_config());
            first.start_member(ctx.clone()).await.unwrap();
            first.shutdown(true).await.unwrap();
            let second = RegistryProvider::new(provider_config());
            second.start_member(ctx.clone()).await.unwrap();
            let t = ctx.partition_manager.topology();
            *slot.lock().unwrap() =
                Some((ctx.member.id.clone(), t.contains(&ctx.member.id), t.len()));
            std::future::pending::<()>().await;
        });
    let start = Instant::now();
    let (old, listed, members) = loop {
        if let Some(o) = outcome.lock().unwrap().clone() {
            break o;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the second start never finished"
        );
        sleep(Duration::from_millis(50)).await;
    };
    assert!(!listed, "{old} came back after it left");
    assert_eq!(members, 1, "the second start registered exactly one member");
}

/// A request to the scripted member: a new description, and where to send the outcome (with
/// the provider's count of accepted description changes).
type DescribeCmd = (
    shoal::Description,
    tokio::sync::oneshot::Sender<Result<u64, String>>,
);

/// A member whose description the test changes through `update_member`.
fn start_scripted_member(
    h: &Handle,
    i: usize,
    views: Views,
    commands: tokio::sync::mpsc::Receiver<DescribeCmd>,
) -> NodeHandle {
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, i as u8));
    // The node's init runs once (never restarted here), so it can own the receiver.
    let commands = Arc::new(Mutex::new(Some(commands)));
    h.create_node()
        .name(format!("m{i}"))
        .ip(ip)
        .init(move || {
            let views = views.clone();
            let mut commands = commands.lock().unwrap().take().expect("started once");
            async move {
                let ctx = member_ctx(i, ip, &views);
                let mut config = provider_config();
                config.rpc_timeout = Duration::from_secs(1);
                config.startup_timeout = Duration::from_secs(8);
                let provider = RegistryProvider::new(config);
                provider.start_member(ctx.clone()).await.unwrap();
                while let Some((description, reply)) = commands.recv().await {
                    let outcome = provider
                        .update_member(description)
                        .await
                        .map(|()| provider.metrics().description_updates.get())
                        .map_err(|e| e.to_string());
                    let _ = reply.send(outcome);
                }
                std::future::pending::<()>().await;
            }
        })
        .build()
}

async fn describe(
    commands: &tokio::sync::mpsc::Sender<DescribeCmd>,
    d: &shoal::Description,
) -> Result<u64, String> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    commands.send((d.clone(), tx)).await.unwrap();
    rx.await.unwrap()
}

/// Waits until every node in `which` lists a member at `address` described as `d`; returns
/// that member's id.
async fn wait_described(
    views: &Views,
    which: &[usize],
    address: &str,
    d: &shoal::Description,
) -> MemberId {
    eventually(Duration::from_secs(30), || {
        let found: Vec<Option<MemberId>> = which
            .iter()
            .map(|i| {
                let t = views.lock().unwrap()[i].1.topology();
                t.members()
                    .iter()
                    .find(|m| m.address == address && m.description() == *d)
                    .map(|m| m.id.clone())
            })
            .collect();
        match found.first() {
            Some(Some(id)) if found.iter().all(|f| f.as_ref() == Some(id)) => Ok(id.clone()),
            _ => Err(format!(
                "nodes {which:?} never showed {address} as {d:?}: {found:?}"
            )),
        }
    })
    .await
}

#[madsim::test]
async fn a_member_changes_its_description_in_place_and_keeps_it_across_a_rejoin() {
    let h = Handle::current();
    let views: Views = Arc::default();
    let registry = start_registry(&h);
    let (commands, rx) = tokio::sync::mpsc::channel(1);
    let m1 = start_scripted_member(&h, 1, views.clone(), rx);
    for i in 2..=3 {
        start_member(&h, i, views.clone());
    }
    wait_all(&views, &[1, 2, 3], 3, Duration::from_secs(20)).await;
    let id = views.lock().unwrap()[&1].0.clone();
    let address = "10.0.1.1:4000";

    // In place: the same incarnation, a new zone, label and kind, on every node.
    let a = shoal::Description {
        kinds: ["order".to_string(), "user".to_string()].into(),
        zone: Some("zone-a".into()),
        metadata: [("rack".to_string(), "r1".to_string())].into(),
    };
    let before = views.lock().unwrap()[&2].1.version();
    describe(&commands, &a).await.unwrap();
    assert_eq!(wait_described(&views, &[1, 2, 3], address, &a).await, id);
    let pm2 = views.lock().unwrap()[&2].1.clone();
    assert!(pm2.version() > before);
    // Only m1 hosts "order": every order identity is placed on it.
    assert_eq!(
        pm2.peek_owner("order", "o-1").map(|m| m.id.clone()),
        Some(id.clone())
    );

    // Refused by the registry (it allows 4 labels): the call says so, the old description
    // stays, and the member keeps its registration (heartbeats go on) for three TTLs.
    let crowded = shoal::Description {
        metadata: (0..6).map(|k| (format!("k{k}"), "v".to_string())).collect(),
        ..a.clone()
    };
    let refused = describe(&commands, &crowded).await.unwrap_err();
    assert!(refused.contains("metadata"), "{refused}");
    sleep(registry_config().ttl * 3).await;
    assert_eq!(wait_described(&views, &[1, 2, 3], address, &a).await, id);

    // Cut off from the registry: the update cannot be published and the call says so; the
    // member expires; after the heal it returns as a new incarnation with the new description.
    let b = shoal::Description {
        kinds: ["user".to_string()].into(),
        zone: Some("zone-b".into()),
        metadata: [("rack".to_string(), "r2".to_string())].into(),
    };
    let net = NetSim::current();
    net.clog_link(m1.id(), registry.id());
    net.clog_link(registry.id(), m1.id());
    let pending = describe(&commands, &b).await.unwrap_err();
    assert!(pending.contains("pending"), "{pending}");
    wait_all(&views, &[2, 3], 2, Duration::from_secs(30)).await;
    net.unclog_link(m1.id(), registry.id());
    net.unclog_link(registry.id(), m1.id());
    let new_id = wait_described(&views, &[1, 2, 3], address, &b).await;
    assert_ne!(new_id, id, "an expired member returns as a new incarnation");
    assert_eq!(
        pm2.peek_owner("order", "o-1"),
        None,
        "nobody hosts order now"
    );
}

/// Joins at the same instant are coalesced: a member's first snapshot may be the version before
/// its own join (new watchers start from what was last published). `start_member` must still
/// return only once the node's own topology lists it (each member asserts that contract).
#[madsim::test]
async fn start_member_waits_for_its_own_coalesced_join() {
    let h = Handle::current();
    let views: Views = Arc::default();
    start_registry_with(
        &h,
        RegistryConfig {
            startup_grace: Some(Duration::ZERO),
            publish_interval: Duration::from_millis(400),
            ..registry_config()
        },
    );
    // A first member (its watch opens the cluster's feed, so later changes can be held), then
    // three at once: the second and third joins are held behind the first.
    start_member(&h, 1, views.clone());
    wait_all(&views, &[1], 1, Duration::from_secs(20)).await;
    for i in 2..=4 {
        start_member(&h, i, views.clone());
    }
    wait_all(&views, &[1, 2, 3, 4], 4, Duration::from_secs(20)).await;
}

/// A description change survives a short cut under the same incarnation (a failed attempt is
/// not a lost registration), and one made while the registry restarts is published by a new
/// incarnation (the restarted registry does not hold the old id, and peers saw it go).
#[madsim::test]
async fn a_description_change_keeps_its_id_across_a_short_cut_and_not_across_a_registry_restart() {
    let h = Handle::current();
    let views: Views = Arc::default();
    let registry = start_registry(&h);
    let (commands, rx) = tokio::sync::mpsc::channel(1);
    let m1 = start_scripted_member(&h, 1, views.clone(), rx);
    start_member(&h, 2, views.clone());
    wait_all(&views, &[1, 2], 2, Duration::from_secs(20)).await;
    let id = views.lock().unwrap()[&1].0.clone();
    let address = "10.0.1.1:4000";
    let d = |zone: &str| shoal::Description {
        kinds: ["user".to_string()].into(),
        zone: Some(zone.into()),
        metadata: Default::default(),
    };

    // Cut for 1.5 s (TTL 4 s): the update waits, then lands on the same registration.
    let net = NetSim::current();
    net.clog_link(m1.id(), registry.id());
    net.clog_link(registry.id(), m1.id());
    let update = {
        let commands = commands.clone();
        let a = d("zone-a");
        madsim::task::spawn(async move { describe(&commands, &a).await })
    };
    sleep(Duration::from_millis(1_500)).await;
    net.unclog_link(m1.id(), registry.id());
    net.unclog_link(registry.id(), m1.id());
    assert_eq!(update.await.unwrap(), Ok(1), "one change accepted");
    assert_eq!(
        wait_described(&views, &[1, 2], address, &d("zone-a")).await,
        id
    );

    // The registry restarts (state lost) while the next change is pending.
    h.kill(registry.id());
    let update = {
        let commands = commands.clone();
        let b = d("zone-b");
        madsim::task::spawn(async move { describe(&commands, &b).await })
    };
    sleep(Duration::from_secs(2)).await;
    h.restart(registry.id());
    let new_id = wait_described(&views, &[1, 2], address, &d("zone-b")).await;
    assert_ne!(
        new_id, id,
        "the restarted registry never held {id}: a new incarnation"
    );
    // The call may have timed out while the registry was down; the change was kept and
    // published, counted once more.
    if let Ok(Ok(n)) = update.await {
        assert_eq!(n, 2);
    }
}

/// A member that shuts down gracefully at `leave_at` (simulated time since the test began).
fn start_leaving_member(h: &Handle, i: usize, views: Views, leave_at: Instant) -> NodeHandle {
    let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, i as u8));
    h.create_node()
        .name(format!("m{i}"))
        .ip(ip)
        .init(move || {
            let views = views.clone();
            async move {
                let ctx = member_ctx(i, ip, &views);
                let mut config = provider_config();
                config.rpc_timeout = Duration::from_secs(1);
                let provider = RegistryProvider::new(config);
                provider.start_member(ctx.clone()).await.unwrap();
                madsim::time::sleep_until(leave_at).await;
                provider.shutdown(true).await.unwrap();
                std::future::pending::<()>().await;
            }
        })
        .build()
}

/// A graceful shutdown whose first Leave attempts fail (the member is cut off for 600 ms) keeps
/// trying, so peers see a leave, not an expiry a TTL later.
#[madsim::test]
async fn a_graceful_leave_retries_across_a_short_cut() {
    let h = Handle::current();
    let views: Views = Arc::default();
    let registry = start_registry(&h);
    let leave_at = Instant::now() + Duration::from_secs(15);
    let m1 = start_leaving_member(&h, 1, views.clone(), leave_at);
    start_member(&h, 2, views.clone());
    wait_all(&views, &[1, 2], 2, Duration::from_secs(14)).await;
    madsim::time::sleep_until(leave_at - Duration::from_millis(10)).await;
    let net = NetSim::current();
    net.clog_link(m1.id(), registry.id());
    net.clog_link(registry.id(), m1.id());
    sleep(Duration::from_millis(610)).await;
    net.unclog_link(m1.id(), registry.id());
    net.unclog_link(registry.id(), m1.id());
    // The last heartbeat got through at most a heartbeat interval (1 s) before the cut, so an
    // expiry could not come before leave_at + 3 s (TTL 4 s). A leave is seen well before.
    let gone = wait_all(&views, &[2], 1, Duration::from_secs(10)).await;
    let at = Instant::now() - leave_at;
    assert!(
        at < Duration::from_millis(2_500),
        "m1 disappeared {at:?} after its shutdown began ({gone:?} of waiting): an expiry, not a leave"
    );
}
