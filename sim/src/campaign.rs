//! Campaigns: many seeds of many scenarios, in parallel, summarised.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde::{Deserialize, Serialize};

use crate::flaw::Flaw;
use crate::load::Load;
use crate::scenario::{RunOptions, Scenario, SeedReport, run_seed_isolated};
use crate::wallclock::Stopwatch;

/// What to run.
#[derive(Clone, Debug)]
pub struct Campaign {
    /// Scenarios, in order.
    pub scenarios: Vec<Scenario>,
    /// Seeds per scenario (before sharding).
    pub seeds: u64,
    /// First seed.
    pub seed_start: u64,
    /// Parallel runs.
    pub jobs: usize,
    /// `(k, n)`: run only seeds whose offset modulo `n` is `k - 1`.
    pub shard: (u64, u64),
    /// A deliberate defect (checker self-tests).
    pub flaw: Flaw,
    /// Show a progress line on a terminal.
    pub progress: bool,
    /// Re-run every seed divisible by this a second time and compare trace digests (0: never).
    pub recheck_every: u64,
}

/// One scenario's results.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Summary {
    /// Scenario name.
    pub scenario: String,
    /// Seeds run.
    pub seeds: usize,
    /// Seeds with at least one violation.
    pub failures: usize,
    /// Those seeds.
    pub failing_seeds: Vec<u64>,
    /// Simulated seconds, summed over seeds.
    pub sim_seconds: f64,
    /// Host wall seconds for this scenario.
    pub wall_seconds: f64,
    /// Simulated time per wall time.
    pub speedup: f64,
    /// Seeds per wall second.
    pub seeds_per_second: f64,
    /// Failover latency (crash to removal on every survivor), over all crashes of all seeds.
    pub failover_p50_ms: Option<u64>,
    /// 99th percentile.
    pub failover_p99_ms: Option<u64>,
    /// Maximum.
    pub failover_max_ms: Option<u64>,
    /// Time from the final heal to convergence, 99th percentile.
    pub converge_p99_ms: Option<u64>,
    /// The first violation of each failing seed.
    pub first_violations: Vec<String>,
    /// How often each rare path ran, summed over seeds.
    pub paths: BTreeMap<String, u64>,
    /// Paths the scenario claims to cover that no seed reached.
    pub uncovered: Vec<String>,
    /// Seeds re-run to check determinism.
    pub rechecked: usize,
    /// Members in the cluster.
    #[serde(default)]
    pub members: usize,
    /// What the control plane served during the fault phase, per simulated second, averaged
    /// over seeds (`requests_per_s`, `events_per_s`, `events_per_member_per_s`, ...).
    #[serde(default)]
    pub load: Option<Load>,
}

fn percentile(sorted: &[u64], q: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    Some(sorted[i])
}

/// The seeds a shard runs.
pub fn shard_seeds(seed_start: u64, seeds: u64, (k, n): (u64, u64)) -> Vec<u64> {
    (0..seeds)
        .filter(|o| o % n == k - 1)
        .map(|o| seed_start + o)
        .collect()
}

/// Runs every scenario's seeds; `on_seed` sees each report as it finishes.
pub fn run(c: &Campaign, mut on_seed: impl FnMut(&SeedReport) + Send) -> Vec<Summary> {
    let mut summaries = Vec::new();
    let tty = c.progress && std::io::stderr().is_terminal();
    for scenario in &c.scenarios {
        let seeds = shard_seeds(c.seed_start, scenario.seeds_in(c.seeds), c.shard);
        let wall = Stopwatch::start();
        let next = AtomicUsize::new(0);
        let reports: Mutex<Vec<SeedReport>> = Mutex::new(Vec::new());
        let rechecked = AtomicUsize::new(0);
        let sink = Mutex::new(&mut on_seed);
        let opts = RunOptions {
            keep_trace: false,
            flaw: c.flaw,
            schedule: None,
            knobs: None,
        };
        std::thread::scope(|s| {
            for _ in 0..c.jobs.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(&seed) = seeds.get(i) else { break };
                        let mut report = run_seed_isolated(scenario, seed, &opts);
                        if c.recheck_every > 0 && seed % c.recheck_every == 0 {
                            recheck(&mut report, scenario, &opts);
                            rechecked.fetch_add(1, Ordering::SeqCst);
                        }
                        (sink.lock().unwrap())(&report);
                        let mut all = reports.lock().unwrap();
                        all.push(report);
                        if tty {
                            let failed = all.iter().filter(|r| !r.passed()).count();
                            eprint!(
                                "\r{:<16} {:>5}/{:<5} seeds  {failed} failed  {:.0}s",
                                scenario.name,
                                all.len(),
                                seeds.len(),
                                wall.secs()
                            );
                        }
                    }
                });
            }
        });
        if tty {
            eprint!("\r{:80}\r", "");
        }
        let mut reports = reports.into_inner().unwrap();
        reports.sort_by_key(|r| r.seed);
        let mut summary = summarize(scenario.name, &reports, wall.secs());
        summary.uncovered = scenario
            .covers
            .iter()
            .filter(|p| summary.paths.get(**p).copied().unwrap_or(0) == 0)
            .map(|p| p.to_string())
            .collect();
        summary.rechecked = rechecked.into_inner();
        summaries.push(summary);
    }
    summaries
}

/// Runs the seed of `report` again and records a violation if its trace differs.
fn recheck(report: &mut SeedReport, scenario: &Scenario, opts: &RunOptions) {
    let again = run_seed_isolated(scenario, report.seed, opts);
    if again.recording.digest != report.recording.digest {
        report.recording.violations.push(format!(
            "determinism: a second run of seed {} produced a different trace (digest {:016x} vs {:016x})",
            report.seed, report.recording.digest, again.recording.digest
        ));
    }
}

