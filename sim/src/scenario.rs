//! Named scenarios and the run of one seed.
//!
//! A run: start the cluster and wait for it to converge; apply the fault schedule while the
//! safety checker samples every 250 ms; heal everything; then the liveness checker waits (up to
//! a stated bound) for every live node to converge on exactly the live members with correct
//! placement. One seed fixes everything: madsim's scheduling and network, the fault schedule
//! (drawn from the seed before the run, so it can be printed) and, for `swarm`, the fault mix.

use std::time::Duration;

use madsim::runtime::Runtime;
use madsim::time::{Instant, sleep, sleep_until};
use serde::Serialize;

use crate::check::{check_liveness, check_safety, safety_loop};
use crate::cluster::{ProviderKind, SimCluster, SimClusterBuilder};
use crate::faults::{Fault, FaultKind, FaultSchedule, Scheduled, SimRng};
use crate::flaw::Flaw;
use crate::knobs::Knobs;
use crate::load::Load;
use crate::record::{Recorder, Recording};

/// A named scenario.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Name used on the command line.
    pub name: &'static str,
    /// One line on what it exercises.
    pub about: &'static str,
    /// Provider the members run.
    pub provider: ProviderKind,
    /// Member nodes.
    pub members: usize,
    /// Client nodes.
    pub clients: usize,
    /// Length of the fault phase (faults are scheduled inside it; everything heals at its end).
    pub fault_phase: Duration,
    /// Draws the fault schedule for a seed.
    pub generate: fn(&mut SimRng, usize) -> FaultSchedule,
    /// Your code on every node (none for the built-in scenarios).
    pub app: Option<crate::cluster::AppFn>,
    /// Rare paths this scenario claims to reach (names as in the campaign's path counts); a
    /// campaign flags any of them that no seed reached.
    pub covers: &'static [&'static str],
    /// Why the scenario fails today, for a scenario kept out of the default campaign until the
    /// product handles it (`None`: it must pass).
    pub known_failure: Option<&'static str>,
    /// Adjusts the knobs every seed draws (a scenario about a feature a knob turns on in only
    /// some seeds turns it on in all of them).
    pub knobs: Option<fn(&mut Knobs)>,
    /// A campaign of N seeds runs N / this of this scenario (at least one): a scenario of
    /// hundreds of members costs what dozens of small ones do. 1 for the small scenarios.
    pub seeds_divisor: u64,
}

/// The fewest members a scenario runs with (its schedules pick two distinct members).
pub const MIN_MEMBERS: usize = 3;

/// The most members a scenario runs with (addresses, and the harness's own bounds).
pub const MAX_MEMBERS: usize = 20_000;

impl Scenario {
    /// How many of a campaign's `seeds` this scenario runs.
    pub fn seeds_in(&self, seeds: u64) -> u64 {
        if seeds == 0 {
            return 0;
        }
        (seeds / self.seeds_divisor.max(1)).max(1)
    }

    /// The same scenario with `members` members (its schedule generator scales with the count);
    /// an error names the allowed range.
    pub fn with_members(mut self, members: usize) -> Result<Self, String> {
        if !(MIN_MEMBERS..=MAX_MEMBERS).contains(&members) {
            return Err(format!(
                "{members} members: a scenario runs with {MIN_MEMBERS} to {MAX_MEMBERS}"
            ));
        }
        self.members = members;
        Ok(self)
    }

    /// The knobs of `seed` for this scenario.
    pub fn knobs_for(&self, seed: u64) -> Knobs {
        let mut k = Knobs::for_seed(seed);
        if let Some(adjust) = self.knobs {
            adjust(&mut k);
        }
        k
    }
}

fn at(secs: f64, fault: Fault) -> Scheduled {
    Scheduled {
        at: Duration::from_millis((secs * 1000.0) as u64),
        fault,
    }
}

fn steady(_: &mut SimRng, _: usize) -> FaultSchedule {
    FaultSchedule::default()
}

fn member_crash(r: &mut SimRng, n: usize) -> FaultSchedule {
    let a = r.pick(n);
    let b = (a + 1 + r.pick(n - 1)) % n;
    FaultSchedule::new(vec![
        at(
            5.0,
            Fault::Crash {
                member: a,
                restart_after: None,
            },
        ),
        at(
            35.0,
            Fault::Crash {
                member: b,
                restart_after: Some(r.ms(5_000, 15_000)),
            },
        ),
    ])
}

fn partition_heal(r: &mut SimRng, n: usize) -> FaultSchedule {
    let mut faults = Vec::new();
    for start in [5.0, 40.0] {
        let size = 1 + r.pick(2.min(n - 1));
        let mut members: Vec<usize> = Vec::new();
        while members.len() < size {
            let m = r.pick(n);
            if !members.contains(&m) {
                members.push(m);
            }
        }
        members.sort();
        faults.push(at(
            start,
            Fault::Partition {
                members,
                with_registry: r.chance(0.3),
                duration: r.ms(3_000, 20_000),
            },
        ));
    }
    FaultSchedule::new(faults)
}

fn heartbeat_loss(r: &mut SimRng, n: usize) -> FaultSchedule {
    FaultSchedule::new(vec![
        at(
            5.0,
            Fault::HeartbeatLoss {
                member: r.pick(n),
                duration: r.ms(2_000, 12_000),
            },
        ),
        at(
            40.0,
            Fault::HeartbeatLoss {
                member: r.pick(n),
                duration: r.ms(2_000, 12_000),
            },
        ),
    ])
}

fn registry_pause(r: &mut SimRng, n: usize) -> FaultSchedule {
    FaultSchedule::new(vec![
        at(
            10.0,
            Fault::RegistryPause {
                duration: r.ms(8_000, 20_000),
            },
        ),
        at(
            40.0,
            Fault::Crash {
                member: r.pick(n),
                restart_after: None,
            },
        ),
        at(
            50.0,
            Fault::RegistryPause {
                duration: r.ms(500, 3_000),
            },
        ),
    ])
}

fn k8s_apf_saturation(r: &mut SimRng, n: usize) -> FaultSchedule {
    let throttle = |r: &mut SimRng| Fault::Throttle {
        duration: r.ms(3_000, 12_000),
        retry_after_s: r.range(2, 5),
    };
    FaultSchedule::new(vec![
        at(5.0, throttle(r)),
        at(
            30.0,
            Fault::Crash {
                member: r.pick(n),
                restart_after: Some(r.ms(1_000, 5_000)),
            },
        ),
        at(45.0, throttle(r)),
    ])
}

fn registry_restart(r: &mut SimRng, _: usize) -> FaultSchedule {
    FaultSchedule::new(vec![
        at(
            10.0,
            Fault::RegistryRestart {
                down_for: r.ms(500, 6_000),
            },
        ),
        at(
            45.0,
            Fault::RegistryRestart {
                down_for: r.ms(500, 6_000),
            },
        ),
    ])
}

fn rolling_restart(r: &mut SimRng, _: usize) -> FaultSchedule {
    FaultSchedule::new(vec![at(
        5.0,
        Fault::RollingRestart {
            gap: r.ms(3_000, 10_000),
        },
    )])
}

