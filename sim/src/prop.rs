//! Property-based fault schedules: a proptest [`Strategy`] for [`FaultSchedule`]s and a runner
//! that executes each case in a fresh simulated runtime on a fresh OS thread with the seed held
//! fixed, so a failing schedule shrinks to a minimal one that replays exactly.

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::faults::{Fault, FaultKind, FaultSchedule, Scheduled, SimRng};
use crate::flaw::Flaw;
use crate::scenario::{RunOptions, Scenario, run_seed_isolated};

/// One fault against a cluster of `members` members: a kind and the seed of its parameters,
/// drawn by [`FaultKind::draw`] (the same draw swarm schedules use), so proptest shrinks towards
/// the first kind and small parameter seeds.
pub fn fault(members: usize) -> impl Strategy<Value = Fault> {
    (0..FaultKind::ALL.len(), any::<u64>())
        .prop_map(move |(k, seed)| FaultKind::ALL[k].draw(&mut SimRng::new(seed, 7), members))
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
        knobs: None,
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
