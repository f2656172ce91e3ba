//! Failover latency, measured from what the nodes applied: from a member's crash to the moment
//! no surviving node lists it any more.
//!
//! Event-driven: each view a node applies updates the set of nodes still listing each departed
//! member (O(departed) per view, not a poll of every node), and a node that dies leaves every
//! set. A paused node keeps listing what it listed until it applies something new, as it does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use madsim::time::Instant;
use shoal::{ClusterTopology, MemberId};

use crate::record::Recorder;

/// Departed members not yet gone from every survivor's view.
#[derive(Debug)]
pub struct FailoverMeter {
    rec: Recorder,
    pending: Mutex<BTreeMap<MemberId, Pending>>,
}

#[derive(Debug)]
struct Pending {
    since: Instant,
    /// Nodes (by index) whose latest view lists the member.
    listing: BTreeSet<usize>,
}

impl FailoverMeter {
    /// A meter recording into `rec`.
    pub fn new(rec: Recorder) -> Self {
        Self {
            rec,
            pending: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<MemberId, Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Member `id` crashed now; `listing` are the live nodes whose view lists it.
    pub fn departed(&self, id: MemberId, listing: BTreeSet<usize>) {
        let since = Instant::now();
        if listing.is_empty() {
            self.done(&id, since);
            return;
        }
        self.lock().insert(id, Pending { since, listing });
    }

    /// Node `node` applied `t`.
    pub fn applied(&self, node: usize, t: &ClusterTopology) {
        let finished: Vec<(MemberId, Instant)> = {
            let mut pending = self.lock();
            if pending.is_empty() {
                return;
            }
            for (id, p) in pending.iter_mut() {
                if t.contains(id) {
                    p.listing.insert(node);
                } else {
                    p.listing.remove(&node);
                }
            }
            take_finished(&mut pending)
        };
        for (id, since) in finished {
            self.done(&id, since);
        }
    }

    /// Node `node`'s process ended (it lists nothing any more).
    pub fn node_down(&self, node: usize) {
        let finished = {
            let mut pending = self.lock();
            for p in pending.values_mut() {
                p.listing.remove(&node);
            }
            take_finished(&mut pending)
        };
        for (id, since) in finished {
            self.done(&id, since);
        }
    }

    fn done(&self, id: &MemberId, since: Instant) {
        let d = since.elapsed();
        self.rec.failover(d);
        self.rec.trace(
            "harness",
            format!("failover of {id} complete after {} ms", d.as_millis()),
        );
    }
}

fn take_finished(pending: &mut BTreeMap<MemberId, Pending>) -> Vec<(MemberId, Instant)> {
    let done: Vec<MemberId> = pending
        .iter()
        .filter(|(_, p)| p.listing.is_empty())
        .map(|(id, _)| id.clone())
        .collect();
    done.into_iter()
        .filter_map(|id| pending.remove(&id).map(|p| (id, p.since)))
        .collect()
}