/// A cluster migrating between settings: every Pod replaced in turn, slowly (each replacement
/// starts with the new setting), one member crashing during it and restarting, another
/// crashing for good (unless the rolling update reaches it later and replaces it).
fn migration(r: &mut SimRng, n: usize) -> FaultSchedule {
    let a = r.pick(n);
    let b = (a + 1 + r.pick(n - 1)) % n;
    FaultSchedule::new(vec![
        at(
            5.0,
            // Slow enough that both settings share the cluster for longer than a record's
            // duration (10 Lease durations: 60 s here).
            Fault::RollingRestart {
                gap: r.ms(12_000, 20_000),
            },
        ),
        at(
            r.range(8, 45) as f64,
            Fault::Crash {
                member: a,
                restart_after: None,
            },
        ),
        at(
            r.range(8, 45) as f64,
            Fault::Crash {
                member: b,
                restart_after: Some(r.ms(5_000, 15_000)),
            },
        ),
    ])
}

fn flapping(r: &mut SimRng, n: usize) -> FaultSchedule {
    FaultSchedule::new(vec![at(
        5.0,
        Fault::Flap {
            member: r.pick(n),
            times: r.range(3, 8) as u32,
            period: r.ms(1_000, 6_000),
        },
    )])
}

fn clock_skew(r: &mut SimRng, n: usize) -> FaultSchedule {
    // Every member's clock offset and drifting (up to 25%), and the registry's too; then a
    // crash.
    skewed_then_crash(r, n, 250_000, true)
}

/// Every member's clock offset by up to 2 min and drifting by up to `max_drift_ppm` (and the
/// registry's clock too, if `registry`); a crash at 30 s.
fn skewed_then_crash(
    r: &mut SimRng,
    n: usize,
    max_drift_ppm: u64,
    registry: bool,
) -> FaultSchedule {
    let mut faults: Vec<Scheduled> = (0..n)
        .map(|m| {
            at(
                1.0 + m as f64,
                Fault::ClockSkew {
                    member: m,
                    offset_ms: r.range(0, 240_000) as i64 - 120_000,
                    drift_ppm: r.range(0, 2 * max_drift_ppm) as i64 - max_drift_ppm as i64,
                },
            )
        })
        .collect();
    if registry {
        faults.push(at(1.5, FaultKind::RegistryClock.draw(r, n)));
    }
    faults.push(at(
        30.0,
        Fault::Crash {
            member: r.pick(n),
            restart_after: Some(Duration::from_secs(10)),
        },
    ));
    FaultSchedule::new(faults)
}

fn swarm(r: &mut SimRng, n: usize) -> FaultSchedule {
    // Swarm testing: the seed chooses which fault kinds are on and how many faults there are.
    let mut enabled: Vec<FaultKind> = FaultKind::ALL
        .iter()
        .copied()
        .filter(|_| r.chance(0.5))
        .collect();
    if enabled.is_empty() {
        enabled.push(FaultKind::ALL[r.pick(FaultKind::ALL.len())]);
    }
    let count = r.range(2, 10);
    let mut faults = Vec::new();
    for _ in 0..count {
        let start = r.range(0, 80_000) as f64 / 1000.0;
        let kind = enabled[r.pick(enabled.len())];
        faults.push(at(start, kind.draw(r, n)));
    }
    FaultSchedule::new(faults)
}

fn graceful_leave(r: &mut SimRng, n: usize) -> FaultSchedule {
    let a = r.pick(n);
    let b = (a + 1 + r.pick(n - 1)) % n;
    FaultSchedule::new(vec![
        at(
            5.0,
            Fault::Leave {
                member: a,
                rejoin_after: Some(r.ms(2_000, 10_000)),
            },
        ),
        at(
            30.0,
            Fault::Leave {
                member: b,
                rejoin_after: None,
            },
        ),
        at(
            50.0,
            Fault::Leave {
                member: a,
                rejoin_after: Some(r.ms(500, 3_000)),
            },
        ),
    ])
}

fn network(r: &mut SimRng, n: usize) -> FaultSchedule {
    let mut faults = vec![
        at(5.0, FaultKind::ReplyLost.draw(r, n)),
        at(25.0, FaultKind::Swizzle.draw(r, n)),
        at(50.0, FaultKind::OneWay.draw(r, n)),
        at(40.0, FaultKind::StreamReset.draw(r, n)),
    ];
    faults.push(at(r.range(10, 60) as f64, FaultKind::Crash.draw(r, n)));
    FaultSchedule::new(faults)
}

fn registry_clock_step(r: &mut SimRng, n: usize) -> FaultSchedule {
    FaultSchedule::new(vec![
        at(
            10.0,
            Fault::RegistryClockStep {
                back_ms: r.range(60_000, 900_000),
                down_for: r.ms(500, 3_000),
            },
        ),
        at(
            30.0,
            Fault::Crash {
                member: r.pick(n),
                restart_after: None,
            },
        ),
    ])
}

fn describe(r: &mut SimRng, n: usize) -> FaultSchedule {
    let generation = |r: &mut SimRng| r.range(1, 1_000) as u32;
    let pick_other = |r: &mut SimRng, a: usize| (a + 1 + r.pick(n - 1)) % n;
    // Every member takes a new description, one a second.
    let mut faults: Vec<Scheduled> = (0..n)
        .map(|m| {
            at(
                3.0 + m as f64,
                Fault::Describe {
                    member: m,
                    generation: generation(r),
                },
            )
        })
        .collect();
    // One changes while cut off (it expires, and returns as a new incarnation described so).
    let a = r.pick(n);
    faults.push(at(
        15.0,
        Fault::Partition {
            members: vec![a],
            with_registry: false,
            duration: r.ms(3_000, 15_000),
        },
    ));
    faults.push(at(
        16.0,
        Fault::Describe {
            member: a,
            generation: generation(r),
        },
    ));
    // One changes while the registry is down (it learns the change from the re-join).
    let b = pick_other(r, a);
    faults.push(at(
        35.0,
        Fault::RegistryRestart {
            down_for: r.ms(500, 4_000),
        },
    ));
    faults.push(at(
        35.5,
        Fault::Describe {
            member: b,
            generation: generation(r),
        },
    ));
    // One drains the kind every identity lives on, then changes twice in a row.
    let c = r.pick(n);
    faults.push(at(
        50.0,
        Fault::Describe {
            member: c,
            generation: 4 * r.range(0, 250) as u32 + 3,
        },
    ));
    let d = pick_other(r, c);
    for k in 0..2 {
        faults.push(at(
            55.0 + 0.1 * k as f64,
            Fault::Describe {
                member: d,
                generation: generation(r),
            },
        ));
    }
    // A described member crashes: its next incarnation starts from its base description.
    faults.push(at(
        60.0,
        Fault::Crash {
            member: r.pick(n),
            restart_after: Some(r.ms(1_000, 5_000)),
        },
    ));
    FaultSchedule::new(faults)
}

fn memory_crash(r: &mut SimRng, n: usize) -> FaultSchedule {
    FaultSchedule::new(
        (0..3)
            .map(|k| {
                at(
                    5.0 + 10.0 * k as f64,
                    Fault::Crash {
                        member: r.pick(n),
                        restart_after: Some(r.ms(1_000, 5_000)),
                    },
                )
            })
            .collect(),
    )
}

