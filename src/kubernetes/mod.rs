//! The Kubernetes provider: members as `coordination.k8s.io/v1` Leases plus the
//! `discovery.k8s.io/v1` EndpointSlices of a Service (docs/providers/kubernetes.md).
//!
//! * [`api`]: the [`api::KubeApi`] boundary (the only thing that differs between production,
//!   where kube-rs talks to a real API server, and simulation), with the object types the
//!   provider reads and writes.
//! * [`watch`]: the list / watch / relist state machine ([`watch::Reflector`]), pure, as
//!   kube-runtime's watcher: a `410 Gone` relists and swaps the cache at once, so members never
//!   vanish in between.
//! * [`members`]: the provider's decisions, pure: the Lease schema of a member, liveness judged
//!   on the observer's own clock (as client-go's leader election does), EndpointSlices merged
//!   into the set of serving Pods, and the members that follow.
//! * [`listing`]: the members a node lists, kept up to date one change at a time (what
//!   `members` computes from scratch), handing out what changed.
//! * [`memory`]: an in-memory API server implementing [`api::KubeApi`] with the API's semantics
//!   (resourceVersion, 409 Conflict, bookmarks, 410 Gone after compaction), for tests and the
//!   simulator's stand-in.
//! * [`shards`]: liveness apart from membership, pure: record and heartbeat Leases, each
//!   member's heartbeat shard and the members that monitor each shard.
//! * [`provider`]: [`KubernetesProvider`], the async shell over those: it renews this member's
//!   Lease, watches, deletes expired Leases and announces this member's own standing.
//!
//! * [`kube_rs`] (normal build): the production [`api::KubeApi`] over kube-rs.

pub mod api;
#[cfg(not(madsim))]
pub mod kube_rs;
pub mod listing;
pub mod members;
pub mod memory;
mod metrics;
mod provider;
pub mod shards;
pub mod watch;

pub use metrics::KubernetesProviderMetrics;
pub use provider::{KubernetesProvider, KubernetesProviderConfig};
pub use shards::Heartbeats;
