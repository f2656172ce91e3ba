//! The gRPC registry: a small server members join, heartbeat and watch, and the provider that
//! talks to it. Protocol: `proto/shoal/registry/v1/registry.proto`; guide:
//! docs/providers/registry.md.

mod config;
mod metrics;
mod provider;
mod server;
mod state;
pub mod wire;

/// Generated protocol types and gRPC stubs (`shoal.registry.v1`).
#[allow(missing_docs, clippy::all)]
pub mod pb {
    tonic::include_proto!("shoal.registry.v1");
}

pub use config::{RegistryConfig, RegistryLimits};
pub use metrics::{RegistryMetrics, RegistryProviderMetrics};
pub use provider::{Backoff, RegistryProvider, RegistryProviderConfig};
pub use server::{RegistryGrpcService, RegistryServer, RegistryService, watch_idle_timeout};
pub use state::{Change, JoinKeys, Joined, RegistryError, RegistryState, Role};
