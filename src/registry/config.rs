//! Registry server settings and their defaults.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cluster::MemberLimits;

/// Settings of a registry server. Every field has a default; see docs/providers/registry.md for
/// why each default is what it is.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryConfig {
    /// A registration not refreshed for this long expires.
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    /// How often members are told to heartbeat. Unset: a third of the TTL, so two heartbeats
    /// in a row may be lost before a live member expires (see [`Self::heartbeat`]).
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Option<Duration>,
    /// How often expired registrations are swept.
    #[serde(with = "humantime_serde")]
    pub sweep_interval: Duration,
    /// How often a quiet watch stream carries a progress message.
    #[serde(with = "humantime_serde")]
    pub progress_interval: Duration,
    /// Under load, changes of one cluster go out to its watchers at most once per this
    /// interval, coalesced into one update (a change after a quiet interval goes out at once).
    /// Zero: every change at once.
    #[serde(with = "humantime_serde")]
    pub publish_interval: Duration,
    /// After a (re)start, watchers wait this long for their first snapshot, so members that were
    /// registered before the restart can re-join first instead of appearing to leave. Unset:
    /// one and a half heartbeat intervals (members re-join at their next heartbeat); zero: off.
    #[serde(with = "humantime_serde")]
    pub startup_grace: Option<Duration>,
    /// Resource limits.
    pub limits: RegistryLimits,
    /// Shared secret per cluster; a cluster listed here refuses requests without its token.
    pub cluster_tokens: BTreeMap<String, String>,
    /// Clusters named by the operator (open ones; those in `cluster_tokens` are named too).
    /// Named clusters are always admitted: `limits.max_clusters` bounds only the others, so
    /// nobody can squat the capacity they need.
    pub clusters: std::collections::BTreeSet<String>,
    /// Refuse every cluster that is not named (in `clusters` or `cluster_tokens`).
    pub only_named_clusters: bool,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            ttl: Duration::from_secs(6),
            heartbeat_interval: None,
            sweep_interval: Duration::from_millis(500),
            progress_interval: Duration::from_secs(5),
            publish_interval: Duration::from_millis(10),
            startup_grace: None,
            limits: RegistryLimits::default(),
            cluster_tokens: BTreeMap::new(),
            clusters: Default::default(),
            only_named_clusters: false,
        }
    }
}

/// Tokens are redacted: settings are logged and printed in errors.
impl std::fmt::Debug for RegistryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let tokens: BTreeMap<&str, &str> = self
            .cluster_tokens
            .keys()
            .map(|c| (c.as_str(), "<redacted>"))
            .collect();
        f.debug_struct("RegistryConfig")
            .field("ttl", &self.ttl)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("sweep_interval", &self.sweep_interval)
            .field("progress_interval", &self.progress_interval)
            .field("publish_interval", &self.publish_interval)
            .field("startup_grace", &self.startup_grace)
            .field("limits", &self.limits)
            .field("cluster_tokens", &tokens)
            .field("clusters", &self.clusters)
            .field("only_named_clusters", &self.only_named_clusters)
            .finish()
    }
}

impl RegistryConfig {
    /// Whether the operator named `cluster` (it has a token, or is listed in `clusters`).
    pub fn is_named(&self, cluster: &str) -> bool {
        self.clusters.contains(cluster) || self.cluster_tokens.contains_key(cluster)
    }

    /// The heartbeat interval members are told to use: the one set, or a third of the TTL.
    pub fn heartbeat(&self) -> Duration {
        self.heartbeat_interval.unwrap_or(self.ttl / 3)
    }

    /// How long watchers wait for their first snapshot after a start: the one set, or one and a
    /// half heartbeat intervals.
    pub fn grace(&self) -> Duration {
        self.startup_grace
            .unwrap_or_else(|| self.heartbeat() * 3 / 2)
    }

