//! The provider contract: how a node joins a cluster, learns its topology and leaves.

mod backoff;
mod context;
pub(crate) mod describe;
pub mod lease;
pub mod memory;

use async_trait::async_trait;

pub use backoff::Backoff;
pub use context::{ClusterProviderContext, WithheldMembers};
pub use lease::{LeaseTiming, LeaseTracker, LeaseTransition, LossReason, MembershipWindow, Window};
pub mod remote;
pub mod renew;
pub(crate) mod shell;
pub use remote::{
    GrpcPartitionManager, LocalPartitionManager, PartitionManagerClient, PartitionManagerHandle,
    PartitionService,
};
pub use renew::RenewPacer;

use crate::cluster::{Description, MemberId, ModelError};

/// Why a provider operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// `start_member` or `start_client` was called on a running provider.
    #[error("provider is already started")]
    AlreadyStarted,
    /// The operation needs a started provider.
    #[error("provider is not started")]
    NotStarted,
    /// The operation is for members, and this node watches as a client.
    #[error("this node watches as a client: it has no member description")]
    NotAMember,
    /// The member is not (or no longer) part of the cluster.
    #[error("member {0} is not in the cluster")]
    UnknownMember(MemberId),
    /// A member with this id is already registered.
    #[error("member {0} is already registered")]
    DuplicateMember(MemberId),
    /// The description of this node was rejected.
    #[error("invalid member description: {0}")]
    Invalid(#[from] ModelError),
    /// The backend (registry, API server, etcd) could not be reached or did not answer in time.
    #[error("membership backend unavailable: {0}")]
    Unavailable(String),
    /// The backend refused the request (authentication, limits).
    #[error("membership backend refused the request: {0}")]
    Rejected(String),
}

/// A source of cluster membership (in-memory, gRPC registry, Kubernetes, etcd).
///
/// A provider registers this node (member mode) or only observes (client mode), keeps the
/// node's [`crate::placement::PartitionManager`] fed with newer topologies through
/// [`ClusterProviderContext::apply_topology`], and withdraws on shutdown. One provider instance
/// serves one node.
#[async_trait]
pub trait ClusterProvider: Send + Sync + 'static {
    /// Registers this node as a member hosting `ctx`'s kinds and starts watching the topology.
    /// When it returns, the node's partition manager holds a topology that contains the node.
    async fn start_member(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError>;

    /// Starts watching the topology without registering (the node hosts no actors but can
    /// resolve owners). When it returns, the partition manager holds the current topology.
    async fn start_client(&self, ctx: ClusterProviderContext) -> Result<(), ProviderError>;

    /// Stops the provider. `graceful`: deregister first so peers learn at once; otherwise just
    /// stop, as a crash would (peers learn through the provider's failure detection).
    async fn shutdown(&self, graceful: bool) -> Result<(), ProviderError>;

    /// Changes what this member tells its peers about itself (kinds, zone, metadata) without
    /// becoming a new incarnation; peers see one `changed` member and placement moves only the
    /// identities of kinds it stopped or started hosting. Returns once this node's own topology
    /// shows the new description. When the backend cannot be reached, the change stays pending
    /// (the provider publishes it as soon as it can, and keeps it across re-joins) and the call
    /// returns [`ProviderError::Unavailable`]. Members only: a client has no description.
    async fn update_member(&self, description: Description) -> Result<(), ProviderError>;

    /// A handle to the partition manager of `member`, wherever that member runs.
    async fn resolve_partition_manager(
        &self,
        member: &MemberId,
    ) -> Result<PartitionManagerHandle, ProviderError>;
}
