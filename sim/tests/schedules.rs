//! Property-based fault schedules (simulated build only).
#![cfg(madsim)]

use proptest::test_runner::{Config, TestRunner};
use shoal_sim::faults::Fault;
use shoal_sim::flaw::Flaw;
use shoal_sim::{prop, scenario};

/// Random schedules of up to four faults never make a checker fire on the real providers.
#[test]
fn random_schedules_keep_every_checker_quiet() {
    let s = scenario::by_name("swarm").unwrap();
    let mut runner = TestRunner::new(Config {
        cases: 24,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&prop::schedule(s.members, s.fault_phase, 4), |schedule| {
        prop::check(&s, 11, Flaw::None, &schedule)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// With a registry that never expires members (seed 3: a clean network), proptest finds a failing schedule and shrinks it
/// to a single fault that silences a member, which replays to the same failure.
#[test]
fn a_failure_shrinks_to_a_minimal_schedule_that_replays() {
    let s = scenario::by_name("swarm").unwrap();
    let found = prop::search(&s, 3, Flaw::NeverExpire, 64, 4)
        .expect("the TTL checker must fire for some schedule");
    eprintln!(
        "minimal schedule: {} ({})",
        found.schedule.describe(),
        found.reason
    );
    eprintln!(
        "replay: echo '{}' > s.json; scripts/campaign replay --scenario swarm --seed 3 --flaw never-expire --schedule s.json",
        found.json()
    );
    assert_eq!(
        found.schedule.faults.len(),
        1,
        "shrunk to one fault: {}",
        found.schedule.describe()
    );
    assert!(
        matches!(
            found.schedule.faults[0].fault,
            Fault::Crash { .. }
                | Fault::Partition { .. }
                | Fault::HeartbeatLoss { .. }
                | Fault::OneWay { .. }
                | Fault::ReplyLost { .. }
                | Fault::Swizzle { .. }
                | Fault::Leave { .. }
                | Fault::Pause { .. }
                | Fault::Flap { .. }
                | Fault::RollingRestart { .. }
        ),
        "a fault that silences a member: {}",
        found.schedule.describe()
    );
    assert!(
        found.reason.contains("lease: the registry still lists"),
        "{}",
        found.reason
    );
    // The printed schedule replays to the same failure.
    let parsed: shoal_sim::faults::FaultSchedule = serde_json::from_str(&found.json()).unwrap();
    assert!(prop::check(&s, 3, Flaw::NeverExpire, &parsed).is_err());
}
