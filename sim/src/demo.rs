//! A first simulated cluster: five in-memory members, one crashed and restarted.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use madsim::runtime::{Handle, Runtime};
use shoal::provider::memory::{InMemoryProvider, InMemoryRegistry};
use shoal::{ClusterProvider, ClusterProviderContext, MemberId, PartitionManager, TokioClock};

/// What one seed of the demo saw.
#[derive(Debug, Clone)]
pub struct DemoOutcome {
    /// The seed.
    pub seed: u64,
    /// Checker violations (empty: the seed passed).
    pub violations: Vec<String>,
    /// Simulated time from the crash until every survivor had removed the crashed member.
    pub failover: Option<Duration>,
    /// Simulated seconds the run took.
    pub sim_seconds: f64,
}

/// Per node: its current incarnation and partition manager.
type Views = Arc<Mutex<BTreeMap<String, (MemberId, Arc<PartitionManager>)>>>;

const MEMBERS: usize = 5;
const CLUSTER: &str = "demo";

/// Runs the demo on `seed` in a fresh simulated runtime.
pub fn run(seed: u64) -> DemoOutcome {
    let rt = Runtime::with_seed_and_config(seed, madsim::Config::default());
    rt.block_on(scenario(seed))
}

async fn scenario(seed: u64) -> DemoOutcome {
    let handle = Handle::current();
    let registry = InMemoryRegistry::new();
    let views: Views = Arc::default();
    let start = madsim::time::Instant::now();
    let mut violations = Vec::new();

    let mut nodes = Vec::new();
    for i in 0..MEMBERS {
        let name = format!("m{i}");
        let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, i as u8 + 1));
        let (registry, views, node) = (registry.clone(), views.clone(), name.clone());
        let handle = handle
            .create_node()
            .name(&name)
            .ip(ip)
            .init(move || {
                let (registry, views, node) = (registry.clone(), views.clone(), node.clone());
                async move {
                    let ctx = ClusterProviderContext::new(
                        CLUSTER,
                        format!("{ip}:4000"),
                        ["user"],
                        TokioClock::shared(),
                    )
                    .expect("valid member");
                    views
                        .lock()
                        .unwrap()
                        .insert(node, (ctx.member.id.clone(), ctx.partition_manager.clone()));
                    let provider = InMemoryProvider::new(registry);
                    provider.start_member(ctx).await.expect("join");
                    std::future::pending::<()>().await;
                }
            })
            .build();
        nodes.push((name, handle));
    }

    madsim::time::sleep(Duration::from_secs(1)).await;
    check_agreement(&views, MEMBERS, &mut violations, "after start");

    let victim = madsim::rand::random::<usize>() % MEMBERS;
    let (victim_name, victim_node) = &nodes[victim];
    let victim_id: MemberId = views.lock().unwrap()[victim_name].0.clone();
    tracing::info!(seed, victim = %victim_name, "crashing member");
    let crashed_at = madsim::time::Instant::now();
    handle.kill(victim_node.id());
    let mut failover = None;
    for _ in 0..1000 {
        let survivors_done = views
            .lock()
            .unwrap()
            .iter()
            .filter(|(n, _)| *n != victim_name)
            .all(|(_, (_, pm))| !pm.topology().contains(&victim_id));
        if survivors_done {
            failover = Some(crashed_at.elapsed());
            break;
        }
        madsim::time::sleep(Duration::from_millis(10)).await;
    }
    if failover.is_none() {
        violations.push(format!(
            "crashed member {victim_id} still present on survivors 10 s after the crash"
        ));
    }
    views.lock().unwrap().remove(victim_name);
    check_agreement(&views, MEMBERS - 1, &mut violations, "after crash");

    handle.restart(victim_node.id());
    madsim::time::sleep(Duration::from_secs(1)).await;
    check_agreement(&views, MEMBERS, &mut violations, "after restart");

    DemoOutcome {
        seed,
        violations,
        failover,
        sim_seconds: start.elapsed().as_secs_f64(),
    }
}

/// Every node holds `expected` members at one version and agrees on sampled owners.
fn check_agreement(views: &Views, expected: usize, violations: &mut Vec<String>, when: &str) {
    let views = views.lock().unwrap();
    let mut versions = BTreeMap::new();
    for (node, (_, pm)) in views.iter() {
        let t = pm.topology();
        if t.len() != expected {
            violations.push(format!(
                "{when}: {node} sees {} members, expected {expected}",
                t.len()
            ));
        }
        versions.insert(node.clone(), t.version());
    }
    if versions
        .values()
        .collect::<std::collections::BTreeSet<_>>()
        .len()
        > 1
    {
        violations.push(format!(
            "{when}: nodes hold different versions {versions:?}"
        ));
        return;
    }
    for i in 0..100 {
        let id = format!("user-{i}");
        let owners: BTreeMap<_, _> = views
            .iter()
            .map(|(n, (_, pm))| (n.clone(), pm.owner("user", &id).map(|m| m.id.clone())))
            .collect();
        if owners
            .values()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            > 1
        {
            violations.push(format!("{when}: owners of {id} disagree: {owners:?}"));
        }
    }
}