/// Every scenario of the default campaign, in `list` order.
pub fn all() -> Vec<Scenario> {
    let reg = |name, about, fault_phase: u64, generate, covers| Scenario {
        name,
        about,
        provider: ProviderKind::Registry,
        members: 5,
        clients: 1,
        fault_phase: Duration::from_secs(fault_phase),
        generate,
        app: None,
        covers,
        known_failure: None,
        knobs: None,
        seeds_divisor: 1,
    };
    vec![
        reg(
            "steady",
            "no faults: 5 members and a client on the registry converge and stay put",
            60,
            steady,
            &[
                "workload: owner lookups",
                "workload: rebalance reports checked",
            ],
        ),
        reg(
            "member-crash",
            "TTL failover: one member crashes for good, another crashes and restarts",
            75,
            member_crash,
            &[
                "registry: expiries",
                "workload: reports with moves",
                "activation: state handed over",
            ],
        ),
        reg(
            "partition-heal",
            "one or two members (sometimes with the registry) partitioned, then healed, twice",
            75,
            partition_heal,
            &[
                "provider: heartbeat failures",
                "provider: re-joins",
                "activation: deactivated (membership lost)",
            ],
        ),
        reg(
            "heartbeat-loss",
            "a member's heartbeats are dropped while its other traffic flows, twice",
            75,
            heartbeat_loss,
            &["provider: heartbeat failures", "registry: expiries"],
        ),
        reg(
            "registry-restart",
            "the registry restarts twice and loses its state",
            75,
            registry_restart,
            &[
                "provider: re-joins",
                "provider: snapshots applied",
                "registry: watch resumed from a version",
                "provider: snapshot fragments received",
                "provider: compressed snapshots received",
            ],
        ),
        reg(
            "rolling-restart",
            "every member restarts in turn as a new incarnation",
            80,
            rolling_restart,
            &[
                "workload: reports with moves",
                "registry: superseded",
                "registry: changes coalesced",
            ],
        ),
        reg(
            "flapping",
            "one member is cut off and healed repeatedly",
            80,
            flapping,
            &["provider: heartbeat failures"],
        ),
        reg(
            "clock-skew",
            "two members' clocks are offset by up to 2 min and drift by up to 25%, then a crash",
            70,
            clock_skew,
            &["fault: registry-clock", "registry: expiries"],
        ),
        reg(
            "graceful-leave",
            "members shut down gracefully (Leave), one for good; leaves may be delivered twice",
            70,
            graceful_leave,
            &[
                "registry: leaves",
                "fault: leave",
                "registry: first leave lost on the way",
                "activation: deactivated (shutdown)",
            ],
        ),
        reg(
            "network",
            "lost replies (heartbeat accepted, answer dropped), swizzle-clogging, watch streams reset, a one-way cut, a crash",
            75,
            network,
            &[
                "fault: swizzle",
                "fault: reply-lost",
                "fault: stream-reset",
                "provider: watch failed, reopened",
                "provider: watch resumed by progress",
                "provider: heartbeat failures",
            ],
        ),
        reg(
            "swarm",
            "random fault mixes: the seed picks the fault kinds and their schedule",
            90,
            swarm,
            &[
                "events: missed by lagging subscribers",
                "placement: owner cache evictions",
            ],
        ),
        reg(
            "registry-pause",
            "the registry freezes for 1.3-3.3 TTLs (a VM pause) and resumes; later a member crashes and the registry freezes briefly",
            65,
            registry_pause,
            &["registry: stalls", "provider: membership lost"],
        ),
        reg(
            "registry-clock-step",
            "the registry restarts with its clock 1-15 min behind (a new epoch, lower versions), then a member crashes",
            60,
            registry_clock_step,
            &["provider: epoch changes"],
        ),
        reg(
            "describe",
            "members change kinds, zone and labels in place: while cut off, while the registry restarts, draining the kind, twice in a row",
            75,
            describe,
            &[
                "fault: describe",
                "provider: description updates",
                "workload: reports with moves",
            ],
        ),
        Scenario {
            name: "memory-crash",
            about: "in-memory provider: members crash and restart",
            provider: ProviderKind::InMemory,
            members: 5,
            clients: 1,
            fault_phase: Duration::from_secs(40),
            generate: memory_crash,
            app: None,
            covers: &["workload: reports with moves"],
            known_failure: None,
            knobs: None,
            seeds_divisor: 1,
        },
        k8s(
            "k8s-member-crash",
            "Kubernetes: one member crashes for good (its Lease expires and a peer deletes it), another crashes and restarts",
            75,
            member_crash,
            &[
                "kubernetes: expired leases deleted",
                "workload: reports with moves",
                "endpoints: not ready",
            ],
        ),
        k8s(
            "k8s-lease-expiry",
            "Kubernetes: one or two members cut off from the API server past their Lease, then healed (lost, deleted, back as a new incarnation; watches relist after 410)",
            75,
            partition_heal,
            &[
                "kubernetes: membership lost",
                "kubernetes: membership restored",
                "kubernetes: relists after 410",
            ],
        ),
        k8s(
            "k8s-renewal-loss",
            "Kubernetes: a member's Lease renewals are lost while its watches flow, twice",
            75,
            heartbeat_loss,
            &["kubernetes: renew failures"],
        ),
        k8s(
            "k8s-apiserver-down",
            "Kubernetes: the API server freezes for 1.3-3.3 Lease durations (nobody can renew: nobody may be evicted), one member stays cut off 1-3 s longer; later a member crashes and it freezes briefly",
            75,
            k8s_apiserver_down,
            &[
                "kubernetes: membership lost",
                "kubernetes: membership restored",
            ],
        ),
        k8s(
            "k8s-apiserver-restart",
            "Kubernetes: the API server restarts twice (its store kept, every watch ends)",
            75,
            registry_restart,
            &["kubernetes: watches reopened"],
        ),
        k8s(
            "k8s-apf-saturation",
            "Kubernetes: twice, every watch ends and API Priority and Fairness sheds every list and watch with 429 and Retry-After 2-4 s for 3-12 s (writes flow); a member crashes and restarts in between",
            75,
            k8s_apf_saturation,
            &["kubernetes: requests shed (429)"],
        ),
        k8s(
            "k8s-rolling-update",
            "Kubernetes: every Pod replaced in turn by a new incarnation (kubectl rollout restart)",
            75,
            rolling_restart,
            &["kubernetes: expired leases deleted"],
        ),
        k8s(
            "k8s-graceful-leave",
            "Kubernetes: members shut down gracefully (their Leases deleted), one for good",
            75,
            graceful_leave,
            &["fault: leave", "endpoints: terminating"],
        ),
        k8s(
            "k8s-clock-skew",
            "Kubernetes: every node's clock offset by up to 2 min and drifting within the 2% bound, then a crash",
            75,
            k8s_clock_skew,
            &[],
        ),
        k8s(
            "k8s-network",
            "Kubernetes: lost replies, swizzle-clogging, watch streams reset, a one-way cut, a crash",
            75,
            network,
            &["kubernetes: watches reopened", "kubernetes: renew failures"],
        ),
        k8s_everyone(
            "k8s-everyone-member-crash",
            "Kubernetes, every member watching every Lease: one member crashes for good (its Lease expires and a peer deletes it), another crashes and restarts",
            member_crash,
            &[
                "kubernetes: expired leases deleted",
                "workload: reports with moves",
            ],
        ),
        k8s_everyone(
            "k8s-everyone-lease-expiry",
            "Kubernetes, every member watching every Lease: one or two members cut off from the API server past their Lease, then healed",
            partition_heal,
            &[
                "kubernetes: membership lost",
                "kubernetes: membership restored",
                "kubernetes: relists after 410",
            ],
        ),
        k8s_everyone(
            "k8s-everyone-renewal-loss",
            "Kubernetes, every member watching every Lease: a member's Lease renewals are lost while its watches flow, twice",
            heartbeat_loss,
            &["kubernetes: renew failures"],
        ),
        k8s_everyone(
            "k8s-everyone-apiserver-down",
            "Kubernetes, every member watching every Lease: the API server freezes for 1.3-3.3 Lease durations (nobody may be evicted), one member stays cut off longer; later a crash and a brief freeze",
            k8s_apiserver_down,
            &[
                "kubernetes: membership lost",
                "kubernetes: membership restored",
            ],
        ),
        k8s_everyone(
            "k8s-everyone-rolling-update",
            "Kubernetes, every member watching every Lease: every Pod replaced in turn by a new incarnation",
            rolling_restart,
            &["kubernetes: expired leases deleted"],
        ),
        k8s_everyone(
            "k8s-everyone-clock-skew",
            "Kubernetes, every member watching every Lease: every node's clock offset by up to 2 min and drifting within the 2% bound, then a crash",
            k8s_clock_skew,
            &[],
        ),
        k8s_everyone(
            "k8s-everyone-network",
            "Kubernetes, every member watching every Lease: lost replies, swizzle-clogging, watch streams reset, a one-way cut, a crash",
            network,
            &["kubernetes: watches reopened", "kubernetes: renew failures"],
        ),
        Scenario {
            knobs: Some(|k| {
                k.request_timeout = Some(Duration::from_millis(2_500));
                k.k8s_everyone = true;
            }),
            ..k8s(
                "k8s-everyone-timing",
                "Kubernetes, every member watching every Lease: the schedule of k8s-timing (late answers, lost answers, cut off from the API server but not from peers, lagging watches)",
                75,
                lease_timing,
                &[
                    "kubernetes: membership lost",
                    "kubernetes: membership restored",
                    "kubernetes: expired leases deleted",
                ],
            )
        },
        k8s_sharded(
            "k8s-sharded-member-crash",
            "Kubernetes, sharded heartbeats (8 shards, 2 monitors each): one member crashes for good (a monitor of its shard deletes its heartbeat, then its record), another crashes and restarts",
            member_crash,
            &[
                "kubernetes: expired leases deleted",
                "kubernetes: monitored shards changed",
                "workload: reports with moves",
            ],
        ),
        k8s_sharded(
            "k8s-sharded-lease-expiry",
            "Kubernetes, sharded heartbeats: one or two members cut off from the API server past their Lease, then healed (removed by a monitor, back as a new incarnation)",
            partition_heal,
            &[
                "kubernetes: membership lost",
                "kubernetes: membership restored",
                "kubernetes: expired leases deleted",
            ],
        ),
        k8s_sharded(
            "k8s-sharded-renewal-loss",
            "Kubernetes, sharded heartbeats: a member's heartbeat renewals are lost while its watches flow, twice",
            heartbeat_loss,
            &["kubernetes: renew failures"],
        ),
        k8s_sharded(
            "k8s-sharded-rolling-update",
            "Kubernetes, sharded heartbeats: every Pod replaced in turn by a new incarnation (monitors move as members come and go)",
            rolling_restart,
            &[
                "kubernetes: expired leases deleted",
                "kubernetes: monitored shards changed",
            ],
        ),
        k8s_migration(
            "k8s-migrate-to-sharded",
            "Kubernetes, a cluster migrating from every member watching every Lease to sharded heartbeats (8 shards, 2 monitors): every Pod replaced in turn by one with the new setting, a member crashing meanwhile and restarting, another crashing for good",
            |k| {
                k.k8s_heartbeats = Some((8, 2));
                k.k8s_migrate = Some(crate::knobs::Migration::ToSharded);
            },
            &[
                "kubernetes: records touched",
                "kubernetes: expired leases deleted",
                "kubernetes: monitored shards changed",
            ],
        ),
        k8s_migration(
            "k8s-migrate-to-everyone",
            "Kubernetes, a cluster rolled back from sharded heartbeats (8 shards, 2 monitors) to every member watching every Lease: every Pod replaced in turn by one with the old setting, a member crashing meanwhile and restarting, another crashing for good",
            |k| {
                k.k8s_heartbeats = Some((8, 2));
                k.k8s_migrate = Some(crate::knobs::Migration::ToEveryone);
            },
            &[
                "kubernetes: records touched",
                "kubernetes: expired leases deleted",
            ],
        ),
        k8s_sharded(
            "k8s-sharded-network",
            "Kubernetes, sharded heartbeats: lost replies, swizzle-clogging, watch streams reset, a one-way cut, a crash",
            network,
            &["kubernetes: watches reopened", "kubernetes: renew failures"],
        ),
        Scenario {
            members: 6,
            knobs: Some(|k| {
                k.k8s_service = true;
                k.k8s_zones = true;
                k.k8s_heartbeats = Some((6, 2));
            }),
            ..k8s(
                "k8s-sharded-zone-outage",
                "Kubernetes, sharded heartbeats (6 shards, 2 monitors), 6 members in 3 zones: one zone cut off past its Leases (a shard's two monitors are in two zones, so one of them can reach the API server), later another zone loses power and comes back",
                75,
                k8s_zone_outage,
                &[
                    "kubernetes: expired leases deleted",
                    "kubernetes: membership lost",
                ],
            )
        },
        etcd(
            "etcd-member-crash",
            "etcd: one member crashes for good (etcd expires its lease), another crashes and restarts (it deletes its ghost's key)",
            member_crash,
            &["workload: reports with moves"],
        ),
        etcd(
            "etcd-partition",
            "etcd: one or two members cut off from etcd past their lease, twice (lost, expired, back as new incarnations; watchers behind a compaction list again)",
            partition_heal,
            &[
                "etcd: membership lost",
                "etcd: membership restored",
                "etcd: relists",
            ],
        ),
        etcd(
            "etcd-keepalive-loss",
            "etcd: a member's keep-alives are lost at etcd while its watch flows, twice",
            heartbeat_loss,
            &["etcd: keep-alive failures"],
        ),
        etcd(
            "etcd-down",
            "etcd is down for 1.3-3.3 lease TTLs (nobody can be expired: nobody is; members say they cannot vouch for their lease, then restore it under the same id); later a member crashes",
            etcd_down,
            &["etcd: membership lost", "etcd: membership restored"],
        ),
        etcd(
            "etcd-restart",
            "etcd restarts twice with its data (every watch ends; every lease's TTL starts over)",
            registry_restart,
            &["etcd: watches reopened"],
        ),
        etcd(
            "etcd-data-loss",
            "etcd restarts having lost its data (a new cluster: no keys, revisions from 1): every member registers again as a new incarnation under a new epoch; later a crash and restart",
            etcd_data_loss,
            &["etcd: rejoins", "etcd: relists"],
        ),
        etcd(
            "etcd-restore",
            "etcd is restored from a snapshot with the same cluster id (its revision goes back, later writes reuse revisions members saw): members that changed since the snapshot are back as they were then (an old description, a crashed member's and a leaver's old incarnations as phantoms until their leases end), members that joined since are gone and register again; later a crash and restart",
            etcd_restore,
            &["etcd: relists", "etcd: rejoins", "backend: snapshots saved"],
        ),
        Scenario {
            knobs: Some(|k| k.etcd_members = 3),
            ..etcd(
                "etcd-member-freeze",
                "a three-member etcd: a follower frozen (SIGSTOP) for 8-25 s while a member crashes for good, then the leader frozen for 5-12 s (an election; every lease's TTL starts over) while a member leaves and re-joins, then one etcd member crashes and restarts: members pinned to the lost etcd member move to another; no live member is dropped",
                etcd_member_freeze,
                &["etcd: endpoint failovers"],
            )
        },
        Scenario {
            knobs: Some(|k| {
                k.etcd_members = 3;
                k.etcd_token_ttl = Some(Duration::from_secs(8));
            }),
            ..etcd(
                "etcd-auth-expiry",
                "etcd with authentication on, tokens living 8 s, three etcd members: every member's token expires several times; etcd restarts (every token forgotten), an etcd member crashes (its tokens forgotten), the auth store changes (every token old); meanwhile a member crashes and one leaves and re-joins: every refused call authenticates again and is retried, nobody's view freezes",
                etcd_auth_expiry,
                &["etcd: reauthentications", "backend: auth store changes"],
            )
        },
        etcd(
            "etcd-rolling-restart",
            "etcd: every member restarts in place in turn (the new incarnation deletes its ghost's key)",
            rolling_restart,
            &[],
        ),
        etcd(
            "etcd-clock-skew",
            "etcd: every node's clock offset by up to 2 min and drifting within the 2% bound, then a crash",
            k8s_clock_skew,
            &[],
        ),
        etcd(
            "etcd-network",
            "etcd: lost replies, swizzle-clogging, watch streams reset, a one-way cut, a crash",
            network,
            &["etcd: watches reopened", "etcd: keep-alive failures"],
        ),
        Scenario {
            knobs: Some(|k| k.request_timeout = Some(Duration::from_millis(2_500))),
            ..k8s(
                "k8s-timing",
                "Kubernetes: a member's answers leave late (up to 2.3 s, past the 0.6 s lease margin), then are lost while its renewals still land; later they leave late again, then it is cut off from the API server (not from its peers) past its Lease; another member's watches lag while its renewals are lost past its Lease (a peer deletes it, it registers again behind its own view); a third is cut off from the API server but not from its peers",
                75,
                lease_timing,
                &[
                    "door: answers sent late",
                    "door: watch responses sent late",
                    "kubernetes: membership lost",
                    "kubernetes: membership restored",
                    "kubernetes: expired leases deleted",
                ],
            )
        },
        Scenario {
            // Answers may come up to 2.5 s late (the lease margin is 0.6 s): a keep-alive
            // dated when its answer came would outlive the lease.
            knobs: Some(|k| k.request_timeout = Some(Duration::from_millis(2_500))),
            ..etcd(
                "etcd-timing",
                "etcd: a member's answers leave late (up to 2.3 s, past the 0.6 s lease margin), then are lost while its keep-alives still renew; later they leave late again, then it is cut off from etcd (not from its peers) past its lease; another member's watch lags while its keep-alives are lost past its lease (it registers again behind its own view); a third is cut off from etcd but not from its peers",
                lease_timing,
                &[
                    "door: answers sent late",
                    "door: watch responses sent late",
                    "etcd: membership lost",
                    "etcd: membership restored",
                    "etcd: rejoins",
                ],
            )
        },
        Scenario {
            members: 6,
            knobs: Some(|k| {
                k.k8s_service = true;
                k.k8s_zones = true;
            }),
            ..k8s(
                "k8s-zone-outage",
                "Kubernetes, 6 members in 3 zones, zone-affine placement: one zone cut off from the API server and the other zones past its Leases, later another zone loses power (every Pod crashes) and comes back",
                75,
                k8s_zone_outage,
                &[
                    "kubernetes: expired leases deleted",
                    "endpoints: not ready",
                    "kubernetes: membership lost",
                ],
            )
        },
        scale(
            "scale-crash-storm",
            "registry, 200 members: 10% crash at once, half of them restart 10-20 s later (every survivor applies the expiries; the load budget holds)",
            ProviderKind::Registry,
            200,
            crash_storm,
            &["registry: expiries", "workload: reports with moves"],
        ),
        scale(
            "scale-mass-restart",
            "registry, 200 members: every member restarts within 5 s (a whole deployment replaced), each a new incarnation",
            ProviderKind::Registry,
            200,
            mass_restart,
            &["registry: superseded", "registry: changes coalesced"],
        ),
        scale(
            "scale-registry-restart",
            "registry, 200 members: the registry restarts twice, losing its state: every member re-joins and every watcher takes a snapshot at once",
            ProviderKind::Registry,
            200,
            registry_restart,
            &["provider: re-joins", "provider: snapshots applied"],
        ),
        scale(
            "scale-zone-outage",
            "registry, 150 members in 3 zones: one zone is cut off from everyone for 1.5-4 TTLs (its members expire, announce the loss, re-join), then heals",
            ProviderKind::Registry,
            150,
            zone_outage,
            &["registry: expiries", "provider: membership lost"],
        ),
        scale(
            "scale-etcd-restart",
            "etcd, 200 members: etcd restarts twice with its data (every watch ends, every member relists at once)",
            ProviderKind::Etcd,
            200,
            registry_restart,
            &["etcd: watches reopened"],
        ),
        scale(
            "scale-etcd-crash-storm",
            "etcd, 200 members: 10% crash at once, half of them restart 10-20 s later",
            ProviderKind::Etcd,
            200,
            crash_storm,
            &["workload: reports with moves"],
        ),
        Scenario {
            knobs: Some(|k| k.k8s_heartbeats = Some((32, 3))),
            ..scale(
                "scale-k8s-sharded-crash-storm",
                "Kubernetes, sharded heartbeats (32 shards, 3 monitors), 200 members: 10% crash at once, half of them restart 10-20 s later (their shards' monitors remove them; monitors that crashed are replaced)",
                ProviderKind::Kubernetes,
                200,
                crash_storm,
                &["kubernetes: expired leases deleted"],
            )
        },
        scale(
            "scale-k8s-apiserver-restart",
            "Kubernetes, 100 members: the API server restarts twice (its store kept, every watch ends, every member resumes or relists at once)",
            ProviderKind::Kubernetes,
            100,
            registry_restart,
            &["kubernetes: watches reopened"],
        ),
    ]
}

