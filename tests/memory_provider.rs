//! The in-memory provider's semantics. Runs unchanged in the normal build (tokio) and in the
//! simulated build (`--cfg madsim`, where `#[tokio::test]` is madsim's test runtime).

mod common;

use common::wait_members;
use shoal::provider::memory::{InMemoryProvider, InMemoryRegistry};
use shoal::{
    ClusterEvent, ClusterProvider, ClusterProviderContext, ProviderError, TokioClock, TopologyEvent,
};

fn ctx(cluster: &str, address: &str, kinds: &[&str]) -> ClusterProviderContext {
    ClusterProviderContext::new(
        cluster,
        address,
        kinds.iter().copied(),
        TokioClock::shared(),
    )
    .unwrap()
}

async fn member(registry: &InMemoryRegistry, c: &ClusterProviderContext) -> InMemoryProvider {
    let p = InMemoryProvider::new(registry.clone());
    p.start_member(c.clone()).await.unwrap();
    p
}

#[tokio::test]
async fn join_makes_every_member_see_every_other() {
    let registry = InMemoryRegistry::new();
    let ctxs: Vec<_> = (1..=3)
        .map(|i| ctx("c", &format!("10.0.0.{i}:4000"), &["user"]))
        .collect();
    let mut providers = Vec::new();
    for c in &ctxs {
        providers.push(member(&registry, c).await);
        // start_member returns only once the node's own view contains itself.
        assert!(c.partition_manager.topology().contains(&c.member.id));
    }
    for c in &ctxs {
        let t = wait_members(&c.partition_manager, 3).await;
        assert_eq!(t.version(), registry.topology("c").version());
        for other in &ctxs {
            assert_eq!(
                t.member(&other.member.id).unwrap().address,
                other.member.address
            );
        }
    }
    // Same version, same owners.
    for i in 0..200 {
        let id = format!("u{i}");
        let owners: Vec<_> = ctxs
            .iter()
            .map(|c| c.partition_manager.owner("user", &id).unwrap().id.clone())
            .collect();
        assert!(owners.windows(2).all(|w| w[0] == w[1]), "{id}: {owners:?}");
    }
}

#[tokio::test]
async fn graceful_leave_and_crash_both_remove_the_member() {
    let registry = InMemoryRegistry::new();
    let (a, b, c) = (
        ctx("c", "a:1", &["k"]),
        ctx("c", "b:1", &["k"]),
        ctx("c", "c:1", &["k"]),
    );
    let pa = member(&registry, &a).await;
    let pb = member(&registry, &b).await;
    let pc = member(&registry, &c).await;
    wait_members(&a.partition_manager, 3).await;

    pb.shutdown(true).await.unwrap();
    let t = wait_members(&a.partition_manager, 2).await;
    assert!(!t.contains(&b.member.id));

    pc.shutdown(false).await.unwrap();
    let t = wait_members(&a.partition_manager, 1).await;
    assert_eq!(
        t.member_ids().cloned().collect::<Vec<_>>(),
        vec![a.member.id.clone()]
    );

    // Dropping a provider without shutdown is a crash too.
    let d = ctx("c", "d:1", &["k"]);
    let pd = member(&registry, &d).await;
    wait_members(&a.partition_manager, 2).await;
    drop(pd);
    wait_members(&a.partition_manager, 1).await;

    assert!(matches!(
        pb.shutdown(true).await,
        Err(ProviderError::NotStarted)
    ));
    pa.shutdown(true).await.unwrap();
    assert!(registry.topology("c").is_empty());
    assert!(
        registry.clusters().is_empty(),
        "an empty, unwatched cluster is dropped"
    );
}

