//! Helpers shared by the integration tests.
#![allow(dead_code)]

#[cfg(not(madsim))]
pub mod process;

#[cfg(not(madsim))]
pub mod etcd;

use std::sync::Arc;
use std::time::Duration;

use shoal::{ClusterTopology, PartitionManager};

/// Waits (on the runtime's clock: real or simulated) until `cond` holds, failing the test after
/// `secs` seconds. Used to wait for asynchronous convergence, never to measure time.
pub async fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Waits until `pm` holds a topology with exactly `n` members.
pub async fn wait_members(pm: &Arc<PartitionManager>, n: usize) -> Arc<ClusterTopology> {
    wait_until(&format!("{n} members"), 10, || pm.topology().len() == n).await;
    pm.topology()
}

/// Records node `node`'s own-standing events (membership lost and restored) in `into`, with
/// when each was published (runtime clock), until the node's event stream closes.
pub fn record_standing(
    node: usize,
    events: &shoal::EventStream,
    into: Arc<std::sync::Mutex<Vec<(usize, tokio::time::Instant, shoal::ClusterEvent)>>>,
) {
    let mut events = events.subscribe();
    tokio::spawn(async move {
        while let Ok(e) = events.recv().await {
            if matches!(
                e,
                shoal::ClusterEvent::MembershipLost { .. }
                    | shoal::ClusterEvent::MembershipRestored { .. }
            ) {
                into.lock()
                    .unwrap()
                    .push((node, tokio::time::Instant::now(), e));
            }
        }
    });
}
