//! Helpers shared by the integration tests.
#![allow(dead_code)]

#[cfg(not(madsim))]
pub mod process;

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
