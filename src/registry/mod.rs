//! The gRPC registry: a small server members join, heartbeat and watch, and the provider that
//! talks to it. Protocol: `proto/shoal/registry/v1/registry.proto`; guide:
//! docs/providers/registry.md.

mod config;
#[cfg(not(madsim))]
pub mod idle;
mod metrics;
mod provider;
mod server;
mod state;
pub mod wire;

/// The largest watch message Shoal's clients accept (the provider and the CLI), in bytes: above
/// the registry's largest allowed snapshot ([`RegistryLimits::max_snapshot_bytes`] is checked
/// against it), so a large cluster never blinds its watchers. Independent clients must raise
/// their gRPC decode limit to at least the registry's snapshot limit (tonic's default is 4 MiB).
pub const MAX_DECODE_BYTES: usize = 64 * 1024 * 1024;

/// Generated protocol types and gRPC stubs (`shoal.registry.v1`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("shoal.registry.v1");
}

pub use crate::provider::Backoff;
pub use config::{RegistryConfig, RegistryLimits};
pub use metrics::{RegistryMetrics, RegistryProviderMetrics};
pub use provider::{RegistryProvider, RegistryProviderConfig};
pub use server::{RegistryGrpcService, RegistryServer, RegistryService, watch_idle_timeout};
pub use state::{Change, JoinKeys, Joined, RegistryError, RegistryState, Role};
