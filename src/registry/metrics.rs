//! Prometheus metrics of the registry server: what an operator watches.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tonic::Code;

use super::state::RegistryState;

/// Label of per-cluster metrics. Cardinality is bounded by the registry's cluster limit.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabel {
    /// Cluster name.
    pub cluster: String,
}

/// Label of rejected requests.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabel {
    /// The RPC.
    pub op: String,
    /// The gRPC status code.
    pub code: String,
}

/// Registry server metrics.
#[derive(Clone, Debug, Default)]
pub struct RegistryMetrics {
    /// Members per cluster.
    pub members: Family<ClusterLabel, Gauge>,
    /// Client registrations per cluster.
    pub clients: Family<ClusterLabel, Gauge>,
    /// Successful joins (including re-joins).
    pub joins: Counter,
    /// Successful leaves.
    pub leaves: Counter,
    /// Registrations removed by TTL.
    pub expiries: Counter,
    /// Registrations superseded by a newer incarnation joining at the same address.
    pub superseded: Counter,
    /// Times the registry found it had stalled (woke up more than a sweep interval late) and
    /// extended every lease by the stall.
    pub stalls: Counter,
    /// Updates sent to a cluster's watchers (each may carry several coalesced changes).
    pub publishes: Counter,
    /// Changes held back and folded into a later update (under load, at most one update per
    /// publish interval goes out).
    pub coalesced: Counter,
    /// Connections closed after carrying no call for the idle timeout (`shoal-registry
    /// --idle-timeout`).
    pub idle_connections_closed: Counter,
    /// Heartbeats accepted.
    pub heartbeats: Counter,
    /// Open watch streams.
    pub watchers: Gauge,
    /// Snapshots sent to watchers.
    pub snapshots: Counter,
    /// Snapshot fragments sent to watchers that accept them.
    pub snapshot_fragments: Counter,
    /// Snapshot versions compressed (once each, for the watchers that accept it).
    pub snapshot_compressions: Counter,
    /// Times a watcher fell behind its buffer and was sent a snapshot instead.
    pub watch_lagged: Counter,
    /// Rejected requests by RPC and status code.
    pub rejections: Family<RejectLabel, Counter>,
    /// Requests refused because a limit was reached, by the limit's setting name.
    pub limit_rejections: Family<LimitLabel, Counter>,
    /// Registrations across all clusters.
    pub registrations: Gauge,
    /// Clusters held (registered or watched).
    pub clusters: Gauge,
    /// Encoded snapshot size per cluster, in bytes (against `max_snapshot_bytes`).
    pub snapshot_bytes: Family<ClusterLabel, Gauge>,
}

/// The `limit` label: a limit's setting name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    /// Setting name, like `max_watchers`.
    pub limit: String,
}

impl RegistryMetrics {
    /// Registers every metric under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "registry_members",
            "Members per cluster",
            self.members.clone(),
        );
        registry.register(
            "registry_clients",
            "Client registrations per cluster",
            self.clients.clone(),
        );
        registry.register("registry_joins", "Successful joins", self.joins.clone());
        registry.register("registry_leaves", "Successful leaves", self.leaves.clone());
        registry.register(
            "registry_expiries",
            "Registrations removed by TTL",
            self.expiries.clone(),
        );
        registry.register(
            "registry_superseded",
            "Registrations superseded by a newer incarnation at the same address",
            self.superseded.clone(),
        );
        registry.register(
            "registry_stalls",
            "Stalls after which every lease was extended",
            self.stalls.clone(),
        );
        registry.register(
            "registry_publishes",
            "Updates sent to a cluster's watchers",
            self.publishes.clone(),
        );
        registry.register(
            "registry_coalesced_changes",
            "Changes folded into a later update under load",
            self.coalesced.clone(),
        );
        registry.register(
            "registry_idle_connections_closed",
            "Connections closed after carrying no call for the idle timeout",
            self.idle_connections_closed.clone(),
        );
        registry.register(
            "registry_heartbeats",
            "Heartbeats accepted",
            self.heartbeats.clone(),
        );
        registry.register(
            "registry_watchers",
            "Open watch streams",
            self.watchers.clone(),
        );
        registry.register(
            "registry_watch_snapshots",
            "Snapshots sent to watchers",
            self.snapshots.clone(),
        );
        registry.register(
            "registry_watch_snapshot_fragments",
            "Snapshot fragments sent to watchers that accept them",
            self.snapshot_fragments.clone(),
        );
        registry.register(
            "registry_watch_snapshot_compressions",
            "Snapshot versions compressed for watchers that accept compressed members",
            self.snapshot_compressions.clone(),
        );
        registry.register(
            "registry_watch_lagged",
            "Watchers that fell behind and were sent a snapshot",
            self.watch_lagged.clone(),
        );
        registry.register(
            "registry_rejected_requests",
            "Rejected requests",
            self.rejections.clone(),
        );
        registry.register(
            "registry_limit_rejections",
            "Requests refused at a limit, by limit",
            self.limit_rejections.clone(),
        );
        registry.register(
            "registry_registrations",
            "Registrations across all clusters",
            self.registrations.clone(),
        );
        registry.register(
            "registry_clusters",
            "Clusters held (registered or watched)",
            self.clusters.clone(),
        );
        registry.register(
            "registry_snapshot_bytes",
            "Encoded snapshot size per cluster",
            self.snapshot_bytes.clone(),
        );
    }

    pub(crate) fn limit_reached(&self, limit: &str) {
        self.limit_rejections
            .get_or_create(&LimitLabel {
                limit: limit.to_string(),
            })
            .inc();
    }

    pub(crate) fn rejected(&self, op: &str, code: Code) {
        self.rejections
            .get_or_create(&RejectLabel {
                op: op.to_string(),
                code: format!("{code:?}"),
            })
            .inc();
    }

    /// Refreshes the per-cluster gauges from the state (clusters that are gone are dropped).
    pub(crate) fn observe(&self, state: &RegistryState) {
        self.members.clear();
        self.clients.clear();
        self.snapshot_bytes.clear();
        for (cluster, members, clients) in state.counts() {
            let bytes = state.snapshot_bytes(&cluster);
            let label = ClusterLabel { cluster };
            self.members.get_or_create(&label).set(members as i64);
            self.clients.get_or_create(&label).set(clients as i64);
            self.snapshot_bytes.get_or_create(&label).set(bytes as i64);
        }
        self.registrations.set(state.registrations() as i64);
        self.clusters.set(state.cluster_count() as i64);
    }
}

