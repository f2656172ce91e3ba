//! Prometheus metrics of a node's activation host: what an operator watches.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of deactivations and refusals: a fixed, small set of reasons.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// Why.
    pub reason: &'static str,
}

/// Counters of one node's activation host. Clone to share (the counters are shared).
#[derive(Clone, Debug, Default)]
pub struct ActivationMetrics {
    /// Identities activated here.
    pub activations: Counter,
    /// Identities deactivated here, by reason (`moved`, `membership_lost`, `shutdown`,
    /// `passivated`).
    pub deactivations: Family<ReasonLabel, Counter>,
    /// Calls and release requests refused here, by reason.
    pub refusals: Family<ReasonLabel, Counter>,
    /// Activations not done because a member did not confirm it let go of the identity.
    pub release_rounds_failed: Counter,
    /// Identities active (or draining) here.
    pub active: Gauge,
    /// Activations the actor refused (its `activate` failed).
    pub activations_failed: Counter,
    /// Release requests refused because the grants table was full (`max_grants`).
    pub grants_full: Counter,
    /// Identities with grants remembered (after the last topology change's pruning).
    pub grants: Gauge,
    /// Hand-off records dropped at their bound (`max_handed_states`).
    pub handed_states_dropped: Counter,
    /// Activations of an identity held before (generation above 1) that started with no
    /// state: its newest holder kept none, or lost it with its membership.
    pub handoffs_without_state: Counter,
}

impl ActivationMetrics {
    /// Registers every metric under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "activation_activations",
            "Identities activated on this node",
            self.activations.clone(),
        );
        registry.register(
            "activation_deactivations",
            "Identities deactivated on this node, by reason",
            self.deactivations.clone(),
        );
        registry.register(
            "activation_refusals",
            "Calls and release requests refused by this node, by reason",
            self.refusals.clone(),
        );
        registry.register(
            "activation_release_rounds_failed",
            "Activations not done because a member did not confirm it let go",
            self.release_rounds_failed.clone(),
        );
        registry.register(
            "activation_active",
            "Identities active or draining on this node",
            self.active.clone(),
        );
        registry.register(
            "activation_activations_failed",
            "Activations the actor refused",
            self.activations_failed.clone(),
        );
        registry.register(
            "activation_grants_full",
            "Release requests refused because the grants table was full (max_grants)",
            self.grants_full.clone(),
        );
        registry.register(
            "activation_grants",
            "Identities this node let go of for a claimant its view may not list yet",
            self.grants.clone(),
        );
        registry.register(
            "activation_handed_states_dropped",
            "Hand-off records dropped at their bound (max_handed_states)",
            self.handed_states_dropped.clone(),
        );
        registry.register(
            "activation_handoffs_without_state",
            "Activations of an identity held before that started with no state",
            self.handoffs_without_state.clone(),
        );
    }
}
