//! Simulator speed: the full stack against a bare madsim baseline with the same node count and
//! a comparable message rate, measured in one run.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use madsim::net::Endpoint;
use madsim::runtime::{Handle, Runtime};
use madsim::time::sleep;
use serde::Serialize;

use crate::scenario::{RunOptions, Scenario, run_seed_isolated};
use crate::wallclock::Stopwatch;

/// One side of the comparison.
#[derive(Clone, Debug, Serialize)]
pub struct Speed {
    /// What ran.
    pub what: String,
    /// Seeds run.
    pub seeds: u64,
    /// Simulated seconds, total.
    pub sim_seconds: f64,
    /// Wall seconds, total.
    pub wall_seconds: f64,
    /// Simulated seconds per wall second.
    pub speedup: f64,
    /// Seeds per wall second.
    pub seeds_per_second: f64,
}

/// The bare baseline: `members` member nodes, a registry node and a client node, madsim's raw
/// datagram network, each member sending a heartbeat request and getting a reply every 2 s and
/// the registry pushing one message to every node every 5 s (the registry's progress interval),
/// for `sim_seconds` simulated seconds.
pub fn baseline_seed(seed: u64, members: usize, sim_seconds: u64) {
    let rt = Runtime::with_seed_and_config(seed, madsim::Config::default());
    rt.block_on(async move {
        let h = Handle::current();
        let registry_ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        let reg = h.create_node().name("registry").ip(registry_ip).build();
        let nodes = members + 1;
        reg.spawn(async move {
            let ep = Arc::new(Endpoint::bind("0.0.0.0:7600").await.unwrap());
            let push = ep.clone();
            madsim::task::spawn(async move {
                loop {
                    sleep(Duration::from_secs(5)).await;
                    for i in 0..nodes {
                        let to: SocketAddr = (Ipv4Addr::new(10, 0, 1, i as u8 + 1), 4000).into();
                        let _ = push.send_to(to, 2, b"progress").await;
                    }
                }
            });
            let mut buf = [0u8; 64];
            loop {
                let (n, from) = ep.recv_from(1, &mut buf).await.unwrap();
                let _ = ep.send_to(from, 3, &buf[..n]).await;
            }
        });
        for i in 0..nodes {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, i as u8 + 1));
            h.create_node()
                .name(format!("m{i}"))
                .ip(ip)
                .build()
                .spawn(async move {
                    let ep = Arc::new(Endpoint::bind("0.0.0.0:4000").await.unwrap());
                    let rx = ep.clone();
                    madsim::task::spawn(async move {
                        let mut buf = [0u8; 64];
                        loop {
                            let _ = rx.recv_from(2, &mut buf).await;
                        }
                    });
                    let to: SocketAddr = (Ipv4Addr::new(10, 0, 0, 1), 7600).into();
                    let mut buf = [0u8; 64];
                    loop {
                        sleep(Duration::from_secs(2)).await;
                        let _ = ep.send_to(to, 1, b"heartbeat").await;
                        let _ = ep.recv_from(3, &mut buf).await;
                    }
                });
        }
        sleep(Duration::from_secs(sim_seconds)).await;
    });
}

/// Runs `seeds` seeds of `scenario` and of the baseline (same node count, same simulated
/// length), one at a time on one thread each, and reports both.
pub fn compare(scenario: &Scenario, seeds: u64) -> (Speed, Speed) {
    let wall = Stopwatch::start();
    let mut sim = 0.0;
    for seed in 1..=seeds {
        sim += run_seed_isolated(scenario, seed, &RunOptions::default()).sim_seconds;
    }
    let full_wall = wall.secs();
    let per_seed = (sim / seeds as f64).round().max(1.0) as u64;
    let members = scenario.members;
    let wall = Stopwatch::start();
    for seed in 1..=seeds {
        std::thread::spawn(move || baseline_seed(seed, members, per_seed))
            .join()
            .expect("baseline run");
    }
    let base_wall = wall.secs();
    let speed = |what: String, sim: f64, wall: f64| Speed {
        what,
        seeds,
        sim_seconds: sim,
        wall_seconds: wall,
        speedup: sim / wall.max(1e-9),
        seeds_per_second: seeds as f64 / wall.max(1e-9),
    };
    (
        speed(format!("{} (full stack)", scenario.name), sim, full_wall),
        speed(
            format!("bare madsim, {} nodes", members + 2),
            (per_seed * seeds) as f64,
            base_wall,
        ),
    )
}