/// A scenario of hundreds of members: one seed in 50 of the campaign's (the default campaign
/// runs 4 of each), 1 client.
fn scale(
    name: &'static str,
    about: &'static str,
    provider: ProviderKind,
    members: usize,
    generate: fn(&mut SimRng, usize) -> FaultSchedule,
    covers: &'static [&'static str],
) -> Scenario {
    Scenario {
        name,
        about,
        provider,
        members,
        clients: 1,
        fault_phase: Duration::from_secs(75),
        generate,
        app: None,
        covers,
        known_failure: None,
        knobs: None,
        seeds_divisor: 100,
    }
}

/// `k` distinct members drawn from `n`, in order.
fn distinct(r: &mut SimRng, n: usize, k: usize) -> Vec<usize> {
    let mut picked = std::collections::BTreeSet::new();
    while picked.len() < k.min(n) {
        picked.insert(r.pick(n));
    }
    picked.into_iter().collect()
}

/// 10% of the members (at least one) crash at 10 s; each restarts 10-20 s later with
/// probability one half.
fn crash_storm(r: &mut SimRng, n: usize) -> FaultSchedule {
    let hit = distinct(r, n, n.div_ceil(10));
    FaultSchedule::new(
        hit.into_iter()
            .map(|m| {
                at(
                    10.0,
                    Fault::Crash {
                        member: m,
                        restart_after: r.chance(0.5).then(|| r.ms(10_000, 20_000)),
                    },
                )
            })
            .collect(),
    )
}

