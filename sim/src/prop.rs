//! Property-based fault schedules: a proptest [`Strategy`] for [`FaultSchedule`]s and a runner
//! that executes each case in a fresh simulated runtime on a fresh OS thread with the seed held
//! fixed, so a failing schedule shrinks to a minimal one that replays exactly.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::faults::{Fault, FaultSchedule, Scheduled};
use crate::flaw::Flaw;
use crate::scenario::{RunOptions, Scenario, run_seed_isolated};

fn ms(lo: u64, hi: u64) -> impl Strategy<Value = Duration> {
    (lo..hi).prop_map(Duration::from_millis)
}

/// One fault against a cluster of `members` members.
pub fn fault(members: usize) -> impl Strategy<Value = Fault> {
    let m = 0..members;
    prop_oneof![
        (m.clone(), prop::option::of(ms(1_000, 15_000))).prop_map(|(member, restart_after)| {
            Fault::Crash {
                member,
                restart_after,
            }
        }),
        (
            prop::collection::btree_set(0..members, 1..3),
            any::<bool>(),
            ms(1_000, 20_000)
        )
            .prop_map(|(s, with_registry, duration)| Fault::Partition {
                members: s.into_iter().collect(),
                with_registry,
                duration
            }),
        (m.clone(), ms(1_000, 20_000))
            .prop_map(|(member, duration)| Fault::HeartbeatLoss { member, duration }),
        (
            prop::collection::vec(prop::collection::btree_set(0..members, 1..3), 1..3),
            ms(1_000, 20_000)
        )
            .prop_map(|(groups, duration)| {
                // Groups must be disjoint: a member stays in the first group that lists it.
                let mut seen = std::collections::BTreeSet::new();
                let groups = groups
                    .into_iter()
                    .map(|g| {
                        g.into_iter()
                            .filter(|m| seen.insert(*m))
                            .collect::<Vec<_>>()
                    })
                    .filter(|g| !g.is_empty())
                    .collect();
                Fault::Split { groups, duration }
            }),
        (m.clone(), ms(1_000, 20_000))
            .prop_map(|(from, duration)| Fault::OneWay { from, duration }),
        (m.clone(), ms(500, 10_000))
            .prop_map(|(member, duration)| Fault::Pause { member, duration }),
        (m.clone(), -120_000i64..120_000, -250_000i64..250_000).prop_map(
            |(member, offset_ms, drift_ppm)| Fault::ClockSkew {
                member,
                offset_ms,
                drift_ppm
            }
        ),
        ms(200, 8_000).prop_map(|down_for| Fault::RegistryRestart { down_for }),
        (m, 1u32..5, ms(500, 4_000)).prop_map(|(member, times, period)| Fault::Flap {
            member,
            times,
            period
        }),
    ]
}

/// Up to `max_faults` faults at offsets inside a fault phase of `phase`.
pub fn schedule(
    members: usize,
    phase: Duration,
    max_faults: usize,
) -> impl Strategy<Value = FaultSchedule> {
    let phase_ms = phase.as_millis() as u64;
    prop::collection::vec((0..phase_ms, fault(members)), 0..=max_faults).prop_map(|v| {
        FaultSchedule::new(
            v.into_iter()
                .map(|(at, fault)| Scheduled {
                    at: Duration::from_millis(at),
                    fault,
                })
                .collect(),
        )
    })
}

/// Runs `schedule` on `scenario` with `seed` and `flaw`; a violation fails the case.
pub fn check(
    scenario: &Scenario,
    seed: u64,
    flaw: Flaw,
    schedule: &FaultSchedule,
) -> Result<(), TestCaseError> {
    let opts = RunOptions {
        keep_trace: false,
        flaw,
        schedule: Some(schedule.clone()),
    };
    let r = run_seed_isolated(scenario, seed, &opts);
    if r.passed() {
        Ok(())
    } else {
        Err(TestCaseError::fail(r.recording.violations[0].clone()))
    }
}

/// A minimal failing schedule found by [`search`].
#[derive(Debug, Clone)]
pub struct Counterexample {
    /// The shrunk schedule.
    pub schedule: FaultSchedule,
    /// Why it fails.
    pub reason: String,
}

impl Counterexample {
    /// The schedule as JSON, for `shoal-sim replay --schedule FILE`.
    pub fn json(&self) -> String {
        serde_json::to_string(&self.schedule).expect("schedules serialize")
    }
}

/// Searches `cases` random schedules (plus shrinking) for one that makes a checker fire;
/// returns the shrunk counterexample, if any.
pub fn search(
    scenario: &Scenario,
    seed: u64,
    flaw: Flaw,
    cases: u32,
    max_faults: usize,
) -> Option<Counterexample> {
    let config = Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(
        config,
        proptest::test_runner::TestRng::deterministic_rng(
            proptest::test_runner::RngAlgorithm::ChaCha,
        ),
    );
    let strategy = schedule(scenario.members, scenario.fault_phase, max_faults);
    match runner.run(&strategy, |s| check(scenario, seed, flaw, &s)) {
        Ok(()) => None,
        Err(TestError::Fail(reason, schedule)) => Some(Counterexample {
            schedule,
            reason: reason.to_string(),
        }),
        Err(TestError::Abort(reason)) => Some(Counterexample {
            schedule: FaultSchedule::default(),
            reason: format!("aborted: {reason}"),
        }),
    }
}
