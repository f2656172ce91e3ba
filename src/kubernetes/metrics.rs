//! Prometheus metrics of the Kubernetes provider: what an operator watches on each node.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters of one node's Kubernetes provider. Clone to share (the counters are shared).
#[derive(Clone, Debug, Default)]
pub struct KubernetesProviderMetrics {
    /// Renewals of this member's Lease the API server accepted.
    pub renewals: Counter,
    /// Renewals that failed (timeout, unreachable API server, refused).
    pub renew_failures: Counter,
    /// Lists after a watch's resource version was gone (`410 Gone`), per kind.
    pub relists: Counter,
    /// Watch streams that failed, went quiet or were ended by the server, and were reopened.
    pub watch_reopens: Counter,
    /// Expired Leases of other members this node deleted (sharded heartbeats: members removed).
    pub leases_cleaned: Counter,
    /// Sharded heartbeats: times the set of shards this member monitors changed.
    pub monitor_changes: Counter,
    /// Sharded heartbeats: records whose heartbeat was missing when this monitor looked (read
    /// before removing their member).
    pub heartbeats_missing: Counter,
    /// Sharded heartbeats: writes of this member's record only to show members that renew
    /// their own Lease (a cluster migrating between settings) that it is alive.
    pub record_touches: Counter,
    /// Leases of the cluster skipped because they describe no valid member (edited, written
    /// by other software).
    pub leases_skipped: Counter,
    /// Topologies this node issued to its partition manager.
    pub topologies: Counter,
    /// Times this member concluded its Lease had lapsed (not renewed in time, or deleted).
    pub membership_lost: Counter,
    /// Times this member held its Lease again after losing it.
    pub membership_restored: Counter,
    /// Description changes (kinds, zone, metadata) written to this member's Lease.
    pub description_updates: Counter,
    /// Requests the API server shed with `429 Too Many Requests` (API Priority and Fairness);
    /// each was retried no sooner than its `Retry-After`.
    pub throttled: Counter,
    /// Members in this node's view.
    pub members: Gauge,
}

impl KubernetesProviderMetrics {
    /// Registers every metric under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let all: [(&str, &str, &Counter); 14] = [
            (
                "kubernetes_lease_renewals",
                "Renewals of this member's Lease accepted",
                &self.renewals,
            ),
            (
                "kubernetes_lease_renew_failures",
                "Renewals of this member's Lease that failed",
                &self.renew_failures,
            ),
            (
                "kubernetes_watch_relists",
                "Lists after a watch's resource version was gone (410)",
                &self.relists,
            ),
            (
                "kubernetes_watch_reopens",
                "Watch streams reopened after failing, going quiet or ending",
                &self.watch_reopens,
            ),
            (
                "kubernetes_leases_cleaned",
                "Expired member Leases this node deleted",
                &self.leases_cleaned,
            ),
            (
                "kubernetes_monitor_changes",
                "Times the heartbeat shards this member monitors changed",
                &self.monitor_changes,
            ),
            (
                "kubernetes_heartbeats_missing",
                "Records whose heartbeat Lease was missing when this monitor looked",
                &self.heartbeats_missing,
            ),
            (
                "kubernetes_record_touches",
                "Writes of this member's record for members that renew their own Lease (a migrating cluster)",
                &self.record_touches,
            ),
            (
                "kubernetes_leases_skipped",
                "Leases skipped because they describe no valid member",
                &self.leases_skipped,
            ),
            (
                "kubernetes_topologies",
                "Topologies this node issued",
                &self.topologies,
            ),
            (
                "kubernetes_membership_lost",
                "Times this member's Lease lapsed",
                &self.membership_lost,
            ),
            (
                "kubernetes_membership_restored",
                "Times this member held its Lease again after losing it",
                &self.membership_restored,
            ),
            (
                "kubernetes_description_updates",
                "Description changes written to this member's Lease",
                &self.description_updates,
            ),
            (
                "kubernetes_api_throttled",
                "Requests the API server shed with 429 Too Many Requests (retried after Retry-After)",
                &self.throttled,
            ),
        ];
        for (name, help, counter) in all {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "kubernetes_members",
            "Members in this node's view",
            self.members.clone(),
        );
    }
}
