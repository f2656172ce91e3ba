//! What a simulated control plane serves, counted at its door: requests by verb, watch events
//! delivered, objects returned by lists, bytes out, relists. Each control plane owns one
//! [`LoadMeter`]; the harness reads it at the start and the end of the fault phase and reports
//! the rates ([`Load`]) per simulated second, per member.
//!
//! [`LoadBudget`] is what a provider's design says the control plane should carry; the budget
//! checker ([`judge`]) fails a window whose load exceeds it, so a quadratic fan-out or a relist
//! storm is a red seed, not a slow one.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Counters a control plane's door keeps (cumulative since it was created).
#[derive(Debug, Default)]
pub struct LoadMeter {
    counts: Mutex<LoadCounts>,
}

/// A snapshot of a [`LoadMeter`].
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadCounts {
    /// Requests answered (or refused), by verb.
    pub requests: BTreeMap<String, u64>,
    /// Watch messages delivered (one per event, bookmark or progress message on a watch).
    pub watch_events: u64,
    /// Objects returned by lists and snapshots (a relist of N members counts N).
    pub list_items: u64,
    /// Bytes the control plane sent (responses and watch messages; an estimate of the real
    /// encoding where the simulation carries no bytes, see the control plane's module).
    pub bytes_out: u64,
    /// Full lists served (a list, a range, a registry snapshot sent to a watcher that asked
    /// from nothing).
    pub relists: u64,
    /// Reconnects the door provoked on purpose, by sending out-of-contract watch messages (an
    /// update dropped, an older snapshot): each costs a watcher the reconnect a fault would,
    /// and the load budget allows for it like one.
    #[serde(default)]
    pub provoked: u64,
}

impl LoadCounts {
    /// Requests of every verb.
    pub fn total_requests(&self) -> u64 {
        self.requests.values().sum()
    }

    /// What was counted between `earlier` and `self`.
    pub fn since(&self, earlier: &LoadCounts) -> LoadCounts {
        LoadCounts {
            requests: self
                .requests
                .iter()
                .map(|(verb, n)| {
                    let before = earlier.requests.get(verb).copied().unwrap_or(0);
                    (verb.clone(), n.saturating_sub(before))
                })
                .filter(|(_, n)| *n > 0)
                .collect(),
            watch_events: self.watch_events.saturating_sub(earlier.watch_events),
            list_items: self.list_items.saturating_sub(earlier.list_items),
            bytes_out: self.bytes_out.saturating_sub(earlier.bytes_out),
            relists: self.relists.saturating_sub(earlier.relists),
            provoked: self.provoked.saturating_sub(earlier.provoked),
        }
    }
}