/// Metrics of one [`crate::registry::RegistryProvider`]: how often its recovery paths ran. An
/// operator alerts on re-joins and heartbeat failures; the simulator prints them per campaign so
/// a recovery path that no scenario reaches is visible.
#[derive(Clone, Debug, Default)]
pub struct RegistryProviderMetrics {
    /// Heartbeats that failed (timeout, unreachable registry).
    pub heartbeat_failures: Counter,
    /// Re-joins after the registry no longer knew this registration (expired, or restarted).
    pub rejoins: Counter,
    /// Watch streams reopened because an update did not follow the version held (a gap).
    pub watch_gaps: Counter,
    /// Watch streams reopened because they carried nothing for the idle timeout.
    pub watch_idle_reopens: Counter,
    /// Watch streams that failed or were ended by the server, and were reopened.
    pub watch_reopens: Counter,
    /// Watch streams resumed from the version held with no snapshot (the first message was
    /// progress at that version).
    pub watch_resumed: Counter,
    /// Snapshots applied (first sync, after a lag, a gap or a registry restart).
    pub snapshots_applied: Counter,
    /// Snapshot fragments received (large snapshots arrive in fragments).
    pub snapshot_fragments: Counter,
    /// Snapshots received compressed (large ones, when `compressed_snapshots` is on).
    pub compressed_snapshots: Counter,
    /// Retries whose backoff reached its cap.
    pub backoff_capped: Counter,
    /// Snapshots of a new registry epoch taken as a reset (the registry restarted).
    pub epoch_changes: Counter,
    /// Times this member concluded its registration had lapsed (no heartbeat accepted for the
    /// TTL minus the safety margin, or the registry no longer knew it).
    pub membership_lost: Counter,
    /// Times this member was registered again (as a new incarnation) after losing it.
    pub membership_restored: Counter,
    /// Description changes (kinds, zone, metadata) the registry accepted.
    pub description_updates: Counter,
}

impl RegistryProviderMetrics {
    /// Registers every metric under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let all: [(&str, &str, &Counter); 14] = [
            (
                "registry_client_snapshot_fragments",
                "Snapshot fragments received",
                &self.snapshot_fragments,
            ),
            (
                "registry_client_compressed_snapshots",
                "Snapshots received compressed",
                &self.compressed_snapshots,
            ),
            (
                "registry_client_description_updates",
                "Description changes (kinds, zone, metadata) the registry accepted",
                &self.description_updates,
            ),
            (
                "registry_client_heartbeat_failures",
                "Heartbeats that failed",
                &self.heartbeat_failures,
            ),
            (
                "registry_client_rejoins",
                "Re-joins after the registration was lost",
                &self.rejoins,
            ),
            (
                "registry_client_watch_gaps",
                "Watch streams reopened after a version gap",
                &self.watch_gaps,
            ),
            (
                "registry_client_watch_idle_reopens",
                "Watch streams reopened after going quiet",
                &self.watch_idle_reopens,
            ),
            (
                "registry_client_watch_reopens",
                "Watch streams reopened after failing or ending",
                &self.watch_reopens,
            ),
            (
                "registry_client_watch_resumed",
                "Watch streams resumed without a snapshot",
                &self.watch_resumed,
            ),
            (
                "registry_client_snapshots_applied",
                "Snapshots applied",
                &self.snapshots_applied,
            ),
            (
                "registry_client_backoff_capped",
                "Retries at the backoff cap",
                &self.backoff_capped,
            ),
            (
                "registry_client_epoch_changes",
                "Registry epoch changes taken as a reset (registry restarts)",
                &self.epoch_changes,
            ),
            (
                "registry_client_membership_lost",
                "Times this member's registration lapsed",
                &self.membership_lost,
            ),
            (
                "registry_client_membership_restored",
                "Times this member registered again after losing its registration",
                &self.membership_restored,
            ),
        ];
        for (name, help, counter) in all {
            registry.register(name, help, counter.clone());
        }
    }
}
