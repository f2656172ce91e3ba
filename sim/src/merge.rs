//! Combines the JSON summaries of campaign shards (`shoal-sim run --shard K/N --json`, one
//! object per scenario per line) into one report: a fleet of machines, or a Kubernetes Indexed
//! Job (deploy/kubernetes/campaign-job.yaml), runs one campaign.

use std::collections::BTreeMap;

use crate::campaign::Summary;
use crate::load::Load;
use crate::scenario;

/// Reads every summary line of `text`; lines that are not a summary (log lines mixed into the
/// same file, blank lines) are counted and skipped.
pub fn parse(text: &str) -> (Vec<Summary>, usize) {
    let mut out = Vec::new();
    let mut skipped = 0;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        match serde_json::from_str::<Summary>(line) {
            Ok(s) => out.push(s),
            Err(_) => skipped += 1,
        }
    }
    (out, skipped)
}

/// One summary per scenario, in the order scenarios first appear: seeds, failures, simulated
/// time and path counts add up; shards ran side by side, so the wall time is the longest
/// shard's; failover and convergence percentiles are the worst shard's (a bound, not a
/// recomputation); claimed paths are re-judged on the merged counts.
pub fn merge(shards: &[Summary]) -> Vec<Summary> {
    let mut order: Vec<String> = Vec::new();
    let mut by_name: BTreeMap<String, Summary> = BTreeMap::new();
    for s in shards {
        let Some(m) = by_name.get_mut(&s.scenario) else {
            order.push(s.scenario.clone());
            by_name.insert(s.scenario.clone(), s.clone());
            continue;
        };
        m.seeds += s.seeds;
        m.failures += s.failures;
        m.failing_seeds.extend(&s.failing_seeds);
        m.sim_seconds += s.sim_seconds;
        m.wall_seconds = m.wall_seconds.max(s.wall_seconds);
        m.failover_p50_ms = m.failover_p50_ms.max(s.failover_p50_ms);
        m.failover_p99_ms = m.failover_p99_ms.max(s.failover_p99_ms);
        m.failover_max_ms = m.failover_max_ms.max(s.failover_max_ms);
        m.converge_p99_ms = m.converge_p99_ms.max(s.converge_p99_ms);
        m.first_violations
            .extend(s.first_violations.iter().cloned());
        for (p, n) in &s.paths {
            *m.paths.entry(p.clone()).or_insert(0) += n;
        }
        m.load = match (&m.load, &s.load) {
            (Some(a), Some(b)) => {
                let before = (m.seeds - s.seeds) as f64;
                Load::weighted_mean(&[(a, before), (b, s.seeds as f64)])
            }
            (a, b) => a.clone().or_else(|| b.clone()),
        };
        m.rechecked += s.rechecked;
    }
    order
        .into_iter()
        .map(|name| {
            let mut m = by_name.remove(&name).expect("listed");
            m.failing_seeds.sort_unstable();
            m.failing_seeds.dedup();
            m.speedup = m.sim_seconds / m.wall_seconds.max(1e-9);
            m.seeds_per_second = m.seeds as f64 / m.wall_seconds.max(1e-9);
            m.uncovered = scenario::by_name(&name)
                .map(|sc| {
                    sc.covers
                        .iter()
                        .filter(|p| m.paths.get(**p).copied().unwrap_or(0) == 0)
                        .map(|p| p.to_string())
                        .collect()
                })
                .unwrap_or_default();
            m
        })
        .collect()
}

/// The replay command of every failing seed.
pub fn replay_commands(merged: &[Summary]) -> Vec<String> {
    merged
        .iter()
        .flat_map(|s| {
            s.failing_seeds.iter().map(move |seed| {
                format!(
                    "scripts/campaign replay --scenario {} --seed {seed}",
                    s.scenario
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shard(scenario: &str, seeds: usize, failing: Vec<u64>, wall: f64, path: u64) -> Summary {
        Summary {
            scenario: scenario.into(),
            seeds,
            failures: failing.len(),
            first_violations: failing.iter().map(|s| format!("seed {s}: boom")).collect(),
            failing_seeds: failing,
            sim_seconds: 100.0 * seeds as f64,
            wall_seconds: wall,
            speedup: 0.0,
            seeds_per_second: 0.0,
            failover_p50_ms: Some(5_000),
            failover_p99_ms: Some(6_000 + path),
            failover_max_ms: Some(7_000),
            converge_p99_ms: None,
            paths: BTreeMap::from([("registry: expiries".to_string(), path)]),
            uncovered: Vec::new(),
            rechecked: 1,
            members: 5,
            load: Some(Load {
                members: 5,
                events_per_s: path as f64,
                ..Load::default()
            }),
        }
    }

    #[test]
    fn shards_add_up_and_failures_keep_their_replay_commands() {
        let a = serde_json::to_string(&shard("member-crash", 50, vec![7], 2.0, 3)).unwrap();
        let b = serde_json::to_string(&shard("member-crash", 50, vec![], 3.0, 0)).unwrap();
        let c = serde_json::to_string(&shard("steady", 50, vec![], 1.0, 0)).unwrap();
        let d = serde_json::to_string(&shard("steady", 50, vec![12, 4], 1.5, 0)).unwrap();
        let text = format!("{a}\nFAILED member-crash seed 7: boom\n{c}\n\n{b}\n{d}\n");
        let (shards, skipped) = parse(&text);
        assert_eq!((shards.len(), skipped), (4, 1));
        let merged = merge(&shards);
        assert_eq!(merged.len(), 2);
        let mc = &merged[0];
        assert_eq!(mc.scenario, "member-crash");
        assert_eq!((mc.seeds, mc.failures), (100, 1));
        assert_eq!(mc.wall_seconds, 3.0);
        assert_eq!(mc.sim_seconds, 10_000.0);
        assert_eq!(mc.paths["registry: expiries"], 3);
        assert_eq!(mc.failover_p99_ms, Some(6_003));
        assert_eq!(mc.rechecked, 2);
        // Loads are averaged by seeds: 3 and 0 watch messages per second over 50 seeds each.
        assert_eq!(mc.load.as_ref().map(|l| l.events_per_s), Some(1.5));
        assert_eq!(mc.members, 5);
        // member-crash claims "workload: reports with moves", which no shard reported.
        assert!(
            mc.uncovered
                .contains(&"workload: reports with moves".to_string())
        );
        let st = &merged[1];
        assert_eq!(st.failing_seeds, vec![4, 12]);
        assert_eq!(
            replay_commands(&merged),
            vec![
                "scripts/campaign replay --scenario member-crash --seed 7",
                "scripts/campaign replay --scenario steady --seed 4",
                "scripts/campaign replay --scenario steady --seed 12",
            ]
        );
    }
}
