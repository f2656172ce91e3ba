//! `shoal-sim scale`: one scenario at several cluster sizes, one row per size: what the run cost
//! the host (wall time, and wall time per simulated network message, which must stay flat as
//! the cluster grows) and what it cost the control plane (requests, watch messages and bytes
//! per simulated second of the fault phase, per member), with failover times. An SVG plots both
//! against the size on log-log axes, so a quadratic term shows as a steeper line.

use std::fmt::Write;

use serde::Serialize;

use crate::flaw::Flaw;
use crate::load::Load;
use crate::scenario::{RunOptions, Scenario, run_seed_isolated};
use crate::wallclock::Stopwatch;

/// One size's results, averaged over its seeds.
#[derive(Clone, Debug, Serialize)]
pub struct ScaleRow {
    /// Scenario name.
    pub scenario: String,
    /// Members.
    pub members: usize,
    /// Seeds run.
    pub seeds: usize,
    /// Seeds that failed.
    pub failures: usize,
    /// The first violation of each failing seed.
    pub first_violations: Vec<String>,
    /// Host wall seconds per seed.
    pub wall_seconds: f64,
    /// Simulated seconds per seed.
    pub sim_seconds: f64,
    /// Network messages per seed.
    pub messages: f64,
    /// Host microseconds per simulated message.
    pub us_per_message: f64,
    /// The control plane's load over the fault phase (mean over seeds).
    pub load: Option<Load>,
    /// Failover times (crash to removal on every survivor), ms: median and maximum.
    pub failover_p50_ms: Option<u64>,
    /// Maximum.
    pub failover_max_ms: Option<u64>,
}

/// Runs `seeds` seeds of `scenario` at each of `sizes`, `jobs` at a time.
pub fn run(
    scenario: &Scenario,
    sizes: &[usize],
    seeds: u64,
    seed_start: u64,
    jobs: usize,
    flaw: Flaw,
    mut on_row: impl FnMut(&ScaleRow),
) -> Result<Vec<ScaleRow>, String> {
    let mut rows = Vec::new();
    for &n in sizes {
        let sized = scenario.clone().with_members(n)?;
        let opts = RunOptions {
            flaw,
            ..RunOptions::default()
        };
        let list: Vec<u64> = (seed_start..seed_start + seeds).collect();
        let results = std::sync::Mutex::new(Vec::new());
        let next = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..jobs.max(1) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let Some(&seed) = list.get(i) else { break };
                        let wall = Stopwatch::start();
                        let r = run_seed_isolated(&sized, seed, &opts);
                        let secs = wall.secs();
                        results.lock().unwrap().push((r, secs));
                    }
                });
            }
        });
        let mut results = results.into_inner().unwrap();
        results.sort_by_key(|(r, _)| r.seed);
        let k = results.len().max(1) as f64;
        let wall: f64 = results.iter().map(|(_, w)| w).sum::<f64>() / k;
        let sim: f64 = results.iter().map(|(r, _)| r.sim_seconds).sum::<f64>() / k;
        let messages: f64 = results.iter().map(|(r, _)| r.messages as f64).sum::<f64>() / k;
        let mut failovers: Vec<u64> = results
            .iter()
            .flat_map(|(r, _)| r.recording.failovers.iter().map(|d| d.as_millis() as u64))
            .collect();
        failovers.sort_unstable();
        let loads: Vec<Load> = results.iter().filter_map(|(r, _)| r.load.clone()).collect();
        let row = ScaleRow {
            scenario: scenario.name.to_string(),
            members: n,
            seeds: results.len(),
            failures: results.iter().filter(|(r, _)| !r.passed()).count(),
            first_violations: results
                .iter()
                .filter(|(r, _)| !r.passed())
                .map(|(r, _)| format!("seed {}: {}", r.seed, r.recording.violations[0]))
                .collect(),
            wall_seconds: wall,
            sim_seconds: sim,
            messages,
            us_per_message: wall * 1e6 / messages.max(1.0),
            load: Load::mean(&loads),
            failover_p50_ms: failovers.get(failovers.len() / 2).copied(),
            failover_max_ms: failovers.last().copied(),
        };
        on_row(&row);
        rows.push(row);
    }
    Ok(rows)
}

/// The table header.
pub fn header() -> String {
    format!(
        "{:<20} {:>7} {:>5} {:>5} {:>9} {:>7} {:>11} {:>8} {:>9} {:>10} {:>9} {:>10} {:>7} {:>7} {:>7}",
        "scenario",
        "members",
        "seeds",
        "fail",
        "wall_s",
        "sim_s",
        "messages",
        "us/msg",
        "req/s",
        "ev/s",
        "ev/m/s",
        "B/m/s",
        "relist",
        "fo_p50",
        "fo_max"
    )
}

/// One row of the table.
pub fn line(r: &ScaleRow) -> String {
    let ms = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
    let l = r.load.clone().unwrap_or_default();
    format!(
        "{:<20} {:>7} {:>5} {:>5} {:>9.2} {:>7.0} {:>11.0} {:>8.2} {:>9.1} {:>10.1} {:>9.2} {:>10.0} {:>7} {:>7} {:>7}",
        r.scenario,
        r.members,
        r.seeds,
        r.failures,
        r.wall_seconds,
        r.sim_seconds,
        r.messages,
        r.us_per_message,
        l.requests_per_s,
        l.events_per_s,
        l.events_per_member_per_s,
        l.bytes_per_member_per_s,
        l.relists,
        ms(r.failover_p50_ms),
        ms(r.failover_max_ms)
    )
}