/// Every member crashes within 5 s of 10 s and restarts 1-3 s later.
fn mass_restart(r: &mut SimRng, n: usize) -> FaultSchedule {
    FaultSchedule::new(
        (0..n)
            .map(|m| {
                at(
                    10.0 + r.range(0, 5_000) as f64 / 1000.0,
                    Fault::Crash {
                        member: m,
                        restart_after: Some(r.ms(1_000, 3_000)),
                    },
                )
            })
            .collect(),
    )
}

/// The members of one of three zones (`m % 3`) are cut off from everyone for 9-24 s (1.5-4
/// TTLs) at 10 s.
fn zone_outage(r: &mut SimRng, n: usize) -> FaultSchedule {
    let zone = r.pick(3);
    FaultSchedule::new(vec![at(
        10.0,
        Fault::Partition {
            members: (0..n).filter(|m| m % 3 == zone).collect(),
            with_registry: false,
            duration: r.ms(9_000, 24_000),
        },
    )])
}

/// A Kubernetes scenario: 5 members and a client against the simulated API server.
fn k8s(
    name: &'static str,
    about: &'static str,
    fault_phase: u64,
    generate: fn(&mut SimRng, usize) -> FaultSchedule,
    covers: &'static [&'static str],
) -> Scenario {
    Scenario {
        name,
        about,
        provider: ProviderKind::Kubernetes,
        members: 5,
        clients: 1,
        fault_phase: Duration::from_secs(fault_phase),
        generate,
        app: None,
        covers,
        known_failure: None,
        knobs: None,
        seeds_divisor: 1,
    }
}