/// Summarises one scenario's reports.
pub fn summarize(name: &str, reports: &[SeedReport], wall_seconds: f64) -> Summary {
    let sim_seconds: f64 = reports.iter().map(|r| r.sim_seconds).sum();
    let mut failovers: Vec<u64> = reports
        .iter()
        .flat_map(|r| r.recording.failovers.iter().map(|d| d.as_millis() as u64))
        .collect();
    failovers.sort_unstable();
    let mut converge: Vec<u64> = reports
        .iter()
        .filter_map(|r| r.converged_after)
        .map(|d| d.as_millis() as u64)
        .collect();
    converge.sort_unstable();
    let failing: Vec<&SeedReport> = reports.iter().filter(|r| !r.passed()).collect();
    let mut paths: BTreeMap<String, u64> = BTreeMap::new();
    for r in reports {
        for (p, n) in &r.recording.paths {
            *paths.entry(p.clone()).or_insert(0) += n;
        }
    }
    Summary {
        scenario: name.to_string(),
        seeds: reports.len(),
        failures: failing.len(),
        failing_seeds: failing.iter().map(|r| r.seed).collect(),
        sim_seconds,
        wall_seconds,
        speedup: sim_seconds / wall_seconds.max(1e-9),
        seeds_per_second: reports.len() as f64 / wall_seconds.max(1e-9),
        failover_p50_ms: percentile(&failovers, 0.5),
        failover_p99_ms: percentile(&failovers, 0.99),
        failover_max_ms: failovers.last().copied(),
        converge_p99_ms: percentile(&converge, 0.99),
        first_violations: failing
            .iter()
            .map(|r| format!("seed {}: {}", r.seed, r.recording.violations[0]))
            .collect(),
        paths,
        uncovered: Vec::new(),
        rechecked: 0,
        members: reports.first().map_or(0, |r| r.members),
        load: Load::mean(
            &reports
                .iter()
                .filter_map(|r| r.load.clone())
                .collect::<Vec<_>>(),
        ),
    }
}

/// The summary table.
pub fn table(summaries: &[Summary]) -> String {
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let rate = |v: Option<f64>| match v {
        None => "-".to_string(),
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
    };
    let mut out = format!(
        "{:<22} {:>5} {:>6} {:>8} {:>9} {:>8} {:>8} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}\n",
        "scenario",
        "nodes",
        "seeds",
        "failures",
        "sim_s",
        "wall_s",
        "speedup",
        "seeds/s",
        "fo_p50",
        "fo_p99",
        "fo_max",
        "conv_p99",
        "req/s",
        "ev/s",
        "ev/m/s"
    );
    for s in summaries {
        let load = s.load.as_ref();
        out.push_str(&format!(
            "{:<22} {:>5} {:>6} {:>8} {:>9.0} {:>8.2} {:>8.0} {:>7.1} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9} {:>8}\n",
            s.scenario,
            s.members,
            s.seeds,
            s.failures,
            s.sim_seconds,
            s.wall_seconds,
            s.speedup,
            s.seeds_per_second,
            ms(s.failover_p50_ms),
            ms(s.failover_p99_ms),
            ms(s.failover_max_ms),
            ms(s.converge_p99_ms),
            rate(load.map(|l| l.requests_per_s)),
            rate(load.map(|l| l.events_per_s)),
            rate(load.map(|l| l.events_per_member_per_s)),
        ));
    }
    out.push_str("(nodes = members; fo = failover, crash to removal on every survivor, ms; conv = final heal to convergence, ms;\n req/s, ev/s = requests and watch messages the control plane served per simulated second of the fault phase, ev/m/s per member)\n");
    out
}

/// The rare-path counts of every scenario, with the claimed paths that no seed reached.
pub fn paths_table(summaries: &[Summary]) -> String {
    let mut all: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for (i, s) in summaries.iter().enumerate() {
        for (p, n) in &s.paths {
            all.entry(p.as_str())
                .or_insert_with(|| vec![0; summaries.len()])[i] = *n;
        }
    }
    let mut out =
        String::from("\nrare paths, runs summed over seeds (columns in the order above):\n");
    for (path, counts) in &all {
        let cells: Vec<String> = counts.iter().map(|n| format!("{n:>7}")).collect();
        out.push_str(&format!("{path:<44} {}\n", cells.join("")));
    }
    for s in summaries {
        if !s.uncovered.is_empty() {
            out.push_str(&format!(
                "NOT REACHED in {}: {} (the scenario claims to cover them)\n",
                s.scenario,
                s.uncovered.join(", ")
            ));
        }
    }
    let rechecked: usize = summaries.iter().map(|s| s.rechecked).sum();
    out.push_str(&format!(
        "determinism: {rechecked} seeds re-run, digests compared\n"
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_partition_the_seed_range() {
        let all: Vec<u64> = (1..=4).flat_map(|k| shard_seeds(100, 10, (k, 4))).collect();
        let mut sorted = all.clone();
        sorted.sort();
        assert_eq!(sorted, (100..110).collect::<Vec<_>>());
        assert_eq!(shard_seeds(0, 10, (1, 1)).len(), 10);
    }

    #[test]
    fn percentiles() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[1, 2, 3, 4, 5], 0.5), Some(3));
        assert_eq!(percentile(&[1, 2, 3, 4, 5], 0.99), Some(5));
    }
}
