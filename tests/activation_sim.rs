//! Activation over the simulated network (the real gRPC partition service and transport): an
//! identity activates on its owner, moves with its state when a joining member takes it over
//! (the old owner lets go before the new one activates), and a caller's old fence is refused.
#![cfg(madsim)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use madsim::runtime::Handle;
use madsim::time::sleep;
use shoal::activation::{
    ActivationClient, ActivationConfig, ActivationHost, ActorError, Actors, CallError,
    Deactivation, GrpcTransport, PlacementLookup, RefusalCode, Transport,
};
use shoal::placement::naive_owner;
use shoal::provider::PartitionService;
use shoal::provider::memory::{InMemoryProvider, InMemoryRegistry};
use shoal::{ClusterProvider, ClusterProviderContext, ClusterTopology, TokioClock};

/// What every node's actors did: (node, event, identity).
type Log = Arc<Mutex<Vec<(usize, &'static str, String)>>>;

struct Counter {
    node: usize,
    log: Log,
    counts: Mutex<BTreeMap<String, u64>>,
}

#[async_trait]
impl Actors for Counter {
    async fn activate(
        &self,
        _: &str,
        identity: &str,
        handed: Option<Vec<u8>>,
    ) -> Result<(), ActorError> {
        let n = handed.map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
        self.counts.lock().unwrap().insert(identity.into(), n);
        self.log
            .lock()
            .unwrap()
            .push((self.node, "activate", identity.into()));
        Ok(())
    }

    async fn call(&self, _: &str, identity: &str, payload: Vec<u8>) -> Vec<u8> {
        if payload == b"slow" {
            // Logged when the call ends, whether it returns or is dropped.
            struct Ended(Log, usize, String);
            impl Drop for Ended {
                fn drop(&mut self) {
                    let id = std::mem::take(&mut self.2);
                    self.0.lock().unwrap().push((self.1, "slow call ended", id));
                }
            }
            let _ended = Ended(self.log.clone(), self.node, identity.to_string());
            sleep(Duration::from_secs(10)).await;
        }
        let mut c = self.counts.lock().unwrap();
        let n = c.get_mut(identity).unwrap();
        *n += 1;
        n.to_le_bytes().to_vec()
    }

    async fn deactivate(&self, _: &str, identity: &str, _: Deactivation) -> Option<Vec<u8>> {
        self.log
            .lock()
            .unwrap()
            .push((self.node, "deactivate", identity.into()));
        self.counts
            .lock()
            .unwrap()
            .remove(identity)
            .map(|n| n.to_le_bytes().to_vec())
    }
}

fn ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1 + i as u8))
}

fn ctx(i: usize) -> ClusterProviderContext {
    ClusterProviderContext::new("c", format!("{}:4000", ip(i)), ["k"], TokioClock::shared())
        .unwrap()
}

/// Runs `f` on a node of its own at 10.0.9.9 (the test's own task has no address).
async fn from_outside<T: Send + 'static>(
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    static N: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(1);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let node = Handle::current()
        .create_node()
        .name(format!("caller{n}"))
        .ip(IpAddr::V4(Ipv4Addr::new(10, 0, 9, n)))
        .build();
    node.spawn(f).await.unwrap()
}

/// Runs `f` on member node `node` (its network and clock).
async fn on<T: Send + 'static>(
    node: madsim::task::NodeId,
    f: impl std::future::Future<Output = T> + Send + 'static,
) -> T {
    Handle::current()
        .get_node(node)
        .unwrap()
        .spawn(f)
        .await
        .unwrap()
}

/// Starts member `i` on its own node: provider, host, partition service.
fn start_member(
    i: usize,
    ctx: ClusterProviderContext,
    registry: InMemoryRegistry,
    log: Log,
) -> (
    madsim::task::NodeId,
    Arc<Mutex<Option<Arc<ActivationClient>>>>,
) {
    let client: Arc<Mutex<Option<Arc<ActivationClient>>>> = Arc::default();
    let out = client.clone();
    let node = Handle::current()
        .create_node()
        .name(format!("m{i}"))
        .ip(ip(i))
        .init(move || {
            let (ctx, registry, log, client) =
                (ctx.clone(), registry.clone(), log.clone(), client.clone());
            async move {
                let actors = Arc::new(Counter {
                    node: i,
                    log,
                    counts: Mutex::default(),
                });
                let transport = Arc::new(GrpcTransport::new(
                    "c",
                    ctx.clock.clone(),
                    Duration::from_secs(1),
                ));
                let host = ActivationHost::new(
                    ctx.clone(),
                    actors,
                    transport.clone(),
                    ActivationConfig::default(),
                );
                let _driver = host.start();
                let service = PartitionService::new(ctx.partition_manager.clone())
                    .with_host(host.clone())
                    .server();
                madsim::task::spawn(
                    tonic::transport::Server::builder()
                        .add_service(service)
                        .serve(SocketAddr::new(ip(i), 4000)),
                );
                let provider = InMemoryProvider::new(registry);
                provider.start_member(ctx.clone()).await.unwrap();
                *client.lock().unwrap() = Some(Arc::new(ActivationClient::new(
                    ctx.clone(),
                    Arc::new(PlacementLookup::new(ctx.partition_manager.clone())),
                    Some(host),
                    transport,
                    Default::default(),
                )));
                std::future::pending::<()>().await;
            }
        })
        .build();
    (node.id(), out)
}

