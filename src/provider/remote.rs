//! Reaching another member's partition manager.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use super::ProviderError;
use crate::cluster::{Member, MemberId};
use crate::placement::PartitionManager;

/// What one member's partition manager answers to other members: who it thinks owns an
/// identity, and at which topology version. Comparing the two lets a caller detect that it and
/// the remote member disagree because one of them is behind.
#[async_trait]
pub trait PartitionManagerClient: Send + Sync + fmt::Debug {
    /// The member whose partition manager this reaches.
    fn member_id(&self) -> &MemberId;
    /// The owner of `identity` of `kind` in that member's view.
    async fn owner(&self, kind: &str, identity: &str) -> Result<Option<Member>, ProviderError>;
    /// The topology version that member holds.
    async fn topology_version(&self) -> Result<u64, ProviderError>;
}

/// A shareable handle returned by [`super::ClusterProvider::resolve_partition_manager`].
pub type PartitionManagerHandle = Arc<dyn PartitionManagerClient>;

/// A partition manager in this process.
#[derive(Debug, Clone)]
pub struct LocalPartitionManager {
    member: MemberId,
    manager: Arc<PartitionManager>,
}

impl LocalPartitionManager {
    /// Wraps `manager`, which belongs to `member`.
    pub fn new(member: MemberId, manager: Arc<PartitionManager>) -> Self {
        Self { member, manager }
    }
}

#[async_trait]
impl PartitionManagerClient for LocalPartitionManager {
    fn member_id(&self) -> &MemberId {
        &self.member
    }

    async fn owner(&self, kind: &str, identity: &str) -> Result<Option<Member>, ProviderError> {
        Ok(self
            .manager
            .peek_owner(kind, identity)
            .map(|m| (*m).clone()))
    }

    async fn topology_version(&self) -> Result<u64, ProviderError> {
        Ok(self.manager.version())
    }
}
