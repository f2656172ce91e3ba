//! The load budget oracle: every window of the fault phase, what the control plane served
//! (counted at its door) must stay within what the provider's design allows
//! ([`crate::load::LoadBudget`]) for the nodes that ran, the membership changes the backend
//! accepted or made, and the reconnects the faults forced, all as the harness saw them. A
//! quadratic fan-out or a relist storm fails the seed here, at any size, instead of only
//! making it slow.

use std::sync::Arc;
use std::time::Duration;

use madsim::time::{Instant, sleep};

use crate::cluster::SimCluster;
use crate::load::{self, LoadCounts, Window};

/// How long one judged window lasts.
pub const WINDOW: Duration = Duration::from_secs(15);

/// Judges every [`WINDOW`] from now until `until`. A window's allowance also counts the
/// changes and reconnects of the window before it (their traffic can land in the next one).
pub async fn judge_windows(cluster: Arc<SimCluster>, until: Instant) {
    let budget = cluster.control().budget();
    let snapshot = |c: &SimCluster| -> (Instant, LoadCounts, u64, u64) {
        (
            Instant::now(),
            c.load(),
            c.oracles().changes(),
            c.reconnects(),
        )
    };
    let mut prev = snapshot(&cluster);
    let (mut prev_changes, mut prev_reconnects) = (0, 0);
    loop {
        let now = Instant::now();
        if now >= until {
            return;
        }
        sleep(WINDOW.min(until - now)).await;
        let next = snapshot(&cluster);
        let served = next.1.since(&prev.1);
        // Reconnects the faults forced, and those the door provoked on purpose.
        let (changes, reconnects) = (next.2 - prev.2, next.3 - prev.3 + served.provoked);
        let w = Window {
            length: next.0 - prev.0,
            nodes: cluster.node_count(),
            members: cluster.member_count(),
            changes: changes + prev_changes,
            reconnects: reconnects + prev_reconnects,
        };
        for v in load::judge(&budget, &w, &served) {
            cluster
                .recorder()
                .violation_once(format!("budget {}", cluster.control().name()), v);
        }
        (prev_changes, prev_reconnects) = (changes, reconnects);
        prev = next;
    }
}