type Slot = (
    madsim::task::NodeId,
    Arc<Mutex<Option<Arc<ActivationClient>>>>,
);

/// A call to `k/x` from the member of `slot`, run on its node.
async fn call(slot: &Slot, x: &str) -> shoal::activation::Called {
    call_with(slot, x, Vec::new()).await
}

/// A call to `k/x` with `payload` from the member of `slot`, run on its node.
async fn call_with(slot: &Slot, x: &str, payload: Vec<u8>) -> shoal::activation::Called {
    let client = slot.1.lock().unwrap().clone().expect("started");
    let x = x.to_string();
    on(slot.0, async move { client.call("k", &x, payload).await }).await
}

/// An identity `a` owns among {a, b} that `c` takes over once it joins.
fn moving_identity(
    a: &ClusterProviderContext,
    b: &ClusterProviderContext,
    c: &ClusterProviderContext,
) -> String {
    let two = ClusterTopology::new("c", 1, [a.member.clone(), b.member.clone()]).unwrap();
    let three = ClusterTopology::new(
        "c",
        2,
        [a.member.clone(), b.member.clone(), c.member.clone()],
    )
    .unwrap();
    (0..1000)
        .map(|i| format!("id-{i}"))
        .find(|x| {
            naive_owner(&two, "k", x).map(|m| &m.id) == Some(&a.member.id)
                && naive_owner(&three, "k", x).map(|m| &m.id) == Some(&c.member.id)
        })
        .expect("an identity that moves from a to c")
}

/// A call still running at the drain deadline is cancelled (its future dropped, the caller
/// told `cancelled` and not retried), and the new owner activates only once the old one's
/// actor was deactivated after that: the two activations never overlap, the call included.
/// The state and the generation go on.
#[madsim::test]
async fn a_call_running_past_the_drain_is_cancelled_before_the_identity_moves() {
    let registry = InMemoryRegistry::new();
    let log: Log = Arc::default();
    let (a, b, c) = (ctx(0), ctx(1), ctx(2));
    let x = moving_identity(&a, &b, &c);
    let from_a = start_member(0, a.clone(), registry.clone(), log.clone());
    let from_b = start_member(1, b.clone(), registry.clone(), log.clone());
    sleep(Duration::from_secs(1)).await;
    for _ in 0..2 {
        let reply = call(&from_b, &x).await.result.unwrap();
        assert_eq!(
            (reply.served_by.clone(), reply.generation),
            (a.member.id.clone(), 1)
        );
    }
    // A call that works 10 s, far past the 2 s drain (made on a itself: a remote caller's
    // transport gives up after 1 s, while the call goes on at a).
    let slow = {
        let (from_a, x) = (from_a.clone(), x.clone());
        madsim::task::spawn(async move { call_with(&from_a, &x, b"slow".to_vec()).await })
    };
    sleep(Duration::from_millis(500)).await;
    let _c = start_member(2, c.clone(), registry.clone(), log.clone());
    let slow = slow.await.unwrap();
    assert!(
        matches!(
            slow.result,
            Err(CallError::Refused {
                code: RefusalCode::Cancelled,
                ..
            })
        ),
        "{:?}",
        slow.result
    );
    assert_eq!(slow.attempts.len(), 1, "a cancelled call is not retried");
    sleep(Duration::from_secs(1)).await;
    let reply = call(&from_b, &x).await.result.unwrap();
    assert_eq!(reply.served_by, c.member.id);
    // Two calls counted on a (the cancelled one never got there), the third on c.
    assert_eq!(reply.payload, 3u64.to_le_bytes().to_vec());
    assert_eq!(reply.generation, 2);
    let events: Vec<(usize, &str)> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, i)| i == &x)
        .map(|(n, e, _)| (*n, *e))
        .collect();
    assert_eq!(
        events,
        vec![
            (0, "activate"),
            (0, "slow call ended"),
            (0, "deactivate"),
            (2, "activate")
        ]
    );
}