/// A Kubernetes cluster migrating between heartbeat settings (`settings` says which way, and
/// the sharded one): the `migration` schedule.
fn k8s_migration(
    name: &'static str,
    about: &'static str,
    settings: fn(&mut Knobs),
    covers: &'static [&'static str],
) -> Scenario {
    Scenario {
        knobs: Some(settings),
        ..k8s(name, about, 75, migration, covers)
    }
}

/// A Kubernetes scenario where every member watches every member's Lease (`Heartbeats::
/// Everyone`: the setting before sharded heartbeats became the default, still supported).
fn k8s_everyone(
    name: &'static str,
    about: &'static str,
    generate: fn(&mut SimRng, usize) -> FaultSchedule,
    covers: &'static [&'static str],
) -> Scenario {
    Scenario {
        knobs: Some(|k| k.k8s_everyone = true),
        ..k8s(name, about, 75, generate, covers)
    }
}

/// A Kubernetes scenario with sharded heartbeats (8 shards, 2 monitors each: with 5 members
/// every member monitors some shards, some none of a given member's).
fn k8s_sharded(
    name: &'static str,
    about: &'static str,
    generate: fn(&mut SimRng, usize) -> FaultSchedule,
    covers: &'static [&'static str],
) -> Scenario {
    Scenario {
        knobs: Some(|k| k.k8s_heartbeats = Some((8, 2))),
        ..k8s(name, about, 75, generate, covers)
    }
}

/// An etcd scenario: 5 members and a client against the simulated etcd.
fn etcd(
    name: &'static str,
    about: &'static str,
    generate: fn(&mut SimRng, usize) -> FaultSchedule,
    covers: &'static [&'static str],
) -> Scenario {
    Scenario {
        provider: ProviderKind::Etcd,
        ..k8s(name, about, 75, generate, covers)
    }
}

/// The timing paths of a lease: answers that leave late and then not at all (a renewal must be
/// dated when it was sent, not when its answer came), a member that registers again while its
/// watch lags behind its own write, and a member cut off from the backend while its peers
/// still reach it.
fn lease_timing(r: &mut SimRng, n: usize) -> FaultSchedule {
    let [slow, lagging, cut] = three_members(r, n);
    FaultSchedule::new(vec![
        at(
            4.0,
            Fault::SlowAnswers {
                member: slow,
                delay: r.ms(300, 2_300),
                duration: r.ms(6_000, 9_000),
            },
        ),
        // Answers lost, requests applied: etcd keeps the lease, the member cannot vouch for it.
        at(
            14.0,
            Fault::ReplyLost {
                member: slow,
                duration: r.ms(6_500, 9_000),
            },
        ),
        // The last keep-alive etcd applies is answered late (one is sent in any 5 s); then
        // the member is cut off from etcd (not from its peers) past its lease, so it cannot
        // see its key go: its own reckoning must end its membership first.
        at(
            25.0,
            Fault::SlowAnswers {
                member: slow,
                delay: r.ms(1_200, 2_300),
                duration: Duration::from_millis(6_000),
            },
        ),
        at(
            30.0,
            Fault::BackendCut {
                member: slow,
                duration: r.ms(6_500, 10_000),
            },
        ),
        at(
            44.0,
            Fault::LaggingWatch {
                member: lagging,
                delay: r.ms(500, 4_000),
                duration: r.ms(22_000, 28_000),
            },
        ),
        at(
            45.0,
            Fault::HeartbeatLoss {
                member: lagging,
                duration: r.ms(6_500, 10_000),
            },
        ),
        at(
            64.0,
            Fault::BackendCut {
                member: cut,
                duration: r.ms(3_000, 9_000),
            },
        ),
    ])
}

/// etcd restarts having lost its data; later a member crashes and restarts.
fn etcd_data_loss(r: &mut SimRng, n: usize) -> FaultSchedule {
    FaultSchedule::new(vec![
        at(
            10.0,
            Fault::BackendDataLoss {
                down_for: r.ms(500, 4_000),
            },
        ),
        at(
            40.0,
            Fault::Crash {
                member: r.pick(n),
                restart_after: Some(r.ms(2_000, 8_000)),
            },
        ),
    ])
}

/// etcd saves a snapshot, the membership changes (a new description, a crash and restart as a
/// new incarnation, a graceful leave and re-join, a crash for good), etcd is restored from the
/// snapshot with the same cluster id; later a crash and restart.
fn etcd_restore(r: &mut SimRng, n: usize) -> FaultSchedule {
    // Four different members (with at least four).
    let first = r.pick(n);
    let (described, restarted, left, crashed) =
        (first, (first + 1) % n, (first + 2) % n, (first + 3) % n);
    let later = r.pick(n);
    FaultSchedule::new(vec![
        at(6.0, Fault::BackendSnapshot),
        at(
            8.0,
            Fault::Describe {
                member: described,
                generation: r.range(1, 1_000) as u32,
            },
        ),
        at(
            10.0,
            Fault::Crash {
                member: restarted,
                restart_after: Some(r.ms(1_000, 4_000)),
            },
        ),
        at(
            13.0,
            Fault::Leave {
                member: left,
                rejoin_after: Some(r.ms(1_000, 3_000)),
            },
        ),
        at(
            r.range(14_000, 24_000) as f64 / 1_000.0,
            Fault::Crash {
                member: crashed,
                restart_after: None,
            },
        ),
        at(
            26.0,
            Fault::BackendRestore {
                down_for: r.ms(300, 4_000),
            },
        ),
        at(
            50.0,
            Fault::Crash {
                member: later,
                restart_after: Some(r.ms(2_000, 8_000)),
            },
        ),
    ])
}