#[tokio::test]
async fn client_sees_topology_resolves_owners_and_is_not_a_member() {
    let registry = InMemoryRegistry::new();
    let a = ctx("c", "a:1", &["k"]);
    let b = ctx("c", "b:1", &["k"]);
    let _pa = member(&registry, &a).await;
    let _pb = member(&registry, &b).await;
    let client_ctx = ctx("c", "client:1", &[]);
    let client = InMemoryProvider::new(registry.clone());
    client.start_client(client_ctx.clone()).await.unwrap();
    let t = wait_members(&client_ctx.partition_manager, 2).await;
    assert!(!t.contains(&client_ctx.member.id));
    wait_members(&a.partition_manager, 2).await;

    let owner = client_ctx.partition_manager.owner("k", "x").unwrap();
    assert_eq!(a.partition_manager.owner("k", "x").unwrap().id, owner.id);
    // The client reaches the owner's partition manager, which agrees.
    let remote = client.resolve_partition_manager(&owner.id).await.unwrap();
    assert_eq!(remote.member_id(), &owner.id);
    assert_eq!(remote.owner("k", "x").await.unwrap().unwrap().id, owner.id);
    assert_eq!(remote.topology_version().await.unwrap(), t.version());
    let stranger = shoal::MemberId::parse("nobody").unwrap();
    assert!(matches!(
        client.resolve_partition_manager(&stranger).await,
        Err(ProviderError::UnknownMember(_))
    ));
    client.shutdown(true).await.unwrap();
    assert_eq!(
        registry.topology("c").len(),
        2,
        "a client leaving removes no member"
    );
}

#[tokio::test]
async fn clusters_are_isolated() {
    let registry = InMemoryRegistry::new();
    let a = ctx("blue", "a:1", &["k"]);
    let b = ctx("green", "b:1", &["k"]);
    let _pa = member(&registry, &a).await;
    let _pb = member(&registry, &b).await;
    let a2 = ctx("blue", "a2:1", &["k"]);
    let _pa2 = member(&registry, &a2).await;
    wait_members(&a.partition_manager, 2).await;
    assert_eq!(b.partition_manager.topology().len(), 1);
    assert_eq!(registry.topology("green").len(), 1);
    assert_eq!(
        registry.clusters(),
        vec!["blue".to_string(), "green".to_string()]
    );
}

#[tokio::test]
async fn events_arrive_in_order_with_increasing_versions() {
    let registry = InMemoryRegistry::new();
    let a = ctx("c", "a:1", &["k"]);
    let mut sub = a.events.subscribe();
    let pa = member(&registry, &a).await;
    let b = ctx("c", "b:1", &["k", "j"]);
    let pb = member(&registry, &b).await;
    wait_members(&a.partition_manager, 2).await;
    pb.shutdown(true).await.unwrap();
    wait_members(&a.partition_manager, 1).await;

    let mut events = Vec::new();
    while let Some(e) = sub.try_recv().unwrap() {
        events.push(e);
    }
    let versions: Vec<u64> = events.iter().map(ClusterEvent::version).collect();
    assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{versions:?}");
    let changes: Vec<u64> = events
        .iter()
        .filter(|e| matches!(e, ClusterEvent::TopologyChanged { .. }))
        .map(ClusterEvent::version)
        .collect();
    assert_eq!(changes.len(), 3, "join a, join b, leave b: {events:#?}");
    assert!(changes.windows(2).all(|w| w[0] < w[1]));
    let registered: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ClusterEvent::Topology(TopologyEvent::Registered { member, .. }) => {
                Some(member.id.clone())
            }
            _ => None,
        })
        .collect();
    assert_eq!(registered, vec![a.member.id.clone(), b.member.id.clone()]);
    let deregistered: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            ClusterEvent::Topology(TopologyEvent::Deregistered {
                member, version, ..
            }) => Some((member.kinds.len(), *version)),
            _ => None,
        })
        .collect();
    assert_eq!(
        deregistered,
        vec![(2, changes[2])],
        "carries the kinds and the version"
    );
    pa.shutdown(true).await.unwrap();
}