#[madsim::test]
async fn an_identity_moves_to_a_joining_member_with_its_state_and_is_active_once() {
    let registry = InMemoryRegistry::new();
    let log: Log = Arc::default();
    let (a, b, c) = (ctx(0), ctx(1), ctx(2));
    let x = moving_identity(&a, &b, &c);
    let _a = start_member(0, a.clone(), registry.clone(), log.clone());
    let from_b = start_member(1, b.clone(), registry.clone(), log.clone());
    sleep(Duration::from_secs(1)).await;

    // b calls x: a activates it and serves three calls.
    for want in 1..=3u64 {
        let called = call(&from_b, &x).await;
        let reply = called.result.unwrap();
        assert_eq!(reply.served_by, a.member.id);
        assert_eq!(reply.activated, want == 1);
        assert_eq!(reply.payload, want.to_le_bytes().to_vec());
    }
    let old_fence = call(&from_b, &x).await.attempts[0].to.fence.clone();

    // c joins: x is c's now. The next call activates it on c, after a let go of it, and the
    // count goes on from a's (the state was handed over).
    let _c = start_member(2, c.clone(), registry.clone(), log.clone());
    sleep(Duration::from_secs(1)).await;
    let called = call(&from_b, &x).await;
    let reply = called.result.unwrap();
    assert_eq!(reply.served_by, c.member.id);
    assert!(reply.activated);
    assert_eq!(reply.payload, 5u64.to_le_bytes().to_vec());
    let events: Vec<(usize, &str)> = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, i)| i == &x)
        .map(|(n, e, _)| (*n, *e))
        .collect();
    assert_eq!(
        events,
        vec![(0, "activate"), (0, "deactivate"), (2, "activate")],
        "a let go before c activated"
    );

    // A caller still routing with the old fence to a is refused: a does not own x any more.
    // And c refuses a fence older than the one it holds x under.
    let (aa, ca, cid, xx) = (
        a.member.address.clone(),
        c.member.address.clone(),
        c.member.id.clone(),
        x.clone(),
    );
    let a_member = a.member.clone();
    let (to_a, to_c, released) = from_outside(async move {
        let transport = GrpcTransport::new("c", TokioClock::shared(), Duration::from_secs(1));
        let to_a = transport.call(&aa, "k", &xx, &old_fence, Vec::new()).await;
        let older = shoal::activation::Fence {
            owner: cid,
            ..old_fence
        };
        let to_c = transport.call(&ca, "k", &xx, &older, Vec::new()).await;
        // a, asked to let go again, answers with what it keeps and as which incarnation (a
        // claimant reads the answer as that incarnation's, not the one it asked).
        let released = transport.release(&a_member, "k", &xx, &older, &ca).await;
        (to_a, to_c, released)
    })
    .await;
    let released = released.unwrap();
    assert_eq!(released.answered_as.as_ref(), Some(&a.member.id));
    assert!(!released.was_active);
    assert_eq!(released.generation, 1, "a held x as generation 1");
    assert!(released.settled.is_some(), "c settled a's state");
    assert!(
        matches!(
            to_a,
            Err(CallError::Refused {
                code: RefusalCode::NotOwner,
                ..
            })
        ),
        "{to_a:?}"
    );
    assert!(
        matches!(
            to_c,
            Err(CallError::Refused {
                code: RefusalCode::StaleFence,
                ..
            })
        ),
        "{to_c:?}"
    );
}

#[madsim::test]
async fn malformed_calls_get_a_clear_status_and_the_member_keeps_serving() {
    let registry = InMemoryRegistry::new();
    let a = ctx(0);
    let _a = start_member(0, a.clone(), registry.clone(), Log::default());
    sleep(Duration::from_secs(1)).await;
    let (address, id) = (a.member.address.clone(), a.member.id.to_string());
    from_outside(async move {
        use shoal::provider::remote::pb;
        let mut client = pb::partition_service_client::PartitionServiceClient::connect(format!(
            "http://{address}"
        ))
        .await
        .unwrap();
        let req = |kind: &str, fence: Option<pb::Fence>, payload: Vec<u8>| pb::CallRequest {
            cluster: "c".into(),
            kind: kind.into(),
            identity: "x".into(),
            fence,
            payload,
        };
        let fence = pb::Fence {
            epoch: 0,
            version: 1,
            owner_id: id,
        };
        let s = client
            .call(req("", Some(fence.clone()), vec![]))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        let s = client.call(req("k", None, vec![])).await.unwrap_err();
        assert!(s.message().contains("fence is required"), "{s:?}");
        let s = client
            .call(req("k", Some(fence.clone()), vec![0; 70 * 1024]))
            .await
            .unwrap_err();
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
        // Still serving.
        let ok = client.call(req("k", Some(fence), b"hi".to_vec())).await;
        assert!(ok.is_ok(), "{ok:?}");
    })
    .await;
}