/// Three different members (the fewest a scenario runs is three), the first drawn, the second
/// drawn among the others, the third the next one after the second that is neither.
fn three_members(r: &mut SimRng, n: usize) -> [usize; 3] {
    let first = r.pick(n);
    let second = (first + 1 + r.pick(n - 1)) % n;
    let third = (0..n)
        .map(|k| (second + 1 + k) % n)
        .find(|&m| m != first && m != second)
        .unwrap_or(second);
    [first, second, third]
}

/// A three-member etcd: a follower freezes while a member crashes for good, the leader freezes
/// (an election) while a member leaves and re-joins, then an etcd member crashes and restarts
/// while another member crashes and restarts.
fn etcd_member_freeze(r: &mut SimRng, n: usize) -> FaultSchedule {
    let [crashed, left, restarted] = three_members(r, n);
    FaultSchedule::new(vec![
        // The leader is etcd member 0 until it is lost: a follower first.
        at(
            8.0,
            Fault::BackendMemberFreeze {
                member: 1 + r.pick(2),
                duration: r.ms(8_000, 25_000),
            },
        ),
        at(
            r.range(9_000, 14_000) as f64 / 1_000.0,
            Fault::Crash {
                member: crashed,
                restart_after: None,
            },
        ),
        at(
            36.0,
            Fault::BackendMemberFreeze {
                member: 0,
                duration: r.ms(5_000, 12_000),
            },
        ),
        at(
            r.range(36_500, 39_000) as f64 / 1_000.0,
            Fault::Leave {
                member: left,
                rejoin_after: Some(r.ms(1_000, 3_000)),
            },
        ),
        at(
            50.0,
            Fault::BackendMemberCrash {
                member: r.pick(3),
                down_for: r.ms(2_000, 6_000),
            },
        ),
        at(
            r.range(50_000, 54_000) as f64 / 1_000.0,
            Fault::Crash {
                member: restarted,
                restart_after: Some(r.ms(1_000, 4_000)),
            },
        ),
    ])
}

/// etcd with authentication and 8 s tokens: etcd restarts (every token forgotten), a member
/// crashes for good, an etcd member crashes and restarts, the auth store changes while a
/// member leaves and re-joins, and a crash and restart at the end.
fn etcd_auth_expiry(r: &mut SimRng, n: usize) -> FaultSchedule {
    let [crashed, left, restarted] = three_members(r, n);
    FaultSchedule::new(vec![
        at(
            r.range(10_000, 20_000) as f64 / 1_000.0,
            Fault::RegistryRestart {
                down_for: r.ms(300, 3_000),
            },
        ),
        at(
            r.range(22_000, 28_000) as f64 / 1_000.0,
            Fault::Crash {
                member: crashed,
                restart_after: None,
            },
        ),
        at(
            32.0,
            Fault::BackendMemberCrash {
                member: r.pick(3),
                down_for: r.ms(2_000, 6_000),
            },
        ),
        at(
            r.range(40_000, 45_000) as f64 / 1_000.0,
            Fault::BackendAuthChange,
        ),
        at(
            r.range(40_000, 46_000) as f64 / 1_000.0,
            Fault::Leave {
                member: left,
                rejoin_after: Some(r.ms(1_000, 3_000)),
            },
        ),
        at(
            55.0,
            Fault::Crash {
                member: restarted,
                restart_after: Some(r.ms(1_000, 4_000)),
            },
        ),
    ])
}

/// etcd is down for 8-20 s (more than the 6 s TTL), then restarts with its data; later a
/// member crashes.
fn etcd_down(r: &mut SimRng, n: usize) -> FaultSchedule {
    FaultSchedule::new(vec![
        at(
            10.0,
            Fault::RegistryRestart {
                down_for: r.ms(8_000, 20_000),
            },
        ),
        at(
            45.0,
            Fault::Crash {
                member: r.pick(n),
                restart_after: None,
            },
        ),
    ])
}

/// The API server freezes for 8-20 s while one member is cut off from it for 1-3 s longer:
/// when it thaws, the others can renew before that member can, and must not count the freeze
/// against it. Then the registry-pause tail: a crash, a short freeze.
fn k8s_apiserver_down(r: &mut SimRng, n: usize) -> FaultSchedule {
    let freeze = r.ms(8_000, 20_000);
    let mut schedule = registry_pause(r, n);
    schedule.faults[0] = at(10.0, Fault::RegistryPause { duration: freeze });
    schedule.faults.push(at(
        10.0,
        Fault::Partition {
            members: vec![r.pick(n)],
            with_registry: false,
            duration: freeze + r.ms(1_000, 3_000),
        },
    ));
    FaultSchedule::new(schedule.faults)
}

/// Zones of the 6-member cluster ([`crate::control::apiserver::pod_zone`]): `zone-a` = m0, m3;
/// `zone-b` = m1, m4; `zone-c` = m2, m5. At 5 s one zone is cut off from everyone (the API
/// server runs elsewhere) for 1.5-4 Lease durations: its members lose their Leases, peers
/// delete them and re-home the zone's identities; at 45 s another zone's Pods all crash and
/// restart 5-15 s later as new incarnations.
fn k8s_zone_outage(r: &mut SimRng, n: usize) -> FaultSchedule {
    let zone_members = |z: usize| (0..n).filter(|m| m % 3 == z).collect::<Vec<_>>();
    let cut = r.pick(3);
    let down = (cut + 1 + r.pick(2)) % 3;
    let mut faults = vec![at(
        5.0,
        Fault::Partition {
            members: zone_members(cut),
            with_registry: false,
            duration: r.ms(9_000, 24_000),
        },
    )];
    let restart = r.ms(5_000, 15_000);
    for m in zone_members(down) {
        faults.push(at(
            45.0,
            Fault::Crash {
                member: m,
                restart_after: Some(restart),
            },
        ));
    }
    FaultSchedule::new(faults)
}

/// Every node's clock offset (wall time: only written into Leases, never compared) and
/// drifting within the bound the Kubernetes provider assumes (expiry is judged on the cleaning
/// member's clock); then a crash.
fn k8s_clock_skew(r: &mut SimRng, n: usize) -> FaultSchedule {
    let bound = shoal::provider::LeaseTiming::DEFAULT_MAX_DRIFT_PPM as u64;
    skewed_then_crash(r, n, bound, false)
}

/// Scenarios kept out of the default campaign because the product fails them today; each
/// names why. `scripts/campaign --scenario NAME` runs one; sim/tests asserts it still fails, so
/// the harness keeps showing the bug until it is fixed.
pub fn known_failing() -> Vec<Scenario> {
    Vec::new()
}

/// The scenario called `name` (default or known-failing).
pub fn by_name(name: &str) -> Option<Scenario> {
    all()
        .into_iter()
        .chain(known_failing())
        .find(|s| s.name == name)
}

/// Options of one run.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Keep the full trace and views (replay, timeline) instead of only the digest.
    pub keep_trace: bool,
    /// A deliberate defect (checker self-tests).
    pub flaw: Flaw,
    /// Run this schedule instead of the seed's (proptest shrinking, regression files).
    pub schedule: Option<FaultSchedule>,
    /// Use these knobs instead of the seed's.
    pub knobs: Option<Knobs>,
}