/// What the columns mean.
pub const LEGEND: &str = "(per seed; us/msg = host microseconds per simulated network message; req/s, ev/s = requests and watch messages the control plane served per simulated second of the fault phase; ev/m/s and B/m/s per member; relist = full lists served in the fault phase; fo = failover, crash to removal on every survivor, ms)";

/// An SVG with two log-log panels against the number of members: the control plane's load per
/// member (watch messages, requests, and kilobytes per member per second) and the host's cost
/// (wall seconds per seed, microseconds per message).
pub fn svg(title: &str, rows: &[ScaleRow]) -> String {
    const W: f64 = 980.0;
    const H: f64 = 420.0;
    const PANEL: f64 = 440.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="monospace" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="18" font-size="14">{}</text>"#,
        escape(title)
    );
    let load = |f: fn(&Load) -> f64| -> Vec<(f64, f64)> {
        rows.iter()
            .filter_map(|r| Some((r.members as f64, f(r.load.as_ref()?))))
            .collect()
    };
    panel(
        &mut out,
        40.0,
        "control plane load per member per second",
        &[
            (
                "watch messages",
                "#c0392b",
                load(|l| l.events_per_member_per_s),
            ),
            (
                "requests",
                "#2471a3",
                load(|l| l.requests_per_s / l.members.max(1) as f64),
            ),
            ("KB", "#7d3c98", load(|l| l.bytes_per_member_per_s / 1e3)),
        ],
        PANEL,
    );
    panel(
        &mut out,
        40.0 + PANEL + 60.0,
        "host cost",
        &[
            (
                "wall s per seed",
                "#117a65",
                rows.iter()
                    .map(|r| (r.members as f64, r.wall_seconds))
                    .collect(),
            ),
            (
                "us per message",
                "#b9770e",
                rows.iter()
                    .map(|r| (r.members as f64, r.us_per_message))
                    .collect(),
            ),
        ],
        PANEL,
    );
    out.push_str("</svg>\n");
    out
}

/// A named, coloured line of (x, y) points.
type Series<'a> = (&'a str, &'a str, Vec<(f64, f64)>);

/// One log-log panel at `left`, `width` wide.
fn panel(out: &mut String, left: f64, title: &str, series: &[Series<'_>], width: f64) {
    let (top, height) = (60.0, 280.0);
    let points: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().copied())
        .filter(|(x, y)| *x > 0.0 && *y > 0.0)
        .collect();
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="{}" font-size="12">{}</text>"#,
        top - 12.0,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<rect x="{left}" y="{top}" width="{width}" height="{height}" fill="none" stroke="#999"/>"##
    );
    if points.is_empty() {
        return;
    }
    let decades = |v: &mut dyn Iterator<Item = f64>| -> (f64, f64) {
        let (lo, hi) = v.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        (
            lo.log10().floor(),
            hi.log10().ceil().max(lo.log10().floor() + 1.0),
        )
    };
    let (x0, x1) = decades(&mut points.iter().map(|p| p.0));
    let (y0, y1) = decades(&mut points.iter().map(|p| p.1));
    let px = |x: f64| left + (x.log10() - x0) / (x1 - x0) * width;
    let py = |y: f64| top + height - (y.log10() - y0) / (y1 - y0) * height;
    for d in x0 as i32..=x1 as i32 {
        let x = px(10f64.powi(d));
        let _ = writeln!(
            out,
            r##"<line x1="{x:.1}" y1="{top}" x2="{x:.1}" y2="{}" stroke="#eee"/><text x="{x:.1}" y="{}" text-anchor="middle" fill="#555">{}</text>"##,
            top + height,
            top + height + 14.0,
            10f64.powi(d)
        );
    }
    for d in y0 as i32..=y1 as i32 {
        let y = py(10f64.powi(d));
        let _ = writeln!(
            out,
            r##"<line x1="{left}" y1="{y:.1}" x2="{}" y2="{y:.1}" stroke="#eee"/><text x="{}" y="{:.1}" text-anchor="end" fill="#555">{}</text>"##,
            left + width,
            left - 4.0,
            y + 4.0,
            10f64.powi(d)
        );
    }
    let _ = writeln!(
        out,
        r##"<text x="{}" y="{}" text-anchor="middle" fill="#555">members</text>"##,
        left + width / 2.0,
        top + height + 30.0
    );
    for (k, (name, colour, pts)) in series.iter().enumerate() {
        let pts: Vec<&(f64, f64)> = pts.iter().filter(|(x, y)| *x > 0.0 && *y > 0.0).collect();
        let path: Vec<String> = pts
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
            path.join(" ")
        );
        for (x, y) in &pts {
            let _ = writeln!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="{colour}"/>"#,
                px(*x),
                py(*y)
            );
        }
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" fill="{colour}">{}</text>"#,
            left + 8.0,
            top + height + 48.0 + 14.0 * k as f64,
            escape(name)
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
