//! Simulated clusters in `cargo test` (simulated build only): every scenario over a fixed seed
//! range, the regression seeds, determinism, and proof that every checker fires on a
//! deliberately broken provider.
#![cfg(madsim)]

use shoal_sim::flaw::Flaw;
use shoal_sim::scenario::{self, RunOptions, SeedReport, run_seed_isolated};

fn run(name: &str, seed: u64, flaw: Flaw) -> SeedReport {
    let s = scenario::by_name(name).unwrap_or_else(|| panic!("no scenario {name}"));
    run_seed_isolated(
        &s,
        seed,
        &RunOptions {
            keep_trace: false,
            flaw,
            schedule: None,
        },
    )
}

fn assert_passes(name: &str, seeds: std::ops::Range<u64>) {
    for seed in seeds {
        let r = run(name, seed, Flaw::None);
        assert!(
            r.passed(),
            "{name} seed {seed} failed: {:#?}\nschedule: {}\nreplay: {}",
            r.recording.violations,
            r.schedule.describe(),
            r.replay_command()
        );
    }
}

#[test]
fn every_scenario_passes_a_fixed_seed_range() {
    for s in scenario::all() {
        let seeds = if s.name == "swarm" { 1..41 } else { 1..9 };
        assert_passes(s.name, seeds);
    }
}

/// Seeds that once failed, one `scenario seed` per line (`#` comments), replayed on every run.
#[test]
fn regression_seeds_pass() {
    let text = include_str!("../regressions.txt");
    let mut n = 0;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let mut parts = line.splitn(3, ' ');
        let (name, seed) = (
            parts.next().unwrap(),
            parts.next().unwrap().parse::<u64>().unwrap(),
        );
        let schedule = parts
            .next()
            .map(|json| serde_json::from_str(json).expect("a fault schedule"));
        let s = scenario::by_name(name).unwrap_or_else(|| panic!("no scenario {name}"));
        let opts = RunOptions {
            keep_trace: false,
            flaw: Flaw::None,
            schedule,
        };
        let (a, b) = (
            run_seed_isolated(&s, seed, &opts),
            run_seed_isolated(&s, seed, &opts),
        );
        assert!(
            a.passed(),
            "{name} seed {seed}: {:#?}\nschedule: {}",
            a.recording.violations,
            a.schedule.describe()
        );
        assert_eq!(
            a.recording.digest, b.recording.digest,
            "{name} seed {seed} replays exactly"
        );
        n += 1;
    }
    assert!(n > 0, "the regressions file lists seeds");
}

/// Every scenario replays bit-for-bit: two runs of one seed give the same trace digest. (This
/// caught an unbiased `tokio::select!`, whose branch order comes from tokio's own unseeded RNG.)
#[test]
fn every_scenario_is_deterministic() {
    for s in scenario::all() {
        for seed in [3, 21] {
            let opts = RunOptions {
                keep_trace: false,
                ..RunOptions::default()
            };
            let a = run_seed_isolated(&s, seed, &opts);
            let b = run_seed_isolated(&s, seed, &opts);
            assert_eq!(
                a.recording.digest, b.recording.digest,
                "{} seed {seed} is not deterministic",
                s.name
            );
        }
    }
}

#[test]
fn a_seed_replays_exactly() {
    let s = scenario::by_name("swarm").unwrap();
    let opts = RunOptions {
        keep_trace: true,
        ..RunOptions::default()
    };
    let a = run_seed_isolated(&s, 7, &opts);
    let b = run_seed_isolated(&s, 7, &opts);
    assert!(a.recording.trace.len() > 20);
    assert_eq!(a.recording.digest, b.recording.digest);
    assert_eq!(a.recording.trace, b.recording.trace);
    let c = run_seed_isolated(&s, 8, &opts);
    assert_ne!(
        a.recording.digest, c.recording.digest,
        "another seed is another run"
    );
}

fn first_failure(name: &str, flaw: Flaw, needle: &str) -> String {
    for seed in 1..=6 {
        let r = run(name, seed, flaw);
        if let Some(v) = r.recording.violations.iter().find(|v| v.contains(needle)) {
            return v.clone();
        }
    }
    panic!("the {needle:?} checker never fired on flaw {flaw:?} in {name}");
}

#[test]
fn version_checker_fires_on_a_provider_that_applies_stale_versions() {
    let v = first_failure("member-crash", Flaw::StaleReplay, "went backwards");
    assert!(v.starts_with("t=") && v.contains("m0"), "{v}");
}

#[test]
fn agreement_checker_fires_on_a_provider_that_corrupts_placement() {
    let v = first_failure("steady", Flaw::CorruptPlacement, "disagree on the owner");
    assert!(v.contains("says"), "{v}");
}

#[test]
fn ttl_checker_fires_on_a_registry_that_never_expires() {
    let v = first_failure("member-crash", Flaw::NeverExpire, "after its TTL expired");
    assert!(v.contains("allowed: one sweep interval"), "{v}");
}

#[test]
fn liveness_checker_fires_on_a_watch_that_freezes() {
    let v = first_failure("member-crash", Flaw::FreezeWatch, "liveness: not converged");
    assert!(v.contains("live members are"), "{v}");
}

#[test]
fn failover_latency_is_recorded_for_every_crash() {
    let r = run("member-crash", 3, Flaw::None);
    assert_eq!(r.recording.failovers.len(), 2, "two crashes, two failovers");
    let ttl = shoal::registry::RegistryConfig::default().ttl;
    for f in &r.recording.failovers {
        assert!(
            *f <= ttl + std::time::Duration::from_secs(2),
            "failover took {f:?}"
        );
    }
}
