//! Command-line shell of `shoal-sim`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use shoal_sim::campaign::{self, Campaign};
use shoal_sim::flaw::Flaw;
use shoal_sim::scenario::{self, RunOptions, Scenario};
use shoal_sim::{bench, timeline};

#[derive(Parser)]
#[command(
    name = "shoal-sim",
    about = "Deterministic simulation of Shoal clusters",
    version
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs a campaign: many seeds of one or all scenarios, then prints a summary table.
    Run {
        /// Scenario name, or `all`.
        #[arg(long, default_value = "all")]
        scenario: String,
        /// Seeds per scenario.
        #[arg(long, default_value_t = 200)]
        seeds: u64,
        /// Run every chosen scenario with this many members instead of its own count.
        #[arg(long)]
        members: Option<usize>,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        seed_start: u64,
        /// Parallel runs (default: available cores).
        #[arg(long)]
        jobs: Option<usize>,
        /// Run only shard K of N (`K/N`, 1-based), so a fleet can share one campaign.
        #[arg(long, value_parser = parse_shard, default_value = "1/1")]
        shard: (u64, u64),
        /// One JSON object per scenario on stdout instead of the table.
        #[arg(long)]
        json: bool,
        /// Run with a deliberate defect (shows that the checkers fire).
        #[arg(long, value_enum, default_value = "none")]
        flaw: Flaw,
    },
    /// Reruns one seed with its full trace, checks that it is deterministic, and can draw a
    /// timeline.
    Replay {
        /// Scenario name.
        #[arg(long)]
        scenario: String,
        /// The seed.
        #[arg(long)]
        seed: u64,
        /// Run the scenario with this many members instead of its own count.
        #[arg(long)]
        members: Option<usize>,
        /// Run once, without the second run that checks determinism (large clusters).
        #[arg(long)]
        once: bool,
        /// Write an SVG timeline of every node's view with the faults marked.
        #[arg(long)]
        timeline: Option<PathBuf>,
        /// Print only the summary, not the trace.
        #[arg(long)]
        quiet: bool,
        /// Run this fault schedule (JSON, as printed by a shrunk proptest failure) instead of
        /// the one the seed draws.
        #[arg(long)]
        schedule: Option<PathBuf>,
        /// Run with a deliberate defect.
        #[arg(long, value_enum, default_value = "none")]
        flaw: Flaw,
    },
    /// Names the scenarios.
    List,
    /// Combines the `run --json` output of campaign shards (files with one summary per line;
    /// other lines are skipped) into one report, with the replay command of every failing seed.
    Merge {
        /// Files holding the shards' JSON summaries (`-` for standard input).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// One merged JSON object per scenario on stdout instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Runs one scenario at several cluster sizes: one row per size with the host's cost (wall
    /// time, per simulated message) and the control plane's load (per simulated second, per
    /// member), and optionally an SVG plot of both against the size.
    Scale {
        /// Scenario name.
        #[arg(long, default_value = "member-crash")]
        scenario: String,
        /// Cluster sizes (members), comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "10,100,300,1000")]
        sizes: Vec<usize>,
        /// Seeds per size.
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        seed_start: u64,
        /// Seeds run at once (each large seed uses one core and its memory).
        #[arg(long, default_value_t = 1)]
        jobs: usize,
        /// Write an SVG plot of load and wall time against the size.
        #[arg(long)]
        svg: Option<PathBuf>,
        /// One JSON object per size on stdout instead of the table.
        #[arg(long)]
        json: bool,
        /// Run with a deliberate defect.
        #[arg(long, value_enum, default_value = "none")]
        flaw: Flaw,
    },
    /// Measures simulated-time speed-up of a scenario against a bare madsim baseline.
    Bench {
        /// Scenario name.
        #[arg(long, default_value = "member-crash")]
        scenario: String,
        /// Seeds of each.
        #[arg(long, default_value_t = 20)]
        seeds: u64,
    },
}

fn parse_shard(s: &str) -> Result<(u64, u64), String> {
    let (k, n) = s
        .split_once('/')
        .ok_or_else(|| format!("--shard: expected K/N, got {s:?}"))?;
    let (k, n): (u64, u64) = (
        k.parse().map_err(|_| format!("--shard: bad K in {s:?}"))?,
        n.parse().map_err(|_| format!("--shard: bad N in {s:?}"))?,
    );
    if n == 0 || k == 0 || k > n {
        return Err(format!("--shard: need 1 <= K <= N, got {s:?}"));
    }
    Ok((k, n))
}

