//! The etcd provider: members as keys bound to etcd leases, watched from a revision
//! (docs/providers/etcd.md).
//!
//! * [`api`]: the [`api::EtcdApi`] boundary (the only thing that differs between production,
//!   where the `etcd-client` crate talks to a real etcd, and simulation).
//! * [`members`]: the key schema and a node's view of the members as of one revision, pure.
//! * [`memory`]: an etcd in memory with the semantics the provider depends on (revisions,
//!   leases on the server's clock, watch from a revision, compaction, restarts), for tests
//!   and the simulator's etcd node.
//! * [`EtcdProvider`]: the async shell: keeps this member's lease alive, watches, re-joins
//!   as a new incarnation after losing its lease, and announces its own standing.
//! * [`endpoints`]: which etcd member a client talks to and what it does when a call fails
//!   (failover, re-authentication): the policy shared by both worlds' clients.
//! * `client` (normal build): the production [`api::EtcdApi`] over `etcd-client`.

pub mod api;
#[cfg(not(madsim))]
pub mod client;
pub mod endpoints;
pub mod members;
pub mod memory;
mod metrics;
mod provider;

pub use metrics::EtcdProviderMetrics;
pub use provider::{EtcdProvider, EtcdProviderConfig};
