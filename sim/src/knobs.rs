//! What a seed varies besides its fault schedule: the network's quality and the sizes of the
//! buffers and caches, so rare paths (lag, eviction, buggify'd timings) run in some seeds.

use std::time::Duration;

use serde::Serialize;

use crate::faults::SimRng;

/// The seed's network and buffer settings.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Knobs {
    /// Probability that a packet (or a connection attempt) is lost; madsim retries lost packets
    /// of a connection, so this shows up as delay, and as failed calls.
    pub packet_loss: f64,
    /// One-way latency range, ms.
    pub latency_ms: (u64, u64),
    /// madsim's buggify and the product's fault points (seconds-long network delays, late
    /// sweeps, slow snapshots, lost broadcasts). Oracles that assume a healthy path are off.
    pub buggify: bool,
    /// Capacity of every node's event stream (small: subscribers lag).
    pub event_capacity: usize,
    /// Capacity of every node's owner cache (small: entries are evicted).
    pub cache_capacity: usize,
    /// The registry's per-watcher buffer (small: watchers lag and get snapshots).
    pub watch_buffer: usize,
    /// Leaves accepted by the registry are delivered again 1.5 s later.
    pub duplicate_leaves: bool,
    /// Each member's first Leave is lost on the way (the provider must retry).
    pub lose_first_leave: bool,
    /// The registry's publish interval (long: changes are coalesced into fewer updates).
    pub publish_interval: Duration,
    /// Kubernetes: members are gated by a headless Service's EndpointSlices, kept by the
    /// simulated endpoints controller.
    pub k8s_service: bool,
    /// Kubernetes with a Service: each endpoint carries its Pod's zone
    /// ([`crate::control::apiserver::pod_zone`]) and members place identities under
    /// [`shoal::placement::PlacementRule::ZoneAffinity`].
    pub k8s_zones: bool,
    /// The registry sends snapshots larger than this in fragments (small: every snapshot).
    pub snapshot_fragment_bytes: usize,
    /// The registry compresses snapshots larger than this for watchers that accept it (small:
    /// most snapshots of a simulated cluster).
    pub snapshot_compress_bytes: usize,
    /// The control plane's door sends out-of-contract watch messages (as a buggy or older
    /// server could): updates dropped (a gap), sent twice, older snapshots, events repeated.
    pub out_of_contract: bool,
    /// etcd and Kubernetes: the provider's request timeout, when a scenario needs answers that
    /// come later than the default 1 s allows (the lease margin is 0.6 s).
    pub request_timeout: Option<Duration>,
    /// Kubernetes: sharded heartbeats `(shards, monitors)` (`None`: the provider's default,
    /// sharded too, unless `k8s_everyone`).
    pub k8s_heartbeats: Option<(u32, u32)>,
    /// Kubernetes: every member watches every member's Lease (`Heartbeats::Everyone`, the
    /// setting before sharded heartbeats became the default).
    pub k8s_everyone: bool,
    /// Kubernetes: a cluster migrating between heartbeat settings (`k8s_heartbeats` is the
    /// sharded one): which setting a node's first process uses; every later process of the
    /// node (a restart, a replaced Pod) uses the other.
    pub k8s_migrate: Option<Migration>,
    /// etcd: how many etcd members (nodes sharing one replicated store) the members are given
    /// as endpoints (1: a single etcd).
    pub etcd_members: usize,
    /// etcd: authentication on, with tokens that live this long (`None`: off).
    pub etcd_token_ttl: Option<Duration>,
}

/// A cluster migrating between the Kubernetes provider's heartbeat settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Migration {
    /// From every member watching every Lease to sharded heartbeats.
    ToSharded,
    /// Back from sharded heartbeats to every member watching every Lease.
    ToEveryone,
}

impl Migration {
    /// Whether a node's process uses sharded heartbeats: `first` is the node's first process.
    pub fn sharded(self, first: bool) -> bool {
        match self {
            Migration::ToSharded => !first,
            Migration::ToEveryone => first,
        }
    }
}

impl Default for Knobs {
    fn default() -> Self {
        Self {
            packet_loss: 0.0,
            latency_ms: (1, 10),
            buggify: false,
            event_capacity: shoal::EventStream::DEFAULT_CAPACITY,
            cache_capacity: 1_000_000,
            watch_buffer: shoal::registry::RegistryLimits::default().watch_buffer,
            duplicate_leaves: false,
            lose_first_leave: false,
            publish_interval: shoal::registry::RegistryConfig::default().publish_interval,
            k8s_service: false,
            k8s_zones: false,
            snapshot_fragment_bytes: shoal::registry::RegistryLimits::default()
                .snapshot_fragment_bytes,
            snapshot_compress_bytes: shoal::registry::RegistryLimits::default()
                .snapshot_compress_bytes,
            out_of_contract: false,
            request_timeout: None,
            k8s_heartbeats: None,
            k8s_everyone: false,
            k8s_migrate: None,
            etcd_members: 1,
            etcd_token_ttl: None,
        }
    }
}

impl Knobs {
    /// The knobs `seed` draws (a stream of its own, so schedules do not shift).
    pub fn for_seed(seed: u64) -> Self {
        let mut r = SimRng::new(seed, 3);
        let mut k = Knobs::default();
        match r.range(0, 10) {
            0..=3 => {}
            4..=8 => {
                k.packet_loss = r.range(0, 20) as f64 / 1000.0;
                let lo = r.range(1, 20);
                k.latency_ms = (lo, lo + r.range(1, 40));
            }
            _ => k.buggify = true,
        }
        if r.chance(0.2) {
            k.event_capacity = r.range(2, 6) as usize;
        }
        if r.chance(0.2) {
            k.cache_capacity = r.range(4, 32) as usize;
        }
        if r.chance(0.2) {
            k.watch_buffer = r.range(1, 3) as usize;
        }
        k.duplicate_leaves = r.chance(0.3);
        k.lose_first_leave = r.chance(0.4);
        if r.chance(0.25) {
            k.publish_interval = r.ms(100, 500);
        }
        k.k8s_service = r.chance(0.5);
        k.k8s_zones = k.k8s_service && r.chance(0.5);
        if r.chance(0.3) {
            k.snapshot_fragment_bytes = r.range(16, 400) as usize;
        }
        if r.chance(0.4) {
            k.snapshot_compress_bytes = r.range(32, 300) as usize;
        }
        k.out_of_contract = r.chance(0.25);
        k
    }

    /// The placement rule the members use.
    pub fn placement_rule(&self) -> shoal::placement::PlacementRule {
        if self.k8s_zones {
            shoal::placement::PlacementRule::ZoneAffinity
        } else {
            shoal::placement::PlacementRule::Rendezvous
        }
    }

    /// madsim's configuration for these knobs.
    pub fn madsim_config(&self) -> madsim::Config {
        let mut c = madsim::Config::default();
        c.net.packet_loss_rate = self.packet_loss;
        c.net.send_latency =
            Duration::from_millis(self.latency_ms.0)..Duration::from_millis(self.latency_ms.1);
        c
    }
}
