//! The network links between simulated nodes: clogs with a count per directed link, so
//! overlapping faults compose and each heals only its own share.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use madsim::net::NetSim;
use madsim::task::NodeId;

/// Directed links currently clogged, with how many active faults clog each.
#[derive(Debug, Default)]
pub struct Links {
    clogged: Mutex<BTreeMap<(NodeId, NodeId), u32>>,
}

impl Links {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<(NodeId, NodeId), u32>> {
        self.clogged.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Clogs every link of `links` (once more, for those already clogged).
    pub fn clog(&self, links: &[(NodeId, NodeId)]) {
        let net = NetSim::current();
        let mut clogged = self.lock();
        for &(a, b) in links {
            let n = clogged.entry((a, b)).or_insert(0);
            if *n == 0 {
                net.clog_link(a, b);
            }
            *n += 1;
        }
    }

    /// Takes back one clog of every link of `links`.
    pub fn unclog(&self, links: &[(NodeId, NodeId)]) {
        let net = NetSim::current();
        let mut clogged = self.lock();
        for link in links {
            if let Some(n) = clogged.get_mut(link) {
                *n -= 1;
                if *n == 0 {
                    clogged.remove(link);
                    net.unclog_link(link.0, link.1);
                }
            }
        }
    }

    /// Whether `a -> b` or `b -> a` is clogged.
    pub fn either_way(&self, a: NodeId, b: NodeId) -> bool {
        let clogged = self.lock();
        clogged.contains_key(&(a, b)) || clogged.contains_key(&(b, a))
    }

    /// Unclogs everything.
    pub fn heal(&self) {
        let net = NetSim::current();
        for ((a, b), _) in std::mem::take(&mut *self.lock()) {
            net.unclog_link(a, b);
        }
    }
}

/// Both directions between every node of `group` and every node of `all` outside it.
pub fn cut(group: &BTreeSet<NodeId>, all: &[NodeId]) -> Vec<(NodeId, NodeId)> {
    let mut links = Vec::new();
    for &a in group {
        for &b in all.iter().filter(|b| !group.contains(b)) {
            links.push((a, b));
            links.push((b, a));
        }
    }
    links
}
