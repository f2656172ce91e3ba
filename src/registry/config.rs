//! Registry server settings and their defaults.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::MemberLimits;

/// Settings of a registry server. Every field has a default; see docs/providers/registry.md for
/// why each default is what it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// A registration not refreshed for this long expires.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How often members are told to heartbeat (a third of the TTL: two heartbeats may be lost
    /// before a live member expires).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often expired registrations are swept.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// How often a quiet watch stream carries a progress message.
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// After a (re)start, watchers wait this long for their first snapshot, so members that were
    /// registered before the restart can re-join first instead of appearing to leave.
    #[serde(with = "humantime_serde")]
    pub startup_grace: Duration,
    /// Resource limits.
    pub limits: RegistryLimits,
    /// Shared secret per cluster; a cluster listed here refuses requests without its token.
    pub cluster_tokens: BTreeMap<String, String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(6),
            heartbeat_interval: Duration::from_secs(2),
            sweep_interval: Duration::from_millis(500),
            progress_interval: Duration::from_secs(5),
            startup_grace: Duration::from_secs(3),
            limits: RegistryLimits::default(),
            cluster_tokens: BTreeMap::new(),
        }
    }
}

impl RegistryConfig {
    /// Checks the settings make sense together, naming the offending one.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("ttl", self.ttl),
            ("heartbeat interval", self.heartbeat_interval),
            ("sweep interval", self.sweep_interval),
            ("progress interval", self.progress_interval),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.heartbeat_interval >= self.ttl {
            return Err(format!(
                "heartbeat interval ({:?}) must be shorter than the ttl ({:?})",
                self.heartbeat_interval, self.ttl
            ));
        }
        for (cluster, token) in &self.cluster_tokens {
            if token.is_empty() {
                return Err(format!("the token of cluster {cluster:?} is empty"));
            }
        }
        Ok(())
    }
}

/// Bounds on what clients can make the registry hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryLimits {
    /// Most clusters at once.
    pub max_clusters: usize,
    /// Most members per cluster.
    pub max_members_per_cluster: usize,
    /// Most client registrations per cluster.
    pub max_clients_per_cluster: usize,
    /// Most concurrent watch streams per cluster.
    pub max_watchers_per_cluster: usize,
    /// Longest cluster name, in bytes.
    pub max_cluster_name_len: usize,
    /// Largest request accepted, in bytes.
    pub max_message_bytes: usize,
    /// Updates buffered per cluster for watchers; a watcher further behind gets a snapshot.
    pub watch_buffer: usize,
    /// Most removed member ids remembered (across clusters) so that they cannot re-join; the
    /// oldest are forgotten first, and each after ten TTLs anyway.
    pub max_tombstones: usize,
    /// Limits on each member's description.
    pub member: MemberLimits,
}

impl Default for RegistryLimits {
    fn default() -> Self {
        Self {
            max_clusters: 1024,
            max_members_per_cluster: 10_000,
            max_clients_per_cluster: 10_000,
            max_watchers_per_cluster: 20_000,
            max_cluster_name_len: 128,
            max_message_bytes: 64 * 1024,
            watch_buffer: 128,
            max_tombstones: 100_000,
            member: MemberLimits::default(),
        }
    }
}
