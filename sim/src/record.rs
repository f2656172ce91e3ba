//! What a simulated run saw: a trace of events with simulated timestamps, each node's view of
//! the membership over time, violations found by the checkers, and failover times.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use madsim::time::Instant;
use serde::Serialize;
use shoal::{ClusterTopology, MemberId};

/// One trace line.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TraceEvent {
    /// Simulated milliseconds since the run started.
    pub at_ms: u64,
    /// The node it concerns (`m0`, `registry`, `client0`, `harness`).
    pub node: String,
    /// What happened.
    pub event: String,
}

/// A node's view at one moment: drawn on the timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ViewPoint {
    /// Simulated ms.
    pub at_ms: u64,
    /// Node name.
    pub node: String,
    /// Topology version.
    pub version: u64,
    /// Member count.
    pub members: usize,
}

/// A fault as it happened: drawn on the timeline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FaultSpan {
    /// Start, simulated ms.
    pub from_ms: u64,
    /// End (healed), simulated ms, if it healed.
    pub to_ms: Option<u64>,
    /// Description.
    pub what: String,
    /// Nodes it hit.
    pub nodes: Vec<String>,
}

/// Shared, cloneable recorder (every simulated node writes to it; it lives outside the nodes
/// so it survives crashes).
#[derive(Clone, Debug)]
pub struct Recorder {
    inner: Arc<Mutex<Inner>>,
    start: Instant,
}

/// Where one node incarnation's view is: the (epoch, version) last applied, and the registry
/// epochs it left.
#[derive(Debug)]
struct ViewCursor {
    at: (u64, u64),
    left_epochs: BTreeSet<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    trace: Vec<TraceEvent>,
    views: Vec<ViewPoint>,
    faults: Vec<FaultSpan>,
    violations: Vec<String>,
    failovers: Vec<Duration>,
    /// Per node incarnation: where its view is.
    last_version: BTreeMap<(String, MemberId), ViewCursor>,
    keep_trace: bool,
    digest: u64,
    reported: std::collections::BTreeSet<String>,
    paths: BTreeMap<String, u64>,
}

/// Views with more members than this are traced as their size and fingerprint.
const TRACE_MEMBERS: usize = 16;

/// Most trace lines kept in memory (campaign runs keep only the digest).
const MAX_TRACE: usize = 200_000;

