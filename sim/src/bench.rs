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
    /// Network messages, total.
    pub messages: u64,
    /// Simulated seconds, total.
    pub sim_seconds: f64,
    /// Wall seconds, total.
    pub wall_seconds: f64,
    /// Simulated seconds per wall second.
    pub speedup: f64,
    /// Seeds per wall second.
    pub seeds_per_second: f64,
}

/// The bare baseline: `nodes` client nodes and one server node on madsim's raw datagram network,
/// each client sending a request and getting a reply at a fixed interval chosen so that the run
/// carries `messages` messages in `sim_seconds` simulated seconds. Returns the messages carried.
pub fn baseline_seed(seed: u64, nodes: usize, sim_seconds: u64, messages: u64) -> u64 {
    let rt = Runtime::with_seed_and_config(seed, madsim::Config::default());
    rt.block_on(async move {
        let h = Handle::current();
        let server_ip = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
        h.create_node()
            .name("server")
            .ip(server_ip)
            .build()
            .spawn(async move {
                let ep = Endpoint::bind("0.0.0.0:7600").await.unwrap();
                let mut buf = [0u8; 64];
                loop {
                    let (n, from) = ep.recv_from(1, &mut buf).await.unwrap();
                    let _ = ep.send_to(from, 2, &buf[..n]).await;
                }
            });
        // Two messages per exchange.
        let exchanges = (messages / 2).max(1);
        let interval =
            Duration::from_secs_f64(sim_seconds as f64 * nodes as f64 / exchanges as f64);
        for i in 0..nodes {
            let ip = IpAddr::V4(Ipv4Addr::new(10, 0, 1, i as u8 + 1));
            h.create_node()
                .name(format!("n{i}"))
                .ip(ip)
                .build()
                .spawn(async move {
                    let ep = Arc::new(Endpoint::bind("0.0.0.0:4000").await.unwrap());
                    let to: SocketAddr = (Ipv4Addr::new(10, 0, 0, 1), 7600).into();
                    let mut buf = [0u8; 64];
                    loop {
                        sleep(interval).await;
                        let _ = ep.send_to(to, 1, b"heartbeat").await;
                        let _ = ep.recv_from(2, &mut buf).await;
                    }
                });
        }
        sleep(Duration::from_secs(sim_seconds)).await;
        madsim::net::NetSim::current().stat().msg_count
    })
}

/// Runs `seeds` seeds of `scenario` and of the baseline (same node count, same simulated
/// length), one at a time on one thread each, and reports both.
pub fn compare(scenario: &Scenario, seeds: u64) -> (Speed, Speed) {
    let wall = Stopwatch::start();
    let mut sim = 0.0;
    let mut messages = 0;
    for seed in 1..=seeds {
        let r = run_seed_isolated(scenario, seed, &RunOptions::default());
        sim += r.sim_seconds;
        messages += r.messages;
    }
    let full_wall = wall.secs();
    let per_seed = (sim / seeds as f64).round().max(1.0) as u64;
    let msgs_per_seed = messages / seeds.max(1);
    // Same node count: the members and clients become the baseline's clients, the registry
    // its server.
    let nodes = scenario.members + scenario.clients;
    let wall = Stopwatch::start();
    let mut base_messages = 0;
    for seed in 1..=seeds {
        base_messages +=
            std::thread::spawn(move || baseline_seed(seed, nodes, per_seed, msgs_per_seed))
                .join()
                .expect("baseline run");
    }
    let base_wall = wall.secs();
    let speed = |what: String, sim: f64, wall: f64, messages: u64| Speed {
        what,
        seeds,
        messages,
        sim_seconds: sim,
        wall_seconds: wall,
        speedup: sim / wall.max(1e-9),
        seeds_per_second: seeds as f64 / wall.max(1e-9),
    };
    (
        speed(
            format!("{} (full stack)", scenario.name),
            sim,
            full_wall,
            messages,
        ),
        speed(
            format!("bare madsim, {} nodes", nodes + 1),
            (per_seed * seeds) as f64,
            base_wall,
            base_messages,
        ),
    )
}