/// The outcome of one seed.
#[derive(Clone, Debug, Serialize)]
pub struct SeedReport {
    /// Scenario name.
    pub scenario: String,
    /// The seed.
    pub seed: u64,
    /// The schedule that ran.
    pub schedule: FaultSchedule,
    /// What happened.
    pub recording: Recording,
    /// Simulated seconds.
    pub sim_seconds: f64,
    /// Time from the final heal to convergence.
    pub converged_after: Option<Duration>,
    /// Messages the simulated network carried.
    pub messages: u64,
    /// Members in the cluster.
    pub members: usize,
    /// What the control plane served during the fault phase, per simulated second.
    pub load: Option<Load>,
}

impl SeedReport {
    /// Whether no checker fired.
    pub fn passed(&self) -> bool {
        self.recording.violations.is_empty()
    }

    /// The command that replays this seed.
    pub fn replay_command(&self) -> String {
        format!(
            "scripts/campaign replay --scenario {} --seed {}",
            self.scenario, self.seed
        )
    }
}

/// The schedule `seed` draws for `scenario`.
pub fn schedule_for(scenario: &Scenario, seed: u64) -> FaultSchedule {
    (scenario.generate)(&mut SimRng::new(seed, 1), scenario.members)
}

/// Runs one seed in a fresh simulated runtime on the calling thread.
pub fn run_seed(scenario: &Scenario, seed: u64, opts: &RunOptions) -> SeedReport {
    let schedule = opts
        .schedule
        .clone()
        .unwrap_or_else(|| schedule_for(scenario, seed));
    let knobs = opts
        .knobs
        .clone()
        .unwrap_or_else(|| scenario.knobs_for(seed));
    shoal::runtime::sim::plant_flaws(opts.flaw.planted().as_slice());
    let mut rt = Runtime::with_seed_and_config(seed, knobs.madsim_config());
    rt.set_time_limit(Duration::from_secs(3_600));
    let out = rt.block_on(run(
        scenario.clone(),
        schedule.clone(),
        opts.clone(),
        knobs.clone(),
    ));
    shoal::runtime::sim::plant_flaws(&[]);
    SeedReport {
        scenario: scenario.name.to_string(),
        seed,
        schedule,
        recording: out.recording,
        sim_seconds: out.sim_seconds,
        converged_after: out.converged_after,
        messages: out.messages,
        members: scenario.members,
        load: out.load,
    }
}

/// Runs one seed on a new OS thread (madsim wants a fresh thread per run for exact replay:
/// thread-local state such as std's hash seeds would otherwise carry over).
pub fn run_seed_isolated(scenario: &Scenario, seed: u64, opts: &RunOptions) -> SeedReport {
    let (s, o) = (scenario.clone(), opts.clone());
    std::thread::Builder::new()
        .name(format!("seed-{seed}"))
        .stack_size(16 << 20)
        .spawn(move || run_seed(&s, seed, &o))
        .expect("spawning a simulation thread")
        .join()
        .unwrap_or_else(|panic| {
            let msg = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            SeedReport {
                scenario: scenario.name.to_string(),
                seed,
                schedule: opts
                    .schedule
                    .clone()
                    .unwrap_or_else(|| schedule_for(scenario, seed)),
                recording: Recording {
                    violations: vec![format!("the simulation panicked: {msg}")],
                    ..Recording::default()
                },
                sim_seconds: 0.0,
                converged_after: None,
                messages: 0,
                members: scenario.members,
                load: None,
            }
        })
}

/// Runs one seed of `scenario` inside the current simulated runtime (for madsim's own
/// determinism check, which builds the runtime itself); returns what was recorded.
pub async fn simulate(scenario: Scenario, seed: u64) -> Recording {
    let schedule = schedule_for(&scenario, seed);
    let knobs = scenario.knobs_for(seed);
    run(scenario, schedule, RunOptions::default(), knobs)
        .await
        .recording
}

/// What one run inside the simulator produced.
struct RunOutcome {
    recording: Recording,
    sim_seconds: f64,
    /// Time from the final heal to convergence (`None`: it never converged, or the run ended
    /// at start-up).
    converged_after: Option<Duration>,
    messages: u64,
    load: Option<Load>,
}

async fn run(
    scenario: Scenario,
    schedule: FaultSchedule,
    opts: RunOptions,
    knobs: Knobs,
) -> RunOutcome {
    let start = Instant::now();
    let recorder = Recorder::new(opts.keep_trace);
    recorder.trace(
        "harness",
        format!(
            "scenario {} schedule: {}",
            scenario.name,
            schedule.describe()
        ),
    );
    recorder.trace("harness", format!("knobs: {knobs:?}"));
    let buggify = knobs.buggify;
    let mut builder = SimClusterBuilder::new(scenario.provider, scenario.members)
        .clients(scenario.clients)
        .flaw(opts.flaw)
        .knobs(knobs);
    if let Some(app) = scenario.app {
        builder = builder.app(app);
    }
    let cluster = builder.build(recorder.clone());
    let (converged_after, load) = drive(&cluster, &scenario, &schedule, buggify).await;
    cluster.record_path_counts();
    let outcome = RunOutcome {
        recording: recorder.snapshot(),
        sim_seconds: start.elapsed().as_secs_f64(),
        converged_after,
        messages: madsim::net::NetSim::current().stat().msg_count,
        load,
    };
    // Not part of the run (nothing it does is recorded or measured).
    cluster.teardown().await;
    outcome
}

/// Start-up, the fault phase and the final checks of one run; the time from the final heal to
/// convergence (`None`: the cluster did not converge, at start-up or after the heal) and the
/// control plane's load over the fault phase.
async fn drive(
    cluster: &std::sync::Arc<SimCluster>,
    scenario: &Scenario,
    schedule: &FaultSchedule,
    buggify: bool,
) -> (Option<Duration>, Option<Load>) {
    // Start-up: the cluster must converge before faults begin.
    sleep(Duration::from_secs(2)).await;
    if check_liveness(cluster).await.is_none() {
        return (None, None);
    }
    let counted = cluster.load();
    if buggify {
        // Fault points and network delays during the fault phase only; heal_all ends them.
        madsim::buggify::enable();
    }
    let phase = Instant::now();
    let checks_until = phase + scenario.fault_phase + crate::check::liveness_bound(cluster);
    // The harness's own tasks hold the cluster: they run as its background tasks, so the
    // teardown aborts them (a task left sleeping would keep the whole run alive).
    cluster.spawn_background(safety_loop(
        cluster.clone(),
        Duration::from_millis(500),
        checks_until,
    ));
    cluster.spawn_background(crate::oracle::budget::judge_windows(
        cluster.clone(),
        phase + scenario.fault_phase,
    ));
    for s in &schedule.faults {
        if s.fault.needs_registry() && scenario.provider == ProviderKind::InMemory {
            continue;
        }
        sleep_until(phase + s.at.min(scenario.fault_phase)).await;
        cluster.apply(&s.fault);
    }
    sleep_until(phase + scenario.fault_phase).await;
    let load = Load::of(
        &cluster.load().since(&counted),
        scenario.fault_phase,
        scenario.members,
    );
    cluster.heal_all();
    let converged = check_liveness(cluster).await;
    check_safety(cluster, &mut Default::default());
    if converged.is_some() {
        crate::oracle::events::check_caught_up(cluster, Duration::from_secs(1)).await;
        crate::activation::check_final(cluster).await;
    }
    (converged, Some(load))
}