impl Recorder {
    /// A recorder starting now; `keep_trace` keeps every line (replay) or only the digest.
    pub fn new(keep_trace: bool) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Inner {
                keep_trace,
                ..Inner::default()
            })),
            start: Instant::now(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Simulated ms since the run started.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Simulated ms since the run started at `at`.
    pub fn ms_of(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.start).as_millis() as u64
    }

    /// Appends a trace line.
    pub fn trace(&self, node: &str, event: impl Into<String>) {
        let at_ms = self.now_ms();
        let event = event.into();
        tracing::debug!(target: "shoal_sim::trace", at_ms, node, %event);
        let mut inner = self.lock();
        digest_line(&mut inner, at_ms, node, &event);
        // Campaign runs keep only the digest: storing every line costs more than the run.
        if inner.keep_trace && inner.trace.len() < MAX_TRACE {
            inner.trace.push(TraceEvent {
                at_ms,
                node: node.to_string(),
                event,
            });
        }
    }

    /// Records a violation (and traces it).
    pub fn violation(&self, message: String) {
        let message = format!("t={:.3}s: {message}", self.now_ms() as f64 / 1000.0);
        self.trace("harness", format!("VIOLATION {message}"));
        let mut inner = self.lock();
        if inner.violations.len() < 100 {
            inner.violations.push(message);
        }
    }

    /// Records a violation unless one with the same `key` was already recorded (a checker
    /// that samples would otherwise repeat itself every sample).
    pub fn violation_once(&self, key: String, message: String) {
        if self.lock().reported.insert(key) {
            self.violation(message);
        }
    }

    /// A node (incarnation `id`) applied `topology` (fingerprint `fp`): records the view and
    /// checks that versions
    /// never go backwards for this incarnation within one registry epoch, and that it never
    /// returns to an epoch it left (a stale topology of a registry run that is over).
    pub fn observe(
        &self,
        node: &str,
        id: &MemberId,
        topology: &ClusterTopology,
        fp: crate::fingerprint::Fingerprint,
    ) {
        let (epoch, version) = (topology.epoch(), topology.version());
        let key = (node.to_string(), id.clone());
        let problem = {
            let mut inner = self.lock();
            let entry = inner.last_version.entry(key).or_insert_with(|| ViewCursor {
                at: (epoch, 0),
                left_epochs: BTreeSet::new(),
            });
            let (prev_epoch, prev) = entry.at;
            let problem = if prev_epoch == epoch && version <= prev && prev != 0 {
                Some(format!("applied {version} after {prev}"))
            } else if prev_epoch != epoch && entry.left_epochs.contains(&epoch) {
                Some(format!(
                    "applied {version} of epoch {epoch:x}, which it had left for epoch {prev_epoch:x}"
                ))
            } else {
                None
            };
            if prev_epoch != epoch {
                entry.left_epochs.insert(prev_epoch);
            }
            entry.at = (epoch, version);
            problem
        };
        if let Some(problem) = problem {
            self.violation(format!(
                "safety: topology version went backwards on {node} ({id}): {problem}"
            ));
        }
        let at_ms = self.now_ms();
        // Small views spelled out; a large one as its size and fingerprint (listing a thousand
        // ids on every node's every view would cost more than the run).
        if topology.len() <= TRACE_MEMBERS {
            let members: Vec<&str> = topology.member_ids().map(MemberId::as_str).collect();
            self.trace(node, format!("view v{version} [{}]", members.join(",")));
        } else {
            self.trace(
                node,
                format!(
                    "view v{version} ({} members, {:016x})",
                    topology.len(),
                    fp.full
                ),
            );
        }
        self.lock().views.push(ViewPoint {
            at_ms,
            node: node.to_string(),
            version,
            members: topology.len(),
        });
    }

    /// A node went down (crash, kill): its view ends here on the timeline.
    pub fn node_down(&self, node: &str) {
        let at_ms = self.now_ms();
        self.lock().views.push(ViewPoint {
            at_ms,
            node: node.to_string(),
            version: 0,
            members: 0,
        });
    }

    /// A fault started; returns its index for [`Self::fault_healed`].
    pub fn fault_started(&self, what: String, nodes: Vec<String>) -> usize {
        self.trace("harness", format!("FAULT {what}"));
        let from_ms = self.now_ms();
        let mut inner = self.lock();
        inner.faults.push(FaultSpan {
            from_ms,
            to_ms: None,
            what,
            nodes,
        });
        inner.faults.len() - 1
    }

    /// A fault healed.
    pub fn fault_healed(&self, index: usize) {
        let now = self.now_ms();
        let what = {
            let mut inner = self.lock();
            let Some(f) = inner.faults.get_mut(index) else {
                return;
            };
            if f.to_ms.is_some() {
                return;
            }
            f.to_ms = Some(now);
            f.what.clone()
        };
        self.trace("harness", format!("HEAL {what}"));
    }

    /// Counts one run of a rare path (a re-join, a lagged subscriber, a fault kind), so a
    /// campaign shows which paths its scenarios reached.
    pub fn count(&self, path: &str) {
        self.count_n(path, 1);
    }

    /// Counts `n` runs of a rare path.
    pub fn count_n(&self, path: &str, n: u64) {
        if n == 0 {
            return;
        }
        let mut inner = self.lock();
        match inner.paths.get_mut(path) {
            Some(count) => *count += n,
            None => {
                inner.paths.insert(path.to_string(), n);
            }
        }
    }

    /// Records one failover time (crash to removal on every survivor).
    pub fn failover(&self, d: Duration) {
        self.lock().failovers.push(d);
    }

    /// Everything recorded so far.
    pub fn snapshot(&self) -> Recording {
        let inner = self.lock();
        Recording {
            trace: if inner.keep_trace {
                inner.trace.clone()
            } else {
                Vec::new()
            },
            views: if inner.keep_trace {
                inner.views.clone()
            } else {
                Vec::new()
            },
            faults: inner.faults.clone(),
            violations: inner.violations.clone(),
            failovers: inner.failovers.clone(),
            paths: inner.paths.clone(),
            digest: inner.digest,
        }
    }

    /// Violations so far.
    pub fn violations(&self) -> Vec<String> {
        self.lock().violations.clone()
    }
}

fn digest_line(inner: &mut Inner, at_ms: u64, node: &str, event: &str) {
    let mut h = inner.digest ^ 0xcbf2_9ce4_8422_2325;
    for b in at_ms
        .to_le_bytes()
        .iter()
        .chain(node.as_bytes())
        .chain([0u8].iter())
        .chain(event.as_bytes())
    {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    inner.digest = shoal::placement::hash::fmix64(h);
}

/// The outcome data of one run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Recording {
    /// Trace lines (only when kept).
    pub trace: Vec<TraceEvent>,
    /// Views over time (only when the trace is kept).
    pub views: Vec<ViewPoint>,
    /// Faults as they happened.
    pub faults: Vec<FaultSpan>,
    /// Checker violations.
    pub violations: Vec<String>,
    /// Failover times.
    pub failovers: Vec<Duration>,
    /// How often each rare path ran.
    pub paths: BTreeMap<String, u64>,
    /// Digest of the whole trace (FNV-1a + fmix64 over every line): equal digests, same run.
    pub digest: u64,
}