/// One registered kind's activation: counts its calls, hands the count over.
struct Counted(u64);

#[async_trait]
impl shoal::activation::Actor for Counted {
    async fn call(&mut self, _payload: Vec<u8>) -> Vec<u8> {
        self.0 += 1;
        self.0.to_le_bytes().to_vec()
    }
    async fn deactivate(self: Box<Self>, _reason: Deactivation) -> Option<Vec<u8>> {
        Some(self.0.to_le_bytes().to_vec())
    }
}

/// Where a started member's `ActivationNode` is put once it joined.
type NodeSlot = Arc<Mutex<Option<Arc<shoal::activation::ActivationNode>>>>;

/// Starts member `i` as `ActivationNode` wires it: kind `k` registered with its own factory,
/// the service served before the join. Returns the node's id and its activation node.
fn start_built_member(
    i: usize,
    ctx: ClusterProviderContext,
    registry: InMemoryRegistry,
) -> (madsim::task::NodeId, NodeSlot, Arc<InMemoryProvider>) {
    let slot: NodeSlot = Arc::default();
    let out = slot.clone();
    let provider = Arc::new(InMemoryProvider::new(registry));
    let p = provider.clone();
    let node = Handle::current()
        .create_node()
        .name(format!("m{i}"))
        .ip(ip(i))
        .init(move || {
            let (ctx, slot, provider) = (ctx.clone(), slot.clone(), p.clone());
            async move {
                let counted = |_id: String, handed: Option<Vec<u8>>| async move {
                    let n = handed.map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap()));
                    Ok(Box::new(Counted(n)) as Box<dyn shoal::activation::Actor>)
                };
                let node = Arc::new(
                    shoal::activation::ActivationNode::builder(ctx.clone())
                        .kind("k", counted)
                        .call_timeout(Duration::from_secs(1))
                        .build()
                        .unwrap(),
                );
                madsim::task::spawn(
                    tonic::transport::Server::builder()
                        .add_service(node.service())
                        .serve(SocketAddr::new(ip(i), 4000)),
                );
                node.start_member(provider.as_ref()).await.unwrap();
                *slot.lock().unwrap() = Some(node);
                std::future::pending::<()>().await;
            }
        })
        .build();
    (node.id(), out, provider)
}

/// Kinds registered with their own factory, wired by `ActivationNode`: the identity counts on
/// its owner, moves with its count when a joining member takes it over, and a member that
/// shuts down through the node deactivates what it held before it leaves.
#[madsim::test]
async fn registered_kinds_move_with_their_state_and_shut_down_before_leaving() {
    let registry = InMemoryRegistry::new();
    let (a, b, c) = (ctx(0), ctx(1), ctx(2));
    let x = moving_identity(&a, &b, &c);
    let (_, _a, _) = start_built_member(0, a.clone(), registry.clone());
    let (b_node, b_slot, _) = start_built_member(1, b.clone(), registry.clone());
    sleep(Duration::from_secs(1)).await;
    let call_from_b = |x: String| {
        let node = b_slot.lock().unwrap().clone().expect("started");
        on(b_node, async move { node.call("k", &x, Vec::new()).await })
    };
    for want in 1..=3u64 {
        let reply = call_from_b(x.clone()).await.result.unwrap();
        assert_eq!(reply.served_by, a.member.id);
        assert_eq!(reply.payload, want.to_le_bytes().to_vec());
    }
    // c joins: x moves to c with its count.
    let (c_node, c_slot, c_provider) = start_built_member(2, c.clone(), registry.clone());
    sleep(Duration::from_secs(1)).await;
    let reply = call_from_b(x.clone()).await.result.unwrap();
    assert_eq!(reply.served_by, c.member.id);
    assert!(reply.activated);
    assert_eq!(reply.payload, 4u64.to_le_bytes().to_vec());
    // c shuts down through its node: x is deactivated before c leaves, and a takes it back
    // once c is gone (from nothing: a member that left is not asked, so what it kept does not
    // move, the documented limit).
    let node = c_slot.lock().unwrap().clone().expect("started");
    on(c_node, async move {
        node.shutdown(c_provider.as_ref(), true).await.unwrap();
        assert!(node.host().unwrap().active().is_empty());
    })
    .await;
    sleep(Duration::from_secs(1)).await;
    let reply = call_from_b(x.clone()).await.result.unwrap();
    assert_eq!(reply.served_by, a.member.id);
    assert!(reply.activated);
    assert_eq!(reply.payload, 1u64.to_le_bytes().to_vec());
}
