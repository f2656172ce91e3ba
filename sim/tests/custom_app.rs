//! How a team runs its own code in a simulated cluster: a scenario with an `app` that runs on
//! every node, next to the real provider, under the same faults and checkers.
#![cfg(madsim)]

use std::time::Duration;

use shoal::ClusterEvent;
use shoal_sim::cluster::{NodeApp, ProviderKind};
use shoal_sim::faults::{Fault, FaultSchedule, Scheduled, SimRng};
use shoal_sim::scenario::{RunOptions, Scenario, run_seed_isolated};

/// The "application": on every topology change, activate the identities this node owns among
/// 100, and check its own invariant — a node never owns an identity of a kind it does not host.
fn activator(app: NodeApp) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    Box::pin(async move {
        let mut events = app.ctx.events.subscribe();
        // The topology held when the app starts, then every change.
        let mut topology = Some(app.ctx.partition_manager.topology());
        loop {
            if let Some(topology) = topology.take() {
                activate(&app, topology.version());
            }
            // A subscriber that falls behind is told so (some seeds use tiny event buffers);
            // it carries on with the newest events.
            match events.recv().await {
                Ok(ClusterEvent::TopologyChanged { topology: t, .. }) => topology = Some(t),
                Ok(_) | Err(shoal::SubscriptionError::Lagged { .. }) => {}
                Err(shoal::SubscriptionError::Closed) => break,
            }
        }
    })
}

fn activate(app: &NodeApp, version: u64) {
    let owned = (0..100)
        .filter(|i| {
            app.ctx
                .partition_manager
                .owner("user", &format!("cart-{i}"))
                .is_some_and(|m| m.id == app.ctx.member.id)
        })
        .count();
    if app.is_client && owned > 0 {
        app.recorder.violation(format!(
            "{} is a client but owns {owned} identities",
            app.name
        ));
    }
    app.recorder
        .trace(&app.name, format!("app: owns {owned} of 100 at v{version}"));
}

fn one_crash(r: &mut SimRng, n: usize) -> FaultSchedule {
    FaultSchedule::new(vec![Scheduled {
        at: Duration::from_secs(5),
        fault: Fault::Crash {
            member: r.pick(n),
            restart_after: Some(Duration::from_secs(5)),
        },
    }])
}

#[test]
fn an_application_runs_on_every_node_under_faults() {
    let scenario = Scenario {
        name: "my-app",
        about: "my application under one crash",
        provider: ProviderKind::Registry,
        members: 4,
        clients: 1,
        fault_phase: Duration::from_secs(30),
        generate: one_crash,
        app: Some(activator),
        covers: &[],
        known_failure: None,
        knobs: None,
        seeds_divisor: 1,
    };
    let opts = RunOptions {
        keep_trace: true,
        ..RunOptions::default()
    };
    let r = run_seed_isolated(&scenario, 42, &opts);
    assert!(r.passed(), "{:?}", r.recording.violations);
    for node in ["m0", "m1", "m2", "m3", "client0"] {
        assert!(
            r.recording
                .trace
                .iter()
                .any(|t| t.node == node && t.event.starts_with("app: owns")),
            "the app ran on {node}: {:#?}",
            r.recording
                .trace
                .iter()
                .filter(|t| t.node == node || t.node == "harness")
                .map(|t| format!("{} {}", t.at_ms, t.event))
                .collect::<Vec<_>>()
        );
    }
    // Every member owns a share once converged; the client none.
    assert!(
        r.recording
            .trace
            .iter()
            .any(|t| t.node == "client0" && t.event.starts_with("app: owns 0 "))
    );
    let again = run_seed_isolated(&scenario, 42, &opts);
    assert_eq!(
        r.recording.digest, again.recording.digest,
        "apps replay deterministically too"
    );
}
