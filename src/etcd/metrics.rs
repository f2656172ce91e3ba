//! Prometheus metrics of the etcd provider: what an operator watches on each node.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Counters of one node's etcd provider. Clone to share (the counters are shared).
#[derive(Clone, Debug, Default)]
pub struct EtcdProviderMetrics {
    /// Keep-alives of this member's lease etcd accepted.
    pub keep_alives: Counter,
    /// Keep-alives that failed (timeout, etcd unreachable).
    pub keep_alive_failures: Counter,
    /// Times this member registered again as a new incarnation (its lease expired or was
    /// revoked, or its key was deleted).
    pub rejoins: Counter,
    /// Times this member wrote its key again because the store held another value for it than
    /// it had written (a store restored from a snapshot taken before its last write).
    pub own_key_rewrites: Counter,
    /// Lists after a watch's revision was compacted.
    pub relists: Counter,
    /// Watch streams that failed, went quiet or ended, and were reopened.
    pub watch_reopens: Counter,
    /// Watch batches skipped because their revision was below one the same stream had
    /// already delivered (a repeated or reordered message: out of etcd's contract).
    pub batches_out_of_order: Counter,
    /// Keys under the members prefix skipped because they describe no valid member.
    pub keys_skipped: Counter,
    /// Topologies this node issued.
    pub topologies: Counter,
    /// Times this member concluded its lease had lapsed.
    pub membership_lost: Counter,
    /// Times this member held a lease again after losing one.
    pub membership_restored: Counter,
    /// Requests etcd refused (authentication, permission), each logged at warn.
    pub refusals: Counter,
    /// Audits of the view: a count of the keys at the view's revision, compared with it.
    pub audits: Counter,
    /// Audits that found the view wrong (another number of keys, or a revision etcd no longer
    /// has: a restore), each followed by a list.
    pub audit_mismatches: Counter,
    /// Members in this node's view.
    pub members: Gauge,
}

impl EtcdProviderMetrics {
    /// Registers every metric under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        let all: [(&str, &str, &Counter); 14] = [
            (
                "etcd_keep_alives",
                "Keep-alives of this member's lease accepted",
                &self.keep_alives,
            ),
            (
                "etcd_keep_alive_failures",
                "Keep-alives of this member's lease that failed",
                &self.keep_alive_failures,
            ),
            (
                "etcd_rejoins",
                "Registrations as a new incarnation after losing the lease or key",
                &self.rejoins,
            ),
            (
                "etcd_own_key_rewrites",
                "Rewrites of this member's key after the store was seen holding another value for it",
                &self.own_key_rewrites,
            ),
            (
                "etcd_watch_relists",
                "Lists after a watch's revision was compacted",
                &self.relists,
            ),
            (
                "etcd_watch_reopens",
                "Watch streams reopened after failing, going quiet or ending",
                &self.watch_reopens,
            ),
            (
                "etcd_watch_batches_out_of_order",
                "Watch batches skipped: older than one their stream had already delivered",
                &self.batches_out_of_order,
            ),
            (
                "etcd_keys_skipped",
                "Member keys skipped because they describe no valid member",
                &self.keys_skipped,
            ),
            (
                "etcd_topologies",
                "Topologies this node issued",
                &self.topologies,
            ),
            (
                "etcd_membership_lost",
                "Times this member's lease lapsed",
                &self.membership_lost,
            ),
            (
                "etcd_membership_restored",
                "Times this member held a lease again after losing one",
                &self.membership_restored,
            ),
            (
                "etcd_refusals",
                "Requests etcd refused (authentication, permission)",
                &self.refusals,
            ),
            (
                "etcd_audits",
                "Counts of the keys at the view's revision, compared with the view",
                &self.audits,
            ),
            (
                "etcd_audit_mismatches",
                "Audits that found the view wrong (then listed again)",
                &self.audit_mismatches,
            ),
        ];
        for (name, help, counter) in all {
            registry.register(name, help, counter.clone());
        }
        registry.register(
            "etcd_members",
            "Members in this node's view",
            self.members.clone(),
        );
    }
}
