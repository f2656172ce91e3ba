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
use crate::cluster::{ProviderKind, SimClusterBuilder};
use crate::faults::{Fault, FaultSchedule, Scheduled, SimRng};
use crate::flaw::Flaw;
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
    let a = r.pick(n);
    let b = (a + 1) % n;
    let mut skew = |m| Fault::ClockSkew {
        member: m,
        offset_ms: r.range(0, 240_000) as i64 - 120_000,
        drift_ppm: r.range(0, 500_000) as i64 - 250_000,
    };
    let (fa, fb) = (skew(a), skew(b));
    FaultSchedule::new(vec![
        at(2.0, fa),
        at(4.0, fb),
        at(
            30.0,
            Fault::Crash {
                member: (a + 2) % n,
                restart_after: Some(Duration::from_secs(10)),
            },
        ),
    ])
}

/// Fault kinds the swarm scenario draws from.
pub const SWARM_KINDS: [&str; 10] = [
    "partition",
    "split",
    "one-way",
    "heartbeat-loss",
    "crash",
    "pause",
    "clock-skew",
    "registry-restart",
    "rolling-restart",
    "flap",
];

fn swarm(r: &mut SimRng, n: usize) -> FaultSchedule {
    // Swarm testing: the seed chooses which fault kinds are on and how many faults there are.
    let mut enabled: Vec<&str> = SWARM_KINDS
        .iter()
        .copied()
        .filter(|_| r.chance(0.5))
        .collect();
    if enabled.is_empty() {
        enabled.push(SWARM_KINDS[r.pick(SWARM_KINDS.len())]);
    }
    let count = r.range(2, 10);
    let mut faults = Vec::new();
    for _ in 0..count {
        let start = r.range(0, 80_000) as f64 / 1000.0;
        let m = r.pick(n);
        let d = r.ms(1_000, 20_000);
        let fault = match enabled[r.pick(enabled.len())] {
            "partition" => {
                let mut members = vec![m];
                if r.chance(0.4) {
                    members.push((m + 1) % n);
                    members.sort();
                }
                Fault::Partition {
                    members,
                    with_registry: r.chance(0.3),
                    duration: d,
                }
            }
            "split" => {
                let other = (m + 1 + r.pick(n - 1)) % n;
                Fault::Split {
                    groups: vec![vec![m], vec![other]],
                    duration: d,
                }
            }
            "one-way" => Fault::OneWay {
                from: m,
                duration: d,
            },
            "heartbeat-loss" => Fault::HeartbeatLoss {
                member: m,
                duration: d,
            },
            "crash" => Fault::Crash {
                member: m,
                restart_after: r.chance(0.7).then(|| r.ms(1_000, 15_000)),
            },
            "pause" => Fault::Pause {
                member: m,
                duration: r.ms(500, 10_000),
            },
            "clock-skew" => Fault::ClockSkew {
                member: m,
                offset_ms: r.range(0, 240_000) as i64 - 120_000,
                drift_ppm: r.range(0, 500_000) as i64 - 250_000,
            },
            "registry-restart" => Fault::RegistryRestart {
                down_for: r.ms(200, 8_000),
            },
            "rolling-restart" => Fault::RollingRestart {
                gap: r.ms(1_000, 5_000),
            },
            _ => Fault::Flap {
                member: m,
                times: r.range(2, 6) as u32,
                period: r.ms(500, 4_000),
            },
        };
        faults.push(at(start, fault));
    }
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

/// Every scenario, in `list` order.
pub fn all() -> Vec<Scenario> {
    let reg = |name, about, fault_phase: u64, generate| Scenario {
        name,
        about,
        provider: ProviderKind::Registry,
        members: 5,
        clients: 1,
        fault_phase: Duration::from_secs(fault_phase),
        generate,
        app: None,
    };
    vec![
        reg(
            "steady",
            "no faults: 5 members and a client on the registry converge and stay put",
            60,
            steady,
        ),
        reg(
            "member-crash",
            "TTL failover: one member crashes for good, another crashes and restarts",
            75,
            member_crash,
        ),
        reg(
            "partition-heal",
            "one or two members (sometimes with the registry) partitioned, then healed, twice",
            75,
            partition_heal,
        ),
        reg(
            "heartbeat-loss",
            "a member's heartbeats are dropped while its other traffic flows, twice",
            75,
            heartbeat_loss,
        ),
        reg(
            "registry-restart",
            "the registry restarts twice and loses its state",
            75,
            registry_restart,
        ),
        reg(
            "rolling-restart",
            "every member restarts in turn as a new incarnation",
            80,
            rolling_restart,
        ),
        reg(
            "flapping",
            "one member is cut off and healed repeatedly",
            80,
            flapping,
        ),
        reg(
            "clock-skew",
            "two members' clocks are offset by up to 2 min and drift by up to 25%, then a crash",
            70,
            clock_skew,
        ),
        reg(
            "swarm",
            "random fault mixes: the seed picks the fault kinds and their schedule",
            90,
            swarm,
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
        },
    ]
}

/// The scenario called `name`.
pub fn by_name(name: &str) -> Option<Scenario> {
    all().into_iter().find(|s| s.name == name)
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
    let mut rt = Runtime::with_seed_and_config(seed, madsim::Config::default());
    rt.set_time_limit(Duration::from_secs(3_600));
    let (recording, sim_seconds, converged_after, messages) =
        rt.block_on(run(scenario.clone(), schedule.clone(), opts.clone()));
    SeedReport {
        scenario: scenario.name.to_string(),
        seed,
        schedule,
        recording,
        sim_seconds,
        converged_after,
        messages,
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
            }
        })
}

async fn run(
    scenario: Scenario,
    schedule: FaultSchedule,
    opts: RunOptions,
) -> (Recording, f64, Option<Duration>, u64) {
    let (rec, sim, conv) = run_inner(scenario, schedule, opts).await;
    (
        rec,
        sim,
        conv,
        madsim::net::NetSim::current().stat().msg_count,
    )
}

async fn run_inner(
    scenario: Scenario,
    schedule: FaultSchedule,
    opts: RunOptions,
) -> (Recording, f64, Option<Duration>) {
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
    let mut builder = SimClusterBuilder::new(scenario.provider, scenario.members)
        .clients(scenario.clients)
        .flaw(opts.flaw);
    if let Some(app) = scenario.app {
        builder = builder.app(app);
    }
    let cluster = builder.build(recorder.clone());
    // Start-up: the cluster must converge before faults begin.
    sleep(Duration::from_secs(2)).await;
    if check_liveness(&cluster).await.is_none() {
        let rec = recorder.snapshot();
        return (rec, start.elapsed().as_secs_f64(), None);
    }
    let phase = Instant::now();
    let checks_until = phase + scenario.fault_phase + crate::check::liveness_bound(&cluster);
    madsim::task::spawn(safety_loop(
        cluster.clone(),
        Duration::from_millis(500),
        checks_until,
    ));
    for s in &schedule.faults {
        if s.fault.needs_registry() && scenario.provider != ProviderKind::Registry {
            continue;
        }
        sleep_until(phase + s.at.min(scenario.fault_phase)).await;
        cluster.apply(&s.fault);
    }
    sleep_until(phase + scenario.fault_phase).await;
    cluster.heal_all();
    let converged = check_liveness(&cluster).await;
    check_safety(&cluster, &mut Default::default());
    (
        recorder.snapshot(),
        start.elapsed().as_secs_f64(),
        converged,
    )
}