#[tokio::test]
async fn bad_input_is_rejected_without_harming_others() {
    let registry = InMemoryRegistry::new();
    let a = ctx("c", "a:1", &["k"]);
    let pa = member(&registry, &a).await;
    assert!(matches!(
        pa.start_member(a.clone()).await,
        Err(ProviderError::AlreadyStarted)
    ));

    // Same incarnation id twice.
    let dup = InMemoryProvider::new(registry.clone());
    let err = dup.start_member(a.clone()).await.unwrap_err();
    assert!(matches!(err, ProviderError::DuplicateMember(_)), "{err}");

    // Too many kinds for the registry's limits.
    let strict = InMemoryRegistry::with_limits(shoal::MemberLimits {
        max_kinds: 1,
        ..Default::default()
    });
    let p = InMemoryProvider::new(strict.clone());
    let err = p
        .start_member(ctx("c", "x:1", &["k", "j"]))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("kinds"), "{err}");
    assert!(strict.topology("c").is_empty());

    // Bad names never reach a provider.
    let err = ClusterProviderContext::new("", "a:1", ["k"], TokioClock::shared()).unwrap_err();
    assert!(err.to_string().contains("cluster name"), "{err}");

    assert_eq!(registry.topology("c").len(), 1);
    assert_eq!(a.partition_manager.topology().len(), 1);
}

#[tokio::test]
async fn slow_watcher_skips_to_the_newest_topology() {
    let registry = InMemoryRegistry::new();
    let watcher_ctx = ctx("c", "w:1", &[]);
    let mut sub = watcher_ctx.events.subscribe();
    let watcher = InMemoryProvider::new(registry.clone());
    watcher.start_client(watcher_ctx.clone()).await.unwrap();
    // 50 joins without the test task sleeping in between: the watcher task does not get to run
    // until the end, and catches up with the newest topology instead of replaying 50 versions.
    let mut providers = Vec::new();
    for i in 0..50 {
        let p = InMemoryProvider::new(registry.clone());
        p.start_member(ctx("c", &format!("n{i}:1"), &["k"]))
            .await
            .unwrap();
        providers.push(p);
    }
    let t = wait_members(&watcher_ctx.partition_manager, 50).await;
    assert_eq!(t.version(), registry.topology("c").version());
    let mut applied = 0;
    while let Some(e) = sub.try_recv().unwrap() {
        applied += usize::from(matches!(e, ClusterEvent::TopologyChanged { .. }));
    }
    assert!(
        applied < 10,
        "the watcher applied {applied} versions, expected a jump to the newest"
    );
    drop(providers);
    wait_members(&watcher_ctx.partition_manager, 0).await;
}

#[tokio::test]
async fn a_member_changes_its_description_in_place_and_peers_rebalance() {
    let registry = InMemoryRegistry::new();
    let a = ctx("c", "10.0.0.1:4000", &["user"]);
    let b = ctx("c", "10.0.0.2:4000", &["user"]);
    let pa = member(&registry, &a).await;
    let _pb = member(&registry, &b).await;
    wait_members(&b.partition_manager, 2).await;
    let mut events = b.events.subscribe();
    let before = b.partition_manager.version();
    let d = shoal::Description {
        kinds: ["order".to_string(), "user".to_string()].into(),
        zone: Some("z1".into()),
        metadata: [("rack".to_string(), "r1".to_string())].into(),
    };
    pa.update_member(d.clone()).await.unwrap();
    // The caller's own view shows it on return; the peer learns it as one changed member.
    let own = a.partition_manager.topology();
    assert_eq!(own.member(&a.member.id).unwrap().description(), d);
    loop {
        if let Ok(ClusterEvent::TopologyChanged { topology, .. }) = events.recv().await
            && topology.version() > before
        {
            assert_eq!(topology.member(&a.member.id).unwrap().description(), d);
            assert_eq!(topology.len(), 2, "the same incarnation, not a new member");
            break;
        }
    }
    assert_eq!(
        b.partition_manager.owner("order", "o1").unwrap().id,
        a.member.id
    );
    // An invalid description is refused and changes nothing; a client has none to change.
    let bad = shoal::Description {
        zone: Some(String::new()),
        ..d.clone()
    };
    assert!(matches!(
        pa.update_member(bad).await,
        Err(ProviderError::Invalid(_))
    ));
    assert_eq!(
        registry
            .topology("c")
            .member(&a.member.id)
            .unwrap()
            .description(),
        d
    );
    let client = InMemoryProvider::new(registry.clone());
    client
        .start_client(ctx("c", "10.0.0.9:4000", &[]))
        .await
        .unwrap();
    assert!(matches!(
        client.update_member(d).await,
        Err(ProviderError::NotAMember)
    ));
}
