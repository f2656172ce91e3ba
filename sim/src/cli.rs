//! Command-line shell of `shoal-sim`.

use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use shoal_sim::demo;

#[derive(Parser)]
#[command(
    name = "shoal-sim",
    about = "Deterministic simulation of Shoal clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the demo scenario (five in-memory members, one crashed and restarted) over a range
    /// of seeds and prints a summary.
    Run {
        /// Number of seeds.
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// First seed.
        #[arg(long, default_value_t = 1)]
        seed_start: u64,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { seeds, seed_start } => {
            let wall = Instant::now();
            let mut failures = Vec::new();
            let mut failovers = Vec::new();
            let mut sim = 0.0;
            for seed in seed_start..seed_start + seeds {
                let out = demo::run(seed);
                sim += out.sim_seconds;
                if let Some(f) = out.failover {
                    failovers.push(f.as_secs_f64() * 1000.0);
                }
                if !out.violations.is_empty() {
                    eprintln!("seed {seed} FAILED:");
                    for v in &out.violations {
                        eprintln!("  {v}");
                    }
                    failures.push(seed);
                }
            }
            failovers.sort_by(f64::total_cmp);
            let wall = wall.elapsed().as_secs_f64();
            let p = |q: f64| {
                failovers
                    .get(((failovers.len() as f64 - 1.0) * q).round() as usize)
                    .copied()
                    .unwrap_or(f64::NAN)
            };
            println!(
                "scenario        seeds  failures  sim_s    wall_s  speedup  failover_p50_ms  failover_p99_ms"
            );
            println!(
                "demo-crash  {seeds:>9}  {:>8}  {sim:>6.1}  {wall:>6.2}  {:>7.0}  {:>15.0}  {:>15.0}",
                failures.len(),
                sim / wall.max(1e-9),
                p(0.5),
                p(0.99)
            );
            if failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