    /// Checks the settings make sense together, naming the offending one.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("ttl", self.ttl),
            ("heartbeat interval", self.heartbeat()),
            ("sweep interval", self.sweep_interval),
            ("progress interval", self.progress_interval),
        ];
        for (name, d) in positive {
            if d.is_zero() {
                return Err(format!("{name} must be positive"));
            }
        }
        if self.publish_interval > self.sweep_interval {
            return Err(format!(
                "publish interval ({:?}) is longer than the sweep interval ({:?}): changes would reach watchers later than expiries are noticed",
                self.publish_interval, self.sweep_interval
            ));
        }
        let heartbeat = self.heartbeat();
        if heartbeat * 3 > self.ttl {
            return Err(format!(
                "heartbeat interval ({heartbeat:?}) leaves no room for two missed heartbeats within the ttl ({:?}): use at most a third of the ttl ({:?}), or leave it unset to derive it",
                self.ttl,
                self.ttl / 3
            ));
        }
        if let Some(grace) = self.startup_grace
            && !grace.is_zero()
            && grace < heartbeat
        {
            return Err(format!(
                "startup grace ({grace:?}) is shorter than the heartbeat interval ({heartbeat:?}): members cannot re-join before watchers get their first snapshot; use at least the heartbeat interval, 0 to turn it off, or leave it unset"
            ));
        }
        let limits = &self.limits;
        // Room for the snapshot message's own framing.
        if limits.max_snapshot_bytes + 1024 > super::MAX_DECODE_BYTES {
            return Err(format!(
                "max_snapshot_bytes ({}) must stay below what clients accept ({} bytes, less 1 KiB of framing)",
                limits.max_snapshot_bytes,
                super::MAX_DECODE_BYTES
            ));
        }
        if limits.max_member_bytes > limits.max_snapshot_bytes {
            return Err(format!(
                "max_member_bytes ({}) exceeds max_snapshot_bytes ({})",
                limits.max_member_bytes, limits.max_snapshot_bytes
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_heartbeat_and_grace_derive_from_the_ttl_and_bad_pairs_are_named() {
        let mut c = RegistryConfig {
            ttl: Duration::from_secs(2),
            ..RegistryConfig::default()
        };
        assert!(c.validate().is_ok(), "a short ttl alone is fine");
        assert_eq!(c.heartbeat(), Duration::from_secs(2) / 3);
        assert_eq!(c.grace(), Duration::from_secs(2) / 3 * 3 / 2);
        c.heartbeat_interval = Some(Duration::from_secs(1));
        let err = c.validate().unwrap_err();
        assert!(err.contains("two missed heartbeats"), "{err}");
        c.ttl = Duration::from_secs(3);
        assert!(c.validate().is_ok());
        c.startup_grace = Some(Duration::from_millis(500));
        assert!(c.validate().unwrap_err().contains("startup grace"));
        c.startup_grace = Some(Duration::ZERO);
        assert!(c.validate().is_ok(), "zero turns the grace off");
        c.publish_interval = c.sweep_interval * 2;
        assert!(c.validate().unwrap_err().contains("publish interval"));
        c.publish_interval = Duration::ZERO;
        assert!(c.validate().is_ok(), "zero publishes every change at once");
    }

    #[test]
    fn debug_output_names_clusters_but_not_their_tokens() {
        let mut c = RegistryConfig::default();
        c.cluster_tokens.insert("prod".into(), "hunter2".into());
        let text = format!("{c:?}");
        assert!(text.contains("prod") && !text.contains("hunter2"), "{text}");
    }
}

/// Bounds on what clients can make the registry hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RegistryLimits {
    /// Most clusters at once (registered or watched) that the operator did not name; named
    /// clusters do not count and are always admitted.
    pub max_clusters: usize,
    /// Most registrations (members and clients) across all clusters.
    pub max_registrations: usize,
    /// Most concurrent watch streams across all clusters.
    pub max_watchers: usize,
    /// Largest member description, encoded, in bytes.
    pub max_member_bytes: usize,
    /// Largest snapshot of one cluster (its members, encoded), in bytes: a join that would make
    /// it larger is refused. Clients accept messages up to [`crate::registry::MAX_DECODE_BYTES`].
    pub max_snapshot_bytes: usize,
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
    /// Snapshots larger than this go in fragments of this size to watchers that accept them
    /// (`WatchRequest.fragments`), so the transport holds a fragment per watcher, not a copy
    /// of the snapshot; 0 sends them whole.
    pub snapshot_fragment_bytes: usize,
    /// Snapshots whose encoded members are larger than this are compressed (zlib, once per
    /// version) for watchers that accept it (`WatchRequest.accept_encodings`), so a burst of new
    /// watchers moves about a third of the bytes; 0 never compresses.
    pub snapshot_compress_bytes: usize,
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
            max_registrations: 100_000,
            max_watchers: 100_000,
            max_member_bytes: 16 * 1024,
            max_snapshot_bytes: 32 * 1024 * 1024,
            max_members_per_cluster: 10_000,
            max_clients_per_cluster: 10_000,
            max_watchers_per_cluster: 20_000,
            max_cluster_name_len: 128,
            max_message_bytes: 64 * 1024,
            watch_buffer: 128,
            snapshot_fragment_bytes: 16 * 1024,
            snapshot_compress_bytes: 4 * 1024,
            max_tombstones: 100_000,
            member: MemberLimits::default(),
        }
    }
}