fn scenarios(name: &str, members: Option<usize>) -> Result<Vec<Scenario>> {
    let resize = |list: Vec<Scenario>| -> Result<Vec<Scenario>> {
        let Some(n) = members else { return Ok(list) };
        list.into_iter()
            .map(|s| {
                s.with_members(n)
                    .map_err(|e| anyhow::anyhow!("--members: {e}"))
            })
            .collect()
    };
    if name == "all" {
        return resize(scenario::all());
    }
    match scenario::by_name(name) {
        Some(s) => resize(vec![s]),
        None => {
            let names: Vec<&str> = scenario::all()
                .iter()
                .chain(&scenario::known_failing())
                .map(|s| s.name)
                .collect();
            bail!(
                "--scenario: unknown scenario {name:?}; known: all, {}",
                names.join(", ")
            )
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn run(
    scenario: String,
    seeds: u64,
    members: Option<usize>,
    seed_start: u64,
    jobs: Option<usize>,
    shard: (u64, u64),
    json: bool,
    flaw: Flaw,
) -> Result<bool> {
    let jobs = jobs.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let c = Campaign {
        scenarios: scenarios(&scenario, members)?,
        seeds,
        seed_start,
        jobs,
        shard,
        flaw,
        progress: !json,
        recheck_every: 50,
    };
    let summaries = campaign::run(&c, |r| {
        if !r.passed() {
            eprintln!(
                "FAILED {} seed {}: {}",
                r.scenario, r.seed, r.recording.violations[0]
            );
            eprintln!("  schedule: {}", r.schedule.describe());
            eprintln!("  replay:   {}", r.replay_command());
        }
    });
    if json {
        for s in &summaries {
            println!("{}", serde_json::to_string(s)?);
        }
    } else {
        print!("{}", campaign::table(&summaries));
        print!("{}", campaign::paths_table(&summaries));
    }
    Ok(summaries.iter().all(|s| s.failures == 0))
}

fn merge(files: Vec<PathBuf>, json: bool) -> Result<bool> {
    let mut shards = Vec::new();
    let mut skipped = 0;
    for path in &files {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin()).context("reading standard input")?
        } else {
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?
        };
        let (found, skip) = shoal_sim::merge::parse(&text);
        if found.is_empty() {
            bail!(
                "{}: no campaign summary in it (expected `shoal-sim run --json` output)",
                path.display()
            );
        }
        shards.extend(found);
        skipped += skip;
    }
    let merged = shoal_sim::merge::merge(&shards);
    if json {
        for s in &merged {
            println!("{}", serde_json::to_string(s)?);
        }
    } else {
        println!(
            "{} shard summaries merged ({skipped} other lines skipped)",
            shards.len()
        );
        print!("{}", campaign::table(&merged));
        print!("{}", campaign::paths_table(&merged));
        for cmd in shoal_sim::merge::replay_commands(&merged) {
            println!("FAILED, replay: {cmd}");
        }
    }
    Ok(merged.iter().all(|s| s.failures == 0))
}

#[allow(clippy::too_many_arguments)]
fn replay(
    scenario: String,
    seed: u64,
    members: Option<usize>,
    once: bool,
    timeline_path: Option<PathBuf>,
    quiet: bool,
    schedule: Option<PathBuf>,
    flaw: Flaw,
) -> Result<bool> {
    if scenario == "all" {
        bail!("--scenario: replay takes one scenario name");
    }
    let s = scenarios(&scenario, members)?
        .into_iter()
        .next()
        .context("one scenario")?;
    let schedule = match schedule {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("--schedule: cannot read {}", path.display()))?;
            Some(serde_json::from_str(&text).with_context(|| {
                format!("--schedule: {} is not a fault schedule", path.display())
            })?)
        }
        None => None,
    };
    let opts = RunOptions {
        keep_trace: true,
        flaw,
        schedule,
        knobs: None,
    };
    let first = scenario::run_seed_isolated(&s, seed, &opts);
    let second = if once {
        first.clone()
    } else {
        scenario::run_seed_isolated(&s, seed, &opts)
    };
    if !quiet {
        for t in &first.recording.trace {
            println!(
                "{:>9.3}s {:<9} {}",
                t.at_ms as f64 / 1000.0,
                t.node,
                t.event
            );
        }
    }
    println!(
        "scenario {} seed {}: {}",
        s.name,
        seed,
        first.schedule.describe()
    );
    println!(
        "simulated {:.1}s, trace {} lines, digest {:016x}",
        first.sim_seconds,
        first.recording.trace.len(),
        first.recording.digest
    );
    let deterministic = first.recording.digest == second.recording.digest;
    if once {
        println!("run once (--once): determinism not checked");
    } else if deterministic {
        println!(
            "deterministic: a second run produced the same trace (digest {:016x})",
            second.recording.digest
        );
    } else {
        println!(
            "NOT DETERMINISTIC: a second run produced a different trace (digest {:016x} vs {:016x})",
            first.recording.digest, second.recording.digest
        );
        if let Some((i, (a, b))) = first
            .recording
            .trace
            .iter()
            .zip(&second.recording.trace)
            .enumerate()
            .find(|(_, (a, b))| a != b)
        {
            println!("  first difference at line {i}:\n    {a:?}\n    {b:?}");
        }
    }
    if let Some(path) = timeline_path {
        let title = format!("shoal-sim {} seed {}", s.name, seed);
        std::fs::write(&path, timeline::svg(&title, &first.recording))
            .with_context(|| format!("--timeline: cannot write {}", path.display()))?;
        println!("timeline written to {}", path.display());
    }
    if first.passed() {
        println!("PASSED: no checker fired");
    } else {
        println!("FAILED: {} violation(s):", first.recording.violations.len());
        for v in &first.recording.violations {
            println!("  {v}");
        }
    }
    Ok(first.passed() && deterministic)
}

