//! # Shoal
//!
//! Cluster membership and virtual-actor placement for Rust distributed systems, written so that
//! the same code runs in production and inside the [madsim] deterministic simulator.
//!
//! A tour, spine first:
//!
//! * [`cluster`]: [`Member`]s with incarnation-unique [`MemberId`]s, and the versioned
//!   [`ClusterTopology`] a provider publishes, with [`TopologyDiff`]s between versions.
//! * [`provider`]: the [`ClusterProvider`] trait every membership source implements, and the
//!   [`ClusterProviderContext`] it is handed. [`provider::memory`] is the in-memory provider.
//! * [`placement`]: the [`PartitionManager`], which places `(kind, identity)` pairs on members by
//!   rendezvous hashing with a fixed, documented hash, and reports what moved on every change.
//! * [`events`]: typed [`TopologyEvent`]s and [`ClusterEvent`]s on a bounded [`EventStream`].
//! * [`runtime`]: the [`Clock`] boundary (time, sleep, spawn, randomness) through which provider
//!   code touches the world; real tokio in production, simulated time under `--cfg madsim`.
//! * [`metrics`]: Prometheus metrics for placement and events.
//! * [`registry`]: the bundled gRPC registry (server, provider, protocol); [`kubernetes`]: the
//!   Kubernetes provider's API boundary, watch state machine and in-memory API server (the
//!   provider itself is in progress).
//!
//! ```
//! use shoal::{ClusterProvider, ClusterProviderContext, TokioClock};
//! use shoal::provider::memory::{InMemoryProvider, InMemoryRegistry};
//!
//! # #[tokio::main]
//! # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
//! let registry = InMemoryRegistry::new();
//! let a = InMemoryProvider::new(registry.clone());
//! let b = InMemoryProvider::new(registry.clone());
//! let ctx_a = ClusterProviderContext::new("demo", "10.0.0.1:4000", ["user"], TokioClock::shared())?;
//! let ctx_b = ClusterProviderContext::new("demo", "10.0.0.2:4000", ["user"], TokioClock::shared())?;
//! a.start_member(ctx_a.clone()).await?;
//! b.start_member(ctx_b.clone()).await?;
//! // Both nodes see both members, and agree on who owns "alice".
//! let owner = ctx_b.partition_manager.owner("user", "alice").unwrap();
//! assert_eq!(registry.topology("demo").len(), 2);
//! # while ctx_a.partition_manager.topology().len() < 2 { tokio::task::yield_now().await; }
//! assert_eq!(ctx_a.partition_manager.owner("user", "alice").unwrap().id, owner.id);
//! a.shutdown(true).await?;
//! b.shutdown(true).await?;
//! # Ok(())
//! # }
//! ```
//!
//! [madsim]: https://docs.rs/madsim

pub mod activation;
pub mod cluster;
pub mod etcd;
pub mod events;
pub mod kubernetes;
pub mod metrics;
pub mod placement;
pub mod provider;
pub mod registry;
pub mod runtime;

pub use cluster::{
    ClusterTopology, Description, Member, MemberId, MemberLimits, ModelError, TopologyDiff,
};
pub use events::{ClusterEvent, EventStream, Subscription, SubscriptionError, TopologyEvent};
pub use placement::{PartitionConfig, PartitionManager, PlacementError, RebalanceReport};
pub use provider::{
    ClusterProvider, ClusterProviderContext, PartitionManagerHandle, ProviderError,
};
pub use runtime::{Clock, SharedClock, SkewedClock, TokioClock};
