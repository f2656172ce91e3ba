//! The activation state driven by a node's membership, in simulated time: an identity active
//! on its owner drains and is let go when a joining member takes it over, and a caller's old
//! fence is refused afterwards.
#![cfg(madsim)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::time::sleep;
use shoal::activation::{Activations, Decision, IdentityLookup, PlacementLookup, Refusal, drive};
use shoal::placement::naive_owner;
use shoal::provider::memory::{InMemoryProvider, InMemoryRegistry};
use shoal::{ClusterProvider, ClusterProviderContext, ClusterTopology, TokioClock};

fn ctx(address: &str) -> ClusterProviderContext {
    ClusterProviderContext::new("c", address, ["k"], TokioClock::shared()).unwrap()
}

#[madsim::test]
async fn an_identity_taken_over_by_a_joining_member_drains_and_is_let_go() {
    let registry = InMemoryRegistry::new();
    let (a, b, c) = (ctx("10.0.0.1:1"), ctx("10.0.0.2:1"), ctx("10.0.0.3:1"));
    // An identity a owns among {a, b} that c takes over once it joins.
    let two = ClusterTopology::new("c", 1, [a.member.clone(), b.member.clone()]).unwrap();
    let three = ClusterTopology::new(
        "c",
        2,
        [a.member.clone(), b.member.clone(), c.member.clone()],
    )
    .unwrap();
    let x = (0..1000)
        .map(|i| format!("id-{i}"))
        .find(|x| {
            naive_owner(&two, "k", x).map(|m| &m.id) == Some(&a.member.id)
                && naive_owner(&three, "k", x).map(|m| &m.id) == Some(&c.member.id)
        })
        .expect("an identity that moves from a to c");
    let mut running = Vec::new();
    for ctx in [&a, &b] {
        let p = InMemoryProvider::new(registry.clone());
        p.start_member(ctx.clone()).await.unwrap();
        running.push(p);
    }
    let acts = Arc::new(Mutex::new(Activations::new(a.member.id.clone(), 100)));
    let gone: Arc<Mutex<Vec<String>>> = Arc::default();
    let g = gone.clone();
    let _driver = drive(&a, acts.clone(), Duration::from_secs(2), move |_, i| {
        g.lock().unwrap().push(i.to_string())
    });
    // b routes to a, with the fence of its topology; a activates it.
    let at = PlacementLookup::new(b.partition_manager.clone())
        .get("k", &x)
        .await
        .unwrap();
    assert_eq!(at.fence.owner, a.member.id);
    let t = a.partition_manager.topology();
    let owner = a.partition_manager.owner("k", &x).map(|m| m.id.clone());
    let decision =
        acts.lock()
            .unwrap()
            .request("k", &x, &at.fence, owner.as_ref(), t.epoch(), t.version());
    assert!(matches!(decision, Decision::Activated(_)), "{decision:?}");
    // c joins: x is c's now. a drains it (a request is still in flight) and lets it go at the
    // drain deadline.
    let pc = InMemoryProvider::new(registry.clone());
    pc.start_member(c.clone()).await.unwrap();
    sleep(Duration::from_millis(100)).await;
    assert_eq!(
        acts.lock().unwrap().request("k", &x, &at.fence, None, 0, 0),
        Decision::Refused(Refusal::Draining)
    );
    assert!(gone.lock().unwrap().is_empty());
    sleep(Duration::from_secs(2)).await;
    assert_eq!(*gone.lock().unwrap(), vec![x.clone()]);
    // A caller still routing with the old fence is sent to the new owner.
    let t = a.partition_manager.topology();
    let owner = a.partition_manager.owner("k", &x).map(|m| m.id.clone());
    assert_eq!(owner.as_ref(), Some(&c.member.id));
    assert_eq!(
        acts.lock()
            .unwrap()
            .request("k", &x, &at.fence, owner.as_ref(), t.epoch(), t.version()),
        Decision::Refused(Refusal::NotOwner { owner })
    );
}