impl LoadMeter {
    fn with(&self, f: impl FnOnce(&mut LoadCounts)) {
        f(&mut self.counts.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// One request of `verb` answered, `bytes` sent back.
    pub fn request(&self, verb: &'static str, bytes: usize) {
        self.with(|c| {
            match c.requests.get_mut(verb) {
                Some(n) => *n += 1,
                None => {
                    c.requests.insert(verb.to_string(), 1);
                }
            }
            c.bytes_out += bytes as u64;
        });
    }

    /// A list (or snapshot) of `items` objects, `bytes` long, was sent.
    pub fn listed(&self, items: usize, bytes: usize) {
        self.with(|c| {
            c.relists += 1;
            c.list_items += items as u64;
            c.bytes_out += bytes as u64;
        });
    }

    /// A page after the first of a list (a continuation), `items` objects, `bytes` long: its
    /// objects and bytes count, the list was counted with its first page.
    pub fn list_page(&self, items: usize, bytes: usize) {
        self.with(|c| {
            c.list_items += items as u64;
            c.bytes_out += bytes as u64;
        });
    }

    /// A snapshot of `items` objects (a watch message that lists everything), `bytes` long,
    /// was delivered on a watch.
    pub fn snapshot_sent(&self, items: usize, bytes: usize) {
        self.with(|c| {
            c.watch_events += 1;
            c.relists += 1;
            c.list_items += items as u64;
            c.bytes_out += bytes as u64;
        });
    }

    /// The door sent an out-of-contract message that makes its watcher reconnect.
    pub fn provoked(&self) {
        self.with(|c| c.provoked += 1);
    }

    /// `bytes` were sent that count as no message of their own (a fragment of a snapshot
    /// counted whole when its last fragment goes).
    pub fn bytes(&self, bytes: usize) {
        self.with(|c| c.bytes_out += bytes as u64);
    }

    /// One watch message of `bytes` was delivered.
    pub fn event(&self, bytes: usize) {
        self.with(|c| {
            c.watch_events += 1;
            c.bytes_out += bytes as u64;
        });
    }

    /// Everything counted so far.
    pub fn counts(&self) -> LoadCounts {
        self.counts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Load over a window, per simulated second: what the JSON row and the table report.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Load {
    /// Members in the cluster.
    pub members: usize,
    /// Length of the window, simulated seconds.
    pub seconds: f64,
    /// Requests per second (all verbs).
    pub requests_per_s: f64,
    /// Requests per second, by verb.
    pub requests_by_verb_per_s: BTreeMap<String, f64>,
    /// Watch messages delivered per second.
    pub events_per_s: f64,
    /// Watch messages delivered per member per second.
    pub events_per_member_per_s: f64,
    /// Objects returned by lists per second.
    pub list_items_per_s: f64,
    /// Bytes sent per second.
    pub bytes_per_s: f64,
    /// Bytes sent per member per second.
    pub bytes_per_member_per_s: f64,
    /// Full lists served in the window.
    pub relists: u64,
}

impl Load {
    /// The rates of `counts`, counted over `window` in a cluster of `members`.
    pub fn of(counts: &LoadCounts, window: Duration, members: usize) -> Self {
        let s = window.as_secs_f64().max(1e-9);
        let per = |n: u64| n as f64 / s;
        let m = members.max(1) as f64;
        Load {
            members,
            seconds: window.as_secs_f64(),
            requests_per_s: per(counts.total_requests()),
            requests_by_verb_per_s: counts
                .requests
                .iter()
                .map(|(v, n)| (v.clone(), per(*n)))
                .collect(),
            events_per_s: per(counts.watch_events),
            events_per_member_per_s: per(counts.watch_events) / m,
            list_items_per_s: per(counts.list_items),
            bytes_per_s: per(counts.bytes_out),
            bytes_per_member_per_s: per(counts.bytes_out) / m,
            relists: counts.relists,
        }
    }

    /// The mean of several seeds' loads (`None` for none).
    pub fn mean(loads: &[Load]) -> Option<Load> {
        let weighted: Vec<(&Load, f64)> = loads.iter().map(|l| (l, 1.0)).collect();
        Self::weighted_mean(&weighted)
    }

    /// The mean of loads, each counted `weight` times (merged shards: by their seeds).
    pub fn weighted_mean(loads: &[(&Load, f64)]) -> Option<Load> {
        let total: f64 = loads.iter().map(|(_, w)| w).sum();
        if loads.is_empty() || total <= 0.0 {
            return None;
        }
        let avg =
            |f: &dyn Fn(&Load) -> f64| loads.iter().map(|(l, w)| f(l) * w).sum::<f64>() / total;
        let mut verbs: BTreeMap<String, f64> = BTreeMap::new();
        for (l, w) in loads {
            for (v, r) in &l.requests_by_verb_per_s {
                *verbs.entry(v.clone()).or_default() += r * w / total;
            }
        }
        Some(Load {
            members: loads[0].0.members,
            seconds: avg(&|l| l.seconds),
            requests_per_s: avg(&|l| l.requests_per_s),
            requests_by_verb_per_s: verbs,
            events_per_s: avg(&|l| l.events_per_s),
            events_per_member_per_s: avg(&|l| l.events_per_member_per_s),
            list_items_per_s: avg(&|l| l.list_items_per_s),
            bytes_per_s: avg(&|l| l.bytes_per_s),
            bytes_per_member_per_s: avg(&|l| l.bytes_per_member_per_s),
            relists: avg(&|l| l.relists as f64).round() as u64,
        })
    }
}

/// What a provider's design says its control plane carries, stated per node, per member and
/// per event so it holds at any size. A window's allowance is, for each quantity,
///
/// ```text
/// allowed = window * nodes * (steady rate + per-member rate * members)
///         + changes * per-change (* nodes, for what every watcher receives)
///         + reconnects * per-reconnect
/// ```
///
/// all times `slack`, where *changes* are membership changes the backend accepted or made
/// (join, leave, expiry, new description) and *reconnects* are nodes that had to reopen their
/// watches (a crash or restart of the node or of the control plane, a cut, a stream reset). A
/// list counts `members + 1` objects. The per-member terms are where a design's quadratic
/// fan-out shows: a design whose steady watch traffic does not grow with the cluster states 0
/// there.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoadBudget {
    /// Requests per node per second in steady state.
    pub requests_per_node_per_s: f64,
    /// Requests per membership change.
    pub requests_per_change: f64,
    /// Requests per node reconnect.
    pub requests_per_reconnect: f64,
    /// Watch messages per watcher per second in steady state.
    pub events_per_watcher_per_s: f64,
    /// Watch messages per watcher per member per second in steady state (a design where every
    /// member's renewal reaches every watcher).
    pub events_per_watcher_per_member_per_s: f64,
    /// Watch messages per membership change, per watcher.
    pub events_per_change_per_watcher: f64,
    /// Watch messages per node reconnect.
    pub events_per_reconnect: f64,
    /// Full lists per node per second in steady state.
    pub lists_per_node_per_s: f64,
    /// Full lists per membership change (a member that joins again lists everything).
    pub lists_per_change: f64,
    /// Full lists per membership change, per watcher (watchers that lag get snapshots).
    pub lists_per_change_per_watcher: f64,
    /// Full lists per node reconnect.
    pub lists_per_reconnect: f64,
    /// Watches spread over the nodes rather than held by each (Kubernetes' sharded heartbeats:
    /// `(total, most on one node)`, S·k and S): a node holds min(most, total / members + 2).
    pub spread_watches: (f64, f64),
    /// Per spread watch per second: requests, watch messages, full lists.
    pub per_spread_watch_per_s: (f64, f64, f64),
    /// Per spread watch per node reconnect (it reopens them all): requests, watch messages,
    /// full lists.
    pub per_spread_watch_reconnect: (f64, f64, f64),
    /// Room for retries, jitter and timers that do not line up with the window.
    pub slack: f64,
    /// What the numbers come from, for violation messages.
    pub why: &'static str,
}

/// What happened in one window, as the harness saw it (not as the control plane counted it).
#[derive(Clone, Copy, Debug, Default)]
pub struct Window {
    /// Its length.
    pub length: Duration,
    /// Nodes (members and clients) that ran.
    pub nodes: usize,
    /// Members (the size of a relist).
    pub members: usize,
    /// Membership changes the backend accepted or made (joins, leaves, expiries, new
    /// descriptions).
    pub changes: u64,
    /// Node reconnects the faults forced (each node hit by a cut, a crash, a restart, a
    /// pause; every node for a control-plane restart, pause or stream reset).
    pub reconnects: u64,
}

impl LoadBudget {
    /// The most requests, watch messages and listed objects allowed in `w`.
    pub fn allowed(&self, w: &Window) -> (f64, f64, f64) {
        let secs = w.length.as_secs_f64();
        let nodes = w.nodes as f64;
        let members = w.members as f64;
        let changes = w.changes as f64;
        let reconnects = w.reconnects as f64;
        let (total, most) = self.spread_watches;
        let spread = if total > 0.0 {
            most.min(total / members.max(1.0) + 2.0)
        } else {
            0.0
        };
        let (sw_requests, sw_events, sw_lists) = self.per_spread_watch_per_s;
        let (rw_requests, rw_events, rw_lists) = self.per_spread_watch_reconnect;
        let requests = secs * nodes * (self.requests_per_node_per_s + spread * sw_requests)
            + changes * self.requests_per_change
            + reconnects * (self.requests_per_reconnect + spread * rw_requests);
        let events = secs
            * nodes
            * (self.events_per_watcher_per_s
                + self.events_per_watcher_per_member_per_s * members
                + spread * sw_events)
            + changes * nodes * self.events_per_change_per_watcher
            + reconnects * (self.events_per_reconnect + spread * rw_events);
        let lists = secs * nodes * (self.lists_per_node_per_s + spread * sw_lists)
            + changes * self.lists_per_change
            + changes * nodes * self.lists_per_change_per_watcher
            + reconnects * (self.lists_per_reconnect + spread * rw_lists);
        (
            requests * self.slack,
            events * self.slack,
            lists * (members + 1.0) * self.slack,
        )
    }
}

/// Judges one window's counts against the budget: a violation message per quantity over it.
pub fn judge(budget: &LoadBudget, w: &Window, counts: &LoadCounts) -> Vec<String> {
    let (requests, events, items) = budget.allowed(w);
    let mut out = Vec::new();
    let window = format!(
        "{:.0} s window, {} nodes, {} members, {} membership changes, {} reconnects",
        w.length.as_secs_f64(),
        w.nodes,
        w.members,
        w.changes,
        w.reconnects
    );
    if counts.total_requests() as f64 > requests {
        out.push(format!(
            "load budget: the control plane answered {} requests ({:?}) in a {window}; the design allows {:.0} ({})",
            counts.total_requests(),
            counts.requests,
            requests,
            budget.why
        ));
    }
    if counts.watch_events as f64 > events {
        out.push(format!(
            "load budget: the control plane delivered {} watch messages in a {window}; the design allows {:.0} ({})",
            counts.watch_events, events, budget.why
        ));
    }
    if counts.list_items as f64 > items {
        out.push(format!(
            "load budget: the control plane listed {} objects in {} lists in a {window}; the design allows {:.0} ({})",
            counts.list_items, counts.relists, items, budget.why
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> LoadBudget {
        LoadBudget {
            requests_per_node_per_s: 0.5,
            requests_per_change: 2.0,
            requests_per_reconnect: 4.0,
            events_per_watcher_per_s: 0.2,
            events_per_watcher_per_member_per_s: 0.0,
            events_per_change_per_watcher: 1.0,
            events_per_reconnect: 2.0,
            lists_per_node_per_s: 0.0,
            lists_per_change: 0.0,
            lists_per_change_per_watcher: 0.0,
            lists_per_reconnect: 1.0,
            spread_watches: (0.0, 0.0),
            per_spread_watch_reconnect: (0.0, 0.0, 0.0),
            per_spread_watch_per_s: (0.0, 0.0, 0.0),
            slack: 1.5,
            why: "test",
        }
    }

    #[test]
    fn steady_load_grows_with_nodes_not_nodes_squared() {
        let w = |nodes| Window {
            length: Duration::from_secs(10),
            nodes,
            members: nodes,
            ..Window::default()
        };
        let (r10, e10, _) = budget().allowed(&w(10));
        let (r1000, e1000, _) = budget().allowed(&w(1000));
        assert!((r1000 / r10 - 100.0).abs() < 1e-9);
        assert!((e1000 / e10 - 100.0).abs() < 1e-9);
    }

    #[test]
    fn a_window_over_budget_is_named() {
        let w = Window {
            length: Duration::from_secs(10),
            nodes: 10,
            members: 10,
            changes: 1,
            reconnects: 0,
        };
        let mut c = LoadCounts::default();
        c.requests.insert("heartbeat".into(), 50);
        c.watch_events = 20;
        assert!(
            judge(&budget(), &w, &c).is_empty(),
            "75 requests and 45 events allowed"
        );
        c.watch_events = 100;
        let v = judge(&budget(), &w, &c);
        assert_eq!(v.len(), 1);
        assert!(v[0].contains("100 watch messages"), "{v:?}");
    }

    #[test]
    fn counts_since_an_earlier_snapshot() {
        let m = LoadMeter::default();
        m.request("join", 10);
        let a = m.counts();
        m.request("join", 10);
        m.request("heartbeat", 5);
        m.event(7);
        m.listed(3, 100);
        let d = m.counts().since(&a);
        assert_eq!(d.total_requests(), 2);
        assert_eq!(d.watch_events, 1);
        assert_eq!(d.list_items, 3);
        assert_eq!(d.relists, 1);
        assert_eq!(d.bytes_out, 10 + 5 + 7 + 100);
        let l = Load::of(&d, Duration::from_secs(2), 4);
        assert_eq!(l.requests_per_s, 1.0);
        assert_eq!(l.events_per_member_per_s, 0.125);
    }
}
