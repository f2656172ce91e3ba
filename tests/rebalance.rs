//! Two nodes with different addresses really rebalance: identities move to a joining node and
//! back when it leaves, and both nodes agree throughout.

mod common;

use common::wait_members;
use shoal::provider::memory::{InMemoryProvider, InMemoryRegistry};
use shoal::{ClusterEvent, ClusterProvider, ClusterProviderContext, TokioClock};

#[tokio::test]
async fn two_nodes_rebalance_on_join_and_leave() {
    let registry = InMemoryRegistry::new();
    let a =
        ClusterProviderContext::new("c", "10.0.0.1:4000", ["user"], TokioClock::shared()).unwrap();
    let b =
        ClusterProviderContext::new("c", "10.0.0.2:4000", ["user"], TokioClock::shared()).unwrap();
    assert_ne!(a.member.address, b.member.address);

    let pa = InMemoryProvider::new(registry.clone());
    pa.start_member(a.clone()).await.unwrap();
    let ids: Vec<String> = (0..1000).map(|i| format!("user-{i}")).collect();
    for id in &ids {
        assert_eq!(
            a.partition_manager.owner("user", id).unwrap().id,
            a.member.id
        );
    }

    let mut events = a.events.subscribe();
    let pb = InMemoryProvider::new(registry.clone());
    pb.start_member(b.clone()).await.unwrap();
    let t = wait_members(&a.partition_manager, 2).await;
    assert_eq!(t.len(), 2, "both members are in the topology");

    // A's report lists exactly the identities now owned by B.
    let report = loop {
        if let ClusterEvent::TopologyChanged { report, .. } = events.recv().await.unwrap() {
            break report;
        }
    };
    assert!(
        report
            .moved
            .iter()
            .all(|m| m.from.as_ref() == Some(&a.member.id) && m.to.as_ref() == Some(&b.member.id))
    );
    let owned_by_b: Vec<&String> = ids
        .iter()
        .filter(|id| a.partition_manager.owner("user", id).unwrap().id == b.member.id)
        .collect();
    let moved: Vec<&String> = report.moved.iter().map(|m| &m.identity).collect();
    let mut sorted = owned_by_b.clone();
    sorted.sort();
    assert_eq!(moved, sorted);
    assert!(
        (400..=600).contains(&moved.len()),
        "about half moved: {}",
        moved.len()
    );
    // B computes the same owners.
    for id in &ids {
        assert_eq!(
            a.partition_manager.owner("user", id).unwrap().id,
            b.partition_manager.owner("user", id).unwrap().id
        );
    }

    pb.shutdown(true).await.unwrap();
    wait_members(&a.partition_manager, 1).await;
    let back = loop {
        if let ClusterEvent::TopologyChanged { report, .. } = events.recv().await.unwrap() {
            break report;
        }
    };
    assert_eq!(
        back.moved.len(),
        moved.len(),
        "everything B owned comes back to A"
    );
    for id in &ids {
        assert_eq!(
            a.partition_manager.owner("user", id).unwrap().id,
            a.member.id
        );
    }
    pa.shutdown(true).await.unwrap();
}
