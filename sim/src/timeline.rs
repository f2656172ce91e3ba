//! An SVG timeline of one run: each node's view of the membership over simulated time, with
//! the faults marked.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::record::Recording;

const LEFT: f64 = 90.0;
const ROW: f64 = 34.0;
const WIDTH: f64 = 1100.0;

/// Renders `rec` (which must have been recorded with the trace kept) as an SVG document.
pub fn svg(title: &str, rec: &Recording) -> String {
    let end_ms = rec
        .views
        .iter()
        .map(|v| v.at_ms)
        .chain(rec.faults.iter().map(|f| f.to_ms.unwrap_or(f.from_ms)))
        .chain(rec.trace.last().map(|t| t.at_ms))
        .max()
        .unwrap_or(1)
        .max(1);
    let mut nodes: Vec<String> = rec.views.iter().map(|v| v.node.clone()).collect();
    nodes.sort_by_key(|n| {
        (
            n.starts_with("client"),
            n.trim_start_matches(|c: char| c.is_alphabetic())
                .parse::<u32>()
                .unwrap_or(0),
        )
    });
    nodes.dedup();
    let fault_rows = rec.faults.len().min(12);
    let top = 50.0 + fault_rows as f64 * 16.0;
    let height = top + nodes.len() as f64 * ROW + 50.0;
    let x = |ms: u64| LEFT + (ms as f64 / end_ms as f64) * (WIDTH - LEFT - 20.0);
    let max_members = rec
        .views
        .iter()
        .map(|v| v.members)
        .max()
        .unwrap_or(1)
        .max(1);
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" font-family="monospace" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="10" y="18" font-size="14">{}</text>"#,
        escape(title)
    );
    let _ = writeln!(
        out,
        r##"<text x="10" y="34" fill="#555">bar height = members in the node's view; colour changes with the version; dashed = down; red = faults</text>"##
    );
    // Faults: a labelled span each, plus a shaded band over the node rows.
    for (i, f) in rec.faults.iter().take(fault_rows).enumerate() {
        let (x0, x1) = (
            x(f.from_ms),
            x(f.to_ms.unwrap_or(end_ms)).max(x(f.from_ms) + 2.0),
        );
        let y = 44.0 + i as f64 * 16.0;
        let _ = writeln!(
            out,
            r##"<rect x="{x0:.1}" y="{y:.1}" width="{:.1}" height="12" fill="#d33" opacity="0.8"/>"##,
            x1 - x0
        );
        let _ = writeln!(
            out,
            r##"<text x="{:.1}" y="{:.1}" fill="#900">{}</text>"##,
            x0 + 3.0,
            y + 10.0,
            escape(&f.what)
        );
        let _ = writeln!(
            out,
            r##"<rect x="{x0:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="#d33" opacity="0.07"/>"##,
            x1 - x0,
            nodes.len() as f64 * ROW
        );
    }
    let mut per_node: BTreeMap<&str, Vec<&crate::record::ViewPoint>> = BTreeMap::new();
    for v in &rec.views {
        per_node.entry(&v.node).or_default().push(v);
    }
    for (row, node) in nodes.iter().enumerate() {
        let y = top + row as f64 * ROW;
        let _ = writeln!(
            out,
            r#"<text x="10" y="{:.1}">{}</text>"#,
            y + ROW / 2.0 + 4.0,
            escape(node)
        );
        let _ = writeln!(
            out,
            r##"<line x1="{LEFT}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="#ddd"/>"##,
            y + ROW - 4.0,
            WIDTH - 20.0,
            y + ROW - 4.0
        );
        let points = per_node.get(node.as_str()).cloned().unwrap_or_default();
        for (i, v) in points.iter().enumerate() {
            let next = points.get(i + 1).map_or(end_ms, |n| n.at_ms);
            let (x0, x1) = (x(v.at_ms), x(next));
            if v.version == 0 && v.members == 0 {
                // Down: a dashed grey line until the next view.
                let _ = writeln!(
                    out,
                    r##"<line x1="{x0:.1}" y1="{:.1}" x2="{x1:.1}" y2="{:.1}" stroke="#999" stroke-dasharray="3,3"><title>{node} down from {:.3}s</title></line>"##,
                    y + ROW - 8.0,
                    y + ROW - 8.0,
                    v.at_ms as f64 / 1000.0
                );
                continue;
            }
            let h = (ROW - 8.0) * v.members as f64 / max_members as f64;
            let hue = (v.version.wrapping_mul(2_654_435_761) % 360) as u32;
            let _ = writeln!(
                out,
                r#"<rect x="{x0:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" fill="hsl({hue},55%,60%)"><title>{node} v{} {} members from {:.3}s</title></rect>"#,
                y + ROW - 4.0 - h,
                (x1 - x0).max(0.5),
                v.version,
                v.members,
                v.at_ms as f64 / 1000.0
            );
        }
    }
    // Time axis.
    let axis_y = top + nodes.len() as f64 * ROW + 16.0;
    let step = [1_000u64, 5_000, 10_000, 20_000, 30_000]
        .into_iter()
        .find(|s| end_ms / s <= 14)
        .unwrap_or(60_000);
    let mut t = 0;
    while t <= end_ms {
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{axis_y:.1}" text-anchor="middle">{}s</text>"#,
            x(t),
            t / 1000
        );
        t += step;
    }
    out.push_str("</svg>\n");
    out
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