#[allow(clippy::too_many_arguments)]
fn scale(
    scenario: String,
    sizes: Vec<usize>,
    seeds: u64,
    seed_start: u64,
    jobs: usize,
    svg: Option<PathBuf>,
    json: bool,
    flaw: Flaw,
) -> Result<bool> {
    if scenario == "all" {
        bail!("--scenario: scale takes one scenario name");
    }
    if sizes.is_empty() {
        bail!("--sizes: name at least one size");
    }
    if seeds == 0 {
        bail!("--seeds must be at least 1");
    }
    if jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let s = scenarios(&scenario, None)?
        .into_iter()
        .next()
        .context("one scenario")?;
    // Every size is checked before anything runs.
    for &n in &sizes {
        s.clone()
            .with_members(n)
            .map_err(|e| anyhow::anyhow!("--sizes: {e}"))?;
    }
    if !json {
        println!("{}", shoal_sim::scale::header());
    }
    let rows = shoal_sim::scale::run(&s, &sizes, seeds, seed_start, jobs, flaw, |row| {
        if json {
            println!("{}", serde_json::to_string(row).unwrap_or_default());
        } else {
            println!("{}", shoal_sim::scale::line(row));
        }
        for v in &row.first_violations {
            eprintln!("FAILED at {} members: {v}", row.members);
        }
    })
    .map_err(|e| anyhow::anyhow!("--sizes: {e}"))?;
    if !json {
        println!("{}", shoal_sim::scale::LEGEND);
    }
    if let Some(path) = svg {
        let title = format!("shoal-sim scale {} (seeds {seed_start}..)", s.name);
        std::fs::write(&path, shoal_sim::scale::svg(&title, &rows))
            .with_context(|| format!("--svg: cannot write {}", path.display()))?;
        eprintln!("plot written to {}", path.display());
    }
    Ok(rows.iter().all(|r| r.failures == 0))
}

pub fn main() -> ExitCode {
    if std::env::var_os("RUST_LOG").is_some() {
        // Product logs (RUST_LOG=shoal=debug), on stderr; the trace keeps simulated times.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .without_time()
            .try_init();
    }
    let result = match Cli::parse().command {
        Command::Run {
            scenario,
            seeds,
            members,
            seed_start,
            jobs,
            shard,
            json,
            flaw,
        } => run(
            scenario, seeds, members, seed_start, jobs, shard, json, flaw,
        ),
        Command::Replay {
            scenario,
            seed,
            members,
            once,
            timeline,
            quiet,
            schedule,
            flaw,
        } => replay(
            scenario, seed, members, once, timeline, quiet, schedule, flaw,
        ),
        Command::Merge { files, json } => merge(files, json),
        Command::Scale {
            scenario,
            sizes,
            seeds,
            seed_start,
            jobs,
            svg,
            json,
            flaw,
        } => scale(scenario, sizes, seeds, seed_start, jobs, svg, json, flaw),
        Command::List => {
            // Written, not printed: `shoal-sim list | head` closes the pipe early, which
            // ends the listing quietly instead of panicking.
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let listed = (|| -> std::io::Result<()> {
                for s in scenario::all() {
                    writeln!(out, "{:<19} {}", s.name, s.about)?;
                }
                writeln!(out, "\nknown to fail today (not in the default campaign):")?;
                for s in scenario::known_failing() {
                    writeln!(
                        out,
                        "{:<19} {}\n{:<19} why: {}",
                        s.name,
                        s.about,
                        "",
                        s.known_failure.unwrap_or("")
                    )?;
                }
                out.flush()
            })();
            match listed {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    Err(anyhow::anyhow!("writing the list: {e}"))
                }
                _ => Ok(true),
            }
        }
        Command::Bench { scenario, seeds } => scenarios(&scenario, None).map(|s| {
            let (full, base) = bench::compare(&s[0], seeds);
            println!(
                "{:<34} {:>6} {:>9} {:>10} {:>8} {:>9} {:>8}",
                "run", "seeds", "sim_s", "messages", "wall_s", "speedup", "seeds/s"
            );
            for x in [&full, &base] {
                println!(
                    "{:<34} {:>6} {:>9.0} {:>10} {:>8.2} {:>9.0} {:>8.1}",
                    x.what,
                    x.seeds,
                    x.sim_seconds,
                    x.messages,
                    x.wall_seconds,
                    x.speedup,
                    x.seeds_per_second
                );
            }
            println!(
                "full stack keeps {:.0}% of the bare baseline's speed",
                100.0 * full.speedup / base.speedup.max(1e-9)
            );
            true
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("shoal-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}
